//! The worker's side of the control plane: register with the coordinator, wait at the
//! rendezvous for the assignment, then stream one heartbeat per step and obey the
//! coordinator's commands. With TESSERA_TLS_CA, TESSERA_TLS_CERT and TESSERA_TLS_KEY (the
//! node's files, from its agent or a local `launch` with `cluster.tls`) the link is TLS, the
//! worker presenting the node's certificate and checking the coordinator's.
//!
//! gRPC runs on a small tokio runtime of its own; the training loop stays synchronous and only
//! hands beats to a channel. If the heartbeat stream breaks before the run is finished, the
//! launcher is gone, and the worker exits instead of training on as an orphan.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tessera_proto::v1::{
    Beat, NcclId as NcclIdMessage, NcclIdRequest, WorkerAssignment, WorkerHello, command,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;

use crate::comm::Group;
use crate::comm::nccl::NcclId;
use crate::trace::LastCollective;
use tessera_proto::tls::{Tls, TlsFiles};

/// Where the launcher told this worker to find the coordinator (the environment of
/// DESIGN.md).
#[derive(Debug, Clone)]
pub struct LaunchEnv {
    pub coordinator: String,
    pub token: String,
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    /// The node's TLS files (TESSERA_TLS_CA, TESSERA_TLS_CERT, TESSERA_TLS_KEY) when the
    /// coordinator speaks TLS.
    pub tls: Option<TlsFiles>,
}

impl LaunchEnv {
    /// Reads TESSERA_COORDINATOR, TESSERA_TOKEN, RANK, WORLD_SIZE, LOCAL_RANK and the
    /// TESSERA_TLS_* files; `None` when TESSERA_COORDINATOR is unset (the worker runs alone).
    pub fn from_env() -> Result<Option<LaunchEnv>, String> {
        let Ok(coordinator) = std::env::var("TESSERA_COORDINATOR") else {
            return Ok(None);
        };
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                format!(
                    "TESSERA_COORDINATOR is set but {name} is not; workers started by `launch` get \
                     both (unset TESSERA_COORDINATOR to run this worker alone)"
                )
            })
        };
        let number = |name: &str| -> Result<u32, String> {
            let text = var(name)?;
            text.parse()
                .map_err(|_| format!("{name}={text} is not a non-negative integer"))
        };
        Ok(Some(LaunchEnv {
            coordinator,
            token: var("TESSERA_TOKEN")?,
            rank: number("RANK")?,
            world_size: number("WORLD_SIZE")?,
            local_rank: number("LOCAL_RANK").unwrap_or(0),
            tls: TlsFiles::from_env().map_err(|e| e.to_string())?,
        }))
    }
}

/// A registered worker's link to the coordinator.
pub struct Control {
    runtime: tokio::runtime::Runtime,
    client: tessera_proto::Client,
    beats: Option<mpsc::UnboundedSender<Beat>>,
    /// Beats handed to the stream and not yet sent: idle beats wait for an empty queue.
    queued: Arc<AtomicUsize>,
    /// Set once the run is over, so that the coordinator closing the stream is expected.
    finished: Arc<AtomicBool>,
    /// Fires when the coordinator has closed the command stream: after the worker closed
    /// its beats, that means it has read every one of them.
    closed: Option<oneshot::Receiver<()>>,
}

/// How long a finishing worker waits for the coordinator to confirm its last beats.
const FLUSH: Duration = Duration::from_secs(10);

