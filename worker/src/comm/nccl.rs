//! Collectives over NCCL: the GPU backend of [`Communicator`], through cudarc's dynamically
//! loaded bindings (`cudarc::nccl::{result, sys}`; the safe `Comm` wants `CudaSlice`s, and
//! our buffers are raw ranges of the arena).
//!
//! - [`NcclId`]: NCCL's 128-byte unique id. The group's member 0 creates it (the process that
//!   hosts NCCL's bootstrap root) and the runtime hands the bytes to the other members through
//!   the coordinator; [`NcclId::from_bytes`] takes them back.
//! - [`NcclCommunicator`]: one process group on one device. An NCCL communicator and the CUDA
//!   context binding are tied to a thread, so each `NcclCommunicator` owns a thread that binds
//!   the device's primary context, creates a stream, an event and the communicator, and then
//!   runs the ops in start order: it enqueues one, records the event after it, and waits until
//!   the event has fired before it completes the op's [`Work`] and takes the next. Ops are not
//!   pipelined on the stream; each completes before the next starts (simple and sufficient
//!   while every collective is waited for by its caller; an event per op would allow overlap).
//!
//! Buffers are [`Memory::Device`] ranges whose `addr` is a `CUdeviceptr` in the primary
//! context of the communicator's device (the arena's). The communicator's stream does not wait
//! for anybody else's stream: whoever starts an op must have finished every write to its
//! buffers on the device (synchronised the stream that wrote them) before calling `start`.
//! Sends and receives run in start order on that one stream, so a send waits for its matching
//! receive to be started by the peer: pairs must be ordered so that they cannot cross.
//!
//! Failure: the thread waits for an op by polling its event and `ncclCommGetAsyncError`
//! (NCCL's documented pattern for blocking communicators). An asynchronous NCCL error, a CUDA
//! error, or an op still running after the timeout makes the thread call `ncclCommAbort`
//! (which stops NCCL's kernels and frees the communicator) before it fails the op with
//! [`CommError::Collective`]; the timeout's `silent` list is every other member, since NCCL
//! does not say whom it waits for. The communicator is then poisoned: every later op fails
//! with that first error. A host-side NCCL call that never returns (connection setup waiting
//! on a peer) cannot be interrupted from its own thread, so a watchdog thread fails that op
//! `WATCHDOG_GRACE` after its timeout, fails everything queued behind it and poisons the
//! communicator; it does not call `ncclCommAbort` itself, because that frees the communicator
//! while the stuck thread may still use it. The stuck thread is left behind (the process stops
//! at its first failed collective, which releases everything).
//!
//! Nothing here may panic on a missing library: [`NcclCommunicator::new`] and
//! [`NcclId::new`] check that libnccl (and libcuda) load before their first cudarc call, whose
//! loader would panic, and say what was tried and how to fix it. Communicators are always
//! released with `ncclCommAbort` through `sys`, whose result is reported, never unwrapped
//! (cudarc's `Comm` panics in `Drop` when the abort fails). A panic inside cudarc on the
//! communicator's thread (a symbol the installed library lacks) is caught and becomes the
//! op's error.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;
use tessera_plan::memory::Dtype;

use super::{Collective, CommBuf, CommError, Communicator, Group, Memory, ReduceOp, Work};

/// Bytes in NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// The oldest NCCL whose API this backend calls (`ncclGetLastError` came in 2.13); cudarc binds
/// 2.28's, the version on the GPU machines (see shared/GPU.md).
const MIN_NCCL: (i32, i32, i32) = (2, 13, 0);

/// How long after an op's timeout the watchdog fails an op whose thread is stuck in a host
/// call. The thread itself fails ops at the timeout; the grace keeps the two from racing.
const WATCHDOG_GRACE: Duration = Duration::from_secs(2);

/// The group name in errors that belong to no group yet (unique ids).
const ID_GROUP: &str = "(NCCL unique id)";

const NCCL_HELP: &str = "install NCCL 2.28 for CUDA 13 (the system package libnccl2, or the pip \
    wheel nvidia-nccl-cu13); a pip wheel or a PyTorch virtualenv ships only libnccl.so.2, a name \
    cudarc does not try: make a folder with a symlink libnccl.so -> .../nvidia/nccl/lib/libnccl.so.2 \
    and put that folder on LD_LIBRARY_PATH; or train on CPU ranks with cluster.backend: tcp";

const DRIVER_HELP: &str = "run on a machine with an NVIDIA GPU and its driver (CUDA 13 needs \
    driver 580 or newer; libcuda.so.1 comes with the driver, not with the toolkit), or train on \
    CPU ranks with cluster.backend: tcp and cluster.device: cpu";

// ---------------------------------------------------------------------------------------------
// Libraries

