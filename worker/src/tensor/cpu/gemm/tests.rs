use half::bf16;
use proptest::prelude::*;

use super::*;

/// Where a test matrix's elements live in its buffer.
#[derive(Clone, Copy, Debug)]
enum Layout {
    RowMajor,
    /// The transpose of a row-major buffer (columns contiguous).
    Transposed,
    /// Rows contiguous but further apart than the row length (a column slice).
    PaddedRows,
    /// Columns contiguous but further apart than the column length.
    PaddedColumns,
    /// Neither direction contiguous.
    Strided,
}

const LAYOUTS: [Layout; 5] = [
    Layout::RowMajor,
    Layout::Transposed,
    Layout::PaddedRows,
    Layout::PaddedColumns,
    Layout::Strided,
];

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A matrix's buffer and strides; padding holds values that must never be read into the
/// product (large, so reading one would show).
struct Owned<E> {
    data: Vec<E>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<E: Elem> Owned<E> {
    fn random(rows: usize, cols: usize, layout: Layout, rng: &mut Rng) -> Self {
        let (row_stride, col_stride) = match layout {
            Layout::RowMajor => (cols, 1),
            Layout::Transposed => (1, rows),
            Layout::PaddedRows => (cols + 3, 1),
            Layout::PaddedColumns => (1, rows + 5),
            Layout::Strided => (2 * cols + 1, 2),
        };
        let len = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * row_stride + (cols - 1) * col_stride + 1
        };
        let mut data = vec![E::from_f32(1e4); len];
        for i in 0..rows {
            for j in 0..cols {
                data[i * row_stride + j * col_stride] = E::from_f32(rng.next());
            }
        }
        Owned {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    fn mat(&self) -> Mat<'_, E> {
        Mat {
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    fn get(&self, i: usize, j: usize) -> f64 {
        f64::from(self.data[i * self.row_stride + j * self.col_stride].to_f32())
    }
}

/// The unit roundoff of storing into `E`: 0 for f32 (the sum bound covers it), 2^-8 for
/// bf16, 2^-11 for f16.
fn unit_roundoff<E: Elem>() -> f64 {
    if size_of::<E>() == 4 {
        return 0.0;
    }
    (1..24)
        .map(|bits| 2f64.powi(-bits))
        .find(|&u| E::from_f32((1.0 + u) as f32).to_f32() == 1.0)
        .expect("a 16-bit float rounds 1 + 2^-16 to 1")
}

/// Runs one product and compares it with an f64 reference. The tolerance is the standard
/// bound for a k-term f32 sum, (k + 2) 2^-24 sum|a b|, plus one rounding of the output
/// dtype and f16's subnormal spacing.
fn check<A: Elem, B: Elem, C: Elem>(
    arch: Arch,
    (m, k, n): (usize, usize, usize),
    a_layout: Layout,
    b_layout: Layout,
    accumulate: bool,
    seed: u64,
) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let a = Owned::<A>::random(m, k, a_layout, &mut rng);
    let b = Owned::<B>::random(k, n, b_layout, &mut rng);
    // C rows are padded; the padding and, without `accumulate`, the old contents are NaN
    // or a sentinel that must come out untouched or ignored.
    let c_stride = n + 3;
    let sentinel = C::from_f32(-7.0);
    let mut c = vec![sentinel; m * c_stride];
    let mut c0 = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let old = if accumulate { rng.next() } else { f32::NAN };
            c[i * c_stride + j] = C::from_f32(old);
            c0[i * n + j] = f64::from(C::from_f32(old).to_f32());
        }
    }
    let out = MatMut {
        data: &mut c,
        rows: m,
        cols: n,
        row_stride: c_stride,
    };
    gemm_with(
        arch,
        out,
        a.mat(),
        b.mat(),
        accumulate,
        rayon::current_num_threads(),
    );
    let gamma = (k + 2) as f64 * 2f64.powi(-24);
    let unit = unit_roundoff::<C>();
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut magnitude) = (0.0f64, 0.0f64);
            if accumulate {
                exact = c0[i * n + j];
                magnitude = exact.abs();
            }
            for p in 0..k {
                let term = a.get(i, p) * b.get(p, j);
                exact += term;
                magnitude += term.abs();
            }
            let got = f64::from(c[i * c_stride + j].to_f32());
            let sum_bound = gamma * magnitude;
            let tolerance = sum_bound + unit * (exact.abs() + sum_bound) + 1e-7;
            assert!(
                (got - exact).abs() <= tolerance,
                "({m}, {k}, {n}) {a_layout:?} @ {b_layout:?} accumulate={accumulate}: \
                 c[{i}][{j}] = {got}, expected {exact} within {tolerance}"
            );
        }
        for j in n..c_stride {
            assert_eq!(
                c[i * c_stride + j].to_f32().to_bits(),
                sentinel.to_f32().to_bits(),
                "padding c[{i}][{j}] was written"
            );
        }
    }
}