impl Control {
    /// Connects to the coordinator (retrying for `patience`: it may still be starting).
    pub fn connect(env: &LaunchEnv, patience: Duration) -> Result<Control, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-control")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the control-plane runtime: {e}"))?;
        let tls = match &env.tls {
            Some(files) => Some(Tls::load(files).map_err(|e| e.to_string())?),
            None => None,
        };
        let endpoint = tessera_proto::tls::endpoint(&env.coordinator, tls.as_ref())
            .map_err(|e| format!("TESSERA_COORDINATOR: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        let channel = runtime.block_on(async {
            let start = tokio::time::Instant::now();
            loop {
                match endpoint.connect().await {
                    Ok(channel) => return Ok(channel),
                    Err(e) if start.elapsed() > patience => {
                        return Err(format!(
                            "cannot reach the coordinator at {} after {patience:.0?}: {}",
                            env.coordinator,
                            tessera_proto::error_chain(&e)
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })?;
        let client = tessera_proto::client(channel, &env.token)
            .ok_or("TESSERA_TOKEN has characters a gRPC header cannot carry")?;
        Ok(Control {
            client,
            runtime,
            beats: None,
            queued: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicBool::new(false)),
            closed: None,
        })
    }

    /// Registers and waits at the rendezvous barrier for the assignment.
    pub fn register(&mut self, hello: WorkerHello) -> Result<WorkerAssignment, String> {
        let rank = hello.rank;
        self.runtime
            .block_on(self.client.register_worker(hello))
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                format!(
                    "rank {rank} could not join the run: {} ({:?})",
                    status.message(),
                    status.code()
                )
            })
    }

    /// The NCCL unique id of `group`: made here and published when this process is the
    /// group's first member, else fetched from the coordinator (waiting for the first member
    /// to publish it).
    pub fn nccl_id(&mut self, group: &Group) -> Result<NcclId, String> {
        let name = group.name.clone();
        if group.index == 0 {
            let id = NcclId::new().map_err(|e| e.to_string())?;
            let published = NcclIdMessage {
                group: name.clone(),
                id: id.as_bytes().to_vec(),
            };
            self.runtime
                .block_on(self.client.publish_nccl_id(published))
                .map_err(|s| {
                    format!(
                        "cannot publish the NCCL id of group {name}: {}",
                        s.message()
                    )
                })?;
            return Ok(id);
        }
        let fetched = self
            .runtime
            .block_on(self.client.fetch_nccl_id(NcclIdRequest {
                group: name.clone(),
            }))
            .map_err(|s| s.message().to_string())?
            .into_inner();
        NcclId::from_bytes(&fetched.id).map_err(|e| e.to_string())
    }

    /// Opens the heartbeat stream. An Abort command, or the stream breaking before
    /// [`Self::finish`], ends the process with status 1. Besides the beat of each step, one
    /// goes out every `every` (`watchdog.heartbeat`) from this runtime's own thread, also in
    /// the middle of a long step, with the rank's last collective: the coordinator tells a
    /// hung rank by its silence and where it waits by that collective.
    pub fn start_heartbeat(
        &mut self,
        rank: u32,
        last: LastCollective,
        every: Duration,
    ) -> Result<(), String> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queued = self.queued.clone();
        let stream =
            tokio_stream::wrappers::UnboundedReceiverStream::new(receiver).map(move |beat| {
                queued.fetch_sub(1, Ordering::SeqCst);
                beat
            });
        let mut commands = self
            .runtime
            .block_on(self.client.heartbeat(stream))
            .map_err(|s| format!("cannot open the heartbeat stream: {}", s.message()))?
            .into_inner();
        let finished = self.finished.clone();
        let (closed, on_closed) = oneshot::channel();
        self.closed = Some(on_closed);
        self.runtime.spawn(async move {
            loop {
                match commands.message().await {
                    Ok(Some(command)) => match command.kind {
                        Some(command::Kind::Abort(abort)) => {
                            eprintln!("rank {rank}: stopping: {}", abort.reason);
                            std::process::exit(1);
                        }
                        // Clean shutdown between steps is not implemented; the launcher
                        // stops workers with signals instead.
                        Some(command::Kind::Shutdown(_) | command::Kind::Restart(_)) | None => {}
                    },
                    Ok(None) | Err(_) => {
                        if !finished.load(Ordering::SeqCst) {
                            eprintln!(
                                "rank {rank}: lost the coordinator (the launcher exited); stopping"
                            );
                            std::process::exit(1);
                        }
                        let _ = closed.send(());
                        return;
                    }
                }
            }
        });
        // The ticker holds no sender of its own: closing the stream is `finish`'s alone.
        let (idle, done, queued) = (
            sender.downgrade(),
            self.finished.clone(),
            self.queued.clone(),
        );
        self.runtime.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if done.load(Ordering::SeqCst) {
                    return;
                }
                // A beat still waiting says as much as this one would: never queue behind it,
                // so a slow link cannot make the queue (and a step's beat's wait) grow.
                if queued.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let Some(idle) = idle.upgrade() else { return };
                let beat = Beat {
                    rank,
                    last_collective: last.get(),
                    ..Beat::default()
                };
                queued.fetch_add(1, Ordering::SeqCst);
                if idle.send(beat).is_err() {
                    return;
                }
            }
        });
        self.beats = Some(sender);
        Ok(())
    }

    /// Sends one beat (dropped silently if the stream is gone: the reader exits the process).
    pub fn beat(&self, beat: Beat) {
        if let Some(beats) = &self.beats {
            self.queued.fetch_add(1, Ordering::SeqCst);
            if beats.send(beat).is_err() {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Sends the final beat and closes the stream, then waits (up to [`FLUSH`]) until the
    /// coordinator has read every beat: a metrics line is never lost to a worker that exits
    /// while its beats are still on the way.
    pub fn finish(mut self, beat: Beat) {
        self.finished.store(true, Ordering::SeqCst);
        self.beat(beat);
        self.beats = None;
        if let Some(closed) = self.closed.take() {
            self.runtime
                .block_on(async { tokio::time::timeout(FLUSH, closed).await })
                .ok();
        }
    }

    /// The last beat of a rank that fails with `error`: the launcher names the rank whose own
    /// error stopped the run (`caused_by_peer` false) before those that only noticed it.
    pub fn fail(self, rank: u32, error: &str, caused_by_peer: bool) {
        self.finish(Beat {
            rank,
            error: error.to_string(),
            caused_by_peer,
            finished: false,
            ..Beat::default()
        });
    }
}
