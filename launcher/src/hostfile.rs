//! `cluster.hostfile`: the head starts the node agents itself, one per host, over ssh (as
//! DeepSpeed's launcher does). The file has DeepSpeed's format, one `host slots=N` line per
//! node (`#` starts a comment); there must be `cluster.nodes` hosts of `cluster.gpus_per_node`
//! slots. Each host runs the same `launch` path in the same directory as the head (a shared
//! filesystem, or the same install everywhere), and gets the run's token on its standard
//! input, never on a command line. With `cluster.tls` the agents present the head's
//! certificate, from the same paths on their hosts. TESSERA_SSH replaces `ssh` (e.g. with a
//! wrapper that adds options, or pdsh-like tools that take `HOST COMMAND`).

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tessera_plan::Config;
use tessera_proto::tls::TlsFiles;

use crate::agent::relay;
use crate::exit::Failure;
use crate::progress::Progress;

/// One host of a hostfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: usize,
}

/// Reads `text` (the file at `path`) as `host slots=N` lines.
pub fn parse(path: &str, text: &str) -> Result<Vec<Host>, String> {
    let mut hosts = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{path}:{}", number + 1);
        let mut words = line.split_whitespace();
        let name = words
            .next()
            .expect("invariant: the line is not empty")
            .to_string();
        let slots = match (words.next(), words.next()) {
            (Some(slots), None) => slots
                .strip_prefix("slots=")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!(
                        "{at}: `{slots}` is not `slots=N` with N at least 1 (e.g. `{name} slots=8`)"
                    )
                })?,
            _ => {
                return Err(format!(
                    "{at}: expected `HOST slots=N`, got `{line}` (e.g. `worker-1 slots=8`)"
                ));
            }
        };
        if hosts.iter().any(|h: &Host| h.name == name) {
            return Err(format!("{at}: {name} is listed twice"));
        }
        hosts.push(Host { name, slots });
    }
    Ok(hosts)
}

/// The hosts of `config`'s hostfile, checked against cluster.nodes and gpus_per_node.
pub fn read(config: &Config) -> Result<Option<Vec<Host>>, Failure> {
    let Some(path) = &config.cluster.hostfile else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read cluster.hostfile {path}: {e}")))?;
    let hosts = parse(path, &text).map_err(Failure::usage)?;
    let (nodes, per_node) = (config.cluster.nodes, config.cluster.gpus_per_node);
    if hosts.len() != nodes {
        return Err(Failure::usage(format!(
            "{path} lists {} host{} but cluster.nodes is {nodes}; list one line per node or set \
             cluster.nodes={}",
            hosts.len(),
            if hosts.len() == 1 { "" } else { "s" },
            hosts.len()
        )));
    }
    if let Some(host) = hosts.iter().find(|h| h.slots != per_node) {
        return Err(Failure::usage(format!(
            "{path}: {} has slots={} but cluster.gpus_per_node is {per_node}; every node runs \
             gpus_per_node workers",
            host.name, host.slots
        )));
    }
    Ok(Some(hosts))
}

/// The agents started over ssh; killed on drop (a remote agent that loses its ssh session
/// loses the coordinator soon after and stops its workers).
pub struct RemoteAgents {
    sessions: Vec<Child>,
}

impl RemoteAgents {
    /// Starts `launch agent --coordinator COORDINATOR` on every host; with `tls`, each agent
    /// presents the head's certificate, read at the same paths on its host.
    pub fn start(
        hosts: &[Host],
        coordinator: &str,
        token: &str,
        tls: Option<&TlsFiles>,
        progress: &Progress,
    ) -> anyhow::Result<RemoteAgents> {
        let ssh = std::env::var("TESSERA_SSH").unwrap_or_else(|_| "ssh".into());
        let launch = std::env::current_exe().context("cannot find the launcher's own path")?;
        let here = std::env::current_dir().context("cannot read the current directory")?;
        let mut remote = format!(
            "IFS= read -r TESSERA_TOKEN && export TESSERA_TOKEN && cd {} && exec {} agent \
             --coordinator {}",
            quote(&here.display().to_string()),
            quote(&launch.display().to_string()),
            quote(coordinator)
        );
        if let Some(tls) = tls {
            for ((_, path), flag) in tls
                .env()
                .iter()
                .zip(["--tls-ca", "--tls-cert", "--tls-key"])
            {
                remote.push_str(&format!(" {flag} {}", quote(path)));
            }
        }
        let mut sessions = Vec::new();
        for host in hosts {
            let mut command = Command::new(&ssh);
            command
                .args(["-o", "BatchMode=yes", &host.name, &remote])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: prctl is async-signal-safe; the session dies with the launcher.
            unsafe {
                command.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                    Ok(())
                });
            }
            let mut session = command.spawn().with_context(|| {
                format!("cannot run `{ssh}` to start the agent on {}", host.name)
            })?;
            let mut stdin = session.stdin.take().expect("invariant: stdin is piped");
            writeln!(stdin, "{token}")
                .with_context(|| format!("cannot pass the token to {}", host.name))?;
            let prefix = String::new();
            let stdout = session.stdout.take().expect("invariant: stdout is piped");
            let stderr = session.stderr.take().expect("invariant: stderr is piped");
            relay(stdout, prefix.clone(), progress.clone(), false);
            relay(stderr, prefix, progress.clone(), true);
            sessions.push(session);
        }
        Ok(RemoteAgents { sessions })
    }
}

impl Drop for RemoteAgents {
    fn drop(&mut self) {
        // Agents exit once the run ends; give them all one moment before cutting the sessions.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for session in &mut self.sessions {
            while std::time::Instant::now() < deadline {
                if session.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = session.kill();
            let _ = session.wait();
        }
    }
}

/// `text` as one single-quoted shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_hostfiles_parse_and_mistakes_name_the_line() {
        let hosts = parse(
            "hosts",
            "# the cluster\nworker-1 slots=8\n\nworker-2 slots=8 # spare\n",
        )
        .unwrap();
        assert_eq!(
            hosts,
            [
                Host {
                    name: "worker-1".into(),
                    slots: 8
                },
                Host {
                    name: "worker-2".into(),
                    slots: 8
                }
            ]
        );
        assert_eq!(
            parse("hosts", "a slots=8\nb slots=eight\n").unwrap_err(),
            "hosts:2: `slots=eight` is not `slots=N` with N at least 1 (e.g. `b slots=8`)"
        );
        assert!(
            parse("hosts", "a 8 9\n")
                .unwrap_err()
                .starts_with("hosts:1: expected `HOST slots=N`")
        );
        assert_eq!(
            parse("hosts", "a slots=1\na slots=1\n").unwrap_err(),
            "hosts:2: a is listed twice"
        );
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
