//! The CPU backend: the arenas are host memory, the kernels are `ops` run on rayon threads,
//! matmuls go through our packed `gemm`.
//!
//! A method resolves its [`Tensor`] handles to slices of the arena after checking each one's
//! dtype and length, and that no output overlaps another argument; that check is what makes
//! handing out several slices of one allocation at once sound.

pub mod attention;
pub mod gemm;
pub mod llama;
pub mod ops;

use std::sync::Arc;

use half::{bf16, f16};
use tessera_plan::memory::{Dtype, Place};

use crate::comm::{CommBuf, HostMemory, Memory, Owner};
use crate::error::{Error, Result};
use crate::tensor::check::{self, Checks};
use crate::tensor::{AdamW, Backend, Dims, Elem, Linear, Tensor};

/// The arenas of one CPU rank.
pub struct CpuBackend {
    device: Arena,
    host: Arena,
}

/// One zero-initialised allocation, 8-byte aligned (regions start on 256-byte offsets, so every
/// element is aligned for its type), or memory somebody else allocated (see
/// [`CpuBackend::over`]).
struct Arena {
    base: *mut u8,
    bytes: usize,
    /// The memory's owner, shared with every collective in flight on it: the memory outlives
    /// the backend until the last of them is done (see [`Owner`]).
    owner: Owner,
}

impl Arena {
    fn new(place: &'static str, bytes: usize) -> Result<Arena> {
        let memory = HostMemory::new(bytes).map_err(|e| Error::Allocation {
            place,
            bytes: bytes as u64,
            reason: e.to_string(),
        })?;
        Ok(Arena {
            base: memory.ptr(),
            bytes,
            owner: Owner::new(Arc::new(memory)),
        })
    }
}

// SAFETY: an arena is either owned or lent exclusively for the backend's lifetime (`over`);
// every access goes through the backend's `&self`/`&mut self` methods.
unsafe impl Send for Arena {}

impl CpuBackend {
    /// Allocates the device and host arenas (the host one holds offloaded optimizer states)
    /// and each kernel thread's GEMM packing buffers, so that the step loop allocates nothing.
    /// Call it from inside the rayon pool that will run the steps.
    pub fn new(device_bytes: usize, host_bytes: usize) -> Result<CpuBackend> {
        gemm::warm_up();
        Ok(CpuBackend {
            device: Arena::new("device", device_bytes)?,
            host: Arena::new("host", host_bytes)?,
        })
    }

    /// A backend whose device arena is `bytes` bytes at `base`, which `owner` owns, and with
    /// no host arena: a GPU backend runs the ops on its host arena (pinned memory) with it,
    /// handing over handles with `place` [`Place::Device`].
    ///
    /// # Safety
    /// `base` is valid for reads and writes of `bytes` bytes as long as `owner` lives,
    /// 8-byte aligned, and used by nobody else while the returned backend lives.
    pub unsafe fn over(base: *mut u8, bytes: usize, owner: Owner) -> CpuBackend {
        gemm::warm_up();
        CpuBackend {
            device: Arena { base, bytes, owner },
            host: Arena::new("host", 0).expect("invariant: an empty arena needs no memory"),
        }
    }

    fn arena(&self, place: Place) -> &Arena {
        match place {
            Place::Device => &self.device,
            Place::Host => &self.host,
        }
    }

    fn base(&self, place: Place) -> *mut u8 {
        self.arena(place).base
    }

    fn checks(&self) -> Checks {
        Checks {
            device: self.device.bytes,
            host: self.host.bytes,
        }
    }

    /// Checks a handle against its arena, its expected dtype and length.
    fn check(
        &self,
        op: &'static str,
        name: &'static str,
        t: Tensor,
        dtype: Dtype,
        len: usize,
    ) -> Result<()> {
        self.checks().tensor(op, name, t, dtype, len)
    }

    /// # Safety
    /// `t` was checked by [`Self::check`] and no live `&mut` overlaps it.
    unsafe fn slice<E: bytemuck::Pod>(&self, t: Tensor) -> &[E] {
        // SAFETY: in bounds and aligned (checked); not mutably aliased (caller).
        unsafe { std::slice::from_raw_parts(self.base(t.place).add(t.offset) as *const E, t.len) }
    }

