//! Single-precision matrix multiply for the CPU backend: `c = a @ b` or `c += a @ b`.
//!
//! We write our own instead of using `matrixmultiply` because the worker's step loop must not
//! allocate (that crate allocates its packing buffer on every call) and must give the same bits
//! whatever the thread count.
//!
//! The structure is the classic Goto/BLIS one. C is cut into disjoint task tiles, one rayon job
//! each. A task walks k in blocks of `KC`; for each block it packs its columns of B into
//! `NR`-wide slivers and, `MC` rows at a time, its rows of A into `MR`-tall slivers, both
//! as contiguous f32 (converting the storage dtype and absorbing any stride or transposition on
//! the way). A register-blocked `MR`x`NR` microkernel then multiplies sliver pairs.
//!
//! Determinism: element (i, j) is always `((c0 + s0) + s1) + ...` (or `(s0 + s1) + ...` without
//! `accumulate`), where `s_b` is the sum over k block `b`, taken in increasing k by one FMA (or
//! multiply-add) chain. That order depends only on the fixed `KC`, never on how C is cut into
//! tasks, so the tiling may follow the thread count freely. Results do depend on the microkernel
//! (AVX2 fuses multiply and add, the portable one does not), which is chosen once per process.
//! Packing only moves and converts values, so its SIMD and scalar paths pack the same bits.
//!
//! Outputs other than f32 are summed in an f32 tile and rounded once at the end, so a bf16
//! output carries one rounding, not one per k block.
//!
//! Memory: packing buffers live in a per-thread workspace, allocated at a fixed size on a
//! thread's first task ([`WORKSPACE_BYTES`], plus [`CTILE_BYTES`] once the thread first writes a
//! non-f32 output) and reused afterwards, so steady-state calls do not touch the heap.
//! [`warm_up`] allocates them on every pool thread up front.

use std::any::TypeId;
use std::cell::RefCell;
use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::tensor::Elem;

/// Microkernel rows: 6 rows x 2 AVX vectors = 12 accumulators, enough independent FMA chains to
/// hide FMA latency on two FMA pipes while leaving registers for the B and A operands.
const MR: usize = 6;
/// Microkernel columns: two 8-lane AVX vectors.
const NR: usize = 16;
/// Depth of one k block: an A sliver (6 KiB) and a B sliver (16 KiB) fit in L1 together.
/// Fixed for all calls: it alone fixes the summation order.
const KC: usize = 256;
/// Rows of A packed at a time: the packed block (144 KiB) stays in L2 while the B slivers stream
/// past it.
const MC: usize = 144;
/// Widest task tile, which bounds the packed B block (2 MiB) a task keeps in L3. Wide, because
/// a task packs its rows of A once per tile column: at 2048 a (4096, 768) weight's forward
/// packs its input twice, where 1024 would pack it four times.
const NT_MAX: usize = 2048;
/// Largest f32 tile (elements) a task sums a non-f32 output into before rounding it.
const CTILE_MAX: usize = 256 * 1024;
/// Smallest task worth a rayon job, in multiply-adds (about 30 us on one core).
const MIN_TASK_FMAS: usize = 1 << 20;
/// Slack that lets a buffer start on a 64-byte boundary.
const ALIGN_SLACK: usize = 16;
/// Bytes of packing buffers one thread allocates on its first call and keeps.
pub const WORKSPACE_BYTES: usize = (MC * KC + KC * NT_MAX + 2 * ALIGN_SLACK) * size_of::<f32>();
/// Bytes of the f32 output tile one thread allocates the first time it writes bf16 or f16.
pub const CTILE_BYTES: usize = (CTILE_MAX + ALIGN_SLACK) * size_of::<f32>();

