//! `launch agent`: one per node of a run across nodes. It registers the node with the head's
//! coordinator, starts one worker per rank the coordinator gives it (as `launch` does on one
//! machine, with [`Worker`]), reports each exit, beats on its lifeline to the coordinator,
//! and stops its workers when told to (Abort), when it loses the coordinator, or on Ctrl-C.
//! The workers talk to the coordinator and to each other directly; the agent only starts,
//! watches and stops them.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tessera_proto::Client;
use tessera_proto::tls::{Setting, Tls, TlsFiles};
use tessera_proto::v1::{AgentBeat, AgentHello, Restart, WorkerExit, command};

use crate::agent::{Worker, WorkerSpec, describe_status};
use crate::cli::AgentArgs;
use crate::exit::Failure;
use crate::progress::Progress;
use crate::run::{GRACE, POLL, SIGNALS, catch_signals, token_from_env};

/// What the lifeline to the coordinator tells the main thread.
enum Lifeline {
    Abort(String),
    /// Start the workers again: the node's share in the run's next attempt.
    Restart(Restart),
    Lost(String),
}

/// Runs this node's share of the job until its workers have exited.
pub fn run_agent(args: &AgentArgs) -> Result<(), Failure> {
    let token = token_from_env(
        "set TESSERA_TOKEN to the secret the head node's `launch` was started with",
    )?;
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => {
            let files = TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                setting: Setting::Flags,
            };
            Some(Tls::load(&files).map_err(|e| Failure::usage(e.to_string()))?)
        }
        // clap requires all three or none.
        _ => None,
    };
    catch_signals()?;
    let patience = Duration::from_secs(args.wait.max(1));
    let comm_host = match &args.host {
        Some(host) => host.clone(),
        None => local_address_towards(&args.coordinator, patience)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tessera-agent")
        .enable_all()
        .build()
        .context("cannot start the agent's runtime")?;
    let mut client = runtime.block_on(connect(&args.coordinator, &token, tls.as_ref(), None))?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The coordinator refuses a node whose GPUs cannot hold its share of a CUDA run.
    let (gpus, free_memory_bytes) = crate::capacity::visible();
    let assignment = runtime
        .block_on(client.register_agent(AgentHello {
            hostname: hostname.clone(),
            gpus: gpus as u32,
            free_memory_bytes,
            comm_host: comm_host.clone(),
            cpu_cores: cores as u32,
            pid: std::process::id(),
            available_memory_bytes: crate::capacity::available_memory().unwrap_or(0),
        }))
        .map_err(|s| {
            use tonic::Code;
            // The coordinator refuses with a reason; anything else broke the connection.
            let refused = !matches!(s.code(), Code::Internal | Code::Unavailable | Code::Unknown);
            Failure::Runtime(if refused {
                anyhow::anyhow!(
                    "the coordinator at {} refused this node: {}",
                    args.coordinator,
                    s.message()
                )
            } else {
                anyhow::anyhow!(
                    "the coordinator at {} did not answer: {}{}",
                    args.coordinator,
                    s.message(),
                    tls_hint(tls.is_some())
                )
            })
        })?
        .into_inner();
    let node = assignment.node;
    let progress = Progress::plain();
    let gpus = match gpus {
        0 => String::new(),
        1 => "; 1 GPU".into(),
        n => format!("; {n} GPUs"),
    };
    progress.println(
        &format!(
            "node {node} of {} ({hostname}, {comm_host}): ranks {:?}{gpus}",
            assignment.nodes, assignment.ranks
        ),
        false,
    );

    let (lifeline, news) = std_mpsc::channel();
    let every = Duration::from_millis(assignment.heartbeat_ms.max(1).into());
    let patience = Duration::from_millis(assignment.heartbeat_timeout_ms.max(1).into());
    // Its own connection, with keepalive pings, so that a coordinator that went silent (its
    // node left the network) is noticed like one that closed the connection.
    let lifeline_client = runtime.block_on(connect(
        &args.coordinator,
        &token,
        tls.as_ref(),
        Some((every, patience)),
    ))?;
    open_lifeline(&runtime, lifeline_client, node, every, lifeline)?;

    let (coordinator_host, coordinator_port) = args
        .coordinator
        .rsplit_once(':')
        .unwrap_or((args.coordinator.as_str(), ""));
    let local = assignment.ranks.len().max(1);
    let threads = args.threads.unwrap_or((cores / local).max(1));
    let mut node_env: Vec<(String, String)> = assignment
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    node_env.extend([
        ("MASTER_ADDR".into(), coordinator_host.to_string()),
        ("MASTER_PORT".into(), coordinator_port.to_string()),
        ("TESSERA_COORDINATOR".into(), args.coordinator.clone()),
        ("TESSERA_TOKEN".into(), token.clone()),
    ]);
    // The workers present the node's certificate too.
    node_env.extend(match &tls {
        Some(tls) => tls.files().env(),
        None => TlsFiles::env_off(),
    });
    let mut share = Share {
        node,
        ranks: assignment.ranks.clone(),
        env: node_env,
        args: assignment.worker_args.clone(),
        threads,
        attempt: assignment.attempt,
    };
    loop {
        match share.run(&runtime, &mut client, &news, &progress) {
            Ended::Finished => {
                progress.println(
                    &format!("node {}: every worker finished", share.node),
                    false,
                );
                return Ok(());
            }
            Ended::Interrupted => return Err(Failure::Interrupted),
            Ended::CannotStart(why) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "node {}: cannot start its workers: {why}",
                    share.node
                )));
            }
            Ended::Lost => return Err(lost(share.node)),
            Ended::Failed => {}
        }
        // The run may restart (restart.max): stay until the coordinator says or goes.
        progress.println(
            &format!(
                "node {}: waiting for the coordinator to restart the run",
                share.node
            ),
            false,
        );
        loop {
            if SIGNALS.load(Ordering::SeqCst) > 0 {
                return Err(Failure::Interrupted);
            }
            match news.recv_timeout(POLL) {
                Ok(Lifeline::Restart(restart)) => {
                    share.take(restart);
                    progress.println(
                        &format!(
                            "node {}: restarting its workers, ranks {:?} (attempt {})",
                            share.node, share.ranks, share.attempt
                        ),
                        false,
                    );
                    break;
                }
                Ok(Lifeline::Abort(_)) | Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Ok(Lifeline::Lost(_)) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(lost(share.node));
                }
            }
        }
    }
}

