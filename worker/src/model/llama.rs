//! Llama's transformer layer: RMSNorm, fused q|k|v, rotary embeddings on q and k, causal
//! grouped-query attention, the output projection, RMSNorm, a SwiGLU MLP (fused gate|up, then
//! down); no biases (a `qkv_b` row in the table, as Qwen2 has, is added when present).
//!
//! Recompute: under `selective` the norm outputs and the SwiGLU product are rebuilt from what
//! was kept (element-wise work only); under `full` the whole layer but its last matmul is run
//! again from the layer's input. Rotary embeddings rotate q and k in place in `qkv`, so the
//! kept `qkv` is the rotated one and backward rotates the gradients back before the q|k|v
//! matmul's backward.

use tessera_plan::config::Recompute;

use super::{Build, Handles, Layers, Regions, handles};
use crate::error::Result;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;

handles!(
    /// One layer's parameters (or gradients) at this rank's widths: `C` hidden, `Q' = H hs/t`,
    /// `K' = KV hs/t`, `F' = F/t`.
    Params {
        /// `(C)`
        attn_norm_w,
        /// `(Q' + 2K', C)`: this rank's rows of each of q, k and v.
        qkv_w,
        /// `(C, Q')`
        o_w,
        /// `(C)`
        mlp_norm_w,
        /// `(2F', C)`: this rank's rows of gate, then of up.
        gate_up_w,
        /// `(C, F')`
        down_w,
    }
    optional {
        /// `(Q' + 2K')`
        qkv_b,
    }
);

handles!(
    /// What one layer's forward makes for one microbatch (the table in `tessera_plan::model`'s
    /// `llama.rs` says which are kept in each recompute mode).
    Acts {
        resid,
        attn_norm,
        attn_rstd,
        qkv,
        atty,
        att_lse,
        resid2,
        mlp_norm,
        mlp_rstd,
        gate_up,
        swiglu,
    }
);

handles!(
    /// One layer's backward buffers.
    Scratch {
        dqkv,
        datty,
        dswiglu,
        dgate_up,
        att_delta,
    }
);

/// Llama's layers on one rank.
pub struct Llama {
    handles: Handles<Params, Acts, Scratch>,
    /// `rope.table`: cos and sin of each position's rotary angles.
    rope: Tensor,
}

impl Llama {
    pub fn new(build: &Build) -> Result<Llama> {
        Ok(Llama {
            handles: Handles::new(build)?,
            rope: build.layout.region("rope.table")?.single(),
        })
    }
}

impl<B: Backend> Layers<B> for Llama {
    fn point_params(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.handles.point_params(l, unit, buffer);
    }

    fn point_grads(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.handles.point_grads(l, unit, buffer);
    }

    fn input(&self, slot: usize, i: usize) -> Tensor {
        self.handles.acts(slot, i).resid
    }

    fn forward(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
        out: Option<Tensor>,
    ) -> Result<()> {
        let h = &self.handles;
        let (p, a, s) = (&h.params[l], h.acts(slot, i), &h.shared);
        let (n, c, q, f, eps) = (s.tokens_held, s.dims.c, s.q_width, s.ffn, s.norm_eps);
        let qkv = q + 2 * s.kv_width;
        let [partial, gathered] = s.btc;
        backend.rmsnorm_fwd(a.attn_norm, a.attn_rstd, a.resid, p.attn_norm_w, n, c, eps)?;
        let x = tp.gather(backend, a.attn_norm, gathered)?;
        backend.matmul_fwd(a.qkv, x, p.qkv_w, p.qkv_b, s.linear(c, qkv))?;
        backend.rope_fwd(a.qkv, self.rope, s.dims)?;
        backend.attention_fwd(a.atty, a.att_lse, a.qkv, s.dims)?;
        backend.matmul_fwd(partial, a.atty, p.o_w, None, s.linear(q, c))?;
        let proj = tp.reduce(backend, partial)?;
        backend.residual_fwd(a.resid2, a.resid, proj)?;
        backend.rmsnorm_fwd(a.mlp_norm, a.mlp_rstd, a.resid2, p.mlp_norm_w, n, c, eps)?;
        let x = tp.gather(backend, a.mlp_norm, gathered)?;
        backend.matmul_fwd(a.gate_up, x, p.gate_up_w, None, s.linear(c, 2 * f))?;
        backend.swiglu_fwd(a.swiglu, a.gate_up, f)?;
        if let Some(out) = out {
            backend.matmul_fwd(partial, a.swiglu, p.down_w, None, s.linear(f, c))?;
            let proj = tp.reduce(backend, partial)?;
            backend.residual_fwd(out, a.resid2, proj)?;
        }
        Ok(())
    }

