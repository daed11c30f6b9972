//! The CPU kernels as plain loops over slices, named after the math. This is the reference the
//! CUDA kernels are checked against.
//!
//! Every kernel is generic over the storage type `E` of activations and parameters and computes
//! in f32. Work is split over rows (or, for sums over rows, over column blocks) with rayon; each
//! output element is always computed by the same sequence of operations, so results do not
//! depend on the number of threads.

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm};
use crate::tensor::{AdamW, Dims, Elem, Linear};

/// Columns per task in sums over rows (bias and LayerNorm weight gradients).
const COLUMN_BLOCK: usize = 64;

/// Elements per task in element-wise kernels.
const ELEMENT_BLOCK: usize = 1 << 14;

pub const LAYERNORM_EPS: f32 = 1e-5;

// --- embedding ---

/// Rows of tokens outside this rank's vocabulary shard get 0 (plus the position's row).
pub fn embedding_fwd<E: Elem>(
    out: &mut [E],
    tokens: &[i32],
    wte: &[E],
    wpe: Option<&[E]>,
    d: Dims,
) {
    let c = d.c;
    out.par_chunks_mut(c).enumerate().for_each(|(row, out)| {
        let token = d.local_token(tokens[row] as usize);
        let position = row % d.t;
        let wpe = wpe.map(|wpe| &wpe[position * c..][..c]);
        for (j, o) in out.iter_mut().enumerate() {
            let a = token.map_or(0.0, |t| wte[t * c + j].to_f32());
            let b = wpe.map_or(0.0, |wpe| wpe[j].to_f32());
            *o = E::from_f32(a + b);
        }
    });
}

/// Scatter-adds into the embedding rows. Tasks own column blocks and walk the tokens in order,
/// so repeated tokens are summed in the same order every time.
pub fn embedding_bwd<E: Elem>(
    dwte: &mut [E],
    dwpe: Option<&mut [E]>,
    dout: &[E],
    tokens: &[i32],
    d: Dims,
) {
    let c = d.c;
    let column_tasks = c.div_ceil(COLUMN_BLOCK);
    let dwte = SharedMut::new(dwte);
    let dwpe = dwpe.map(SharedMut::new);
    (0..column_tasks).into_par_iter().for_each(|task| {
        let columns = task * COLUMN_BLOCK..((task + 1) * COLUMN_BLOCK).min(c);
        for (row, &token) in tokens.iter().enumerate().take(d.tokens()) {
            let position = row % d.t;
            let token = d.local_token(token as usize);
            for j in columns.clone() {
                let g = dout[row * c + j].to_f32();
                // SAFETY: this task alone touches columns `columns` of both tables.
                unsafe {
                    if let Some(t) = token {
                        dwte.add(t * c + j, g);
                    }
                    if let Some(dwpe) = &dwpe {
                        dwpe.add(position * c + j, g);
                    }
                }
            }
        }
    });
}

// --- LayerNorm ---

pub fn layernorm_fwd<E: Elem>(
    out: &mut [E],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[E],
    weight: &[E],
    bias: &[E],
    c: usize,
) {
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(row, (out, (mean, rstd)))| {
            let x = &inp[row * c..][..c];
            let mu = x.iter().map(|v| v.to_f32()).sum::<f32>() / c as f32;
            let var = x
                .iter()
                .map(|v| (v.to_f32() - mu) * (v.to_f32() - mu))
                .sum::<f32>()
                / c as f32;
            let s = 1.0 / (var + LAYERNORM_EPS).sqrt();
            for (j, o) in out.iter_mut().enumerate() {
                let xhat = (x[j].to_f32() - mu) * s;
                *o = E::from_f32(xhat * weight[j].to_f32() + bias[j].to_f32());
            }
            *mean = mu;
            *rstd = s;
        });
}

