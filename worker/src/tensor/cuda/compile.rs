//! The kernels' CUDA C++ sources, compiled with NVRTC to a cubin for the GPU's architecture
//! once per process and cached on disk, keyed by a hash of the source, the architecture, the
//! options and the NVRTC version, so that later processes load the cubin in milliseconds.
//!
//! Nothing here needs a GPU: NVRTC is a compiler library, so `tessera-worker kernels --arch
//! sm_90` fills the cache on a login node, and CI checks that every source compiles.

use std::ffi::{CStr, CString};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{Error, Result};

/// What every source needs (storage types, conversions); prepended to each, since NVRTC runs
/// with no include path.
const COMMON: &str = include_str!("kernels/common.cuh");

/// One kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! sources {
    ($($name:literal),* $(,)?) => {
        &[$(Source { name: $name, text: include_str!(concat!("kernels/", $name, ".cu")) }),*]
    };
}

/// Every kernel source, in the order they are compiled.
pub const SOURCES: &[Source] = sources![
    "elementwise",
    "embedding",
    "layernorm",
    "attention",
    "crossentropy",
    "optimizer",
    "llama",
];

const NVRTC_HELP: &str = "install the NVRTC runtime of CUDA 13 (the CUDA toolkit, or `pip install \
    nvidia-cuda-nvrtc` and put its nvidia/cu13/lib folder on LD_LIBRARY_PATH)";

/// Whether libnvrtc loads (cudarc would panic on its first call otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: dlopens and dlcloses candidate names; calls nothing in the library.
    unsafe { sys::is_culib_present() }
}

/// The loaded NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(Error::Cuda {
            what: format!(
                "the NVRTC library could not be loaded; tried {}",
                cudarc::get_lib_name_candidates("nvrtc").join(", ")
            ),
            help: NVRTC_HELP.into(),
        });
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid places for the results.
    let status = catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    }))
    .map_err(|_| Error::Cuda {
        what: "loading NVRTC failed (a symbol is missing: an NVRTC older than CUDA 13?)".into(),
        help: NVRTC_HELP.into(),
    })?;
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Cuda {
            what: format!("nvrtcVersion failed: {status:?}"),
            help: NVRTC_HELP.into(),
        });
    }
    Ok((major, minor))
}

/// Where compiled kernels are kept: `$TESSERA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tessera/
/// kernels`, else `~/.cache/tessera/kernels`; `None` when none can be named (then every
/// process compiles).
pub fn default_cache() -> Option<PathBuf> {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = env("TESSERA_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(base.join("tessera").join("kernels"))
}

/// A compiled source.
pub struct Cubin {
    pub bytes: Vec<u8>,
    /// Whether it came from the cache rather than from NVRTC.
    pub cached: bool,
    /// The cache file it was read from or written to.
    pub path: Option<PathBuf>,
}

/// The options every source is compiled with, for `arch` (`sm_90`).
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        // Line info costs nothing at run time and lets profilers map time to source lines.
        "-lineinfo".into(),
    ]
}

/// `source` compiled for `arch`, from `cache` when it holds it (a damaged or foreign file is
/// recompiled and replaced). A cache that cannot be written is not an error: the kernel is
/// still returned.
pub fn cubin(source: &Source, arch: &str, cache: Option<&Path>) -> Result<Cubin> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let options = options(arch);
    let key = fnv1a(&[
        COMMON.as_bytes(),
        source.text.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {}.{}", version.0, version.1).as_bytes(),
    ]);
    let path = cache.map(|dir| dir.join(format!("{}-{arch}-{key:016x}.cubin", source.name)));
    if let Some(path) = &path
        && let Ok(bytes) = std::fs::read(path)
        && is_elf(&bytes)
    {
        return Ok(Cubin {
            bytes,
            cached: true,
            path: Some(path.clone()),
        });
    }
    let bytes = compile(source, &options)?;
    let written = path.filter(|path| store(path, &bytes).is_ok());
    Ok(Cubin {
        bytes,
        cached: false,
        path: written,
    })
}

