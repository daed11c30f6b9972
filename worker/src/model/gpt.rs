//! GPT-2's forward and backward, one backend call per op, in the order of the math.
//!
//! A microbatch lives in an activation *slot* from its forward to its backward. `forward`
//! embeds the tokens (first stage), runs the stage's layers and, on the last stage, the fused
//! LM head: final LayerNorm, logits chunk by chunk, cross-entropy and its gradient, so that
//! only the gradient of the stage output (`act.dhead`) waits for backward. `backward` runs the
//! layers in reverse with `d`-prefixed names and ends in the embedding's backward.
//!
//! Recompute: under `selective` the LayerNorm outputs and the GELU output are rebuilt from what
//! was kept (element-wise work only); under `full` the whole layer but its last matmul is run
//! again from the layer's input. Forward is the same code in every mode: the handles of
//! tensors the mode does not keep point at the shared `recompute.*` buffers.

use tessera_plan::Config;
use tessera_plan::config::Recompute;
use tessera_plan::memory::StagePlan;
use tessera_plan::model::ModelShape;

use super::{Activations, HeadBuffers, LayerActs, Scratch, Unit, Weights};
use crate::arena::ArenaLayout;
use crate::error::Result;
use crate::tensor::{Backend, Dims, Linear, Tensor};

/// GPT-2 on one pipeline stage of one rank.
pub struct Gpt {
    pub dims: Dims,
    pub recompute: Recompute,
    /// Hidden width `C`, MLP width on this rank `F'`, attention width on this rank `C'`.
    widths: Widths,
    pub params: Weights,
    pub grads: Weights,
    acts: Activations,
    scratch: Scratch,
    /// `act.tokens`, one per slot (first stage).
    tokens: Option<Vec<Tensor>>,
    /// `act.dhead`, one per slot (last stage).
    dhead: Option<Vec<Tensor>>,
    head: Option<HeadBuffers>,
    /// Rows per chunk of logits.
    chunk_rows: usize,
    /// Host copy of one chunk's losses.
    chunk_losses: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
struct Widths {
    c: usize,
    attention: usize,
    ffn: usize,
}

impl Gpt {
    pub fn new(
        layout: &ArenaLayout,
        config: &Config,
        stage: &StagePlan,
        units: &[Unit],
    ) -> Result<Gpt> {
        let tp = config.parallel.tensor;
        let shape = ModelShape::new(&config.model, tp);
        let dims = Dims {
            b: config.training.micro_batch,
            t: config.model.seq_len,
            c: config.model.hidden,
            nh: config.model.heads / tp,
            hs: shape.head_dim(),
            v: config.model.vocab,
            vp: shape.vocab_padded / tp,
        };
        let widths = Widths {
            c: dims.c,
            attention: dims.c / tp,
            ffn: config.model.ffn_hidden / tp,
        };
        let layers_per_chunk = stage.layers[0].len();
        let acts = Activations::new(layout, stage.in_flight.total, layers_per_chunk)?;
        let one = |name: &str| -> Result<Tensor> { Ok(layout.region(name)?.single()) };
        let btc = layout.region("scratch.btc")?;
        let scratch = Scratch {
            btc: [btc.get(0), btc.get(1)],
            stage_out: one("scratch.stage_out")?,
            dresid: one("scratch.dresid")?,
            dqkv: one("scratch.dqkv")?,
            datty: one("scratch.datty")?,
            dfch: one("scratch.dfch")?,
            att_delta: one("scratch.att_delta")?,
            norm_partials: one("optim.norm_partials")?,
        };
        let per_slot = |name: &str| -> Result<Vec<Tensor>> {
            let region = layout.region(name)?;
            Ok((0..region.count()).map(|i| region.get(i)).collect())
        };
        let first = stage.pp_rank == 0;
        let last = stage.pp_rank == config.parallel.pipeline - 1;
        let head = if last {
            Some(HeadBuffers {
                targets: one("data.targets")?,
                lnf: one("head.lnf")?,
                lnf_mean: one("head.lnf_mean")?,
                lnf_rstd: one("head.lnf_rstd")?,
                logits: one("head.logits")?,
                logit_max: one("head.logit_max")?,
                logit_sumexp: one("head.logit_sumexp")?,
                losses: one("head.losses")?,
            })
        } else {
            None
        };
        let chunk_rows = head.map_or(0, |h| h.losses.len);
        Ok(Gpt {
            dims,
            recompute: config.parallel.recompute,
            widths,
            params: Weights::new(units, |u| u.params),
            grads: Weights::new(units, |u| u.grads),
            acts,
            scratch,
            tokens: if first {
                Some(per_slot("act.tokens")?)
            } else {
                None
            },
            dhead: if last {
                Some(per_slot("act.dhead")?)
            } else {
                None
            },
            head,
            chunk_rows,
            chunk_losses: vec![0.0; chunk_rows],
        })
    }