/// `dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))` with `dxhat = dout *
/// weight`; `dweight += sum(dout * xhat)`, `dbias += sum(dout)` over rows.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<E: Elem>(
    dinp: &mut [E],
    dweight: &mut [E],
    dbias: &mut [E],
    dout: &[E],
    inp: &[E],
    weight: &[E],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = mean.len();
    dinp.par_chunks_mut(c).enumerate().for_each(|(row, dinp)| {
        let (mu, s) = (mean[row], rstd[row]);
        let x = &inp[row * c..][..c];
        let dy = &dout[row * c..][..c];
        let (mut dnorm_mean, mut dnorm_norm_mean) = (0.0f32, 0.0f32);
        for j in 0..c {
            let xhat = (x[j].to_f32() - mu) * s;
            let dxhat = dy[j].to_f32() * weight[j].to_f32();
            dnorm_mean += dxhat;
            dnorm_norm_mean += dxhat * xhat;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for j in 0..c {
            let xhat = (x[j].to_f32() - mu) * s;
            let dxhat = dy[j].to_f32() * weight[j].to_f32();
            let dx = (dxhat - dnorm_mean - xhat * dnorm_norm_mean) * s;
            dinp[j] = E::from_f32(dinp[j].to_f32() + dx);
        }
    });
    dweight
        .par_chunks_mut(COLUMN_BLOCK)
        .zip(dbias.par_chunks_mut(COLUMN_BLOCK))
        .enumerate()
        .for_each(|(task, (dweight, dbias))| {
            let first = task * COLUMN_BLOCK;
            let mut dw = [0.0f32; COLUMN_BLOCK];
            let mut db = [0.0f32; COLUMN_BLOCK];
            for row in 0..rows {
                let (mu, s) = (mean[row], rstd[row]);
                for j in 0..dweight.len() {
                    let g = dout[row * c + first + j].to_f32();
                    let xhat = (inp[row * c + first + j].to_f32() - mu) * s;
                    dw[j] += g * xhat;
                    db[j] += g;
                }
            }
            for j in 0..dweight.len() {
                dweight[j] = E::from_f32(dweight[j].to_f32() + dw[j]);
                dbias[j] = E::from_f32(dbias[j].to_f32() + db[j]);
            }
        });
}

// --- matmul ---

pub fn matmul_fwd<E: Elem>(out: &mut [E], inp: &[E], weight: &[E], bias: Option<&[E]>, s: Linear) {
    if let Some(bias) = bias {
        out.par_chunks_mut(s.out)
            .for_each(|row| row.copy_from_slice(&bias[..s.out]));
    }
    gemm(
        MatMut::row_major(out, s.rows, s.out),
        Mat::row_major(inp, s.rows, s.inp),
        Mat::transposed(weight, s.inp, s.out),
        bias.is_some(),
    );
}

#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd<E: Elem>(
    dinp: Option<&mut [E]>,
    dweight: &mut [E],
    dbias: Option<&mut [E]>,
    dout: &[E],
    inp: &[E],
    weight: &[E],
    s: Linear,
) {
    if let Some(dinp) = dinp {
        gemm(
            MatMut::row_major(dinp, s.rows, s.inp),
            Mat::row_major(dout, s.rows, s.out),
            Mat::row_major(weight, s.out, s.inp),
            false,
        );
    }
    gemm(
        MatMut::row_major(dweight, s.out, s.inp),
        Mat::transposed(dout, s.out, s.rows),
        Mat::row_major(inp, s.rows, s.inp),
        true,
    );
    if let Some(dbias) = dbias {
        sum_rows_into(dbias, dout, s.rows, s.out);
    }
}

/// `acc[j] += sum over rows of x[row, j]`, in row order for every column.
fn sum_rows_into<E: Elem>(acc: &mut [E], x: &[E], rows: usize, cols: usize) {
    acc[..cols]
        .par_chunks_mut(COLUMN_BLOCK)
        .enumerate()
        .for_each(|(task, acc)| {
            let first = task * COLUMN_BLOCK;
            let mut sum = [0.0f32; COLUMN_BLOCK];
            for row in 0..rows {
                for (j, s) in sum.iter_mut().enumerate().take(acc.len()) {
                    *s += x[row * cols + first + j].to_f32();
                }
            }
            for (a, s) in acc.iter_mut().zip(sum) {
                *a = E::from_f32(a.to_f32() + s);
            }
        });
}

// --- GELU (tanh approximation) ---

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_CUBIC: f32 = 0.044_715;

/// `e^x` without a libm call, so that loops over it vectorise: `2^n e^r` with `n = round(x /
/// ln 2)`, `|r| <= ln 2 / 2` and a degree-6 Taylor polynomial (error about 1 ulp). Inputs are
/// clamped to where the result is a normal f32.
#[inline(always)]
pub(super) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 x 2^23 rounds to the nearest integer with plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `tanh(u) = 1 - 2 / (e^{2u} + 1)`, through [`exp_fast`].
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * u) + 1.0)
}

#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh_fast(GELU_SCALE * (x + GELU_CUBIC * x * x * x)))
}

#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    let tanh_u = tanh_fast(u);
    let sech2 = 1.0 - tanh_u * tanh_u;
    0.5 * (1.0 + tanh_u) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

