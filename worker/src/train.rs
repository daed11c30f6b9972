//! The training loop of one rank: microbatches through the model as the pipeline schedule
//! orders them, then the optimizer step, metrics and checkpoints.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::model::{ModelShape, ParamSpec, Split, Unit as UnitKind};
use tessera_plan::schedule::{Op, PipelineSchedule};

use crate::arena::ArenaLayout;
use crate::checkpoint;
use crate::comm::{Collective, CommunicatorExt as _, ReduceOp};
use crate::data::{Dataset, Sampler};
use crate::error::{Error, Result};
use crate::model::init::initial_values;
use crate::model::{Gpt, Unit, units};
use crate::optim::Optimizer;
use crate::parallel::Comms;
use crate::parallel::data::{DataParallel, sum_over_group};
use crate::parallel::pipeline::Slots;
use crate::tensor::{Backend, Tensor};
use crate::trace::{self, Trace};

/// What one optimizer step reports (one line of `--metrics`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    /// Optimizer steps completed, 1-based.
    pub step: u64,
    /// Mean token loss of the step's global batch on this rank.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation; null where the device's peak is unknown (CPU).
    pub mfu: Option<f64>,
    /// Device bytes in use after the step: measured on a GPU (the arena, the CUDA context
    /// and libraries; every process on that GPU), the arena's size on CPU.
    pub peak_bytes: u64,
}

/// One rank's model, optimizer and buffers.
pub struct Rank<B: Backend> {
    /// Checkpoint saves. A write in flight holds a share of the host arena it reads, so the
    /// order in which a rank is torn down does not matter.
    pub saver: checkpoint::Saver,
    pub config: Config,
    pub backend: B,
    pub layout: ArenaLayout,
    pub stage: StagePlan,
    pub units: Vec<Unit>,
    pub model: Gpt,
    pub optimizer: Optimizer,
    pub comms: Comms,
    data_parallel: DataParallel,
    /// This stage's part of the pipeline schedule, and for each chunk the index of its last
    /// backward (when its layers' gradients are final for the step).
    ops: Vec<Op>,
    last_backward: Vec<Option<usize>>,
    slots: Slots,
    /// Steps completed so far (the next step to run is `step`).
    pub step: u64,
    /// Where spans go under `--trace`.
    pub trace: Option<Trace>,
    /// Host staging for one microbatch's token ids and targets.
    inputs: Vec<i32>,
    targets: Vec<i32>,
}

/// Fails unless the config is a single rank (the worker run alone, without `launch`).
pub fn check_single_rank(config: &Config) -> Result<()> {
    let p = &config.parallel;
    if p.world_size() != 1 {
        return Err(Error::Unsupported {
            what: format!(
                "tessera-worker alone runs one rank, but this config has {} (data {} x tensor {} x pipeline {})",
                p.world_size(),
                p.data,
                p.tensor,
                p.pipeline
            ),
            help: "add --set parallel.data=1 --set parallel.tensor=1 --set parallel.pipeline=1 \
                   --set cluster.nodes=1 --set cluster.gpus_per_node=1"
                .into(),
        });
    }
    Ok(())
}

impl<B: Backend> Rank<B> {
    /// A rank of a single-process run: lays out the rank from the memory plan of pipeline
    /// stage 0 and checks that the backend allocated exactly what the plan says.
    pub fn new(config: Config, backend: B) -> Result<Rank<B>> {
        check_single_rank(&config)?;
        Rank::in_mesh(config, backend, Comms::solo())
    }

