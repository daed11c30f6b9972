//! The coordinator: the gRPC service every worker (and, on a cluster, every node agent) calls.
//!
//! It runs on a tokio runtime of its own, beside the supervisor's main thread. Workers register
//! and wait at the rendezvous barrier until every rank has arrived; each then gets its
//! assignment (rank, mesh coordinates, every peer's collective endpoint, the config). Their
//! heartbeats and the rendezvous outcome flow to the supervisor as [`Event`]s over a channel;
//! the supervisor sends [`Command`]s back with [`Coordinator::broadcast`].
//!
//! Every call must carry the run's token (`authorization: Bearer <token>`); one without it is
//! refused with UNAUTHENTICATED and reported as [`Event::Refused`]. With `cluster.tls` the
//! server speaks only TLS and requires a client certificate of the run's CA: a connection
//! without one is dropped at the handshake and reported the same way.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_plan::config::{Backend, Device};
use tessera_plan::mesh::Mesh;
use tessera_proto::tls::Tls;
use tessera_proto::v1::coordinator_server::{Coordinator as Service, CoordinatorServer};
use tessera_proto::v1::{Abort, Ack, NcclId, NcclIdRequest, Restart};
use tessera_proto::v1::{
    AgentAssignment, AgentBeat, AgentHello, Beat, Command, Coord, WorkerAssignment, WorkerExit,
    WorkerHello, command,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::capacity::{Machine, RankBytes, shortfall};
use tessera_worker::throttle::Throttle;

/// What the coordinator hands every worker, besides its rank.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub config_name: String,
    pub config_yaml: String,
    pub config_sets: Vec<String>,
    pub mesh: Mesh,
    /// What the ranks run on and talk over: a node agent without the GPUs (or their free
    /// memory) for its share of a CUDA run is refused when it registers.
    pub device: Device,
    pub backend: Backend,
    /// What each rank plans to allocate.
    pub planned: Vec<RankBytes>,
    pub collective_timeout: Duration,
    /// How long the barrier waits for every rank to register, from the coordinator's start.
    pub rendezvous_timeout: Duration,
    /// How often node agents beat, and the silence after which either side gives up.
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// What node agents pass their workers after `launch worker`.
    pub worker_args: Vec<String>,
    pub run_id: String,
    pub token: String,
    /// TLS with mutual authentication (cluster.tls): the coordinator serves only clients with
    /// a certificate of the CA. None: plain text.
    pub tls: Option<Tls>,
}

/// What the supervisor hears from the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registered {
        rank: u32,
        hostname: String,
        pid: u32,
    },
    /// Every rank registered; assignments are on their way.
    RendezvousComplete,
    /// The barrier's deadline passed without these ranks.
    RendezvousFailed {
        missing: Vec<u32>,
    },
    Beat(Beat),
    /// A node agent joined as node `node`.
    AgentRegistered {
        node: u32,
        hostname: String,
        /// The node's address, as its workers listen on it.
        address: String,
        ranks: Vec<u32>,
    },
    /// A node agent's lifeline broke: the agent died or its node left the network.
    NodeLost {
        node: u32,
    },
    /// A node agent was refused: its node cannot run its share of the ranks (`reason`).
    NodeRefused {
        reason: String,
    },
    /// A call without the run's token, or (with TLS) a connection without a certificate of
    /// the run's CA.
    Refused {
        peer: Option<SocketAddr>,
    },
    Exit(WorkerExit),
}

/// A running coordinator.
pub struct Coordinator {
    shared: Arc<Shared>,
    pub address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    /// The job as the first attempt had it; `attempt` holds what changes between attempts.
    spec: JobSpec,
    events: Mutex<std_mpsc::Sender<Event>>,
    attempt: Mutex<Attempt>,
    hellos: Mutex<BTreeMap<u32, WorkerHello>>,
    /// How many ranks have registered; the barrier waits for it to reach the world size.
    registered: watch::Sender<usize>,
    /// The command stream of each worker's heartbeat call (agents' are in their slots).
    commands: Mutex<Vec<mpsc::Sender<Result<Command, Status>>>>,
    /// The agents that registered, by node index.
    agents: Mutex<Vec<AgentSlot>>,
    /// NCCL unique ids by group, as their first members published them; watchers wake on
    /// every publication.
    nccl_ids: watch::Sender<BTreeMap<String, Vec<u8>>>,
}

/// What changes when the run restarts.
#[derive(Debug)]
struct Attempt {
    number: u32,
    run_id: String,
    worker_args: Vec<String>,
    /// The layout, which a restart on fewer nodes shrinks ([`Reshape`]).
    mesh: Mesh,
    config_sets: Vec<String>,
    planned: Vec<RankBytes>,
    /// When the rendezvous barrier gives up.
    deadline: Instant,
}