/// A strided read-only matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, E> {
    pub data: &'a [E],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, E> Mat<'a, E> {
    /// A row-major `(rows, cols)` buffer.
    pub fn row_major(data: &'a [E], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `(cols, rows)` buffer, viewed as `(rows, cols)`; e.g. a
    /// PyTorch `(out, in)` weight seen as `(in, out)`.
    pub fn transposed(data: &'a [E], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// The same elements seen as `(cols, rows)`: no data moves, the strides swap.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Panics unless every element index lies inside `data`.
    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(r, c)| r.checked_add(c));
        assert!(
            last.is_some_and(|last| last < self.data.len()),
            "invariant: gemm {what} is ({}, {}) with strides ({}, {}) but holds {} elements",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// A row-major output matrix: element (i, j) is `data[i * row_stride + j]`.
pub struct MatMut<'a, E> {
    pub data: &'a mut [E],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a, E> MatMut<'a, E> {
    /// A row-major `(rows, cols)` buffer.
    pub fn row_major(data: &'a mut [E], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }

    /// Panics unless every element lies inside `data` and rows do not overlap; tasks write
    /// disjoint tiles through raw pointers, so overlapping rows would be a data race.
    fn check(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        assert!(
            self.rows == 1 || self.row_stride >= self.cols,
            "invariant: gemm output rows overlap: {} columns but row stride {}",
            self.cols,
            self.row_stride
        );
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| r.checked_add(self.cols - 1));
        assert!(
            last.is_some_and(|last| last < self.data.len()),
            "invariant: gemm output is ({}, {}) with row stride {} but holds {} elements",
            self.rows,
            self.cols,
            self.row_stride,
            self.data.len()
        );
    }
}

/// `c = a @ b`, or `c += a @ b` when `accumulate`. `a` is (m, k), `b` is (k, n), `c` is (m, n).
///
/// Elements are converted to f32 while packing; sums are f32 in a fixed order (see the module
/// doc), so the result has the same bits for any rayon thread count. Without `accumulate`, the
/// old contents of `c` are never read (NaN included); with k = 0 it is zeroed.
pub fn gemm<A: Elem, B: Elem, C: Elem>(
    c: MatMut<'_, C>,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
    accumulate: bool,
) {
    gemm_with(arch(), c, a, b, accumulate, rayon::current_num_threads());
}

/// [`gemm`] entirely on the calling thread, for small products inside a task that is already
/// one of many in parallel (attention's tiles). Same bits as [`gemm`].
pub fn gemm_on_this_thread<A: Elem, B: Elem, C: Elem>(
    c: MatMut<'_, C>,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
    accumulate: bool,
) {
    gemm_with(arch(), c, a, b, accumulate, 1);
}

/// An `MR`x`NR` microkernel: `c = acc` (`overwrite`) or `c += acc`, where `acc` is the
/// product of a packed A sliver and a packed B sliver of depth `kc`.
///
/// Safety: `a` holds `kc * MR` and `b` `kc * NR` readable f32; `c` addresses `MR` rows of `NR`
/// writable f32, `rs_c` apart, that no other thread touches during the call.
type KernelFn =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rs_c: usize, overwrite: bool);

/// The code paths of one call: the microkernel, and whether f32 operands that need transposing
/// are packed with SIMD transposes rather than element by element.
#[derive(Clone, Copy)]
struct Arch {
    kernel: KernelFn,
    /// Only set where `arch::transpose_rows` and `arch::transpose_columns` may run.
    simd_pack: bool,
}

impl Arch {
    /// Plain Rust everywhere; what `arch::best` falls back to, and what tests compare against.
    const PORTABLE: Arch = Arch {
        kernel: kernel_portable,
        simd_pack: false,
    };
}

/// The fastest code paths this CPU runs, detected on first use.
fn arch() -> Arch {
    static ARCH: OnceLock<Arch> = OnceLock::new();
    *ARCH.get_or_init(arch::best)
}

fn gemm_with<A: Elem, B: Elem, C: Elem>(
    arch: Arch,
    c: MatMut<'_, C>,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "invariant: gemm shapes disagree: c ({}, {}) = a ({}, {}) @ b ({}, {})",
        c.rows,
        c.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    a.check("input a");
    b.check("input b");
    c.check();
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                let start = i * c.row_stride;
                c.data[start..start + n].fill(C::from_f32(0.0));
            }
        }
        return;
    }
    let job = Job {
        arch,
        out: OutPtr {
            ptr: c.data.as_mut_ptr(),
            row_stride: c.row_stride,
        },
        a,
        b,
        accumulate,
        out_is_f32: TypeId::of::<C>() == TypeId::of::<f32>(),
    };
    let tiling = Tiling::new(m, n, k, threads, job.out_is_f32);
    let run = |task: usize| {
        let tile = tiling.tile(task);
        WORKSPACE.with(|workspace| {
            let mut workspace = workspace
                .try_borrow_mut()
                .expect("invariant: gemm tasks do not nest on one thread");
            // SAFETY: `c.check()` put every element of the (m, n) output inside `c.data`, with
            // rows that do not overlap; tiles of one tiling are disjoint and each task runs
            // once, so no two tasks write the same element, and `c` is borrowed mutably for
            // the whole call.
            unsafe { job.run_tile(&mut workspace, tile) };
        });
    };
    let tasks = tiling.count();
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// What every task of one call shares: the operands, where the output is, and how to add.
#[derive(Clone, Copy)]
struct Job<'a, A, B, C> {
    arch: Arch,
    out: OutPtr<C>,
    a: Mat<'a, A>,
    b: Mat<'a, B>,
    accumulate: bool,
    /// C is f32, so tasks sum straight into it rather than into an f32 tile.
    out_is_f32: bool,
}

