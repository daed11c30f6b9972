//! Microkernel selection on x86_64: AVX2 + FMA when the CPU has them.

use std::arch::x86_64::*;

use super::{Arch, MR, NR};

/// A hint to load the line holding `ptr` into cache; never faults.
#[inline(always)]
pub(super) fn prefetch(ptr: *const u8) {
    // SAFETY: a prefetch has no architectural effect and never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast::<i8>()) };
}

pub(super) fn best() -> Arch {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Arch {
            kernel: kernel_avx2_fma,
            simd_pack: true,
        }
    } else {
        Arch::PORTABLE
    }
}

/// Packs `MR` f32 rows side by side (`dst[p][r] = rows[r][p]`) with 6x8 register
/// transposes: 16 stores per 48 elements instead of 48.
///
/// Safety: the CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transpose_rows(dst: &mut [[f32; MR]], rows: &[&[f32]; MR]) {
    const _: () = assert!(MR == 6, "transpose_rows is written for 6 rows");
    let kc = dst.len();
    assert!(
        rows.iter().all(|row| row.len() == kc),
        "invariant: every row spans the sliver"
    );
    let blocks = kc / 8;
    for block in 0..blocks {
        let p = block * 8;
        // SAFETY: p + 8 <= kc = rows[r].len().
        let r: [__m256; MR] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(rows[i].as_ptr().add(p)) });
        // Per 128-bit lane (columns p..p+4, then p+4..p+8): pair rows, then gather four.
        let (t0, t1) = (
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
        );
        let (t2, t3) = (
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
        );
        let (t4, t5) = (
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
        );
        // u[q] holds rows 0..4 of columns q (low lane) and q + 4 (high lane).
        let u = [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        ];
        // Rows 4 and 5 of columns (0, 1) and (2, 3), low lane; (4, 5) and (6, 7), high.
        let pairs = [t4, t5];
        let out = dst[p..p + 8].as_mut_ptr().cast::<f32>();
        for half in 0..2 {
            for q in 0..4 {
                let column = half * 4 + q;
                let (four, pair) = if half == 0 {
                    (
                        _mm256_castps256_ps128(u[q]),
                        _mm256_castps256_ps128(pairs[q / 2]),
                    )
                } else {
                    (
                        _mm256_extractf128_ps::<1>(u[q]),
                        _mm256_extractf128_ps::<1>(pairs[q / 2]),
                    )
                };
                // SAFETY: column < 8, so the six floats at out + 6 * column lie inside
                // dst[p..p + 8].
                unsafe {
                    let at = out.add(column * MR);
                    _mm_storeu_ps(at, four);
                    if q % 2 == 0 {
                        _mm_storel_pd(at.add(4).cast::<f64>(), _mm_castps_pd(pair));
                    } else {
                        _mm_storeh_pd(at.add(4).cast::<f64>(), _mm_castps_pd(pair));
                    }
                }
            }
        }
    }
    for (p, d) in dst.iter_mut().enumerate().skip(blocks * 8) {
        for (d, row) in d.iter_mut().zip(rows) {
            *d = row[p];
        }
    }
}

/// Packs `NR` f32 columns row by row (`dst[p][j] = columns[j][p]`) with 8x8 register
/// transposes.
///
/// Safety: the CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transpose_columns(dst: &mut [[f32; NR]], columns: &[&[f32]; NR]) {
    const _: () = assert!(NR == 16, "transpose_columns is written for 16 columns");
    let kc = dst.len();
    assert!(
        columns.iter().all(|column| column.len() == kc),
        "invariant: every column spans the sliver"
    );
    let blocks = kc / 8;
    for block in 0..blocks {
        let p = block * 8;
        for half in 0..2 {
            // SAFETY: p + 8 <= kc = columns[j].len().
            let c: [__m256; 8] = std::array::from_fn(|i| unsafe {
                _mm256_loadu_ps(columns[half * 8 + i].as_ptr().add(p))
            });
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (x, y) = (c[i / 2 * 2], c[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(x, y)
                } else {
                    _mm256_unpackhi_ps(x, y)
                }
            });
            // s[4 g + q]: columns 4g..4g+4 at rows q (low lane) and q + 4 (high lane).
            let s: [__m256; 8] = std::array::from_fn(|i| {
                let (g, q) = (i / 4, i % 4);
                let (x, y) = (t[4 * g + q / 2], t[4 * g + q / 2 + 2]);
                if q % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(x, y)
                } else {
                    _mm256_shuffle_ps::<0xEE>(x, y)
                }
            });
            for q in 0..4 {
                let low = _mm256_permute2f128_ps::<0x20>(s[q], s[4 + q]);
                let high = _mm256_permute2f128_ps::<0x31>(s[q], s[4 + q]);
                // SAFETY: rows p + q and p + q + 4 are < kc; the eight floats from column
                // 8 half lie inside their NR-wide row.
                unsafe {
                    _mm256_storeu_ps(dst[p + q].as_mut_ptr().add(half * 8), low);
                    _mm256_storeu_ps(dst[p + q + 4].as_mut_ptr().add(half * 8), high);
                }
            }
        }
    }
    for (p, d) in dst.iter_mut().enumerate().skip(blocks * 8) {
        for (d, column) in d.iter_mut().zip(columns) {
            *d = column[p];
        }
    }
}

/// 6x16 AVX2 microkernel: 12 accumulator registers, two B vectors and one broadcast A.
///
/// Safety: see [`KernelFn`]; the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2_fma(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
) {
    const _: () = assert!(MR == 6 && NR == 16, "kernel_avx2_fma is written for 6x16");
    for r in 0..MR {
        // SAFETY: prefetching never faults; the addresses are the tile's rows anyway.
        unsafe {
            let row = c.add(r * rs_c).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(NR * 4 - 4));
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so the loads stay inside the kc * NR and kc * MR slivers.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.add(p * NR)),
                _mm256_loadu_ps(b.add(p * NR + 8)),
            )
        };
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let a_val = unsafe { _mm256_broadcast_ss(&*a.add(p * MR + r)) };
            acc_row[0] = _mm256_fmadd_ps(a_val, b0, acc_row[0]);
            acc_row[1] = _mm256_fmadd_ps(a_val, b1, acc_row[1]);
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees MR rows of NR writable f32 at `c`, `rs_c` apart.
        unsafe {
            let row = c.add(r * rs_c);
            if overwrite {
                _mm256_storeu_ps(row, acc_row[0]);
                _mm256_storeu_ps(row.add(8), acc_row[1]);
            } else {
                _mm256_storeu_ps(row, _mm256_add_ps(_mm256_loadu_ps(row), acc_row[0]));
                _mm256_storeu_ps(
                    row.add(8),
                    _mm256_add_ps(_mm256_loadu_ps(row.add(8)), acc_row[1]),
                );
            }
        }
    }
}
