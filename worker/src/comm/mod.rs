//! Collectives between ranks: the [`Communicator`] trait the data-parallel, tensor-parallel
//! and pipeline code are written against once, and its backends ([`tcp`] on CPU, [`nccl`] on
//! GPU, [`solo`] for groups of one).
//!
//! A communicator belongs to one process group ([`Group`]: a mesh axis's ranks, such as the
//! data-parallel group of pipeline stage 0) and runs that group's collectives in the order
//! they were started, each numbered by a sequence number that every member agrees on. Starting
//! a collective returns a [`Work`] handle at once, so communication can overlap compute;
//! [`CommunicatorExt`] has the blocking, slice-typed calls most code wants.
//!
//! Buffers are raw ranges ([`CommBuf`]) because they are slices of the arena that the backend
//! owns (host memory on CPU, device memory on GPU). Reductions are done in f32 whatever the
//! storage dtype, in the same order on every rank, so every member ends with the same bits.
//!
//! Failure: every collective has a timeout. A timeout, a peer that closes its connection, or a
//! bad handshake fails the collective with a [`CommError`] naming the group, the op, its
//! sequence number and the peers it did not hear from; the communicator is then poisoned
//! (every later call fails with the first error), and a backend closes its connections so that
//! its peers fail quickly too instead of waiting out their own timeout.

pub mod nccl;
pub mod shm;
pub mod solo;
pub mod staged;
pub mod tcp;

use std::ptr::NonNull;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tessera_plan::memory::Dtype;

use crate::tensor::Elem;

/// How a reduction combines the members' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group's size.
    Avg,
    /// The largest value (vocabulary-parallel softmax takes its row maximum this way).
    Max,
}

/// Where a buffer's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Host,
    /// Device memory (a CUDA device pointer); only device backends accept it.
    Device,
}

/// A share in the memory that buffers point into (a backend's arena, a staging copy): the
/// memory is freed only once every holder is gone.
///
/// Each [`CommBuf`] of an arena holds one, so a collective still in flight on a
/// communicator's thread keeps the memory it reads and writes alive, whatever is dropped
/// first when a rank tears down after a failure: the backend, the [`Work`], or the
/// communicator. (Borrowed buffers have none; see [`CommBuf::host`].)
#[derive(Clone)]
pub struct Owner(Arc<dyn Send + Sync>);

impl Owner {
    pub fn new(memory: Arc<dyn Send + Sync>) -> Owner {
        Owner(memory)
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Owner")
    }
}

/// Owners are equal when they share the same memory.
impl PartialEq for Owner {
    fn eq(&self, other: &Owner) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl Eq for Owner {}

/// Zeroed host memory, 8-byte aligned, reached only through raw pointers (no reference to its
/// bytes exists, so a backend and a collective's thread may each write their part) and freed
/// when its last [`Owner`] goes: the CPU backend's arenas, staging copies of device buffers.
pub struct HostMemory {
    words: NonNull<[u64]>,
}

// SAFETY: plain heap memory; who may read or write which bytes when is the business of the
// backend's checks and the collectives' contract, not of this owner, which only frees it.
unsafe impl Send for HostMemory {}
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// `bytes` zeroed bytes (rounded up to whole words), or why they cannot be had.
    pub fn new(bytes: usize) -> Result<HostMemory, std::collections::TryReserveError> {
        let mut words = Vec::new();
        words.try_reserve_exact(bytes.div_ceil(8))?;
        // Written now, so that the pages are the process's from the start, as planned.
        words.resize(bytes.div_ceil(8), 0u64);
        Ok(HostMemory {
            words: NonNull::from(Box::leak(words.into_boxed_slice())),
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.words.as_ptr() as *mut u8
    }

    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: made by `Box::leak` in `new`, freed once, here.
        drop(unsafe { Box::from_raw(self.words.as_ptr()) });
    }
}

/// `len` elements of `dtype` at address `addr`, and a share in the memory they live in when
/// the buffer comes from memory that is owned (an arena: [`crate::tensor::Backend::comm_buf`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommBuf {
    pub addr: usize,
    pub len: usize,
    pub dtype: Dtype,
    pub memory: Memory,
    /// Keeps the memory allocated while the buffer (or a collective holding it) exists.
    pub owner: Option<Owner>,
}