    /// # Safety
    /// `t` was checked by [`Self::check`] and overlaps no other live slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<E: bytemuck::Pod>(&self, t: Tensor) -> &mut [E] {
        // SAFETY: in bounds and aligned (checked); exclusive (caller, via `disjoint`).
        unsafe { std::slice::from_raw_parts_mut(self.base(t.place).add(t.offset) as *mut E, t.len) }
    }
}

/// Runs `$body` with `$E` bound to the storage type of `$dtype`.
macro_rules! with_elem {
    ($op:expr, $dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            Dtype::F32 => {
                type $E = f32;
                $body
            }
            Dtype::Bf16 => {
                type $E = bf16;
                $body
            }
            Dtype::F16 => {
                type $E = f16;
                $body
            }
            other => {
                return Err(Error::Dtype {
                    op: $op,
                    tensor: "first argument",
                    expected: Dtype::F32,
                    got: other,
                })
            }
        }
    };
}

impl Backend for CpuBackend {
    fn arena_bytes(&self, place: Place) -> usize {
        self.arena(place).bytes
    }

    fn comm_buf(&self, t: Tensor) -> CommBuf {
        assert!(
            t.offset + t.bytes() <= self.arena(t.place).bytes,
            "invariant: handles come from this backend's arena layout"
        );
        let arena = self.arena(t.place);
        CommBuf {
            // Both arenas are host memory on the CPU backend.
            addr: arena.base as usize + t.offset,
            len: t.len,
            dtype: t.dtype,
            memory: Memory::Host,
            owner: Some(arena.owner.clone()),
        }
    }

