//! The training loop of one rank: microbatches through the model as the pipeline schedule
//! orders them, then the optimizer step, metrics and checkpoints.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::model::{ModelShape, ParamSpec, Role, Split, Unit as UnitKind};

use crate::arena::ArenaLayout;
use crate::checkpoint;
use crate::data::{Dataset, Sampler};
use crate::error::{Error, Result};
use crate::model::Stage;
use crate::model::init::initial_values;
use crate::optim::Optimizer;
use crate::parallel::Comms;
use crate::parallel::data::sum_over_group;
use crate::parallel::executor::{Executor, StepParts};
use crate::tensor::Backend;
use crate::trace::{self, Trace};
use crate::units::{Unit, units};

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
    /// Mean token loss on the held-out data, after the steps `eval.every` names (absent from
    /// the JSON line otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
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
    pub model: Stage<B>,
    pub optimizer: Optimizer,
    pub comms: Comms,
    /// The pipeline schedule's ops and the data-parallel traffic of the units.
    executor: Executor,
    /// Steps completed so far (the next step to run is `step`).
    pub step: u64,
    /// Where spans go under `--trace`.
    pub trace: Option<Trace>,
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
        let model = Stage::new(&layout, &config, &stage, &units, comms.coord.tp_rank)?;
        let mut backend = backend;
        model.write_constants(&mut backend, &config)?;
        let training = &config.training;
        let optimizer = Optimizer::new(
            training.optimizer.clone(),
            training.steps,
            training.precision,
        );
        let executor = Executor::new(&config, &stage, &layout, comms.coord.pp_rank)?;
        Ok(Rank {
            saver: checkpoint::Saver::new(&layout)?,
            executor,
            stage,
            layout,
            units,
            model,
            optimizer,
            comms,
            backend,
            step: 0,
            trace: None,
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
        fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<f64> {
        let mut parts = StepParts {
            backend: &mut self.backend,
            model: &mut self.model,
            units: &self.units,
            comms: &mut self.comms,
            trace: self.trace.as_ref(),
        };
        let scale = self.optimizer.loss_scale.scale;
        self.executor.forward_backward(&mut parts, scale, fill)
    }

    /// The mean token loss over `eval.batches` global batches of `held_out` (the same
    /// sequences every time and on every mesh: batch `k`'s samples are the global indices a
    /// training step `k` would take). Forward only: no gradient or optimizer state changes.
    pub fn evaluate(&mut self, held_out: &Dataset, sampler: &Sampler) -> Result<f64> {
        let (batches, t) = (self.config.eval.batches, self.config.model.seq_len);
        let mut total = 0.0;
        for batch in 0..batches as u64 {
            let mut parts = StepParts {
                backend: &mut self.backend,
                model: &mut self.model,
                units: &self.units,
                comms: &mut self.comms,
                trace: self.trace.as_ref(),
            };
            total += self
                .executor
                .forward_only(&mut parts, |microbatch, inputs, targets| {
                    for row in 0..inputs.len() / t {
                        let index = sampler.index(batch, microbatch, row);
                        let range = row * t..(row + 1) * t;
                        held_out.sample(index, &mut inputs[range.clone()], &mut targets[range])?;
                    }
                    Ok(())
                })?;
        }
        Ok(total / batches as f64)
    }

    /// Records a span of the rank's compute under `--trace`.
    fn span(&self, name: impl FnOnce() -> String, category: &'static str, start: Instant) {
        if let Some(trace) = &self.trace {
            trace.record(name(), category, trace::COMPUTE, start);
        }
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
        self.executor.data_parallel.finish(&mut self.backend)?;
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
        self.executor.data_parallel.gather_params(
            self.comms.dp.as_mut(),
            &mut self.backend,
            &self.units,
        )?;
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
            val_loss: None,
        })
    }
}

/// Whether the rank at (`dp_rank`, `tp_rank`) counts parameter `spec` of `unit` in the global
/// gradient norm: every element is counted by exactly one rank of the mesh (tensor-parallel
/// replicas by the first, the tied embedding's copy on the last stage not at all, whole
/// data-parallel replicas by the first).
fn counts_in_norm(unit: &Unit, spec: &ParamSpec, dp_rank: usize, tp_rank: usize) -> bool {
    let replicated = spec.split == Split::Replicated;
    let tied_copy = matches!(unit.kind, UnitKind::Head { tied_copy: true })
        && spec.role == Role::TokenEmbedding;
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
    let eval = &config.eval;
    let held_out = if eval.every > 0 {
        Some(Dataset::held_out(
            &config.data,
            eval.path.as_deref(),
            config.model.vocab,
            config.model.seq_len,
            config.training.seed,
        )?)
    } else {
        None
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
        let mut metrics = rank.train_step(&dataset, &sampler)?;
        if let Some(held_out) = &held_out
            && (rank.step.is_multiple_of(eval.every) || rank.step == config.training.steps)
        {
            metrics.val_loss = Some(rank.evaluate(held_out, &sampler)?);
        }
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
