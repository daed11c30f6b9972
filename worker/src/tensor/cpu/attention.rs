//! Causal attention on the CPU with FlashAttention's algorithm, in tiles: a block of queries
//! against a block of keys is a small matrix product (our gemm, run on the calling thread), the
//! softmax is taken online over key blocks, and only each row's log-sum-exp is kept for the
//! backward. No `(t, t)` matrix exists: a task's tiles live on its stack.
//!
//! Tasks are (sequence, block of rows) pairs, each doing every head. Within a task everything
//! runs in a fixed order, so the results do not depend on the number of threads.
//!
//! Grouped-query attention: `qkv` rows are `[q: nh hs | k: nkv hs | v: nkv hs]` and query head
//! h reads key/value head h / (nh / nkv). With `nkv == nh` every loop and sum runs exactly as
//! GPT-2's multi-head attention did, so its results are unchanged to the bit.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm_on_this_thread as gemm};
use super::ops::exp_fast;
use crate::tensor::{Dims, Elem};

/// Largest head size the kernels support: their accumulators live on the stack. FlashAttention
/// has the same limit.
pub const MAX_HEAD_SIZE: usize = 256;

/// Queries and keys per tile: a (64, 64) f32 score tile is 16 KiB.
const BLOCK: usize = 64;

/// Lanes of a sum: independent partial sums vectorise where one chain of adds cannot. The
/// order is fixed, so results stay deterministic.
const LANES: usize = 8;

/// Where one query head's rows live: `qkv` is `(b t, (nh + 2 nkv) hs)` laid out `[q | k |
/// v]`, `out` and `dout` are `(b t, nh hs)`, `lse` and `delta` are `(b t, nh)`.
#[derive(Clone, Copy)]
struct Head {
    d: Dims,
    b: usize,
    /// The query head; its key/value head is `h / d.group()`.
    h: usize,
}

/// Column of key/value head `g`'s k (`part` 1) or v (2), or query head `g`'s q (0), in a
/// `qkv` row.
fn qkv_column(d: Dims, part: usize, g: usize) -> usize {
    match part {
        0 => g * d.hs,
        1 => (d.nh + g) * d.hs,
        _ => (d.nh + d.nkv + g) * d.hs,
    }
}

impl Head {
    /// Rows `rows` of this head's q (`part` 0), or its key/value head's k (1) or v (2), as a
    /// `(rows, hs)` matrix.
    fn qkv<E>(self, qkv: &[E], part: usize, rows: Range<usize>) -> Mat<'_, E> {
        let stride = self.d.qkv_width();
        let head = if part == 0 {
            self.h
        } else {
            self.h / self.d.group()
        };
        Mat {
            data: &qkv
                [(self.b * self.d.t + rows.start) * stride + qkv_column(self.d, part, head)..],
            rows: rows.len(),
            cols: self.d.hs,
            row_stride: stride,
            col_stride: 1,
        }
    }

    /// Rows `rows` of this head in an `(b t, nh hs)` tensor, as a `(rows, hs)` matrix.
    fn rows<E>(self, x: &[E], rows: Range<usize>) -> Mat<'_, E> {
        let width = self.d.nh * self.d.hs;
        Mat {
            data: &x[(self.b * self.d.t + rows.start) * width + self.h * self.d.hs..],
            rows: rows.len(),
            cols: self.d.hs,
            row_stride: width,
            col_stride: 1,
        }
    }

    /// This head's entry of query `i` in an `(b t, nh)` per-row tensor.
    fn at(self, per_row: &[f32], i: usize) -> f32 {
        per_row[(self.b * self.d.t + i) * self.d.nh + self.h]
    }
}

/// Keys `first..` that query `i` sees among `len` keys: those up to and including itself.
fn visible(i: usize, first: usize, len: usize) -> usize {
    (i + 1).saturating_sub(first).min(len)
}

/// A `(rows, cols)` tile of `data` with row stride `BLOCK`, for reading.
fn tile(data: &[f32], rows: usize, cols: usize) -> Mat<'_, f32> {
    Mat {
        data,
        rows,
        cols,
        row_stride: BLOCK,
        col_stride: 1,
    }
}

