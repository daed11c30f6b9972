//! The workers of this node: spawned, watched, and stopped.
//!
//! Each worker is `launch worker` (this same binary) in its own process group, so that a
//! signal to the group reaches anything it started, and with a parent-death signal (SIGKILL),
//! so that even a SIGKILL of the launcher leaves no worker behind. Their stdout and stderr are
//! relayed line by line with a `[rank N]` prefix.

use std::io::{BufRead as _, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use anyhow::Context as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::progress::Progress;

/// How to start one worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub rank: usize,
    /// Environment beyond the launcher's own (RANK, WORLD_SIZE, TESSERA_TOKEN, ...).
    pub env: Vec<(String, String)>,
    /// Arguments after `launch worker`.
    pub args: Vec<String>,
}

/// A running worker.
pub struct Worker {
    pub rank: usize,
    child: Child,
    /// The exit status, once seen.
    pub status: Option<ExitStatus>,
    relays: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts `spec` as a child of the calling thread. Call it from the thread that lives as
    /// long as the launcher (the parent-death signal fires when that *thread* exits).
    pub fn spawn(spec: &WorkerSpec, progress: &Progress) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("cannot find the launcher's own executable")?;
        let mut command = Command::new(&exe);
        command
            .arg("worker")
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // async-signal-safe prctl and getppid system calls.
        unsafe {
            let launcher = std::process::id();
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The launcher may have died between fork and prctl.
                if nix::unistd::getppid().as_raw() as u32 != launcher {
                    return Err(std::io::Error::other("the launcher exited"));
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start rank {} ({})", spec.rank, exe.display()))?;
        let prefix = format!("[rank {}] ", spec.rank);
        let stdout = child.stdout.take().expect("invariant: stdout is piped");
        let stderr = child.stderr.take().expect("invariant: stderr is piped");
        let relays = vec![
            relay(stdout, prefix.clone(), progress.clone(), false),
            relay(stderr, prefix, progress.clone(), true),
        ];
        Ok(Worker {
            rank: spec.rank,
            child,
            status: None,
            relays,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Records the exit status if the worker has exited; never blocks.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    /// Sends `signal` to the worker's process group (it and anything it started).
    pub fn signal(&self, signal: Signal) {
        if self.status.is_none() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// Waits for the worker to exit and for its output to be relayed.
    pub fn reap(mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
        self.status
    }
}

/// Copies lines from `from` to the launcher's stdout (or stderr), each behind `prefix`.
pub(crate) fn relay(
    from: impl Read + Send + 'static,
    prefix: String,
    progress: Progress,
    stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            progress.println(
                &format!("{prefix}{}", text.trim_end_matches(['\n', '\r'])),
                stderr,
            );
            line.clear();
        }
    })
}

/// "exited with status 1" or "was killed by SIGKILL".
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(number) => match Signal::try_from(number) {
            Ok(signal) => format!("was killed by {signal}"),
            Err(_) => format!("was killed by signal {number}"),
        },
        None => "ended in an unknown way".into(),
    }
}