fn lost(node: u32) -> Failure {
    Failure::Runtime(anyhow::anyhow!(
        "node {node}: the run failed and the coordinator is gone (the head's `launch` says why)"
    ))
}

/// How one start of a node's workers ended.
enum Ended {
    Finished,
    Failed,
    /// The coordinator is gone: nothing will restart them.
    Lost,
    Interrupted,
    CannotStart(String),
}

/// A node's ranks and how to start their workers.
struct Share {
    node: u32,
    ranks: Vec<u32>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    threads: usize,
    attempt: u32,
}

impl Share {
    /// The node's share in the run's next attempt.
    fn take(&mut self, restart: Restart) {
        self.args = restart.worker_args;
        self.attempt = restart.attempt;
        self.node = restart.node;
        self.ranks = restart.ranks;
        for (key, value) in restart.env {
            match self.env.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => self.env.push((key, value)),
            }
        }
    }

    /// Starts the node's workers and watches them until all have exited.
    fn run(
        &self,
        runtime: &tokio::runtime::Runtime,
        client: &mut Client,
        news: &std_mpsc::Receiver<Lifeline>,
        progress: &Progress,
    ) -> Ended {
        let node = self.node;
        let mut args = vec!["--threads".to_string(), self.threads.to_string()];
        args.extend(self.args.iter().cloned());
        let mut workers = Vec::new();
        let mut failure = None;
        for (local_rank, &rank) in self.ranks.iter().enumerate() {
            let mut env = self.env.clone();
            env.extend([
                ("RANK".into(), rank.to_string()),
                ("LOCAL_RANK".into(), local_rank.to_string()),
            ]);
            let spec = WorkerSpec {
                rank: rank as usize,
                env,
                args: args.clone(),
            };
            match Worker::spawn(&spec, progress) {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }

        let mut stopping: Option<Instant> = failure.as_ref().map(|_| Instant::now());
        let mut reported = vec![false; workers.len()];
        let (mut any_failed, mut lost) = (false, false);
        loop {
            while let Ok(news) = news.try_recv() {
                let reason = match news {
                    Lifeline::Abort(reason) => format!("stopping the workers: {reason}"),
                    Lifeline::Lost(why) => {
                        lost = true;
                        format!("lost the coordinator ({why}); stopping the workers")
                    }
                    // Only sent once every worker has exited; nothing to do mid-attempt.
                    Lifeline::Restart(..) => continue,
                };
                if stopping.is_none() {
                    progress.println(&format!("node {node}: {reason}"), true);
                    for worker in &workers {
                        worker.signal(Signal::SIGTERM);
                    }
                    stopping = Some(Instant::now());
                }
            }
            if SIGNALS.load(Ordering::SeqCst) > 0 && stopping.is_none() {
                progress.println(
                    &format!("node {node}: interrupted; stopping the workers"),
                    true,
                );
                for worker in &workers {
                    worker.signal(Signal::SIGTERM);
                }
                stopping = Some(Instant::now());
            }
            for (i, worker) in workers.iter_mut().enumerate() {
                if let Some(status) = worker.poll()
                    && !reported[i]
                {
                    reported[i] = true;
                    use std::os::unix::process::ExitStatusExt as _;
                    if !status.success() {
                        any_failed = true;
                        progress.println(
                            &format!(
                                "node {node}: rank {} {}",
                                worker.rank,
                                describe_status(status)
                            ),
                            true,
                        );
                    }
                    let exit = WorkerExit {
                        attempt: self.attempt,
                        rank: worker.rank as u32,
                        code: status.code(),
                        signal: status.signal(),
                        node,
                        pid: worker.pid(),
                    };
                    // A coordinator that is gone cannot hear it; the lifeline says so.
                    let _ = runtime.block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), client.report_exit(exit)).await
                    });
                }
            }
            if workers.iter().all(|w| w.status.is_some()) {
                break;
            }
            if let Some(since) = stopping
                && (since.elapsed() > GRACE || SIGNALS.load(Ordering::SeqCst) > 1)
            {
                for worker in &workers {
                    worker.signal(Signal::SIGKILL);
                }
            }
            std::thread::sleep(POLL);
        }
        for worker in workers {
            worker.reap();
        }
        match failure {
            Some(why) => Ended::CannotStart(why),
            None if SIGNALS.load(Ordering::SeqCst) > 0 => Ended::Interrupted,
            None if lost => Ended::Lost,
            None if any_failed => Ended::Failed,
            None => Ended::Finished,
        }
    }
}

