//! The CUDA backend where no GPU is needed: every kernel source compiles with NVRTC (installed
//! from the Python registry's CUDA 13 wheel into target/tmp), the kernel cache works, and a
//! CUDA run on a machine without a driver fails with a clear error, not a panic.
//!
//! What needs a GPU is in `gpu.rs` (ignored here; see bench/gpu/README.md to run it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The folder holding libnvrtc.so.13 from the `nvidia-cuda-nvrtc` wheel, installed under
/// target/tmp on first use (pip, from the Python registry).
fn nvrtc_lib() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-nvrtc");
    let lib = root.join("nvidia/cu13/lib");
    if !lib.join("libnvrtc.so.13").exists() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
            .arg(&root)
            .arg("nvidia-cuda-nvrtc==13.0.88")
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "cannot install nvidia-cuda-nvrtc: {}",
            text(&out)
        );
    }
    // cudarc asks for libnvrtc.so first; the wheel names it by its soname only.
    let link = lib.join("libnvrtc.so");
    if !link.exists() {
        std::os::unix::fs::symlink("libnvrtc.so.13", &link).expect("symlink in target/tmp");
    }
    lib
}

/// `tessera-worker kernels` with the wheel's NVRTC.
fn kernels(args: &[&str], cache: &Path) -> Output {
    worker()
        .arg("kernels")
        .args(args)
        .arg("--cache")
        .arg(cache)
        .env("LD_LIBRARY_PATH", nvrtc_lib())
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const SOURCES: [&str; 7] = [
    "elementwise",
    "embedding",
    "layernorm",
    "attention",
    "crossentropy",
    "optimizer",
    "llama",
];

#[test]
fn every_kernel_source_compiles_for_hopper_and_ampere_and_is_cached() {
    let cache = scratch("kernel-cache");
    for arch in ["sm_90", "sm_80"] {
        let out = kernels(&["--arch", arch], &cache);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.contains(&format!("for {arch} with NVRTC 13.")), "{log}");
        for source in SOURCES {
            let line = log
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{source}.cu:")))
                .unwrap_or_else(|| panic!("no line for {source}.cu: {log}"));
            assert!(line.contains("compiled in"), "{line}");
        }
    }
    let cubins: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cubins.len(), 2 * SOURCES.len(), "{cubins:?}");
    for cubin in &cubins {
        let bytes = std::fs::read(cubin).unwrap();
        assert!(
            bytes.starts_with(b"\x7fELF"),
            "{} is a cubin",
            cubin.display()
        );
    }

    // A second process finds them all; a damaged entry is compiled again.
    let damaged = cubins
        .iter()
        .find(|p| p.to_string_lossy().contains("attention-sm_90"))
        .unwrap();
    std::fs::write(damaged, b"half a fi").unwrap();
    let out = kernels(&["--arch", "sm_90"], &cache);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches(": cached,").count(), SOURCES.len() - 1, "{log}");
    assert!(
        log.lines().any(|l| l.contains("attention.cu: compiled in")),
        "{log}"
    );
    assert!(std::fs::read(damaged).unwrap().starts_with(b"\x7fELF"));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_bad_architecture_is_refused_before_anything_compiles() {
    let cache = scratch("kernel-cache-bad");
    let out = kernels(&["--arch", "compute_90"], &cache);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("`compute_90` is not a GPU architecture"),
        "{log}"
    );
    assert!(log.contains("sm_90 for H100"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!cache.exists(), "nothing was written");
}

fn driver_present() -> bool {
    // SAFETY: only dlopens and dlcloses candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[test]
fn without_a_gpu_kernels_asks_for_an_architecture() {
    if driver_present() {
        eprintln!("skipped: a CUDA driver is present, so GPU 0's architecture is the default");
        return;
    }
    let out = worker().arg("kernels").output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains("CUDA driver library could not be loaded"),
        "{log}"
    );
    assert!(log.contains("--arch sm_90"), "{log}");
}

#[test]
fn without_nvrtc_kernels_says_which_library_is_missing() {
    let probe = worker()
        .args(["kernels", "--arch", "sm_90", "--cache"])
        .arg(scratch("kernel-cache-none"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let log = text(&probe);
    if probe.status.success() {
        eprintln!("skipped: this machine has NVRTC installed system-wide");
        return;
    }
    assert_eq!(probe.status.code(), Some(1), "{log}");
    assert!(
        log.contains("the NVRTC library could not be loaded"),
        "{log}"
    );
    assert!(log.contains("libnvrtc.so"), "{log}");
    assert!(log.contains("pip install nvidia-cuda-nvrtc"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_cuda_run_without_a_driver_is_a_clear_error() {
    if driver_present() {
        eprintln!("skipped: a CUDA driver is present (gpu.rs runs the backend there)");
        return;
    }
    let dir = scratch("cuda-run");
    std::fs::create_dir_all(&dir).unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.yaml");
    let out = worker()
        .arg("--config")
        .arg(&config)
        .args(["--set", "parallel.data=1", "--set", "parallel.tensor=1"])
        .args([
            "--set",
            "parallel.pipeline=1",
            "--set",
            "cluster.gpus_per_node=1",
        ])
        .args([
            "--set",
            "cluster.device=cuda",
            "--set",
            "cluster.backend=nccl",
        ])
        .args(["--set", "training.steps=1"])
        .arg("--set")
        .arg(format!("checkpoint.dir={}", dir.join("ckpt").display()))
        .env_remove("TESSERA_COORDINATOR")
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("cluster.device is cuda, but the CUDA driver library could not be loaded"),
        "{log}"
    );
    assert!(log.contains("libcuda.so"), "{log}");
    assert!(
        log.contains("help: run on a machine with an NVIDIA GPU"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(!dir.join("ckpt").exists(), "nothing trained");
    let _ = std::fs::remove_dir_all(&dir);
}
