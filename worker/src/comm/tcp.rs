//! Collectives over TCP: the CPU backend's data plane, and the fallback for several ranks on
//! one GPU.
//!
//! One [`TcpEndpoint`] per process listens on an OS-chosen port; its address is what the
//! worker registers with the coordinator. Each [`TcpCommunicator`] (one per process group)
//! keeps one full-duplex connection per peer it talks to: the ring neighbours from the start,
//! other members on the first send/recv between them. The member with the lower index
//! connects; a connection opens with a handshake (magic, version, group, sender and a nonce
//! each way) in which each end proves it knows the run's token by an HMAC of both nonces,
//! without sending it; the endpoint checks the proof before routing the connection to its
//! communicator.
//!
//! Reductions are rings: reduce-scatter then all-gather, each step cut into pieces so that a
//! piece is forwarded while the next is still arriving. One thread per communicator moves
//! both directions on non-blocking sockets (as gloo's transport does): on a machine with few
//! cores, a second thread per link only competes with the first for the kernel's copies. The final value of each segment is computed once, by its
//! owner, and then copied around the ring, so every rank ends with the same bits. bf16 and
//! f16 partial sums are added in f32 and rounded back at each hop.
//!
//! Every op starts with a small header on each link it uses (sequence number, op, dtype,
//! length): a peer running a different collective is reported instead of corrupting data.
//!
//! Ranks on one host: a link whose two ends have the same IP address moves its bytes through
//! two shared-memory rings ([`super::shm`]) instead of the loopback, which saves a copy and the
//! TCP stack per byte; the connection then carries only one-byte wake-ups, and its closing
//! still reports the peer's death, once the ring holds none of the bytes the peer wrote before
//! it exited. A link whose rings cannot be set up (no /dev/shm, a full tmpfs) stays on plain
//! TCP; `TESSERA_SHM=0` turns the rings off.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ring::hmac::{self, Tag};
use ring::rand::{SecureRandom as _, SystemRandom};
use tessera_plan::memory::Dtype;

use super::shm::ShmRing;
use super::{
    Collective, CommBuf, CommError, Communicator, Group, Memory, ReduceOp, Work, copy_host,
};
use crate::throttle::Throttle;

const MAGIC: &[u8; 4] = b"TSRA";
/// 2: the token is proven by HMAC over fresh nonces, not sent.
const VERSION: u8 = 2;
/// Bytes of a handshake nonce, and of a proof (HMAC-SHA256).
const NONCE: usize = 32;
const TAG: usize = 32;
/// Bytes received before they are forwarded, where no reduction cuts them smaller: large
/// enough to amortise a system call, small enough that a ring step overlaps its send and
/// receive.
const PIECE: usize = 256 << 10;
/// Bytes received and reduced at a time inside a piece: small enough to stay in L2.
const REDUCE_PART: usize = 64 << 10;
const HEADER: usize = 18;

/// A process's listening socket for collective connections.
pub struct TcpEndpoint {
    address: SocketAddr,
    token: Arc<str>,
    inbox: Arc<Inbox>,
}

/// Accepted, authenticated connections waiting for their communicator.
#[derive(Default)]
struct Inbox {
    streams: Mutex<HashMap<(String, usize), TcpStream>>,
    arrived: Condvar,
}

impl TcpEndpoint {
    /// Listens on `host`, port chosen by the OS; connections must present `token`.
    pub fn bind(host: &str, token: &str) -> Result<TcpEndpoint, CommError> {
        let setup = |what: String| CommError::Setup {
            group: "endpoint".into(),
            what,
            help: "check TESSERA_COMM_HOST (this node's address as its peers reach it)".into(),
        };
        let listener = TcpListener::bind((host, 0))
            .map_err(|e| setup(format!("cannot listen on {host}: {e}")))?;
        let address = listener
            .local_addr()
            .map_err(|e| setup(format!("cannot read the listening address: {e}")))?;
        let token: Arc<str> = token.into();
        let inbox = Arc::new(Inbox::default());
        let (accept_token, accept_inbox) = (token.clone(), inbox.clone());
        std::thread::Builder::new()
            .name("tessera-accept".into())
            .spawn(move || accept(listener, accept_token, accept_inbox))
            .map_err(|e| setup(format!("cannot start the accept thread: {e}")))?;
        Ok(TcpEndpoint {
            address,
            token,
            inbox,
        })
    }

    /// The address peers connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The communicator of `group`, whose member `i` listens at `peers[i]`. Connects to the
    /// ring neighbours, retrying until `timeout` (peers start at different moments).
    pub fn communicator(
        &self,
        group: Group,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<TcpCommunicator, CommError> {
        assert_eq!(
            peers.len(),
            group.size(),
            "invariant: one address per member"
        );
        let mut links = Links {
            group: group.clone(),
            peers: peers.to_vec(),
            links: vec![None; group.size()],
            token: self.token.clone(),
            inbox: self.inbox.clone(),
            timeout,
        };
        let n = group.size();
        if n > 1 {
            let (next, prev) = ((group.index + 1) % n, (group.index + n - 1) % n);
            // Lower indices connect first, so the order cannot deadlock.
            let mut neighbours = vec![next, prev];
            neighbours.sort_unstable();
            neighbours.dedup();
            for peer in neighbours {
                links.ensure(peer).map_err(|e| CommError::Setup {
                    group: group.name.clone(),
                    what: format!(
                        "cannot connect to member {peer} (rank {}) at {}: {e}",
                        group.ranks[peer], peers[peer]
                    ),
                    help: "that rank may have failed to start; see its log".into(),
                })?;
            }
        }
        let (ops, queue) = mpsc::channel::<Queued>();
        let name = format!("tessera-comm {}", group.name);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(links, queue))
            .map_err(|e| CommError::Setup {
                group: group.name.clone(),
                what: format!("cannot start the communicator's thread: {e}"),
                help: "the process may be out of threads or memory".into(),
            })?;
        Ok(TcpCommunicator {
            group,
            ops: Some(ops),
            thread: Some(thread),
        })
    }
}

/// Handshakes read at once: a rank's peers open a few connections each, so anything beyond
/// this is a flood, and its connections are closed unread.
const MAX_HANDSHAKES: usize = 32;
/// How long a connection may take to present its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refused connections are warned about a few at a time.
static REFUSED: Throttle = Throttle::new(5, Duration::from_secs(10));