/// A `(rows, cols)` tile of `data` with row stride `BLOCK`, for writing.
fn tile_mut(data: &mut [f32], rows: usize, cols: usize) -> MatMut<'_, f32> {
    MatMut {
        data,
        rows,
        cols,
        row_stride: BLOCK,
    }
}

fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for lane in 0..LANES {
            lanes[lane] += chunk[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Writes an f32 `(rows, hs)` accumulator, each row divided by `divisor(row)`, into columns
/// `column..column + hs` of the rows of `dst`, which are `stride` apart.
fn store<E: Elem>(
    dst: &mut [E],
    stride: usize,
    column: usize,
    acc: &[f32],
    hs: usize,
    rows: usize,
    divisor: impl Fn(usize) -> f32,
) {
    for r in 0..rows {
        let inverse = 1.0 / divisor(r);
        for (o, a) in dst[r * stride + column..][..hs]
            .iter_mut()
            .zip(&acc[r * hs..][..hs])
        {
            *o = E::from_f32(a * inverse);
        }
    }
}

/// `out[i] = sum_j softmax_j(q_i k_j / sqrt(hs)) v_j` over keys `j <= i`, and `lse[i] = log sum_j
/// exp(q_i k_j / sqrt(hs))`, with an online softmax over blocks of keys.
pub fn attention_fwd<E: Elem>(out: &mut [E], lse: &mut [f32], qkv: &[E], d: Dims) {
    let (t, nh, hs) = (d.t, d.nh, d.hs);
    let width = nh * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(t * width)
        .zip(lse.par_chunks_mut(t * nh))
        .enumerate()
        .for_each(|(b, (out, lse))| {
            out.par_chunks_mut(BLOCK * width)
                .zip(lse.par_chunks_mut(BLOCK * nh))
                .enumerate()
                .for_each(|(block, (out, lse))| {
                    let queries = block * BLOCK..(block * BLOCK + BLOCK).min(t);
                    let n = queries.len();
                    let mut scores = [0.0f32; BLOCK * BLOCK];
                    let mut acc = [0.0f32; BLOCK * MAX_HEAD_SIZE];
                    for h in 0..nh {
                        let head = Head { d, b, h };
                        let q = head.qkv(qkv, 0, queries.clone());
                        let acc = &mut acc[..n * hs];
                        acc.fill(0.0);
                        let mut max = [f32::NEG_INFINITY; BLOCK];
                        let mut total = [0.0f32; BLOCK];
                        for first in (0..queries.end).step_by(BLOCK) {
                            let keys = first..(first + BLOCK).min(queries.end);
                            let m = keys.len();
                            let k = head.qkv(qkv, 1, keys.clone());
                            gemm(tile_mut(&mut scores, n, m), q, k.t(), false);
                            for r in 0..n {
                                let row = &mut scores[r * BLOCK..][..m];
                                let seen = visible(queries.start + r, first, m);
                                let mut block_max = f32::NEG_INFINITY;
                                for s in &mut row[..seen] {
                                    *s *= scale;
                                    block_max = block_max.max(*s);
                                }
                                if block_max > max[r] {
                                    let correction = exp_fast(max[r] - block_max);
                                    acc[r * hs..][..hs]
                                        .iter_mut()
                                        .for_each(|a| *a *= correction);
                                    total[r] *= correction;
                                    max[r] = block_max;
                                }
                                for s in &mut row[..seen] {
                                    *s = exp_fast(*s - max[r]);
                                }
                                row[seen..].fill(0.0);
                                total[r] += sum(&row[..seen]);
                            }
                            let v = head.qkv(qkv, 2, keys);
                            gemm(MatMut::row_major(acc, n, hs), tile(&scores, n, m), v, true);
                        }
                        store(out, width, h * hs, acc, hs, n, |r| total[r]);
                        for r in 0..n {
                            lse[r * nh + h] = max[r] + total[r].ln();
                        }
                    }
                });
        });
}

/// Runs `work(b, head, rows, dqkv)` for heads `0..heads` in order, for every (sequence `b`,
/// block of `BLOCK` rows), in parallel over the blocks; `dqkv` is the block's rows of the `(b
/// t, (nh + 2 nkv) hs)` gradient.
fn for_each_block<E: Elem>(
    dqkv: &mut [E],
    d: Dims,
    heads: usize,
    work: impl Fn(usize, usize, Range<usize>, &mut [E]) + Sync,
) {
    let stride = d.qkv_width();
    dqkv.par_chunks_mut(d.t * stride)
        .enumerate()
        .for_each(|(b, dqkv)| {
            dqkv.par_chunks_mut(BLOCK * stride)
                .enumerate()
                .for_each(|(block, dqkv)| {
                    let rows = block * BLOCK..(block * BLOCK + BLOCK).min(d.t);
                    for h in 0..heads {
                        work(b, h, rows.clone(), &mut *dqkv);
                    }
                });
        });
}

/// What both passes of the backward read.
struct Backward<'a, E> {
    qkv: &'a [E],
    dout: &'a [E],
    lse: &'a [f32],
    delta: &'a [f32],
    scale: f32,
}

impl<E: Elem> Backward<'_, E> {
    /// For `queries` against `keys` of one head, both `(queries, keys)` with row stride
    /// `BLOCK`: `p = exp(q k^T s - lse)` (0 where a key comes after its query), and `ds = p
    /// (dout v^T - delta) s`, the gradient of the scaled scores.
    fn tiles(
        &self,
        head: Head,
        queries: Range<usize>,
        keys: Range<usize>,
        p: &mut [f32],
        ds: &mut [f32],
    ) {
        let (n, m) = (queries.len(), keys.len());
        let q = head.qkv(self.qkv, 0, queries.clone());
        let k = head.qkv(self.qkv, 1, keys.clone());
        let v = head.qkv(self.qkv, 2, keys.clone());
        let g = head.rows(self.dout, queries.clone());
        gemm(tile_mut(p, n, m), q, k.t(), false);
        gemm(tile_mut(ds, n, m), g, v.t(), false);
        for (r, i) in queries.enumerate() {
            let seen = visible(i, keys.start, m);
            let (lse, delta) = (head.at(self.lse, i), head.at(self.delta, i));
            let p = &mut p[r * BLOCK..][..m];
            let ds = &mut ds[r * BLOCK..][..m];
            for (p, ds) in p[..seen].iter_mut().zip(&mut ds[..seen]) {
                *p = exp_fast(*p * self.scale - lse);
                *ds = *p * (*ds - delta) * self.scale;
            }
            p[seen..].fill(0.0);
            ds[seen..].fill(0.0);
        }
    }
}