/// Both sets of code paths this machine can run, so the portable one is tested on x86 too.
fn arches() -> [Arch; 2] {
    [Arch::PORTABLE, arch::best()]
}

#[test]
fn matches_reference_on_edge_and_block_boundary_shapes() {
    let shapes = [
        (1, 1, 1),
        (1, 7, 1),
        (1, 300, 1),
        (3, 1, 5),
        (2, 5, 1),
        (1, 3, 40),
        (67, 131, 29),
        // Around MR, NR and KC.
        (5, 255, 15),
        (6, 256, 16),
        (7, 257, 17),
        (13, 513, 33),
        // Around MC and NT_MAX.
        (143, 9, 20),
        (145, 17, 3),
        (289, 5, 31),
        (3, 4, 2047),
        (4, 3, 2049),
    ];
    for (seed, &shape) in shapes.iter().enumerate() {
        for arch in arches() {
            for accumulate in [false, true] {
                check::<f32, f32, f32>(
                    arch,
                    shape,
                    Layout::RowMajor,
                    Layout::Transposed,
                    accumulate,
                    seed as u64,
                );
            }
        }
    }
}

#[test]
fn matches_reference_for_every_layout() {
    for (seed, (a_layout, b_layout)) in LAYOUTS
        .iter()
        .flat_map(|&a| LAYOUTS.map(|b| (a, b)))
        .enumerate()
    {
        for arch in arches() {
            check::<f32, f32, f32>(arch, (23, 41, 37), a_layout, b_layout, true, seed as u64);
            check::<f32, f32, f32>(arch, (13, 270, 18), a_layout, b_layout, false, seed as u64);
        }
    }
}

#[test]
fn matches_reference_for_half_precision() {
    let arch = arch::best();
    for (seed, shape) in [(1, 1, 1), (67, 131, 29), (7, 300, 17)]
        .into_iter()
        .enumerate()
    {
        for accumulate in [false, true] {
            let seed = seed as u64;
            let (row, tr) = (Layout::RowMajor, Layout::Transposed);
            check::<bf16, bf16, bf16>(arch, shape, row, tr, accumulate, seed);
            check::<f16, f16, f16>(arch, shape, tr, row, accumulate, seed);
            check::<bf16, f32, f32>(arch, shape, row, row, accumulate, seed);
            check::<f32, f16, bf16>(arch, shape, tr, tr, accumulate, seed);
            check::<f16, bf16, f32>(arch, shape, row, tr, accumulate, seed);
        }
    }
}

#[test]
fn empty_dimensions() {
    let row = Layout::RowMajor;
    for arch in arches() {
        for accumulate in [false, true] {
            for shape in [(0, 5, 4), (4, 5, 0), (0, 0, 0)] {
                check::<f32, f32, f32>(arch, shape, row, row, accumulate, 1);
            }
            check::<f32, f32, bf16>(arch, (4, 0, 6), row, row, accumulate, 2);
        }
    }
}