    /// A rank of a multi-process run, taking part through `comms`.
    pub fn in_mesh(config: Config, backend: B, comms: Comms) -> Result<Rank<B>> {
        let stage = StagePlan::new(&config, comms.coord.pp_rank);
        let layout = ArenaLayout::new(&stage);
        for place in [Place::Device, Place::Host] {
            assert_eq!(
                backend.arena_bytes(place),
                layout.bytes(place),
                "invariant: the backend allocated the planned arena"
            );
        }
        let units = units(&layout, &config, &stage, comms.dp_rank())?;
        let model = Gpt::new(&layout, &config, &stage, &units, comms.coord.tp_rank)?;
        let training = &config.training;
        let optimizer = Optimizer::new(
            training.optimizer.clone(),
            training.steps,
            training.precision,
        );
        let parallel = &config.parallel;
        let schedule = PipelineSchedule::new(
            parallel.schedule,
            parallel.pipeline,
            parallel.virtual_stages,
            config.microbatches(),
        );
        let ops = schedule.ops[comms.coord.pp_rank].clone();
        let last_backward = (0..parallel.virtual_stages)
            .map(|chunk| {
                ops.iter()
                    .rposition(|op| matches!(op, Op::Backward { chunk: c, .. } if *c == chunk))
            })
            .collect();
        let tokens = training.micro_batch * config.model.seq_len;
        let data_parallel = DataParallel::new(&layout, parallel.data)?;
        Ok(Rank {
            saver: checkpoint::Saver::new(&layout)?,
            ops,
            last_backward,
            slots: Slots::new(stage.in_flight.total, &stage.in_flight.per_chunk),
            stage,
            layout,
            units,
            model,
            optimizer,
            data_parallel,
            comms,
            backend,
            step: 0,
            trace: None,
            inputs: vec![0; tokens],
            targets: vec![0; tokens],
            config,
        })
    }

    /// Writes the initial weights (and master weights) of every unit; the moments and
    /// gradients are already 0.
    pub fn initialize(&mut self) -> Result<()> {
        let shape = ModelShape::new(&self.config.model, self.config.parallel.tensor);
        let tp_rank = self.comms.coord.tp_rank;
        for unit in &self.units {
            for placed in &unit.layout.params {
                let values = initial_values(
                    placed,
                    unit.layer,
                    &shape,
                    tp_rank,
                    self.config.training.seed,
                );
                let name = placed.spec.name;
                let offset = placed.offset as usize;
                let range = unit.shard_of(name);
                let part = |range: &std::ops::Range<usize>| {
                    &values[range.start - offset..range.end - offset]
                };
                match (unit.params(), &range) {
                    (Some(params), _) => self.backend.write(unit.view(params, name), &values)?,
                    (None, Some(range)) => {
                        self.backend.write(unit.params_at(range), part(range))?
                    }
                    (None, None) => {}
                }
                if let (Some(master), Some(range)) = (unit.master, &range) {
                    self.backend
                        .write(unit.state_view(master, range), part(range))?;
                }
            }
        }
        Ok(())
    }