/// A node's agent, and whether its node is gone (its slot then awaits a replacement).
struct AgentSlot {
    hello: AgentHello,
    lost: bool,
    /// Its channel's command stream, once it beat.
    commands: Option<mpsc::Sender<Result<Command, Status>>>,
}

/// A node as the supervisor sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub node: u32,
    pub hostname: String,
    pub address: String,
    pub ranks: Vec<u32>,
    pub lost: bool,
}

impl Shared {
    /// `read` applied to the current attempt (under its lock: `read` must not take it again).
    fn attempt<R>(&self, read: impl FnOnce(&Attempt) -> R) -> R {
        read(&self.attempt.lock().expect("invariant: no panic under lock"))
    }

    fn node_ranks(&self, node: usize) -> Vec<u32> {
        ranks_on(&self.attempt(|a| a.mesh), node)
    }

    fn send(&self, event: Event) {
        // The supervisor stopped listening only when the run is over.
        let _ = self
            .events
            .lock()
            .expect("invariant: no panic while holding the events lock")
            .send(event);
    }

    fn world(&self) -> usize {
        self.attempt(|a| a.mesh.world_size())
    }

    fn missing(&self) -> Vec<u32> {
        let hellos = self.hellos.lock().expect("invariant: no panic under lock");
        (0..self.world() as u32)
            .filter(|r| !hellos.contains_key(r))
            .collect()
    }

    fn assignment(&self, rank: u32) -> WorkerAssignment {
        let hellos = self.hellos.lock().expect("invariant: no panic under lock");
        self.attempt(|attempt| {
            let coord = attempt
                .mesh
                .coord(rank as usize)
                .expect("invariant: registered ranks are in the mesh");
            WorkerAssignment {
                rank,
                world_size: attempt.mesh.world_size() as u32,
                coord: Some(Coord {
                    dp: coord.dp_rank as u32,
                    tp: coord.tp_rank as u32,
                    pp: coord.pp_rank as u32,
                }),
                peer_addresses: hellos.values().map(|h| h.comm_address.clone()).collect(),
                config_name: self.spec.config_name.clone(),
                config_yaml: self.spec.config_yaml.clone(),
                config_sets: attempt.config_sets.clone(),
                planned_device_bytes: attempt.planned[rank as usize].device,
                collective_timeout_ms: self.spec.collective_timeout.as_millis() as u32,
                run_id: attempt.run_id.clone(),
            }
        })
    }
}

struct Handler {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Service for Handler {
    async fn register_agent(
        &self,
        request: Request<AgentHello>,
    ) -> Result<Response<AgentAssignment>, Status> {
        let hello = request.into_inner();
        // One attempt's layout and plan: a restart may reshape both.
        let (mesh, planned) = self.shared.attempt(|a| (a.mesh, a.planned.clone()));
        let nodes = mesh.nodes();
        let (node, ranks) = {
            let mut agents = self
                .shared
                .agents
                .lock()
                .expect("invariant: no panic under lock");
            // A replacement takes the slot of a node that is gone.
            let free = if agents.len() < nodes {
                Some(agents.len())
            } else {
                agents.iter().position(|a| a.lost)
            };
            let Some(node) = free else {
                let hosts: Vec<&str> = agents.iter().map(|a| a.hello.hostname.as_str()).collect();
                return Err(Status::failed_precondition(format!(
                    "this run has {nodes} node{} and all have registered ({}); is this agent \
                     meant for another run?",
                    if nodes == 1 { "" } else { "s" },
                    hosts.join(", ")
                )));
            };
            let ranks = ranks_on(&mesh, node);
            let planned: Vec<RankBytes> = ranks.iter().map(|&r| planned[r as usize]).collect();
            let machine = Machine {
                host: &hello.hostname,
                gpus: hello.gpus as usize,
                free: &hello.free_memory_bytes,
                available: (hello.available_memory_bytes > 0)
                    .then_some(hello.available_memory_bytes),
            };
            let spec = &self.shared.spec;
            if let Some(reason) = shortfall(&machine, &planned, spec.device, spec.backend) {
                self.shared.send(Event::NodeRefused {
                    reason: reason.clone(),
                });
                return Err(Status::failed_precondition(reason));
            }
            let slot = AgentSlot {
                hello: hello.clone(),
                lost: false,
                commands: None,
            };
            if node == agents.len() {
                agents.push(slot);
            } else {
                agents[node] = slot;
            }
            (node, ranks)
        };
        let env = node_env(&mesh, ranks.len(), &hello.comm_host);
        self.shared.send(Event::AgentRegistered {
            node: node as u32,
            hostname: hello.hostname,
            address: hello.comm_host.clone(),
            ranks: ranks.clone(),
        });
        let (worker_args, attempt) = self.shared.attempt(|a| (a.worker_args.clone(), a.number));
        Ok(Response::new(AgentAssignment {
            node: node as u32,
            ranks,
            env,
            heartbeat_ms: self.shared.spec.heartbeat.as_millis() as u32,
            heartbeat_timeout_ms: self.shared.spec.heartbeat_timeout.as_millis() as u32,
            nodes: nodes as u32,
            worker_args,
            attempt,
        }))
    }