/// Accepts connections forever, routing authenticated ones to the inbox. Each handshake runs
/// on a thread of its own (a slow or hostile client must not hold up the others), at most
/// [`MAX_HANDSHAKES`] at a time.
fn accept(listener: TcpListener, token: Arc<str>, inbox: Arc<Inbox>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream.peer_addr().ok();
        let from = move || peer.map(|p| format!(" from {p}")).unwrap_or_default();
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            busy.fetch_sub(1, Ordering::SeqCst);
            REFUSED.warn(|| {
                format!(
                    "warning: closed a collective connection{}: {MAX_HANDSHAKES} handshakes are \
                     already being read",
                    from()
                )
            });
            continue;
        }
        let (token, inbox, held) = (token.clone(), inbox.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("tessera-handshake".into())
            .spawn(move || {
                match handshake_in(&stream, &token) {
                    Ok(key) => {
                        let mut streams = inbox.streams.lock().unwrap_or_else(|e| e.into_inner());
                        streams.insert(key, stream);
                        inbox.arrived.notify_all();
                    }
                    Err(reason) => REFUSED.warn(|| {
                        format!(
                            "warning: refused a collective connection{}: {reason}",
                            from()
                        )
                    }),
                }
                held.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The proof that one end of a handshake knows the run's token without sending it: an
/// HMAC-SHA256 keyed by the token over the end's role, both nonces (its peer's first, so each
/// proof answers a fresh challenge), the group and the sender. Someone reading the network
/// learns neither the token nor a proof they could replay.
fn proof(token: &str, role: &[u8], theirs: &[u8], ours: &[u8], group: &str, sender: u32) -> Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    hmac::sign(&key, &proven_message(role, theirs, ours, group, sender))
}

/// Whether `tag` is the proof [`proof`] would make of the same parts (compared in constant
/// time).
fn proven(token: &str, tag: &[u8], parts: (&[u8], &[u8], &[u8], &str, u32)) -> bool {
    let (role, theirs, ours, group, sender) = parts;
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    hmac::verify(
        &key,
        &proven_message(role, theirs, ours, group, sender),
        tag,
    )
    .is_ok()
}

/// The parts of a proof, each with its length first, so no two lists of parts read alike.
fn proven_message(role: &[u8], theirs: &[u8], ours: &[u8], group: &str, sender: u32) -> Vec<u8> {
    let mut message = Vec::with_capacity(128);
    for part in [role, theirs, ours, group.as_bytes(), &sender.to_le_bytes()] {
        message.extend_from_slice(&(part.len() as u32).to_le_bytes());
        message.extend_from_slice(part);
    }
    message
}

fn nonce() -> Result<[u8; NONCE], String> {
    let mut bytes = [0u8; NONCE];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(bytes)
}

/// The accepting end of a handshake: reads the dialer's hello (magic, version, group, sender,
/// its nonce), answers with its own nonce and proof, checks the dialer's proof and answers 1
/// (accepted) or 0. The token itself never crosses the network.
fn handshake_in(mut stream: &TcpStream, token: &str) -> Result<(String, usize), String> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut fixed = [0u8; 4 + 1 + 2 + 4];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| format!("no handshake: {e}"))?;
    if &fixed[..4] != MAGIC || fixed[4] != VERSION {
        let _ = stream.write_all(&[0]);
        return Err("not a tessera collective connection (or another version)".into());
    }
    let group_len = u16::from_le_bytes([fixed[5], fixed[6]]) as usize;
    let sender = u32::from_le_bytes(fixed[7..11].try_into().expect("4 bytes"));
    let mut rest = vec![0u8; group_len + NONCE];
    stream
        .read_exact(&mut rest)
        .map_err(|e| format!("truncated handshake: {e}"))?;
    let group = String::from_utf8_lossy(&rest[..group_len]).into_owned();
    let theirs = &rest[group_len..];
    let ours = nonce()?;
    let mine = proof(token, b"accept", theirs, &ours, &group, sender);
    let mut answer = vec![1u8];
    answer.extend_from_slice(&ours);
    answer.extend_from_slice(mine.as_ref());
    stream.write_all(&answer).map_err(|e| e.to_string())?;
    let mut tag = [0u8; TAG];
    stream
        .read_exact(&mut tag)
        .map_err(|e| format!("rank {sender} sent no proof of the run's token: {e}"))?;
    if !proven(token, &tag, (b"dial", &ours, theirs, &group, sender)) {
        let _ = stream.write_all(&[0]);
        return Err(format!("rank {sender} does not know this run's token"));
    }
    stream.write_all(&[1]).map_err(|e| e.to_string())?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((group, sender as usize))
}

/// The dialling end of a handshake on a fresh `stream` (see [`handshake_in`]); a refusal
/// either way is `PermissionDenied`.
fn handshake_out(
    mut stream: &TcpStream,
    token: &str,
    group: &str,
    sender: u32,
) -> std::io::Result<()> {
    let refused = |what: &str| std::io::Error::new(ErrorKind::PermissionDenied, what.to_string());
    let ours = nonce().map_err(std::io::Error::other)?;
    let mut hello = Vec::with_capacity(64);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&(group.len() as u16).to_le_bytes());
    hello.extend_from_slice(&sender.to_le_bytes());
    hello.extend_from_slice(group.as_bytes());
    hello.extend_from_slice(&ours);
    stream.write_all(&hello)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    if status[0] != 1 {
        return Err(refused(
            "the peer refused the handshake (another tessera version?)",
        ));
    }
    let mut answer = [0u8; NONCE + TAG];
    stream.read_exact(&mut answer)?;
    let (theirs, tag) = answer.split_at(NONCE);
    if !proven(token, tag, (b"accept", &ours, theirs, group, sender)) {
        return Err(refused("the peer does not know this run's token"));
    }
    stream.write_all(proof(token, b"dial", theirs, &ours, group, sender).as_ref())?;
    stream.read_exact(&mut status)?;
    if status[0] != 1 {
        return Err(refused("the peer refused this run's token"));
    }
    stream.set_read_timeout(None)
}

/// A connection to one member: the TCP stream, and where the member runs on this host, the
/// shared-memory rings that carry the bytes instead (the stream then carries wake-ups).
#[derive(Clone)]
struct Link {
    stream: Arc<TcpStream>,
    rings: Option<Arc<Rings>>,
}

