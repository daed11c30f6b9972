//! The pipeline executor: one step's forward and backward of every microbatch, in this stage's
//! order of the pipeline schedule, with each unit's parameters fetched just before use and its
//! gradients handed to data parallelism as soon as they are final. The same for every
//! architecture: it drives `model::Stage` and never looks inside a layer.

use std::time::Instant;

use tessera_plan::Config;
use tessera_plan::memory::StagePlan;
use tessera_plan::model::{Role, Unit as UnitKind};
use tessera_plan::schedule::{Op, PipelineSchedule};

use super::Comms;
use super::data::{DataParallel, sum_over_group};
use super::pipeline::Slots;
use crate::arena::ArenaLayout;
use crate::comm::{Collective, CommunicatorExt as _, ReduceOp};
use crate::error::Result;
use crate::model::Stage;
use crate::tensor::{Backend, Tensor};
use crate::trace::{self, Trace};
use crate::units::Unit;

/// What a step works on, borrowed from the rank.
pub struct StepParts<'a, B: Backend> {
    pub backend: &'a mut B,
    pub model: &'a mut Stage<B>,
    pub units: &'a [Unit],
    pub comms: &'a mut Comms,
    pub trace: Option<&'a Trace>,
}

/// One stage's part of the pipeline schedule and the data-parallel traffic of its units.
pub struct Executor {
    /// This stage's ops, and for each chunk the index of its last backward (when its layers'
    /// gradients are final for the step).
    ops: Vec<Op>,
    last_backward: Vec<Option<usize>>,
    slots: Slots,
    pub data_parallel: DataParallel,
    /// Tokens of the step's global batch: the loss is their mean.
    tokens_per_step: f64,
    /// Host staging for one microbatch's token ids and targets.
    inputs: Vec<i32>,
    targets: Vec<i32>,
}

impl Executor {
    pub fn new(
        config: &Config,
        stage: &StagePlan,
        layout: &ArenaLayout,
        pp_rank: usize,
    ) -> Result<Executor> {
        let parallel = &config.parallel;
        let schedule = PipelineSchedule::new(
            parallel.schedule,
            parallel.pipeline,
            parallel.virtual_stages,
            config.microbatches(),
        );
        let ops = schedule.ops[pp_rank].clone();
        let last_backward = (0..parallel.virtual_stages)
            .map(|chunk| {
                ops.iter()
                    .rposition(|op| matches!(op, Op::Backward { chunk: c, .. } if *c == chunk))
            })
            .collect();
        let tokens = config.training.micro_batch * config.model.seq_len;
        Ok(Executor {
            ops,
            last_backward,
            slots: Slots::new(stage.in_flight.total, &stage.in_flight.per_chunk),
            data_parallel: DataParallel::new(layout, parallel.data)?,
            tokens_per_step: (config.training.global_batch * config.model.seq_len) as f64,
            inputs: vec![0; tokens],
            targets: vec![0; tokens],
        })
    }