/// SIMD and scalar packing must give the same bits, or results would depend on more than
/// the microkernel.
#[test]
fn simd_packing_changes_no_bits() {
    let fast = arch::best();
    let scalar = Arch {
        simd_pack: false,
        ..fast
    };
    let (m, k, n) = (50, 300, 70);
    let mut rng = Rng(3);
    let a = Owned::<f32>::random(m, k, Layout::RowMajor, &mut rng);
    let b = Owned::<f32>::random(k, n, Layout::Transposed, &mut rng);
    let run = |arch: Arch| {
        let mut c = vec![0.0f32; m * n];
        gemm_with(
            arch,
            MatMut::row_major(&mut c, m, n),
            a.mat(),
            b.mat(),
            false,
            rayon::current_num_threads(),
        );
        c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
    };
    assert!(run(fast) == run(scalar));
}

#[test]
fn k_zero_overwrites_with_zeros() {
    let mut c = vec![f32::NAN; 6];
    gemm(
        MatMut::row_major(&mut c, 2, 3),
        Mat::<f32>::row_major(&[], 2, 0),
        Mat::<f32>::row_major(&[], 0, 3),
        false,
    );
    assert!(c.iter().all(|&x| x.to_bits() == 0));
}

#[test]
fn constructors_describe_the_layouts() {
    // w is a row-major (3, 2) buffer; its transposed view is (2, 3).
    let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let view = Mat::transposed(&w, 2, 3);
    assert_eq!(view.data[view.row_stride + 2 * view.col_stride], 6.0);
    let x = [1.0f32, 1.0];
    let mut out = [0.0f32; 3];
    // out(1, 3) = x(1, 2) @ w(3, 2)^T: the forward of a linear layer.
    gemm(
        MatMut::row_major(&mut out, 1, 3),
        Mat::row_major(&x, 1, 2),
        view,
        false,
    );
    assert_eq!(out, [3.0, 7.0, 11.0]);
}

#[test]
#[should_panic(expected = "invariant")]
fn short_input_panics() {
    let mut c = [0.0f32; 4];
    gemm(
        MatMut::row_major(&mut c, 2, 2),
        Mat::row_major(&[1.0f32; 3], 2, 2),
        Mat::row_major(&[1.0f32; 4], 2, 2),
        false,
    );
}

#[test]
#[should_panic(expected = "invariant")]
fn overlapping_output_rows_panic() {
    let mut c = [0.0f32; 8];
    let out = MatMut {
        data: &mut c,
        rows: 2,
        cols: 4,
        row_stride: 2,
    };
    gemm(
        out,
        Mat::row_major(&[1.0f32; 2], 2, 1),
        Mat::row_major(&[1.0f32; 4], 1, 4),
        false,
    );
}

#[test]
fn tilings_cover_the_output_once() {
    for (m, n, k) in [
        (1, 1, 1),
        (2048, 2304, 768),
        (2304, 768, 2048),
        (7, 5000, 300),
        (5000, 7, 300),
        (100, 100, 100_000),
    ] {
        for threads in [1, 2, 3, 8, 16] {
            for out_is_f32 in [false, true] {
                let tiling = Tiling::new(m, n, k, threads, out_is_f32);
                let mut covered = vec![0u8; m * n];
                for task in 0..tiling.count() {
                    let tile = tiling.tile(task);
                    assert!(tile.rows > 0 && tile.cols > 0 && tile.cols <= NT_MAX);
                    assert!(out_is_f32 || tile.rows * tile.cols <= CTILE_MAX);
                    for i in tile.row..tile.row + tile.rows {
                        for j in tile.col..tile.col + tile.cols {
                            covered[i * n + j] += 1;
                        }
                    }
                }
                assert!(
                    covered.iter().all(|&x| x == 1),
                    "{m}x{n} on {threads} threads"
                );
            }
        }
    }
}