/// The two one-way rings of a link: what this process writes, what it reads.
struct Rings {
    out: ShmRing,
    incoming: ShmRing,
    /// The peer closed the connection. Its last bytes may still be in `incoming`: a peer
    /// that wrote them and exited is not a failure until they are read.
    peer_gone: AtomicBool,
}

/// Whether links to members on this host use shared memory (`TESSERA_SHM=0` turns it off).
fn shared_memory_enabled() -> bool {
    std::env::var("TESSERA_SHM").map_or(true, |v| v != "0")
}

/// Sets up the rings of a fresh, still blocking connection, the same steps on both ends: each
/// creates the ring it will write and sends its path, maps the peer's, and says whether that
/// worked; only if both did are the rings used. Each end then removes its own file (both
/// mappings stay). Any failure (no /dev/shm, a full tmpfs) leaves the link on plain TCP.
fn share_rings(mut stream: &TcpStream, tag: &str) -> std::io::Result<Option<Rings>> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let created = ShmRing::create(tag).ok();
    let mut message = vec![created.is_some() as u8];
    let path = created.as_ref().map_or(Vec::new(), |(_, p)| {
        p.as_os_str().as_encoded_bytes().to_vec()
    });
    message.extend_from_slice(&(path.len() as u16).to_le_bytes());
    message.extend_from_slice(&path);
    let exchanged = (|| -> std::io::Result<Option<ShmRing>> {
        stream.write_all(&message)?;
        let mut fixed = [0u8; 3];
        stream.read_exact(&mut fixed)?;
        let mut theirs = vec![0u8; u16::from_le_bytes([fixed[1], fixed[2]]) as usize];
        stream.read_exact(&mut theirs)?;
        let incoming = if fixed[0] == 1 && created.is_some() {
            let theirs = std::path::PathBuf::from(String::from_utf8_lossy(&theirs).into_owned());
            ShmRing::open(&theirs).ok()
        } else {
            None
        };
        stream.write_all(&[incoming.is_some() as u8])?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack)?;
        Ok(incoming.filter(|_| ack[0] == 1))
    })();
    if let Some((_, path)) = &created {
        let _ = std::fs::remove_file(path);
    }
    stream.set_read_timeout(None)?;
    Ok(match (exchanged?, created) {
        (Some(incoming), Some((out, _))) => Some(Rings {
            out,
            incoming,
            peer_gone: AtomicBool::new(false),
        }),
        _ => None,
    })
}

/// A communicator's connections, by member.
struct Links {
    group: Group,
    peers: Vec<SocketAddr>,
    links: Vec<Option<Link>>,
    token: Arc<str>,
    inbox: Arc<Inbox>,
    timeout: Duration,
}

impl Links {
    /// The connection to member `peer`, made now if there is none.
    fn ensure(&mut self, peer: usize) -> Result<Link, String> {
        if let Some(link) = &self.links[peer] {
            return Ok(link.clone());
        }
        let deadline = Instant::now() + self.timeout;
        let stream = if self.group.index < peer {
            self.connect(peer, deadline)?
        } else {
            self.wait_for(peer, deadline)?
        };
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let same_host = self.peers[peer].ip() == self.peers[self.group.index].ip();
        let rings = if same_host && shared_memory_enabled() {
            share_rings(&stream, &self.group.ranks[self.group.index].to_string())
                .map_err(|e| format!("setting up shared memory: {}", describe_io(&e)))?
                .map(Arc::new)
        } else {
            None
        };
        // Only the communicator's thread uses it, driving it with `poll` (see `Wire`).
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let link = Link {
            stream: Arc::new(stream),
            rings,
        };
        self.links[peer] = Some(link.clone());
        Ok(link)
    }

