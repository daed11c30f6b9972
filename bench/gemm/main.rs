//! Times tessera's CPU gemm against `matrixmultiply` (with its `threading` feature) on the three
//! products of a transformer's linear layer, with the same thread count for both.
//!
//! Run: `CARGO_TARGET_DIR=/tmp/bench-gemm-target cargo run --release --manifest-path
//! bench/gemm/Cargo.toml`, optionally with `MATMUL_NUM_THREADS=n` (default: every core).
//! `MATMUL_NUM_THREADS` sizes matrixmultiply's pool; ours runs in a rayon pool of the same size.

use std::time::{Duration, Instant};

use tessera_worker::tensor::cpu::gemm::{Mat, MatMut, gemm, warm_up};

/// Timed runs per measurement, after one untimed run each; the median is reported.
const REPS: usize = 9;

/// One linear layer: tokens N, input features I, output features O.
struct Layer {
    tokens: usize,
    inputs: usize,
    outputs: usize,
}

const LAYERS: [Layer; 3] = [
    // GPT-2 small: the fused qkv projection, the MLP up- and down-projections.
    Layer {
        tokens: 2048,
        inputs: 768,
        outputs: 2304,
    },
    Layer {
        tokens: 2048,
        inputs: 768,
        outputs: 3072,
    },
    Layer {
        tokens: 2048,
        inputs: 3072,
        outputs: 768,
    },
];

/// The three products of a linear layer, the weight W in PyTorch's (O, I) layout.
#[derive(Clone, Copy)]
enum Pattern {
    /// out(N,O) = inp(N,I) @ W(O,I)^T
    Forward,
    /// dinp(N,I) = dout(N,O) @ W(O,I)
    BackwardData,
    /// dW(O,I) += dout(N,O)^T @ inp(N,I)
    BackwardWeight,
}

const PATTERNS: [Pattern; 3] = [
    Pattern::Forward,
    Pattern::BackwardData,
    Pattern::BackwardWeight,
];

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Forward => "fwd  out = inp @ W^T",
            Pattern::BackwardData => "bwd  dinp = dout @ W",
            Pattern::BackwardWeight => "bwd  dW += dout^T @ inp",
        }
    }

    /// (m, k, n) of the product.
    fn dims(self, layer: &Layer) -> (usize, usize, usize) {
        let (n, i, o) = (layer.tokens, layer.inputs, layer.outputs);
        match self {
            Pattern::Forward => (n, i, o),
            Pattern::BackwardData => (n, o, i),
            Pattern::BackwardWeight => (o, n, i),
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1).
fn filled(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Untimed pause between runs, so that the other implementation's idle threads, which spin a
/// while before sleeping, are asleep when the timed run starts.
const SETTLE: Duration = Duration::from_millis(20);

/// Median times of `ours` and `theirs`, run alternately so that load from other processes
/// falls on both alike.
fn time_both(mut ours: impl FnMut(), mut theirs: impl FnMut()) -> (Duration, Duration) {
    ours();
    theirs();
    let timed = |f: &mut dyn FnMut()| {
        std::thread::sleep(SETTLE);
        let start = Instant::now();
        f();
        start.elapsed()
    };
    let (mut ours_times, mut theirs_times) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        ours_times.push(timed(&mut ours));
        theirs_times.push(timed(&mut theirs));
    }
    (median(ours_times), median(theirs_times))
}

/// Times one product with both implementations: (ours, matrixmultiply).
fn measure(pool: &rayon::ThreadPool, layer: &Layer, pattern: Pattern) -> (Duration, Duration) {
    let (n, i, o) = (layer.tokens, layer.inputs, layer.outputs);
    let (m, k, cols) = pattern.dims(layer);
    let inp = filled(n * i, 1);
    let weight = filled(o * i, 2);
    let dout = filled(n * o, 3);
    let mut ours_out = vec![0.0f32; m * cols];
    let mut theirs_out = vec![0.0f32; m * cols];
    let ours = || {
        let out = MatMut::row_major(&mut ours_out, m, cols);
        pool.install(|| match pattern {
            Pattern::Forward => gemm(
                out,
                Mat::row_major(&inp, n, i),
                Mat::transposed(&weight, i, o),
                false,
            ),
            Pattern::BackwardData => gemm(
                out,
                Mat::row_major(&dout, n, o),
                Mat::row_major(&weight, o, i),
                false,
            ),
            Pattern::BackwardWeight => gemm(
                out,
                Mat::transposed(&dout, o, n),
                Mat::row_major(&inp, n, i),
                true,
            ),
        });
    };
    let theirs = || {
        // The same operands in matrixmultiply's convention: (data, row stride, column stride).
        let ((a, rsa, csa), (b, rsb, csb), beta) = match pattern {
            Pattern::Forward => ((&inp, i, 1), (&weight, 1, i), 0.0),
            Pattern::BackwardData => ((&dout, o, 1), (&weight, i, 1), 0.0),
            Pattern::BackwardWeight => ((&dout, 1, o), (&inp, i, 1), 1.0),
        };
        // SAFETY: the strides describe (m, k), (k, cols) and (m, cols) matrices that lie inside
        // the vectors passed, and the output vector is distinct from the inputs.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                cols,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                beta,
                theirs_out.as_mut_ptr(),
                cols as isize,
                1,
            );
        }
    };
    let times = time_both(ours, theirs);
    // Both ran (and, for dW, accumulated) the same number of times, so the outputs agree.
    let worst = ours_out
        .iter()
        .zip(&theirs_out)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-3,
        "{}: results differ by {worst}",
        pattern.name()
    );
    times
}

fn main() {
    let threads = match std::env::var("MATMUL_NUM_THREADS") {
        Ok(value) => value
            .parse()
            .expect("MATMUL_NUM_THREADS must be a positive integer"),
        Err(_) => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            // SAFETY: no other thread exists yet, so nothing reads the environment meanwhile;
            // matrixmultiply reads it on its first call.
            unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
            threads
        }
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("build the rayon pool");
    pool.install(warm_up);
    println!(
        "{threads} threads for both (rayon pool, MATMUL_NUM_THREADS); f32; median of {REPS} \
         alternating runs"
    );
    println!(
        "{:<26} {:>16} {:>10} {:>10} {:>12}",
        "product", "m x k x n", "ours GF/s", "mm GF/s", "ours / mm"
    );
    let mut log_ratio_sum = 0.0;
    for layer in &LAYERS {
        for pattern in PATTERNS {
            let (m, k, n) = pattern.dims(layer);
            let (ours, theirs) = measure(&pool, layer, pattern);
            let flops = 2.0 * (m * k * n) as f64;
            let gflops = |time: Duration| flops / time.as_secs_f64() / 1e9;
            let ratio = theirs.as_secs_f64() / ours.as_secs_f64();
            log_ratio_sum += ratio.ln();
            println!(
                "{:<26} {:>16} {:>10.1} {:>10.1} {:>12.2}",
                pattern.name(),
                format!("{m}x{k}x{n}"),
                gflops(ours),
                gflops(theirs),
                ratio
            );
        }
    }
    let geomean = (log_ratio_sum / (LAYERS.len() * PATTERNS.len()) as f64).exp();
    println!("geometric mean of ours / mm (speed ratio): {geomean:.2}");
}
