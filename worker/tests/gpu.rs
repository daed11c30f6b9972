//! The CUDA backend against the CPU backend, on a GPU. Ignored by `cargo test` (CI has no GPU);
//! on a GPU machine run the prebuilt test binary with `--ignored` (bench/gpu/README.md says
//! how). Each op runs on both backends from the same random inputs and the outputs are
//! compared with the tolerance stated next to it:
//! - f32 storage: relative 1e-4 (absolute 1e-5): only the order of f32 sums differs;
//! - bf16 storage: relative 2e-2 (absolute 2e-2 x the output's scale): both round the same f32
//!   math to bf16, so results differ by the rounding of differently ordered sums, a few bf16
//!   ulps (2^-8 relative each).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::bf16;
use tessera_plan::memory::{Dtype, Place};
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::tensor::cuda::CudaBackend;
use tessera_worker::tensor::{AdamW, Backend, Dims, Linear, Tensor, rope_table};

const ARENA: usize = 256 << 20;

/// The same arena layout on both backends; handles are valid on either.
struct Pair {
    cpu: CpuBackend,
    gpu: CudaBackend,
    next: usize,
    seed: u64,
}

impl Pair {
    fn new() -> Pair {
        let gpu = CudaBackend::new(0, ARENA, 1 << 20, None).expect("a GPU and CUDA 13");
        Pair {
            cpu: CpuBackend::new(ARENA, 1 << 20).unwrap(),
            gpu,
            next: 0,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn alloc(&mut self, len: usize, dtype: Dtype) -> Tensor {
        let t = Tensor {
            place: Place::Device,
            offset: self.next,
            len,
            dtype,
        };
        self.next = (self.next + t.bytes()).next_multiple_of(256);
        assert!(self.next <= ARENA, "test arena too small");
        t
    }

    fn random(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                // xorshift64*: reproducible, no dependency.
                self.seed ^= self.seed >> 12;
                self.seed ^= self.seed << 25;
                self.seed ^= self.seed >> 27;
                let bits = self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                (bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A tensor holding the same random values on both backends.
    fn input(&mut self, len: usize, dtype: Dtype, scale: f32) -> Tensor {
        let t = self.alloc(len, dtype);
        let values = self.random(len, scale);
        self.put(t, &values);
        t
    }

    fn put(&mut self, t: Tensor, values: &[f32]) {
        self.cpu.write(t, values).unwrap();
        self.gpu.write(t, values).unwrap();
    }

    fn tokens(&mut self, n: usize, below: usize) -> Tensor {
        let t = self.alloc(n, Dtype::I32);
        let ids: Vec<i32> = self
            .random(n, 1.0)
            .iter()
            // Repeats on purpose: the embedding backward must sum them in order.
            .map(|v| ((v.abs() * below as f32) as usize % below) as i32)
            .collect();
        self.cpu.write_i32(t, &ids).unwrap();
        self.gpu.write_i32(t, &ids).unwrap();
        t
    }

    /// Compares `t` on both backends within the dtype's tolerance, scaled by `scale` (the
    /// size of the values the op sums: larger sums round more).
    fn check(&self, what: &str, t: Tensor, scale: f32) {
        let (mut want, mut got) = (vec![0.0; t.len], vec![0.0; t.len]);
        self.cpu.read(t, &mut want).unwrap();
        self.gpu.read(t, &mut got).unwrap();
        let (rtol, atol) = match t.dtype {
            Dtype::F32 => (1e-4, 1e-5 * scale),
            _ => (2e-2, 2e-2 * scale),
        };
        let mut worst = (0.0f32, 0usize);
        for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
            assert!(
                g.is_finite() == w.is_finite(),
                "{what}[{i}]: gpu {g}, cpu {w}"
            );
            let excess = (g - w).abs() - (atol + rtol * w.abs());
            if excess > worst.0 {
                worst = (excess, i);
            }
        }
        let i = worst.1;
        assert!(
            worst.0 <= 0.0,
            "{what} ({}): element {i} is {} on the GPU and {} on the CPU (rtol {rtol}, atol {atol})",
            t.dtype.name(),
            got[i],
            want[i]
        );
        eprintln!("{what} ({}): {} elements agree", t.dtype.name(), t.len);
    }
}

/// Runs the same call on both backends, each of which must succeed.
macro_rules! both {
    ($pair:expr, $method:ident($($arg:expr),* $(,)?)) => {{
        Backend::$method(&mut $pair.cpu, $($arg),*).unwrap();
        Backend::$method(&mut $pair.gpu, $($arg),*).unwrap();
    }};
}

const DTYPES: [Dtype; 2] = [Dtype::F32, Dtype::Bf16];

fn dims(b: usize, t: usize, nh: usize, hs: usize, v: usize, vp: usize, vocab_start: usize) -> Dims {
    Dims {
        b,
        t,
        c: nh * hs,
        nh,
        nkv: nh,
        hs,
        v,
        vp,
        vocab_start,
    }
}

#[test]
#[ignore = "needs a GPU"]
fn elementwise_ops_match_the_cpu() {
    for dt in DTYPES {
        let mut p = Pair::new();
        let n = 100_003; // not a multiple of any block
        let (a, b) = (p.input(n, dt, 3.0), p.input(n, dt, 3.0));
        let out = p.alloc(n, dt);
        both!(p, residual_fwd(out, a, b));
        p.check("residual_fwd", out, 3.0);
        both!(p, add(out, a));
        p.check("add", out, 3.0);
        both!(p, scale(out, -0.37));
        p.check("scale", out, 3.0);
        both!(p, gelu_fwd(out, a));
        p.check("gelu_fwd", out, 3.0);
        both!(p, gelu_bwd(out, b));
        p.check("gelu_bwd", out, 3.0);
        both!(p, fill(out, 0.1));
        p.check("fill", out, 1.0);
        for to in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let converted = p.alloc(n, to);
            both!(p, copy(converted, a));
            p.check(&format!("copy to {}", to.name()), converted, 3.0);
        }
        let partials = p.alloc(1024, Dtype::F32);
        let sums = [
            p.cpu.sum_squares(a, partials).unwrap(),
            p.gpu.sum_squares(a, partials).unwrap(),
        ];
        let rel = ((sums[0] - sums[1]) / sums[0]).abs();
        assert!(
            rel < 1e-6,
            "sum_squares {}: cpu {} gpu {}",
            dt.name(),
            sums[0],
            sums[1]
        );
    }
}

#[test]
#[ignore = "needs a GPU"]
fn embedding_and_layernorm_match_the_cpu() {
    for dt in DTYPES {
        for vocab_start in [0, 40] {
            let mut p = Pair::new();
            let d = dims(3, 67, 4, 32, 200, 96, vocab_start);
            let n = d.tokens();
            let tokens = p.tokens(n, d.v);
            let (wte, wpe) = (p.input(d.vp * d.c, dt, 1.0), p.input(d.t * d.c, dt, 1.0));
            let out = p.alloc(n * d.c, dt);
            both!(p, embedding_fwd(out, tokens, wte, Some(wpe), d));
            p.check("embedding_fwd", out, 2.0);
            let dout = p.input(n * d.c, dt, 1.0);
            let (dwte, dwpe) = (p.input(d.vp * d.c, dt, 1.0), p.input(d.t * d.c, dt, 1.0));
            both!(p, embedding_bwd(dwte, Some(dwpe), dout, tokens, d));
            p.check("embedding_bwd dwte", dwte, 4.0);
            p.check("embedding_bwd dwpe", dwpe, 4.0);
        }
        let mut p = Pair::new();
        let (rows, c) = (515, 768);
        let inp = p.input(rows * c, dt, 2.0);
        let (w, b) = (p.input(c, dt, 1.0), p.input(c, dt, 1.0));
        let out = p.alloc(rows * c, dt);
        let (mean, rstd) = (p.alloc(rows, Dtype::F32), p.alloc(rows, Dtype::F32));
        both!(p, layernorm_fwd(out, mean, rstd, inp, w, b, rows, c));
        p.check("layernorm_fwd out", out, 4.0);
        p.check("layernorm_fwd mean", mean, 1.0);
        p.check("layernorm_fwd rstd", rstd, 1.0);
        let dout = p.input(rows * c, dt, 1.0);
        let dinp = p.input(rows * c, dt, 1.0);
        let (dw, db) = (p.input(c, dt, 1.0), p.input(c, dt, 1.0));
        both!(
            p,
            layernorm_bwd(dinp, dw, db, dout, inp, w, mean, rstd, rows, c)
        );
        p.check("layernorm_bwd dinp", dinp, 4.0);
        p.check("layernorm_bwd dweight", dw, 40.0);
        p.check("layernorm_bwd dbias", db, 40.0);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn matmuls_match_the_cpu() {
    for dt in DTYPES {
        for (rows, inp, out) in [(1024, 768, 2304), (77, 129, 33)] {
            let mut p = Pair::new();
            let s = Linear { rows, inp, out };
            let x = p.input(rows * inp, dt, 1.0);
            let w = p.input(out * inp, dt, 0.1);
            let bias = p.input(out, dt, 1.0);
            let y = p.alloc(rows * out, dt);
            let scale = (inp as f32).sqrt() * 0.1;
            both!(p, matmul_fwd(y, x, w, Some(bias), s));
            p.check("matmul_fwd with bias", y, scale);
            both!(p, matmul_fwd(y, x, w, None, s));
            p.check("matmul_fwd", y, scale);
            let dy = p.input(rows * out, dt, 1.0);
            let dx = p.alloc(rows * inp, dt);
            let (dw, db) = (p.input(out * inp, dt, 1.0), p.input(out, dt, 1.0));
            both!(p, matmul_bwd(Some(dx), dw, Some(db), dy, x, w, s));
            p.check("matmul_bwd dinp", dx, (out as f32).sqrt() * 0.1);
            p.check("matmul_bwd dweight", dw, (rows as f32).sqrt());
            p.check("matmul_bwd dbias", db, (rows as f32).sqrt());
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn attention_matches_the_cpu() {
    for dt in DTYPES {
        for (t, hs) in [(130, 32), (64, 64), (200, 128), (1, 64)] {
            let mut p = Pair::new();
            let d = dims(2, t, 3, hs, 10, 10, 0);
            let n = d.tokens();
            let width = d.nh * d.hs;
            let qkv = p.input(n * 3 * width, dt, 1.0);
            let out = p.alloc(n * width, dt);
            let lse = p.alloc(n * d.nh, Dtype::F32);
            both!(p, attention_fwd(out, lse, qkv, d));
            p.check(&format!("attention_fwd out t={t} hs={hs}"), out, 1.0);
            p.check(&format!("attention_fwd lse t={t} hs={hs}"), lse, 4.0);
            let dout = p.input(n * width, dt, 1.0);
            let dqkv = p.alloc(n * 3 * width, dt);
            let delta = p.alloc(n * d.nh, Dtype::F32);
            both!(p, attention_bwd(dqkv, delta, dout, qkv, out, lse, d));
            p.check(&format!("attention_bwd t={t} hs={hs}"), dqkv, 2.0);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn grouped_query_attention_matches_the_cpu() {
    for dt in DTYPES {
        // Llama 3's ratio (32 / 8) and 2, a partial tile, head sizes of Llama (128) and less.
        for (t, nh, nkv, hs) in [(130, 8, 2, 128), (70, 4, 2, 64), (64, 4, 1, 32)] {
            let mut p = Pair::new();
            let d = Dims {
                nkv,
                ..dims(2, t, nh, hs, 10, 10, 0)
            };
            let n = d.tokens();
            let qkv = p.input(n * d.qkv_width(), dt, 1.0);
            let out = p.alloc(n * nh * hs, dt);
            let lse = p.alloc(n * nh, Dtype::F32);
            both!(p, attention_fwd(out, lse, qkv, d));
            let what = format!("t={t} nh={nh} nkv={nkv} hs={hs}");
            p.check(&format!("gqa attention_fwd out {what}"), out, 1.0);
            p.check(&format!("gqa attention_fwd lse {what}"), lse, 4.0);
            let dout = p.input(n * nh * hs, dt, 1.0);
            let dqkv = p.alloc(n * d.qkv_width(), dt);
            let delta = p.alloc(n * nh, Dtype::F32);
            both!(p, attention_bwd(dqkv, delta, dout, qkv, out, lse, d));
            // dk and dv sum over the group's query heads: larger sums.
            p.check(
                &format!("gqa attention_bwd {what}"),
                dqkv,
                2.0 * (nh / nkv) as f32,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn decoding_attention_matches_the_cpu() {
    for dt in DTYPES {
        let mut p = Pair::new();
        // Llama 3's heads on one rank (8 query, 2 key/value, 128 channels), rows past a tile.
        let d = Dims {
            nkv: 2,
            ..dims(1, 300, 8, 128, 10, 10, 0)
        };
        let qkv = p.input(d.tokens() * d.qkv_width(), dt, 1.0);
        for pos in [0, 63, 64, 299] {
            let out = p.alloc(d.nh * d.hs, dt);
            both!(p, attention_decode(out, qkv, pos, d));
            p.check(&format!("attention_decode pos {pos}"), out, 1.0);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn llama_ops_match_the_cpu() {
    for dt in DTYPES {
        let mut p = Pair::new();
        // RMSNorm over Llama 3 8B's width, rows not a multiple of anything.
        let (rows, c) = (67, 4096);
        let inp = p.input(rows * c, dt, 2.0);
        let w = p.input(c, dt, 1.0);
        let out = p.alloc(rows * c, dt);
        let rstd = p.alloc(rows, Dtype::F32);
        both!(p, rmsnorm_fwd(out, rstd, inp, w, rows, c, 1e-5));
        p.check("rmsnorm_fwd out", out, 4.0);
        p.check("rmsnorm_fwd rstd", rstd, 1.0);
        let dout = p.input(rows * c, dt, 1.0);
        let dinp = p.input(rows * c, dt, 1.0);
        let dw = p.input(c, dt, 1.0);
        both!(p, rmsnorm_bwd(dinp, dw, dout, inp, w, rstd, rows, c));
        p.check("rmsnorm_bwd dinp", dinp, 4.0);
        p.check("rmsnorm_bwd dweight", dw, 40.0);

        // Rotary embeddings on Llama 3's head layout (8 query, 2 key/value heads on a rank),
        // theta 500000, positions of two sequences from a longer table.
        let d = Dims {
            nkv: 2,
            ..dims(2, 300, 8, 128, 10, 10, 0)
        };
        let values = rope_table(512, d.hs, 500_000.0);
        let table = p.alloc(values.len(), Dtype::F32);
        p.put(table, &values);
        let qkv = p.input(d.tokens() * d.qkv_width(), dt, 1.0);
        both!(p, rope_fwd(qkv, table, d));
        p.check("rope_fwd", qkv, 1.0);
        both!(p, rope_bwd(qkv, table, d));
        p.check("rope_bwd", qkv, 1.0);

        // SwiGLU over rows of a width that is no multiple of the block.
        let (rows, f) = (129, 1001);
        let inp = p.input(rows * 2 * f, dt, 6.0);
        let out = p.alloc(rows * f, dt);
        both!(p, swiglu_fwd(out, inp, f));
        p.check("swiglu_fwd", out, 6.0);
        let dout = p.input(rows * f, dt, 1.0);
        let dinp = p.alloc(rows * 2 * f, dt);
        both!(p, swiglu_bwd(dinp, dout, inp, f));
        p.check("swiglu_bwd", dinp, 6.0);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn crossentropy_matches_the_cpu_whole_and_split_over_the_vocabulary() {
    for dt in DTYPES {
        let mut p = Pair::new();
        let (rows, v, vp) = (37, 50257, 50304);
        let d = dims(1, rows, 1, 8, v, vp, 0);
        let targets = p.tokens(rows, v);
        let logits = p.input(rows * vp, dt, 8.0);
        let [losses, max, sumexp] = [0; 3].map(|_| p.alloc(rows, Dtype::F32));
        both!(
            p,
            crossentropy_fwd_bwd(logits, losses, max, sumexp, targets, 1.0 / 37.0, d)
        );
        p.check("crossentropy_fwd_bwd losses", losses, 4.0);
        p.check("crossentropy_fwd_bwd dlogits", logits, 1e-3);

        // The second of two tensor-parallel shards of 25152 columns: ids 25152.. of 50257.
        let shard = dims(1, rows, 1, 8, v, vp / 2, vp / 2);
        let logits = p.input(rows * shard.vp, dt, 8.0);
        both!(p, crossentropy_max(logits, max, shard));
        p.check("crossentropy_max", max, 8.0);
        both!(
            p,
            crossentropy_sumexp(logits, losses, max, sumexp, targets, shard)
        );
        p.check("crossentropy_sumexp picked", losses, 8.0);
        p.check("crossentropy_sumexp sumexp", sumexp, 100.0);
        both!(
            p,
            crossentropy_finish(logits, losses, max, sumexp, targets, 0.5, shard)
        );
        p.check("crossentropy_finish losses", losses, 8.0);
        p.check("crossentropy_finish dlogits", logits, 1e-3);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn adamw_matches_the_cpu_with_and_without_master_weights() {
    let hyper = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        grad_scale: 0.5,
    };
    for dt in DTYPES {
        let mut p = Pair::new();
        let n = 70_001;
        let param = p.input(n, dt, 1.0);
        let grad = p.input(n, dt, 1.0);
        let (m, v) = (p.input(n, Dtype::F32, 0.1), p.alloc(n, Dtype::F32));
        let values: Vec<f32> = p.random(n, 0.01).iter().map(|x| x.abs()).collect();
        p.put(v, &values);
        let master = p.input(n, Dtype::F32, 1.0);
        for _ in 0..3 {
            both!(p, adamw(param, Some(master), m, v, Some(grad), hyper));
        }
        p.check("adamw master", master, 1.0);
        p.check("adamw param", param, 1.0);
        p.check("adamw m", m, 1.0);
        p.check("adamw v", v, 0.01);
        both!(p, adamw(param, Some(master), m, v, None, hyper));
        p.check("adamw, gradient read from param", param, 1.0);
        if dt == Dtype::F32 {
            both!(p, adamw(param, None, m, v, Some(grad), hyper));
            p.check("adamw without master", param, 1.0);
        }
    }
    // bf16 rounding of the result is the same function on both sides.
    assert_eq!(bf16::from_f32(1.0 / 3.0).to_bits(), 0x3eab);
}

// --- whole runs of the worker on the GPU ---

/// The repository (`TESSERA_REPO` where the binary runs on a copy elsewhere, as on a lent
/// GPU machine; see bench/gpu/tests.sh).
fn repo(path: &str) -> PathBuf {
    match std::env::var_os("TESSERA_REPO") {
        Some(root) => PathBuf::from(root).join(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path),
    }
}

fn worker_binary() -> PathBuf {
    std::env::var_os("TESSERA_WORKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tessera-worker").into())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-gpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `tessera-worker` alone on `config` with `sets` and returns its output and per-step
/// losses.
fn train(config: &str, sets: &[String], dir: &Path) -> (Output, Vec<f64>) {
    let metrics = dir.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics);
    let mut command = Command::new(worker_binary());
    command.arg("--config").arg(repo(config)).arg("--fresh");
    command.arg("--metrics").arg(&metrics);
    for set in sets {
        command.arg("--set").arg(set);
    }
    command
        .arg("--set")
        .arg(format!("checkpoint.dir={}", dir.join("ckpt").display()));
    let out = command.env_remove("TESSERA_COORDINATOR").output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let losses = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["loss"].as_f64().unwrap()
        })
        .collect();
    (out, losses)
}

fn one_rank(device: &str, precision: &str, steps: u64) -> Vec<String> {
    let backend = if device == "cuda" { "nccl" } else { "tcp" };
    [
        "parallel.data=1",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "cluster.gpus_per_node=1",
        "checkpoint.every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("cluster.device={device}"),
        format!("cluster.backend={backend}"),
        format!("training.precision={precision}"),
        format!("training.steps={steps}"),
    ])
    .collect()
}

#[test]
#[ignore = "needs a GPU"]
fn the_tiny_config_trains_on_the_gpu_like_on_the_cpu() {
    let dir = scratch("tiny");
    for precision in ["fp32", "bf16"] {
        let (_, cpu) = train(
            "configs/tiny-cpu.yaml",
            &one_rank("cpu", precision, 20),
            &dir,
        );
        let (out, gpu) = train(
            "configs/tiny-cpu.yaml",
            &one_rank("cuda", precision, 20),
            &dir,
        );
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(log.contains("device memory after the first step"), "{log}");
        assert_eq!(cpu.len(), 20);
        assert_eq!(gpu.len(), 20);
        let relative = |i: usize| ((gpu[i] - cpu[i]) / cpu[i]).abs();
        assert!(
            relative(0) < 1e-2,
            "{precision} step 1: gpu {} cpu {}",
            gpu[0],
            cpu[0]
        );
        for i in 0..20 {
            assert!(
                relative(i) < 2e-2,
                "{precision} step {}: gpu {} cpu {} (all: gpu {gpu:?} cpu {cpu:?})",
                i + 1,
                gpu[i],
                cpu[i]
            );
        }
        eprintln!("{precision}: cpu {cpu:?}\n{precision}: gpu {gpu:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// GPT-2 124M for 200 steps on an llm.c-format shard (this repository's Rust sources as
/// byte tokens: no tokenizer or download needed, and text a model can learn); also checks the
/// memory plan against the GPU's own count after the first step.
#[test]
#[ignore = "needs a GPU"]
fn gpt2_124m_learns_from_llmc_shards_within_its_planned_memory() {
    let dir = scratch("124m");
    let mut text = Vec::new();
    for folder in ["worker/src", "plan/src", "launcher/src"] {
        collect_sources(&repo(folder), &mut text);
    }
    let tokens: Vec<u16> = text.iter().map(|&b| b as u16).collect();
    let shard = dir.join("train_000.bin");
    tessera_worker::data::write_shard(&shard, &tokens).unwrap();
    let mut sets = one_rank("cuda", "bf16", 200);
    sets.extend([
        "training.global_batch=16".to_string(),
        "training.micro_batch=16".into(),
        "data.kind=tokens".into(),
        format!("data.path={}", shard.display()),
    ]);
    let (out, losses) = train("configs/gpt2-124m.yaml", &sets, &dir);
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{log}");
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[190..]));
    assert!(
        last < first - 1.0,
        "the loss falls: first 10 steps {first:.3}, last 10 {last:.3}"
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("device memory after the first step"))
        .unwrap_or_else(|| panic!("no memory line: {log}"));
    let percent: f64 = line
        .rsplit(", ")
        .next()
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(percent.abs() <= 2.0, "measured vs planned: {line}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn collect_sources(dir: &Path, out: &mut Vec<u8>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
}
