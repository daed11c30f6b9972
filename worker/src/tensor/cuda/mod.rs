//! The CUDA backend: the device arena is one `cuMemAlloc` sized by the memory plan, matrix
//! products go through cuBLASLt ([`blas`]), every other op is a kernel of ours compiled with
//! NVRTC ([`compile`], sources in `kernels/`).
//!
//! - Kernels run in order on one stream and return at once; whatever leaves the device (a read,
//!   a collective, a gradient norm) first waits for the stream, so callers see the same
//!   sequential semantics as on the CPU backend.
//! - The host arena (offloaded optimizer states) is page-locked memory; ops whose tensors all
//!   live there run on the CPU kernels through a [`CpuBackend`] lent that memory, so the
//!   optimizer's host path is the CPU backend's code, not a copy of it.
//! - Nothing panics on a machine without CUDA: [`CudaBackend::new`] checks that the driver and
//!   each library load before cudarc's first call (whose loader would panic) and says what was
//!   tried and how to fix it.

pub mod blas;
pub mod compile;
mod llama;
mod nvml;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, result, sys as driver,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};
use tessera_plan::memory::{Dtype, Place};

use self::blas::{Blas, Gemm};
use crate::comm::staged::DeviceCopy;
use crate::comm::{CommBuf, Memory, Owner};
use crate::error::{Error, Result};
use crate::tensor::check::{self, Checks};
use crate::tensor::cpu::CpuBackend;
use crate::tensor::{AdamW, Backend, Dims, Elem, Linear, Tensor};

/// Head sizes the attention kernels are built for (each thread holds a quarter of a row in
/// registers, so the size is a compile-time constant of each variant).
pub const HEAD_SIZES: [usize; 5] = [32, 64, 80, 96, 128];

/// Threads per block of the element-wise kernels, and the most blocks they launch (they loop).
const ELEMENTWISE_BLOCK: u32 = 256;
const ELEMENTWISE_GRID: u64 = 65535 * 8;

/// Query or key rows per attention block.
const ATTENTION_TILE: usize = 64;

const DRIVER_HELP: &str = "run on a machine with an NVIDIA GPU and its driver (CUDA 13 needs \
    driver 580 or newer; libcuda.so.1 comes with the driver), or train on CPU ranks with \
    cluster.device: cpu and cluster.backend: tcp";

const FAILED_HELP: &str = "a CUDA error stops the rank; the lines before this one may say why \
    (out of memory, another process on the GPU, a bad kernel launch)";

pub(crate) fn cuda_error(what: &str, e: DriverError) -> Error {
    Error::Cuda {
        what: format!("{what} failed: {e:?}"),
        help: FAILED_HELP.into(),
    }
}

/// Whether libcuda (the driver) loads.
pub fn driver_present() -> bool {
    // SAFETY: dlopens and dlcloses candidate names; calls nothing in the library.
    unsafe { driver::is_culib_present() }
}

/// Opens device `ordinal`'s primary context, or says why not (no driver, no such device).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::Cuda {
            what: format!("this rank wants GPU {ordinal}, but the driver sees {count}"),
            help: "check CUDA_VISIBLE_DEVICES and cluster.gpus_per_node".into(),
        });
    }
    match catch_unwind(|| CudaContext::new(ordinal)) {
        Ok(context) => context.map_err(|e| cuda_error("creating the CUDA context", e)),
        Err(_) => Err(driver_panicked()),
    }
}

/// cudarc panicked inside the driver: the library loaded but lacks a symbol it calls.
fn driver_panicked() -> Error {
    Error::Cuda {
        what: "loading the CUDA driver failed (a symbol is missing: a driver older than CUDA 13?)"
            .into(),
        help: DRIVER_HELP.into(),
    }
}

/// Copies between GPU `ordinal` and the host on its primary context (the one the backend
/// and NCCL use), for the host-staged communicator.
pub struct CudaCopy(Arc<CudaContext>);

impl CudaCopy {
    pub fn new(ordinal: usize) -> Result<CudaCopy> {
        Ok(CudaCopy(open_device(ordinal)?))
    }
}

impl DeviceCopy for CudaCopy {
    fn to_host(&self, dst: &mut [u8], src: usize) -> std::result::Result<(), String> {
        self.0.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: the collective's caller guarantees `src` has `dst.len()` bytes.
        unsafe { result::memcpy_dtoh_sync(dst, src as u64) }.map_err(|e| format!("{e:?}"))
    }

    fn to_device(&self, dst: usize, src: &[u8]) -> std::result::Result<(), String> {
        self.0.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: as above, for `dst`.
        unsafe { result::memcpy_htod_sync(dst as u64, src) }.map_err(|e| format!("{e:?}"))?;
        // From pageable memory the copy returns once staged, not landed, and the backend's
        // stream does not wait for the default stream: wait here, before any kernel reads it.
        result::ctx::synchronize().map_err(|e| format!("{e:?}"))
    }
}

/// The GPUs the driver shows this process, without creating a context (which would take
/// memory on GPU 0 from whichever rank runs there).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::Cuda {
            what: format!(
                "cluster.device is cuda, but the CUDA driver library could not be loaded; \
                 tried {}",
                cudarc::get_lib_name_candidates("cuda").join(", ")
            ),
            help: DRIVER_HELP.into(),
        });
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(count)) if count > 0 => Ok(count as usize),
        Ok(Ok(_)) => Err(Error::Cuda {
            what: "the CUDA driver loaded but sees no GPU".into(),
            help: "check CUDA_VISIBLE_DEVICES and nvidia-smi".into(),
        }),
        Ok(Err(e)) => Err(Error::Cuda {
            what: format!("the CUDA driver loaded but found no usable GPU: {e:?}"),
            help: DRIVER_HELP.into(),
        }),
        Err(_) => Err(driver_panicked()),
    }
}

/// The GPUs the driver shows this process, in ordinal order, each with its free memory as
/// NVML says (`None` where it cannot). Empty without a driver or a GPU. No context is made: a
/// node agent asks before its workers start, and a context would take memory from one of them.
pub fn visible_gpus() -> Vec<Option<u64>> {
    let Ok(count) = device_count() else {
        return Vec::new();
    };
    (0..count)
        .map(|ordinal| {
            catch_unwind(|| pci_bus_id(ordinal))
                .ok()?
                .ok()
                .and_then(|pci| nvml::free_bytes(&pci))
        })
        .collect()
}

/// `0000:1b:00.0`: GPU `ordinal`'s PCI address, the name NVML knows it by.
fn pci_bus_id(ordinal: usize) -> Result<String> {
    use driver::CUdevice_attribute as A;
    let failed = |e| cuda_error("reading the GPU's PCI address", e);
    let device = result::device::get(ordinal as i32).map_err(failed)?;
    // SAFETY: a device handle the driver just gave, and attributes every device has.
    let attribute = |a| unsafe { result::device::get_attribute(device, a) }.map_err(failed);
    Ok(format!(
        "{:04x}:{:02x}:{:02x}.0",
        attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
        attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
    ))
}