impl CommBuf {
    /// A host slice's range, borrowed: it holds no share of the memory, so the caller keeps
    /// the slice alive and untouched until the collective completes (see
    /// [`Communicator::start`]); the blocking calls of [`CommunicatorExt`] do.
    pub fn host<T: Elem>(slice: &[T]) -> CommBuf {
        CommBuf {
            addr: slice.as_ptr() as usize,
            len: slice.len(),
            dtype: T::DTYPE,
            memory: Memory::Host,
            owner: None,
        }
    }

    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size() as usize
    }

    /// Elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> CommBuf {
        assert!(
            start + len <= self.len,
            "invariant: slice {start}+{len} of a buffer of {}",
            self.len
        );
        CommBuf {
            addr: self.addr + start * self.dtype.size() as usize,
            len,
            ..self.clone()
        }
    }
}

/// One collective. Peers and roots are indices in the group (0..size), not global ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collective {
    /// Every member's `buf` becomes the reduction of all members' `buf`.
    AllReduce { buf: CommBuf, op: ReduceOp },
    /// `input` is `size` equal chunks; member i's `output` (one chunk) becomes the reduction
    /// of every member's chunk i. `output` may be the member's own chunk of `input` (in place);
    /// the rest of `input` is scratch afterwards.
    ReduceScatter {
        input: CommBuf,
        output: CommBuf,
        op: ReduceOp,
    },
    /// `output` is `size` chunks of `input`'s length; chunk i becomes member i's `input`.
    /// `input` may be the member's own chunk of `output` (in place).
    AllGather { input: CommBuf, output: CommBuf },
    /// Every member's `buf` becomes member `root`'s.
    Broadcast { buf: CommBuf, root: usize },
    /// `buf` goes to member `peer`, which must start a matching `Recv` of the same length.
    Send { buf: CommBuf, peer: usize },
    /// `buf` is filled from member `peer`'s matching `Send`.
    Recv { buf: CommBuf, peer: usize },
    /// Completes once every member has started its barrier.
    Barrier,
}

/// Copies host range `from` to `to` (same length), unless they are the same memory.
///
/// # Safety
/// Both are valid host ranges of `from.bytes()` bytes that nobody else uses meanwhile.
pub(crate) unsafe fn copy_host(from: &CommBuf, to: &CommBuf) {
    debug_assert_eq!(from.bytes(), to.bytes(), "invariant: equal lengths");
    if from.addr != to.addr && from.len > 0 {
        // SAFETY: the caller's contract; `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(from.addr as *const u8, to.addr as *mut u8, from.bytes()) }
    }
}

/// Whether collectives can reduce `dtype` (the float dtypes; sums are taken in f32 or better).
pub fn reducible(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16)
}

impl Collective {
    /// The buffers the op reads or writes.
    pub fn buffers(&self) -> Vec<&CommBuf> {
        match self {
            Collective::AllReduce { buf, .. }
            | Collective::Broadcast { buf, .. }
            | Collective::Send { buf, .. }
            | Collective::Recv { buf, .. } => vec![buf],
            Collective::ReduceScatter { input, output, .. }
            | Collective::AllGather { input, output } => vec![input, output],
            Collective::Barrier => Vec::new(),
        }
    }

    /// The op's name in errors and traces.
    pub fn name(&self) -> &'static str {
        match self {
            Collective::AllReduce { .. } => "all_reduce",
            Collective::ReduceScatter { .. } => "reduce_scatter",
            Collective::AllGather { .. } => "all_gather",
            Collective::Broadcast { .. } => "broadcast",
            Collective::Send { .. } => "send",
            Collective::Recv { .. } => "recv",
            Collective::Barrier => "barrier",
        }
    }
}

