//! Llama's CPU kernels besides attention (grouped-query attention is in `attention.rs`):
//! RMSNorm, rotary position embeddings and SwiGLU, as plain loops named after the math, the
//! reference the CUDA kernels in `cuda/kernels/llama.cu` are checked against.
//!
//! As in `ops.rs`: generic over the storage type, f32 arithmetic, rows split over rayon tasks
//! (sums over rows over column blocks), every output computed by the same sequence of
//! operations whatever the thread count. The formulas follow Hugging Face's `LlamaRMSNorm`,
//! `apply_rotary_pos_emb` and `LlamaMLP` operation for operation where it matters for the bits
//! (the order of a product's factors, the rotation's two terms), so an fp32 run agrees with
//! it to rounding of the sums.

use rayon::prelude::*;

use super::ops::exp_fast;
use crate::tensor::{Dims, Elem};

/// Columns per task in the weight gradient's sum over rows.
const COLUMN_BLOCK: usize = 64;

/// Elements per task in the SwiGLU kernels.
const ROW_BLOCK: usize = 1 << 14;

// --- RMSNorm ---

/// `out = (x * rstd) * weight` per row, `rstd = 1 / sqrt(mean(x^2) + eps)`.
pub fn rmsnorm_fwd<E: Elem>(
    out: &mut [E],
    rstd: &mut [f32],
    inp: &[E],
    weight: &[E],
    c: usize,
    eps: f32,
) {
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(row, (out, rstd))| {
            let x = &inp[row * c..][..c];
            let mean_square = x.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>() / c as f32;
            let s = 1.0 / (mean_square + eps).sqrt();
            for (j, o) in out.iter_mut().enumerate() {
                *o = E::from_f32(x[j].to_f32() * s * weight[j].to_f32());
            }
            *rstd = s;
        });
}

/// With `xhat = x * rstd` and `dxhat = dout * weight`: `dinp += rstd * (dxhat - xhat *
/// mean(dxhat * xhat))` (LayerNorm's without the mean terms), `dweight += sum over rows of dout
/// * xhat`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<E: Elem>(
    dinp: &mut [E],
    dweight: &mut [E],
    dout: &[E],
    inp: &[E],
    weight: &[E],
    rstd: &[f32],
    c: usize,
) {
    let rows = rstd.len();
    if c == 0 {
        return;
    }
    dinp.par_chunks_mut(c).enumerate().for_each(|(row, dinp)| {
        let s = rstd[row];
        let x = &inp[row * c..][..c];
        let dy = &dout[row * c..][..c];
        let mut dnorm_norm_mean = 0.0f32;
        for j in 0..c {
            dnorm_norm_mean += dy[j].to_f32() * weight[j].to_f32() * (x[j].to_f32() * s);
        }
        dnorm_norm_mean /= c as f32;
        for j in 0..c {
            let xhat = x[j].to_f32() * s;
            let dxhat = dy[j].to_f32() * weight[j].to_f32();
            let dx = (dxhat - xhat * dnorm_norm_mean) * s;
            dinp[j] = E::from_f32(dinp[j].to_f32() + dx);
        }
    });
    dweight
        .par_chunks_mut(COLUMN_BLOCK)
        .enumerate()
        .for_each(|(task, dweight)| {
            let first = task * COLUMN_BLOCK;
            let mut dw = [0.0f32; COLUMN_BLOCK];
            for (row, &s) in rstd.iter().enumerate().take(rows) {
                for (j, dw) in dw.iter_mut().enumerate().take(dweight.len()) {
                    let at = row * c + first + j;
                    *dw += dout[at].to_f32() * (inp[at].to_f32() * s);
                }
            }
            for (d, dw) in dweight.iter_mut().zip(dw) {
                *d = E::from_f32(d.to_f32() + dw);
            }
        });
}

// --- rotary position embeddings ---

/// Rotates the query and key heads of every `qkv` row (attention's layout) by its position's
/// angles; `sign` is 1 for the forward, -1 for the backward's transposed rotation. The value
/// heads are not touched.
pub fn rope<E: Elem>(qkv: &mut [E], table: &[f32], d: Dims, sign: f32) {
    let (hs, half) = (d.hs, d.hs / 2);
    let rotated = (d.nh + d.nkv) * hs;
    qkv.par_chunks_mut(d.qkv_width())
        .enumerate()
        .for_each(|(row, x)| {
            let angles = &table[(row % d.t) * hs..][..hs];
            let (cos, sin) = angles.split_at(half);
            for head in x[..rotated].chunks_exact_mut(hs) {
                let (first, second) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (first[j].to_f32(), second[j].to_f32());
                    let s = sign * sin[j];
                    // Hugging Face's `q * cos + rotate_half(q) * sin`, term by term.
                    first[j] = E::from_f32(a * cos[j] - b * s);
                    second[j] = E::from_f32(b * cos[j] + a * s);
                }
            }
        });
}

// --- SwiGLU ---

/// `1 / (1 + e^-x)`, through [`exp_fast`] so that the loops vectorise.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `x / (1 + e^-x)`, PyTorch's formula for SiLU (one rounding fewer than `x * sigmoid(x)`).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `out[r, j] = silu(gate[r, j]) * up[r, j]` with `inp`'s row `[gate | up]`.
pub fn swiglu_fwd<E: Elem>(out: &mut [E], inp: &[E], f: usize) {
    let rows_per_task = (ROW_BLOCK / f.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * f)
        .zip(inp.par_chunks(rows_per_task * 2 * f))
        .for_each(|(out, inp)| {
            for (out, row) in out.chunks_exact_mut(f).zip(inp.chunks_exact(2 * f)) {
                let (gate, up) = row.split_at(f);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = E::from_f32(silu(g.to_f32()) * u.to_f32());
                }
            }
        });
}

/// `dgate = dout * up * silu'(gate)` with `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`;
/// `dup = dout * silu(gate)`. Overwrites `dinp`.
pub fn swiglu_bwd<E: Elem>(dinp: &mut [E], dout: &[E], inp: &[E], f: usize) {
    let rows_per_task = (ROW_BLOCK / f.max(1)).max(1);
    dinp.par_chunks_mut(rows_per_task * 2 * f)
        .zip(dout.par_chunks(rows_per_task * f))
        .zip(inp.par_chunks(rows_per_task * 2 * f))
        .for_each(|((dinp, dout), inp)| {
            for ((drow, dy), row) in dinp
                .chunks_exact_mut(2 * f)
                .zip(dout.chunks_exact(f))
                .zip(inp.chunks_exact(2 * f))
            {
                let (gate, up) = row.split_at(f);
                let (dgate, dup) = drow.split_at_mut(f);
                for j in 0..f {
                    let (g, u, dy) = (gate[j].to_f32(), up[j].to_f32(), dy[j].to_f32());
                    let s = sigmoid(g);
                    dgate[j] = E::from_f32(dy * u * (s * (1.0 + g * (1.0 - s))));
                    dup[j] = E::from_f32(dy * silu(g));
                }
            }
        });
}
