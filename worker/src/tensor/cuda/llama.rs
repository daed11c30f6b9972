//! Launches of Llama's kernels besides attention (`kernels/llama.cu`): RMSNorm, rotary
//! position embeddings and SwiGLU. The `Backend` methods of [`CudaBackend`] call these; each
//! checks its handles as the CPU backend does ([`crate::tensor::check`]), then launches.

use super::{Arg, CudaBackend, Launch, float, int, long};
use crate::error::Result;
use crate::tensor::{Dims, Tensor};

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_fwd_on_device(
        &mut self,
        out: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rmsnorm_fwd";
        self.checks()
            .rmsnorm_fwd(out, rstd, inp, weight, rows, c, eps)?;
        self.on_device(op, &[out, rstd, inp, weight])?;
        float(op, out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(rstd)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(weight)),
            int(rows),
            int(c),
            Arg::F32(eps),
        ];
        self.launch(op, out.dtype, Launch::rows(rows, 256), &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_bwd_on_device(
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
        let op = "rmsnorm_bwd";
        self.checks()
            .rmsnorm_bwd(dinp, dweight, dout, inp, weight, rstd, rows, c)?;
        self.on_device(op, &[dinp, dweight, dout, inp, weight, rstd])?;
        float(op, dout.dtype)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(self.ptr(dinp)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(weight)),
            Arg::Ptr(self.ptr(rstd)),
            int(rows),
            int(c),
        ];
        let dtype = dout.dtype;
        self.launch("rmsnorm_bwd_dinp", dtype, Launch::rows(rows, 256), &args)?;
        let args = [
            Arg::Ptr(self.ptr(dweight)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(inp)),
            Arg::Ptr(self.ptr(rstd)),
            int(rows),
            int(c),
        ];
        self.launch("rmsnorm_bwd_weight", dtype, Launch::columns(c), &args)
    }

    /// `rope_fwd` (`rotated` is `qkv`) and `rope_bwd` (`dqkv`): the kernel of the same name.
    pub(super) fn rope_on_device(
        &mut self,
        op: &'static str,
        rotated: (&'static str, Tensor),
        table: Tensor,
        dims: Dims,
    ) -> Result<()> {
        self.checks().rope(op, rotated, table, dims)?;
        let x = rotated.1;
        self.on_device(op, &[x, table])?;
        float(op, x.dtype)?;
        let rows = dims.tokens();
        let pairs = rows * (dims.nh + dims.nkv) * (dims.hs / 2);
        let args = [
            Arg::Ptr(self.ptr(x)),
            Arg::Ptr(self.ptr(table)),
            int(rows),
            int(dims.t),
            int(dims.nh),
            int(dims.nkv),
            int(dims.hs),
        ];
        self.elementwise(op, x.dtype, pairs, &args)
    }

    pub(super) fn swiglu_fwd_on_device(
        &mut self,
        out: Tensor,
        inp: Tensor,
        f: usize,
    ) -> Result<()> {
        let op = "swiglu_fwd";
        self.checks().swiglu_fwd(out, inp, f)?;
        self.on_device(op, &[out, inp])?;
        float(op, out.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(out)),
            Arg::Ptr(self.ptr(inp)),
            long(out.len),
            int(f),
        ];
        self.elementwise(op, out.dtype, out.len, &args)
    }

    pub(super) fn swiglu_bwd_on_device(
        &mut self,
        dinp: Tensor,
        dout: Tensor,
        inp: Tensor,
        f: usize,
    ) -> Result<()> {
        let op = "swiglu_bwd";
        self.checks().swiglu_bwd(dinp, dout, inp, f)?;
        self.on_device(op, &[dinp, dout, inp])?;
        float(op, dout.dtype)?;
        let args = [
            Arg::Ptr(self.ptr(dinp)),
            Arg::Ptr(self.ptr(dout)),
            Arg::Ptr(self.ptr(inp)),
            long(dout.len),
            int(f),
        ];
        self.elementwise(op, dout.dtype, dout.len, &args)
    }
}