    /// Where the host writes the token ids of the microbatch in `slot` (first stage).
    pub fn tokens(&self, slot: usize) -> Option<Tensor> {
        self.tokens.as_ref().map(|t| t[slot])
    }

    /// Where the host writes the targets of the next microbatch (last stage).
    pub fn targets(&self) -> Option<Tensor> {
        self.head.map(|h| h.targets)
    }

    /// Scratch for the gradient norm's partial sums.
    pub fn norm_partials(&self) -> Tensor {
        self.scratch.norm_partials
    }

    fn tokens_held(&self) -> usize {
        self.dims.tokens()
    }

    fn linear(&self, inp: usize, out: usize) -> Linear {
        Linear {
            rows: self.dims.tokens(),
            inp,
            out,
        }
    }

    /// Forward of the microbatch in `slot`. On the last stage this includes the loss and the
    /// head's backward with `dloss` as the gradient of each token's loss; returns the sum of
    /// the token losses (0 on other stages).
    pub fn forward<B: Backend>(&mut self, backend: &mut B, slot: usize, dloss: f32) -> Result<f64> {
        if let (Some(tokens), Some(wte), Some(wpe)) =
            (&self.tokens, self.params.wte, self.params.wpe)
        {
            let resid = self.acts.layer(slot, 0).resid;
            backend.embedding_fwd(resid, tokens[slot], wte, wpe, self.dims)?;
        }
        let layers = self.params.layers.len();
        for l in 0..layers {
            let out = if l + 1 < layers {
                self.acts.layer(slot, l + 1).resid
            } else {
                self.scratch.stage_out
            };
            self.layer_forward(backend, slot, l, Some(out))?;
        }
        match self.head {
            Some(_) => self.head_forward_backward(backend, slot, dloss),
            None => Ok(0.0),
        }
    }

    /// One layer's forward. With `out = None` it stops before the last matmul: what `full`
    /// recompute needs to rebuild the layer's tensors.
    fn layer_forward<B: Backend>(
        &self,
        backend: &mut B,
        slot: usize,
        l: usize,
        out: Option<Tensor>,
    ) -> Result<()> {
        let (p, a) = (&self.params.layers[l], self.acts.layer(slot, l));
        let (n, w) = (self.tokens_held(), self.widths);
        let proj = self.scratch.btc[0];
        backend.layernorm_fwd(
            a.ln1, a.ln1_mean, a.ln1_rstd, a.resid, p.ln1_w, p.ln1_b, n, w.c,
        )?;
        backend.matmul_fwd(
            a.qkv,
            a.ln1,
            p.qkv_w,
            Some(p.qkv_b),
            self.linear(w.c, 3 * w.attention),
        )?;
        backend.attention_fwd(a.atty, a.att_lse, a.qkv, self.dims)?;
        backend.matmul_fwd(
            proj,
            a.atty,
            p.attproj_w,
            Some(p.attproj_b),
            self.linear(w.attention, w.c),
        )?;
        backend.residual_fwd(a.resid2, a.resid, proj)?;
        backend.layernorm_fwd(
            a.ln2, a.ln2_mean, a.ln2_rstd, a.resid2, p.ln2_w, p.ln2_b, n, w.c,
        )?;
        backend.matmul_fwd(a.fch, a.ln2, p.fc_w, Some(p.fc_b), self.linear(w.c, w.ffn))?;
        backend.gelu_fwd(a.fch_gelu, a.fch)?;
        if let Some(out) = out {
            backend.matmul_fwd(
                proj,
                a.fch_gelu,
                p.fcproj_w,
                Some(p.fcproj_b),
                self.linear(w.ffn, w.c),
            )?;
            backend.residual_fwd(out, a.resid2, proj)?;
        }
        Ok(())
    }