/// Row `pos` of causal attention for each sequence, from the kept `q|k|v` (decoding): `out`
/// is `(b, nh hs)`. Each (sequence, head) is one task; its sums run in key order.
pub fn attention_decode<E: Elem>(out: &mut [E], qkv: &[E], pos: usize, d: Dims) {
    let (hs, stride, width) = (d.hs, d.qkv_width(), d.nh * d.hs);
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(hs).enumerate().for_each(|(task, out)| {
        let (b, h) = (task / d.nh, task % d.nh);
        let g = h / d.group();
        let row = |j: usize| &qkv[(b * d.t + j) * stride..(b * d.t + j + 1) * stride];
        let q: Vec<f32> = row(pos)[h * hs..(h + 1) * hs]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let k = |j: usize| &row(j)[(d.nh + g) * hs..(d.nh + g + 1) * hs];
        let v = |j: usize| &row(j)[(d.nh + d.nkv + g) * hs..(d.nh + d.nkv + g + 1) * hs];
        let scores: Vec<f32> = (0..=pos)
            .map(|j| {
                let dot: f32 = q.iter().zip(k(j)).map(|(a, b)| a * b.to_f32()).sum();
                dot * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| exp_fast(s - max)).collect();
        let total: f32 = weights.iter().sum();
        let mut acc = vec![0f32; hs];
        for (j, w) in weights.iter().enumerate() {
            for (a, x) in acc.iter_mut().zip(v(j)) {
                *a += w * x.to_f32();
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = E::from_f32(a / total);
        }
    });
    debug_assert_eq!(out.len(), d.b * width);
}

/// FlashAttention's backward without atomics, from `p_ij = exp(q_i k_j s - lse_i)` and `ds_ij =
/// p_ij (dout_i . v_j - delta_i) s` with `delta_i = dout_i . out_i`: a pass over key blocks sums
/// `dv_j = sum_i p_ij dout_i` and `dk_j = sum_i ds_ij q_i` (over the query heads of the key's
/// group in head order, then over query blocks), then a pass over query blocks sums `dq_i =
/// sum_j ds_ij k_j`. `delta` is scratch, `(b t, nh)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<E: Elem>(
    dqkv: &mut [E],
    delta: &mut [f32],
    dout: &[E],
    qkv: &[E],
    out: &[E],
    lse: &[f32],
    d: Dims,
) {
    let (t, nh, hs) = (d.t, d.nh, d.hs);
    let (width, stride, group) = (nh * hs, d.qkv_width(), d.group());
    delta
        .par_chunks_mut(nh)
        .enumerate()
        .for_each(|(row, delta)| {
            for (h, dl) in delta.iter_mut().enumerate() {
                let range = row * width + h * hs..row * width + (h + 1) * hs;
                *dl = dout[range.clone()]
                    .iter()
                    .zip(&out[range])
                    .map(|(a, b)| a.to_f32() * b.to_f32())
                    .sum();
            }
        });
    let pass = Backward {
        qkv,
        dout,
        lse,
        delta,
        scale: 1.0 / (hs as f32).sqrt(),
    };
    for_each_block(dqkv, d, d.nkv, |b, kv, keys, dqkv| {
        let m = keys.len();
        let mut p = [0.0f32; BLOCK * BLOCK];
        let mut ds = [0.0f32; BLOCK * BLOCK];
        let mut dk = [0.0f32; BLOCK * MAX_HEAD_SIZE];
        let mut dv = [0.0f32; BLOCK * MAX_HEAD_SIZE];
        let (dk, dv) = (&mut dk[..m * hs], &mut dv[..m * hs]);
        for h in kv * group..(kv + 1) * group {
            let head = Head { d, b, h };
            for first in (keys.start..t).step_by(BLOCK) {
                let queries = first..(first + BLOCK).min(t);
                let n = queries.len();
                pass.tiles(head, queries.clone(), keys.clone(), &mut p, &mut ds);
                let g = head.rows(dout, queries.clone());
                let q = head.qkv(qkv, 0, queries);
                gemm(MatMut::row_major(dv, m, hs), tile(&p, n, m).t(), g, true);
                gemm(MatMut::row_major(dk, m, hs), tile(&ds, n, m).t(), q, true);
            }
        }
        store(dqkv, stride, qkv_column(d, 1, kv), dk, hs, m, |_| 1.0);
        store(dqkv, stride, qkv_column(d, 2, kv), dv, hs, m, |_| 1.0);
    });
    for_each_block(dqkv, d, nh, |b, h, queries, dqkv| {
        let head = Head { d, b, h };
        let n = queries.len();
        let mut p = [0.0f32; BLOCK * BLOCK];
        let mut ds = [0.0f32; BLOCK * BLOCK];
        let mut dq = [0.0f32; BLOCK * MAX_HEAD_SIZE];
        let dq = &mut dq[..n * hs];
        for first in (0..queries.end).step_by(BLOCK) {
            let keys = first..(first + BLOCK).min(queries.end);
            let m = keys.len();
            pass.tiles(head, queries.clone(), keys.clone(), &mut p, &mut ds);
            let k = head.qkv(qkv, 1, keys);
            gemm(MatMut::row_major(dq, n, hs), tile(&ds, n, m), k, true);
        }
        store(dqkv, stride, qkv_column(d, 0, h), dq, hs, n, |_| 1.0);
    });
}
