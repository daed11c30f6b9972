//! The training loop of one rank: microbatches through the model as the pipeline schedule
//! orders them, then the optimizer step, metrics and checkpoints.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::model::{ModelShape, Unit as UnitKind};
use tessera_plan::schedule::{Op, PipelineSchedule};

use crate::arena::ArenaLayout;
use crate::checkpoint;
use crate::data::{Dataset, Sampler};
use crate::error::{Error, Result};
use crate::model::init::initial_values;
use crate::model::{Gpt, Unit, units};
use crate::optim::Optimizer;
use crate::parallel::Comms;
use crate::parallel::data::{DataParallel, sum_over_group};
use crate::tensor::Backend;

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
    /// Device bytes this rank allocated: the arena, fixed for the whole run.
    pub peak_bytes: u64,
}

/// One rank's model, optimizer and buffers.
pub struct Rank<B: Backend> {
    pub config: Config,
    pub backend: B,
    pub layout: ArenaLayout,
    pub stage: StagePlan,
    pub units: Vec<Unit>,
    pub model: Gpt,
    pub optimizer: Optimizer,
    pub comms: Comms,
    data_parallel: DataParallel,
    ops: Vec<Op>,
    slots: usize,
    /// Steps completed so far (the next step to run is `step`).
    pub step: u64,
    /// Host staging for one microbatch's token ids and targets.
    inputs: Vec<i32>,
    targets: Vec<i32>,
}