    fn recompute(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
    ) -> Result<()> {
        let h = &self.handles;
        let (p, a, s) = (&h.params[l], h.acts(slot, i), &h.shared);
        let (n, c, eps) = (s.tokens_held, s.dims.c, s.norm_eps);
        match s.recompute {
            Recompute::None => Ok(()),
            Recompute::Selective => {
                // The rstds were kept; RMSNorm rewrites them with the same values.
                backend.rmsnorm_fwd(a.attn_norm, a.attn_rstd, a.resid, p.attn_norm_w, n, c, eps)?;
                backend.rmsnorm_fwd(a.mlp_norm, a.mlp_rstd, a.resid2, p.mlp_norm_w, n, c, eps)?;
                backend.swiglu_fwd(a.swiglu, a.gate_up, s.ffn)
            }
            Recompute::Full => self.forward(backend, tp, slot, l, i, None),
        }
    }

    fn decode(&self, backend: &mut B, l: usize, pos: usize, out: Tensor) -> Result<()> {
        let h = &self.handles;
        let (p, a, s) = (&h.params[l], h.acts(0, l), &h.shared);
        let (c, q, f, eps) = (s.dims.c, s.q_width, s.ffn, s.norm_eps);
        let qkv = q + 2 * s.kv_width;
        let row = |t: Tensor, width: usize| s.row(t, width, pos);
        let stat = |t: Tensor| t.slice(pos, 1);
        let partial = s.btc[0].slice(0, c);
        let (resid, resid2) = (row(a.resid, c), row(a.resid2, c));
        let norm = row(a.attn_norm, c);
        backend.rmsnorm_fwd(norm, stat(a.attn_rstd), resid, p.attn_norm_w, 1, c, eps)?;
        let new = row(a.qkv, qkv);
        backend.matmul_fwd(new, norm, p.qkv_w, p.qkv_b, s.linear_one(c, qkv))?;
        // Row 0 of the table's slice is position `pos`'s angles.
        let hs = s.dims.hs;
        backend.rope_fwd(new, self.rope.slice(pos * hs, hs), s.one())?;
        backend.attention_decode(row(a.atty, q), a.qkv, pos, s.dims)?;
        backend.matmul_fwd(partial, row(a.atty, q), p.o_w, None, s.linear_one(q, c))?;
        backend.residual_fwd(resid2, resid, partial)?;
        let norm = row(a.mlp_norm, c);
        backend.rmsnorm_fwd(norm, stat(a.mlp_rstd), resid2, p.mlp_norm_w, 1, c, eps)?;
        let (gate_up, act) = (row(a.gate_up, 2 * f), row(a.swiglu, f));
        backend.matmul_fwd(gate_up, norm, p.gate_up_w, None, s.linear_one(c, 2 * f))?;
        backend.swiglu_fwd(act, gate_up, f)?;
        backend.matmul_fwd(partial, act, p.down_w, None, s.linear_one(f, c))?;
        backend.residual_fwd(row(out, c), resid2, partial)
    }

    fn backward(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
        dresid: Tensor,
    ) -> Result<()> {
        let h = &self.handles;
        let (p, g, a, s) = (&h.params[l], &h.grads[l], h.acts(slot, i), &h.shared);
        let d = &h.scratch;
        let (n, c, q, f) = (s.tokens_held, s.dims.c, s.q_width, s.ffn);
        let qkv = q + 2 * s.kv_width;
        let [partial, gathered] = s.btc;
        // MLP: out = resid2 + down(swiglu(gate_up(mlp_norm(resid2)))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(d.dswiglu),
            g.down_w,
            None,
            dout,
            a.swiglu,
            p.down_w,
            s.linear(f, c),
        )?;
        backend.swiglu_bwd(d.dgate_up, d.dswiglu, a.gate_up, f)?;
        let x = tp.gather(backend, a.mlp_norm, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.gate_up_w,
            None,
            d.dgate_up,
            x,
            p.gate_up_w,
            s.linear(c, 2 * f),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.rmsnorm_bwd(
            dresid,
            g.mlp_norm_w,
            dln,
            a.resid2,
            p.mlp_norm_w,
            a.mlp_rstd,
            n,
            c,
        )?;
        // Attention: resid2 = resid + o(attention(rope(qkv(attn_norm(resid))))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(d.datty),
            g.o_w,
            None,
            dout,
            a.atty,
            p.o_w,
            s.linear(q, c),
        )?;
        backend.attention_bwd(
            d.dqkv,
            d.att_delta,
            d.datty,
            a.qkv,
            a.atty,
            a.att_lse,
            s.dims,
        )?;
        backend.rope_bwd(d.dqkv, self.rope, s.dims)?;
        let x = tp.gather(backend, a.attn_norm, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.qkv_w,
            g.qkv_b,
            d.dqkv,
            x,
            p.qkv_w,
            s.linear(c, qkv),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.rmsnorm_bwd(
            dresid,
            g.attn_norm_w,
            dln,
            a.resid,
            p.attn_norm_w,
            a.attn_rstd,
            n,
            c,
        )
    }
}