/// The output's base pointer, shared by all tasks; each writes only its own tile.
struct OutPtr<C> {
    ptr: *mut C,
    row_stride: usize,
}

impl<C> Clone for OutPtr<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for OutPtr<C> {}
// SAFETY: tasks on different threads write disjoint tiles through the pointer (see
// `gemm_with`), and `C: Elem` is `Send + Sync`.
unsafe impl<C: Send> Send for OutPtr<C> {}
// SAFETY: as for `Send`: no element is written by two tasks.
unsafe impl<C: Sync> Sync for OutPtr<C> {}

/// One task's rectangle of C.
#[derive(Clone, Copy, Debug)]
struct Tile {
    row: usize,
    rows: usize,
    col: usize,
    cols: usize,
}

/// How C is cut into equal task tiles: `tiles_m` x `tiles_n` tiles of `tile_m` x `tile_n`, the
/// last row and column of tiles clipped.
#[derive(Clone, Copy, Debug)]
struct Tiling {
    m: usize,
    n: usize,
    tile_m: usize,
    tile_n: usize,
    tiles_m: usize,
    tiles_n: usize,
}

impl Tiling {
    /// Cuts C into as few tiles as keep every thread busy (at least `threads`, and a count
    /// that divides evenly, within 5%), as square as possible: a task packs its rows of A once
    /// per tile column and its columns of B once per tile row, so few square tiles pack the
    /// least. Tiles stay large enough to be worth a job.
    fn new(m: usize, n: usize, k: usize, threads: usize, out_is_f32: bool) -> Self {
        let (mut split_m, mut split_n) = (1, n.div_ceil(NT_MAX));
        loop {
            let tile_m = m.div_ceil(split_m).next_multiple_of(MR);
            let tile_n = n.div_ceil(split_n).next_multiple_of(NR);
            let tiling = Tiling {
                m,
                n,
                tile_m,
                tile_n,
                tiles_m: m.div_ceil(tile_m),
                tiles_n: n.div_ceil(tile_n),
            };
            let count = tiling.count();
            // Equal tiles finish in ceil(count / threads) rounds; allow 5% idle in the last one.
            let balanced = count >= threads && count.div_ceil(threads) * threads * 20 <= count * 21;
            let fits = out_is_f32 || tile_m * tile_n <= CTILE_MAX;
            let can_split_m = tile_m > MR;
            let can_split_n = tile_n > NR;
            let split_m_next = can_split_m && (tile_m >= tile_n || !can_split_n);
            let next_fmas = if split_m_next {
                m.div_ceil(split_m + 1).saturating_mul(tile_n)
            } else {
                n.div_ceil(split_n + 1).saturating_mul(tile_m)
            }
            .saturating_mul(k);
            let worth_splitting = !balanced && next_fmas >= MIN_TASK_FMAS;
            if (fits && !worth_splitting) || !(can_split_m || can_split_n) {
                return tiling;
            }
            if split_m_next {
                split_m += 1;
            } else {
                split_n += 1;
            }
        }
    }

    fn count(&self) -> usize {
        self.tiles_m * self.tiles_n
    }

    fn tile(&self, task: usize) -> Tile {
        let (row, col) = (
            (task / self.tiles_n) * self.tile_m,
            (task % self.tiles_n) * self.tile_n,
        );
        Tile {
            row,
            rows: self.tile_m.min(self.m - row),
            col,
            cols: self.tile_n.min(self.n - col),
        }
    }
}