/// The product's bits must not depend on the thread count; the shapes here split into
/// different tilings for each pool size.
#[test]
fn same_bits_for_any_thread_count() {
    let (m, k, n) = (150, 300, 260);
    assert!(Tiling::new(m, n, k, 1, true).count() < Tiling::new(m, n, k, 8, true).count());
    let mut rng = Rng(7);
    let a = Owned::<f32>::random(m, k, Layout::RowMajor, &mut rng);
    let b = Owned::<f32>::random(k, n, Layout::Transposed, &mut rng);
    let a16 = Owned::<bf16>::random(m, k, Layout::Transposed, &mut rng);
    let initial: Vec<f32> = (0..m * n).map(|_| rng.next()).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("build a rayon pool");
        let mut c = initial.clone();
        let mut c16 = vec![bf16::ZERO; m * n];
        pool.install(|| {
            gemm(MatMut::row_major(&mut c, m, n), a.mat(), b.mat(), true);
            gemm(MatMut::row_major(&mut c16, m, n), a16.mat(), b.mat(), false);
        });
        let bits: Vec<u32> = c.iter().map(|x| x.to_bits()).collect();
        let bits16: Vec<u16> = c16.iter().map(|x| x.to_bits()).collect();
        (bits, bits16)
    };
    let one = run(1);
    let mut serial = initial.clone();
    gemm_on_this_thread(MatMut::row_major(&mut serial, m, n), a.mat(), b.mat(), true);
    let serial: Vec<u32> = serial.iter().map(|x| x.to_bits()).collect();
    assert!(serial == one.0, "gemm_on_this_thread changed the result");
    for threads in [2, 3, 8] {
        assert!(run(threads) == one, "{threads} threads changed the result");
    }
}

#[test]
fn f16_conversion_is_exact_for_every_bit_pattern() {
    for bits in 0..=u16::MAX {
        let expected = f16::from_bits(bits).to_f32();
        let got = f16_bits_to_f32(bits);
        assert!(
            got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
            "{bits:#06x}: {got} != {expected}"
        );
    }
}

/// After `warm_up`, calls of any shape and dtype reuse every thread's buffers.
#[test]
fn workspace_is_allocated_once() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("build a rayon pool");
    pool.install(|| {
        let buffers = || {
            rayon::broadcast(|_| {
                WORKSPACE.with(|workspace| {
                    let workspace = workspace.borrow();
                    let lens =
                        workspace.apack.len() + workspace.bpack.len() + workspace.ctile.len();
                    assert_eq!(lens * size_of::<f32>(), WORKSPACE_BYTES + CTILE_BYTES);
                    [
                        workspace.apack.as_ptr() as usize,
                        workspace.bpack.as_ptr() as usize,
                        workspace.ctile.as_ptr() as usize,
                    ]
                })
            })
        };
        warm_up();
        let before = buffers();
        let a = vec![0.5f32; 300 * 400];
        let mut c = vec![bf16::ZERO; 300 * 300];
        let mut c32 = vec![0.0f32; 300 * 300];
        for (m, k, n) in [(1, 1, 1), (300, 400, 300), (7, 300, 1)] {
            let (a_mat, b_mat) = (Mat::row_major(&a, m, k), Mat::transposed(&a, k, n));
            gemm(MatMut::row_major(&mut c, m, n), a_mat, b_mat, false);
            gemm(MatMut::row_major(&mut c32, m, n), a_mat, b_mat, true);
        }
        assert!(buffers() == before);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_shapes_match_reference(
        m in 0usize..40,
        k in 0usize..40,
        n in 0usize..40,
        a_layout in 0usize..5,
        b_layout in 0usize..5,
        accumulate: bool,
        portable: bool,
        dtypes in 0usize..3,
        seed: u64,
    ) {
        let arch = if portable { Arch::PORTABLE } else { arch::best() };
        let (shape, a_layout, b_layout) = ((m, k, n), LAYOUTS[a_layout], LAYOUTS[b_layout]);
        match dtypes {
            0 => check::<f32, f32, f32>(arch, shape, a_layout, b_layout, accumulate, seed),
            1 => check::<bf16, f32, bf16>(arch, shape, a_layout, b_layout, accumulate, seed),
            _ => check::<f16, f16, f16>(arch, shape, a_layout, b_layout, accumulate, seed),
        }
    }
}