/// `sm_XY` of GPU `ordinal`: the architecture its kernels are compiled for.
pub fn device_arch(ordinal: usize) -> Result<String> {
    arch_of(&*open_device(ordinal)?)
}

fn arch_of(ctx: &CudaContext) -> Result<String> {
    use driver::CUdevice_attribute as A;
    let attribute = |a| {
        ctx.attribute(a)
            .map_err(|e| cuda_error("reading the compute capability", e))
    };
    Ok(format!(
        "sm_{}{}",
        attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?
    ))
}

/// One device allocation, zeroed, freed when dropped. It holds its context, and binds it to
/// the dropping thread before the free: the last share of an arena (see [`Owner`]) may go on a
/// communicator's thread after the backend is gone.
pub(crate) struct DeviceMemory {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceMemory {
    /// Allocates on `ctx`, which must be bound to this thread.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceMemory> {
        let ctx = ctx.clone();
        if bytes == 0 {
            return Ok(DeviceMemory { ptr: 0, bytes, ctx });
        }
        // SAFETY: a plain allocation on the current context; zeroed before use.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| Error::Allocation {
            place: "device",
            bytes: bytes as u64,
            reason: format!("{e:?}"),
        })?;
        let memory = DeviceMemory { ptr, bytes, ctx };
        // SAFETY: `ptr` has `bytes` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }
            .map_err(|e| cuda_error("zeroing device memory", e))?;
        // The memset may still run on the default stream, which the backend's stream does not
        // wait for: finish it before the first write.
        result::ctx::synchronize().map_err(|e| cuda_error("zeroing device memory", e))?;
        Ok(memory)
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `new` in this context, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory, zeroed, freed when dropped: copies to and from it run at full
/// PCIe speed, and kernels can read it directly (it is mapped into the device's address space).
struct PinnedMemory {
    ptr: *mut u8,
    bytes: usize,
    /// The address kernels use for it (the host's under unified addressing).
    device_ptr: u64,
    /// Bound before the free, as for [`DeviceMemory`].
    ctx: Arc<CudaContext>,
}

// SAFETY: plain page-locked host memory reached only through raw pointers; who may touch which
// bytes when is the business of the backend and the collectives' contract. This owner only
// frees it.
unsafe impl Send for PinnedMemory {}
unsafe impl Sync for PinnedMemory {}

impl PinnedMemory {
    /// Allocates for `ctx`, which must be bound to this thread.
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<PinnedMemory> {
        let ctx = ctx.clone();
        if bytes == 0 {
            return Ok(PinnedMemory {
                ptr: std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8,
                bytes,
                device_ptr: 0,
                ctx,
            });
        }
        let flags = driver::CU_MEMHOSTALLOC_PORTABLE | driver::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain allocation; zeroed below before anyone reads it.
        let ptr = unsafe { result::malloc_host(bytes, flags) }.map_err(|e| Error::Allocation {
            place: "host (page-locked)",
            bytes: bytes as u64,
            reason: format!("{e:?}"),
        })? as *mut u8;
        // SAFETY: `ptr` has `bytes` writable bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        let mut memory = PinnedMemory {
            ptr,
            bytes,
            device_ptr: 0,
            ctx,
        };
        // SAFETY: `ptr` was allocated with DEVICEMAP; `device_ptr` is a valid place for the
        // result.
        unsafe {
            driver::cuMemHostGetDevicePointer_v2(&mut memory.device_ptr, ptr as *mut c_void, 0)
                .result()
        }
        .map_err(|e| cuda_error("mapping page-locked memory", e))?;
        Ok(memory)
    }
}

impl Drop for PinnedMemory {
    fn drop(&mut self) {
        if self.bytes > 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `new`, freed once.
            let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// One kernel argument: device pointers and 64-bit counts as `u64`/`i64`, sizes as `i32`.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Threads and shared memory of one launch.
#[derive(Debug, Clone, Copy)]
struct Launch {
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
}

impl Launch {
    /// The element-wise launch over `n` elements (the kernels loop over the rest).
    fn elementwise(n: usize) -> Launch {
        let blocks = (n as u64)
            .div_ceil(ELEMENTWISE_BLOCK as u64)
            .clamp(1, ELEMENTWISE_GRID);
        Launch {
            grid: (blocks as u32, 1, 1),
            block: (ELEMENTWISE_BLOCK, 1, 1),
            shared: 0,
        }
    }

    /// One block of `threads` per row.
    fn rows(rows: usize, threads: u32) -> Launch {
        Launch {
            grid: (rows as u32, 1, 1),
            block: (threads, 1, 1),
            shared: 0,
        }
    }

    /// Blocks of (32 columns, 16 row groups): column sums over rows.
    fn columns(cols: usize) -> Launch {
        Launch {
            grid: (cols.div_ceil(32) as u32, 1, 1),
            block: (32, 16, 1),
            shared: 0,
        }
    }

    /// One block per 64 rows of one of `heads` heads (query heads, or key/value heads in the
    /// dk/dv pass) of one sequence.
    fn attention(d: Dims, heads: usize, shared: u32) -> Launch {
        Launch {
            grid: (
                d.t.div_ceil(ATTENTION_TILE) as u32,
                heads as u32,
                d.b as u32,
            ),
            block: (256, 1, 1),
            shared,
        }
    }
}

/// The suffix of a kernel's name for a storage dtype.
fn suffix(dtype: Dtype) -> &'static str {
    dtype.name()
}

/// The CUDA backend of one rank. See the module docs.
///
/// Fields drop in order: everything allocated in the context goes before the stream and the
/// context themselves, which are last.
pub struct CudaBackend {
    /// `sm_XY` of the device, the architecture kernels are compiled for.
    arch: String,
    /// The arenas, shared with the collectives in flight on them (see [`Owner`]).
    device: Arc<DeviceMemory>,
    host: Arc<PinnedMemory>,
    /// Runs the ops whose tensors live in the host arena (handles re-placed on its "device").
    host_ops: CpuBackend,
    modules: Vec<Arc<CudaModule>>,
    /// Kernels by base name and storage dtype, looked up once each.
    functions: HashMap<(&'static str, Dtype), CudaFunction>,
    blas: Blas,
    /// The sorted token rows of the embedding backward (see `embedding_bwd`).
    segments: PinnedMemory,
    /// The first failure of a call that cannot return one (`comm_buf`), returned by the next.
    poisoned: RefCell<Option<String>>,
    /// Dense bf16 peak of this GPU, for MFU (see [`peak_flops`]).
    peak_flops: Option<f64>,
    /// `domain:bus:device.0`, how NVML names this GPU.
    pci_bus_id: String,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// Dense bf16 tensor-core peak FLOP/s of the GPU called `name`, as NVIDIA's data sheets give
/// it; `TESSERA_PEAK_TFLOPS` overrides it (and names it for GPUs not listed).
pub fn peak_flops(name: &str) -> Option<f64> {
    if let Some(tflops) = std::env::var("TESSERA_PEAK_TFLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return Some(tflops * 1e12);
    }
    let tflops = match name {
        n if n.contains("H100") && n.contains("PCIe") => 756.0,
        n if n.contains("H100 NVL") => 835.0,
        n if n.contains("H100") || n.contains("H200") => 989.0,
        n if n.contains("A100") => 312.0,
        n if n.contains("L40S") => 362.0,
        _ => return None,
    };
    Some(tflops * 1e12)
}

impl CudaBackend {
    /// Opens GPU `ordinal`, allocates the device arena of `device_bytes` and the page-locked
    /// host arena of `host_bytes`, creates cuBLASLt's handle and loads every kernel (compiled
    /// for this GPU, from `cache` when it has them).
    pub fn new(
        ordinal: usize,
        device_bytes: usize,
        host_bytes: usize,
        cache: Option<&Path>,
    ) -> Result<CudaBackend> {
        let ctx = open_device(ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("binding the CUDA context", e))?;
        let arch = arch_of(&ctx)?;
        let name = ctx
            .name()
            .map_err(|e| cuda_error("reading the GPU's name", e))?;
        let pci_bus_id = pci_bus_id(ordinal)?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("creating a stream", e))?;
        let device = Arc::new(DeviceMemory::new(&ctx, device_bytes)?);
        let host = Arc::new(PinnedMemory::new(&ctx, host_bytes)?);
        // SAFETY: the host arena is page-locked memory of `host_bytes`, 8-byte aligned (page
        // aligned), kept by its owner, used only through `host_ops` while this backend lives.
        let host_ops = unsafe { CpuBackend::over(host.ptr, host.bytes, Owner::new(host.clone())) };
        let blas = Blas::new(stream.clone())?;
        let mut modules = Vec::new();
        for source in compile::SOURCES {
            let cubin = compile::cubin(source, &arch, cache)?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin.bytes))
                .map_err(|e| cuda_error(&format!("loading kernels {}.cu", source.name), e))?;
            modules.push(module);
        }
        let segments = PinnedMemory::new(&ctx, 0)?;
        Ok(CudaBackend {
            ctx,
            stream,
            arch,
            device,
            host,
            host_ops,
            modules,
            functions: HashMap::new(),
            blas,
            segments,
            poisoned: RefCell::new(None),
            peak_flops: peak_flops(&name),
            pci_bus_id,
        })
    }