    /// Forward and backward of every microbatch of one step; returns the mean loss over the
    /// global batch (the same on every rank). `loss_scale` multiplies the loss's gradient
    /// (fp16). `fill(microbatch, inputs, targets)` provides each microbatch's token ids and
    /// targets (`micro_batch x seq_len` each). Gradients accumulate in the arena, and each
    /// unit's reduction starts as soon as its gradients are final.
    pub fn forward_backward<B: Backend>(
        &mut self,
        step: &mut StepParts<B>,
        loss_scale: f32,
        mut fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<f64> {
        let dloss = (loss_scale as f64 / self.tokens_per_step) as f32;
        let last_chunk = step.model.chunks() - 1;
        let last_forward = self
            .ops
            .iter()
            .rposition(|op| matches!(op, Op::Forward { chunk, .. } if *chunk == last_chunk));
        let mut loss = 0.0;
        for i in 0..self.ops.len() {
            match self.ops[i] {
                Op::Forward { microbatch, chunk } => {
                    let (slot, io) = self.slots.take(microbatch, chunk);
                    let (embeds, head) = (step.model.embeds(chunk), step.model.has_head(chunk));
                    step.comms.pipeline.receive_input(
                        step.backend,
                        chunk,
                        step.model.chunk_input(slot),
                    )?;
                    let started = Instant::now();
                    if embeds || head {
                        fill(microbatch, &mut self.inputs, &mut self.targets)?;
                    }
                    if embeds {
                        let tokens = step.model.tokens(io).expect("invariant: first stage");
                        step.backend.write_i32(tokens, &self.inputs)?;
                        self.use_params(step, 0)?;
                        step.model
                            .embed(step.backend, &mut step.comms.tp, slot, io)?;
                    }
                    let layers = step.model.layers_per_chunk();
                    for layer in 0..layers {
                        self.use_params(step, layer_unit(step, chunk, layer))?;
                        if layer + 1 < layers {
                            self.prefetch_params(step, layer_unit(step, chunk, layer + 1))?;
                        }
                        step.model.forward_layer(
                            step.backend,
                            &mut step.comms.tp,
                            chunk,
                            slot,
                            layer,
                        )?;
                    }
                    if head {
                        let targets = step.model.targets().expect("invariant: last stage");
                        step.backend.write_i32(targets, &self.targets)?;
                        loss += self.head(step, io, dloss, Some(i) == last_forward)?;
                    }
                    span(
                        step,
                        || format!("forward {microbatch}.{chunk}"),
                        "forward",
                        started,
                    );
                    step.comms.pipeline.send_output(
                        step.backend,
                        chunk,
                        step.model.chunk_output(),
                    )?;
                }
                Op::Backward { microbatch, chunk } => {
                    let (slot, io) = self.slots.give_back(microbatch, chunk);
                    let last = self.last_backward[chunk] == Some(i);
                    self.backward(step, microbatch, chunk, slot, io, last)?;
                }
            }
        }
        step.comms.pipeline.finish()?;
        self.reduce_tied_embedding(step)?;
        let local = if step.model.has_head(last_chunk) && step.comms.tp.index() == 0 {
            loss / self.tokens_per_step
        } else {
            0.0
        };
        sum_over_group(step.comms.world.as_mut(), local)
    }

    /// Forward of every microbatch of one batch, without backward (evaluation): the mean loss
    /// over the global batch, the same on every rank, with no gradient touched. Microbatch by
    /// microbatch, each through every chunk in turn: one chain of dependencies, so no schedule
    /// can deadlock it (nothing needs pipelining: evaluations are rare).
    pub fn forward_only<B: Backend>(
        &mut self,
        step: &mut StepParts<B>,
        mut fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<f64> {
        let chunks = step.model.chunks();
        let microbatches = self
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Forward { chunk: 0, .. }))
            .count();
        let mut loss = 0.0;
        for microbatch in 0..microbatches {
            for chunk in 0..chunks {
                let (slot, io) = self.slots.take(microbatch, chunk);
                let (embeds, head) = (step.model.embeds(chunk), step.model.has_head(chunk));
                step.comms.pipeline.receive_input(
                    step.backend,
                    chunk,
                    step.model.chunk_input(slot),
                )?;
                let started = Instant::now();
                if embeds || head {
                    fill(microbatch, &mut self.inputs, &mut self.targets)?;
                }
                if embeds {
                    let tokens = step.model.tokens(io).expect("invariant: first stage");
                    step.backend.write_i32(tokens, &self.inputs)?;
                    self.use_params(step, 0)?;
                    step.model
                        .embed(step.backend, &mut step.comms.tp, slot, io)?;
                }
                let layers = step.model.layers_per_chunk();
                for layer in 0..layers {
                    self.use_params(step, layer_unit(step, chunk, layer))?;
                    if layer + 1 < layers {
                        self.prefetch_params(step, layer_unit(step, chunk, layer + 1))?;
                    }
                    step.model.forward_layer(
                        step.backend,
                        &mut step.comms.tp,
                        chunk,
                        slot,
                        layer,
                    )?;
                }
                if head {
                    let targets = step.model.targets().expect("invariant: last stage");
                    step.backend.write_i32(targets, &self.targets)?;
                    self.use_params(step, step.units.len() - 1)?;
                    if first_layer(step) == 1 && step.model.tied() {
                        self.use_params(step, 0)?;
                    }
                    loss += step
                        .model
                        .head(step.backend, &mut step.comms.tp, io, 0.0, false)?;
                }
                span(
                    step,
                    || format!("eval {microbatch}.{chunk}"),
                    "eval",
                    started,
                );
                step.comms
                    .pipeline
                    .send_output(step.backend, chunk, step.model.chunk_output())?;
                self.slots.give_back(microbatch, chunk);
            }
        }
        step.comms.pipeline.finish()?;
        let local = if step.model.has_head(chunks - 1) && step.comms.tp.index() == 0 {
            loss / self.tokens_per_step
        } else {
            0.0
        };
        sum_over_group(step.comms.world.as_mut(), local)
    }