/// Checks that libnccl loads and is new enough; returns its version.
fn load_nccl(group: &str) -> Result<(i32, i32, i32), CommError> {
    let setup = |what: String| CommError::Setup {
        group: group.into(),
        what,
        help: NCCL_HELP.into(),
    };
    // SAFETY: dlopens and dlcloses each candidate name; calls nothing in the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(setup(format!(
            "the NCCL library (libnccl) could not be loaded; tried {}",
            tried("nccl")
        )));
    }
    let code = catch_unwind(nccl::get_nccl_version)
        .map_err(|panic| setup(format!("loading NCCL failed: {}", panic_text(&*panic))))?
        .map_err(|e| setup(format!("ncclGetVersion failed: {}", describe(&e, None))))?;
    let version = nccl_version(code);
    if version < MIN_NCCL {
        let (major, minor, patch) = version;
        return Err(setup(format!(
            "the NCCL library that loaded is version {major}.{minor}.{patch}; tessera needs {}.{} \
             or newer",
            MIN_NCCL.0, MIN_NCCL.1
        )));
    }
    Ok(version)
}

/// `NCCL_VERSION_CODE` as (major, minor, patch): `X*10000 + Y*100 + Z` since 2.9, `X*1000 +
/// Y*100 + Z` before.
fn nccl_version(code: i32) -> (i32, i32, i32) {
    if code >= 10000 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    }
}

/// Checks that the CUDA driver library loads.
fn load_driver(group: &str) -> Result<(), CommError> {
    // SAFETY: dlopens and dlcloses each candidate name; calls nothing in the library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(());
    }
    Err(CommError::Setup {
        group: group.into(),
        what: format!(
            "NCCL loaded, but the CUDA driver library (libcuda) could not be loaded; tried {} \
             (and the same names of nvcuda, Windows' driver)",
            tried("cuda")
        ),
        help: DRIVER_HELP.into(),
    })
}

/// The file names cudarc's loader tries for `lib`, once each, in its order.
fn tried(lib: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for name in cudarc::get_lib_name_candidates(lib) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// The CUDA version the driver supports, as "13.0", once libcuda is known to load.
fn driver_version() -> String {
    let mut code = 0;
    // SAFETY: writes one int; needs no cuInit.
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        cudarc::driver::sys::cuDriverGetVersion(&mut code)
    }));
    match result {
        Ok(cudarc::driver::sys::CUresult::CUDA_SUCCESS) => {
            format!("{}.{}", code / 1000, code % 1000 / 10)
        }
        _ => "unknown".into(),
    }
}

/// An NCCL error as "ncclSystemError (unhandled system error): <NCCL's last message>".
fn describe(error: &NcclError, comm: Option<sys::ncclComm_t>) -> String {
    let mut text = format!("{:?} ({})", error.0, error_string(error.0));
    if let Some(comm) = comm {
        // SAFETY: `comm` is a live communicator of this thread; NCCL returns a static or
        // per-thread string (or null) that we copy at once.
        let last = unsafe { c_text(sys::ncclGetLastError(comm)) };
        if !last.is_empty() {
            text.push_str(": ");
            text.push_str(last.trim());
        }
    }
    text
}

fn error_string(result: sys::ncclResult_t) -> String {
    // SAFETY: the library is loaded (checked before any NCCL error can exist); NCCL returns a
    // static string.
    catch_unwind(|| unsafe { c_text(sys::ncclGetErrorString(result)) })
        .unwrap_or_else(|_| "no description".into())
}