pub fn gelu_fwd<E: Elem>(out: &mut [E], inp: &[E]) {
    out.par_chunks_mut(ELEMENT_BLOCK)
        .zip(inp.par_chunks(ELEMENT_BLOCK))
        .for_each(|(out, inp)| {
            for (o, x) in out.iter_mut().zip(inp) {
                *o = E::from_f32(gelu(x.to_f32()));
            }
        });
}

pub fn gelu_bwd<E: Elem>(dinout: &mut [E], inp: &[E]) {
    dinout
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(inp.par_chunks(ELEMENT_BLOCK))
        .for_each(|(d, inp)| {
            for (d, x) in d.iter_mut().zip(inp) {
                *d = E::from_f32(d.to_f32() * gelu_grad(x.to_f32()));
            }
        });
}

// --- softmax cross-entropy ---

/// Row by row over the real vocabulary `d.v` of rows `d.vp` wide: `loss = log sum exp(l) -
/// l[target]`, and the logits are replaced by `(softmax - onehot) * dloss`, 0 in the padding.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_fwd_bwd<E: Elem>(
    logits: &mut [E],
    losses: &mut [f32],
    max: &mut [f32],
    sumexp: &mut [f32],
    targets: &[i32],
    dloss: f32,
    d: Dims,
) {
    logits
        .par_chunks_mut(d.vp)
        .zip(losses.par_iter_mut())
        .zip(max.par_iter_mut().zip(sumexp.par_iter_mut()))
        .zip(targets.par_iter())
        .for_each(|(((row, loss), (max, sumexp)), &target)| {
            let real = &mut row[..d.v];
            let m = real
                .iter()
                .map(|l| l.to_f32())
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = real.iter().map(|l| exp_fast(l.to_f32() - m)).sum();
            let target = target as usize;
            *loss = m + sum.ln() - real[target].to_f32();
            for (j, l) in real.iter_mut().enumerate() {
                let p = exp_fast(l.to_f32() - m) / sum;
                let onehot = if j == target { 1.0 } else { 0.0 };
                *l = E::from_f32((p - onehot) * dloss);
            }
            row[d.v..].fill(E::from_f32(0.0));
            *max = m;
            *sumexp = sum;
        });
}

/// Vocabulary-parallel cross-entropy, step 1: each row's largest logit among this rank's real
/// tokens (see `Backend::crossentropy_max`).
pub fn crossentropy_max<E: Elem>(logits: &[E], max: &mut [f32], d: Dims) {
    let real = d.real_vocab();
    logits
        .par_chunks(d.vp)
        .zip(max.par_iter_mut())
        .for_each(|(row, max)| {
            *max = row[..real]
                .iter()
                .map(|l| l.to_f32())
                .fold(f32::NEG_INFINITY, f32::max);
        });
}

/// Step 2: the row's sum of `exp(l - max)` over this rank's real tokens, and the target's
/// logit if this rank holds it (else 0).
pub fn crossentropy_sumexp<E: Elem>(
    logits: &[E],
    picked: &mut [f32],
    max: &[f32],
    sumexp: &mut [f32],
    targets: &[i32],
    d: Dims,
) {
    let real = d.real_vocab();
    logits
        .par_chunks(d.vp)
        .zip(picked.par_iter_mut().zip(sumexp.par_iter_mut()))
        .zip(max.par_iter().zip(targets.par_iter()))
        .for_each(|((row, (picked, sumexp)), (&m, &target))| {
            *sumexp = row[..real].iter().map(|l| exp_fast(l.to_f32() - m)).sum();
            *picked = d
                .local_token(target as usize)
                .filter(|&t| t < real)
                .map_or(0.0, |t| row[t].to_f32());
        });
}

/// Step 3: `losses = max + ln(sumexp) - picked` in place, and the logits become `(softmax -
/// onehot) * dloss`, 0 in the padding.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_finish<E: Elem>(
    logits: &mut [E],
    losses: &mut [f32],
    max: &[f32],
    sumexp: &[f32],
    targets: &[i32],
    dloss: f32,
    d: Dims,
) {
    let real = d.real_vocab();
    logits
        .par_chunks_mut(d.vp)
        .zip(losses.par_iter_mut())
        .zip(max.par_iter().zip(sumexp.par_iter()))
        .zip(targets.par_iter())
        .for_each(|(((row, loss), (&m, &sum)), &target)| {
            *loss = m + sum.ln() - *loss;
            let target = d.local_token(target as usize);
            for (j, l) in row[..real].iter_mut().enumerate() {
                let p = exp_fast(l.to_f32() - m) / sum;
                let onehot = if Some(j) == target { 1.0 } else { 0.0 };
                *l = E::from_f32((p - onehot) * dloss);
            }
            row[real..].fill(E::from_f32(0.0));
        });
}