/// Fails unless the mesh is one this build's worker trains: data parallelism only (tensor and
/// pipeline parallelism arrive with issue 6).
pub fn check_supported_mesh(config: &Config) -> Result<()> {
    let p = &config.parallel;
    if p.tensor != 1 || p.pipeline != 1 {
        return Err(Error::Unsupported {
            what: format!(
                "this build's worker trains data-parallel meshes only, but the config has tensor {} x pipeline {}",
                p.tensor, p.pipeline
            ),
            help: format!(
                "add --set parallel.tensor=1 --set parallel.pipeline=1 (and e.g. --set parallel.data={}); \
                 tensor and pipeline parallelism arrive with issue 6",
                p.world_size()
            ),
        });
    }
    Ok(())
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
        check_supported_mesh(&config)?;
        let stage = StagePlan::new(&config, 0);
        let layout = ArenaLayout::new(&stage);
        for place in [Place::Device, Place::Host] {
            assert_eq!(
                backend.arena_bytes(place),
                layout.bytes(place),
                "invariant: the backend allocated the planned arena"
            );
        }
        let units = units(&layout, &config, &stage, comms.dp_rank())?;
        let model = Gpt::new(&layout, &config, &stage, &units)?;
        let training = &config.training;
        let optimizer = Optimizer::new(
            training.optimizer.clone(),
            training.steps,
            training.precision,
        );
        let schedule = PipelineSchedule::new(
            config.parallel.schedule,
            1,
            config.parallel.virtual_stages,
            config.microbatches(),
        );
        let tokens = training.micro_batch * config.model.seq_len;
        Ok(Rank {
            ops: schedule.ops[0].clone(),
            slots: stage.in_flight.total,
            stage,
            layout,
            units,
            model,
            optimizer,
            data_parallel: DataParallel::new(config.parallel.zero),
            comms,
            backend,
            step: 0,
            inputs: vec![0; tokens],
            targets: vec![0; tokens],
            config,
        })
    }

    /// Writes the initial weights (and master weights) of every unit; the moments and
    /// gradients are already 0.
    pub fn initialize(&mut self) -> Result<()> {
        let shape = ModelShape::new(&self.config.model, self.config.parallel.tensor);
        for unit in &self.units {
            for placed in &unit.layout.params {
                let values =
                    initial_values(placed, unit.layer, &shape, 0, self.config.training.seed);
                let name = placed.spec.name;
                self.backend.write(unit.view(unit.params, name), &values)?;
                if let (Some(master), Some(range)) = (unit.master, unit.shard_of(name)) {
                    let offset = placed.offset as usize;
                    let part = &values[range.start - offset..range.end - offset];
                    self.backend.write(unit.state_view(master, &range), part)?;
                }
            }
        }
        Ok(())
    }

    /// Forward and backward of every microbatch of step `self.step`; returns the mean loss.
    /// `fill(microbatch, inputs, targets)` provides each microbatch's token ids and targets
    /// (`micro_batch x seq_len` each). Gradients accumulate in the arena.
    pub fn forward_backward(
        &mut self,
        mut fill: impl FnMut(usize, &mut [i32], &mut [i32]) -> Result<()>,
    ) -> Result<f64> {
        let t = self.config.model.seq_len;
        let tokens_per_step = (self.config.training.global_batch * t) as f64;
        let dloss = (self.optimizer.loss_scale.scale as f64 / tokens_per_step) as f32;
        let mut loss = 0.0;
        let mut microbatches = 0;
        let last_backward = self
            .ops
            .iter()
            .rposition(|op| matches!(op, Op::Backward { .. }));
        for i in 0..self.ops.len() {
            match self.ops[i] {
                Op::Forward { microbatch, .. } => {
                    fill(microbatch, &mut self.inputs, &mut self.targets)?;
                    let slot = microbatch % self.slots;
                    if let Some(tokens) = self.model.tokens(slot) {
                        self.backend.write_i32(tokens, &self.inputs)?;
                    }
                    if let Some(targets) = self.model.targets() {
                        self.backend.write_i32(targets, &self.targets)?;
                    }
                    loss += self.model.forward(&mut self.backend, slot, dloss)?;
                    microbatches += 1;
                }
                Op::Backward { microbatch, .. } if Some(i) == last_backward => {
                    self.last_backward(microbatch % self.slots)?;
                }
                Op::Backward { microbatch, .. } => {
                    self.model
                        .backward(&mut self.backend, microbatch % self.slots)?;
                }
            }
        }
        let tokens = (microbatches * self.inputs.len()) as f64;
        let global = sum_over_group(self.comms.dp.as_mut(), loss / tokens)?;
        Ok(global / self.comms.dp.group().size() as f64)
    }

    /// The step's last backward, piece by piece: each unit's gradients start their
    /// data-parallel reduction as soon as they are final, while the layers below compute.
    fn last_backward(&mut self, slot: usize) -> Result<()> {
        let first_layer = usize::from(self.units[0].kind == UnitKind::Embedding);
        let (dp, comm) = (&mut self.data_parallel, self.comms.dp.as_mut());
        // The head's gradients were finished by the last forward.
        for unit in self
            .units
            .iter()
            .filter(|u| matches!(u.kind, UnitKind::Head { .. }))
        {
            dp.reduce(comm, &self.backend, unit)?;
        }
        self.model.backward_begin(&mut self.backend, slot)?;
        for l in (0..self.model.layers()).rev() {
            self.model.backward_layer(&mut self.backend, slot, l)?;
            dp.reduce(comm, &self.backend, &self.units[first_layer + l])?;
        }
        self.model.backward_end(&mut self.backend, slot)?;
        if first_layer == 1 {
            dp.reduce(comm, &self.backend, &self.units[0])?;
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
        self.data_parallel.finish()?;
        let local = self.optimizer.sum_squares(
            &mut self.backend,
            &self.units,
            self.model.norm_partials(),
        )?;
        let comm = self.comms.dp.as_mut();
        let norm = self.data_parallel.total_sum_squares(comm, local)?.sqrt();
        let report = self
            .optimizer
            .step(&mut self.backend, &self.units, self.step, norm)?;
        self.data_parallel
            .gather_params(comm, &self.backend, &self.units)?;
        self.step += 1;
        let seconds = start.elapsed().as_secs_f64();
        let tokens = self.config.tokens_per_step() as f64;
        Ok(StepMetrics {
            step: self.step,
            loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens_per_s: tokens / seconds.max(1e-9),
            mfu: None,
            peak_bytes: self.layout.bytes(Place::Device) as u64,
        })
    }
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
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub resumed_from: Option<PathBuf>,
    pub first_step: u64,
    pub metrics: Vec<StepMetrics>,
}

/// Trains one rank to `training.steps` (or `until_step`): resumes from the newest checkpoint
/// in `checkpoint.dir` unless `fresh`, saves every `checkpoint.every` steps and at the end,
/// and calls `on_step` after each step.
pub fn run<B: Backend>(
    mut rank: Rank<B>,
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
    let resumed_from = if options.fresh {
        None
    } else {
        checkpoint::latest(&dir)?
    };
    match &resumed_from {
        Some(path) => {
            let manifest =
                checkpoint::load(path, &config, &mut rank.backend, &rank.units, &rank.comms)?;
            rank.step = manifest.step;
            rank.optimizer.loss_scale = manifest.loss_scale;
        }
        None => rank.initialize()?,
    }
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
        let every = config.checkpoint.every;
        if every > 0 && (rank.step.is_multiple_of(every) || rank.step == config.training.steps) {
            checkpoint::save(
                &dir,
                rank.step,
                &config,
                &rank.backend,
                &rank.units,
                rank.optimizer.loss_scale,
                &mut rank.comms,
            )?;
            if rank.comms.rank == 0 {
                checkpoint::prune(&dir, config.checkpoint.keep)?;
            }
        }
        on_step(&rank, &metrics);
        all.push(metrics);
    }
    Ok(Summary {
        resumed_from,
        first_step,
        metrics: all,
    })
}