    /// The architecture the kernels were compiled for (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Device memory in use on the whole GPU (`total - free`), for the plan check.
    pub fn device_used_bytes(&self) -> Result<usize> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the CUDA context", e))?;
        let (free, total) = result::mem_get_info().map_err(|e| cuda_error("cuMemGetInfo", e))?;
        Ok(total - free)
    }

    /// Waits for every kernel queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.check_poison()?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("waiting for the GPU", e))
    }

    fn check_poison(&self) -> Result<()> {
        match &*self.poisoned.borrow() {
            Some(what) => Err(Error::Cuda {
                what: what.clone(),
                help: FAILED_HELP.into(),
            }),
            None => Ok(()),
        }
    }

    fn checks(&self) -> Checks {
        Checks {
            device: self.device.bytes,
            host: self.host.bytes,
        }
    }

    /// A device tensor's address.
    fn ptr(&self, t: Tensor) -> u64 {
        debug_assert_eq!(t.place, Place::Device);
        self.device.ptr + t.offset as u64
    }

    fn opt_ptr(&self, t: Option<Tensor>) -> u64 {
        t.map_or(0, |t| self.ptr(t))
    }

    /// Whether the op runs on the host arena: every tensor is there. Mixed places are a bug of
    /// the caller (ops never move data between arenas, except `copy`).
    fn on_host(&self, op: &'static str, tensors: &[Tensor]) -> Result<bool> {
        let host = tensors.iter().filter(|t| t.place == Place::Host).count();
        if host > 0 && host < tensors.len() {
            return Err(Error::Unsupported {
                what: format!("{op}: some tensors are in the host arena and some on the GPU"),
                help: "this is a bug in tessera; please report it with your config".into(),
            });
        }
        Ok(host > 0)
    }

    /// Launches kernel `<base>_<dtype>`, found once and kept (no name is built per launch).
    fn launch(
        &mut self,
        base: &'static str,
        dtype: Dtype,
        launch: Launch,
        args: &[Arg],
    ) -> Result<()> {
        if launch.grid.0 == 0 || launch.grid.1 == 0 || launch.grid.2 == 0 {
            return Ok(());
        }
        if !self.functions.contains_key(&(base, dtype)) {
            let function = self.find(base, dtype)?;
            self.functions.insert((base, dtype), function);
        }
        let function = &self.functions[&(base, dtype)];
        // Each argument's bytes sit at the start of one slot (little-endian), where the
        // kernel reads its 4 or 8 bytes; the driver copies them at launch.
        let mut slots = [0u64; 16];
        assert!(
            args.len() <= slots.len(),
            "invariant: at most 16 kernel arguments"
        );
        for (slot, arg) in slots.iter_mut().zip(args) {
            *slot = match *arg {
                Arg::Ptr(p) => p,
                Arg::I64(v) => v as u64,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            };
        }
        let mut params: [*mut c_void; 16] = [std::ptr::null_mut(); 16];
        for (param, slot) in params.iter_mut().zip(slots.iter_mut()) {
            *param = slot as *mut u64 as *mut c_void;
        }
        // SAFETY: the kernel's signature is the one `kernels/` declares for `name`, and the
        // arguments were built for it by the caller from checked handles.
        unsafe {
            result::launch_kernel(
                function.cu_function(),
                launch.grid,
                launch.block,
                launch.shared,
                self.stream.cu_stream(),
                &mut params[..args.len()],
            )
        }
        .map_err(|e| cuda_error(&format!("launching kernel {base}_{}", suffix(dtype)), e))
    }

    /// The kernel called `name` in whichever module has it; raises its dynamic shared memory
    /// limit for the attention kernels.
    fn find(&self, base: &'static str, dtype: Dtype) -> Result<CudaFunction> {
        let name = format!("{base}_{}", suffix(dtype));
        for module in &self.modules {
            if let Ok(function) = module.load_function(&name) {
                let largest = Self::attention_shared(base, HEAD_SIZES[HEAD_SIZES.len() - 1]);
                // Above 48 KiB a kernel must ask for its dynamic shared memory.
                if base.starts_with("attention_") && largest > 48 << 10 {
                    function
                        .set_attribute(
                            driver::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            largest as i32,
                        )
                        .map_err(|e| cuda_error(&format!("raising {name}'s shared memory"), e))?;
                }
                return Ok(function);
            }
        }
        Err(Error::Cuda {
            what: format!("no kernel named {name} in the compiled sources"),
            help: "this is a bug in tessera; please report it".into(),
        })
    }

    /// Launches `base_<dtype>` element-wise over `n` elements.
    fn elementwise(
        &mut self,
        base: &'static str,
        dtype: Dtype,
        n: usize,
        args: &[Arg],
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(base, dtype, Launch::elementwise(n), args)
    }

    /// A host-arena handle as the CPU executor sees it.
    fn hosted(t: Tensor) -> Tensor {
        Tensor {
            place: Place::Device,
            ..t
        }
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `dst` has `src.len()` bytes (checked handle); we wait before `src` goes.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_error("copying to the GPU", e))?;
        self.synchronize()
    }

    fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.check_poison()?;
        // SAFETY: `src` has `dst.len()` bytes (checked handle); we wait before returning.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_error("copying from the GPU", e))?;
        self.synchronize()
    }

    /// A host-arena tensor's bytes.
    ///
    /// # Safety
    /// `t` is a checked host handle and nothing else writes it meanwhile.
    unsafe fn host_bytes(&self, t: Tensor) -> &[u8] {
        // SAFETY: in bounds (checked); the caller's contract.
        unsafe { std::slice::from_raw_parts(self.host.ptr.add(t.offset), t.bytes()) }
    }

    /// # Safety
    /// As [`Self::host_bytes`], and no other slice of `t` is live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn host_bytes_mut(&self, t: Tensor) -> &mut [u8] {
        // SAFETY: in bounds (checked); the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.host.ptr.add(t.offset), t.bytes()) }
    }

    /// Token ids of a device i32 tensor, copied to the host and checked to be below `limit`.
    fn tokens(&self, op: &'static str, t: Tensor, limit: usize) -> Result<Vec<i32>> {
        let mut bytes = vec![0u8; t.bytes()];
        self.copy_dtoh(&mut bytes, self.ptr(t))?;
        let ids: Vec<i32> = bytemuck::pod_collect_to_vec(&bytes);
        if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= limit) {
            return Err(Error::Unsupported {
                what: format!("{op}: token id {bad} is outside the vocabulary of {limit}"),
                help: "check that data tokens are below model.vocab".into(),
            });
        }
        Ok(ids)
    }

    /// Shared memory of an attention kernel, as the `// SHARED` line in its source says: two
    /// 64-row f32 tiles (K and V, or Q and dO), plus the queries' lse and delta for dK/dV.
    fn attention_shared(kernel: &str, hs: usize) -> u32 {
        let tiles = 2 * ATTENTION_TILE * hs * 4;
        let extra = match kernel {
            "attention_bwd_dkv" => 2 * ATTENTION_TILE * 4,
            _ => 0,
        };
        (tiles + extra) as u32
    }
}