// --- optimizer ---

/// Sum of squares in fixed blocks, each summed in f64, written to `partials` and added up in
/// order, so the result does not depend on the thread count.
pub fn sum_squares<E: Elem>(grads: &[E], partials: &mut [f32]) -> f64 {
    let block = grads.len().div_ceil(partials.len()).max(1);
    let used = grads.len().div_ceil(block);
    partials[..used]
        .par_iter_mut()
        .zip(grads.par_chunks(block))
        .for_each(|(partial, grads)| {
            *partial = grads
                .iter()
                .map(|g| {
                    let g = g.to_f32() as f64;
                    g * g
                })
                .sum::<f64>() as f32;
        });
    partials[..used].iter().map(|&p| p as f64).sum()
}

/// AdamW (decoupled weight decay, bias-corrected moments) on one tensor. The fp32 `master`
/// copy is updated when present and rounded into `param`; otherwise `param` itself.
/// With `grad` `None` the gradient is read from `param` (then `master` is given), element
/// by element before the new weight overwrites it.
pub fn adamw<E: Elem>(
    param: &mut [E],
    master: Option<&mut [f32]>,
    m: &mut [f32],
    v: &mut [f32],
    grad: Option<&[E]>,
    h: AdamW,
) {
    let step = move |p: f32, g: E, m: &mut f32, v: &mut f32| -> f32 {
        let g = g.to_f32() * h.grad_scale;
        *m = h.beta1 * *m + (1.0 - h.beta1) * g;
        *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
        let m_hat = *m / h.bias_correction1;
        let v_hat = *v / h.bias_correction2;
        let p = p - h.lr * h.weight_decay * p;
        p - h.lr * m_hat / (v_hat.sqrt() + h.eps)
    };
    let chunks = param
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(m.par_chunks_mut(ELEMENT_BLOCK))
        .zip(v.par_chunks_mut(ELEMENT_BLOCK));
    match (master, grad) {
        (Some(master), grad) => chunks
            .zip(master.par_chunks_mut(ELEMENT_BLOCK))
            .enumerate()
            .for_each(|(block, (((param, m), v), master))| {
                let grad = grad.map(|g| &g[block * ELEMENT_BLOCK..][..param.len()]);
                for i in 0..param.len() {
                    let g = grad.map_or(param[i], |g| g[i]);
                    master[i] = step(master[i], g, &mut m[i], &mut v[i]);
                    param[i] = E::from_f32(master[i]);
                }
            }),
        (None, Some(grad)) => {
            chunks
                .zip(grad.par_chunks(ELEMENT_BLOCK))
                .for_each(|(((param, m), v), grad)| {
                    for i in 0..param.len() {
                        param[i] =
                            E::from_f32(step(param[i].to_f32(), grad[i], &mut m[i], &mut v[i]));
                    }
                })
        }
        (None, None) => unreachable!("invariant: checked by the backend"),
    }
}

/// A mutable slice shared by tasks that each write a disjoint, data-independent set of
/// elements (column blocks of a scatter).
struct SharedMut<E> {
    ptr: *mut E,
    len: usize,
}

// SAFETY: tasks write disjoint elements (the caller's contract on `add`).
unsafe impl<E: Send> Send for SharedMut<E> {}
unsafe impl<E: Send> Sync for SharedMut<E> {}

impl<E: Elem> SharedMut<E> {
    fn new(slice: &mut [E]) -> SharedMut<E> {
        SharedMut {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// `self[index] += value`.
    ///
    /// # Safety
    /// No other task reads or writes `index` concurrently.
    unsafe fn add(&self, index: usize, value: f32) {
        assert!(index < self.len, "invariant: scatter index in bounds");
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe {
            let e = self.ptr.add(index);
            *e = E::from_f32((*e).to_f32() + value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_within_two_ulps_of_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, exact) = (exp_fast(x), (x as f64).exp());
            assert!(
                ((ours as f64 - exact) / exact).abs() < 2.5e-7,
                "exp({x}) = {ours}, not {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(
            exp_fast(-1000.0),
            exp_fast(-87.0),
            "clamped, never 0 or NaN"
        );
        assert!(exp_fast(f32::NEG_INFINITY) > 0.0);
    }

    #[test]
    fn tanh_fast_matches_tanh() {
        let mut u = -12.0f32;
        while u < 12.0 {
            assert!(
                (tanh_fast(u) as f64 - (u as f64).tanh()).abs() < 3e-7,
                "tanh({u})"
            );
            u += 0.00731;
        }
    }
}
