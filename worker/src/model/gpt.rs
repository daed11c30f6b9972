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
use crate::comm::ReduceOp;
use crate::error::Result;
use crate::parallel::tensor::TensorParallel;
use crate::tensor::{Backend, Dims, Linear, Tensor};

/// GPT-2 on one pipeline stage of one rank.
pub struct Gpt {
    pub dims: Dims,
    pub recompute: Recompute,
    /// Hidden width `C`, MLP width on this rank `F'`, attention width on this rank `C'`.
    widths: Widths,
    /// Model chunks on this rank (interleaved pipeline schedules have more than one).
    chunks: usize,
    /// The tensor degree under sequence parallelism, else 1.
    sequence_split: usize,
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
        tp_rank: usize,
    ) -> Result<Gpt> {
        let tp = config.parallel.tensor;
        let shape = ModelShape::new(&config.model, tp);
        let dims = Dims {
            b: config.training.micro_batch,
            t: config.model.seq_len,
            c: config.model.hidden,
            nh: config.model.heads / tp,
            nkv: config.model.heads / tp,
            hs: shape.head_dim(),
            v: config.model.vocab,
            vp: shape.vocab_padded / tp,
            vocab_start: tp_rank * (shape.vocab_padded / tp),
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
        let placeholder = |name: &str| {
            layout
                .region(name)
                .expect("invariant: the plan has ZeRO's buffers when units are sharded")
                .get(0)
        };
        Ok(Gpt {
            dims,
            recompute: config.parallel.recompute,
            chunks: stage.layers.len(),
            sequence_split: if config.parallel.sequence_sharded() {
                tp
            } else {
                1
            },
            widths,
            // Under ZeRO 2 and 3 the runtime points each unit at a bucket or gather buffer
            // before every use (`point_params`, `point_grads`); until then, at the first one.
            params: Weights::new(units, |u| {
                u.params()
                    .unwrap_or_else(|| placeholder("zero.param_gather"))
            }),
            grads: Weights::new(units, |u| {
                u.grads().unwrap_or_else(|| placeholder("zero.grad_bucket"))
            }),
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

    /// Tokens of the residual stream on this rank: `N / t` under sequence parallelism.
    fn tokens_held(&self) -> usize {
        self.dims.tokens() / self.sequence_split
    }

    fn linear(&self, inp: usize, out: usize) -> Linear {
        Linear {
            rows: self.dims.tokens(),
            inp,
            out,
        }
    }

    /// Reads `unit`'s parameters (the `layer`-th of the rank's layers) from `buffer` from now on.
    pub fn point_params(&mut self, unit: &Unit, layer: usize, buffer: Tensor) {
        self.params.point(unit, layer, buffer);
    }

    /// Accumulates `unit`'s gradients into `buffer` from now on.
    pub fn point_grads(&mut self, unit: &Unit, layer: usize, buffer: Tensor) {
        self.grads.point(unit, layer, buffer);
    }

    /// Model chunks on this rank (`virtual_stages`); chunk `c` runs layers
    /// `c * layers_per_chunk..` of the rank's layers.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Layers of one chunk.
    pub fn layers_per_chunk(&self) -> usize {
        self.params.layers.len() / self.chunks
    }

    /// Whether `chunk` is the model's first virtual stage (it embeds the tokens).
    pub fn embeds(&self, chunk: usize) -> bool {
        chunk == 0 && self.tokens.is_some()
    }

    /// Whether `chunk` is the model's last virtual stage (it runs the LM head and the loss).
    pub fn has_head(&self, chunk: usize) -> bool {
        chunk + 1 == self.chunks && self.head.is_some()
    }

    /// Where the input activations of `chunk`'s microbatch in `slot` go when they come from
    /// the previous virtual stage (the first layer's saved input).
    pub fn chunk_input(&self, slot: usize) -> Tensor {
        self.acts.layer(slot, 0).resid
    }

    /// A chunk's output, sent on to the next virtual stage.
    pub fn chunk_output(&self) -> Tensor {
        self.scratch.stage_out
    }

    /// The gradient of the residual stream: filled from the next virtual stage before a
    /// backward, holding the gradient of the chunk's input after it.
    pub fn dresid(&self) -> Tensor {
        self.scratch.dresid
    }

    /// Forward of the `i`-th layer of `chunk` for the microbatch in activation slot `slot`:
    /// a forward of a chunk is `embed` (the model's first chunk), this for each of its layers,
    /// then `head` (the model's last chunk). The runtime calls the pieces so that it can fetch
    /// each unit's parameters just before use (ZeRO 3).
    pub fn forward_layer<B: Backend>(
        &self,
        backend: &mut B,
        tp: &mut TensorParallel,
        chunk: usize,
        slot: usize,
        i: usize,
    ) -> Result<()> {
        let per_chunk = self.layers_per_chunk();
        let out = if i + 1 < per_chunk {
            self.acts.layer(slot, i + 1).resid
        } else {
            self.scratch.stage_out
        };
        self.layer_forward(backend, tp, slot, chunk * per_chunk + i, i, Some(out))
    }

    /// Token and position embeddings into the first layer's input. Each tensor-parallel rank
    /// looks up the tokens of its vocabulary shard (and the first adds the positions); the sum
    /// over the group is the embedding.
    pub fn embed<B: Backend>(
        &self,
        backend: &mut B,
        tp: &mut TensorParallel,
        slot: usize,
        io: usize,
    ) -> Result<()> {
        let tokens = self.tokens.as_ref().expect("invariant: first stage")[io];
        let wte = self.params.wte.expect("invariant: first stage");
        let wpe = self.params.wpe.expect("invariant: first stage");
        let resid = self.acts.layer(slot, 0).resid;
        if tp.size() == 1 {
            return backend.embedding_fwd(resid, tokens, wte, Some(wpe), self.dims);
        }
        let partial = self.scratch.btc[0];
        let wpe = tp.adds_replicated().then_some(wpe);
        backend.embedding_fwd(partial, tokens, wte, wpe, self.dims)?;
        let summed = tp.reduce(backend, partial)?;
        backend.copy(resid, summed)
    }

    /// One layer's forward: rank-local layer `l`, `i`-th of its chunk. With `out = None` it
    /// stops before the last matmul: what `full` recompute needs to rebuild the layer's
    /// tensors.
    fn layer_forward<B: Backend>(
        &self,
        backend: &mut B,
        tp: &mut TensorParallel,
        slot: usize,
        l: usize,
        i: usize,
        out: Option<Tensor>,
    ) -> Result<()> {
        let (p, a) = (&self.params.layers[l], self.acts.layer(slot, i));
        let (n, w) = (self.tokens_held(), self.widths);
        let [partial, gathered] = self.scratch.btc;
        // Row-parallel biases are added by one rank, so the sum over ranks has them once.
        let adds = tp.adds_replicated();
        let once = |bias: Tensor| adds.then_some(bias);
        backend.layernorm_fwd(
            a.ln1, a.ln1_mean, a.ln1_rstd, a.resid, p.ln1_w, p.ln1_b, n, w.c,
        )?;
        let x = tp.gather(backend, a.ln1, gathered)?;
        backend.matmul_fwd(
            a.qkv,
            x,
            p.qkv_w,
            Some(p.qkv_b),
            self.linear(w.c, 3 * w.attention),
        )?;
        backend.attention_fwd(a.atty, a.att_lse, a.qkv, self.dims)?;
        backend.matmul_fwd(
            partial,
            a.atty,
            p.attproj_w,
            once(p.attproj_b),
            self.linear(w.attention, w.c),
        )?;
        let proj = tp.reduce(backend, partial)?;
        backend.residual_fwd(a.resid2, a.resid, proj)?;
        backend.layernorm_fwd(
            a.ln2, a.ln2_mean, a.ln2_rstd, a.resid2, p.ln2_w, p.ln2_b, n, w.c,
        )?;
        let x = tp.gather(backend, a.ln2, gathered)?;
        backend.matmul_fwd(a.fch, x, p.fc_w, Some(p.fc_b), self.linear(w.c, w.ffn))?;
        backend.gelu_fwd(a.fch_gelu, a.fch)?;
        if let Some(out) = out {
            backend.matmul_fwd(
                partial,
                a.fch_gelu,
                p.fcproj_w,
                once(p.fcproj_b),
                self.linear(w.ffn, w.c),
            )?;
            let proj = tp.reduce(backend, partial)?;
            backend.residual_fwd(out, a.resid2, proj)?;
        }
        Ok(())
    }

    /// The model's last chunk, after its layers: final LayerNorm, then logits, loss and their
    /// gradients chunk by chunk with `dloss` as the gradient of each token's loss, then the
    /// final LayerNorm's backward into `act.dhead[io]`; returns the sum of the token losses. Under tensor parallelism each rank holds the
    /// logits of its vocabulary shard and the softmax's statistics are combined over the group.
    pub fn head<B: Backend>(
        &mut self,
        backend: &mut B,
        tp: &mut TensorParallel,
        io: usize,
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
        let [gathered, dlnf] = self.scratch.btc;
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
        let lnf_all = tp.gather(backend, h.lnf, gathered)?;
        let mut loss = 0.0f64;
        let (vp, rows_all) = (self.dims.vp, self.dims.tokens());
        for first in (0..rows_all).step_by(self.chunk_rows) {
            let rows = self.chunk_rows.min(rows_all - first);
            let logits = h.logits.slice(0, rows * vp);
            let lnf = lnf_all.slice(first * c, rows * c);
            let shape = Linear {
                rows,
                inp: c,
                out: vp,
            };
            backend.matmul_fwd(logits, lnf, wte, None, shape)?;
            let losses = h.losses.slice(0, rows);
            let (max, sumexp) = (h.logit_max.slice(0, rows), h.logit_sumexp.slice(0, rows));
            let targets = h.targets.slice(first, rows);
            if tp.size() == 1 {
                backend
                    .crossentropy_fwd_bwd(logits, losses, max, sumexp, targets, dloss, self.dims)?;
            } else {
                backend.crossentropy_max(logits, max, self.dims)?;
                tp.all_reduce(backend, max, ReduceOp::Max)?;
                backend.crossentropy_sumexp(logits, losses, max, sumexp, targets, self.dims)?;
                tp.all_reduce(backend, sumexp, ReduceOp::Sum)?;
                tp.all_reduce(backend, losses, ReduceOp::Sum)?;
                backend
                    .crossentropy_finish(logits, losses, max, sumexp, targets, dloss, self.dims)?;
            }
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
        let dlnf = tp.reduce(backend, dlnf)?;
        let dhead = self.dhead.as_ref().expect("invariant: last stage")[io];
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

    /// Backward of `chunk` for the microbatch in `slot` is `backward_begin`, `backward_layer`
    /// for each of the chunk's layers from the last, then `backward_end`: from the gradient of
    /// the chunk's output (the head's on the model's last chunk, else what the runtime put in
    /// `dresid`) down to the gradient of its input in `dresid` (or into the embedding on the
    /// first). The runtime calls the pieces so that each unit's gradients can be reduced as
    /// soon as they are done.
    ///
    /// This piece takes the gradient of the chunk's output from the head (the model's last
    /// chunk).
    pub fn backward_begin<B: Backend>(
        &mut self,
        backend: &mut B,
        chunk: usize,
        io: usize,
    ) -> Result<()> {
        if self.has_head(chunk) {
            let dhead = self.dhead.as_ref().expect("invariant: last stage")[io];
            backend.copy(self.scratch.dresid, dhead)?;
        }
        Ok(())
    }

    /// Backward of the `i`-th layer of `chunk` (after the `i + 1`-th's).
    pub fn backward_layer<B: Backend>(
        &mut self,
        backend: &mut B,
        tp: &mut TensorParallel,
        chunk: usize,
        slot: usize,
        i: usize,
    ) -> Result<()> {
        let l = chunk * self.layers_per_chunk() + i;
        self.recompute(backend, tp, slot, l, i)?;
        self.layer_backward(backend, tp, slot, l, i)
    }

    /// The embedding's backward (the model's first chunk; nothing elsewhere).
    pub fn backward_end<B: Backend>(
        &mut self,
        backend: &mut B,
        tp: &mut TensorParallel,
        chunk: usize,
        io: usize,
    ) -> Result<()> {
        if !self.embeds(chunk) {
            return Ok(());
        }
        let tokens = self.tokens.as_ref().expect("invariant: first stage")[io];
        let (dwte, dwpe) = (
            self.grads.wte.expect("invariant: first stage"),
            self.grads.wpe.expect("invariant: first stage"),
        );
        let dout = tp.gather(backend, self.scratch.dresid, self.scratch.btc[1])?;
        backend.embedding_bwd(dwte, Some(dwpe), dout, tokens, self.dims)
    }

    /// Rebuilds the tensors of layer `l` (`i`-th of its chunk) that the recompute mode did
    /// not keep.
    fn recompute<B: Backend>(
        &self,
        backend: &mut B,
        tp: &mut TensorParallel,
        slot: usize,
        l: usize,
        i: usize,
    ) -> Result<()> {
        let (p, a) = (&self.params.layers[l], self.acts.layer(slot, i));
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
            Recompute::Full => self.layer_forward(backend, tp, slot, l, i, None),
        }
    }

    /// Backward of rank-local layer `l`, the `i`-th of its chunk. Under tensor parallelism the
    /// gradient entering each row-parallel matmul is gathered and the one leaving each
    /// column-parallel matmul reduced (see `parallel::tensor`).
    fn layer_backward<B: Backend>(
        &self,
        backend: &mut B,
        tp: &mut TensorParallel,
        slot: usize,
        l: usize,
        i: usize,
    ) -> Result<()> {
        let (p, g, a): (_, _, LayerActs) = (
            &self.params.layers[l],
            &self.grads.layers[l],
            self.acts.layer(slot, i),
        );
        let (n, w, s) = (self.tokens_held(), self.widths, self.scratch);
        let dresid = s.dresid;
        let [partial, gathered] = s.btc;
        // MLP: out = resid2 + fcproj(gelu(fc(ln2(resid2)))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(s.dfch),
            g.fcproj_w,
            Some(g.fcproj_b),
            dout,
            a.fch_gelu,
            p.fcproj_w,
            self.linear(w.ffn, w.c),
        )?;
        backend.gelu_bwd(s.dfch, a.fch)?;
        let x = tp.gather(backend, a.ln2, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.fc_w,
            Some(g.fc_b),
            s.dfch,
            x,
            p.fc_w,
            self.linear(w.c, w.ffn),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.layernorm_bwd(
            dresid, g.ln2_w, g.ln2_b, dln, a.resid2, p.ln2_w, a.ln2_mean, a.ln2_rstd, n, w.c,
        )?;
        // Attention: resid2 = resid + attproj(attention(qkv(ln1(resid)))).
        let dout = tp.gather(backend, dresid, gathered)?;
        backend.matmul_bwd(
            Some(s.datty),
            g.attproj_w,
            Some(g.attproj_b),
            dout,
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
        let x = tp.gather(backend, a.ln1, gathered)?;
        backend.matmul_bwd(
            Some(partial),
            g.qkv_w,
            Some(g.qkv_b),
            s.dqkv,
            x,
            p.qkv_w,
            self.linear(w.c, 3 * w.attention),
        )?;
        let dln = tp.reduce(backend, partial)?;
        backend.layernorm_bwd(
            dresid, g.ln1_w, g.ln1_b, dln, a.resid, p.ln1_w, a.ln1_mean, a.ln1_rstd, n, w.c,
        )
    }
}
