//! `launch` on one GPU shared by several worker processes: NCCL refuses two ranks of one
//! communicator on one device, so the ranks exchange data over TCP staged through the host,
//! and every parallel mode runs on the CUDA kernels. Ignored by `cargo test` (CI has no GPU);
//! bench/gpu/README.md says how to run it on a GPU machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository and `launch` (`TESSERA_REPO` and `TESSERA_LAUNCH` where the binary runs
/// on a copy elsewhere, as on a lent GPU machine; see bench/gpu/tests.sh).
fn repo() -> PathBuf {
    match std::env::var_os("TESSERA_REPO") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("launcher/ has a parent")
            .to_path_buf(),
    }
}

fn launch_binary() -> PathBuf {
    std::env::var_os("TESSERA_LAUNCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_launch").into())
}

/// The default demo (2 x 2 x 2 ranks, fp32) on `device`, 10 steps; its losses.
fn demo(device: &str, dir: &Path) -> Vec<f64> {
    let metrics = dir.join(format!("{device}.jsonl"));
    let out = Command::new(launch_binary())
        .current_dir(repo())
        .env_remove("TESSERA_COORDINATOR")
        .args(["--config", "configs/tiny-cpu.yaml", "--threads", "1"])
        .arg("--metrics")
        .arg(&metrics)
        .args(["--set", "training.steps=10", "--set", "checkpoint.every=0"])
        .args(["--set", &format!("cluster.device={device}")])
        .args(["--set", "cluster.backend=tcp"])
        .arg("--set")
        .arg(format!("checkpoint.dir={}", dir.join(device).display()))
        .output()
        .expect("launch runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["loss"].as_f64().unwrap()
        })
        .collect()
}

#[test]
#[ignore = "needs a GPU"]
fn eight_ranks_on_one_gpu_train_like_eight_cpu_ranks() {
    let dir = std::env::temp_dir().join(format!("tessera-gpu-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cpu = demo("cpu", &dir);
    let gpu = demo("cuda", &dir);
    assert_eq!(cpu.len(), 10);
    assert_eq!(gpu.len(), 10);
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        // fp32 both: only the order of sums differs (cuBLASLt's, our kernels' reductions).
        let relative = ((g - c) / c).abs();
        assert!(
            relative < 1e-3,
            "step {}: gpu {g} cpu {c} (gpu {gpu:?}, cpu {cpu:?})",
            step + 1
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