    type AgentChannelStream = ReceiverStream<Result<Command, Status>>;

    async fn agent_channel(
        &self,
        request: Request<Streaming<AgentBeat>>,
    ) -> Result<Response<Self::AgentChannelStream>, Status> {
        let mut beats = request.into_inner();
        let (commands, receiver) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut node = None;
            while let Ok(Some(beat)) = beats.message().await {
                if node.is_none() {
                    node = Some(beat.node);
                    let mut agents = shared
                        .agents
                        .lock()
                        .expect("invariant: no panic under lock");
                    if let Some(slot) = agents.get_mut(beat.node as usize) {
                        slot.commands = Some(commands.clone());
                    }
                }
            }
            if node.is_some() {
                // The slot that is still this agent's (not a replacement's), wherever a
                // restart on fewer nodes moved it.
                let mut agents = shared
                    .agents
                    .lock()
                    .expect("invariant: no panic under lock");
                let mine = agents.iter().position(|slot| {
                    slot.commands
                        .as_ref()
                        .is_some_and(|c| c.same_channel(&commands))
                });
                if let Some(index) = mine {
                    agents[index].lost = true;
                    agents[index].commands = None;
                    drop(agents);
                    shared.send(Event::NodeLost { node: index as u32 });
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn register_worker(
        &self,
        request: Request<WorkerHello>,
    ) -> Result<Response<WorkerAssignment>, Status> {
        let hello = request.into_inner();
        let shared = &self.shared;
        let world = shared.world();
        if hello.rank as usize >= world {
            return Err(Status::invalid_argument(format!(
                "rank {} is outside this run's {world} ranks",
                hello.rank
            )));
        }
        let count = {
            let mut hellos = shared
                .hellos
                .lock()
                .expect("invariant: no panic under lock");
            if let Some(earlier) = hellos.get(&hello.rank) {
                return Err(Status::already_exists(format!(
                    "rank {} already registered (pid {} on {})",
                    hello.rank, earlier.pid, earlier.hostname
                )));
            }
            hellos.insert(hello.rank, hello.clone());
            hellos.len()
        };
        shared.send(Event::Registered {
            rank: hello.rank,
            hostname: hello.hostname,
            pid: hello.pid,
        });
        shared.registered.send_replace(count);
        if count == world {
            shared.send(Event::RendezvousComplete);
        }
        let mut registered = shared.registered.subscribe();
        let wait = registered.wait_for(|&n| n >= world);
        let remaining = shared
            .attempt(|a| a.deadline)
            .saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, wait).await {
            Ok(Ok(_)) => Ok(Response::new(shared.assignment(hello.rank))),
            _ => {
                let missing = shared.missing();
                shared.send(Event::RendezvousFailed {
                    missing: missing.clone(),
                });
                Err(Status::deadline_exceeded(format!(
                    "rendezvous timed out after {:.0?}: {} never registered",
                    shared.spec.rendezvous_timeout,
                    describe_ranks(&missing)
                )))
            }
        }
    }

    type HeartbeatStream = ReceiverStream<Result<Command, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<Beat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut beats = request.into_inner();
        let (commands, receiver) = mpsc::channel(4);
        self.shared
            .commands
            .lock()
            .expect("invariant: no panic under lock")
            .push(commands.clone());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(beat)) = beats.message().await {
                shared.send(Event::Beat(beat));
            }
            // The worker closed its side: every beat it sent is an event now. Closing ours
            // tells it so (it waits for this before it exits, so no beat is lost).
            shared
                .commands
                .lock()
                .expect("invariant: no panic under lock")
                .retain(|c| !c.same_channel(&commands));
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn report_exit(&self, request: Request<WorkerExit>) -> Result<Response<Ack>, Status> {
        self.shared.send(Event::Exit(request.into_inner()));
        Ok(Response::new(Ack {}))
    }

    async fn publish_nccl_id(&self, request: Request<NcclId>) -> Result<Response<Ack>, Status> {
        let NcclId { group, id } = request.into_inner();
        if id.len() != NCCL_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "the NCCL id of group {group} has {} bytes, not {NCCL_ID_BYTES}",
                id.len()
            )));
        }
        let mut conflict = None;
        self.shared
            .nccl_ids
            .send_if_modified(|ids| match ids.get(&group) {
                Some(earlier) if *earlier != id => {
                    conflict = Some(group.clone());
                    false
                }
                Some(_) => false,
                None => {
                    ids.insert(group.clone(), id);
                    true
                }
            });
        match conflict {
            Some(group) => Err(Status::already_exists(format!(
                "group {group} already has a different NCCL id: two ranks think they are its first member"
            ))),
            None => Ok(Response::new(Ack {})),
        }
    }

    async fn fetch_nccl_id(
        &self,
        request: Request<NcclIdRequest>,
    ) -> Result<Response<NcclId>, Status> {
        let group = request.into_inner().group;
        let mut ids = self.shared.nccl_ids.subscribe();
        let wait = ids.wait_for(|ids| ids.contains_key(&group));
        let timeout = self.shared.spec.rendezvous_timeout;
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(ids)) => Ok(Response::new(NcclId {
                id: ids[&group].clone(),
                group,
            })),
            _ => Err(Status::deadline_exceeded(format!(
                "no NCCL id for group {group} within {timeout:.0?}: its first member never published one (see its log)"
            ))),
        }
    }
}

