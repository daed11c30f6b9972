//! Every kernel's backward against central finite differences of an f64 reference forward,
//! and every forward against that reference. Each check is one body generic over `Backend`;
//! it runs on the CPU backend (and, when a CUDA backend exists and finds a device, there too).

use tessera_plan::memory::{Dtype, Place};
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::tensor::{AdamW, Backend, Dims, Linear, Tensor, rope_table};

/// f32 kernels against an f64 reference: forward outputs agree to this, relative to the
/// largest magnitude in the tensor.
const FORWARD_RTOL: f64 = 1e-5;
/// f32 backward against f64 central differences (step `FD_STEP`), relative to the largest
/// gradient in the tensor: f32 accumulation over a few hundred terms loses ~1e-6.
const GRAD_RTOL: f64 = 1e-4;
const FD_STEP: f64 = 1e-5;

/// Hands out tensors from one backend arena, like the arena layout does.
struct Bump<B: Backend> {
    backend: B,
    offset: usize,
    rng: u64,
}

impl Bump<CpuBackend> {
    fn cpu() -> Bump<CpuBackend> {
        Bump {
            backend: CpuBackend::new(8 << 20, 0).unwrap(),
            offset: 0,
            rng: 12345,
        }
    }
}

impl<B: Backend> Bump<B> {
    fn tensor(&mut self, len: usize, dtype: Dtype) -> Tensor {
        let t = Tensor {
            place: Place::Device,
            offset: self.offset,
            len,
            dtype,
        };
        self.offset += (len * dtype.size() as usize).div_ceil(256) * 256;
        t
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// A tensor of uniform values in `[-scale, scale]`, also returned as f64.
    fn input(&mut self, len: usize, scale: f64) -> (Tensor, Vec<f64>) {
        let values: Vec<f64> = (0..len).map(|_| self.random() * scale).collect();
        let as_f32: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let t = self.tensor(len, Dtype::F32);
        self.backend.write(t, &as_f32).unwrap();
        // The kernel sees the f32-rounded values; so must the reference.
        (t, as_f32.iter().map(|&v| v as f64).collect())
    }

    fn zeros(&mut self, len: usize, dtype: Dtype) -> Tensor {
        let t = self.tensor(len, dtype);
        self.backend.fill(t, 0.0).unwrap();
        t
    }

    fn read(&self, t: Tensor) -> Vec<f64> {
        let mut out = vec![0f32; t.len];
        self.backend.read(t, &mut out).unwrap();
        out.into_iter().map(f64::from).collect()
    }
}

fn max_abs(values: &[f64]) -> f64 {
    values.iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn assert_close(what: &str, ours: &[f64], expected: &[f64], rtol: f64) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths");
    let scale = max_abs(expected).max(1e-6);
    for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
        assert!(
            (a - b).abs() <= rtol * scale,
            "{what}[{i}]: ours {a}, reference {b} (scale {scale})"
        );
    }
}

/// d/dx of `sum(f(x) * dout)` by central differences, for every element of `x`.
fn finite_differences(x: &[f64], dout: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + FD_STEP;
            let up: f64 = f(&x).iter().zip(dout).map(|(a, b)| a * b).sum();
            x[i] = orig - FD_STEP;
            let down: f64 = f(&x).iter().zip(dout).map(|(a, b)| a * b).sum();
            x[i] = orig;
            (up - down) / (2.0 * FD_STEP)
        })
        .collect()
}

// --- f64 references ---

