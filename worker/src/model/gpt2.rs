//! GPT-2's transformer layer: LayerNorm, fused q|k|v with biases, causal attention, the output
//! projection, LayerNorm, a GELU MLP; one backend call per op, in the order of the math.
//!
//! Recompute: under `selective` the LayerNorm outputs and the GELU output are rebuilt from what
//! was kept (element-wise work only); under `full` the whole layer but its last matmul is run
//! again from the layer's input.

use tessera_plan::config::Recompute;

use super::{Build, Handles, Layers, Regions, handles};
use crate::error::Result;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;

handles!(
    /// One layer's parameters (or gradients) at this rank's widths: `C` hidden, `Q' = H hs/t`,
    /// `F' = F/t`.
    Params {
        /// `(C)` each
        ln1_w,
        ln1_b,
        /// `(3Q', C)`: this rank's rows of each of q, k and v.
        qkv_w,
        /// `(3Q')`
        qkv_b,
        /// `(C, Q')`
        attproj_w,
        /// `(C)`
        attproj_b,
        ln2_w,
        ln2_b,
        /// `(F', C)`
        fc_w,
        /// `(F')`
        fc_b,
        /// `(C, F')`
        fcproj_w,
        /// `(C)`
        fcproj_b,
    }
);

handles!(
    /// What one layer's forward makes for one microbatch (the table in `tessera_plan::model`'s
    /// `gpt2.rs` says which are kept in each recompute mode).
    Acts {
        resid,
        ln1,
        ln1_mean,
        ln1_rstd,
        qkv,
        atty,
        att_lse,
        resid2,
        ln2,
        ln2_mean,
        ln2_rstd,
        fch,
        fch_gelu,
    }
);

handles!(
    /// One layer's backward buffers.
    Scratch {
        dqkv,
        datty,
        dfch,
        att_delta,
    }
);

/// GPT-2's layers on one rank.
pub struct Gpt2(Handles<Params, Acts, Scratch>);

impl Gpt2 {
    pub fn new(build: &Build) -> Result<Gpt2> {
        Ok(Gpt2(Handles::new(build)?))
    }
}

impl<B: Backend> Layers<B> for Gpt2 {
    fn point_params(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.0.point_params(l, unit, buffer);
    }

    fn point_grads(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.0.point_grads(l, unit, buffer);
    }