/// The global ranks that run on node `node`, in local-rank order.
fn ranks_on(mesh: &Mesh, node: usize) -> Vec<u32> {
    (0..mesh.world_size())
        .filter(|&rank| mesh.node(rank) == node)
        .map(|rank| rank as u32)
        .collect()
}

/// What every worker of a node gets in its environment (RANK and LOCAL_RANK aside).
fn node_env(mesh: &Mesh, local_ranks: usize, comm_host: &str) -> HashMap<String, String> {
    [
        ("WORLD_SIZE", mesh.world_size().to_string()),
        ("LOCAL_WORLD_SIZE", local_ranks.to_string()),
        ("TESSERA_COMM_HOST", comm_host.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A smaller layout for a run that restarts on fewer nodes.
#[derive(Debug, Clone)]
pub struct Reshape {
    pub mesh: Mesh,
    /// The run's `--set` overrides plus the new cluster.nodes and parallel.data.
    pub config_sets: Vec<String>,
    pub planned: Vec<RankBytes>,
}

/// TLS handshakes the coordinator runs at once (see `tls_incoming`).
const MAX_TLS_HANDSHAKES: usize = 256;
/// Refused calls are warned about a few at a time: a scanner makes thousands a second.
static REFUSED: Throttle = Throttle::new(5, Duration::from_secs(10));

/// The size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// "rank 3" or "ranks 1, 4".
pub fn describe_ranks(ranks: &[u32]) -> String {
    let list = ranks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match ranks.len() {
        1 => format!("rank {list}"),
        _ => format!("ranks {list}"),
    }
}

/// How long a client may take over its TLS handshake before its connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on the connections of `incoming` until `stop`.
async fn serve<IO, E>(
    router: tonic::transport::server::Router,
    incoming: impl tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
    stop: impl std::future::Future<Output = ()> + Send,
) where
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let served = router.serve_with_incoming_shutdown(incoming, stop).await;
    if let Err(e) = served {
        eprintln!("error: the coordinator stopped serving: {e}");
    }
}

type TlsConnection = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The TLS connections of `listener`: each handshake runs on its own task (a slow client holds
/// up no other), and one that fails (no certificate, one of another CA, not TLS at all) is
/// dropped, logged and reported as [`Event::Refused`]. Accepting stops once the server drops
/// the stream.
fn tls_incoming(
    runtime: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) -> ReceiverStream<std::io::Result<TlsConnection>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (connections, incoming) = mpsc::channel(16);
    // Handshakes under way at once: a run's agents and workers come a few at a time, so
    // beyond this a flood is closed unread instead of holding a task each.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
    runtime.spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = connections.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((tcp, peer)) = accepted else {
                // Out of file descriptors and the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                REFUSED.warn(|| {
                    format!(
                        "warning: closed a connection from {peer}: {MAX_TLS_HANDSHAKES} TLS \
                         handshakes are already under way"
                    )
                });
                continue;
            };
            let (acceptor, connections, shared) =
                (acceptor.clone(), connections.clone(), shared.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(connection)) => {
                        let _ = connections.send(Ok(connection)).await;
                        return;
                    }
                    // Closed before a byte was sent: a probe of the port (an agent finds its
                    // address towards the coordinator so), no client.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                    Ok(Err(e)) => refusal(&e),
                    Err(_) => format!("no TLS handshake within {HANDSHAKE_TIMEOUT:.0?}"),
                };
                REFUSED.warn(|| format!("warning: refused a connection from {peer}: {why}"));
                shared.send(Event::Refused { peer: Some(peer) });
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// Why a client's TLS handshake failed, in words.
fn refusal(error: &std::io::Error) -> String {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            "it does not speak TLS: an agent or worker without its node's TLS files (--tls-*), \
             or not tessera at all"
                .into()
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            "it presented no certificate; agents and workers present their node's certificate \
             of the run's CA (launch agent --tls-cert)"
                .into()
        }
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("its certificate is not one the run's CA made ({why:?})")
        }
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "it refused this coordinator's certificate ({alert:?}): does it trust this run's \
             ca.pem, and dial a name the head's certificate holds?"
        ),
        _ => error.to_string(),
    }
}

