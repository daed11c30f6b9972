//! The CUDA kernels on the CPU: `kernel_emulator/sim.h` runs each CUDA thread of a block as a
//! fiber with real `__syncthreads` and shuffles, and `kernel_emulator/kernels.cpp` checks every
//! kernel against a double-precision reference (attention at every head size, partial tiles and
//! grouped-query head ratios 1, 2 and 4, sharded cross-entropy, AdamW bit for bit against the
//! CPU's order, Llama's RMSNorm, rotary embeddings and SwiGLU). The kernel sources are used
//! as they are, except their three PTX conversions, which become C++ ones. This checks the
//! kernels' logic where no GPU is; the GPU tests (`gpu.rs`) check them on the device.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the emulator cannot compile, and what stands in for it.
const SUBSTITUTIONS: [(&str, &str); 4] = [
    (
        r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));"#,
        "f = sim_f16_to_f32(x.bits);",
    ),
    (
        r#"asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));"#,
        "r.bits = sim_f32_to_bf16(x);",
    ),
    (
        r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));"#,
        "r.bits = sim_f32_to_f16(x);",
    ),
    (
        "extern __shared__ float4 attention_smem[];",
        "alignas(16) inline float4 attention_smem[100 * 1024 / 16];",
    ),
];

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emulator")
}

#[test]
fn every_kernel_matches_a_double_precision_reference_in_the_emulator() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tensor/cuda/kernels");
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emulator");
    let generated = work.join("gen");
    std::fs::create_dir_all(&generated).unwrap();
    for entry in std::fs::read_dir(&kernels).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in SUBSTITUTIONS {
            text = text.replace(from, to);
        }
        assert!(
            !text.contains("asm(") && !text.contains("extern __shared__"),
            "{}: inline PTX or dynamic shared memory the emulator has no stand-in for",
            path.display()
        );
        std::fs::write(generated.join(path.file_name().unwrap()), text).unwrap();
    }
    let binary = work.join("kernels");
    let compiled = Command::new("g++")
        .args([
            "-std=c++17",
            "-O1",
            "-ffp-contract=off",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(&work)
        .arg("-I")
        .arg(here())
        .arg("-o")
        .arg(&binary)
        .arg(here().join("kernels.cpp"))
        .output()
        .expect("g++ runs (.ci/run installs it where it is missing)");
    assert!(
        compiled.status.success(),
        "the kernels do not compile in the emulator:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let out = Command::new(&binary).output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    eprintln!("{log}");
    let failed: Vec<&str> = log.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty() && log.contains("all passed"),
        "kernels that disagree with the reference:\n{}\n{}",
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every kernel family ran.
    for name in [
        "fill_f32",
        "gelu_bwd_f32",
        "embedding_bwd_wte_f32",
        "layernorm_fwd f32 out",
        "layernorm_fwd 16-bit out",
        "colsum_add",
        "crossentropy split dlogits",
        "sum_squares_f32",
        "adamw_bf16",
        "attention f32 b1 t130 nh1 hs80 dqkv",
        "attention bf16 b1 t70 nh1 hs64 dqkv",
        "attention f32 b1 t70 nh4 nkv2 hs32 dqkv",
        "attention f32 b2 t67 nh4 nkv1 hs64 dqkv",
        "attention bf16 b1 t70 nh4 nkv2 hs64 dqkv",
        "rmsnorm f32 bwd dweight",
        "rmsnorm bf16 bwd dinp",
        "rope f32 bwd of fwd",
        "rope bf16 fwd",
        "swiglu f32 bwd",
        "swiglu bf16 fwd",
    ] {
        assert!(log.contains(name), "{name} did not run:\n{log}");
    }
}