/// Fails (before anything is allocated) when the CUDA kernels cannot run `config`: its head
/// size has no attention variant, or a microbatch has more rows or a tensor row more columns
/// than the kernels' 32-bit size arguments hold (their indexing itself is 64-bit).
pub fn check_config(config: &tessera_plan::Config) -> Result<()> {
    let model = &config.model;
    let rows = config.training.micro_batch * model.seq_len;
    let vocab = tessera_plan::model::ModelShape::new(model, config.parallel.tensor).vocab_padded;
    let qkv = (model.heads + 2 * model.kv_heads) * model.head_dim;
    let widest = [qkv, 2 * model.ffn_hidden, vocab]
        .into_iter()
        .max()
        .unwrap_or(0);
    if rows.max(widest) > i32::MAX as usize {
        return Err(Error::Unsupported {
            what: format!(
                "a microbatch of {rows} tokens with rows up to {widest} wide is beyond the CUDA \
                 kernels' 32-bit sizes"
            ),
            help: "lower training.micro_batch or model.seq_len".into(),
        });
    }
    let hs = model.head_dim;
    if HEAD_SIZES.contains(&hs) {
        return Ok(());
    }
    let fits: Vec<String> = HEAD_SIZES
        .iter()
        .filter(|&&size| model.hidden.is_multiple_of(size))
        .map(|&size| format!("heads: {}", model.hidden / size))
        .collect();
    Err(Error::Unsupported {
        what: format!(
            "model.head_dim (by default hidden {} / heads {}) is head size {hs}, but the CUDA \
             attention kernels are built for head sizes {HEAD_SIZES:?}",
            model.hidden, model.heads
        ),
        help: if fits.is_empty() {
            "set model.head_dim, or choose model.hidden and model.heads so that hidden / heads \
             is one of them, or train on CPU workers (cluster.device: cpu)"
                .into()
        } else {
            format!(
                "for hidden {} use {}, or train on CPU workers (cluster.device: cpu)",
                model.hidden,
                fits.join(" or ")
            )
        },
    })
}

/// Fails unless the attention kernels have a variant for this head size.
fn head_size(op: &'static str, dims: Dims) -> Result<()> {
    check::head_size(op, dims, HEAD_SIZES[HEAD_SIZES.len() - 1], "CUDA")?;
    if !HEAD_SIZES.contains(&dims.hs) {
        return Err(Error::Unsupported {
            what: format!(
                "{op}: the CUDA attention kernels are built for head sizes {HEAD_SIZES:?}, and \
                 this model's is {}",
                dims.hs
            ),
            help: "choose model.heads so that hidden / heads is one of them".into(),
        });
    }
    Ok(())
}

/// Converts f32 values to the bytes of `dtype`.
fn encode(dtype: Dtype, src: &[f32]) -> Result<Vec<u8>> {
    fn to<E: Elem>(src: &[f32]) -> Vec<u8> {
        let values: Vec<E> = src.iter().map(|&v| E::from_f32(v)).collect();
        bytemuck::cast_slice(&values).to_vec()
    }
    Ok(match dtype {
        Dtype::F32 => bytemuck::cast_slice(src).to_vec(),
        Dtype::Bf16 => to::<bf16>(src),
        Dtype::F16 => to::<f16>(src),
        other => return Err(not_float("write", other)),
    })
}

/// Converts the bytes of `dtype` to f32 values.
fn decode(dtype: Dtype, src: &[u8], dst: &mut [f32]) -> Result<()> {
    fn from<E: Elem>(src: &[u8], dst: &mut [f32]) {
        let values: Vec<E> = bytemuck::pod_collect_to_vec(src);
        for (d, v) in dst.iter_mut().zip(values) {
            *d = v.to_f32();
        }
    }
    match dtype {
        Dtype::F32 => from::<f32>(src, dst),
        Dtype::Bf16 => from::<bf16>(src, dst),
        Dtype::F16 => from::<f16>(src, dst),
        other => return Err(not_float("read", other)),
    }
    Ok(())
}

fn not_float(op: &'static str, dtype: Dtype) -> Error {
    Error::Dtype {
        op,
        tensor: "the tensor",
        expected: Dtype::F32,
        got: dtype,
    }
}