/// # Safety
/// `text` is null or a NUL-terminated string valid for this call.
unsafe fn c_text(text: *const std::ffi::c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

// ---------------------------------------------------------------------------------------------
// Unique ids

/// NCCL's unique id: the address of the bootstrap root that member 0's process hosts, and a
/// random tag. Every member of a group must use the same id, once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). Call it in the group's member 0, which hosts the
    /// bootstrap root: it listens on a network interface of this process. Needs libnccl but no
    /// GPU or driver.
    pub fn new() -> Result<NcclId, CommError> {
        load_nccl(ID_GROUP)?;
        let id = catch_unwind(nccl::get_uniqueid)
            .map_err(|panic| CommError::Setup {
                group: ID_GROUP.into(),
                what: format!("ncclGetUniqueId panicked: {}", panic_text(&*panic)),
                help: NCCL_HELP.into(),
            })?
            .map_err(|e| CommError::Setup {
                group: ID_GROUP.into(),
                what: format!("ncclGetUniqueId failed: {}", describe(&e, None)),
                help: "NCCL_DEBUG=INFO shows why; NCCL_SOCKET_IFNAME picks the network \
                       interface the bootstrap root listens on"
                    .into(),
            })?;
        Ok(NcclId(id.internal.map(|b| b as u8)))
    }

    /// The id member 0 created, from its bytes (as [`NcclId::as_bytes`] gave them).
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId, CommError> {
        let array: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| CommError::Setup {
            group: ID_GROUP.into(),
            what: format!(
                "an NCCL unique id has {NCCL_ID_BYTES} bytes, but {} arrived",
                bytes.len()
            ),
            help: "pass on the bytes of member 0's NcclId::as_bytes unchanged".into(),
        })?;
        Ok(NcclId(array))
    }

    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    fn to_sys(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

// ---------------------------------------------------------------------------------------------
// Mapping and validation

/// NCCL's type for a dtype. Every dtype moves; only floats reduce (see [`super::reducible`]).
fn nccl_dtype(dtype: Dtype) -> sys::ncclDataType_t {
    match dtype {
        Dtype::F32 => sys::ncclDataType_t::ncclFloat32,
        Dtype::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        Dtype::F16 => sys::ncclDataType_t::ncclFloat16,
        Dtype::I32 => sys::ncclDataType_t::ncclInt32,
        Dtype::U8 => sys::ncclDataType_t::ncclUint8,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

// ---------------------------------------------------------------------------------------------
// The communicator

/// An op and where its result goes.
type Queued = (Collective, mpsc::Sender<Result<(), CommError>>);

/// What the caller, the op thread and the watchdog share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every change of `state`.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Ops started and not yet taken by the op thread.
    queue: VecDeque<Queued>,
    /// The op the op thread is running.
    current: Option<InFlight>,
    /// The first failure; every later op fails with it.
    poisoned: Option<CommError>,
    /// The communicator was dropped: the op thread finishes the queue and stops.
    closed: bool,
    /// The op thread has stopped.
    exited: bool,
    /// The watchdog failed an op whose thread did not come back from NCCL.
    stuck: bool,
}

struct InFlight {
    op: &'static str,
    seq: u64,
    started: Instant,
    /// Taken by whoever completes the op: the op thread, or the watchdog.
    reply: Option<mpsc::Sender<Result<(), CommError>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next op to run, registered as in flight; `None` once closed and drained. Ops that
    /// arrive after a failure are failed here.
    fn next(&self, seq: u64) -> Option<Collective> {
        let mut state = self.lock();
        loop {
            if let Some((op, reply)) = state.queue.pop_front() {
                if let Some(error) = &state.poisoned {
                    let _ = reply.send(Err(error.clone()));
                    continue;
                }
                state.current = Some(InFlight {
                    op: op.name(),
                    seq,
                    started: Instant::now(),
                    reply: Some(reply),
                });
                self.changed.notify_all();
                return Some(op);
            }
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Completes the op in flight with `result` unless the watchdog already failed it;
    /// returns whether the communicator is poisoned.
    fn finish(&self, result: Result<(), CommError>) -> bool {
        let mut state = self.lock();
        let current = state.current.take();
        if let Err(error) = &result {
            state.poisoned.get_or_insert_with(|| error.clone());
        }
        if let Some(reply) = current.and_then(|c| c.reply) {
            let _ = reply.send(result);
        }
        self.changed.notify_all();
        state.poisoned.is_some()
    }
}

/// Marks the op thread stopped however it ends, failing whatever is still queued.
struct ExitGuard {
    shared: Arc<Shared>,
    group: String,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.exited = true;
        let error = (state.poisoned.clone()).unwrap_or_else(|| thread_stopped(&self.group));
        for (_, reply) in state.queue.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        if let Some(reply) = state.current.take().and_then(|c| c.reply) {
            let _ = reply.send(Err(error));
        }
        self.shared.changed.notify_all();
    }
}

fn thread_stopped(group: &str) -> CommError {
    CommError::Setup {
        group: group.into(),
        what: "the NCCL communicator's thread has stopped".into(),
        help: "an earlier error of this rank says why".into(),
    }
}

/// A process group's collectives over NCCL on one device; ops run in start order on the
/// group's own thread and stream.
pub struct NcclCommunicator {
    group: Group,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl NcclCommunicator {
    /// Member `group.index` of `group` on CUDA device `device` (an ordinal as this process sees
    /// it), joining the communicator that `id` names; every member must call this with the
    /// same id. Waits at most `timeout` for all members to join; each later op may run at most
    /// `timeout`.
    pub fn new(
        group: Group,
        device: usize,
        id: NcclId,
        timeout: Duration,
    ) -> Result<NcclCommunicator, CommError> {
        let version = load_nccl(&group.name)?;
        load_driver(&group.name)?;
        let (n, index) = (group.size(), group.index);
        if index >= n || i32::try_from(n).is_err() {
            return Err(CommError::Invalid {
                group: group.name.clone(),
                op: "new",
                what: format!("member {index} of a group of {n}"),
            });
        }
        let shared = Arc::new(Shared::default());
        let (ready, opened) = mpsc::channel();
        let thread = {
            let (moved, shared) = (group.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("tessera-nccl {}", group.name))
                .spawn(move || serve(moved, device, id, timeout, ready, shared))
                .map_err(|e| CommError::Setup {
                    group: group.name.clone(),
                    what: format!("cannot start the communicator's thread: {e}"),
                    help: "the process may be out of threads or memory".into(),
                })?
        };
        match opened.recv_timeout(timeout) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The thread is inside ncclCommInitRank, which cannot be interrupted; once it
                // returns it finds nobody waiting and releases the communicator.
                shared.lock().closed = true;
                shared.changed.notify_all();
                let (major, minor, patch) = version;
                return Err(CommError::Setup {
                    group: group.name.clone(),
                    what: format!(
                        "NCCL {major}.{minor}.{patch} did not finish creating the communicator \
                         (member {index} of {n}, device {device}) within {timeout:.0?}"
                    ),
                    help: "a member may have failed to start or been given another id; see \
                           every member's log (NCCL_DEBUG=INFO shows NCCL's bootstrap)"
                        .into(),
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                return Err(thread_stopped(&group.name));
            }
        }
        // Built before the watchdog starts, so that a failure to start it closes the
        // communicator (in `drop`) instead of leaving its thread waiting.
        let mut communicator = NcclCommunicator {
            group: group.clone(),
            shared: shared.clone(),
            thread: Some(thread),
            watchdog: None,
        };
        let watchdog = std::thread::Builder::new()
            .name(format!("tessera-nccl-watch {}", group.name))
            .spawn(move || watch(group, timeout, shared))
            .map_err(|e| CommError::Setup {
                group: communicator.group.name.clone(),
                what: format!("cannot start the communicator's watchdog thread: {e}"),
                help: "the process may be out of threads or memory".into(),
            })?;
        communicator.watchdog = Some(watchdog);
        Ok(communicator)
    }
}

impl Communicator for NcclCommunicator {
    fn group(&self) -> &Group {
        &self.group
    }

    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
        // On the caller's thread: nothing is queued if NCCL would refuse it.
        op.validate(&self.group, "NCCL", Memory::Device)?;
        let mut state = self.shared.lock();
        if let Some(error) = &state.poisoned {
            return Ok(Work::done(Err(error.clone())));
        }
        if state.exited {
            return Err(thread_stopped(&self.group.name));
        }
        let (reply, result) = mpsc::channel();
        state.queue.push_back((op, reply));
        self.shared.changed.notify_all();
        Ok(Work::pending(result))
    }
}

impl Drop for NcclCommunicator {
    /// Lets the thread finish the ops already started (each bounded by the timeout), then
    /// joins it; a thread the watchdog found stuck in NCCL is left behind.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        self.shared.changed.notify_all();
        while !state.exited && !state.stuck {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let exited = state.exited;
        drop(state);
        if let Some(thread) = self.thread.take().filter(|_| exited) {
            let _ = thread.join();
        }
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
    }
}

/// Why an op failed, before it becomes a [`CommError`].
#[derive(Debug)]
struct Failure {
    /// Whether the op was waiting on the other members (a timeout) rather than failing here.
    waiting_on_others: bool,
    cause: String,
}

impl Failure {
    fn here(cause: String) -> Failure {
        Failure {
            waiting_on_others: false,
            cause,
        }
    }

    fn timed_out(timeout: Duration) -> Failure {
        Failure {
            waiting_on_others: true,
            cause: format!(
                "timed out after {timeout:.0?} (NCCL does not say which member it waits for); \
                 the communicator was aborted"
            ),
        }
    }

    fn into_error(self, group: &Group, op: &'static str, seq: u64, waited: Duration) -> CommError {
        CommError::Collective {
            group: group.name.clone(),
            op,
            seq,
            silent: if self.waiting_on_others {
                others(group)
            } else {
                Vec::new()
            },
            waited,
            cause: self.cause,
        }
    }
}

/// The global ranks of every member but this one.
fn others(group: &Group) -> Vec<usize> {
    group
        .ranks
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != group.index)
        .map(|(_, &rank)| rank)
        .collect()
}

/// The communicator's thread: opens the device and the communicator, then runs ops in order
/// until the communicator is dropped.
fn serve(
    group: Group,
    device: usize,
    id: NcclId,
    timeout: Duration,
    ready: mpsc::Sender<Result<(), CommError>>,
    shared: Arc<Shared>,
) {
    let _exit = ExitGuard {
        shared: shared.clone(),
        group: group.name.clone(),
    };
    let opened = catch_unwind(|| Device::open(&group, device, id))
        .unwrap_or_else(|panic| Err(setup_error(&group, device, panic_text(&*panic))));
    let mut dev = match opened {
        Ok(dev) => dev,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return; // `new` gave up waiting; dropping `dev` aborts the communicator.
    }
    let mut seq = 0;
    while let Some(op) = shared.next(seq) {
        let started = Instant::now();
        let deadline = started + timeout;
        // `op` (and its buffers' owners) lives until NCCL is done with its memory: also when
        // the watchdog leaves this thread behind in a call that never returns.
        let result = catch_unwind(AssertUnwindSafe(|| dev.run(&op, deadline, timeout)))
            .unwrap_or_else(|panic| {
                Err(Failure::here(format!("panicked: {}", panic_text(&*panic))))
            })
            .map_err(|failure| failure.into_error(&group, op.name(), seq, started.elapsed()));
        if result.is_err() {
            // Abort before replying: once the caller hears of the failure, NCCL no longer
            // touches its buffers.
            dev.abort();
        }
        if shared.finish(result) {
            dev.abort();
        }
        seq += 1;
    }
}

fn setup_error(group: &Group, device: usize, what: String) -> CommError {
    CommError::Setup {
        group: group.name.clone(),
        what: format!("on CUDA device {device}: {what}"),
        help: format!(
            "check that the device exists (nvidia-smi, CUDA_VISIBLE_DEVICES) and that the driver \
             supports CUDA 13 (this one supports CUDA {}); NCCL_DEBUG=INFO shows NCCL's side",
            driver_version()
        ),
    }
}

/// Fails an op whose thread is stuck in a host call `WATCHDOG_GRACE` past its timeout.
fn watch(group: Group, timeout: Duration, shared: Arc<Shared>) {
    let mut state = shared.lock();
    loop {
        if state.exited {
            return;
        }
        let limit = match &state.current {
            Some(current) if current.reply.is_some() => current.started + timeout + WATCHDOG_GRACE,
            _ => {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
        };
        let now = Instant::now();
        if now < limit {
            state = shared
                .changed
                .wait_timeout(state, limit - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let current = state.current.as_mut().expect("invariant: checked above");
        let error = CommError::Collective {
            group: group.name.clone(),
            op: current.op,
            seq: current.seq,
            silent: others(&group),
            waited: now - current.started,
            cause: format!(
                "timed out after {timeout:.0?} inside an NCCL call that did not return (NCCL \
                 may be connecting to a member that is gone or hung)"
            ),
        };
        if let Some(reply) = current.reply.take() {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, reply) in state.queue.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        state.poisoned.get_or_insert(error);
        state.stuck = true;
        shared.changed.notify_all();
        return;
    }
}

/// The op thread's CUDA and NCCL state. Lives and dies on that thread.
struct Device {
    stream: Arc<CudaStream>,
    /// Recorded after each op; the op is done when it fires.
    done: CudaEvent,
    /// The barrier's one-element all-reduce buffer.
    barrier: CudaSlice<f32>,
    /// Null once aborted.
    comm: sys::ncclComm_t,
}

impl Device {
    fn open(group: &Group, device: usize, id: NcclId) -> Result<Device, CommError> {
        let cuda = |what: &str, e: cudarc::driver::DriverError| {
            setup_error(group, device, format!("{what}: {e:?}"))
        };
        let ctx = CudaContext::new(device).map_err(|e| cuda("cannot open the device", e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda("cannot bind its context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda("cannot create a stream", e))?;
        let done = ctx
            .new_event(None)
            .map_err(|e| cuda("cannot create an event", e))?;
        let barrier = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| cuda("cannot allocate the barrier's buffer", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda("cannot synchronise the stream", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let (n, index) = (group.size() as i32, group.index as i32);
        // SAFETY: `comm` is a valid place for the handle; the context of `device` is bound to
        // this thread, which is the only one that will use the communicator.
        unsafe { nccl::comm_init_rank(&mut comm, n, id.to_sys(), index) }.map_err(|e| {
            setup_error(
                group,
                device,
                format!(
                    "ncclCommInitRank (member {index} of {n}) failed: {}",
                    describe(&e, None)
                ),
            )
        })?;
        Ok(Device {
            stream,
            done,
            barrier,
            comm,
        })
    }

    /// Runs `op` to completion, or fails it at `deadline`.
    fn run(
        &mut self,
        op: &Collective,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), Failure> {
        if self.comm.is_null() {
            return Err(Failure::here(
                "the communicator was aborted by an earlier failure".into(),
            ));
        }
        if !self.enqueue(op)? {
            return Ok(());
        }
        self.done
            .record(&self.stream)
            .map_err(|e| Failure::here(format!("cannot record the completion event: {e:?}")))?;
        self.wait(deadline, timeout)
    }

    /// Puts `op` on the stream; `false` if it moves nothing (then every member skips it).
    fn enqueue(&self, op: &Collective) -> Result<bool, Failure> {
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let comm = self.comm;
        let ptr = |buf: &CommBuf| buf.addr as *mut std::ffi::c_void;
        let int = |v: usize| v as std::ffi::c_int;
        // SAFETY: `Collective::validate` accepted `op`, so its buffers are device ranges of the right sizes
        // placed as NCCL's in-place rules allow; start's contract keeps them valid and unused
        // by others until the op completes, which `run` waits for. The barrier buffer is ours.
        let status = unsafe {
            match op {
                Collective::AllReduce { buf, op } if buf.len > 0 => nccl::all_reduce(
                    ptr(buf),
                    ptr(buf),
                    buf.len,
                    nccl_dtype(buf.dtype),
                    nccl_op(*op),
                    comm,
                    stream,
                ),
                Collective::ReduceScatter { input, output, op } if output.len > 0 => {
                    nccl::reduce_scatter(
                        ptr(input),
                        ptr(output),
                        output.len,
                        nccl_dtype(input.dtype),
                        nccl_op(*op),
                        comm,
                        stream,
                    )
                }
                Collective::AllGather { input, output } if input.len > 0 => nccl::all_gather(
                    ptr(input),
                    ptr(output),
                    input.len,
                    nccl_dtype(input.dtype),
                    comm,
                    stream,
                ),
                Collective::Broadcast { buf, root } if buf.len > 0 => nccl::broadcast(
                    ptr(buf),
                    ptr(buf),
                    buf.len,
                    nccl_dtype(buf.dtype),
                    int(*root),
                    comm,
                    stream,
                ),
                Collective::Send { buf, peer } if buf.len > 0 => nccl::send(
                    ptr(buf),
                    buf.len,
                    nccl_dtype(buf.dtype),
                    int(*peer),
                    comm,
                    stream,
                ),
                Collective::Recv { buf, peer } if buf.len > 0 => nccl::recv(
                    ptr(buf),
                    buf.len,
                    nccl_dtype(buf.dtype),
                    int(*peer),
                    comm,
                    stream,
                ),
                Collective::Barrier => {
                    // An all-reduce completes only once every member has contributed.
                    let (addr, _record) = self.barrier.device_ptr(&self.stream);
                    let addr = addr as *mut std::ffi::c_void;
                    nccl::all_reduce(
                        addr,
                        addr,
                        1,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                }
                _ => return Ok(false),
            }
        };
        status.map(|_| true).map_err(|e| {
            Failure::here(format!(
                "{} failed: {}",
                op.name(),
                describe(&e, Some(comm))
            ))
        })
    }

    /// Polls the completion event and NCCL's asynchronous error until the op is done, fails,
    /// or `deadline` passes.
    fn wait(&self, deadline: Instant, timeout: Duration) -> Result<(), Failure> {
        let mut backoff = Backoff::default();
        loop {
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Failure::here(format!("the CUDA stream failed: {e:?}"))),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (not aborted) and used only by this thread; `state` is a
            // valid place for the result.
            let checked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            for result in [checked, state] {
                if !matches!(
                    result,
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                ) {
                    return Err(Failure::here(format!(
                        "NCCL reported an error: {}",
                        describe(&NcclError(result), Some(self.comm))
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::timed_out(timeout));
            }
            backoff.pause();
        }
    }

    /// `ncclCommAbort`: stops NCCL's kernels and frees the communicator. Reports a failure
    /// instead of panicking.
    fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        // SAFETY: `comm` is live and this thread is its only user; it is not used again.
        let result = catch_unwind(|| unsafe { sys::ncclCommAbort(comm) });
        match result {
            Ok(sys::ncclResult_t::ncclSuccess) => {}
            Ok(other) => eprintln!(
                "warning: ncclCommAbort failed: {}",
                describe(&NcclError(other), None)
            ),
            Err(panic) => eprintln!("warning: ncclCommAbort panicked: {}", panic_text(&*panic)),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Every op has completed or failed by now, so aborting only frees resources; unlike
        // ncclCommDestroy it never waits on other members.
        self.abort();
    }
}

/// Polling pauses: spin briefly (small collectives finish in microseconds), then sleep with
/// doubling pauses up to a millisecond.
#[derive(Default)]
struct Backoff {
    polls: u32,
}

impl Backoff {
    const SPINS: u32 = 64;
    const MAX_SLEEP: Duration = Duration::from_millis(1);

    fn pause(&mut self) {
        self.polls = self.polls.saturating_add(1);
        if self.polls <= Self::SPINS {
            std::thread::yield_now();
        } else {
            let shift = (self.polls - Self::SPINS).min(10);
            let sleep = Duration::from_micros(1 << shift).min(Self::MAX_SLEEP);
            std::thread::sleep(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::comm::CommunicatorExt as _;

    fn group_of(n: usize, index: usize) -> Group {
        Group {
            name: "dp 0".into(),
            ranks: (0..n).map(|i| 10 + i).collect(),
            index,
        }
    }

    fn device_buf(addr: usize, len: usize, dtype: Dtype) -> CommBuf {
        CommBuf {
            addr,
            len,
            dtype,
            memory: Memory::Device,
            owner: None,
        }
    }

    fn nccl_present() -> bool {
        // SAFETY: only dlopens and dlcloses candidate names.
        unsafe { sys::is_culib_present() }
    }

    fn driver_present() -> bool {
        // SAFETY: only dlopens and dlcloses candidate names.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    #[test]
    fn without_nccl_or_a_driver_new_is_a_setup_error_naming_the_library() {
        let (nccl, driver) = (nccl_present(), driver_present());
        if nccl && driver {
            eprintln!(
                "skipped: libnccl and libcuda both load here (the GPU tests cover this case)"
            );
            return;
        }
        let id = NcclId::from_bytes(&[0; NCCL_ID_BYTES]).unwrap();
        let error = NcclCommunicator::new(group_of(2, 0), 0, id, Duration::from_secs(5))
            .err()
            .expect("no communicator without the libraries");
        let text = error.to_string();
        assert!(matches!(error, CommError::Setup { .. }), "{text}");
        assert!(text.contains("cannot set up group dp 0"), "{text}");
        if !nccl {
            for needle in [
                "libnccl",
                "tried libnccl.so,",
                "libnccl.so.2",
                "cluster.backend: tcp",
            ] {
                assert!(text.contains(needle), "{needle:?} not in {text}");
            }
            let id_error = NcclId::new().unwrap_err().to_string();
            assert!(id_error.contains("tried libnccl.so,"), "{id_error}");
        } else {
            for needle in [
                "libcuda",
                "tried libcuda.so,",
                "driver 580",
                "cluster.backend: tcp",
            ] {
                assert!(text.contains(needle), "{needle:?} not in {text}");
            }
        }
    }

    #[test]
    fn dtypes_and_reductions_map_to_nccls_own_codes() {
        use sys::ncclDataType_t as T;
        use sys::ncclRedOp_t as R;
        let table = [
            (Dtype::F32, T::ncclFloat32, 7, true),
            (Dtype::Bf16, T::ncclBfloat16, 9, true),
            (Dtype::F16, T::ncclFloat16, 6, true),
            (Dtype::I32, T::ncclInt32, 2, false),
            (Dtype::U8, T::ncclUint8, 1, false),
        ];
        for (dtype, nccl_type, code, reduces) in table {
            assert_eq!(nccl_dtype(dtype), nccl_type, "{}", dtype.name());
            // The numbers nccl.h gives them, which the library reads.
            assert_eq!(nccl_type as u32, code, "{}", dtype.name());
            assert_eq!(super::super::reducible(dtype), reduces, "{}", dtype.name());
        }
        assert_eq!(nccl_op(ReduceOp::Sum), R::ncclSum);
        assert_eq!(nccl_op(ReduceOp::Avg), R::ncclAvg);
        assert_eq!(nccl_op(ReduceOp::Max), R::ncclMax);
        assert_eq!((R::ncclSum as u32, R::ncclAvg as u32), (0, 4));
    }

    #[test]
    fn nccl_version_codes_decode_in_both_encodings() {
        assert_eq!(nccl_version(22809), (2, 28, 9));
        assert_eq!(nccl_version(23203), (2, 32, 3));
        assert_eq!(nccl_version(2804), (2, 8, 4));
        assert!(nccl_version(21215) < MIN_NCCL && nccl_version(21300) >= MIN_NCCL);
    }

    #[test]
    fn a_unique_id_has_exactly_128_bytes() {
        for len in [0, 1, 127, 129, 256] {
            let error = NcclId::from_bytes(&vec![1; len]).unwrap_err();
            let text = error.to_string();
            assert!(matches!(error, CommError::Setup { .. }), "{text}");
            assert!(
                text.contains(&format!("has 128 bytes, but {len} arrived")),
                "{text}"
            );
        }
        let bytes: Vec<u8> = (0..NCCL_ID_BYTES as u8).collect();
        let id = NcclId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        assert_eq!(id.to_sys().internal[127] as u8, 127);
        assert_eq!(format!("{id:?}"), "NcclId(0001020304050607…)");
    }

    #[test]
    fn a_timeout_blames_every_other_member_and_a_local_error_nobody() {
        let group = group_of(4, 2);
        let waited = Duration::from_secs(3);
        let error =
            Failure::timed_out(Duration::from_secs(3)).into_error(&group, "all_reduce", 7, waited);
        let CommError::Collective {
            silent, seq, cause, ..
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!((silent.as_slice(), *seq), ([10, 11, 13].as_slice(), 7));
        assert!(cause.starts_with("timed out after 3s"), "{cause}");
        assert!(
            error
                .to_string()
                .contains("not heard from ranks 10, 11, 13"),
            "{error}"
        );
        let local = Failure::here("boom".into()).into_error(&group, "send", 0, waited);
        assert!(matches!(local, CommError::Collective { ref silent, .. } if silent.is_empty()));
    }

    #[test]
    fn the_watchdog_fails_an_op_stuck_in_a_host_call_and_everything_queued_behind_it() {
        let shared = Arc::new(Shared::default());
        let (first, first_result) = mpsc::channel();
        let (second, second_result) = mpsc::channel();
        let op = Collective::Barrier;
        shared
            .lock()
            .queue
            .extend([(op.clone(), first), (op, second)]);
        // A stand-in for the op thread: takes the first op and never comes back.
        let stuck = shared.clone();
        std::thread::spawn(move || {
            stuck.next(0);
            std::thread::sleep(Duration::from_secs(3600));
        });
        let timeout = Duration::from_millis(100);
        let started = Instant::now();
        watch(group_of(3, 0), timeout, shared.clone());
        let elapsed = started.elapsed();
        assert!(elapsed >= timeout + WATCHDOG_GRACE, "{elapsed:?}");
        let error = first_result.recv().unwrap().unwrap_err();
        let text = error.to_string();
        assert!(text.contains("barrier #0 in group dp 0"), "{text}");
        assert!(text.contains("did not return"), "{text}");
        assert!(text.contains("not heard from ranks 11, 12"), "{text}");
        assert_eq!(second_result.recv().unwrap().unwrap_err(), error);
        let state = shared.lock();
        assert!(state.stuck && state.poisoned == Some(error));
    }

    #[test]
    fn finishing_a_failed_op_poisons_the_ops_after_it() {
        let shared = Arc::new(Shared::default());
        let (first, first_result) = mpsc::channel();
        let (second, second_result) = mpsc::channel();
        shared
            .lock()
            .queue
            .extend([(Collective::Barrier, first), (Collective::Barrier, second)]);
        assert_eq!(shared.next(0), Some(Collective::Barrier));
        let error =
            Failure::here("boom".into()).into_error(&group_of(2, 0), "barrier", 0, Duration::ZERO);
        assert!(shared.finish(Err(error.clone())));
        assert_eq!(first_result.recv().unwrap(), Err(error.clone()));
        shared.lock().closed = true;
        assert_eq!(shared.next(1), None);
        assert_eq!(second_result.recv().unwrap(), Err(error));
    }

    /// Runs with the NCCL of a pip wheel, no GPU and no driver needed:
    /// `TESSERA_NCCL_LIB_DIR=DIR LD_LIBRARY_PATH=DIR cargo test -p tessera-worker --lib
    /// comm::nccl` where DIR holds `libnccl.so -> .../nvidia/nccl/lib/libnccl.so.2`.
    #[test]
    fn with_a_wheels_nccl_unique_ids_need_no_gpu() {
        let Some(dir) = std::env::var_os("TESSERA_NCCL_LIB_DIR") else {
            eprintln!("skipped: TESSERA_NCCL_LIB_DIR names no folder with libnccl.so");
            return;
        };
        let dir = Path::new(&dir);
        assert!(
            dir.join("libnccl.so").exists(),
            "no libnccl.so in {}",
            dir.display()
        );
        let on_path = std::env::var_os("LD_LIBRARY_PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p == dir));
        assert!(
            on_path,
            "put {} on LD_LIBRARY_PATH too: the loader reads it at start-up",
            dir.display()
        );

        let version = load_nccl("test").unwrap();
        assert!(version >= MIN_NCCL, "{version:?}");
        let (a, b) = (NcclId::new().unwrap(), NcclId::new().unwrap());
        assert_ne!(a, b);
        assert_eq!(NcclId::from_bytes(a.as_bytes()).unwrap(), a);
        let text = describe(&NcclError(sys::ncclResult_t::ncclInvalidArgument), None);
        assert!(
            text.starts_with("ncclInvalidArgument (invalid argument"),
            "{text}"
        );

        if !driver_present() {
            let error = NcclCommunicator::new(group_of(1, 0), 0, a, Duration::from_secs(5))
                .err()
                .expect("no communicator without a driver")
                .to_string();
            assert!(
                error.contains("NCCL loaded, but the CUDA driver library (libcuda)"),
                "{error}"
            );
        }
    }

    /// `cargo test -p tessera-worker --lib comm::nccl -- --ignored` on a machine with a GPU,
    /// its driver and libnccl (see shared/GPU.md).
    #[test]
    #[ignore = "needs a GPU, its driver and libnccl"]
    fn on_a_gpu_a_group_of_one_reduces_gathers_scatters_and_broadcasts() {
        let id = NcclId::new().unwrap();
        let group = Group::solo("gpu 0", 0);
        let mut comm = NcclCommunicator::new(group, 0, id, Duration::from_secs(60)).unwrap();
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25 - 100.0).collect();
        let data = stream.clone_htod(&values).unwrap();
        let gathered = stream.alloc_zeros::<f32>(values.len()).unwrap();
        let scattered = stream.alloc_zeros::<f32>(values.len()).unwrap();
        stream.synchronize().unwrap();
        let buf = |slice: &CudaSlice<f32>| {
            let (addr, _read) = slice.device_ptr(&stream);
            device_buf(addr as usize, slice.len(), Dtype::F32)
        };
        let read = |slice: &CudaSlice<f32>| stream.clone_dtoh(slice).unwrap();
        let sum = ReduceOp::Sum;

        // SAFETY (every `run` below): the buffers are live device allocations of device 0's
        // primary context, written by nothing else while the op runs.
        unsafe {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                comm.run(Collective::AllReduce {
                    buf: buf(&data),
                    op,
                })
                .unwrap();
            }
            assert_eq!(read(&data), values);
            let (input, output) = (buf(&data), buf(&gathered));
            comm.run(Collective::AllGather { input, output }).unwrap();
            assert_eq!(read(&gathered), values);
            let (input, output) = (buf(&data), buf(&scattered));
            comm.run(Collective::ReduceScatter {
                input,
                output,
                op: sum,
            })
            .unwrap();
            assert_eq!(read(&scattered), values);
            comm.run(Collective::Broadcast {
                buf: buf(&data),
                root: 0,
            })
            .unwrap();
            assert_eq!(read(&data), values);
            comm.run(Collective::Barrier).unwrap();
            let half = buf(&data).slice(0, 2048);
            comm.run(Collective::AllReduce { buf: half, op: sum })
                .unwrap();
        }
        let host = CommBuf::host(&values);
        // SAFETY: rejected before anything runs.
        let error = unsafe { comm.start(Collective::AllReduce { buf: host, op: sum }) };
        assert!(matches!(error, Err(CommError::Invalid { .. })));
        // Still healthy after a rejected call.
        comm.barrier().unwrap();
    }

    #[test]
    #[ignore = "needs a GPU, its driver and libnccl"]
    fn on_a_gpu_a_member_that_never_joins_fails_setup_within_the_timeout() {
        let id = NcclId::new().unwrap();
        let started = Instant::now();
        let error = NcclCommunicator::new(group_of(2, 0), 0, id, Duration::from_secs(3))
            .err()
            .expect("member 1 never joins");
        let text = error.to_string();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert!(
            text.contains("did not finish creating the communicator"),
            "{text}"
        );
    }
}