    fn input(&self, slot: usize, i: usize) -> Tensor {
        self.0.acts(slot, i).resid
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
        let h = &self.0;
        let (p, a, s) = (&h.params[l], h.acts(slot, i), &h.shared);
        let (n, c, q, f) = (s.tokens_held, s.dims.c, s.q_width, s.ffn);
        let qkv = q + 2 * s.kv_width;
        let [partial, gathered] = s.btc;
        // Row-parallel biases are added by one rank, so the sum over ranks has them once.
        let adds = tp.adds_replicated();
        let once = |bias: Tensor| adds.then_some(bias);
        backend.layernorm_fwd(
            a.ln1, a.ln1_mean, a.ln1_rstd, a.resid, p.ln1_w, p.ln1_b, n, c,
        )?;
        let x = tp.gather(backend, a.ln1, gathered)?;
        backend.matmul_fwd(a.qkv, x, p.qkv_w, Some(p.qkv_b), s.linear(c, qkv))?;
        backend.attention_fwd(a.atty, a.att_lse, a.qkv, s.dims)?;
        backend.matmul_fwd(
            partial,
            a.atty,
            p.attproj_w,
            once(p.attproj_b),
            s.linear(q, c),
        )?;
        let proj = tp.reduce(backend, partial)?;
        backend.residual_fwd(a.resid2, a.resid, proj)?;
        backend.layernorm_fwd(
            a.ln2, a.ln2_mean, a.ln2_rstd, a.resid2, p.ln2_w, p.ln2_b, n, c,
        )?;
        let x = tp.gather(backend, a.ln2, gathered)?;
        backend.matmul_fwd(a.fch, x, p.fc_w, Some(p.fc_b), s.linear(c, f))?;
        backend.gelu_fwd(a.fch_gelu, a.fch)?;
        if let Some(out) = out {
            backend.matmul_fwd(
                partial,
                a.fch_gelu,
                p.fcproj_w,
                once(p.fcproj_b),
                s.linear(f, c),
            )?;
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
        let h = &self.0;
        let (p, a, s) = (&h.params[l], h.acts(slot, i), &h.shared);
        let (n, c) = (s.tokens_held, s.dims.c);
        match s.recompute {
            Recompute::None => Ok(()),
            Recompute::Selective => {
                // The statistics were kept; LayerNorm rewrites them with the same values.
                backend.layernorm_fwd(
                    a.ln1, a.ln1_mean, a.ln1_rstd, a.resid, p.ln1_w, p.ln1_b, n, c,
                )?;
                backend.layernorm_fwd(
                    a.ln2, a.ln2_mean, a.ln2_rstd, a.resid2, p.ln2_w, p.ln2_b, n, c,
                )?;
                backend.gelu_fwd(a.fch_gelu, a.fch)
            }
            Recompute::Full => self.forward(backend, tp, slot, l, i, None),
        }
    }

    fn decode(&self, backend: &mut B, l: usize, pos: usize, out: Tensor) -> Result<()> {
        let h = &self.0;
        let (p, a, s) = (&h.params[l], h.acts(0, l), &h.shared);
        let (c, q, f) = (s.dims.c, s.q_width, s.ffn);
        let qkv = q + 2 * s.kv_width;
        let row = |t: Tensor, width: usize| s.row(t, width, pos);
        let stat = |t: Tensor| t.slice(pos, 1);
        let partial = s.btc[0].slice(0, c);
        let (resid, resid2) = (row(a.resid, c), row(a.resid2, c));
        backend.layernorm_fwd(
            row(a.ln1, c),
            stat(a.ln1_mean),
            stat(a.ln1_rstd),
            resid,
            p.ln1_w,
            p.ln1_b,
            1,
            c,
        )?;
        let x = row(a.ln1, c);
        backend.matmul_fwd(
            row(a.qkv, qkv),
            x,
            p.qkv_w,
            Some(p.qkv_b),
            s.linear_one(c, qkv),
        )?;
        backend.attention_decode(row(a.atty, q), a.qkv, pos, s.dims)?;
        let proj = s.linear_one(q, c);
        backend.matmul_fwd(
            partial,
            row(a.atty, q),
            p.attproj_w,
            Some(p.attproj_b),
            proj,
        )?;
        backend.residual_fwd(resid2, resid, partial)?;
        backend.layernorm_fwd(
            row(a.ln2, c),
            stat(a.ln2_mean),
            stat(a.ln2_rstd),
            resid2,
            p.ln2_w,
            p.ln2_b,
            1,
            c,
        )?;
        let (fch, gelu) = (row(a.fch, f), row(a.fch_gelu, f));
        backend.matmul_fwd(fch, row(a.ln2, c), p.fc_w, Some(p.fc_b), s.linear_one(c, f))?;
        backend.gelu_fwd(gelu, fch)?;
        let down = s.linear_one(f, c);
        backend.matmul_fwd(partial, gelu, p.fcproj_w, Some(p.fcproj_b), down)?;
        backend.residual_fwd(row(out, c), resid2, partial)
    }

    /// Under tensor parallelism the gradient entering each row-parallel matmul is gathered and
    /// the one leaving each column-parallel matmul reduced (see `parallel::tensor`).
    fn backward(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
        dresid: Tensor,
    ) -> Result<()> {
        let h = &self.0;
        let (p, g, a, s) = (&h.params[l], &h.grads[l], h.acts(slot, i), &h.shared);
        let d = &h.scratch;
        let (n, c, q, f) = (s.tokens_held, s.dims.c, s.q_width, s.ffn);
        let qkv = q + 2 * s.kv_width;
        let [partial, gathered] = s.btc;
        // MLP: out = resid2 + fcproj(gelu(fc(ln2(resid2)))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(d.dfch),
            g.fcproj_w,
            Some(g.fcproj_b),
            dout,
            a.fch_gelu,
            p.fcproj_w,
            s.linear(f, c),
        )?;
        backend.gelu_bwd(d.dfch, a.fch)?;
        let x = tp.gather(backend, a.ln2, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.fc_w,
            Some(g.fc_b),
            d.dfch,
            x,
            p.fc_w,
            s.linear(c, f),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.layernorm_bwd(
            dresid, g.ln2_w, g.ln2_b, dln, a.resid2, p.ln2_w, a.ln2_mean, a.ln2_rstd, n, c,
        )?;
        // Attention: resid2 = resid + attproj(attention(qkv(ln1(resid)))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(d.datty),
            g.attproj_w,
            Some(g.attproj_b),
            dout,
            a.atty,
            p.attproj_w,
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
        let x = tp.gather(backend, a.ln1, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.qkv_w,
            Some(g.qkv_b),
            d.dqkv,
            x,
            p.qkv_w,
            s.linear(c, qkv),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.layernorm_bwd(
            dresid, g.ln1_w, g.ln1_b, dln, a.resid, p.ln1_w, a.ln1_mean, a.ln1_rstd, n, c,
        )
    }
}