    /// Forward and backward of every microbatch of step `self.step`, in this stage's order of
    /// the pipeline schedule; returns the mean loss over the global batch (the same on every
    /// rank). `fill(microbatch, inputs, targets)` provides each microbatch's token ids and
    /// targets (`micro_batch x seq_len` each). Gradients accumulate in the arena, and each
    /// unit's reduction starts as soon as its gradients are final.
    pub fn forward_backward(
        &mut self,
        mut fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<f64> {
        let t = self.config.model.seq_len;
        let tokens_per_step = (self.config.training.global_batch * t) as f64;
        let dloss = (self.optimizer.loss_scale.scale as f64 / tokens_per_step) as f32;
        let last_chunk = self.model.chunks() - 1;
        let last_forward = self
            .ops
            .iter()
            .rposition(|op| matches!(op, Op::Forward { chunk, .. } if *chunk == last_chunk));
        let mut loss = 0.0;
        for i in 0..self.ops.len() {
            match self.ops[i] {
                Op::Forward { microbatch, chunk } => {
                    let (slot, io) = self.slots.take(microbatch, chunk);
                    let (embeds, head) = (self.model.embeds(chunk), self.model.has_head(chunk));
                    self.comms.pipeline.receive_input(
                        &self.backend,
                        chunk,
                        self.model.chunk_input(slot),
                    )?;
                    let started = Instant::now();
                    if embeds || head {
                        fill(microbatch, &mut self.inputs, &mut self.targets)?;
                    }
                    if embeds {
                        let tokens = self.model.tokens(io).expect("invariant: first stage");
                        self.backend.write_i32(tokens, &self.inputs)?;
                        self.use_params(0)?;
                        self.model
                            .embed(&mut self.backend, &mut self.comms.tp, slot, io)?;
                    }
                    let layers = self.model.layers_per_chunk();
                    for layer in 0..layers {
                        self.use_params(self.layer_unit(chunk, layer))?;
                        if layer + 1 < layers {
                            self.prefetch_params(self.layer_unit(chunk, layer + 1))?;
                        }
                        let (model, tp) = (&self.model, &mut self.comms.tp);
                        model.forward_layer(&mut self.backend, tp, chunk, slot, layer)?;
                    }
                    if head {
                        let targets = self.model.targets().expect("invariant: last stage");
                        self.backend.write_i32(targets, &self.targets)?;
                        loss += self.head(io, dloss, Some(i) == last_forward)?;
                    }
                    self.span(
                        || format!("forward {microbatch}.{chunk}"),
                        "forward",
                        started,
                    );
                    self.comms.pipeline.send_output(
                        &self.backend,
                        chunk,
                        self.model.chunk_output(),
                    )?;
                }
                Op::Backward { microbatch, chunk } => {
                    let (slot, io) = self.slots.give_back(microbatch, chunk);
                    let last = self.last_backward[chunk] == Some(i);
                    self.backward(microbatch, chunk, slot, io, last)?;
                }
            }
        }
        self.comms.pipeline.finish()?;
        self.reduce_tied_embedding()?;
        let local = if self.model.has_head(last_chunk) && self.comms.tp.index() == 0 {
            loss / tokens_per_step
        } else {
            0.0
        };
        sum_over_group(self.comms.world.as_mut(), local)
    }

    /// Records a span of the rank's compute under `--trace`.
    fn span(&self, name: impl FnOnce() -> String, category: &'static str, start: Instant) {
        if let Some(trace) = &self.trace {
            trace.record(name(), category, trace::COMPUTE, start);
        }
    }

    /// The index in `units` of the rank's first layer (after the embedding on the first stage).
    fn first_layer(&self) -> usize {
        usize::from(self.units[0].kind == UnitKind::Embedding)
    }

    /// The index in `units` of the `layer`-th layer of `chunk`.
    fn layer_unit(&self, chunk: usize, layer: usize) -> usize {
        self.first_layer() + chunk * self.model.layers_per_chunk() + layer
    }

    /// The position of unit `index` among the rank's layers (0 for other units).
    fn layer_position(&self, index: usize) -> usize {
        index.saturating_sub(self.first_layer())
    }

    /// Points the model at unit `index`'s parameters for its next use (gathered under ZeRO 3).
    fn use_params(&mut self, index: usize) -> Result<()> {
        let unit = &self.units[index];
        let params = self
            .data_parallel
            .params_for(self.comms.dp.as_mut(), &self.backend, unit)?;
        self.model
            .point_params(unit, self.layer_position(index), params);
        Ok(())
    }

    /// Under ZeRO 3, starts gathering unit `index`'s parameters while the current unit
    /// computes.
    fn prefetch_params(&mut self, index: usize) -> Result<()> {
        let unit = &self.units[index];
        self.data_parallel
            .prefetch(self.comms.dp.as_mut(), &self.backend, unit)
    }

    /// Points the model at where unit `index`'s next gradients accumulate; returns it.
    fn use_grads(&mut self, index: usize) -> Result<Tensor> {
        let unit = &self.units[index];
        let grads = self.data_parallel.grads_for(&mut self.backend, unit)?;
        self.model
            .point_grads(unit, self.layer_position(index), grads);
        Ok(grads)
    }

    /// The model wrote unit `index`'s gradients into `grads`; `last` when they are final for
    /// the step. Sequence-parallel partial sums are reduced over the tensor group first, once
    /// per bucket (ZeRO 2 and 3) or once per step.
    fn grads_done(&mut self, index: usize, grads: Tensor, last: bool) -> Result<()> {
        let unit = &self.units[index];
        if unit.grads_sharded || last {
            self.comms
                .tp
                .reduce_partial_grads(&self.backend, unit, grads)?;
        }
        self.data_parallel
            .grads_done(self.comms.dp.as_mut(), &self.backend, unit, grads, last)
    }

    /// The LM head of the microbatch whose buffers are `io`; `last` for the step's last.
    fn head(&mut self, io: usize, dloss: f32, last: bool) -> Result<f64> {
        let head = self.units.len() - 1;
        // Without a pipeline the head's weights are the embedding's: that unit is in use too.
        let shares_embedding = self.first_layer() == 1;
        self.use_params(head)?;
        let head_grads = self.use_grads(head)?;
        let embedding_grads = if shares_embedding {
            self.use_params(0)?;
            Some(self.use_grads(0)?)
        } else {
            None
        };
        let loss = self
            .model
            .head(&mut self.backend, &mut self.comms.tp, io, dloss)?;
        // The head's gradients are final after the step's last head; a tied copy's wait for
        // the other copy's at the end of the step.
        let final_head = last && !self.tied_to_embedding(head);
        self.grads_done(head, head_grads, final_head)?;
        if let Some(grads) = embedding_grads {
            self.grads_done(0, grads, false)?;
        }
        Ok(loss)
    }

    /// Backward of `chunk` for `microbatch`, whose buffers are (`slot`, `io`). When it is the chunk's last
    /// backward of the step, each layer's gradients start their data-parallel reduction as
    /// soon as they are final, while the layers below compute.
    fn backward(
        &mut self,
        microbatch: usize,
        chunk: usize,
        slot: usize,
        io: usize,
        last: bool,
    ) -> Result<()> {
        let dresid = self.model.dresid();
        self.comms
            .pipeline
            .receive_gradient(&self.backend, chunk, dresid)?;
        let started = Instant::now();
        self.model.backward_begin(&mut self.backend, chunk, io)?;
        for layer in (0..self.model.layers_per_chunk()).rev() {
            let index = self.layer_unit(chunk, layer);
            self.use_params(index)?;
            if layer > 0 {
                self.prefetch_params(self.layer_unit(chunk, layer - 1))?;
            }
            let grads = self.use_grads(index)?;
            self.model
                .backward_layer(&mut self.backend, &mut self.comms.tp, chunk, slot, layer)?;
            self.grads_done(index, grads, last)?;
        }
        if self.model.embeds(chunk) {
            let grads = self.use_grads(0)?;
            self.model
                .backward_end(&mut self.backend, &mut self.comms.tp, chunk, io)?;
            self.grads_done(0, grads, last && !self.tied_to_embedding(0))?;
        }
        self.span(
            || format!("backward {microbatch}.{chunk}"),
            "backward",
            started,
        );
        self.comms
            .pipeline
            .send_gradient(&self.backend, chunk, dresid)
    }

    /// Whether unit `index` holds a copy of the tied token embedding that another stage also
    /// holds (the first and last stage of a pipeline): its gradient is summed with the other
    /// copy's at the end of the step, before its reduction.
    fn tied_to_embedding(&self, index: usize) -> bool {
        self.comms.embedding.is_some()
            && matches!(
                self.units[index].kind,
                UnitKind::Embedding | UnitKind::Head { tied_copy: true }
            )
    }

    /// Sums the tied embedding's gradient over its two copies (first and last stage). Under
    /// ZeRO 0 and 1 that is before the units' data-parallel reduction, which starts here;
    /// under ZeRO 2 and 3 the shards are already reduced, so the whole gradients are gathered,
    /// summed and cut back into shards.
    fn reduce_tied_embedding(&mut self) -> Result<()> {
        if self.comms.embedding.is_none() {
            return Ok(());
        }
        let tied: Vec<usize> = (0..self.units.len())
            .filter(|&i| self.tied_to_embedding(i))
            .collect();
        for index in tied {
            let unit = &self.units[index];
            let dp = self.comms.dp.as_mut();
            let whole = match unit.grads() {
                Some(grads) => grads,
                None => {
                    self.data_parallel.finish(&mut self.backend)?;
                    self.data_parallel
                        .gather_grads(dp, &mut self.backend, unit)?
                }
            };
            let buf = self.backend.comm_buf(unit.view(whole, "wte"));
            let group = self
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
                let dp = self.comms.dp.as_ref();
                self.data_parallel
                    .scatter_back(dp, &mut self.backend, unit, whole)?;
            } else {
                self.grads_done(index, whole, true)?;
            }
        }
        Ok(())
    }