/// The local address of a connection to `coordinator`: the address this node reaches the
/// head from, which is how the other nodes reach it too on an ordinary cluster network.
fn local_address_towards(coordinator: &str, patience: Duration) -> Result<String, Failure> {
    let deadline = Instant::now() + patience;
    loop {
        let attempt = coordinator
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addresses| {
                let address = addresses
                    .next()
                    .ok_or_else(|| "it resolves to no address".to_string())?;
                let stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
                    .map_err(|e| e.to_string())?;
                stream
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .map_err(|e| e.to_string())
            });
        match attempt {
            Ok(host) => return Ok(host),
            Err(e) if Instant::now() >= deadline => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "cannot reach the coordinator at {coordinator} within {patience:.0?}: {e}; \
                     is `launch --config ...` running on the head node, and is --coordinator \
                     its address and --listen port?"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A client of the coordinator, over TLS with `tls`; with `keepalive` (interval, timeout) the
/// connection pings and fails once a ping goes unanswered for the timeout.
async fn connect(
    coordinator: &str,
    token: &str,
    tls: Option<&Tls>,
    keepalive: Option<(Duration, Duration)>,
) -> Result<Client, Failure> {
    let mut endpoint = tessera_proto::tls::endpoint(coordinator, tls)
        .map_err(|e| Failure::usage(format!("--coordinator {coordinator}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    if let Some((interval, timeout)) = keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::Runtime(anyhow::anyhow!(
            "cannot connect to the coordinator at {coordinator}: {}{}",
            tessera_proto::error_chain(&e),
            tls_hint(tls.is_some())
        ))
    })?;
    tessera_proto::client(channel, token)
        .ok_or_else(|| Failure::usage("TESSERA_TOKEN must be printable ASCII"))
}

/// What to check when a coordinator that is reachable breaks the connection: most often one
/// end has TLS and the other not, or their certificates are of different CAs.
fn tls_hint(tls: bool) -> &'static str {
    if tls {
        "; if the head runs without cluster.tls, start this agent without --tls-*; else check \
         that the head's certificate and this node's come from one `launch certs`, the head's \
         for the name in --coordinator"
    } else {
        "; if the head's config sets cluster.tls, give this agent the node's certificate \
         (--tls-ca, --tls-cert, --tls-key)"
    }
}

/// Opens the AgentChannel: beats every `every`, and forwards Abort commands and the loss of
/// the coordinator to `news`.
fn open_lifeline(
    runtime: &tokio::runtime::Runtime,
    mut client: Client,
    node: u32,
    every: Duration,
    news: std_mpsc::Sender<Lifeline>,
) -> Result<(), Failure> {
    let (beats, receiver) = tokio::sync::mpsc::channel(4);
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    // The first beat names the node before the coordinator answers.
    let _ = beats.try_send(AgentBeat { node });
    let mut commands = runtime
        .block_on(client.agent_channel(stream))
        .map_err(|s| {
            Failure::Runtime(anyhow::anyhow!(
                "cannot open the agent channel: {}",
                s.message()
            ))
        })?
        .into_inner();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            if beats.send(AgentBeat { node }).await.is_err() {
                return;
            }
        }
    });
    runtime.spawn(async move {
        loop {
            match commands.message().await {
                Ok(Some(command)) => match command.kind {
                    Some(command::Kind::Abort(abort)) => {
                        let _ = news.send(Lifeline::Abort(abort.reason));
                    }
                    Some(command::Kind::Restart(restart)) => {
                        let _ = news.send(Lifeline::Restart(restart));
                    }
                    Some(command::Kind::Shutdown(_)) | None => {}
                },
                Ok(None) => {
                    let _ = news.send(Lifeline::Lost("it closed the channel".into()));
                    return;
                }
                Err(status) => {
                    let _ = news.send(Lifeline::Lost(status.message().to_string()));
                    return;
                }
            }
        }
    });
    Ok(())
}