fn float(op: &'static str, dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::Bf16 | Dtype::F16 => Ok(()),
        other => Err(not_float(op, other)),
    }
}

fn int(v: usize) -> Arg {
    Arg::I32(i32::try_from(v).expect("invariant: kernel sizes fit in i32 (check_config)"))
}

fn long(v: usize) -> Arg {
    Arg::I64(v as i64)
}

impl Backend for CudaBackend {
    fn arena_bytes(&self, place: Place) -> usize {
        match place {
            Place::Device => self.device.bytes,
            Place::Host => self.host.bytes,
        }
    }

    fn comm_buf(&self, t: Tensor) -> CommBuf {
        assert!(
            t.offset + t.bytes() <= self.arena_bytes(t.place),
            "invariant: handles come from this backend's arena layout"
        );
        // A collective reads the buffer from another thread or stream: every kernel that
        // writes it must have finished. A failure here surfaces at the next op.
        if let Err(e) = self.stream.synchronize() {
            self.poisoned
                .borrow_mut()
                .get_or_insert_with(|| format!("waiting for the GPU before a collective: {e:?}"));
        }
        match t.place {
            Place::Device => CommBuf {
                addr: self.ptr(t) as usize,
                len: t.len,
                dtype: t.dtype,
                memory: Memory::Device,
                owner: Some(Owner::new(self.device.clone())),
            },
            Place::Host => CommBuf {
                addr: self.host.ptr as usize + t.offset,
                len: t.len,
                dtype: t.dtype,
                memory: Memory::Host,
                owner: Some(Owner::new(self.host.clone())),
            },
        }
    }

    /// NVML's count for this process (context, libraries, arena), or the whole GPU's use
    /// where NVML cannot say (no library, or a pid namespace hides this process).
    fn measured_device_bytes(&self) -> Option<u64> {
        nvml::process_bytes(&self.pci_bus_id)
            .or_else(|| self.device_used_bytes().ok().map(|b| b as u64))
    }

    fn peak_flops(&self) -> Option<f64> {
        self.peak_flops
    }

    fn write(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        self.checks()
            .tensor("write", "dst", dst, dst.dtype, src.len())?;
        if dst.place == Place::Host {
            return self.host_ops.write(Self::hosted(dst), src);
        }
        let bytes = encode(dst.dtype, src)?;
        self.copy_htod(self.ptr(dst), &bytes)
    }

    fn write_i32(&mut self, dst: Tensor, src: &[i32]) -> Result<()> {
        self.write_bytes(dst, bytemuck::cast_slice(src))
    }

    fn read(&self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        self.checks()
            .tensor("read", "src", src, src.dtype, dst.len())?;
        if src.place == Place::Host {
            return self.host_ops.read(Self::hosted(src), dst);
        }
        float("read", src.dtype)?;
        let mut bytes = vec![0u8; src.bytes()];
        self.copy_dtoh(&mut bytes, self.ptr(src))?;
        decode(src.dtype, &bytes, dst)
    }

    fn write_bytes(&mut self, dst: Tensor, src: &[u8]) -> Result<()> {
        self.checks().bytes("write_bytes", "dst", dst, src.len())?;
        if dst.place == Place::Host {
            return self.host_ops.write_bytes(Self::hosted(dst), src);
        }
        self.copy_htod(self.ptr(dst), src)
    }

    fn read_bytes(&self, src: Tensor, dst: &mut [u8]) -> Result<()> {
        self.checks().bytes("read_bytes", "src", src, dst.len())?;
        if src.place == Place::Host {
            return self.host_ops.read_bytes(Self::hosted(src), dst);
        }
        self.copy_dtoh(dst, self.ptr(src))
    }

    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()> {
        self.checks()
            .tensor("fill", "dst", dst, dst.dtype, dst.len)?;
        if dst.place == Place::Host {
            return self.host_ops.fill(Self::hosted(dst), value);
        }
        let ptr = Arg::Ptr(self.ptr(dst));
        if dst.dtype == Dtype::I32 {
            let args = [ptr, Arg::I32(value as i32), long(dst.len)];
            return self.elementwise("fill", Dtype::I32, dst.len, &args);
        }
        float("fill", dst.dtype)?;
        self.elementwise(
            "fill",
            dst.dtype,
            dst.len,
            &[ptr, Arg::F32(value), long(dst.len)],
        )
    }

    fn copy(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        self.checks().copy(dst, src)?;
        match (src.place, dst.place) {
            (Place::Host, Place::Host) => self.host_ops.copy(Self::hosted(dst), Self::hosted(src)),
            (Place::Device, Place::Device) if src.dtype == dst.dtype => {
                // SAFETY: both checked, disjoint, of `src.bytes()` bytes.
                unsafe {
                    result::memcpy_dtod_async(
                        self.ptr(dst),
                        self.ptr(src),
                        src.bytes(),
                        self.stream.cu_stream(),
                    )
                }
                .map_err(|e| cuda_error("copying on the GPU", e))
            }
            (Place::Device, Place::Device) => {
                float("copy", src.dtype)?;
                float("copy", dst.dtype)?;
                // `convert_<src>_to_<dst>`: the source picks the base, the destination the dtype.
                let base = match src.dtype {
                    Dtype::F32 => "convert_f32_to",
                    Dtype::Bf16 => "convert_bf16_to",
                    _ => "convert_f16_to",
                };
                let args = [
                    Arg::Ptr(self.ptr(dst)),
                    Arg::Ptr(self.ptr(src)),
                    long(dst.len),
                ];
                if dst.len == 0 {
                    return Ok(());
                }
                self.launch(base, dst.dtype, Launch::elementwise(dst.len), &args)
            }
            // Between the arenas (optimizer offload): bytes when the dtypes agree, through f32
            // values on the host otherwise.
            (Place::Device, Place::Host) if src.dtype == dst.dtype => {
                // SAFETY: checked host handle; `&mut self` excludes other users.
                let bytes = unsafe { self.host_bytes_mut(dst) };
                self.copy_dtoh(bytes, self.ptr(src))
            }
            (Place::Host, Place::Device) if src.dtype == dst.dtype => {
                // SAFETY: checked host handle; only read.
                let bytes = unsafe { self.host_bytes(src) };
                self.copy_htod(self.ptr(dst), bytes)
            }
            _ => {
                let mut values = vec![0.0f32; src.len];
                self.read(src, &mut values)?;
                self.write(dst, &values)
            }
        }
    }