    /// One whole optimizer step on the rank's share of the global batch.
    pub fn train_step(&mut self, dataset: &Dataset, sampler: &Sampler) -> Result<StepMetrics> {
        let (step, t) = (self.step, self.config.model.seq_len);
        self.train_step_with(|microbatch, inputs, targets| {
            for row in 0..inputs.len() / t {
                let index = sampler.index(step, microbatch, row);
                let range = row * t..(row + 1) * t;
                dataset.sample(index, &mut inputs[range.clone()], &mut targets[range])?;
            }
            Ok(())
        })
    }

    /// One whole optimizer step on the batches `fill` provides (see `forward_backward`).
    pub fn train_step_with(
        &mut self,
        fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<StepMetrics> {
        let start = Instant::now();
        let loss = self.forward_backward(fill)?;
        if !loss.is_finite() {
            return Err(Error::Diverged {
                step: self.step + 1,
                loss: loss as f32,
            });
        }
        self.data_parallel.finish(&mut self.backend)?;
        let optimizer = Instant::now();
        let (dp_rank, tp_rank) = (self.comms.dp_rank(), self.comms.coord.tp_rank);
        let local = self.optimizer.sum_squares(
            &mut self.backend,
            &self.units,
            self.model.norm_partials(),
            |unit, placed| counts_in_norm(unit, &placed.spec, dp_rank, tp_rank),
        )?;
        let norm = sum_over_group(self.comms.world.as_mut(), local)?.sqrt();
        let report = self
            .optimizer
            .step(&mut self.backend, &self.units, self.step, norm)?;
        self.data_parallel
            .gather_params(self.comms.dp.as_mut(), &mut self.backend, &self.units)?;
        self.span(|| "optimizer".into(), "optimizer", optimizer);
        self.step += 1;
        self.span(|| format!("step {}", self.step), "step", start);
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        let tokens = self.config.tokens_per_step() as f64;
        // Every rank's share of the step's model FLOPs against every rank's peak.
        let world = self.config.parallel.world_size() as f64;
        let flops = ModelShape::new(&self.config.model, 1).flops_per_token() * tokens;
        Ok(StepMetrics {
            step: self.step,
            loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens_per_s: tokens / seconds,
            mfu: self
                .backend
                .peak_flops()
                .map(|peak| flops / seconds / (world * peak)),
            peak_bytes: self
                .backend
                .measured_device_bytes()
                .unwrap_or(self.backend.arena_bytes(Place::Device) as u64),
        })
    }
}

/// Whether the rank at (`dp_rank`, `tp_rank`) counts parameter `spec` of `unit` in the global
/// gradient norm: every element is counted by exactly one rank of the mesh (tensor-parallel
/// replicas by the first, the tied embedding's copy on the last stage not at all, whole
/// data-parallel replicas by the first).
fn counts_in_norm(unit: &Unit, spec: &ParamSpec, dp_rank: usize, tp_rank: usize) -> bool {
    let replicated = spec.split == Split::Replicated;
    let tied_copy = matches!(unit.kind, UnitKind::Head { tied_copy: true }) && spec.name == "wte";
    let replica = unit.is_whole() && dp_rank != 0;
    !(tied_copy || replica || (replicated && tp_rank != 0))
}

/// How `run` behaves beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Append one JSON line per step here.
    pub metrics: Option<PathBuf>,
    /// Stop after this many completed steps (the schedule still runs to `training.steps`).
    pub until_step: Option<u64>,
    /// Start from scratch even when `checkpoint.dir` has a checkpoint.
    pub fresh: bool,
    /// Write the rank's trace (`Rank::trace`) into this directory when the run ends.
    pub trace: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub resumed_from: Option<PathBuf>,
    pub first_step: u64,
    pub metrics: Vec<StepMetrics>,
}