mod reference {
    pub fn layernorm(x: &[f64], w: &[f64], b: &[f64], c: usize) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / c as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                row.iter()
                    .enumerate()
                    .map(move |(j, v)| (v - mean) * rstd * w[j] + b[j])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, inp: usize, out: usize) -> Vec<f64> {
        x.chunks(inp)
            .flat_map(|row| {
                (0..out)
                    .map(|o| {
                        let dot: f64 = (0..inp).map(|i| row[i] * w[o * inp + i]).sum();
                        dot + b.map_or(0.0, |b| b[o])
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn gelu(x: &[f64]) -> Vec<f64> {
        let s = (2.0 / std::f64::consts::PI).sqrt();
        x.iter()
            .map(|&v| 0.5 * v * (1.0 + (s * (v + 0.044715 * v * v * v)).tanh()))
            .collect()
    }

    /// Causal softmax attention from `qkv (b t, (nh + 2 nkv) hs)` laid out `[q | k | v]`, query
    /// head h reading key/value head h / (nh / nkv).
    pub fn attention(
        qkv: &[f64],
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Vec<f64> {
        let width = nh * hs;
        let stride = (nh + 2 * nkv) * hs;
        let mut out = vec![0.0; b * t * width];
        let at = |bb: usize, i: usize, part: usize, h: usize, d: usize| {
            let column = match part {
                0 => h * hs,
                1 => width + h / (nh / nkv) * hs,
                _ => width + (nkv + h / (nh / nkv)) * hs,
            };
            qkv[(bb * t + i) * stride + column + d]
        };
        for bb in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hs)
                                .map(|d| at(bb, i, 0, h, d) * at(bb, j, 1, h, d))
                                .sum::<f64>()
                                / (hs as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for d in 0..hs {
                        out[(bb * t + i) * width + h * hs + d] = scores
                            .iter()
                            .enumerate()
                            .map(|(j, s)| (s - max).exp() / sum * at(bb, j, 2, h, d))
                            .sum();
                    }
                }
            }
        }
        out
    }

    /// `x * (mean(x^2) + eps)^-1/2 * w` per row.
    pub fn rmsnorm(x: &[f64], w: &[f64], c: usize, eps: f64) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|row| {
                let mean_square = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
                let rstd = 1.0 / (mean_square + eps).sqrt();
                row.iter()
                    .enumerate()
                    .map(move |(j, v)| v * rstd * w[j])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The rotate-half rotation of the q and k heads of each `qkv` row by the angles of its
    /// position `row % t`, given as cos and sin per row of `table`.
    pub fn rope(x: &[f64], table: &[f64], t: usize, nh: usize, nkv: usize, hs: usize) -> Vec<f64> {
        let (half, stride) = (hs / 2, (nh + 2 * nkv) * hs);
        let mut out = x.to_vec();
        for (row, chunk) in out.chunks_mut(stride).enumerate() {
            let angles = &table[(row % t) * hs..][..hs];
            for head in chunk[..(nh + nkv) * hs].chunks_mut(hs) {
                for j in 0..half {
                    let (a, b) = (head[j], head[half + j]);
                    head[j] = a * angles[j] - b * angles[half + j];
                    head[half + j] = b * angles[j] + a * angles[half + j];
                }
            }
        }
        out
    }

    /// `silu(gate) * up` for rows `[gate (f) | up (f)]`.
    pub fn swiglu(x: &[f64], f: usize) -> Vec<f64> {
        x.chunks(2 * f)
            .flat_map(|row| (0..f).map(move |j| row[j] / (1.0 + (-row[j]).exp()) * row[f + j]))
            .collect()
    }

    /// `-log softmax(logits[r, ..v])[target_r]` per row of width `vp`.
    pub fn crossentropy(logits: &[f64], targets: &[i32], v: usize, vp: usize) -> Vec<f64> {
        logits
            .chunks(vp)
            .zip(targets)
            .map(|(row, &target)| {
                let real = &row[..v];
                let max = real.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + real.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
                lse - real[target as usize]
            })
            .collect()
    }
}

// --- the checks, generic over the backend ---

fn check_layernorm<B: Backend>(bump: &mut Bump<B>) {
    let (rows, c) = (5, 24);
    let (x, xv) = bump.input(rows * c, 2.0);
    let (w, wv) = bump.input(c, 1.0);
    let (b, bv) = bump.input(c, 0.5);
    let out = bump.zeros(rows * c, Dtype::F32);
    let (mean, rstd) = (bump.zeros(rows, Dtype::F32), bump.zeros(rows, Dtype::F32));
    bump.backend
        .layernorm_fwd(out, mean, rstd, x, w, b, rows, c)
        .unwrap();
    let expected = reference::layernorm(&xv, &wv, &bv, c);
    assert_close("layernorm out", &bump.read(out), &expected, FORWARD_RTOL);

    let (dout, doutv) = bump.input(rows * c, 1.0);
    // dinp accumulates (the residual stream): start from a known value.
    let (dx, dx0) = bump.input(rows * c, 1.0);
    let (dw, dwv0) = bump.input(c, 1.0);
    let (db, dbv0) = bump.input(c, 1.0);
    bump.backend
        .layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, rows, c)
        .unwrap();
    let fd_x = finite_differences(&xv, &doutv, |x| reference::layernorm(x, &wv, &bv, c));
    let fd_w = finite_differences(&wv, &doutv, |w| reference::layernorm(&xv, w, &bv, c));
    let fd_b = finite_differences(&bv, &doutv, |b| reference::layernorm(&xv, &wv, b, c));
    let added = |after: Vec<f64>, before: &[f64]| -> Vec<f64> {
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    };
    assert_close(
        "layernorm dinp (+=)",
        &added(bump.read(dx), &dx0),
        &fd_x,
        GRAD_RTOL,
    );
    assert_close(
        "layernorm dweight (+=)",
        &added(bump.read(dw), &dwv0),
        &fd_w,
        GRAD_RTOL,
    );
    assert_close(
        "layernorm dbias (+=)",
        &added(bump.read(db), &dbv0),
        &fd_b,
        GRAD_RTOL,
    );
}

fn check_matmul<B: Backend>(bump: &mut Bump<B>) {
    // Shapes that cross the GEMM's blocking at least once in some dimension.
    for (rows, inp, out) in [(3, 5, 7), (19, 33, 70), (70, 9, 130)] {
        let shape = Linear { rows, inp, out };
        let (x, xv) = bump.input(rows * inp, 1.0);
        let (w, wv) = bump.input(out * inp, 1.0);
        let (b, bv) = bump.input(out, 1.0);
        let y = bump.zeros(rows * out, Dtype::F32);
        bump.backend.matmul_fwd(y, x, w, Some(b), shape).unwrap();
        let expected = reference::linear(&xv, &wv, Some(&bv), inp, out);
        assert_close("matmul out", &bump.read(y), &expected, FORWARD_RTOL);

        let (dy, dyv) = bump.input(rows * out, 1.0);
        let dx = bump.zeros(rows * inp, Dtype::F32);
        let (dw, dw0) = bump.input(out * inp, 1.0);
        let (db, db0) = bump.input(out, 1.0);
        bump.backend
            .matmul_bwd(Some(dx), dw, Some(db), dy, x, w, shape)
            .unwrap();
        // The map is linear, so its exact gradients are cheap: dx = dy W, dW = dy^T x, db =
        // sum dy. Differences check the formulas once, on the small shape.
        let exact_dx: Vec<f64> = (0..rows * inp)
            .map(|k| {
                (0..out)
                    .map(|o| dyv[k / inp * out + o] * wv[o * inp + k % inp])
                    .sum()
            })
            .collect();
        let exact_dw: Vec<f64> = (0..out * inp)
            .map(|k| {
                dw0[k]
                    + (0..rows)
                        .map(|r| dyv[r * out + k / inp] * xv[r * inp + k % inp])
                        .sum::<f64>()
            })
            .collect();
        let exact_db: Vec<f64> = (0..out)
            .map(|o| db0[o] + (0..rows).map(|r| dyv[r * out + o]).sum::<f64>())
            .collect();
        if rows * inp * out < 1000 {
            let fd_x = finite_differences(&xv, &dyv, |x| {
                reference::linear(x, &wv, Some(&bv), inp, out)
            });
            assert_close("matmul dinp formula", &exact_dx, &fd_x, GRAD_RTOL);
            let fd_w = finite_differences(&wv, &dyv, |w| {
                reference::linear(&xv, w, Some(&bv), inp, out)
            });
            let fd_w: Vec<f64> = fd_w.iter().zip(&dw0).map(|(g, a)| g + a).collect();
            assert_close("matmul dweight formula", &exact_dw, &fd_w, GRAD_RTOL);
        }
        assert_close("matmul dinp", &bump.read(dx), &exact_dx, GRAD_RTOL);
        assert_close("matmul dweight (+=)", &bump.read(dw), &exact_dw, GRAD_RTOL);
        assert_close("matmul dbias (+=)", &bump.read(db), &exact_db, GRAD_RTOL);
    }
}

/// Sizes of attention's tensors: `b` sequences of `t`, `nh` query and `nkv` key/value heads.
fn attention_dims(b: usize, t: usize, nh: usize, nkv: usize, hs: usize) -> Dims {
    Dims {
        b,
        t,
        c: nh * hs,
        nh,
        nkv,
        hs,
        v: 1,
        vp: 1,
        vocab_start: 0,
    }
}

/// Multi-head attention (`nkv == nh`) and grouped-query attention (`nkv < nh`).
fn check_attention<B: Backend>(bump: &mut Bump<B>, shapes: &[(usize, usize, usize, usize, usize)]) {
    for &(b, t, nh, nkv, hs) in shapes {
        let dims = attention_dims(b, t, nh, nkv, hs);
        let what = format!("attention b{b} t{t} nh{nh} nkv{nkv} hs{hs}");
        let n = b * t;
        let (qkv, qkvv) = bump.input(n * dims.qkv_width(), 1.5);
        let out = bump.zeros(n * nh * hs, Dtype::F32);
        let lse = bump.zeros(n * nh, Dtype::F32);
        bump.backend.attention_fwd(out, lse, qkv, dims).unwrap();
        let expected = reference::attention(&qkvv, b, t, nh, nkv, hs);
        assert_close(
            &format!("{what} out"),
            &bump.read(out),
            &expected,
            FORWARD_RTOL,
        );

        let (dout, doutv) = bump.input(n * nh * hs, 1.0);
        let dqkv = bump.zeros(n * dims.qkv_width(), Dtype::F32);
        let delta = bump.zeros(n * nh, Dtype::F32);
        bump.backend
            .attention_bwd(dqkv, delta, dout, qkv, out, lse, dims)
            .unwrap();
        let fd = finite_differences(&qkvv, &doutv, |qkv| {
            reference::attention(qkv, b, t, nh, nkv, hs)
        });
        assert_close(&format!("{what} dqkv"), &bump.read(dqkv), &fd, GRAD_RTOL);
    }
}

/// Grouped-query attention is multi-head attention with each key/value head repeated for the
/// query heads of its group (as Hugging Face's `repeat_kv` computes it): the same outputs to
/// the bit, the same dq, and dk, dv the sums over each group of the repeated heads' gradients.
fn check_grouped_attention_is_repeated_heads<B: Backend>(bump: &mut Bump<B>) {
    let (b, t, nh, nkv, hs) = (1, 70, 4, 2, 8);
    let group = nh / nkv;
    let grouped = attention_dims(b, t, nh, nkv, hs);
    let repeated = attention_dims(b, t, nh, nh, hs);
    let n = b * t;
    let (qkv, qkvv) = bump.input(n * grouped.qkv_width(), 1.5);
    let head = |row: &[f64], column: usize| row[column * hs..][..hs].to_vec();
    let expanded: Vec<f64> = qkvv
        .chunks(grouped.qkv_width())
        .flat_map(|row| {
            let mut wide = row[..nh * hs].to_vec();
            for part in 0..2 {
                for h in 0..nh {
                    wide.extend(head(row, nh + part * nkv + h / group));
                }
            }
            wide
        })
        .collect();
    let qkv_wide = bump.tensor(expanded.len(), Dtype::F32);
    let as_f32: Vec<f32> = expanded.iter().map(|&v| v as f32).collect();
    bump.backend.write(qkv_wide, &as_f32).unwrap();
    let (out, lse) = (
        bump.zeros(n * nh * hs, Dtype::F32),
        bump.zeros(n * nh, Dtype::F32),
    );
    let (out_wide, lse_wide) = (
        bump.zeros(out.len, Dtype::F32),
        bump.zeros(lse.len, Dtype::F32),
    );
    bump.backend.attention_fwd(out, lse, qkv, grouped).unwrap();
    bump.backend
        .attention_fwd(out_wide, lse_wide, qkv_wide, repeated)
        .unwrap();
    assert_eq!(bump.read(out), bump.read(out_wide), "grouped attention out");
    assert_eq!(bump.read(lse), bump.read(lse_wide), "grouped attention lse");

    let (dout, _) = bump.input(out.len, 1.0);
    let dqkv = bump.zeros(qkv.len, Dtype::F32);
    let dqkv_wide = bump.zeros(qkv_wide.len, Dtype::F32);
    let (delta, delta_wide) = (
        bump.zeros(lse.len, Dtype::F32),
        bump.zeros(lse.len, Dtype::F32),
    );
    bump.backend
        .attention_bwd(dqkv, delta, dout, qkv, out, lse, grouped)
        .unwrap();
    bump.backend
        .attention_bwd(
            dqkv_wide, delta_wide, dout, qkv_wide, out_wide, lse_wide, repeated,
        )
        .unwrap();
    let summed: Vec<f64> = bump
        .read(dqkv_wide)
        .chunks(repeated.qkv_width())
        .flat_map(|row| {
            let mut narrow = row[..nh * hs].to_vec();
            for part in 0..2 {
                for kv in 0..nkv {
                    let mut sum = vec![0.0; hs];
                    for h in kv * group..(kv + 1) * group {
                        for (s, g) in sum.iter_mut().zip(head(row, nh + part * nh + h)) {
                            *s += g;
                        }
                    }
                    narrow.extend(sum);
                }
            }
            narrow
        })
        .collect();
    let ours = bump.read(dqkv);
    let width = grouped.qkv_width();
    for (r, (a, e)) in ours.chunks(width).zip(summed.chunks(width)).enumerate() {
        assert_eq!(a[..nh * hs], e[..nh * hs], "grouped attention dq, row {r}");
    }
    assert_close("grouped attention dk, dv", &ours, &summed, 1e-6);
}

fn check_rmsnorm<B: Backend>(bump: &mut Bump<B>) {
    let (rows, c, eps) = (5, 24, 1e-5);
    let (x, xv) = bump.input(rows * c, 2.0);
    let (w, wv) = bump.input(c, 1.0);
    let out = bump.zeros(rows * c, Dtype::F32);
    let rstd = bump.zeros(rows, Dtype::F32);
    bump.backend
        .rmsnorm_fwd(out, rstd, x, w, rows, c, eps as f32)
        .unwrap();
    let expected = reference::rmsnorm(&xv, &wv, c, eps);
    assert_close("rmsnorm out", &bump.read(out), &expected, FORWARD_RTOL);
    let expected_rstd: Vec<f64> = xv
        .chunks(c)
        .map(|row| 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt())
        .collect();
    assert_close(
        "rmsnorm rstd",
        &bump.read(rstd),
        &expected_rstd,
        FORWARD_RTOL,
    );

    let (dout, doutv) = bump.input(rows * c, 1.0);
    // dinp accumulates (the residual stream), and so does dweight: start from known values.
    let (dx, dx0) = bump.input(rows * c, 1.0);
    let (dw, dw0) = bump.input(c, 1.0);
    bump.backend
        .rmsnorm_bwd(dx, dw, dout, x, w, rstd, rows, c)
        .unwrap();
    let fd_x = finite_differences(&xv, &doutv, |x| reference::rmsnorm(x, &wv, c, eps));
    let fd_w = finite_differences(&wv, &doutv, |w| reference::rmsnorm(&xv, w, c, eps));
    let added = |after: Vec<f64>, before: &[f64]| -> Vec<f64> {
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    };
    assert_close(
        "rmsnorm dinp (+=)",
        &added(bump.read(dx), &dx0),
        &fd_x,
        GRAD_RTOL,
    );
    assert_close(
        "rmsnorm dweight (+=)",
        &added(bump.read(dw), &dw0),
        &fd_w,
        GRAD_RTOL,
    );
}

fn check_rope<B: Backend>(bump: &mut Bump<B>) {
    // Two sequences (positions restart), a table longer than the sequence, GQA's layout.
    let (b, t, nh, nkv, hs, t_max) = (2, 5, 4, 2, 6, 9);
    let dims = attention_dims(b, t, nh, nkv, hs);
    let values = rope_table(t_max, hs, 10_000.0);
    let table = bump.tensor(values.len(), Dtype::F32);
    bump.backend.write(table, &values).unwrap();
    let tablev: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let n = b * t * dims.qkv_width();
    let (x, xv) = bump.input(n, 1.0);
    bump.backend.rope_fwd(x, table, dims).unwrap();
    let rotated = bump.read(x);
    let expected = reference::rope(&xv, &tablev, t, nh, nkv, hs);
    assert_close("rope out", &rotated, &expected, FORWARD_RTOL);
    let values_of = |v: &[f64]| -> Vec<f64> {
        v.chunks(dims.qkv_width())
            .flat_map(|row| row[(nh + nkv) * hs..].to_vec())
            .collect()
    };
    assert_eq!(
        values_of(&rotated),
        values_of(&xv),
        "the value heads are not rotated"
    );

    // The rotation is orthogonal: the backward (its transpose) undoes the forward.
    bump.backend.rope_bwd(x, table, dims).unwrap();
    assert_close("rope_bwd(rope_fwd(x))", &bump.read(x), &xv, 1e-6);

    // The backward is the gradient of the forward.
    let (dout, doutv) = bump.input(n, 1.0);
    bump.backend.rope_bwd(dout, table, dims).unwrap();
    let fd = finite_differences(&xv, &doutv, |x| reference::rope(x, &tablev, t, nh, nkv, hs));
    assert_close("rope dinp", &bump.read(dout), &fd, GRAD_RTOL);
}

fn check_swiglu<B: Backend>(bump: &mut Bump<B>) {
    let (rows, f) = (3, 7);
    let (x, xv) = bump.input(rows * 2 * f, 5.0);
    let out = bump.zeros(rows * f, Dtype::F32);
    bump.backend.swiglu_fwd(out, x, f).unwrap();
    assert_close(
        "swiglu out",
        &bump.read(out),
        &reference::swiglu(&xv, f),
        FORWARD_RTOL,
    );
    let (dout, doutv) = bump.input(rows * f, 1.0);
    // Overwritten, not accumulated: start from garbage.
    let (dx, _) = bump.input(rows * 2 * f, 100.0);
    bump.backend.swiglu_bwd(dx, dout, x, f).unwrap();
    let fd = finite_differences(&xv, &doutv, |x| reference::swiglu(x, f));
    assert_close("swiglu dinp", &bump.read(dx), &fd, GRAD_RTOL);
}

fn check_gelu<B: Backend>(bump: &mut Bump<B>) {
    let (x, xv) = bump.input(300, 4.0);
    let y = bump.zeros(300, Dtype::F32);
    bump.backend.gelu_fwd(y, x).unwrap();
    assert_close(
        "gelu out",
        &bump.read(y),
        &reference::gelu(&xv),
        FORWARD_RTOL,
    );
    let (d, dv) = bump.input(300, 1.0);
    bump.backend.gelu_bwd(d, x).unwrap();
    let fd = finite_differences(&xv, &dv, reference::gelu);
    assert_close("gelu dinp", &bump.read(d), &fd, GRAD_RTOL);
}

fn check_crossentropy<B: Backend>(bump: &mut Bump<B>) {
    let (rows, v, vp) = (6, 10, 16);
    let dims = Dims {
        b: 1,
        t: rows,
        c: 1,
        nh: 1,
        nkv: 1,
        hs: 1,
        v,
        vp,
        vocab_start: 0,
    };
    let (logits, logitsv) = bump.input(rows * vp, 3.0);
    let targets: Vec<i32> = (0..rows as i32).map(|r| (r * 7) % v as i32).collect();
    let target_t = bump.tensor(rows, Dtype::I32);
    bump.backend.write_i32(target_t, &targets).unwrap();
    let losses = bump.zeros(rows, Dtype::F32);
    let (max, sumexp) = (bump.zeros(rows, Dtype::F32), bump.zeros(rows, Dtype::F32));
    let dloss = 0.25;
    bump.backend
        .crossentropy_fwd_bwd(logits, losses, max, sumexp, target_t, dloss as f32, dims)
        .unwrap();
    let expected = reference::crossentropy(&logitsv, &targets, v, vp);
    assert_close(
        "crossentropy losses",
        &bump.read(losses),
        &expected,
        FORWARD_RTOL,
    );
    let fd = finite_differences(&logitsv, &vec![dloss; rows], |l| {
        reference::crossentropy(l, &targets, v, vp)
    });
    assert_close("crossentropy dlogits", &bump.read(logits), &fd, GRAD_RTOL);
}

fn check_embedding<B: Backend>(bump: &mut Bump<B>) {
    let (b, t, c, vp) = (2, 4, 8, 6);
    let dims = Dims {
        b,
        t,
        c,
        nh: 1,
        nkv: 1,
        hs: c,
        v: vp,
        vp,
        vocab_start: 0,
    };
    let tokens = [1, 5, 1, 0, 3, 3, 3, 2];
    let tok = bump.tensor(b * t, Dtype::I32);
    bump.backend.write_i32(tok, &tokens).unwrap();
    let (wte, wtev) = bump.input(vp * c, 1.0);
    let (wpe, wpev) = bump.input(t * c, 1.0);
    let out = bump.zeros(b * t * c, Dtype::F32);
    bump.backend
        .embedding_fwd(out, tok, wte, Some(wpe), dims)
        .unwrap();
    let forward = |wte: &[f64], wpe: &[f64]| -> Vec<f64> {
        (0..b * t)
            .flat_map(|r| (0..c).map(move |j| (r, j)))
            .map(|(r, j)| wte[tokens[r] as usize * c + j] + wpe[(r % t) * c + j])
            .collect()
    };
    assert_close(
        "embedding out",
        &bump.read(out),
        &forward(&wtev, &wpev),
        FORWARD_RTOL,
    );
    let (dout, doutv) = bump.input(b * t * c, 1.0);
    let (dwte, dwpe) = (
        bump.zeros(vp * c, Dtype::F32),
        bump.zeros(t * c, Dtype::F32),
    );
    bump.backend
        .embedding_bwd(dwte, Some(dwpe), dout, tok, dims)
        .unwrap();
    let fd_wte = finite_differences(&wtev, &doutv, |w| forward(w, &wpev));
    let fd_wpe = finite_differences(&wpev, &doutv, |w| forward(&wtev, w));
    assert_close("embedding dwte", &bump.read(dwte), &fd_wte, GRAD_RTOL);
    assert_close("embedding dwpe", &bump.read(dwpe), &fd_wpe, GRAD_RTOL);
}

fn check_adamw<B: Backend>(bump: &mut Bump<B>) {
    let n = 50;
    let (p, pv) = bump.input(n, 1.0);
    let (g, gv) = bump.input(n, 1.0);
    let (m, mv) = bump.input(n, 0.1);
    let (v, vv0) = bump.input(n, 0.1);
    let vv: Vec<f64> = vv0.iter().map(|x| x.abs()).collect();
    bump.backend
        .write(v, &vv.iter().map(|&x| x as f32).collect::<Vec<_>>())
        .unwrap();
    let h = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        bias_correction1: 1.0 - 0.9f32.powi(3),
        bias_correction2: 1.0 - 0.95f32.powi(3),
        grad_scale: 0.5,
    };
    bump.backend.adamw(p, None, m, v, Some(g), h).unwrap();
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let mut expected = Vec::new();
    for i in 0..n {
        let grad = gv[i] * 0.5;
        let m1 = b1 * mv[i] + (1.0 - b1) * grad;
        let v1 = b2 * vv[i] + (1.0 - b2) * grad * grad;
        let decayed = pv[i] - 0.01 * 0.1 * pv[i];
        let update =
            (m1 / h.bias_correction1 as f64) / ((v1 / h.bias_correction2 as f64).sqrt() + 1e-8);
        expected.push(decayed - 0.01 * update);
    }
    assert_close("adamw param", &bump.read(p), &expected, FORWARD_RTOL);

    // Offload's form: the gradient arrives in the buffer that receives the new weights, and
    // the fp32 master copy is what is updated.
    let f32s = |values: &[f64]| values.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let staging = bump.zeros(n, Dtype::F32);
    let master = bump.zeros(n, Dtype::F32);
    let (m2, v2) = (bump.zeros(n, Dtype::F32), bump.zeros(n, Dtype::F32));
    for (t, values) in [(staging, &gv), (master, &pv), (m2, &mv), (v2, &vv)] {
        bump.backend.write(t, &f32s(values)).unwrap();
    }
    bump.backend
        .adamw(staging, Some(master), m2, v2, None, h)
        .unwrap();
    assert_close(
        "adamw in place",
        &bump.read(staging),
        &expected,
        FORWARD_RTOL,
    );
    assert_close("adamw master", &bump.read(master), &expected, FORWARD_RTOL);
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    check_layernorm(&mut Bump::cpu());
}

#[test]
fn matmul_backward_matches_finite_differences() {
    check_matmul(&mut Bump::cpu());
}

#[test]
fn attention_backward_matches_finite_differences() {
    // t = 70 crosses the kernel's 64-key blocks.
    check_attention(&mut Bump::cpu(), &[(2, 5, 2, 2, 4), (2, 70, 2, 2, 3)]);
}

#[test]
fn grouped_query_attention_backward_matches_finite_differences() {
    check_attention(&mut Bump::cpu(), &[(2, 5, 4, 2, 4), (1, 70, 4, 1, 3)]);
}

#[test]
fn grouped_query_attention_is_attention_with_repeated_key_value_heads() {
    check_grouped_attention_is_repeated_heads(&mut Bump::cpu());
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    check_rmsnorm(&mut Bump::cpu());
}

#[test]
fn rope_backward_matches_finite_differences_and_undoes_the_forward() {
    check_rope(&mut Bump::cpu());
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    check_swiglu(&mut Bump::cpu());
}

#[test]
fn the_rope_table_holds_the_cos_and_sin_of_position_times_frequency() {
    let (hs, theta) = (16, 10_000.0f64);
    let half = hs / 2;
    let table = rope_table(8192, hs, theta);
    assert_eq!(table.len(), 8192 * hs);
    for p in [0usize, 1, 2, 7, 100, 4097, 8191] {
        for j in 0..half {
            let angle = p as f64 * theta.powf(-2.0 * j as f64 / hs as f64);
            // The table's angle is an f32 product (Hugging Face's): its rounding, half an ulp
            // of the angle (2^-24 relative), plus the f32 frequency's, moves cos and sin by up
            // to about 1.2e-7 of the angle.
            let tolerance = 1e-6 + 1.2e-7 * angle;
            let (cos, sin) = (table[p * hs + j] as f64, table[p * hs + half + j] as f64);
            assert!(
                (cos - angle.cos()).abs() <= tolerance && (sin - angle.sin()).abs() <= tolerance,
                "position {p}, pair {j}: cos {cos} sin {sin}, expected {} {}",
                angle.cos(),
                angle.sin()
            );
        }
    }
    // Position 0 is the identity; positions past 0 in pair 0 turn by one radian each.
    assert!(table[..half].iter().all(|&c| c == 1.0) && table[half..hs].iter().all(|&s| s == 0.0));
    assert_eq!(table[3 * hs], 3.0f64.cos() as f32);
    // A larger base turns more slowly: the last pair of Llama 3's theta barely moves.
    let llama3 = rope_table(2, 128, 500_000.0);
    assert!((llama3[128 + 63] as f64 - 500_000f64.powf(-126.0 / 128.0).cos()).abs() < 1e-7);
}

#[test]
fn llama_op_arguments_are_checked() {
    let mut bump = Bump::cpu();
    let message = |result: tessera_worker::error::Result<()>| result.unwrap_err().to_string();
    // 3 query heads cannot share 2 key/value heads.
    let dims = attention_dims(1, 4, 3, 2, 4);
    let qkv = bump.zeros(4 * dims.qkv_width(), Dtype::F32);
    let (out, lse) = (
        bump.zeros(4 * 12, Dtype::F32),
        bump.zeros(4 * 3, Dtype::F32),
    );
    let err = message(bump.backend.attention_fwd(out, lse, qkv, dims));
    assert!(
        err.contains("3 query heads cannot share 2 key/value heads"),
        "{err}"
    );
    // A qkv laid out for multi-head attention is the wrong length for grouped heads.
    let dims = attention_dims(1, 4, 4, 2, 4);
    let qkv = bump.zeros(4 * 3 * 16, Dtype::F32);
    let (out, lse) = (
        bump.zeros(4 * 16, Dtype::F32),
        bump.zeros(4 * 4, Dtype::F32),
    );
    let err = message(bump.backend.attention_fwd(out, lse, qkv, dims));
    assert!(err.contains("`qkv`"), "{err}");
    // Rotary embeddings: an odd head size, a table too short or not f32.
    let odd = attention_dims(1, 4, 2, 2, 3);
    let x = bump.zeros(4 * odd.qkv_width(), Dtype::F32);
    let table = bump.zeros(4 * 3, Dtype::F32);
    let err = message(bump.backend.rope_fwd(x, table, odd));
    assert!(
        err.contains("head size 3 is not a positive even number"),
        "{err}"
    );
    let even = attention_dims(1, 4, 2, 2, 4);
    let x = bump.zeros(4 * even.qkv_width(), Dtype::F32);
    let short = bump.zeros(3 * 4, Dtype::F32);
    let err = message(bump.backend.rope_bwd(x, short, even));
    assert!(
        err.contains("not rows of head size 4 for 4 positions"),
        "{err}"
    );
    let half_table = bump.zeros(4 * 4, Dtype::Bf16);
    let err = message(bump.backend.rope_fwd(x, half_table, even));
    assert!(err.contains("`table` is bf16, expected f32"), "{err}");
    // RMSNorm's statistics are f32; its epsilon a number.
    let (rows, c) = (2, 8);
    let (inp, w) = (bump.zeros(rows * c, Dtype::F32), bump.zeros(c, Dtype::F32));
    let out = bump.zeros(rows * c, Dtype::F32);
    let rstd16 = bump.zeros(rows, Dtype::Bf16);
    let err = message(bump.backend.rmsnorm_fwd(out, rstd16, inp, w, rows, c, 1e-5));
    assert!(err.contains("`rstd` is bf16, expected f32"), "{err}");
    let rstd = bump.zeros(rows, Dtype::F32);
    let err = message(
        bump.backend
            .rmsnorm_fwd(out, rstd, inp, w, rows, c, f32::NAN),
    );
    assert!(err.contains("epsilon NaN"), "{err}");
    let err = message(bump.backend.rmsnorm_bwd(out, w, inp, inp, w, rstd, rows, c));
    assert!(err.contains("overlaps"), "{err}");
    // SwiGLU's input rows are twice the output's.
    let (out, inp) = (bump.zeros(2 * 5, Dtype::F32), bump.zeros(2 * 5, Dtype::F32));
    let err = message(bump.backend.swiglu_fwd(out, inp, 5));
    assert!(err.contains("`inp`"), "{err}");
    let err = message(bump.backend.swiglu_bwd(inp, out, inp, 5));
    assert!(err.contains("`dinp`"), "{err}");
}

#[test]
fn gelu_backward_matches_finite_differences() {
    check_gelu(&mut Bump::cpu());
}

#[test]
fn crossentropy_gradient_matches_finite_differences() {
    check_crossentropy(&mut Bump::cpu());
}

#[test]
fn embedding_backward_matches_finite_differences() {
    check_embedding(&mut Bump::cpu());
}

#[test]
fn adamw_matches_the_formula() {
    check_adamw(&mut Bump::cpu());
}

#[test]
fn an_output_overlapping_an_input_is_refused() {
    let mut bump = Bump::cpu();
    let (x, _) = bump.input(16, 1.0);
    let err = bump
        .backend
        .gelu_fwd(x.slice(4, 8), x.slice(0, 8))
        .unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
}

const MODEL_CONFIG: &str = "
model: {arch: gpt2, layers: 2, hidden: 8, heads: 2, vocab: 11, seq_len: 5, ffn_hidden: 16}
parallel: {data: 1, tensor: 1, pipeline: 1}
training: {global_batch: 2, micro_batch: 1, precision: fp32, steps: 1, seed: 3}
data: {kind: synthetic}
cluster: {nodes: 1, gpus_per_node: 1, gpu_memory: 1GiB, device: cpu, backend: tcp}
";

/// The mean cross-entropy of a 2-layer GPT-2 in f64, from named parameters.
fn reference_gpt_loss(
    p: &std::collections::HashMap<String, Vec<f64>>,
    tokens: &[[i32; 5]; 2],
    targets: &[[i32; 5]; 2],
) -> f64 {
    let (c, t, nh, f, v) = (8, 5, 2, 16, 11);
    let get = |name: &str| p[name].as_slice();
    let mut total = 0.0;
    for (seq, tgt) in tokens.iter().zip(targets) {
        let mut x: Vec<f64> = (0..t * c)
            .map(|k| get("wte")[seq[k / c] as usize * c + k % c] + get("wpe")[k])
            .collect();
        for l in 0..2 {
            let w = |n: &str| p[&format!("layers.{l}.{n}")].as_slice();
            let ln1 = reference::layernorm(&x, w("ln1_w"), w("ln1_b"), c);
            let qkv = reference::linear(&ln1, w("qkv_w"), Some(w("qkv_b")), c, 3 * c);
            let att = reference::attention(&qkv, 1, t, nh, nh, c / nh);
            let proj = reference::linear(&att, w("attproj_w"), Some(w("attproj_b")), c, c);
            let resid2: Vec<f64> = x.iter().zip(&proj).map(|(a, b)| a + b).collect();
            let ln2 = reference::layernorm(&resid2, w("ln2_w"), w("ln2_b"), c);
            let fch = reference::gelu(&reference::linear(&ln2, w("fc_w"), Some(w("fc_b")), c, f));
            let mlp = reference::linear(&fch, w("fcproj_w"), Some(w("fcproj_b")), f, c);
            x = resid2.iter().zip(&mlp).map(|(a, b)| a + b).collect();
        }
        let lnf = reference::layernorm(&x, get("lnf_w"), get("lnf_b"), c);
        let logits = reference::linear(&lnf, &get("wte")[..v * c], None, c, v);
        total += reference::crossentropy(&logits, tgt, v, v)
            .iter()
            .sum::<f64>();
    }
    total / (2 * t) as f64
}

#[test]
fn the_whole_model_gradient_matches_finite_differences() {
    use std::collections::HashMap;
    use tessera_plan::Config;
    use tessera_plan::memory::StagePlan;
    use tessera_worker::arena::ArenaLayout;
    use tessera_worker::train::Rank;

    let config = Config::from_yaml("model.yaml", MODEL_CONFIG, &[]).unwrap();
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap();
    let mut rank = Rank::new(config, backend).unwrap();
    rank.initialize().unwrap();
    let tokens = [[1, 4, 9, 0, 10], [3, 3, 7, 2, 5]];
    let targets = [[4, 9, 0, 10, 6], [3, 7, 2, 5, 1]];
    let loss = rank
        .forward_backward(|microbatch, inputs, outputs| {
            inputs.copy_from_slice(&tokens[microbatch]);
            outputs.copy_from_slice(&targets[microbatch]);
            Ok(())
        })
        .unwrap();

    let mut params = HashMap::new();
    let mut grads = HashMap::new();
    for unit in &rank.units {
        for placed in &unit.layout.params {
            let name = unit.param_name(placed.spec.name);
            let mut values = vec![0f32; placed.numel() as usize];
            rank.backend
                .read(unit.view(unit.flat_params, placed.spec.name), &mut values)
                .unwrap();
            params.insert(
                name.clone(),
                values.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            );
            rank.backend
                .read(unit.view(unit.flat_grads, placed.spec.name), &mut values)
                .unwrap();
            grads.insert(name, values.iter().map(|&v| v as f64).collect::<Vec<_>>());
        }
    }
    let expected = reference_gpt_loss(&params, &tokens, &targets);
    assert!(
        ((loss - expected) / expected).abs() < FORWARD_RTOL,
        "loss {loss} vs {expected}"
    );

    for (name, grad) in &grads {
        // The embedding's padding rows (past vocab 11) are never read.
        let len = if name == "wte" { 11 * 8 } else { grad.len() };
        let mut perturbed = params.clone();
        let fd: Vec<f64> = (0..len)
            .map(|i| {
                let orig = params[name][i];
                perturbed.get_mut(name).unwrap()[i] = orig + FD_STEP;
                let up = reference_gpt_loss(&perturbed, &tokens, &targets);
                perturbed.get_mut(name).unwrap()[i] = orig - FD_STEP;
                let down = reference_gpt_loss(&perturbed, &tokens, &targets);
                perturbed.get_mut(name).unwrap()[i] = orig;
                (up - down) / (2.0 * FD_STEP)
            })
            .collect();
        assert_close(&format!("model grad {name}"), &grad[..len], &fd, GRAD_RTOL);
        assert!(
            grad[len..].iter().all(|&g| g == 0.0),
            "{name}: padding gets no gradient"
        );
    }
}

#[test]
fn decoding_one_row_against_the_kept_qkv_equals_that_row_of_causal_attention() {
    // Grouped (nh 4, nkv 2) and multi-head (4, 4), two sequences, rows past one key block.
    for nkv in [2, 4] {
        let mut bump = Bump::cpu();
        let dims = Dims {
            b: 2,
            t: 70,
            c: 64,
            nh: 4,
            nkv,
            hs: 16,
            v: 32,
            vp: 32,
            vocab_start: 0,
        };
        let n = dims.tokens();
        let (qkv, _) = bump.input(n * dims.qkv_width(), 1.0);
        let out = bump.tensor(n * dims.nh * dims.hs, Dtype::F32);
        let lse = bump.tensor(n * dims.nh, Dtype::F32);
        bump.backend.attention_fwd(out, lse, qkv, dims).unwrap();
        let full = bump.read(out);
        let width = dims.nh * dims.hs;
        for pos in [0, 1, 63, 64, 69] {
            let row = bump.tensor(dims.b * width, Dtype::F32);
            bump.backend.attention_decode(row, qkv, pos, dims).unwrap();
            let decoded = bump.read(row);
            for b in 0..dims.b {
                let at = (b * dims.t + pos) * width;
                assert_close(
                    &format!("nkv {nkv} pos {pos} seq {b}"),
                    &decoded[b * width..(b + 1) * width],
                    &full[at..at + width],
                    FORWARD_RTOL,
                );
            }
        }
        let row = bump.tensor(dims.b * width, Dtype::F32);
        let past = bump
            .backend
            .attention_decode(row, qkv, 70, dims)
            .unwrap_err();
        assert!(
            past.to_string().contains("past the sequence length"),
            "{past}"
        );
    }
}