    fn write(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        self.check("write", "dst", dst, dst.dtype, src.len())?;
        with_elem!("write", dst.dtype, E => {
            // SAFETY: checked; `&mut self` excludes every other slice.
            let dst = unsafe { self.slice_mut::<E>(dst) };
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = E::from_f32(s);
            }
        });
        Ok(())
    }

    fn write_i32(&mut self, dst: Tensor, src: &[i32]) -> Result<()> {
        self.write_bytes(dst, bytemuck::cast_slice(src))
    }

    fn read(&self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        self.check("read", "src", src, src.dtype, dst.len())?;
        with_elem!("read", src.dtype, E => {
            // SAFETY: checked; shared borrow of self, no slice is mutable.
            let src = unsafe { self.slice::<E>(src) };
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        });
        Ok(())
    }

    fn write_bytes(&mut self, dst: Tensor, src: &[u8]) -> Result<()> {
        self.checks().bytes("write_bytes", "dst", dst, src.len())?;
        // SAFETY: checked; `&mut self` excludes every other slice.
        let bytes = unsafe {
            self.slice_mut::<u8>(Tensor {
                len: dst.bytes(),
                ..dst
            })
        };
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn read_bytes(&self, src: Tensor, dst: &mut [u8]) -> Result<()> {
        self.checks().bytes("read_bytes", "src", src, dst.len())?;
        // SAFETY: checked; no slice is mutable.
        dst.copy_from_slice(unsafe {
            self.slice::<u8>(Tensor {
                len: src.bytes(),
                ..src
            })
        });
        Ok(())
    }

    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()> {
        self.check("fill", "dst", dst, dst.dtype, dst.len)?;
        if dst.dtype == Dtype::I32 {
            // SAFETY: checked; exclusive through `&mut self`.
            let dst = unsafe {
                self.slice_mut::<u8>(Tensor {
                    len: dst.bytes(),
                    ..dst
                })
            };
            bytemuck::cast_slice_mut::<u8, i32>(dst).fill(value as i32);
            return Ok(());
        }
        with_elem!("fill", dst.dtype, E => {
            // SAFETY: checked; exclusive through `&mut self`.
            unsafe { self.slice_mut::<E>(dst) }.fill(E::from_f32(value));
        });
        Ok(())
    }

    fn copy(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        self.checks().copy(dst, src)?;
        if src.dtype == dst.dtype {
            // The same dtype: the bytes, whatever they hold (checkpoint staging copies every
            // bit, NaN payloads included).
            let (dst, src) = (
                Tensor {
                    len: dst.bytes(),
                    dtype: Dtype::U8,
                    ..dst
                },
                Tensor {
                    len: src.bytes(),
                    dtype: Dtype::U8,
                    ..src
                },
            );
            // SAFETY: both checked and disjoint.
            let (d, s) = unsafe { (self.slice_mut::<u8>(dst), self.slice::<u8>(src)) };
            d.copy_from_slice(s);
            return Ok(());
        }
        with_elem!("copy", src.dtype, S => {
            with_elem!("copy", dst.dtype, D => {
                // SAFETY: both checked and disjoint.
                let (d, s) = unsafe { (self.slice_mut::<D>(dst), self.slice::<S>(src)) };
                for (d, s) in d.iter_mut().zip(s) {
                    *d = D::from_f32(s.to_f32());
                }
            })
        });
        Ok(())
    }

    fn scale(&mut self, dst: Tensor, factor: f32) -> Result<()> {
        self.check("scale", "dst", dst, dst.dtype, dst.len)?;
        with_elem!("scale", dst.dtype, E => {
            // SAFETY: checked; exclusive through `&mut self`.
            for d in unsafe { self.slice_mut::<E>(dst) } {
                *d = E::from_f32(d.to_f32() * factor);
            }
        });
        Ok(())
    }

    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        let (op, dt) = ("add", dst.dtype);
        self.checks().add(dst, src)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            let (d, s) = unsafe { (self.slice_mut::<E>(dst), self.slice::<E>(src)) };
            for (d, s) in d.iter_mut().zip(s) {
                *d = E::from_f32(d.to_f32() + s.to_f32());
            }
        });
        Ok(())
    }

    fn residual_fwd(&mut self, out: Tensor, a: Tensor, b: Tensor) -> Result<()> {
        let (op, dt) = ("residual_fwd", out.dtype);
        self.checks().residual_fwd(out, a, b)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            let (o, a, b) = unsafe { (self.slice_mut::<E>(out), self.slice::<E>(a), self.slice::<E>(b)) };
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = E::from_f32(a.to_f32() + b.to_f32());
            }
        });
        Ok(())
    }

    fn embedding_fwd(
        &mut self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt) = ("embedding_fwd", out.dtype);
        self.checks().embedding_fwd(out, tokens, wte, wpe, dims)?;
        let tokens = self.tokens(op, tokens, dims.v)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::embedding_fwd::<E>(
                    self.slice_mut(out), tokens, self.slice(wte), wpe.map(|w| self.slice(w)), dims,
                )
            }
        });
        Ok(())
    }

    fn embedding_bwd(
        &mut self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt) = ("embedding_bwd", dout.dtype);
        self.checks()
            .embedding_bwd(dwte, dwpe, dout, tokens, dims)?;
        let tokens = self.tokens(op, tokens, dims.v)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::embedding_bwd::<E>(
                    self.slice_mut(dwte), dwpe.map(|w| self.slice_mut(w)), self.slice(dout), tokens, dims,
                )
            }
        });
        Ok(())
    }

    fn layernorm_fwd(
        &mut self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("layernorm_fwd", out.dtype);
        self.checks()
            .layernorm_fwd(out, mean, rstd, inp, weight, bias, rows, c)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::layernorm_fwd::<E>(
                    self.slice_mut(out), self.slice_mut(mean), self.slice_mut(rstd),
                    self.slice(inp), self.slice(weight), self.slice(bias), c,
                )
            }
        });
        Ok(())
    }

    fn layernorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dbias: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("layernorm_bwd", dout.dtype);
        self.checks()
            .layernorm_bwd(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, c)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::layernorm_bwd::<E>(
                    self.slice_mut(dinp), self.slice_mut(dweight), self.slice_mut(dbias),
                    self.slice(dout), self.slice(inp), self.slice(weight),
                    self.slice(mean), self.slice(rstd), c,
                )
            }
        });
        Ok(())
    }

    fn matmul_fwd(
        &mut self,
        out: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        shape: Linear,
    ) -> Result<()> {
        let (op, dt) = ("matmul_fwd", out.dtype);
        self.checks().matmul_fwd(out, inp, weight, bias, shape)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::matmul_fwd::<E>(
                    self.slice_mut(out), self.slice(inp), self.slice(weight),
                    bias.map(|b| self.slice(b)), shape,
                )
            }
        });
        Ok(())
    }

    fn matmul_bwd(
        &mut self,
        dinp: Option<Tensor>,
        dweight: Tensor,
        dbias: Option<Tensor>,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        shape: Linear,
    ) -> Result<()> {
        let (op, dt) = ("matmul_bwd", dout.dtype);
        self.checks()
            .matmul_bwd(dinp, dweight, dbias, dout, inp, weight, shape)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::matmul_bwd::<E>(
                    dinp.map(|t| self.slice_mut(t)), self.slice_mut(dweight),
                    dbias.map(|t| self.slice_mut(t)),
                    self.slice(dout), self.slice(inp), self.slice(weight), shape,
                )
            }
        });
        Ok(())
    }

    fn attention_fwd(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, dims: Dims) -> Result<()> {
        let (op, dt) = ("attention_fwd", out.dtype);
        check::head_size(op, dims, attention::MAX_HEAD_SIZE, "CPU")?;
        self.checks().attention_fwd(out, lse, qkv, dims)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe { attention::attention_fwd::<E>(self.slice_mut(out), self.slice_mut(lse), self.slice(qkv), dims) }
        });
        Ok(())
    }

    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, dims: Dims) -> Result<()> {
        let (op, dt) = ("attention_decode", out.dtype);
        self.checks().attention_decode(out, qkv, pos, dims)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe { attention::attention_decode::<E>(self.slice_mut(out), self.slice(qkv), pos, dims) }
        });
        Ok(())
    }

    fn attention_bwd(
        &mut self,
        dqkv: Tensor,
        delta: Tensor,
        dout: Tensor,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt) = ("attention_bwd", dout.dtype);
        check::head_size(op, dims, attention::MAX_HEAD_SIZE, "CPU")?;
        self.checks()
            .attention_bwd(dqkv, delta, dout, qkv, out, lse, dims)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                attention::attention_bwd::<E>(
                    self.slice_mut(dqkv), self.slice_mut(delta),
                    self.slice(dout), self.slice(qkv), self.slice(out), self.slice(lse), dims,
                )
            }
        });
        Ok(())
    }

    fn rmsnorm_fwd(
        &mut self,
        out: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let (op, dt) = ("rmsnorm_fwd", out.dtype);
        self.checks()
            .rmsnorm_fwd(out, rstd, inp, weight, rows, c, eps)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                llama::rmsnorm_fwd::<E>(
                    self.slice_mut(out), self.slice_mut(rstd), self.slice(inp), self.slice(weight),
                    c, eps,
                )
            }
        });
        Ok(())
    }

    fn rmsnorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("rmsnorm_bwd", dout.dtype);
        self.checks()
            .rmsnorm_bwd(dinp, dweight, dout, inp, weight, rstd, rows, c)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                llama::rmsnorm_bwd::<E>(
                    self.slice_mut(dinp), self.slice_mut(dweight), self.slice(dout),
                    self.slice(inp), self.slice(weight), self.slice(rstd), c,
                )
            }
        });
        Ok(())
    }

    fn rope_fwd(&mut self, qkv: Tensor, table: Tensor, dims: Dims) -> Result<()> {
        let op = "rope_fwd";
        self.checks().rope(op, ("qkv", qkv), table, dims)?;
        with_elem!(op, qkv.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe { llama::rope::<E>(self.slice_mut(qkv), self.slice(table), dims, 1.0) }
        });
        Ok(())
    }

    fn rope_bwd(&mut self, dqkv: Tensor, table: Tensor, dims: Dims) -> Result<()> {
        let op = "rope_bwd";
        self.checks().rope(op, ("dqkv", dqkv), table, dims)?;
        with_elem!(op, dqkv.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe { llama::rope::<E>(self.slice_mut(dqkv), self.slice(table), dims, -1.0) }
        });
        Ok(())
    }

    fn swiglu_fwd(&mut self, out: Tensor, inp: Tensor, f: usize) -> Result<()> {
        let (op, dt) = ("swiglu_fwd", out.dtype);
        self.checks().swiglu_fwd(out, inp, f)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe { llama::swiglu_fwd::<E>(self.slice_mut(out), self.slice(inp), f) }
        });
        Ok(())
    }

    fn swiglu_bwd(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, f: usize) -> Result<()> {
        let (op, dt) = ("swiglu_bwd", dout.dtype);
        self.checks().swiglu_bwd(dinp, dout, inp, f)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                llama::swiglu_bwd::<E>(self.slice_mut(dinp), self.slice(dout), self.slice(inp), f)
            }
        });
        Ok(())
    }

    fn gelu_fwd(&mut self, out: Tensor, inp: Tensor) -> Result<()> {
        let (op, dt) = ("gelu_fwd", out.dtype);
        self.checks().gelu(op, ("out", out), inp)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe { ops::gelu_fwd::<E>(self.slice_mut(out), self.slice(inp)) }
        });
        Ok(())
    }

    fn gelu_bwd(&mut self, dinout: Tensor, inp: Tensor) -> Result<()> {
        let (op, dt) = ("gelu_bwd", dinout.dtype);
        self.checks().gelu(op, ("dinout", dinout), inp)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe { ops::gelu_bwd::<E>(self.slice_mut(dinout), self.slice(inp)) }
        });
        Ok(())
    }

    fn crossentropy_fwd_bwd(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_fwd_bwd";
        self.checks()
            .crossentropy_fwd_bwd(logits, losses, max, sumexp, targets, dims)?;
        let targets = self.tokens(op, targets, dims.v)?;
        with_elem!(op, logits.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::crossentropy_fwd_bwd::<E>(
                    self.slice_mut(logits), self.slice_mut(losses), self.slice_mut(max),
                    self.slice_mut(sumexp), targets, dloss, dims,
                )
            }
        });
        Ok(())
    }

    fn crossentropy_max(&mut self, logits: Tensor, max: Tensor, dims: Dims) -> Result<()> {
        let op = "crossentropy_max";
        self.checks().crossentropy_max(logits, max, dims)?;
        with_elem!(op, logits.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe { ops::crossentropy_max::<E>(self.slice(logits), self.slice_mut(max), dims) }
        });
        Ok(())
    }

    fn crossentropy_sumexp(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_sumexp";
        self.checks()
            .crossentropy_sumexp(logits, losses, max, sumexp, targets, dims)?;
        let targets = self.tokens(op, targets, dims.v)?;
        with_elem!(op, logits.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::crossentropy_sumexp::<E>(
                    self.slice(logits), self.slice_mut(losses), self.slice(max),
                    self.slice_mut(sumexp), targets, dims,
                )
            }
        });
        Ok(())
    }

    fn crossentropy_finish(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_finish";
        self.checks()
            .crossentropy_finish(logits, losses, max, sumexp, targets, dims)?;
        let targets = self.tokens(op, targets, dims.v)?;
        with_elem!(op, logits.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::crossentropy_finish::<E>(
                    self.slice_mut(logits), self.slice_mut(losses), self.slice(max),
                    self.slice(sumexp), targets, dloss, dims,
                )
            }
        });
        Ok(())
    }

    fn sum_squares(&mut self, grads: Tensor, partials: Tensor) -> Result<f64> {
        let op = "sum_squares";
        self.checks().sum_squares(grads, partials)?;
        Ok(with_elem!(op, grads.dtype, E => {
            // SAFETY: checked and disjoint.
            unsafe { ops::sum_squares::<E>(self.slice(grads), self.slice_mut(partials)) }
        }))
    }

    fn adamw(
        &mut self,
        param: Tensor,
        master: Option<Tensor>,
        m: Tensor,
        v: Tensor,
        grad: Option<Tensor>,
        hyper: AdamW,
    ) -> Result<()> {
        let (op, dt) = ("adamw", param.dtype);
        self.checks().adamw(param, master, m, v, grad)?;
        with_elem!(op, dt, E => {
            // SAFETY: checked and disjoint.
            unsafe {
                ops::adamw::<E>(
                    self.slice_mut(param), master.map(|t| self.slice_mut(t)),
                    self.slice_mut(m), self.slice_mut(v), grad.map(|g| self.slice(g)), hyper,
                )
            }
        });
        Ok(())
    }
}

impl CpuBackend {
    /// The token ids of an i32 tensor, checked to be below `limit` (a corrupt id would index
    /// out of the embedding).
    fn tokens(&self, op: &'static str, t: Tensor, limit: usize) -> Result<&[i32]> {
        // SAFETY: checked by the caller; only shared slices of it are live.
        let ids: &[i32] = unsafe { self.slice(t) };
        if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= limit) {
            return Err(Error::Unsupported {
                what: format!("{op}: token id {bad} is outside the vocabulary of {limit}"),
                help: "check that data tokens are below model.vocab".into(),
            });
        }
        Ok(ids)
    }
}