impl Coordinator {
    /// Starts serving on `bind` (port 0: any free port) on `runtime`; events go to `events`.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        bind: SocketAddr,
        spec: JobSpec,
        events: std_mpsc::Sender<Event>,
    ) -> std::io::Result<Coordinator> {
        let listener = runtime.block_on(tokio::net::TcpListener::bind(bind))?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            attempt: Mutex::new(Attempt {
                number: 0,
                run_id: spec.run_id.clone(),
                worker_args: spec.worker_args.clone(),
                mesh: spec.mesh,
                config_sets: spec.config_sets.clone(),
                planned: spec.planned.clone(),
                deadline: Instant::now() + spec.rendezvous_timeout,
            }),
            spec,
            events: Mutex::new(events),
            hellos: Mutex::new(BTreeMap::new()),
            registered: watch::Sender::new(0),
            commands: Mutex::new(Vec::new()),
            agents: Mutex::new(Vec::new()),
            nccl_ids: watch::Sender::new(BTreeMap::new()),
        });
        let expected = tessera_proto::bearer(&shared.spec.token);
        let refused = shared.clone();
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            let given = request
                .metadata()
                .get(tessera_proto::TOKEN_HEADER)
                .and_then(|v| v.to_str().ok());
            if given == Some(expected.as_str()) {
                return Ok(request);
            }
            let peer = request.remote_addr();
            REFUSED.warn(|| {
                format!(
                    "warning: refused a call{} without this run's token",
                    peer.map(|p| format!(" from {p}")).unwrap_or_default()
                )
            });
            refused.send(Event::Refused { peer });
            Err(Status::unauthenticated(
                "this call lacks the run's token (metadata `authorization: Bearer <TESSERA_TOKEN>`)",
            ))
        };
        let service = CoordinatorServer::with_interceptor(
            Handler {
                shared: shared.clone(),
            },
            check,
        );
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let stop = async {
            let _ = stop.await;
        };
        let router = tonic::transport::Server::builder().add_service(service);
        let server = match &shared.spec.tls {
            None => runtime.spawn(serve(router, TcpListenerStream::new(listener), stop)),
            Some(tls) => {
                let config = tls
                    .server_config()
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let incoming = tls_incoming(runtime, listener, config, shared.clone());
                runtime.spawn(serve(router, incoming, stop))
            }
        };
        Ok(Coordinator {
            shared,
            address,
            shutdown: Some(shutdown),
            server: Some(server),
        })
    }

    /// Sends `command` on every worker's heartbeat stream (workers not connected yet miss it;
    /// the supervisor kills what does not stop).
    pub fn broadcast(&self, command: command::Kind) {
        let streams = self
            .shared
            .commands
            .lock()
            .expect("invariant: no panic under lock");
        for stream in streams.iter() {
            let _ = stream.try_send(Ok(Command {
                kind: Some(command.clone()),
            }));
        }
    }

    /// Tells every worker and every node agent to stop.
    pub fn abort(&self, reason: &str) {
        let kind = command::Kind::Abort(Abort {
            reason: reason.to_string(),
        });
        self.broadcast(kind.clone());
        for slot in self
            .shared
            .agents
            .lock()
            .expect("invariant: no panic under lock")
            .iter()
        {
            if let Some(commands) = &slot.commands {
                let _ = commands.try_send(Ok(Command {
                    kind: Some(kind.clone()),
                }));
            }
        }
    }

    /// The nodes whose agents registered, in node order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let agents = self
            .shared
            .agents
            .lock()
            .expect("invariant: no panic under lock");
        agents
            .iter()
            .enumerate()
            .map(|(node, slot)| NodeInfo {
                node: node as u32,
                hostname: slot.hello.hostname.clone(),
                address: slot.hello.comm_host.clone(),
                ranks: self.shared.node_ranks(node),
                lost: slot.lost,
            })
            .collect()
    }

    /// Counts `node` as gone (nothing heard from it): its slot goes to the next agent that
    /// registers.
    pub fn mark_lost(&self, node: u32) {
        let mut agents = self
            .shared
            .agents
            .lock()
            .expect("invariant: no panic under lock");
        if let Some(slot) = agents.get_mut(node as usize) {
            slot.lost = true;
            slot.commands = None;
        }
    }

    /// Starts the run's next attempt: a fresh rendezvous (new run id and deadline, no worker
    /// registered), and every live node agent told to start its workers again with
    /// `worker_args`. A node that is gone gets its ranks when a replacement agent registers.
    ///
    /// With `reshape` the run goes on with the live nodes only, in a smaller layout: they are
    /// numbered again in their order and each agent is told its new share.
    pub fn restart(
        &self,
        run_id: String,
        worker_args: Vec<String>,
        reshape: Option<Reshape>,
    ) -> u32 {
        let number = {
            let mut attempt = self
                .shared
                .attempt
                .lock()
                .expect("invariant: no panic under lock");
            attempt.number += 1;
            attempt.run_id = run_id;
            attempt.worker_args = worker_args.clone();
            attempt.deadline = Instant::now() + self.shared.spec.rendezvous_timeout;
            if let Some(reshape) = &reshape {
                attempt.mesh = reshape.mesh;
                attempt.config_sets = reshape.config_sets.clone();
                attempt.planned = reshape.planned.clone();
            }
            attempt.number
        };
        if reshape.is_some() {
            self.shared
                .agents
                .lock()
                .expect("invariant: no panic under lock")
                .retain(|slot| !slot.lost);
        }
        self.shared
            .hellos
            .lock()
            .expect("invariant: no panic under lock")
            .clear();
        self.shared.registered.send_replace(0);
        self.shared
            .commands
            .lock()
            .expect("invariant: no panic under lock")
            .clear();
        self.shared.nccl_ids.send_replace(BTreeMap::new());
        let mesh = self.shared.attempt(|a| a.mesh);
        let agents = self
            .shared
            .agents
            .lock()
            .expect("invariant: no panic under lock");
        for (node, slot) in agents.iter().enumerate() {
            if let (false, Some(commands)) = (slot.lost, &slot.commands) {
                let ranks = self.shared.node_ranks(node);
                let env = node_env(&mesh, ranks.len(), &slot.hello.comm_host);
                let _ = commands.try_send(Ok(Command {
                    kind: Some(command::Kind::Restart(Restart {
                        worker_args: worker_args.clone(),
                        attempt: number,
                        node: node as u32,
                        ranks,
                        env,
                    })),
                }));
            }
        }
        number
    }

    /// Ranks that have not registered yet.
    pub fn missing(&self) -> Vec<u32> {
        self.shared.missing()
    }

    /// The nodes this attempt's layout has.
    pub fn expected_nodes(&self) -> usize {
        self.shared.attempt(|a| a.mesh.nodes())
    }

    /// Stops serving and waits for the server task.
    pub fn stop(mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Close the command streams so the server's graceful shutdown does not wait on them.
        self.shared
            .commands
            .lock()
            .expect("invariant: no panic under lock")
            .clear();
        if let Some(server) = self.server.take() {
            let _ = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), server).await });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn spec(world: usize, rendezvous: Duration) -> JobSpec {
        JobSpec {
            config_name: "test.yaml".into(),
            config_yaml: "model: {}".into(),
            config_sets: vec!["training.steps=3".into()],
            mesh: Mesh::new(world, 1, 1, 8).unwrap(),
            device: Device::Cpu,
            backend: Backend::Tcp,
            planned: vec![
                RankBytes {
                    device: 1000,
                    host_memory: 1000
                };
                world
            ],
            collective_timeout: Duration::from_secs(5),
            rendezvous_timeout: rendezvous,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            worker_args: Vec::new(),
            run_id: "run".into(),
            token: "secret".into(),
            tls: None,
        }
    }

    fn hello(rank: u32) -> WorkerHello {
        WorkerHello {
            rank,
            comm_address: format!("127.0.0.1:{}", 9000 + rank),
            hostname: "here".into(),
            pid: 100 + rank,
        }
    }

    async fn client(address: SocketAddr, token: &str) -> tessera_proto::Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tessera_proto::client(channel, token).unwrap()
    }

    /// A coordinator for `world` ranks on 127.0.0.1, its runtime and its events.
    pub(crate) fn started(
        world: usize,
        rendezvous: Duration,
    ) -> (
        tokio::runtime::Runtime,
        Coordinator,
        std_mpsc::Receiver<Event>,
    ) {
        started_with(spec(world, rendezvous))
    }

    /// A coordinator of `job` on 127.0.0.1, its runtime and its events.
    fn started_with(
        job: JobSpec,
    ) -> (
        tokio::runtime::Runtime,
        Coordinator,
        std_mpsc::Receiver<Event>,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (events, received) = std_mpsc::channel();
        let localhost = "127.0.0.1:0".parse().unwrap();
        let coordinator = Coordinator::start(&runtime, localhost, job, events).unwrap();
        (runtime, coordinator, received)
    }

    #[test]
    fn every_rank_gets_its_assignment_once_all_have_registered() {
        let (runtime, coordinator, received) = started(3, Duration::from_secs(20));
        let address = coordinator.address;
        let assignments = runtime.block_on(async move {
            let calls = (0..3u32).rev().map(|rank| async move {
                let mut client = client(address, "secret").await;
                client
                    .register_worker(hello(rank))
                    .await
                    .unwrap()
                    .into_inner()
            });
            futures_join(calls).await
        });
        for (i, assignment) in assignments.iter().enumerate() {
            assert_eq!(assignment.rank, 2 - i as u32);
            assert_eq!(assignment.world_size, 3);
            assert_eq!(
                assignment.peer_addresses,
                ["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"]
            );
            assert_eq!(assignment.coord.unwrap().dp, 2 - i as u32);
            assert_eq!(assignment.config_sets, ["training.steps=3"]);
            assert_eq!(assignment.collective_timeout_ms, 5000);
        }
        let events: Vec<Event> = received.try_iter().collect();
        assert!(events.contains(&Event::RendezvousComplete), "{events:?}");
        coordinator.stop(&runtime);
    }

    #[test]
    fn the_barrier_times_out_naming_the_ranks_that_never_came() {
        let (runtime, coordinator, received) = started(4, Duration::from_millis(500));
        let address = coordinator.address;
        let status = runtime.block_on(async move {
            let mut client = client(address, "secret").await;
            client.register_worker(hello(1)).await.unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("ranks 0, 2, 3 never registered"),
            "{}",
            status.message()
        );
        let events: Vec<Event> = received.try_iter().collect();
        assert!(events.contains(&Event::RendezvousFailed {
            missing: vec![0, 2, 3]
        }));
        coordinator.stop(&runtime);
    }

    #[test]
    fn agents_get_their_nodes_ranks_in_arrival_order_and_an_extra_agent_is_refused() {
        let mut job = spec(4, Duration::from_secs(5));
        // data 2 x pipeline 2 on nodes of 2 devices: two nodes.
        job.mesh = Mesh::new(2, 1, 2, 2).unwrap();
        job.worker_args = vec!["--fresh".into()];
        let (runtime, coordinator, received) = started_with(job);
        let address = coordinator.address;
        let agent = |host: &str| AgentHello {
            hostname: host.into(),
            comm_host: format!("10.0.0.{}", host.len()),
            ..AgentHello::default()
        };
        let (first, second, third) = runtime.block_on(async move {
            let mut client = client(address, "secret").await;
            let first = client
                .register_agent(agent("a"))
                .await
                .unwrap()
                .into_inner();
            let second = client
                .register_agent(agent("bb"))
                .await
                .unwrap()
                .into_inner();
            let third = client.register_agent(agent("ccc")).await.unwrap_err();
            (first, second, third)
        });
        assert_eq!((first.node, first.nodes), (0, 2));
        assert_eq!((second.node, second.nodes), (1, 2));
        let mut all: Vec<u32> = first.ranks.iter().chain(&second.ranks).copied().collect();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3], "every rank on exactly one node");
        assert_eq!(first.ranks.len(), 2);
        assert_eq!(first.env["TESSERA_COMM_HOST"], "10.0.0.1");
        assert_eq!(second.env["WORLD_SIZE"], "4");
        assert_eq!(second.env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(first.worker_args, ["--fresh"]);
        assert_eq!(third.code(), tonic::Code::FailedPrecondition);
        assert!(
            third.message().contains("all have registered (a, bb)"),
            "{}",
            third.message()
        );
        let events: Vec<Event> = received.try_iter().collect();
        assert!(
            events.contains(&Event::AgentRegistered {
                node: 1,
                hostname: "bb".into(),
                address: "10.0.0.2".into(),
                ranks: second.ranks.clone(),
            }),
            "{events:?}"
        );
        coordinator.stop(&runtime);
    }

    #[test]
    fn a_cuda_run_refuses_an_agent_without_gpus_and_says_so_to_the_supervisor() {
        let mut job = spec(4, Duration::from_secs(5));
        job.mesh = Mesh::new(2, 1, 2, 2).unwrap();
        job.device = Device::Cuda;
        let (runtime, coordinator, received) = started_with(job);
        let address = coordinator.address;
        let agent = |host: &str, gpus: u32| AgentHello {
            hostname: host.into(),
            gpus,
            ..AgentHello::default()
        };
        let (cpu_only, gpu_node) = runtime.block_on(async move {
            let mut client = client(address, "secret").await;
            let cpu_only = client.register_agent(agent("cpu1", 0)).await.unwrap_err();
            let gpu_node = client.register_agent(agent("gpu1", 2)).await.unwrap();
            (cpu_only, gpu_node.into_inner())
        });
        assert_eq!(cpu_only.code(), tonic::Code::FailedPrecondition);
        assert!(
            cpu_only.message().starts_with("cpu1 has no GPU"),
            "{}",
            cpu_only.message()
        );
        assert_eq!(gpu_node.node, 0, "the refused agent took no slot");
        let events: Vec<Event> = received.try_iter().collect();
        assert!(
            events.contains(&Event::NodeRefused {
                reason: cpu_only.message().to_string()
            }),
            "{events:?}"
        );
        coordinator.stop(&runtime);
    }

    #[test]
    fn a_call_without_the_token_is_refused_and_reported() {
        let (runtime, coordinator, received) = started(2, Duration::from_secs(5));
        let address = coordinator.address;
        let status = runtime.block_on(async move {
            let mut client = client(address, "wrong").await;
            client.register_worker(hello(0)).await.unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            coordinator.missing().contains(&0),
            "the call did not register"
        );
        let events: Vec<Event> = received.try_iter().collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Refused { peer: Some(p) } if p.ip().is_loopback())),
            "{events:?}"
        );
        coordinator.stop(&runtime);
    }

    /// Runs futures concurrently and returns their outputs in order.
    #[test]
    fn an_nccl_id_reaches_every_member_that_waits_for_it() {
        let (runtime, coordinator, _received) = started(2, Duration::from_secs(20));
        let address = coordinator.address;
        let id: Vec<u8> = (0..NCCL_ID_BYTES as u8).collect();
        let fetched = runtime.block_on({
            let id = id.clone();
            async move {
                // Two members ask before the first publishes.
                let waiting = (0..2).map(|_| async move {
                    let request = NcclIdRequest {
                        group: "dp 1".into(),
                    };
                    let mut client = client(address, "secret").await;
                    client.fetch_nccl_id(request).await.unwrap().into_inner()
                });
                let handles: Vec<_> = waiting.map(tokio::spawn).collect();
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut first = client(address, "secret").await;
                let published = NcclId {
                    group: "dp 1".into(),
                    id: id.clone(),
                };
                first.publish_nccl_id(published.clone()).await.unwrap();
                // The same id again is harmless; another one is refused.
                first.publish_nccl_id(published).await.unwrap();
                let other = NcclId {
                    group: "dp 1".into(),
                    id: vec![7; NCCL_ID_BYTES],
                };
                let conflict = first.publish_nccl_id(other).await.unwrap_err();
                assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
                let short = NcclId {
                    group: "tp 0".into(),
                    id: vec![1; 3],
                };
                let short = first.publish_nccl_id(short).await.unwrap_err();
                assert_eq!(short.code(), tonic::Code::InvalidArgument);
                let mut fetched = Vec::new();
                for handle in handles {
                    fetched.push(handle.await.unwrap());
                }
                fetched
            }
        });
        for reply in fetched {
            assert_eq!(reply.group, "dp 1");
            assert_eq!(reply.id, id);
        }
        coordinator.stop(&runtime);
    }

    #[test]
    fn a_fetch_of_an_id_never_published_times_out_naming_the_group() {
        let (runtime, coordinator, _received) = started(2, Duration::from_millis(300));
        let address = coordinator.address;
        let status = runtime.block_on(async move {
            let mut client = client(address, "secret").await;
            let request = NcclIdRequest {
                group: "pp 0 activations 1".into(),
            };
            client.fetch_nccl_id(request).await.unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("group pp 0 activations 1"),
            "{}",
            status.message()
        );
        coordinator.stop(&runtime);
    }

    #[test]
    fn a_worker_that_is_not_first_in_its_group_fetches_the_groups_nccl_id() {
        let (runtime, coordinator, _received) = started(2, Duration::from_secs(20));
        let address = coordinator.address;
        let id = vec![42u8; NCCL_ID_BYTES];
        runtime.block_on({
            let id = id.clone();
            async move {
                let mut first = client(address, "secret").await;
                let group = "tp 0".into();
                first.publish_nccl_id(NcclId { group, id }).await.unwrap();
            }
        });
        let env = tessera_worker::control::LaunchEnv {
            coordinator: address.to_string(),
            token: "secret".into(),
            rank: 1,
            world_size: 2,
            local_rank: 1,
            tls: None,
        };
        let mut control =
            tessera_worker::control::Control::connect(&env, Duration::from_secs(5)).unwrap();
        let group = tessera_worker::comm::Group {
            name: "tp 0".into(),
            ranks: vec![0, 1],
            index: 1,
        };
        let fetched = control.nccl_id(&group).unwrap();
        assert_eq!(fetched.as_bytes().to_vec(), id);
        coordinator.stop(&runtime);
    }

    async fn futures_join<F: std::future::Future + Send + 'static>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output>
    where
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = futures.map(tokio::spawn).collect();
        let mut outputs = Vec::new();
        for handle in handles {
            outputs.push(handle.await.unwrap());
        }
        outputs
    }
}