/// One thread's packing buffers, grown to their fixed size on first use and then reused.
struct Workspace {
    apack: Vec<f32>,
    bpack: Vec<f32>,
    ctile: Vec<f32>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = const {
        RefCell::new(Workspace { apack: Vec::new(), bpack: Vec::new(), ctile: Vec::new() })
    };
}

/// Allocates the packing workspace of the calling thread and of every thread of the current
/// rayon pool, f32 tile included.
///
/// A thread otherwise allocates on its first gemm task, and work stealing decides which
/// threads run tasks, so without this a thread could first get one (and allocate) several
/// steps into training. Call it once at startup, from the thread that runs the steps.
pub fn warm_up() {
    fn allocate() {
        WORKSPACE.with(|workspace| {
            let mut workspace = workspace
                .try_borrow_mut()
                .expect("invariant: warm_up does not run inside a gemm task");
            aligned(&mut workspace.apack, MC * KC);
            aligned(&mut workspace.bpack, KC * NT_MAX);
            aligned(&mut workspace.ctile, CTILE_MAX);
        });
    }
    allocate();
    rayon::broadcast(|_| allocate());
}

/// `len` f32 of `buf` starting on a 64-byte boundary, allocating `buf` (once) if it is empty.
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + ALIGN_SLACK {
        *buf = vec![0.0; len + ALIGN_SLACK];
    }
    let offset = buf.as_ptr().align_offset(64);
    let offset = if offset < ALIGN_SLACK { offset } else { 0 };
    &mut buf[offset..offset + len]
}

impl<A: Elem, B: Elem, C: Elem> Job<'_, A, B, C> {
    /// Computes one task tile through all of k.
    ///
    /// Safety: `self.out` must address the whole output with non-overlapping rows, and no other
    /// thread may touch the elements of `tile` during the call.
    unsafe fn run_tile(&self, workspace: &mut Workspace, tile: Tile) {
        let Job {
            arch,
            out,
            a,
            b,
            accumulate,
            out_is_f32,
        } = *self;
        let k = a.cols;
        let apack = aligned(&mut workspace.apack, MC * KC);
        let bpack = aligned(&mut workspace.bpack, KC * NT_MAX);
        // SAFETY: the tile's first element is inside the output (caller's contract).
        let tile_origin = unsafe { out.ptr.add(tile.row * out.row_stride + tile.col) };
        let (dst, dst_stride) = if out_is_f32 {
            // f32 output: sum straight into C (C is f32, so the cast changes nothing).
            (tile_origin.cast::<f32>(), out.row_stride)
        } else {
            let ctile = aligned(&mut workspace.ctile, CTILE_MAX);
            if accumulate {
                for (r, dst_row) in ctile
                    .chunks_exact_mut(tile.cols)
                    .take(tile.rows)
                    .enumerate()
                {
                    // SAFETY: row `r` of the tile is inside the output and ours alone (contract).
                    let row = unsafe { out_row(tile_origin, out.row_stride, r, tile.cols) };
                    for (d, s) in dst_row.iter_mut().zip(row.iter()) {
                        *d = load(*s);
                    }
                }
            }
            (ctile.as_mut_ptr(), tile.cols)
        };
        let mut overwrite = !accumulate;
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pack_b(bpack, b, (p0, kc), (tile.col, tile.cols), arch.simd_pack);
            for i0 in (0..tile.rows).step_by(MC) {
                let mc = MC.min(tile.rows - i0);
                pack_a(apack, a, (tile.row + i0, mc), (p0, kc), arch.simd_pack);
                // SAFETY: rows i0..i0+mc of the destination tile are ours (contract, or our own
                // ctile, which holds tile.rows * tile.cols <= CTILE_MAX elements by the tiling);
                // the packs hold the slivers `macro_kernel` reads.
                unsafe {
                    macro_kernel(
                        arch.kernel,
                        apack,
                        bpack,
                        dst.add(i0 * dst_stride),
                        dst_stride,
                        (mc, tile.cols, kc),
                        overwrite,
                    );
                }
            }
            overwrite = false;
        }
        if !out_is_f32 {
            let ctile = aligned(&mut workspace.ctile, CTILE_MAX);
            for (r, src_row) in ctile.chunks_exact(tile.cols).take(tile.rows).enumerate() {
                // SAFETY: row `r` of the tile is inside the output and ours alone (contract).
                let row = unsafe { out_row(tile_origin, out.row_stride, r, tile.cols) };
                store(row, src_row);
            }
        }
    }
}