    /// Points the model at unit `index`'s parameters for its next use (gathered under ZeRO 3).
    fn use_params<B: Backend>(&mut self, step: &mut StepParts<B>, index: usize) -> Result<()> {
        let unit = &step.units[index];
        let params = self
            .data_parallel
            .params_for(step.comms.dp.as_mut(), step.backend, unit)?;
        step.model
            .point_params(unit, layer_position(step, index), params);
        Ok(())
    }

    /// Under ZeRO 3, starts gathering unit `index`'s parameters while the current unit
    /// computes.
    fn prefetch_params<B: Backend>(&mut self, step: &mut StepParts<B>, index: usize) -> Result<()> {
        let unit = &step.units[index];
        self.data_parallel
            .prefetch(step.comms.dp.as_mut(), step.backend, unit)
    }

    /// Points the model at where unit `index`'s next gradients accumulate; returns it.
    fn use_grads<B: Backend>(&mut self, step: &mut StepParts<B>, index: usize) -> Result<Tensor> {
        let unit = &step.units[index];
        let grads = self.data_parallel.grads_for(step.backend, unit)?;
        step.model
            .point_grads(unit, layer_position(step, index), grads);
        Ok(grads)
    }

    /// The model wrote unit `index`'s gradients into `grads`; `last` when they are final for
    /// the step. Sequence-parallel partial sums are reduced over the tensor group first, once
    /// per bucket (ZeRO 2 and 3) or once per step.
    fn grads_done<B: Backend>(
        &mut self,
        step: &mut StepParts<B>,
        index: usize,
        grads: Tensor,
        last: bool,
    ) -> Result<()> {
        let unit = &step.units[index];
        if unit.grads_sharded || last {
            step.comms
                .tp
                .reduce_partial_grads(step.backend, unit, grads)?;
        }
        self.data_parallel
            .grads_done(step.comms.dp.as_mut(), step.backend, unit, grads, last)
    }

    /// The LM head of the microbatch whose buffers are `io`; `last` for the step's last.
    fn head<B: Backend>(
        &mut self,
        step: &mut StepParts<B>,
        io: usize,
        dloss: f32,
        last: bool,
    ) -> Result<f64> {
        let head = step.units.len() - 1;
        // Without a pipeline a tied head's weights are the embedding's: that unit is in use too.
        let shares_embedding = first_layer(step) == 1 && step.model.tied();
        self.use_params(step, head)?;
        let head_grads = self.use_grads(step, head)?;
        let embedding_grads = if shares_embedding {
            self.use_params(step, 0)?;
            Some(self.use_grads(step, 0)?)
        } else {
            None
        };
        let loss = step
            .model
            .head(step.backend, &mut step.comms.tp, io, dloss, true)?;
        // The head's gradients are final after the step's last head; a tied copy's wait for
        // the other copy's at the end of the step.
        let final_head = last && !tied_to_embedding(step, head);
        self.grads_done(step, head, head_grads, final_head)?;
        if let Some(grads) = embedding_grads {
            self.grads_done(step, 0, grads, false)?;
        }
        Ok(loss)
    }