    /// Final LayerNorm, then logits, loss and their gradients chunk by chunk, then the final
    /// LayerNorm's backward into `act.dhead[slot]`.
    fn head_forward_backward<B: Backend>(
        &mut self,
        backend: &mut B,
        slot: usize,
        dloss: f32,
    ) -> Result<f64> {
        let h = self.head.expect("invariant: last stage");
        let (lnf_w, lnf_b) = (
            self.params.lnf_w.expect("invariant: last stage"),
            self.params.lnf_b.expect("invariant: last stage"),
        );
        let wte = self.params.head_wte.expect("invariant: last stage");
        let dwte = self.grads.head_wte.expect("invariant: last stage");
        let (n, c) = (self.tokens_held(), self.widths.c);
        let dlnf = self.scratch.btc[1];
        backend.layernorm_fwd(
            h.lnf,
            h.lnf_mean,
            h.lnf_rstd,
            self.scratch.stage_out,
            lnf_w,
            lnf_b,
            n,
            c,
        )?;
        let mut loss = 0.0f64;
        let vp = self.dims.vp;
        for first in (0..n).step_by(self.chunk_rows) {
            let rows = self.chunk_rows.min(n - first);
            let logits = h.logits.slice(0, rows * vp);
            let lnf = h.lnf.slice(first * c, rows * c);
            let shape = Linear {
                rows,
                inp: c,
                out: vp,
            };
            backend.matmul_fwd(logits, lnf, wte, None, shape)?;
            let losses = h.losses.slice(0, rows);
            backend.crossentropy_fwd_bwd(
                logits,
                losses,
                h.logit_max.slice(0, rows),
                h.logit_sumexp.slice(0, rows),
                h.targets.slice(first, rows),
                dloss,
                self.dims,
            )?;
            backend.read(losses, &mut self.chunk_losses[..rows])?;
            loss += self.chunk_losses[..rows]
                .iter()
                .map(|&l| l as f64)
                .sum::<f64>();
            backend.matmul_bwd(
                Some(dlnf.slice(first * c, rows * c)),
                dwte,
                None,
                logits,
                lnf,
                wte,
                shape,
            )?;
        }
        let dhead = self.dhead.as_ref().expect("invariant: last stage")[slot];
        let (dlnf_w, dlnf_b) = (
            self.grads.lnf_w.expect("invariant: last stage"),
            self.grads.lnf_b.expect("invariant: last stage"),
        );
        backend.fill(dhead, 0.0)?;
        backend.layernorm_bwd(
            dhead,
            dlnf_w,
            dlnf_b,
            dlnf,
            self.scratch.stage_out,
            lnf_w,
            h.lnf_mean,
            h.lnf_rstd,
            n,
            c,
        )?;
        Ok(loss)
    }

    /// Backward of the microbatch in `slot`, from the gradient of the stage output (the head's
    /// on the last stage) down to the embedding (first stage): `backward_begin`, then
    /// `backward_layer` for each layer from the last, then `backward_end`. The runtime calls
    /// the pieces itself when it starts reducing each layer's gradients as soon as they are done.
    pub fn backward<B: Backend>(&mut self, backend: &mut B, slot: usize) -> Result<()> {
        self.backward_begin(backend, slot)?;
        for l in (0..self.params.layers.len()).rev() {
            self.backward_layer(backend, slot, l)?;
        }
        self.backward_end(backend, slot)
    }