/// `sm_XY` or `sm_XYa`: what NVRTC takes for a cubin.
fn check_arch(arch: &str) -> Result<()> {
    let digits = arch
        .strip_prefix("sm_")
        .map(|rest| rest.trim_end_matches('a'));
    match digits {
        Some(d) if d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit()) => Ok(()),
        _ => Err(Error::Cuda {
            what: format!("`{arch}` is not a GPU architecture"),
            help: "name one as sm_XY: sm_90 for H100/H200, sm_80 for A100, sm_89 for L4/L40".into(),
        }),
    }
}

/// A cubin is an ELF file; anything else in the cache is a leftover of a crash.
fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Writes the cache file through a temporary name and a rename, so that concurrent workers
/// never read half a file.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

fn compile(source: &Source, options: &[String]) -> Result<Vec<u8>> {
    let text = format!("{COMMON}\n{}", source.text);
    let failed = |what: String| Error::Cuda {
        what: format!("compiling kernel source {}.cu: {what}", source.name),
        help: "this is a bug in tessera (the sources are compiled in its CI); please report it \
               with this message and the NVRTC version"
            .into(),
    };
    let text = CString::new(text).map_err(|_| failed("the source has a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", source.name)).expect("invariant: no NUL in names");
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<u8>> {
        let program = nvrtc::create_program(&text, Some(&name))
            .map_err(|e| failed(format!("nvrtcCreateProgram: {e:?}")))?;
        let program = Program(program);
        // SAFETY: `program` is live; the options are plain strings.
        let compiled = unsafe { nvrtc::compile_program(program.0, options) };
        if let Err(e) = compiled {
            // SAFETY: `program` is live.
            let log = unsafe { nvrtc::get_program_log(program.0) }
                .map(|log| c_text(&log))
                .unwrap_or_default();
            return Err(failed(format!("{e:?}\n{log}")));
        }
        let mut size = 0usize;
        // SAFETY: `program` compiled; `size` is a valid place for the result.
        let status = unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) };
        if status != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Err(failed(format!("nvrtcGetCUBINSize: {status:?}")));
        }
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` has the size NVRTC asked for.
        let status = unsafe { sys::nvrtcGetCUBIN(program.0, bytes.as_mut_ptr() as *mut _) };
        if status != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(failed(format!("nvrtcGetCUBIN: {status:?}")));
        }
        Ok(bytes)
    }));
    result.map_err(|_| Error::Cuda {
        what: "NVRTC panicked (a symbol is missing from the loaded libnvrtc?)".into(),
        help: NVRTC_HELP.into(),
    })?
}

/// An NVRTC program, destroyed when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn c_text(log: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = log.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// FNV-1a over the parts, each followed by a 0 byte: a hash that stays the same across Rust
/// versions, so a cache made by one build serves the next.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in part.iter().chain(&[0u8]) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_changes_with_every_input() {
        let base = fnv1a(&[b"common", b"source", b"sm_90"]);
        assert_eq!(base, fnv1a(&[b"common", b"source", b"sm_90"]));
        assert_ne!(base, fnv1a(&[b"common", b"source", b"sm_80"]));
        assert_ne!(base, fnv1a(&[b"common", b"sourc", b"e", b"sm_90"]));
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn architectures_are_checked_before_nvrtc_is_loaded() {
        for good in ["sm_90", "sm_80", "sm_90a", "sm_100"] {
            assert!(check_arch(good).is_ok(), "{good}");
        }
        for bad in ["90", "sm_9", "compute_90", "sm_x0", ""] {
            let error = check_arch(bad).unwrap_err().to_string();
            assert!(error.contains("not a GPU architecture"), "{error}");
            assert!(error.contains("sm_90 for H100"), "{error}");
        }
    }

    #[test]
    fn every_source_is_listed_and_none_includes_a_header() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tensor/cuda/kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".cu").map(str::to_string)
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
        listed.sort();
        assert_eq!(
            on_disk, listed,
            "a .cu file that is not compiled is dead code"
        );
        for source in SOURCES.iter().map(|s| s.text).chain([COMMON]) {
            assert!(
                !source
                    .lines()
                    .any(|l| l.trim_start().starts_with("#include")),
                "NVRTC runs with no include path"
            );
        }
    }

    #[test]
    fn a_cache_entry_that_is_not_a_cubin_is_ignored() {
        assert!(is_elf(b"\x7fELF\x02\x01"));
        assert!(!is_elf(b""));
        assert!(!is_elf(b"half a fi"));
    }
}