impl Collective {
    /// Checks the op against the contract every backend implements, before anything is queued:
    /// the buffers are in `memory` (what `backend` moves), aligned and non-null, reductions
    /// are of float dtypes, inputs and outputs agree in dtype and in length (`size` chunks),
    /// a one-chunk buffer overlaps the whole one only as this member's own chunk (in place),
    /// and roots and peers are members (peers other than this one).
    pub fn validate(&self, group: &Group, backend: &str, memory: Memory) -> Result<(), CommError> {
        let (n, me) = (group.size(), group.index);
        let invalid = |what: String| CommError::Invalid {
            group: group.name.clone(),
            op: self.name(),
            what,
        };
        for buf in self.buffers() {
            if buf.memory != memory {
                let (theirs, ours) = match memory {
                    Memory::Host => ("a device buffer", "host"),
                    Memory::Device => ("a host buffer", "device"),
                };
                return Err(invalid(format!(
                    "{theirs}: the {backend} backend moves {ours} memory only"
                )));
            }
            if buf.len > 0 && buf.addr == 0 {
                return Err(invalid("a null pointer".into()));
            }
            if !buf.addr.is_multiple_of(buf.dtype.size() as usize) {
                return Err(invalid(format!(
                    "address {:#x} is not aligned for {}",
                    buf.addr,
                    buf.dtype.name()
                )));
            }
        }
        let reduce = |dtype: Dtype| {
            if reducible(dtype) {
                Ok(())
            } else {
                Err(invalid(format!("cannot reduce {}", dtype.name())))
            }
        };
        let same = |a: &CommBuf, b: &CommBuf| {
            if a.dtype == b.dtype {
                Ok(())
            } else {
                Err(invalid(format!(
                    "input is {}, output {}",
                    a.dtype.name(),
                    b.dtype.name()
                )))
            }
        };
        // `whole` (the `which` buffer) is `n` chunks of `chunk`'s length, and overlaps it only
        // as this member's chunk.
        let chunks = |whole: &CommBuf, chunk: &CommBuf, which: &str| {
            if whole.len != chunk.len * n {
                return Err(invalid(format!(
                    "{which} of {} elements is not {n} chunks of {}",
                    whole.len, chunk.len
                )));
            }
            in_place(whole, chunk, me).map_err(invalid)
        };
        match self {
            Collective::AllReduce { buf, .. } => reduce(buf.dtype),
            Collective::ReduceScatter { input, output, .. } => {
                reduce(input.dtype)?;
                same(input, output)?;
                chunks(input, output, "input")
            }
            Collective::AllGather { input, output } => {
                same(input, output)?;
                chunks(output, input, "output")
            }
            Collective::Broadcast { root, .. } if *root >= n => {
                Err(invalid(format!("root {root} of a group of {n}")))
            }
            Collective::Send { peer, .. } | Collective::Recv { peer, .. }
                if *peer >= n || *peer == me =>
            {
                Err(invalid(format!("peer {peer} is not another member of {n}")))
            }
            Collective::Broadcast { .. }
            | Collective::Send { .. }
            | Collective::Recv { .. }
            | Collective::Barrier => Ok(()),
        }
    }
}

/// The in-place rule: `chunk` may overlap `whole` only as member `me`'s chunk of it.
fn in_place(whole: &CommBuf, chunk: &CommBuf, me: usize) -> Result<(), String> {
    let overlaps = chunk.len > 0
        && whole.len > 0
        && chunk.addr < whole.addr + whole.bytes()
        && whole.addr < chunk.addr + chunk.bytes();
    if overlaps && chunk.addr != whole.addr + me * chunk.bytes() {
        return Err(format!(
            "the one-chunk buffer overlaps the full buffer but is not member {me}'s chunk of it"
        ));
    }
    Ok(())
}

/// A process group: the global ranks of its members, in group order, and this process's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Shown in errors: "dp 0" is the data-parallel group of the first (pp, tp) coordinate.
    pub name: String,
    pub ranks: Vec<usize>,
    pub index: usize,
}

