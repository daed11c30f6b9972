//! Microkernel selection elsewhere (aarch64 included): the portable kernel, which LLVM
//! vectorises with NEON.

use super::{Arch, MR, NR};

/// No prefetch hint off x86_64: stable Rust has no portable one.
#[inline(always)]
pub(super) fn prefetch(_ptr: *const u8) {}

pub(super) fn best() -> Arch {
    Arch::PORTABLE
}

/// Never called: `Arch::simd_pack` is false here.
///
/// Safety: none needed; `unsafe` only to match the x86_64 signature.
pub(super) unsafe fn transpose_rows(_dst: &mut [[f32; MR]], _rows: &[&[f32]; MR]) {
    unreachable!("invariant: no SIMD packing off x86_64");
}

/// Never called: `Arch::simd_pack` is false here.
///
/// Safety: none needed; `unsafe` only to match the x86_64 signature.
pub(super) unsafe fn transpose_columns(_dst: &mut [[f32; NR]], _columns: &[&[f32]; NR]) {
    unreachable!("invariant: no SIMD packing off x86_64");
}