/// Trains one rank to `training.steps` (or `until_step`): resumes from the newest intact
/// checkpoint in `checkpoint.dir` unless `fresh`, saves every `checkpoint.every` steps and at
/// the end (in the background: a save is committed after a later step, and the run returns
/// once the last one is), and calls `on_step` after each step.
pub fn run<B: Backend>(
    mut rank: Rank<B>,
    options: &RunOptions,
    on_step: impl FnMut(&Rank<B>, &StepMetrics),
) -> Result<Summary> {
    let result = run_steps(&mut rank, options, on_step);
    // The trace is written even when the run failed: that is when it is wanted most.
    if let (Some(trace), Some(dir)) = (&rank.trace, &options.trace) {
        let written = trace.write(dir);
        if result.is_ok() {
            written?;
        }
    }
    result
}

fn run_steps<B: Backend>(
    rank: &mut Rank<B>,
    options: &RunOptions,
    mut on_step: impl FnMut(&Rank<B>, &StepMetrics),
) -> Result<Summary> {
    let config = rank.config.clone();
    let dataset = Dataset::open(
        &config.data,
        config.model.vocab,
        config.model.seq_len,
        config.training.seed,
    )?;
    let sampler = Sampler {
        global_batch: config.training.global_batch,
        micro_batch: config.training.micro_batch,
        dp: config.parallel.data,
        dp_rank: rank.comms.dp_rank(),
    };
    let dir = PathBuf::from(&config.checkpoint.dir);
    let resumed = if options.fresh {
        None
    } else {
        checkpoint::resume(
            &dir,
            &config,
            &mut rank.backend,
            &rank.units,
            &mut rank.comms,
        )?
    };
    match &resumed {
        Some(resumed) => {
            let manifest = &resumed.loaded.manifest;
            rank.step = manifest.step;
            rank.optimizer.loss_scale = manifest.loss_scale;
            if rank.comms.rank == 0 {
                println!("resuming from {}", resumed.path.display());
            }
            // What this rank read: its own shards (and the headers that locate them) only.
            let (read, state) = (resumed.loaded.read, resumed.loaded.state_bytes);
            println!(
                "checkpoint read: {} bytes of tensors and {} bytes of headers from {} files for {state} bytes of state",
                read.data, read.headers, read.files
            );
        }
        None => rank.initialize()?,
    }
    let resumed_from = resumed.map(|resumed| resumed.path);
    let mut metrics_file = match &options.metrics {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(Error::io(path))?,
        ),
        None => None,
    };
    let first_step = rank.step;
    let last = options
        .until_step
        .map_or(config.training.steps, |s| s.min(config.training.steps));
    let mut all = Vec::new();
    while rank.step < last {
        let metrics = rank.train_step(&dataset, &sampler)?;
        if let (Some(file), Some(path)) = (&mut metrics_file, &options.metrics) {
            let mut line = serde_json::to_string(&metrics).expect("invariant: metrics serialise");
            line.push('\n');
            file.write_all(line.as_bytes()).map_err(Error::io(path))?;
        }
        // A save in flight is committed once every rank has written its file.
        rank.saver.poll(&mut rank.comms)?;
        let every = config.checkpoint.every;
        if every > 0 && (rank.step.is_multiple_of(every) || rank.step == config.training.steps) {
            rank.saver.start(
                &dir,
                rank.step,
                &config,
                &mut rank.backend,
                &rank.units,
                rank.optimizer.loss_scale,
                &mut rank.comms,
            )?;
        }
        on_step(rank, &metrics);
        all.push(metrics);
    }
    rank.saver.finish(&mut rank.comms)?;
    Ok(Summary {
        resumed_from,
        first_step,
        metrics: all,
    })
}
