//! What NVML says of a GPU's memory, without a CUDA context: this process's share as the
//! driver accounts it (the number `nvidia-smi` shows next to the pid: the CUDA context and
//! every library's allocations, not what the driver keeps for itself or other processes, so
//! the number the memory plan's arena and runtime rows predict), and the GPU's free memory
//! (what a node agent reports before its workers start).
//!
//! libnvidia-ml ships with the driver; it is opened with `dlopen` when first needed, and every
//! failure (no library, a pid namespace hiding our pid) gives `None`, never a panic.

use std::ffi::{CString, c_char, c_int, c_uint};
use std::sync::OnceLock;

/// `nvmlProcessInfo_t` (v2 and v3 share this layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct MemoryInfo {
    total: u64,
    free: u64,
    used: u64,
}

type Device = *mut std::ffi::c_void;

struct Nvml {
    _library: libloading::Library,
    by_pci_bus_id: unsafe extern "C" fn(*const c_char, *mut Device) -> c_int,
    processes: unsafe extern "C" fn(Device, *mut c_uint, *mut ProcessInfo) -> c_int,
    memory: unsafe extern "C" fn(Device, *mut MemoryInfo) -> c_int,
}

// SAFETY: NVML is thread-safe after nvmlInit; the struct only holds function pointers and the
// library that keeps them valid.
unsafe impl Send for Nvml {}
unsafe impl Sync for Nvml {}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // SAFETY: loading the driver's NVML runs its (trusted) initialisers only.
        let library = unsafe { libloading::Library::new("libnvidia-ml.so.1") }.ok()?;
        // SAFETY: the symbols have these C signatures in nvml.h (the _v2/_v3 names are the
        // ABI-stable ones).
        unsafe {
            let init: libloading::Symbol<unsafe extern "C" fn() -> c_int> =
                library.get(b"nvmlInit_v2\0").ok()?;
            if init() != 0 {
                return None;
            }
            let by_pci_bus_id = *library
                .get::<unsafe extern "C" fn(*const c_char, *mut Device) -> c_int>(
                    b"nvmlDeviceGetHandleByPciBusId_v2\0",
                )
                .ok()?;
            let processes = *library
                .get::<unsafe extern "C" fn(Device, *mut c_uint, *mut ProcessInfo) -> c_int>(
                    b"nvmlDeviceGetComputeRunningProcesses_v3\0",
                )
                .ok()?;
            let memory = *library
                .get::<unsafe extern "C" fn(Device, *mut MemoryInfo) -> c_int>(
                    b"nvmlDeviceGetMemoryInfo\0",
                )
                .ok()?;
            Some(Nvml {
                _library: library,
                by_pci_bus_id,
                processes,
                memory,
            })
        }
    })
    .as_ref()
}

/// NVML's handle of the GPU at `pci_bus_id` (`0000:1b:00.0`).
fn device(nvml: &Nvml, pci_bus_id: &str) -> Option<Device> {
    let id = CString::new(pci_bus_id).ok()?;
    let mut device: Device = std::ptr::null_mut();
    // SAFETY: a NUL-terminated id and a valid place for the handle.
    (unsafe { (nvml.by_pci_bus_id)(id.as_ptr(), &mut device) } == 0).then_some(device)
}

/// Free bytes on the GPU at `pci_bus_id`, if NVML can say.
pub fn free_bytes(pci_bus_id: &str) -> Option<u64> {
    let nvml = nvml()?;
    let device = device(nvml, pci_bus_id)?;
    let mut info = MemoryInfo::default();
    // SAFETY: a handle NVML gave and a valid place for the answer.
    (unsafe { (nvml.memory)(device, &mut info) } == 0).then_some(info.free)
}

/// Bytes this process uses on the GPU at `pci_bus_id`, if NVML can say.
pub fn process_bytes(pci_bus_id: &str) -> Option<u64> {
    let nvml = nvml()?;
    let device = device(nvml, pci_bus_id)?;
    let mut infos = [ProcessInfo::default(); 256];
    let mut count = infos.len() as c_uint;
    // SAFETY: `infos` has room for `count` entries.
    if unsafe { (nvml.processes)(device, &mut count, infos.as_mut_ptr()) } != 0 {
        return None;
    }
    let pid = std::process::id();
    infos[..(count as usize).min(infos.len())]
        .iter()
        .find(|info| info.pid == pid)
        .map(|info| info.used_gpu_memory)
        // NVML_VALUE_NOT_AVAILABLE: the driver does not say (some virtualised GPUs).
        .filter(|&bytes| bytes != u64::MAX)
}