/// Rounds a row of f32 into `dst`, the same values as `Elem::from_f32`. f16 goes through
/// `half`'s slice conversion, which checks for F16C once per call rather than per element.
fn store<C: Elem>(dst: &mut [C], src: &[f32]) {
    if TypeId::of::<C>() == TypeId::of::<f16>() {
        let dst: &mut [f16] = bytemuck::cast_slice_mut(dst);
        dst.convert_from_f32_slice(src);
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = C::from_f32(s);
        }
    }
}

/// Row `r` of a tile, `cols` elements from `origin + r * row_stride`.
///
/// Safety: those elements lie inside the output and no one else accesses them meanwhile.
unsafe fn out_row<'t, C>(origin: *mut C, row_stride: usize, r: usize, cols: usize) -> &'t mut [C] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts_mut(origin.add(r * row_stride), cols) }
}

/// Runs the microkernel over an `mc` x `nc` block: B slivers outermost so each stays in L1
/// while the A block streams from L2. Edge tiles go through a stack tile so the kernel always
/// writes a full `MR` x `NR` block; the per-element arithmetic is the same either way.
///
/// Safety: `dst` addresses `mc` rows of `nc` f32, `dst_stride` apart, ours alone; `apack` and
/// `bpack` hold the packs of depth `kc` that `pack_a` and `pack_b` wrote for this block.
unsafe fn macro_kernel(
    kernel: KernelFn,
    apack: &[f32],
    bpack: &[f32],
    dst: *mut f32,
    dst_stride: usize,
    (mc, nc, kc): (usize, usize, usize),
    overwrite: bool,
) {
    let a_slivers = mc.div_ceil(MR);
    let b_slivers = nc.div_ceil(NR);
    assert!(
        apack.len() >= a_slivers * kc * MR && bpack.len() >= b_slivers * kc * NR,
        "invariant: packs hold every sliver of the block"
    );
    for js in 0..b_slivers {
        let (j0, nr) = (js * NR, NR.min(nc - js * NR));
        let b_sliver = bpack[js * kc * NR..].as_ptr();
        for is in 0..a_slivers {
            let (i0, mr) = (is * MR, MR.min(mc - is * MR));
            let a_sliver = apack[is * kc * MR..].as_ptr();
            // SAFETY: (i0, j0) is inside the block, so inside the destination (contract).
            let c = unsafe { dst.add(i0 * dst_stride + j0) };
            if mr == MR && nr == NR {
                // SAFETY: the slivers hold kc * MR and kc * NR f32 (asserted above); the full
                // MR x NR tile at `c` is inside the block.
                unsafe { kernel(kc, a_sliver, b_sliver, c, dst_stride, overwrite) };
            } else {
                let mut edge = [0.0f32; MR * NR];
                // SAFETY: as above; `edge` is a full MR x NR tile with row stride NR.
                unsafe { kernel(kc, a_sliver, b_sliver, edge.as_mut_ptr(), NR, true) };
                for (r, edge_row) in edge.chunks_exact(NR).take(mr).enumerate() {
                    // SAFETY: row r < mr, columns < nr of this tile are inside the block.
                    let row = unsafe { out_row(c, dst_stride, r, nr) };
                    for (d, &s) in row.iter_mut().zip(edge_row) {
                        *d = if overwrite { s } else { *d + s };
                    }
                }
            }
        }
    }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of `a` into `MR`-row slivers: sliver `s`
/// holds, for each p, the `MR` values `a(i0 + s * MR + r, p0 + p)`, contiguous, zero past `mc`.
/// Each layout is read along its contiguous direction.
///
/// `simd` allows `arch::transpose_rows` for f32 row-major A (see [`Arch::simd_pack`]).
fn pack_a<A: Elem>(
    dst: &mut [f32],
    a: Mat<'_, A>,
    (i0, mc): (usize, usize),
    (p0, kc): (usize, usize),
    simd: bool,
) {
    let (dst, _) = dst.as_chunks_mut::<MR>();
    let dst = &mut dst[..mc.div_ceil(MR) * kc];
    if a.row_stride == 1 && a.col_stride != 1 {
        // Columns contiguous (transposed A): one pass along each column of the block.
        for p in 0..kc {
            let start = (p0 + p) * a.col_stride + i0;
            if p + PREFETCH_AHEAD < kc {
                prefetch_span(&a.data[start + PREFETCH_AHEAD * a.col_stride..][..mc]);
            }
            let (full, tail) = a.data[start..start + mc].as_chunks::<MR>();
            for (s, src) in full.iter().enumerate() {
                convert(&mut dst[s * kc + p], src);
            }
            if !tail.is_empty() {
                convert_padded(&mut dst[full.len() * kc + p], tail);
            }
        }
    } else {
        for (s, sliver) in dst.chunks_exact_mut(kc).enumerate() {
            let r0 = i0 + s * MR;
            let mr = MR.min(i0 + mc - r0);
            if a.col_stride == 1 && mr == MR {
                // Rows contiguous (row-major A): read the sliver's rows side by side, while
                // the next sliver's rows come in.
                for r in MR..(2 * MR).min(i0 + mc - r0) {
                    let start = (r0 + r) * a.row_stride + p0;
                    prefetch_span(&a.data[start..start + kc]);
                }
                let rows: [&[A]; MR] = std::array::from_fn(|r| {
                    let start = (r0 + r) * a.row_stride + p0;
                    &a.data[start..start + kc]
                });
                if simd && TypeId::of::<A>() == TypeId::of::<f32>() {
                    // A is f32, so the casts change nothing.
                    let rows = rows.map(bytemuck::cast_slice::<A, f32>);
                    // SAFETY: `simd` comes from `Arch::simd_pack`, set only where the CPU runs
                    // these transposes.
                    unsafe { arch::transpose_rows(sliver, &rows) };
                } else {
                    for (p, d) in sliver.iter_mut().enumerate() {
                        for (d, row) in d.iter_mut().zip(&rows) {
                            *d = load(row[p]);
                        }
                    }
                }
            } else {
                for (p, d) in sliver.iter_mut().enumerate() {
                    for (r, d) in d.iter_mut().enumerate() {
                        *d = if r < mr {
                            load(a.data[(r0 + r) * a.row_stride + (p0 + p) * a.col_stride])
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Packs rows `p0..p0 + kc`, columns `j0..j0 + nc` of `b` into `NR`-column slivers: sliver `s`
/// holds, for each p, the `NR` values `b(p0 + p, j0 + s * NR + j)`, contiguous, zero past `nc`.
/// Each layout is read along its contiguous direction.
///
/// `simd` allows `arch::transpose_columns` for f32 transposed B (see [`Arch::simd_pack`]).
fn pack_b<B: Elem>(
    dst: &mut [f32],
    b: Mat<'_, B>,
    (p0, kc): (usize, usize),
    (j0, nc): (usize, usize),
    simd: bool,
) {
    let (dst, _) = dst.as_chunks_mut::<NR>();
    let dst = &mut dst[..nc.div_ceil(NR) * kc];
    if b.col_stride == 1 {
        // Rows contiguous (row-major B): one pass along each row of the block.
        for p in 0..kc {
            let start = (p0 + p) * b.row_stride + j0;
            let (full, tail) = b.data[start..start + nc].as_chunks::<NR>();
            for (s, src) in full.iter().enumerate() {
                convert(&mut dst[s * kc + p], src);
            }
            if !tail.is_empty() {
                convert_padded(&mut dst[full.len() * kc + p], tail);
            }
        }
    } else {
        for (s, sliver) in dst.chunks_exact_mut(kc).enumerate() {
            let c0 = j0 + s * NR;
            let nr = NR.min(j0 + nc - c0);
            if b.row_stride == 1 {
                // Columns contiguous (transposed B, e.g. an (out, in) weight): read each
                // column of the sliver along k, while the next sliver's columns come in.
                for j in NR..(2 * NR).min(j0 + nc - c0) {
                    let start = (c0 + j) * b.col_stride + p0;
                    prefetch_span(&b.data[start..start + kc]);
                }
                if simd && nr == NR && TypeId::of::<B>() == TypeId::of::<f32>() {
                    let columns: [&[f32]; NR] = std::array::from_fn(|j| {
                        let start = (c0 + j) * b.col_stride + p0;
                        // B is f32, so the cast changes nothing.
                        bytemuck::cast_slice::<B, f32>(&b.data[start..start + kc])
                    });
                    // SAFETY: `simd` comes from `Arch::simd_pack`, set only where the CPU runs
                    // these transposes.
                    unsafe { arch::transpose_columns(sliver, &columns) };
                } else {
                    for j in 0..NR {
                        if j < nr {
                            let start = (c0 + j) * b.col_stride + p0;
                            for (d, &x) in sliver.iter_mut().zip(&b.data[start..start + kc]) {
                                d[j] = load(x);
                            }
                        } else {
                            sliver.iter_mut().for_each(|d| d[j] = 0.0);
                        }
                    }
                }
            } else {
                for (p, d) in sliver.iter_mut().enumerate() {
                    for (j, d) in d.iter_mut().enumerate() {
                        *d = if j < nr {
                            load(b.data[(p0 + p) * b.row_stride + (c0 + j) * b.col_stride])
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Rows ahead that packing prefetches when it reads short strided segments.
const PREFETCH_AHEAD: usize = 4;

/// Asks for every cache line of `span` ahead of use: packing reads short segments at a large
/// stride, which the hardware prefetchers follow poorly.
#[inline(always)]
fn prefetch_span<E>(span: &[E]) {
    let bytes = size_of_val(span);
    let base = span.as_ptr().cast::<u8>();
    for offset in (0..bytes).step_by(64) {
        arch::prefetch(base.wrapping_add(offset));
    }
    if bytes > 0 {
        arch::prefetch(base.wrapping_add(bytes - 1));
    }
}

/// Loads an element as f32, the same value as `Elem::to_f32`. f16 goes through
/// [`f16_bits_to_f32`]: `half`'s conversion checks for F16C on every call and is never inlined,
/// which made f16 packing a third of the run time.
#[inline(always)]
fn load<E: Elem>(x: E) -> f32 {
    if TypeId::of::<E>() == TypeId::of::<f16>() {
        f16_bits_to_f32(bytemuck::cast(x))
    } else {
        x.to_f32()
    }
}

/// IEEE binary16 bits to f32, exactly, without branches so that LLVM vectorises it: moving the
/// exponent and mantissa up and scaling by 2^112 rebiases normals and normalises subnormals;
/// anything at or above 2^16 after scaling was an infinity or NaN and gets the all-ones
/// exponent. (Assumes subnormal f32 are not flushed to zero, which Rust never turns on.)
#[inline(always)]
fn f16_bits_to_f32(bits: u16) -> f32 {
    let bits = u32::from(bits);
    let scaled = f32::from_bits((bits & 0x7fff) << 13) * f32::from_bits((127 + 112) << 23);
    let magnitude = if scaled >= 65536.0 {
        scaled.to_bits() | (0xff << 23)
    } else {
        scaled.to_bits()
    };
    f32::from_bits(magnitude | ((bits & 0x8000) << 16))
}

/// Converts a full group of elements to f32.
#[inline(always)]
fn convert<E: Elem, const N: usize>(dst: &mut [f32; N], src: &[E; N]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = load(s);
    }
}

/// Converts a short group of elements to f32, zero-filling the rest of `dst`.
fn convert_padded<E: Elem, const N: usize>(dst: &mut [f32; N], src: &[E]) {
    dst.fill(0.0);
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = load(s);
    }
}

/// The portable microkernel: plain loops over fixed-size arrays that LLVM vectorises for the
/// baseline target (SSE2, NEON). Multiply and add are separate roundings here.
///
/// Safety: see [`KernelFn`].
unsafe fn kernel_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
) {
    // SAFETY: the caller guarantees kc * MR and kc * NR readable f32.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, kc * MR),
            std::slice::from_raw_parts(b, kc * NR),
        )
    };
    let mut acc = [[0.0f32; NR]; MR];
    for (a_col, b_row) in a.as_chunks::<MR>().0.iter().zip(b.as_chunks::<NR>().0) {
        for (acc_row, &a_val) in acc.iter_mut().zip(a_col) {
            for (acc_val, &b_val) in acc_row.iter_mut().zip(b_row) {
                *acc_val += a_val * b_val;
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees MR rows of NR writable f32 at `c`, `rs_c` apart.
        let row = unsafe { out_row(c, rs_c, r, NR) };
        for (d, &s) in row.iter_mut().zip(acc_row) {
            *d = if overwrite { s } else { *d + s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "x86_64.rs"]
mod arch;

#[cfg(not(target_arch = "x86_64"))]
#[path = "portable.rs"]
mod arch;

#[cfg(test)]
mod tests;