    fn scale(&mut self, dst: Tensor, factor: f32) -> Result<()> {
        self.checks()
            .tensor("scale", "dst", dst, dst.dtype, dst.len)?;
        if dst.place == Place::Host {
            return self.host_ops.scale(Self::hosted(dst), factor);
        }
        float("scale", dst.dtype)?;
        let args = [Arg::Ptr(self.ptr(dst)), Arg::F32(factor), long(dst.len)];
        self.elementwise("scale", dst.dtype, dst.len, &args)
    }

    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        self.checks().add(dst, src)?;
        if self.on_host("add", &[dst, src])? {
            return self.host_ops.add(Self::hosted(dst), Self::hosted(src));
        }
        float("add", dst.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(dst)),
            Arg::Ptr(self.ptr(src)),
            long(dst.len),
        ];
        self.elementwise("add", dst.dtype, dst.len, &args)
    }

    fn residual_fwd(&mut self, out: Tensor, a: Tensor, b: Tensor) -> Result<()> {
        self.checks().residual_fwd(out, a, b)?;
        self.on_device("residual_fwd", &[out, a, b])?;
        float("residual_fwd", out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(a)),
            Arg::Ptr(self.ptr(b)),
            long(out.len),
        ];
        self.elementwise("residual", out.dtype, out.len, &args)
    }

    fn embedding_fwd(
        &mut self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        dims: Dims,
    ) -> Result<()> {
        self.checks().embedding_fwd(out, tokens, wte, wpe, dims)?;
        let mut all = vec![out, tokens, wte];
        all.extend(wpe);
        self.on_device("embedding_fwd", &all)?;
        float("embedding_fwd", out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(tokens)),
            Arg::Ptr(self.ptr(wte)),
            Arg::Ptr(self.opt_ptr(wpe)),
            int(dims.tokens()),
            int(dims.t),
            int(dims.c),
            int(dims.vocab_start),
            int(dims.vp),
        ];
        let rows = Launch::rows(dims.tokens(), 256);
        self.launch("embedding_fwd", out.dtype, rows, &args)
    }

    fn embedding_bwd(
        &mut self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "embedding_bwd";
        self.checks()
            .embedding_bwd(dwte, dwpe, dout, tokens, dims)?;
        let mut all = vec![dwte, dout, tokens];
        all.extend(dwpe);
        self.on_device(op, &all)?;
        float(op, dout.dtype)?;
        // Deterministic scatter-add without atomics: sort this shard's token rows by token on
        // the host (the copy also waits for the kernels that last read `segments`), then one
        // block sums each token's rows in row order.
        let ids = self.tokens(op, tokens, dims.v)?;
        let mut rows: Vec<(i32, i32)> = ids
            .iter()
            .enumerate()
            .filter_map(|(row, &id)| {
                dims.local_token(id as usize)
                    .map(|t| (t as i32, row as i32))
            })
            .collect();
        rows.sort_unstable();
        let (mut order, mut starts, mut local) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &(token, row)) in rows.iter().enumerate() {
            if i == 0 || rows[i - 1].0 != token {
                starts.push(i as i32);
                local.push(token);
            }
            order.push(row);
        }
        starts.push(order.len() as i32);
        let segments = local.len();
        let needed = (order.len() + starts.len() + local.len()) * 4;
        if self.segments.bytes < needed {
            self.segments = PinnedMemory::new(&self.ctx, needed.next_power_of_two())?;
        }
        let base = self.segments.device_ptr;
        let words: Vec<i32> = [order.as_slice(), &starts, &local].concat();
        // SAFETY: the buffer has `needed` bytes and no kernel reads it (the stream is idle
        // after the token copy above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                words.as_ptr() as *const u8,
                self.segments.ptr,
                words.len() * 4,
            )
        };
        let (order_at, starts_at) = (base, base + order.len() as u64 * 4);
        let local_at = starts_at + starts.len() as u64 * 4;
        let args = [
            Arg::Ptr(self.ptr(dwte)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(order_at),
            Arg::Ptr(starts_at),
            Arg::Ptr(local_at),
            int(segments),
            int(dims.c),
        ];
        self.launch(
            "embedding_bwd_wte",
            dout.dtype,
            Launch::rows(segments, 256),
            &args,
        )?;
        if let Some(dwpe) = dwpe {
            let args = [
                Arg::Ptr(self.ptr(dwpe)),
                Arg::Ptr(self.ptr(dout)),
                int(dims.b),
                int(dims.t),
                int(dims.c),
            ];
            self.elementwise("embedding_bwd_wpe", dout.dtype, dims.t * dims.c, &args)?;
        }
        Ok(())
    }

    fn layernorm_fwd(
        &mut self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        self.checks()
            .layernorm_fwd(out, mean, rstd, inp, weight, bias, rows, c)?;
        self.on_device("layernorm_fwd", &[out, mean, rstd, inp, weight, bias])?;
        float("layernorm_fwd", out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(mean)),
            Arg::Ptr(self.ptr(rstd)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(weight)),
            Arg::Ptr(self.ptr(bias)),
            int(rows),
            int(c),
        ];
        self.launch("layernorm_fwd", out.dtype, Launch::rows(rows, 256), &args)
    }

    fn layernorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dbias: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        self.checks()
            .layernorm_bwd(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, c)?;
        let all = [dinp, dweight, dbias, dout, inp, weight, mean, rstd];
        self.on_device("layernorm_bwd", &all)?;
        float("layernorm_bwd", dout.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(dinp)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(weight)),
            Arg::Ptr(self.ptr(mean)),
            Arg::Ptr(self.ptr(rstd)),
            int(rows),
            int(c),
        ];
        self.launch(
            "layernorm_bwd_dinp",
            dout.dtype,
            Launch::rows(rows, 256),
            &args,
        )?;
        let args = [
            Arg::Ptr(self.ptr(dweight)),
            Arg::Ptr(self.ptr(dbias)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(mean)),
            Arg::Ptr(self.ptr(rstd)),
            int(rows),
            int(c),
        ];
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            "layernorm_bwd_params",
            dout.dtype,
            Launch::columns(c),
            &args,
        )
    }

    fn matmul_fwd(
        &mut self,
        out: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        shape: Linear,
    ) -> Result<()> {
        self.checks().matmul_fwd(out, inp, weight, bias, shape)?;
        let mut all = vec![out, inp, weight];
        all.extend(bias);
        self.on_device("matmul_fwd", &all)?;
        float("matmul_fwd", out.dtype)?;
        if shape.inp == 0 {
            // No products to sum: the output is the bias (or 0).
            return match bias {
                Some(bias) => self.broadcast_rows(out, bias, shape),
                None => self.fill(out, 0.0),
            };
        }
        // Row-major out (rows, out) = inp (rows, in) weight^T is column-major
        // out^T (out, rows) = weight (stored (in, out), transposed) inp^T (in, rows).
        let g = Gemm {
            transa: true,
            transb: false,
            m: shape.out as u64,
            n: shape.rows as u64,
            k: shape.inp as u64,
            lda: shape.inp as i64,
            ldb: shape.inp as i64,
            ldd: shape.out as i64,
            dtype: out.dtype,
            bias: bias.is_some(),
            accumulate: false,
        };
        let (a, b, d, bias) = (
            self.ptr(weight),
            self.ptr(inp),
            self.ptr(out),
            self.opt_ptr(bias),
        );
        // SAFETY: checked handles of the sizes `g` implies; `out` overlaps no input.
        unsafe { self.blas.gemm(g, a, b, d, bias) }
    }

    fn matmul_bwd(
        &mut self,
        dinp: Option<Tensor>,
        dweight: Tensor,
        dbias: Option<Tensor>,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        shape: Linear,
    ) -> Result<()> {
        self.checks()
            .matmul_bwd(dinp, dweight, dbias, dout, inp, weight, shape)?;
        let mut all = vec![dweight, dout, inp, weight];
        all.extend(dinp);
        all.extend(dbias);
        self.on_device("matmul_bwd", &all)?;
        float("matmul_bwd", dout.dtype)?;
        let dtype = dout.dtype;
        if let Some(dinp) = dinp {
            if shape.out == 0 {
                self.fill(dinp, 0.0)?;
            } else {
                // dinp (rows, in) = dout (rows, out) weight (out, in): column-major
                // dinp^T (in, rows) = weight^T (stored (in, out)) dout^T (out, rows).
                let g = Gemm {
                    transa: false,
                    transb: false,
                    m: shape.inp as u64,
                    n: shape.rows as u64,
                    k: shape.out as u64,
                    lda: shape.inp as i64,
                    ldb: shape.out as i64,
                    ldd: shape.inp as i64,
                    dtype,
                    bias: false,
                    accumulate: false,
                };
                let (a, b, d) = (self.ptr(weight), self.ptr(dout), self.ptr(dinp));
                // SAFETY: checked handles; `dinp` overlaps no input.
                unsafe { self.blas.gemm(g, a, b, d, 0) }?;
            }
        }
        if shape.rows > 0 {
            // dweight (out, in) += dout^T (out, rows) inp (rows, in): column-major
            // dweight^T (in, out) += inp^T (in, rows) dout (stored (out, rows), transposed).
            let g = Gemm {
                transa: false,
                transb: true,
                m: shape.inp as u64,
                n: shape.out as u64,
                k: shape.rows as u64,
                lda: shape.inp as i64,
                ldb: shape.out as i64,
                ldd: shape.inp as i64,
                dtype,
                bias: false,
                accumulate: true,
            };
            let (a, b, d) = (self.ptr(inp), self.ptr(dout), self.ptr(dweight));
            // SAFETY: checked handles; `dweight` overlaps no input.
            unsafe { self.blas.gemm(g, a, b, d, 0) }?;
            if let Some(dbias) = dbias {
                let args = [
                    Arg::Ptr(self.ptr(dbias)),
                    Arg::Ptr(self.ptr(dout)),
                    int(shape.rows),
                    int(shape.out),
                ];
                self.launch("colsum_add", dtype, Launch::columns(shape.out), &args)?;
            }
        }
        Ok(())
    }

    fn attention_fwd(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, dims: Dims) -> Result<()> {
        let op = "attention_fwd";
        head_size(op, dims)?;
        self.checks().attention_fwd(out, lse, qkv, dims)?;
        self.on_device(op, &[out, lse, qkv])?;
        float(op, out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(lse)),
            Arg::Ptr(self.ptr(qkv)),
            int(dims.b),
            int(dims.t),
            int(dims.nh),
            int(dims.nkv),
            int(dims.hs),
        ];
        let shared = Self::attention_shared(op, dims.hs);
        self.launch(
            op,
            out.dtype,
            Launch::attention(dims, dims.nh, shared),
            &args,
        )
    }

    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, dims: Dims) -> Result<()> {
        let op = "attention_decode";
        self.checks().attention_decode(out, qkv, pos, dims)?;
        self.on_device(op, &[out, qkv])?;
        float(op, out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(qkv)),
            int(dims.t),
            int(dims.nh),
            int(dims.nkv),
            int(dims.hs),
            int(pos),
        ];
        // Not `attention_*`: it needs no dynamic shared memory (see `find`).
        let kernel = "decode_attention";
        self.launch(
            kernel,
            out.dtype,
            Launch::rows(dims.b * dims.nh, 128),
            &args,
        )
    }

    fn attention_bwd(
        &mut self,
        dqkv: Tensor,
        delta: Tensor,
        dout: Tensor,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "attention_bwd";
        head_size(op, dims)?;
        self.checks()
            .attention_bwd(dqkv, delta, dout, qkv, out, lse, dims)?;
        self.on_device(op, &[dqkv, delta, dout, qkv, out, lse])?;
        float(op, dout.dtype)?;
        let rows = dims.tokens();
        let args = [
            Arg::Ptr(self.ptr(delta)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(out)),
            int(rows),
            int(dims.nh),
            int(dims.hs),
        ];
        self.elementwise("attention_bwd_delta", dout.dtype, rows * dims.nh, &args)?;
        let args = [
            Arg::Ptr(self.ptr(dqkv)),
            Arg::Ptr(self.ptr(qkv)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(lse)),
            Arg::Ptr(self.ptr(delta)),
            int(dims.b),
            int(dims.t),
            int(dims.nh),
            int(dims.nkv),
            int(dims.hs),
        ];
        for (kernel, heads) in [
            ("attention_bwd_dkv", dims.nkv),
            ("attention_bwd_dq", dims.nh),
        ] {
            let shared = Self::attention_shared(kernel, dims.hs);
            let launch = Launch::attention(dims, heads, shared);
            self.launch(kernel, dout.dtype, launch, &args)?;
        }
        Ok(())
    }

    fn rmsnorm_fwd(
        &mut self,
        out: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.rmsnorm_fwd_on_device(out, rstd, inp, weight, rows, c, eps)
    }

    fn rmsnorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        self.rmsnorm_bwd_on_device(dinp, dweight, dout, inp, weight, rstd, rows, c)
    }

    fn rope_fwd(&mut self, qkv: Tensor, table: Tensor, dims: Dims) -> Result<()> {
        self.rope_on_device("rope_fwd", ("qkv", qkv), table, dims)
    }

    fn rope_bwd(&mut self, dqkv: Tensor, table: Tensor, dims: Dims) -> Result<()> {
        self.rope_on_device("rope_bwd", ("dqkv", dqkv), table, dims)
    }

    fn swiglu_fwd(&mut self, out: Tensor, inp: Tensor, f: usize) -> Result<()> {
        self.swiglu_fwd_on_device(out, inp, f)
    }

    fn swiglu_bwd(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, f: usize) -> Result<()> {
        self.swiglu_bwd_on_device(dinp, dout, inp, f)
    }

    fn gelu_fwd(&mut self, out: Tensor, inp: Tensor) -> Result<()> {
        self.checks().gelu("gelu_fwd", ("out", out), inp)?;
        self.on_device("gelu_fwd", &[out, inp])?;
        float("gelu_fwd", out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(inp)),
            long(inp.len),
        ];
        self.elementwise("gelu_fwd", out.dtype, inp.len, &args)
    }

    fn gelu_bwd(&mut self, dinout: Tensor, inp: Tensor) -> Result<()> {
        self.checks().gelu("gelu_bwd", ("dinout", dinout), inp)?;
        self.on_device("gelu_bwd", &[dinout, inp])?;
        float("gelu_bwd", dinout.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(dinout)),
            Arg::Ptr(self.ptr(inp)),
            long(inp.len),
        ];
        self.elementwise("gelu_bwd", dinout.dtype, inp.len, &args)
    }

    fn crossentropy_fwd_bwd(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_fwd_bwd";
        self.checks()
            .crossentropy_fwd_bwd(logits, losses, max, sumexp, targets, dims)?;
        self.on_device(op, &[logits, losses, max, sumexp, targets])?;
        float(op, logits.dtype)?;
        let rows = losses.len;
        let args = [
            Arg::Ptr(self.ptr(logits)),
            Arg::Ptr(self.ptr(losses)),
            Arg::Ptr(self.ptr(max)),
            Arg::Ptr(self.ptr(sumexp)),
            Arg::Ptr(self.ptr(targets)),
            Arg::F32(dloss),
            int(rows),
            int(dims.v),
            int(dims.vp),
        ];
        self.launch(op, logits.dtype, Launch::rows(rows, 1024), &args)
    }

    fn crossentropy_max(&mut self, logits: Tensor, max: Tensor, dims: Dims) -> Result<()> {
        let op = "crossentropy_max";
        self.checks().crossentropy_max(logits, max, dims)?;
        self.on_device(op, &[logits, max])?;
        float(op, logits.dtype)?;
        let rows = max.len;
        let args = [
            Arg::Ptr(self.ptr(logits)),
            Arg::Ptr(self.ptr(max)),
            int(rows),
            int(dims.vp),
            int(dims.real_vocab()),
        ];
        self.launch(op, logits.dtype, Launch::rows(rows, 1024), &args)
    }

    fn crossentropy_sumexp(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_sumexp";
        self.checks()
            .crossentropy_sumexp(logits, losses, max, sumexp, targets, dims)?;
        self.on_device(op, &[logits, losses, max, sumexp, targets])?;
        float(op, logits.dtype)?;
        let rows = losses.len;
        let args = [
            Arg::Ptr(self.ptr(logits)),
            Arg::Ptr(self.ptr(losses)),
            Arg::Ptr(self.ptr(max)),
            Arg::Ptr(self.ptr(sumexp)),
            Arg::Ptr(self.ptr(targets)),
            int(rows),
            int(dims.vp),
            int(dims.real_vocab()),
            int(dims.vocab_start),
        ];
        self.launch(op, logits.dtype, Launch::rows(rows, 1024), &args)
    }

    fn crossentropy_finish(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_finish";
        self.checks()
            .crossentropy_finish(logits, losses, max, sumexp, targets, dims)?;
        self.on_device(op, &[logits, losses, max, sumexp, targets])?;
        float(op, logits.dtype)?;
        let rows = losses.len;
        let args = [
            Arg::Ptr(self.ptr(logits)),
            Arg::Ptr(self.ptr(losses)),
            Arg::Ptr(self.ptr(max)),
            Arg::Ptr(self.ptr(sumexp)),
            Arg::Ptr(self.ptr(targets)),
            Arg::F32(dloss),
            int(rows),
            int(dims.vp),
            int(dims.real_vocab()),
            int(dims.vocab_start),
        ];
        self.launch(op, logits.dtype, Launch::rows(rows, 1024), &args)
    }

    fn sum_squares(&mut self, grads: Tensor, partials: Tensor) -> Result<f64> {
        let op = "sum_squares";
        self.checks().sum_squares(grads, partials)?;
        if self.on_host(op, &[grads, partials])? {
            return self
                .host_ops
                .sum_squares(Self::hosted(grads), Self::hosted(partials));
        }
        float(op, grads.dtype)?;
        if grads.len == 0 || partials.len == 0 {
            return Ok(0.0);
        }
        // The CPU backend's blocking: the same blocks, each summed in f64 (in a tree here), the
        // partials added in order on the host.
        let block = grads.len.div_ceil(partials.len).max(1);
        let used = grads.len.div_ceil(block);
        let args = [
            Arg::Ptr(self.ptr(grads)),
            Arg::Ptr(self.ptr(partials)),
            long(grads.len),
            long(block),
            int(used),
        ];
        self.launch(op, grads.dtype, Launch::rows(used, 256), &args)?;
        let mut bytes = vec![0u8; used * 4];
        self.copy_dtoh(&mut bytes, self.ptr(partials))?;
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(values.iter().map(|&p| p as f64).sum())
    }

    fn adamw(
        &mut self,
        param: Tensor,
        master: Option<Tensor>,
        m: Tensor,
        v: Tensor,
        grad: Option<Tensor>,
        hyper: AdamW,
    ) -> Result<()> {
        let op = "adamw";
        self.checks().adamw(param, master, m, v, grad)?;
        let mut all = vec![param, m, v];
        all.extend(master);
        all.extend(grad);
        if self.on_host(op, &all)? {
            let hosted = Self::hosted;
            return self.host_ops.adamw(
                hosted(param),
                master.map(hosted),
                hosted(m),
                hosted(v),
                grad.map(hosted),
                hyper,
            );
        }
        float(op, param.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(param)),
            Arg::Ptr(self.opt_ptr(master)),
            Arg::Ptr(self.ptr(m)),
            Arg::Ptr(self.ptr(v)),
            Arg::Ptr(self.opt_ptr(grad)),
            long(param.len),
            Arg::F32(hyper.lr),
            Arg::F32(hyper.beta1),
            Arg::F32(hyper.beta2),
            Arg::F32(hyper.eps),
            Arg::F32(hyper.weight_decay),
            Arg::F32(hyper.bias_correction1),
            Arg::F32(hyper.bias_correction2),
            Arg::F32(hyper.grad_scale),
        ];
        self.elementwise(op, param.dtype, param.len, &args)
    }
}

impl CudaBackend {
    /// Fails unless every tensor is on the GPU (the op has no host version).
    fn on_device(&self, op: &'static str, tensors: &[Tensor]) -> Result<()> {
        if tensors.iter().any(|t| t.place == Place::Host) {
            return Err(Error::Unsupported {
                what: format!("{op}: a tensor is in the host arena; this op runs on the GPU"),
                help: "this is a bug in tessera; please report it with your config".into(),
            });
        }
        Ok(())
    }

    /// `out (rows, out) = bias` for every row: a product with nothing to sum.
    fn broadcast_rows(&mut self, out: Tensor, bias: Tensor, shape: Linear) -> Result<()> {
        for row in 0..shape.rows {
            self.copy(out.slice(row * shape.out, shape.out), bias)?;
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Kernels may still use the arena: let them finish before it is freed.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
    }
}