    /// Backward of `chunk` for `microbatch`, whose buffers are (`slot`, `io`). When it is the
    /// chunk's last backward of the step, each layer's gradients start their data-parallel
    /// reduction as soon as they are final, while the layers below compute.
    fn backward<B: Backend>(
        &mut self,
        step: &mut StepParts<B>,
        microbatch: usize,
        chunk: usize,
        slot: usize,
        io: usize,
        last: bool,
    ) -> Result<()> {
        let dresid = step.model.dresid();
        step.comms
            .pipeline
            .receive_gradient(step.backend, chunk, dresid)?;
        let started = Instant::now();
        step.model.backward_begin(step.backend, chunk, io)?;
        for layer in (0..step.model.layers_per_chunk()).rev() {
            let index = layer_unit(step, chunk, layer);
            self.use_params(step, index)?;
            if layer > 0 {
                self.prefetch_params(step, layer_unit(step, chunk, layer - 1))?;
            }
            let grads = self.use_grads(step, index)?;
            step.model
                .backward_layer(step.backend, &mut step.comms.tp, chunk, slot, layer)?;
            self.grads_done(step, index, grads, last)?;
        }
        if step.model.embeds(chunk) {
            let grads = self.use_grads(step, 0)?;
            step.model
                .backward_end(step.backend, &mut step.comms.tp, chunk, io)?;
            let final_embedding = last && !tied_to_embedding(step, 0);
            self.grads_done(step, 0, grads, final_embedding)?;
        }
        span(
            step,
            || format!("backward {microbatch}.{chunk}"),
            "backward",
            started,
        );
        step.comms
            .pipeline
            .send_gradient(step.backend, chunk, dresid)
    }

    /// Sums the tied embedding's gradient over its two copies (first and last stage). Under
    /// ZeRO 0 and 1 that is before the units' data-parallel reduction, which starts here;
    /// under ZeRO 2 and 3 the shards are already reduced, so the whole gradients are gathered,
    /// summed and cut back into shards.
    fn reduce_tied_embedding<B: Backend>(&mut self, step: &mut StepParts<B>) -> Result<()> {
        if step.comms.embedding.is_none() {
            return Ok(());
        }
        let tied: Vec<usize> = (0..step.units.len())
            .filter(|&i| tied_to_embedding(step, i))
            .collect();
        for index in tied {
            let unit = &step.units[index];
            let dp = step.comms.dp.as_mut();
            let whole = match unit.grads() {
                Some(grads) => grads,
                None => {
                    self.data_parallel.finish(step.backend)?;
                    self.data_parallel.gather_grads(dp, step.backend, unit)?
                }
            };
            let embedding = unit
                .view_role(whole, Role::TokenEmbedding)
                .expect("invariant: a tied unit holds the token embedding");
            let buf = step.backend.comm_buf(embedding);
            let group = step
                .comms
                .embedding
                .as_mut()
                .expect("invariant: checked above");
            // SAFETY: the gradients live in the arena and no kernel runs during this call.
            unsafe {
                group.run(Collective::AllReduce {
                    buf,
                    op: ReduceOp::Sum,
                })
            }?;
            if unit.grads_sharded {
                let dp = step.comms.dp.as_ref();
                self.data_parallel
                    .scatter_back(dp, step.backend, unit, whole)?;
            } else {
                self.grads_done(step, index, whole, true)?;
            }
        }
        Ok(())
    }
}

/// Records a span of the rank's compute under `--trace`.
fn span<B: Backend>(
    step: &StepParts<B>,
    name: impl FnOnce() -> String,
    category: &'static str,
    start: Instant,
) {
    if let Some(trace) = step.trace {
        trace.record(name(), category, trace::COMPUTE, start);
    }
}

/// The index in `units` of the rank's first layer (after the embedding on the first stage).
fn first_layer<B: Backend>(step: &StepParts<B>) -> usize {
    usize::from(step.units[0].kind == UnitKind::Embedding)
}

/// The index in `units` of the `layer`-th layer of `chunk`.
fn layer_unit<B: Backend>(step: &StepParts<B>, chunk: usize, layer: usize) -> usize {
    first_layer(step) + chunk * step.model.layers_per_chunk() + layer
}

/// The position of unit `index` among the rank's layers (0 for other units).
fn layer_position<B: Backend>(step: &StepParts<B>, index: usize) -> usize {
    index.saturating_sub(first_layer(step))
}

/// Whether unit `index` holds a copy of the tied token embedding that another stage also
/// holds (the first and last stage of a pipeline): its gradient is summed with the other
/// copy's at the end of the step, before its reduction.
fn tied_to_embedding<B: Backend>(step: &StepParts<B>, index: usize) -> bool {
    step.comms.embedding.is_some()
        && matches!(
            step.units[index].kind,
            UnitKind::Embedding | UnitKind::Head { tied_copy: true }
        )
}