impl Group {
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// A group of one: every collective is a no-op (or a copy).
    pub fn solo(name: impl Into<String>, rank: usize) -> Group {
        Group {
            name: name.into(),
            ranks: vec![rank],
            index: 0,
        }
    }
}

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error(
        "{op} #{seq} in group {group} failed after {waited:.1?}: {cause}{}\n  help: a peer may \
         have died or hung; its log says why (every rank stops at the first failed collective)",
        silent_ranks(silent)
    )]
    Collective {
        group: String,
        op: &'static str,
        /// The collective's sequence number in its group, counted from 0.
        seq: u64,
        /// Global ranks this rank was still waiting for.
        silent: Vec<usize>,
        waited: Duration,
        cause: String,
    },

    #[error("cannot set up group {group}: {what}\n  help: {help}")]
    Setup {
        group: String,
        what: String,
        help: String,
    },

    #[error("{op} in group {group}: {what}; this is a bug in tessera")]
    Invalid {
        group: String,
        op: &'static str,
        what: String,
    },
}

fn silent_ranks(silent: &[usize]) -> String {
    match silent {
        [] => String::new(),
        [one] => format!("; not heard from rank {one}"),
        many => format!(
            "; not heard from ranks {}",
            many.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A started collective. Dropping it waits for it to finish (the buffers stay borrowed until
/// then); `wait` also returns its result.
#[must_use = "a collective's result is only known after wait()"]
pub struct Work {
    state: WorkState,
    /// Applied to the result once the collective has finished, before `on_complete` (a
    /// wrapper's last step, which may itself fail).
    then: Option<Then>,
    /// Run once when the collective is known to have finished (tracing).
    on_complete: Option<Box<dyn FnOnce() + Send>>,
}

type Then = Box<dyn FnOnce(Result<(), CommError>) -> Result<(), CommError> + Send>;

enum WorkState {
    Pending(mpsc::Receiver<Result<(), CommError>>),
    Done(Option<Result<(), CommError>>),
}

impl Work {
    /// A collective that already finished with `result`.
    pub fn done(result: Result<(), CommError>) -> Work {
        Work {
            state: WorkState::Done(Some(result)),
            then: None,
            on_complete: None,
        }
    }

    /// A collective that finishes when the backend sends its result on the other end of
    /// `receiver`. A backend that drops the sender without sending fails the collective.
    pub fn pending(receiver: mpsc::Receiver<Result<(), CommError>>) -> Work {
        Work {
            state: WorkState::Pending(receiver),
            then: None,
            on_complete: None,
        }
    }

    /// Runs `f` once the collective has finished and been waited for (or found done), after
    /// any function given before (a wrapper's copy-back runs before the tracer's record).
    pub fn on_complete(mut self, f: impl FnOnce() + Send + 'static) -> Work {
        self.on_complete = Some(match self.on_complete.take() {
            Some(first) => Box::new(move || {
                first();
                f();
            }),
            None => Box::new(f),
        });
        self
    }

    /// Passes the result through `f` once the collective has finished, after any function
    /// given before: a wrapper's final step (copying results back) that runs only on success
    /// and can fail the collective itself.
    pub fn then(
        mut self,
        f: impl FnOnce(Result<(), CommError>) -> Result<(), CommError> + Send + 'static,
    ) -> Work {
        self.then = Some(match self.then.take() {
            Some(first) => Box::new(move |result| f(first(result))),
            None => Box::new(f),
        });
        self
    }

    /// Whether the collective has finished (successfully or not); never blocks.
    pub fn is_done(&mut self) -> bool {
        if let WorkState::Pending(receiver) = &self.state {
            match receiver.try_recv() {
                Ok(result) => self.state = WorkState::Done(Some(result)),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.state = WorkState::Done(Some(Err(lost())))
                }
            }
        }
        true
    }

    /// Blocks until the collective finishes and returns its result.
    pub fn wait(mut self) -> Result<(), CommError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), CommError> {
        let result = match &mut self.state {
            WorkState::Pending(receiver) => receiver.recv().unwrap_or_else(|_| Err(lost())),
            WorkState::Done(result) => result.take().unwrap_or(Ok(())),
        };
        self.state = WorkState::Done(None);
        let result = match self.then.take() {
            Some(then) => then(result),
            None => result,
        };
        if let Some(f) = self.on_complete.take() {
            f();
        }
        result
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn lost() -> CommError {
    CommError::Setup {
        group: "?".into(),
        what: "the communicator's thread stopped before the collective finished".into(),
        help: "an earlier error of this rank says why".into(),
    }
}

/// A process group's collectives on one backend.
pub trait Communicator: Send {
    fn group(&self) -> &Group;

    /// Starts `op` after every op started before it on this communicator and returns at once.
    ///
    /// A backend keeps `op` (and so each buffer's [`Owner`]) until it will never touch the
    /// op's memory again, also when the op fails, times out or is left behind by a watchdog:
    /// memory with an owner cannot be freed under a collective.
    ///
    /// # Safety
    /// Every buffer of `op` without an owner must stay valid until the returned [`Work`] is
    /// waited for or dropped. Nobody else may write the op's buffers (nor read the ones it
    /// writes) until then.
    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError>;
}

/// Blocking collectives on typed slices, for every communicator.
pub trait CommunicatorExt: Communicator {
    /// Runs `op` to completion.
    ///
    /// # Safety
    /// As [`Communicator::start`], for the duration of this call.
    unsafe fn run(&mut self, op: Collective) -> Result<(), CommError> {
        // SAFETY: the caller's contract; we wait before returning.
        unsafe { self.start(op)?.wait() }
    }

    fn all_reduce<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let buf = CommBuf::host(buf);
        // SAFETY: the exclusive borrow outlives the wait inside `run`.
        unsafe { self.run(Collective::AllReduce { buf, op }) }
    }

    /// `input` holds `size` chunks; `output` (one chunk) receives the reduction of chunk
    /// `index` over the group.
    fn reduce_scatter<T: Elem>(
        &mut self,
        input: &mut [T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let (input, output) = (CommBuf::host(input), CommBuf::host(output));
        // SAFETY: both borrows outlive the wait inside `run`.
        unsafe { self.run(Collective::ReduceScatter { input, output, op }) }
    }

    /// Reduce-scatter whose result lands in this member's own chunk of `buf`.
    fn reduce_scatter_in_place<T: Elem>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let input = CommBuf::host(buf);
        let chunk = buf.len() / self.group().size();
        let output = input.slice(self.group().index * chunk, chunk);
        // SAFETY: the exclusive borrow outlives the wait inside `run`.
        unsafe { self.run(Collective::ReduceScatter { input, output, op }) }
    }

    fn all_gather<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        let (input, output) = (CommBuf::host(input), CommBuf::host(output));
        // SAFETY: both borrows outlive the wait inside `run`.
        unsafe { self.run(Collective::AllGather { input, output }) }
    }

    /// All-gather whose input is this member's own chunk of `buf`.
    fn all_gather_in_place<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let output = CommBuf::host(buf);
        let chunk = buf.len() / self.group().size();
        let input = output.slice(self.group().index * chunk, chunk);
        // SAFETY: the exclusive borrow outlives the wait inside `run`.
        unsafe { self.run(Collective::AllGather { input, output }) }
    }

    fn broadcast<T: Elem>(&mut self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let buf = CommBuf::host(buf);
        // SAFETY: the exclusive borrow outlives the wait inside `run`.
        unsafe { self.run(Collective::Broadcast { buf, root }) }
    }

    fn send<T: Elem>(&mut self, buf: &[T], peer: usize) -> Result<(), CommError> {
        let buf = CommBuf::host(buf);
        // SAFETY: the shared borrow outlives the wait inside `run`; send only reads.
        unsafe { self.run(Collective::Send { buf, peer }) }
    }

    fn recv<T: Elem>(&mut self, buf: &mut [T], peer: usize) -> Result<(), CommError> {
        let buf = CommBuf::host(buf);
        // SAFETY: the exclusive borrow outlives the wait inside `run`.
        unsafe { self.run(Collective::Recv { buf, peer }) }
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // SAFETY: no buffers.
        unsafe { self.run(Collective::Barrier) }
    }
}

impl<C: Communicator + ?Sized> CommunicatorExt for C {}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: usize, len: usize, dtype: Dtype, memory: Memory) -> CommBuf {
        CommBuf {
            addr,
            len,
            dtype,
            memory,
            owner: None,
        }
    }

    #[test]
    fn ops_are_validated_against_the_contract_of_every_backend() {
        let group = Group {
            name: "dp 0".into(),
            ranks: vec![0, 1, 2, 3],
            index: 1,
        };
        let check = |op: &Collective| op.validate(&group, "NCCL", Memory::Device);
        let f32s = |addr, len| buf(addr, len, Dtype::F32, Memory::Device);
        let fails = |op: Collective, needle: &str| {
            let error = check(&op).unwrap_err();
            let text = error.to_string();
            assert!(matches!(error, CommError::Invalid { .. }), "{text}");
            assert!(text.contains(needle), "{needle:?} not in {text}");
            assert!(text.contains("this is a bug in tessera"), "{text}");
        };
        let sum = ReduceOp::Sum;
        let host = CommBuf::host(&[0.0f32; 4]);
        fails(
            Collective::AllReduce {
                buf: host.clone(),
                op: sum,
            },
            "a host buffer: the NCCL backend moves device memory only",
        );
        let on_tcp = Collective::AllReduce { buf: host, op: sum };
        on_tcp.validate(&group, "TCP", Memory::Host).unwrap();
        let error = Collective::AllReduce {
            buf: f32s(0x1000, 4),
            op: sum,
        }
        .validate(&group, "TCP", Memory::Host)
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("a device buffer: the TCP backend moves host memory only"),
            "{error}"
        );
        fails(
            Collective::AllReduce {
                buf: f32s(0, 4),
                op: sum,
            },
            "null pointer",
        );
        fails(
            Collective::AllReduce {
                buf: f32s(0x1002, 4),
                op: sum,
            },
            "not aligned for f32",
        );
        let ints = buf(0x1000, 4, Dtype::I32, Memory::Device);
        fails(
            Collective::AllReduce {
                buf: ints.clone(),
                op: sum,
            },
            "cannot reduce i32",
        );
        check(&Collective::Broadcast { buf: ints, root: 3 }).unwrap();
        check(&Collective::AllReduce {
            buf: f32s(0, 0),
            op: sum,
        })
        .unwrap();

        // Reduce-scatter: 4 chunks of 8 floats (32 bytes each) at 0x1000.
        let (input, own) = (f32s(0x1000, 32), f32s(0x1000 + 32, 8));
        let rs = |input: &CommBuf, output| Collective::ReduceScatter {
            input: input.clone(),
            output,
            op: sum,
        };
        check(&rs(&input, own.clone())).unwrap();
        check(&rs(&input, f32s(0x9000, 8))).unwrap();
        fails(rs(&input, f32s(0x1000, 8)), "not member 1's chunk");
        fails(rs(&input, f32s(0x9000, 7)), "not 4 chunks of 7");
        fails(
            rs(&input, buf(0x9000, 8, Dtype::Bf16, Memory::Device)),
            "input is f32, output bf16",
        );

        let ag = |input, output: &CommBuf| Collective::AllGather {
            input,
            output: output.clone(),
        };
        check(&ag(own, &input)).unwrap();
        check(&ag(f32s(0x9000, 8), &input)).unwrap();
        fails(ag(f32s(0x1000 + 64, 8), &input), "not member 1's chunk");
        fails(ag(f32s(0x9000, 8), &f32s(0x1000, 31)), "not 4 chunks of 8");

        let one = f32s(0x1000, 4);
        fails(
            Collective::Broadcast {
                buf: one.clone(),
                root: 4,
            },
            "root 4 of a group of 4",
        );
        fails(
            Collective::Send {
                buf: one.clone(),
                peer: 1,
            },
            "peer 1 is not another member",
        );
        fails(
            Collective::Recv {
                buf: one.clone(),
                peer: 4,
            },
            "peer 4 is not another member",
        );
        check(&Collective::Send {
            buf: one.clone(),
            peer: 0,
        })
        .unwrap();
        check(&Collective::Recv { buf: one, peer: 3 }).unwrap();
        check(&Collective::Barrier).unwrap();
    }
}
