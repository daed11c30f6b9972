//! Device buffers over a host-only backend: [`Staged`] copies an op's device buffers to host
//! memory, runs the op there on the inner communicator (TCP), and copies what the op wrote back
//! to the device when it completes.
//!
//! This is how several worker processes share one GPU: NCCL refuses two ranks of a communicator
//! on one device, so tensor-, pipeline- and data-parallel runs on a single GPU exchange their
//! data through the host instead, and every parallel code path still runs on the CUDA kernels.
//! It is slower than NCCL by two PCIe copies per op; it is for testing and small machines.

use std::sync::Arc;

use super::{Collective, CommBuf, CommError, Communicator, Group, HostMemory, Memory, Owner, Work};

/// Copies between device memory and the host, for [`Staged`].
pub trait DeviceCopy: Send + Sync + 'static {
    /// `dst.len()` bytes from device address `src`.
    fn to_host(&self, dst: &mut [u8], src: usize) -> Result<(), String>;
    /// `src` to device address `dst`.
    fn to_device(&self, dst: usize, src: &[u8]) -> Result<(), String>;
}

/// See the module docs.
pub struct Staged {
    inner: Box<dyn Communicator>,
    device: Arc<dyn DeviceCopy>,
}

impl Staged {
    pub fn new(inner: Box<dyn Communicator>, device: Arc<dyn DeviceCopy>) -> Staged {
        Staged { inner, device }
    }
}

/// One staged range: `memory` on the host stands for device range `[addr, addr + len)`. The
/// inner op's buffers own shares of it, so it lives as long as the inner op may touch it.
struct Stage {
    addr: usize,
    len: usize,
    memory: Arc<HostMemory>,
}

impl Stage {
    /// The host buffer that stands for device buffer `buf` (inside this stage).
    fn host(&self, buf: &CommBuf) -> CommBuf {
        CommBuf {
            addr: self.memory.ptr() as usize + (buf.addr - self.addr),
            memory: Memory::Host,
            owner: Some(Owner::new(self.memory.clone())),
            ..buf.clone()
        }
    }

    fn contains(&self, buf: &CommBuf) -> bool {
        buf.addr >= self.addr && buf.addr + buf.bytes() <= self.addr + self.len
    }

    /// The staged bytes of device buffer `buf` (inside this stage).
    ///
    /// # Safety
    /// No collective writes the stage meanwhile (the inner op has finished).
    unsafe fn bytes_of(&self, buf: &CommBuf) -> &[u8] {
        // SAFETY: inside the stage's memory (`contains`), which `self` keeps; not written
        // meanwhile (the caller).
        unsafe {
            std::slice::from_raw_parts(self.memory.ptr().add(buf.addr - self.addr), buf.bytes())
        }
    }
}

/// The buffers an op writes (they are copied back to the device when it completes).
fn written(op: &Collective) -> Vec<CommBuf> {
    match op {
        Collective::AllReduce { buf, .. }
        | Collective::Broadcast { buf, .. }
        | Collective::Recv { buf, .. } => vec![buf.clone()],
        Collective::ReduceScatter { output, .. } | Collective::AllGather { output, .. } => {
            vec![output.clone()]
        }
        Collective::Send { .. } | Collective::Barrier => Vec::new(),
    }
}

/// `op` with each device buffer replaced by its stand-in in `stages`.
fn on_host(op: &Collective, stages: &[Stage]) -> Collective {
    let map = |buf: &CommBuf| match buf.memory {
        Memory::Host => buf.clone(),
        Memory::Device => stages
            .iter()
            .find(|s| s.contains(buf))
            .expect("invariant: every device buffer is staged")
            .host(buf),
    };
    match op {
        Collective::AllReduce { buf, op } => Collective::AllReduce {
            buf: map(buf),
            op: *op,
        },
        Collective::ReduceScatter { input, output, op } => Collective::ReduceScatter {
            input: map(input),
            output: map(output),
            op: *op,
        },
        Collective::AllGather { input, output } => Collective::AllGather {
            input: map(input),
            output: map(output),
        },
        Collective::Broadcast { buf, root } => Collective::Broadcast {
            buf: map(buf),
            root: *root,
        },
        Collective::Send { buf, peer } => Collective::Send {
            buf: map(buf),
            peer: *peer,
        },
        Collective::Recv { buf, peer } => Collective::Recv {
            buf: map(buf),
            peer: *peer,
        },
        Collective::Barrier => Collective::Barrier,
    }
}

/// The device ranges to stage: overlapping buffers (an in-place all-gather's input inside its
/// output) share one range, so the op sees the same aliasing on the host.
fn ranges(op: &Collective) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = op
        .buffers()
        .into_iter()
        .filter(|b| b.memory == Memory::Device && b.len > 0)
        .map(|b| (b.addr, b.addr + b.bytes()))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