    fn connect(&self, peer: usize, deadline: Instant) -> Result<TcpStream, String> {
        let sender = self.group.ranks[self.group.index] as u32;
        loop {
            let attempt = (|| -> std::io::Result<TcpStream> {
                let stream = TcpStream::connect_timeout(&self.peers[peer], Duration::from_secs(2))?;
                handshake_out(&stream, &self.token, &self.group.name, sender)?;
                Ok(stream)
            })();
            match attempt {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == ErrorKind::PermissionDenied => return Err(e.to_string()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("gave up after {:.0?}: {e}", self.timeout));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn wait_for(&self, peer: usize, deadline: Instant) -> Result<TcpStream, String> {
        let key = (self.group.name.clone(), self.group.ranks[peer]);
        let mut streams = self.inbox.streams.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(stream) = streams.remove(&key) {
                return Ok(stream);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("it did not connect within {:.0?}", self.timeout));
            }
            streams = self
                .inbox
                .arrived
                .wait_timeout(streams, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Closes every connection, so that peers blocked on us fail at once.
    fn shut_all(&self) {
        for link in self.links.iter().flatten() {
            let _ = link.stream.shutdown(Shutdown::Both);
        }
    }
}

/// An op and where its result goes.
type Queued = (Collective, mpsc::Sender<Result<(), CommError>>);

/// A process group's collectives over TCP; ops run in start order on the group's thread.
pub struct TcpCommunicator {
    group: Group,
    ops: Option<mpsc::Sender<Queued>>,
    thread: Option<JoinHandle<()>>,
}

impl Communicator for TcpCommunicator {
    fn group(&self) -> &Group {
        &self.group
    }

    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
        op.validate(&self.group, "TCP", Memory::Host)?;
        let (reply, result) = mpsc::channel();
        let ops = self.ops.as_ref().expect("invariant: open until dropped");
        if ops.send((op, reply)).is_err() {
            return Err(CommError::Setup {
                group: self.group.name.clone(),
                what: "the communicator's thread has stopped".into(),
                help: "an earlier error of this rank says why".into(),
            });
        }
        Ok(Work::pending(result))
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        self.ops = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why an op failed, before it becomes a [`CommError`].
#[derive(Debug)]
struct Failure {
    /// Group members the op was waiting on.
    silent: Vec<usize>,
    cause: String,
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => "the connection was reset".into(),
        _ => e.to_string(),
    }
}

/// Bytes waiting to be written to an op's outgoing link.
enum Outgoing {
    /// A range of the op's buffers (valid until the op completes: start's contract).
    Region { addr: usize, len: usize },
    /// An op header, written from `at` on.
    Header { bytes: [u8; HEADER], at: usize },
}

/// One op's links: at most one member it sends to and one it receives from. The
/// communicator's thread drives both directions itself on non-blocking sockets: whenever it
/// waits for bytes to arrive it also writes whatever is queued, so a ring step forwards while
/// it receives without a second thread competing for the cores.
struct Wire {
    to: Option<(Link, usize)>,
    from: Option<(Link, usize)>,
    outbox: VecDeque<Outgoing>,
    /// How long a direction with work pending may make no progress.
    timeout: Duration,
    last_write: Instant,
    last_read: Instant,
}

impl Wire {
    fn new(to: Option<(Link, usize)>, from: Option<(Link, usize)>, timeout: Duration) -> Wire {
        let now = Instant::now();
        Wire {
            to,
            from,
            outbox: VecDeque::new(),
            timeout,
            last_write: now,
            last_read: now,
        }
    }

    /// Queues `part` for the outgoing member.
    fn send(&mut self, part: &CommBuf) {
        let (addr, len) = (part.addr, part.bytes());
        if len == 0 {
            return;
        }
        // Consecutive ranges (the parts of one segment) become one write.
        if let Some(Outgoing::Region { addr: a, len: l }) = self.outbox.back_mut()
            && *a + *l == addr
        {
            *l += len;
            return;
        }
        if self.outbox.is_empty() {
            self.last_write = Instant::now();
        }
        self.outbox.push_back(Outgoing::Region { addr, len });
    }

    fn send_header(&mut self, bytes: [u8; HEADER]) {
        if self.outbox.is_empty() {
            self.last_write = Instant::now();
        }
        self.outbox.push_back(Outgoing::Header { bytes, at: 0 });
    }

    /// Fills `into` from the incoming member, writing queued bytes meanwhile.
    fn recv(&mut self, into: &mut [u8]) -> Result<(), Failure> {
        self.last_read = Instant::now();
        self.pump(into, false)
    }

    /// Writes everything queued.
    fn finish(&mut self) -> Result<(), Failure> {
        self.pump(&mut [], true)
    }

    /// Moves bytes both ways until `into` is full (and, with `drain`, the outbox empty),
    /// sleeping in `poll` when neither direction can move.
    fn pump(&mut self, into: &mut [u8], drain: bool) -> Result<(), Failure> {
        let mut got = 0;
        loop {
            let mut moved = self.write_some()?;
            if got < into.len() {
                let (link, peer) = self.from.as_ref().expect("invariant: a receiving op");
                if let Some(rings) = &link.rings {
                    let (k, writer_asleep) = rings.incoming.read(&mut into[got..]);
                    if k > 0 {
                        got += k;
                        moved = true;
                        self.last_read = Instant::now();
                    }
                    if writer_asleep {
                        wake(&link.stream);
                    }
                    // `peer_gone` was seen before this read, so the ring held all it will.
                    if k == 0 && rings.peer_gone.load(Ordering::SeqCst) {
                        return Err(receive_failure(*peer, "the peer closed the connection"));
                    }
                } else {
                    match (&*link.stream).read(&mut into[got..]) {
                        Ok(0) => {
                            return Err(receive_failure(*peer, "the peer closed the connection"));
                        }
                        Ok(k) => {
                            got += k;
                            moved = true;
                            self.last_read = Instant::now();
                        }
                        Err(e) if would_block(&e) => {}
                        Err(e) => return Err(receive_failure(*peer, &describe_io(&e))),
                    }
                }
            }
            let reading = got < into.len();
            let writing = !self.outbox.is_empty();
            if !(reading || drain && writing) {
                return Ok(());
            }
            if !moved {
                self.wait(reading, writing)?;
            }
        }
    }

    /// Writes queued bytes until the socket would block; says whether any moved.
    fn write_some(&mut self) -> Result<bool, Failure> {
        let (mut moved, mut wake_reader) = (false, false);
        while let Some(front) = self.outbox.front_mut() {
            let (link, peer) = self.to.as_ref().expect("invariant: a sending op");
            let stream = &link.stream;
            let bytes: &[u8] = match front {
                // SAFETY: the op's buffers are valid until it completes (start's contract),
                // and a region is queued only once its bytes are final.
                Outgoing::Region { addr, len } => unsafe {
                    std::slice::from_raw_parts(*addr as *const u8, *len)
                },
                Outgoing::Header { bytes, at } => &bytes[*at..],
            };
            let wanted = bytes.len();
            let result = match &link.rings {
                Some(rings) => match rings.out.write(bytes) {
                    (0, _) if rings.peer_gone.load(Ordering::SeqCst) => {
                        Err(std::io::Error::from(ErrorKind::UnexpectedEof))
                    }
                    (0, _) => break,
                    (k, reader_asleep) => {
                        wake_reader |= reader_asleep;
                        Ok(k)
                    }
                },
                None => (&**stream).write(bytes),
            };
            match result {
                Ok(k) => {
                    moved = true;
                    self.last_write = Instant::now();
                    if k == wanted {
                        self.outbox.pop_front();
                    } else {
                        match front {
                            Outgoing::Region { addr, len } => {
                                *addr += k;
                                *len -= k;
                            }
                            Outgoing::Header { at, .. } => *at += k,
                        }
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    return Err(Failure {
                        silent: vec![*peer],
                        cause: format!("sending to member {peer}: {}", describe_io(&e)),
                    });
                }
            }
        }
        if wake_reader && let Some((link, _)) = &self.to {
            // Its reader is asleep in `poll` on this connection.
            wake(&link.stream);
        }
        Ok(moved)
    }

    /// Sleeps until a pending direction can move, or fails once one has been stuck for the
    /// timeout (naming the member it waits on).
    fn wait(&mut self, reading: bool, writing: bool) -> Result<(), Failure> {
        let now = Instant::now();
        let mut left = Duration::MAX;
        if reading {
            let (_, peer) = self.from.as_ref().expect("invariant: a receiving op");
            let idle = now - self.last_read;
            if idle >= self.timeout {
                return Err(receive_failure(
                    *peer,
                    &format!("timed out after {idle:.0?}"),
                ));
            }
            left = left.min(self.timeout - idle);
        }
        if writing {
            let (_, peer) = self.to.as_ref().expect("invariant: a sending op");
            let idle = now - self.last_write;
            if idle >= self.timeout {
                return Err(Failure {
                    silent: vec![*peer],
                    cause: format!(
                        "sending to member {peer}: timed out after {idle:.0?} (it stopped reading)"
                    ),
                });
            }
            left = left.min(self.timeout - idle);
        }
        // Ring links: old wake-ups are drained, then each side raises its "asleep" flag and
        // looks at the ring once more; a peer that moves bytes after that sees the flag and
        // sends a wake-up, which makes `poll` return (see `shm`).
        let ring_from = self
            .from
            .as_ref()
            .and_then(|(l, p)| Some((l.rings.as_ref()?, l, *p)));
        let ring_to = self
            .to
            .as_ref()
            .and_then(|(l, p)| Some((l.rings.as_ref()?, l, *p)));
        // Every wake-up is drained before any flag goes up: with two members both directions
        // share one connection, and a wake-up drained after a flag went up would be lost.
        for (pending, ring) in [(reading, &ring_from), (writing, &ring_to)] {
            if let (true, Some((rings, link, peer))) = (pending, ring)
                && drain_wakeups(&link.stream, *peer)? == Wakeups::Closed
            {
                // Look at the rings once more; `pump` fails if they have nothing left.
                rings.peer_gone.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
        if let (true, Some((rings, ..))) = (reading, &ring_from)
            && rings.incoming.reader_sleeps()
        {
            return Ok(());
        }
        if let (true, Some((rings, ..))) = (writing, &ring_to)
            && rings.out.writer_sleeps()
        {
            if let (true, Some((rings, ..))) = (reading, &ring_from) {
                rings.incoming.reader_woke();
            }
            return Ok(());
        }
        let result = self.poll(reading, writing, left);
        if let (true, Some((rings, ..))) = (reading, &ring_from) {
            rings.incoming.reader_woke();
        }
        if let (true, Some((rings, ..))) = (writing, &ring_to) {
            rings.out.writer_woke();
        }
        result
    }

    /// Sleeps in `poll` until a pending direction's connection is ready or `left` passes.
    fn poll(&self, reading: bool, writing: bool, left: Duration) -> Result<(), Failure> {
        let read = match (reading, &self.from) {
            (true, Some((link, _))) => Some(PollFd::new(link.stream.as_fd(), PollFlags::POLLIN)),
            _ => None,
        };
        let write = match (writing, &self.to) {
            // A ring's room comes back as a wake-up from its reader.
            (true, Some((link, _))) if link.rings.is_some() => {
                Some(PollFd::new(link.stream.as_fd(), PollFlags::POLLIN))
            }
            (true, Some((link, _))) => Some(PollFd::new(link.stream.as_fd(), PollFlags::POLLOUT)),
            _ => None,
        };
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        // The descriptors on the stack: this runs many times per op.
        let polled = match (read, write) {
            (Some(read), Some(write)) => poll(&mut [read, write], timeout),
            (Some(one), None) | (None, Some(one)) => poll(&mut [one], timeout),
            (None, None) => return Ok(()),
        };
        match polled {
            // Readiness, an error or a hang-up: the next read or write says which.
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(Failure {
                silent: Vec::new(),
                cause: format!("poll failed: {e}"),
            }),
        }
    }
}

/// Tells the process at the other end of a ring link to look at its rings again: one byte on
/// the connection. A full socket already holds wake-ups, and a closed one is noticed by the
/// next read, so failures are ignored here.
fn wake(stream: &TcpStream) {
    let _ = (&*stream).write(&[1]);
}

/// What was waiting on a ring link's connection.
#[derive(Debug, PartialEq, Eq)]
enum Wakeups {
    /// Wake-ups (or nothing); all read.
    Drained,
    /// The peer closed the connection: it exited, perhaps after writing its last bytes.
    Closed,
}

/// Reads the wake-ups waiting on a ring link's connection.
fn drain_wakeups(stream: &TcpStream, peer: usize) -> Result<Wakeups, Failure> {
    let mut sink = [0u8; 256];
    loop {
        match (&*stream).read(&mut sink) {
            Ok(0) => return Ok(Wakeups::Closed),
            Ok(_) => {}
            Err(e) if would_block(&e) => return Ok(Wakeups::Drained),
            Err(e) => return Err(receive_failure(peer, &describe_io(&e))),
        }
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

fn receive_failure(peer: usize, cause: &str) -> Failure {
    Failure {
        silent: vec![peer],
        cause: format!("receiving from member {peer}: {cause}"),
    }
}

/// The communicator's thread: runs ops in order until the communicator is dropped. Each op
/// (with its buffers' owners) is kept until its reply is sent: it touches no memory after.
fn serve(links: Links, queue: mpsc::Receiver<(Collective, mpsc::Sender<Result<(), CommError>>)>) {
    let mut state = Ring {
        links,
        scratch: vec![0u64; REDUCE_PART / 8],
        barrier: Vec::new(),
        seq: 0,
        poisoned: None,
    };
    for (op, reply) in queue {
        let result = match &state.poisoned {
            Some(error) => Err(error.clone()),
            None => {
                let start = Instant::now();
                let seq = state.seq;
                state.seq += 1;
                state.run(&op, seq).map_err(|failure| {
                    state.links.shut_all();
                    let group = &state.links.group;
                    let error = CommError::Collective {
                        group: group.name.clone(),
                        op: op.name(),
                        seq,
                        silent: failure.silent.iter().map(|&m| group.ranks[m]).collect(),
                        waited: start.elapsed(),
                        cause: failure.cause,
                    };
                    state.poisoned = Some(error.clone());
                    error
                })
            }
        };
        let _ = reply.send(result);
    }
    state.links.shut_all();
}

/// The state of one communicator's thread.
struct Ring {
    links: Links,
    /// One part of a piece being reduced (u64 words: aligned for every dtype).
    scratch: Vec<u64>,
    /// The barrier's one-element-per-member all-reduce buffer.
    barrier: Vec<f32>,
    seq: u64,
    poisoned: Option<CommError>,
}

/// `len` elements cut into `n` near-equal segments: segment `i` is `[i len / n, (i+1) len / n)`.
fn segment(len: usize, n: usize, i: usize) -> (usize, usize) {
    let start = i * len / n;
    (start, (i + 1) * len / n - start)
}

impl Ring {
    fn n(&self) -> usize {
        self.links.group.size()
    }

    fn index(&self) -> usize {
        self.links.group.index
    }

    fn link(&mut self, peer: Option<usize>) -> Result<Option<(Link, usize)>, Failure> {
        let Some(peer) = peer else { return Ok(None) };
        let link = self.links.ensure(peer).map_err(|cause| Failure {
            silent: vec![peer],
            cause,
        })?;
        Ok(Some((link, peer)))
    }

    /// The links of an op that sends to `to` and receives from `from`, with this op's header
    /// sent to `to` and the one `from` sent checked against it.
    fn open(
        &mut self,
        op: &Collective,
        seq: u64,
        len: usize,
        dtype: Dtype,
        to: Option<usize>,
        from: Option<usize>,
    ) -> Result<Wire, Failure> {
        let (to, from) = (self.link(to)?, self.link(from)?);
        let mut wire = Wire::new(to, from, self.links.timeout);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&seq.to_le_bytes());
        header[8] = kind_code(op);
        header[9] = dtype as u8;
        header[10..].copy_from_slice(&(len as u64).to_le_bytes());
        if wire.to.is_some() {
            wire.send_header(header);
        }
        if let Some(peer) = wire.from.as_ref().map(|f| f.1) {
            let mut theirs = [0u8; HEADER];
            wire.recv(&mut theirs)?;
            let mut expected = header;
            if let Collective::Recv { .. } = op {
                // The sender's header says "send". Point-to-point ops are numbered per
                // member, so their sequence numbers differ between the two ends.
                expected[8] = SEND;
                expected[..8].copy_from_slice(&theirs[..8]);
            }
            if theirs != expected {
                let their_seq = u64::from_le_bytes(theirs[..8].try_into().expect("8 bytes"));
                let their_len = u64::from_le_bytes(theirs[10..].try_into().expect("8 bytes"));
                return Err(Failure {
                    silent: Vec::new(),
                    cause: format!(
                        "member {peer} is out of step: it started op {} #{their_seq} on {their_len} \
                         elements, this rank {} #{seq} on {len}",
                        kind_name(theirs[8]),
                        op.name()
                    ),
                });
            }
        }
        Ok(wire)
    }

    /// Runs `op`, which [`Collective::validate`] accepted.
    fn run(&mut self, op: &Collective, seq: u64) -> Result<(), Failure> {
        let (n, me) = (self.n(), self.index());
        let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
        match op {
            Collective::AllReduce { buf, op: reduce } => {
                if n == 1 {
                    return Ok(());
                }
                let mut wire = self.open(op, seq, buf.len, buf.dtype, Some(next), Some(prev))?;
                let seg = |i| segment(buf.len, n, i);
                // The all-gather's first step sends each part of this member's segment as soon
                // as the reduce-scatter has finished it, overlapping the two phases.
                self.reduce_scatter(&mut wire, buf, *reduce, &seg, true)?;
                self.all_gather(&mut wire, buf, &seg, false)?;
                wire.finish()
            }
            Collective::ReduceScatter {
                input,
                output,
                op: reduce,
            } => {
                let chunk = output.len;
                let seg = |i: usize| (i * chunk, chunk);
                if n > 1 {
                    let mut wire =
                        self.open(op, seq, input.len, input.dtype, Some(next), Some(prev))?;
                    self.reduce_scatter(&mut wire, input, *reduce, &seg, false)?;
                    wire.finish()?;
                }
                let own = input.slice(me * chunk, chunk);
                if *reduce == ReduceOp::Avg {
                    scale(&own, 1.0 / n as f32);
                }
                // SAFETY: both are ranges of the op (start's contract).
                unsafe { copy_host(&own, output) };
                Ok(())
            }
            Collective::AllGather { input, output } => {
                let chunk = input.len;
                // SAFETY: both are ranges of the op (start's contract).
                unsafe { copy_host(input, &output.slice(me * chunk, chunk)) };
                if n == 1 {
                    return Ok(());
                }
                let mut wire =
                    self.open(op, seq, output.len, output.dtype, Some(next), Some(prev))?;
                self.all_gather(&mut wire, output, &|i| (i * chunk, chunk), true)?;
                wire.finish()
            }
            Collective::Broadcast { buf, root } => {
                if n == 1 {
                    return Ok(());
                }
                // A pipelined chain from the root around the ring.
                let to = (next != *root).then_some(next);
                let from = (me != *root).then_some(prev);
                let mut wire = self.open(op, seq, buf.len, buf.dtype, to, from)?;
                forward(&mut wire, buf)?;
                wire.finish()
            }
            Collective::Send { buf, peer } => {
                let mut wire = self.open(op, seq, buf.len, buf.dtype, Some(*peer), None)?;
                wire.send(buf);
                wire.finish()
            }
            Collective::Recv { buf, peer } => {
                let mut wire = self.open(op, seq, buf.len, buf.dtype, None, Some(*peer))?;
                forward(&mut wire, buf)
            }
            Collective::Barrier => {
                if n == 1 {
                    return Ok(());
                }
                // An all-reduce completes only once every member has contributed.
                self.barrier.resize(n, 0.0);
                let buf = CommBuf::host(&self.barrier);
                self.run(
                    &Collective::AllReduce {
                        buf,
                        op: ReduceOp::Sum,
                    },
                    seq,
                )
            }
        }
    }

    /// Ring reduce-scatter over the segments of `buf`: after it, this member's segment holds
    /// the reduction over the group. Each part received in step `s` is reduced and queued as
    /// step `s + 1` while the rest of step `s` still arrives.
    ///
    /// With `gather_after` (an all-reduce), each finished part of this member's segment is
    /// also sent on at once as the all-gather's first step (scaled first for `Avg`).
    fn reduce_scatter(
        &mut self,
        wire: &mut Wire,
        buf: &CommBuf,
        reduce: ReduceOp,
        seg: &dyn Fn(usize) -> (usize, usize),
        gather_after: bool,
    ) -> Result<(), Failure> {
        let (n, me) = (self.n(), self.index());
        let size = buf.dtype.size() as usize;
        let send_seg = |s: usize| (me + 2 * n - s - 1) % n;
        let recv_seg = |s: usize| (me + 2 * n - s - 2) % n;
        let (start, len) = seg(send_seg(0));
        wire.send(&buf.slice(start, len));
        // Received and reduced in cache-sized parts, so that the scratch is still in cache
        // when the reduction reads it.
        let part = (REDUCE_PART / size).max(1);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.scratch);
        for s in 0..n - 1 {
            let (start, len) = seg(recv_seg(s));
            for at in (0..len).step_by(part) {
                let count = part.min(len - at);
                let target = buf.slice(start + at, count);
                wire.recv(&mut bytes[..count * size])?;
                combine(&target, &bytes[..count * size], reduce);
                if s + 1 < n - 1 {
                    wire.send(&target);
                } else if gather_after {
                    if reduce == ReduceOp::Avg {
                        scale(&target, 1.0 / n as f32);
                    }
                    wire.send(&target);
                }
            }
        }
        Ok(())
    }

    /// Ring all-gather: each member's segment travels around the ring, received straight into
    /// place and forwarded piece by piece.
    /// Without `send_own` this member's segment was already sent (see `reduce_scatter`).
    fn all_gather(
        &mut self,
        wire: &mut Wire,
        buf: &CommBuf,
        seg: &dyn Fn(usize) -> (usize, usize),
        send_own: bool,
    ) -> Result<(), Failure> {
        let (n, me) = (self.n(), self.index());
        if send_own {
            let (start, len) = seg(me);
            wire.send(&buf.slice(start, len));
        }
        let piece = (PIECE / buf.dtype.size() as usize).max(1);
        for s in 0..n - 1 {
            let (start, len) = seg((me + 2 * n - s - 1) % n);
            for first in (0..len).step_by(piece) {
                let target = buf.slice(start + first, piece.min(len - first));
                // SAFETY: the op's buffer is valid and ours until it completes (start's
                // contract); only parts already received are queued to be sent.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(target.addr as *mut u8, target.bytes())
                };
                wire.recv(bytes)?;
                if s + 1 < n - 1 {
                    wire.send(&target);
                }
            }
        }
        Ok(())
    }
}

/// Receives `buf` (if the wire receives) and forwards it (if it sends), piece by piece; a
/// wire that only sends queues the whole buffer.
fn forward(wire: &mut Wire, buf: &CommBuf) -> Result<(), Failure> {
    if wire.from.is_none() {
        wire.send(buf);
        return Ok(());
    }
    let piece = (PIECE / buf.dtype.size() as usize).max(1);
    for first in (0..buf.len).step_by(piece) {
        let target = buf.slice(first, piece.min(buf.len - first));
        // SAFETY: as in `all_gather`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(target.addr as *mut u8, target.bytes()) };
        wire.recv(bytes)?;
        if wire.to.is_some() {
            wire.send(&target);
        }
    }
    Ok(())
}

const SEND: u8 = 5;

fn kind_code(op: &Collective) -> u8 {
    match op {
        Collective::AllReduce { .. } => 1,
        Collective::ReduceScatter { .. } => 2,
        Collective::AllGather { .. } => 3,
        Collective::Broadcast { .. } => 4,
        Collective::Send { .. } => SEND,
        Collective::Recv { .. } => 6,
        Collective::Barrier => 7,
    }
}

fn kind_name(code: u8) -> &'static str {
    match code {
        1 => "all_reduce",
        2 => "reduce_scatter",
        3 => "all_gather",
        4 => "broadcast",
        5 => "send",
        6 => "recv",
        7 => "barrier",
        _ => "unknown",
    }
}

/// `target = target (op) bytes` element-wise (bytes hold `target.len` elements of its dtype):
/// a sum for `Sum` and `Avg` (scaled afterwards), the larger value for `Max`.
fn combine(target: &CommBuf, bytes: &[u8], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => combine_with(target, bytes, |a, b| a + b),
        ReduceOp::Max => combine_with(target, bytes, f32::max),
    }
}

/// `target = f(target, bytes)` in f32 whatever the dtype; generic over `f` so that each
/// reduction compiles to its own vectorised loop.
fn combine_with(target: &CommBuf, bytes: &[u8], f: impl Fn(f32, f32) -> f32 + Copy) {
    // SAFETY: the op's buffer is valid and ours (start's contract) and aligned for its dtype
    // (arena regions and their slices are); `bytes` is the u64-aligned scratch.
    unsafe {
        match target.dtype {
            Dtype::F32 => combine_elems::<f32>(target, bytes, f),
            Dtype::Bf16 => combine_elems::<bf16>(target, bytes, |a, b| {
                bf16::from_f32(f(a.to_f32(), b.to_f32()))
            }),
            Dtype::F16 => combine_elems::<f16>(target, bytes, |a, b| {
                f16::from_f32(f(a.to_f32(), b.to_f32()))
            }),
            _ => unreachable!("invariant: `Collective::validate` lets only floats reduce"),
        }
    }
}

/// # Safety
/// `target` is a valid, exclusively owned range of `T`s.
unsafe fn combine_elems<T: bytemuck::Pod>(target: &CommBuf, bytes: &[u8], f: impl Fn(T, T) -> T) {
    // SAFETY: the caller's contract.
    let dst = unsafe { std::slice::from_raw_parts_mut(target.addr as *mut T, target.len) };
    let src: &[T] = bytemuck::cast_slice(bytes);
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(*d, s);
    }
}

/// `buf *= factor`, computed in f32.
fn scale(buf: &CommBuf, factor: f32) {
    // SAFETY: as in `add`.
    unsafe {
        match buf.dtype {
            Dtype::F32 => map::<f32>(buf, |v| v * factor),
            Dtype::Bf16 => map::<bf16>(buf, |v| bf16::from_f32(v.to_f32() * factor)),
            Dtype::F16 => map::<f16>(buf, |v| f16::from_f32(v.to_f32() * factor)),
            _ => unreachable!("invariant: `Collective::validate` lets only floats reduce"),
        }
    }
}

/// # Safety
/// `buf` is a valid, exclusively owned range of `T`s.
unsafe fn map<T: Copy>(buf: &CommBuf, f: impl Fn(T) -> T) {
    // SAFETY: the caller's contract.
    let values = unsafe { std::slice::from_raw_parts_mut(buf.addr as *mut T, buf.len) };
    for v in values {
        *v = f(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer_in_order_for_any_length_and_size() {
        for n in 1..=9 {
            for len in [0, 1, 2, 7, 8, 9, 1001] {
                let mut next = 0;
                for i in 0..n {
                    let (start, count) = segment(len, n, i);
                    assert_eq!(start, next, "len {len} n {n}");
                    next = start + count;
                }
                assert_eq!(next, len);
            }
        }
    }

    /// Both ends of a loopback connection with shared-memory rings, as two members make them.
    fn ring_link() -> (Link, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let dialer = std::thread::spawn(move || {
            let stream = TcpStream::connect(address).unwrap();
            let rings = share_rings(&stream, "dialer").unwrap();
            (stream, rings)
        });
        let (accepted, _) = listener.accept().unwrap();
        let rings = share_rings(&accepted, "listener").unwrap();
        let link = |stream: TcpStream, rings: Option<Rings>| {
            stream.set_nonblocking(true).unwrap();
            Link {
                stream: Arc::new(stream),
                rings: Some(Arc::new(rings.expect("/dev/shm works here"))),
            }
        };
        let (stream, dialer_rings) = dialer.join().unwrap();
        (link(accepted, rings), link(stream, dialer_rings))
    }

    /// Bytes that cross a relay between a dialer and an acceptor running the handshake with
    /// these tokens, and each end's result.
    fn relayed_handshake(dialer: &str, acceptor: &str) -> (Vec<u8>, bool, bool) {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let (to_target, to_relay) = (target.local_addr().unwrap(), relay.local_addr().unwrap());
        let acceptor = acceptor.to_string();
        let accepting = std::thread::spawn(move || {
            let (stream, _) = target.accept().unwrap();
            handshake_in(&stream, &acceptor).is_ok()
        });
        let relaying = std::thread::spawn(move || {
            let (near, _) = relay.accept().unwrap();
            let far = TcpStream::connect(to_target).unwrap();
            let pump = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(Shutdown::Write);
                    seen
                })
            };
            let up = pump(near.try_clone().unwrap(), far.try_clone().unwrap());
            let down = pump(far, near);
            let mut seen = up.join().unwrap();
            seen.extend(down.join().unwrap());
            seen
        });
        let stream = TcpStream::connect(to_relay).unwrap();
        let dialled = handshake_out(&stream, dialer, "dp 0", 3).is_ok();
        drop(stream);
        let accepted = accepting.join().unwrap();
        (relaying.join().unwrap(), dialled, accepted)
    }

    #[test]
    fn the_run_token_never_crosses_the_network_and_a_wrong_one_fails_both_ends() {
        let token = "the-secret-token-of-this-run";
        let (wire, dialled, accepted) = relayed_handshake(token, token);
        assert!(dialled && accepted);
        assert!(
            !wire.windows(token.len()).any(|w| w == token.as_bytes()),
            "the token was on the wire"
        );
        let (_, dialled, accepted) = relayed_handshake("another-token-entirely", token);
        assert!(!dialled && !accepted, "each end refuses the other");
    }

    /// Threads of this process.
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    #[test]
    fn a_flood_of_silent_connections_holds_a_bounded_number_of_threads() {
        let end = TcpEndpoint::bind("127.0.0.1", "token").unwrap();
        let before = threads();
        let flood: Vec<TcpStream> = (0..400)
            .filter_map(|_| TcpStream::connect(end.address()).ok())
            .collect();
        assert!(flood.len() > 300, "the flood connected");
        std::thread::sleep(Duration::from_millis(500));
        let added = threads().saturating_sub(before);
        // A thread per connection would add 400; the bound is 32, and the other tests of
        // this binary start a few dozen at most meanwhile.
        assert!(added <= 150, "{added} threads more than before the flood");
    }

    /// The two members of a group of two, each on its own endpoint in this process (their
    /// link uses shared-memory rings, as two ranks on one host do).
    fn pair(timeout: Duration) -> (TcpCommunicator, TcpCommunicator) {
        let ends = [(); 2].map(|()| TcpEndpoint::bind("127.0.0.1", "token").unwrap());
        let peers: Vec<SocketAddr> = ends.iter().map(TcpEndpoint::address).collect();
        std::thread::scope(|scope| {
            let members: Vec<_> = (0..2)
                .map(|index| {
                    let (end, peers) = (&ends[index], &peers);
                    scope.spawn(move || {
                        let group = Group {
                            name: "dp 0".into(),
                            ranks: vec![0, 1],
                            index,
                        };
                        end.communicator(group, peers, timeout).unwrap()
                    })
                })
                .collect();
            let mut members = members.into_iter().map(|m| m.join().unwrap());
            (members.next().unwrap(), members.next().unwrap())
        })
    }

    #[test]
    fn a_collective_in_flight_keeps_the_arena_alive_when_the_backend_is_dropped_first() {
        use crate::tensor::cpu::CpuBackend;
        use crate::tensor::{Backend as _, Tensor};
        use tessera_plan::memory::Place;

        // Large enough that the allocator returns the arena to the kernel when it is freed:
        // a use after free faults instead of reading stale bytes.
        let len = 4 << 20;
        let (mut first, mut second) = pair(Duration::from_secs(20));
        let mut backend = CpuBackend::new(len * 4, 0).unwrap();
        let grads = Tensor {
            place: Place::Device,
            offset: 0,
            len,
            dtype: Dtype::F32,
        };
        backend.write(grads, &vec![1.0; len]).unwrap();
        let op = Collective::AllReduce {
            buf: backend.comm_buf(grads),
            op: ReduceOp::Sum,
        };
        // SAFETY: under test: the op must keep the arena alive by itself.
        let work = unsafe { first.start(op) }.unwrap();
        // A rank that fails elsewhere tears down in any order: here its backend goes first,
        // while the all-reduce still waits for the peer.
        drop(backend);
        let mut theirs = vec![2.0f32; len];
        crate::comm::CommunicatorExt::all_reduce(&mut second, &mut theirs, ReduceOp::Sum).unwrap();
        work.wait().unwrap();
        drop(first);
        assert!(
            theirs.iter().all(|&v| v == 3.0),
            "the peer got the dropped rank's values"
        );
    }

    #[test]
    fn a_ring_peer_that_wrote_and_exited_is_read_to_its_last_byte() {
        let (receiver, sender) = ring_link();
        let message: Vec<f32> = (0..200).map(|i| i as f32).collect();
        let mut wire = Wire::new(Some((sender, 1)), None, Duration::from_secs(5));
        wire.send(&CommBuf::host(&message));
        wire.finish().unwrap();
        // The sender exits: its connection closes with its last bytes still in the ring.
        drop(wire);
        let mut wire = Wire::new(None, Some((receiver, 0)), Duration::from_secs(5));
        // The receiver was about to sleep when the close came.
        wire.wait(true, false).unwrap();
        let mut got = vec![0u8; message.len() * 4];
        wire.recv(&mut got).unwrap();
        assert_eq!(got, bytemuck::cast_slice::<f32, u8>(&message));
        // Nothing more will come: the next receive fails at once instead of timing out.
        let start = Instant::now();
        let error = wire.recv(&mut [0u8; 1]).unwrap_err();
        assert_eq!(
            error.cause,
            "receiving from member 0: the peer closed the connection"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