    /// Layers of this stage.
    pub fn layers(&self) -> usize {
        self.params.layers.len()
    }

    /// Takes the gradient of the stage output (last stage: from the head's forward).
    pub fn backward_begin<B: Backend>(&mut self, backend: &mut B, slot: usize) -> Result<()> {
        if let Some(dhead) = &self.dhead {
            backend.copy(self.scratch.dresid, dhead[slot])?;
        }
        Ok(())
    }

    /// Backward of the stage's layer `l` (after layer `l + 1`'s).
    pub fn backward_layer<B: Backend>(
        &mut self,
        backend: &mut B,
        slot: usize,
        l: usize,
    ) -> Result<()> {
        self.recompute(backend, slot, l)?;
        self.layer_backward(backend, slot, l)
    }

    /// The embedding's backward (first stage; nothing elsewhere).
    pub fn backward_end<B: Backend>(&mut self, backend: &mut B, slot: usize) -> Result<()> {
        if let (Some(tokens), Some(dwte), Some(dwpe)) =
            (&self.tokens, self.grads.wte, self.grads.wpe)
        {
            backend.embedding_bwd(dwte, dwpe, self.scratch.dresid, tokens[slot], self.dims)?;
        }
        Ok(())
    }

    /// Rebuilds the tensors of layer `l` that the recompute mode did not keep.
    fn recompute<B: Backend>(&self, backend: &mut B, slot: usize, l: usize) -> Result<()> {
        let (p, a) = (&self.params.layers[l], self.acts.layer(slot, l));
        let (n, c) = (self.tokens_held(), self.widths.c);
        match self.recompute {
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
            Recompute::Full => self.layer_forward(backend, slot, l, None),
        }
    }

    fn layer_backward<B: Backend>(&self, backend: &mut B, slot: usize, l: usize) -> Result<()> {
        let (p, g, a): (_, _, LayerActs) = (
            &self.params.layers[l],
            &self.grads.layers[l],
            self.acts.layer(slot, l),
        );
        let (n, w, s) = (self.tokens_held(), self.widths, self.scratch);
        let (dresid, dln) = (s.dresid, s.btc[0]);
        // MLP: out = resid2 + fcproj(gelu(fc(ln2(resid2)))).
        backend.matmul_bwd(
            Some(s.dfch),
            g.fcproj_w,
            Some(g.fcproj_b),
            dresid,
            a.fch_gelu,
            p.fcproj_w,
            self.linear(w.ffn, w.c),
        )?;
        backend.gelu_bwd(s.dfch, a.fch)?;
        backend.matmul_bwd(
            Some(dln),
            g.fc_w,
            Some(g.fc_b),
            s.dfch,
            a.ln2,
            p.fc_w,
            self.linear(w.c, w.ffn),
        )?;
        backend.layernorm_bwd(
            dresid, g.ln2_w, g.ln2_b, dln, a.resid2, p.ln2_w, a.ln2_mean, a.ln2_rstd, n, w.c,
        )?;
        // Attention: resid2 = resid + attproj(attention(qkv(ln1(resid)))).
        backend.matmul_bwd(
            Some(s.datty),
            g.attproj_w,
            Some(g.attproj_b),
            dresid,
            a.atty,
            p.attproj_w,
            self.linear(w.attention, w.c),
        )?;
        backend.attention_bwd(
            s.dqkv,
            s.att_delta,
            s.datty,
            a.qkv,
            a.atty,
            a.att_lse,
            self.dims,
        )?;
        backend.matmul_bwd(
            Some(dln),
            g.qkv_w,
            Some(g.qkv_b),
            s.dqkv,
            a.ln1,
            p.qkv_w,
            self.linear(w.c, 3 * w.attention),
        )?;
        backend.layernorm_bwd(
            dresid, g.ln1_w, g.ln1_b, dln, a.resid, p.ln1_w, a.ln1_mean, a.ln1_rstd, n, w.c,
        )
    }
}