impl Communicator for Staged {
    fn group(&self) -> &Group {
        self.inner.group()
    }

    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
        let failed = |what: String| CommError::Collective {
            group: self.inner.group().name.clone(),
            op: op.name(),
            seq: 0,
            silent: Vec::new(),
            waited: Default::default(),
            cause: what,
        };
        let mut stages = Vec::new();
        for (start, end) in ranges(&op) {
            let memory = HostMemory::new(end - start).map_err(|e| {
                failed(format!(
                    "cannot allocate {} bytes of host memory to stage the collective: {e}",
                    end - start
                ))
            })?;
            // SAFETY: fresh memory of at least `end - start` bytes that nobody else sees yet.
            let bytes = unsafe { std::slice::from_raw_parts_mut(memory.ptr(), end - start) };
            self.device
                .to_host(bytes, start)
                .map_err(|e| failed(format!("copying to the host for the collective: {e}")))?;
            stages.push(Stage {
                addr: start,
                len: end - start,
                memory: Arc::new(memory),
            });
        }
        if stages.is_empty() {
            // SAFETY: the caller's contract, unchanged.
            return unsafe { self.inner.start(op) };
        }
        let host_op = on_host(&op, &stages);
        // SAFETY: the stand-ins' memory is owned by their buffers (and by `stages`, which the
        // completion below keeps); nobody else touches it.
        let work = unsafe { self.inner.start(host_op) }?;
        let device = self.device.clone();
        let copy_back = written(&op);
        let (group, name) = (self.inner.group().name.clone(), op.name());
        // The results go back only when the op succeeded; a failed copy fails the op.
        Ok(work.then(move |result| {
            result?;
            for buf in copy_back.iter().filter(|b| b.memory == Memory::Device) {
                let Some(stage) = stages.iter().find(|s| s.contains(buf)) else {
                    continue;
                };
                // SAFETY: the inner op has finished (`then` runs after it).
                let bytes = unsafe { stage.bytes_of(buf) };
                device
                    .to_device(buf.addr, bytes)
                    .map_err(|e| CommError::Collective {
                        group: group.clone(),
                        op: name,
                        seq: 0,
                        silent: Vec::new(),
                        waited: Default::default(),
                        cause: format!("copying the result back to the GPU: {e}"),
                    })?;
            }
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::comm::ReduceOp;
    use crate::comm::solo::Solo;

    /// A summing all-reduce of `buf` through `staged`, waited for. The caller keeps `buf`'s
    /// memory alive.
    fn all_reduce(staged: &mut Staged, buf: CommBuf) -> Result<(), CommError> {
        // SAFETY: the caller's `buf` outlives the wait, which ends the op.
        unsafe {
            staged.start(Collective::AllReduce {
                buf,
                op: ReduceOp::Sum,
            })
        }?
        .wait()
    }

    /// A "device" that is host memory: device addresses are host addresses, and every copy
    /// is logged.
    #[derive(Default)]
    struct HostDevice {
        log: Mutex<Vec<String>>,
    }

    impl DeviceCopy for HostDevice {
        fn to_host(&self, dst: &mut [u8], src: usize) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("down {}", dst.len()));
            // SAFETY: the tests pass addresses of live buffers of that length.
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src as *const u8, dst.len()) });
            Ok(())
        }

        fn to_device(&self, dst: usize, src: &[u8]) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("up {}", src.len()));
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
            Ok(())
        }
    }

    fn device_buf(values: &[f32]) -> CommBuf {
        CommBuf {
            memory: Memory::Device,
            ..CommBuf::host(values)
        }
    }

    /// A communicator of two members where this one sends or receives nothing but records the
    /// host buffers it was given: enough to see what staging hands the inner backend.
    struct Recorder {
        group: Group,
        seen: Arc<Mutex<Vec<Collective>>>,
    }

    impl Communicator for Recorder {
        fn group(&self) -> &Group {
            &self.group
        }

        unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
            // Doubles every f32 it is given, as a reduction of two equal members would.
            for buf in written(&op) {
                assert_eq!(
                    buf.memory,
                    Memory::Host,
                    "the inner backend sees host memory"
                );
                // SAFETY: staged host buffers of `len` f32s.
                let values =
                    unsafe { std::slice::from_raw_parts_mut(buf.addr as *mut f32, buf.len) };
                values.iter_mut().for_each(|v| *v *= 2.0);
            }
            self.seen.lock().unwrap().push(op);
            Ok(Work::done(Ok(())))
        }
    }

    #[test]
    fn an_all_reduce_of_device_memory_is_copied_down_run_on_the_host_and_copied_back() {
        let device = Arc::new(HostDevice::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let inner = Recorder {
            group: Group {
                name: "dp 0".into(),
                ranks: vec![0, 1],
                index: 0,
            },
            seen: seen.clone(),
        };
        let mut staged = Staged::new(Box::new(inner), device.clone());
        let values = vec![1.0f32, 2.0, 3.0];
        let buf = device_buf(&values);
        all_reduce(&mut staged, buf.clone()).unwrap();
        assert_eq!(values, [2.0, 4.0, 6.0], "the result reached the device");
        assert_eq!(*device.log.lock().unwrap(), ["down 12", "up 12"]);
        let seen = seen.lock().unwrap();
        let Collective::AllReduce { buf: host, .. } = &seen[0] else {
            panic!("{seen:?}")
        };
        assert_eq!(host.memory, Memory::Host);
        assert_ne!(host.addr, buf.addr, "the inner op ran on a host copy");
    }

    #[test]
    fn an_in_place_all_gather_keeps_its_aliasing_on_the_host() {
        let device = Arc::new(HostDevice::default());
        let mut staged = Staged::new(Box::new(Solo::new(Group::solo("tp 0", 0))), device.clone());
        let values = vec![5.0f32, 6.0];
        let output = device_buf(&values);
        let input = output.slice(0, 2);
        // SAFETY: `values` outlives the wait.
        unsafe { staged.start(Collective::AllGather { input, output }) }
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(values, [5.0, 6.0]);
        assert_eq!(
            *device.log.lock().unwrap(),
            ["down 8", "up 8"],
            "one staged range for the overlapping input and output"
        );
    }

    #[test]
    fn a_send_copies_nothing_back_and_host_buffers_are_not_staged() {
        let device = Arc::new(HostDevice::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let inner = Recorder {
            group: Group {
                name: "pp 0".into(),
                ranks: vec![0, 1],
                index: 0,
            },
            seen,
        };
        let mut staged = Staged::new(Box::new(inner), device.clone());
        let values = vec![1.0f32; 4];
        // SAFETY: `values` outlives the waits.
        unsafe {
            staged
                .start(Collective::Send {
                    buf: device_buf(&values),
                    peer: 1,
                })
                .unwrap()
                .wait()
                .unwrap();
            staged
                .start(Collective::Send {
                    buf: CommBuf::host(&values),
                    peer: 1,
                })
                .unwrap()
                .wait()
                .unwrap();
        }
        assert_eq!(*device.log.lock().unwrap(), ["down 16"]);
    }

    #[test]
    fn a_failed_op_copies_nothing_back_and_a_failed_copy_fails_the_op() {
        struct Failing(Group);
        impl Communicator for Failing {
            fn group(&self) -> &Group {
                &self.0
            }
            unsafe fn start(&mut self, _: Collective) -> Result<Work, CommError> {
                Ok(Work::done(Err(CommError::Setup {
                    group: "dp 0".into(),
                    what: "peer gone".into(),
                    help: String::new(),
                })))
            }
        }
        let device = Arc::new(HostDevice::default());
        let group = Group::solo("dp 0", 0);
        let mut staged = Staged::new(Box::new(Failing(group)), device.clone());
        let values = vec![1.0f32; 2];
        let buf = device_buf(&values);
        let error = all_reduce(&mut staged, buf.clone()).unwrap_err();
        assert!(error.to_string().contains("peer gone"), "{error}");
        assert_eq!(
            *device.log.lock().unwrap(),
            ["down 8"],
            "nothing copied back"
        );

        struct Broken;
        impl DeviceCopy for Broken {
            fn to_host(&self, dst: &mut [u8], _: usize) -> Result<(), String> {
                dst.fill(0);
                Ok(())
            }
            fn to_device(&self, _: usize, _: &[u8]) -> Result<(), String> {
                Err("CUDA_ERROR_ILLEGAL_ADDRESS".into())
            }
        }
        let mut staged = Staged::new(
            Box::new(Solo::new(Group::solo("tp 0", 0))),
            Arc::new(Broken),
        );
        let error = all_reduce(&mut staged, buf).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("copying the result back to the GPU: CUDA_ERROR_ILLEGAL_ADDRESS"),
            "{error}"
        );
    }

    #[test]
    fn completions_run_in_the_order_they_were_added() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (order.clone(), order.clone());
        Work::done(Ok(()))
            .on_complete(move || a.lock().unwrap().push("copy back"))
            .on_complete(move || b.lock().unwrap().push("trace"))
            .wait()
            .unwrap();
        assert_eq!(*order.lock().unwrap(), ["copy back", "trace"]);
    }
}
