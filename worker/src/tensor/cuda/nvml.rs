//! This process's memory on its GPU as the driver accounts it: NVML's per-process count, the
//! number `nvidia-smi` shows next to the pid. It includes the CUDA context and every library's
//! allocations and excludes what the driver keeps for itself and other processes, so it is the
//! number the memory plan (arena + runtime rows) predicts.
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

type Device = *mut std::ffi::c_void;

struct Nvml {
    _library: libloading::Library,
    by_pci_bus_id: unsafe extern "C" fn(*const c_char, *mut Device) -> c_int,
    processes: unsafe extern "C" fn(Device, *mut c_uint, *mut ProcessInfo) -> c_int,
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
            Some(Nvml {
                _library: library,
                by_pci_bus_id,
                processes,
            })
        }
    })
    .as_ref()
}

/// Bytes this process uses on the GPU at `pci_bus_id` (`0000:1b:00.0`), if NVML can say.
pub fn process_bytes(pci_bus_id: &str) -> Option<u64> {
    let nvml = nvml()?;
    let id = CString::new(pci_bus_id).ok()?;
    let mut device: Device = std::ptr::null_mut();
    // SAFETY: a NUL-terminated id and a valid place for the handle.
    if unsafe { (nvml.by_pci_bus_id)(id.as_ptr(), &mut device) } != 0 {
        return None;
    }
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
