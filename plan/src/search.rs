//! Topology search: every layout that fits, ranked by an analytic step-time model; and the
//! remedies the dry-run offers when a plan does not fit.
//!
//! The search enumerates `(data, tensor, pipeline, virtual_stages, zero, recompute,
//! micro_batch, offload)` for a GPU count, keeps the layouts that config validation accepts
//! (`layout_violations`) and whose exact memory plan fits with headroom, and predicts each
//! one's step time. Sequence parallelism is on whenever tensor > 1 (it saves memory at the same
//! communication volume); the schedule is 1F1B, or interleaved when virtual_stages > 1.
//!
//! # The step-time model
//!
//! All times are per optimizer step on one rank; `m` microbatches per data rank, `N = b T`
//! tokens per microbatch, `a` bytes per activation element, `Ψ` the rank's parameters.
//!
//! - **Compute**: the model's training FLOPs (`6 x params + 12 L H hs T` per token, see
//!   `ModelShape::flops_per_token`: SwiGLU's third matrix and grouped-query attention's narrower
//!   k and v count through the parameters) divided over all ranks, times 4/3 with full recompute
//!   (one more forward), at `Hardware::achievable_flops`; an uneven pipeline split runs at the
//!   pace of its largest stage.
//! - **Selective recompute**: backward re-runs two norms and the MLP's activation per layer,
//!   element-wise passes that read and write `4 n C + 2 N F/t` elements (GELU) or
//!   `4 n C + 3 N F/t` (SwiGLU reads gate and up) at `memory_bandwidth`.
//! - **Tensor parallelism**: per layer and microbatch, forward and backward each move two
//!   all-reduce volumes of `N C a` bytes (with sequence parallelism: all-gathers plus
//!   reduce-scatters of the same total), three with full recompute; an all-reduce over `t`
//!   ranks moves `2 (t - 1)/t` of its size over `intra_node_bandwidth`. Not overlapped.
//! - **Pipeline**: the bubble adds `(p - 1)/(m v)` of compute and tensor time; each microbatch
//!   crosses `v` stage boundaries forward and back with `n C a` bytes (`n = N/t` with sequence
//!   parallelism) at the bandwidth of the link between stages.
//! - **Data parallelism**: gradients reduce-scatter and parameters all-gather over the data
//!   group (`(d - 1)/d` of `2 Ψ` bytes each; ZeRO 2 reduce-scatters once per microbatch, ZeRO 3
//!   also gathers parameters twice per microbatch), at `inter_node_bandwidth` when the group
//!   spans nodes. The last microbatch's backward hides up to its own duration of it.
//! - **Offload**: gradients down and weights up over `pcie_bandwidth`, and the AdamW update on
//!   the host at `host_adam_params_per_s`, neither overlapped.
//! - **Optimizer on device**: reads and writes ~32 bytes per local parameter at
//!   `memory_bandwidth`.
//!
//! Predicted throughput is `global_batch x T / step time`; MFU counts the model's FLOPs
//! (without recompute) against `peak_flops` on every rank.

use crate::config::validate::{Batch, divisors, even_split, layout_violations};
use crate::config::{Config, Device, Precision, Recompute, Schedule, Zero};
use crate::memory::StagePlan;
use crate::mesh::{Axis, Mesh};
use crate::model::ModelShape;

/// What the cost model assumes about the machines. The defaults describe an H100 SXM node
/// (NVLink within a node, one 400 Gb/s NIC per GPU); the CPU defaults a worker process on a
/// few cores over loopback TCP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hardware {
    /// Dense peak FLOP/s of one device in the compute dtype (MFU's denominator).
    pub peak_flops: f64,
    /// FLOP/s a well-tuned transformer reaches on one device.
    pub achievable_flops: f64,
    /// Bus bandwidth of collectives inside a node, bytes/s.
    pub intra_node_bandwidth: f64,
    /// Bus bandwidth of collectives across nodes, bytes/s per device.
    pub inter_node_bandwidth: f64,
    /// Host <-> device copies, bytes/s.
    pub pcie_bandwidth: f64,
    /// Device memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Parameters per second the host AdamW step updates for one device's shard.
    pub host_adam_params_per_s: f64,
}

impl Hardware {
    pub fn for_device(device: Device) -> Hardware {
        match device {
            // H100 SXM: 989 TFLOP/s bf16 dense, ~50% of it reached by tuned stacks; NVLink 4
            // ~360 GB/s of all-reduce bus bandwidth; 400 Gb/s InfiniBand per GPU; PCIe 5 x16;
            // HBM3 3.35 TB/s; DeepSpeed's CPU Adam shares a socket between 8 GPUs.
            Device::Cuda => Hardware {
                peak_flops: 989e12,
                achievable_flops: 495e12,
                intra_node_bandwidth: 360e9,
                inter_node_bandwidth: 45e9,
                pcie_bandwidth: 25e9,
                memory_bandwidth: 3.35e12,
                host_adam_params_per_s: 0.25e9,
            },
            Device::Cpu => Hardware {
                peak_flops: 100e9,
                achievable_flops: 50e9,
                intra_node_bandwidth: 2e9,
                inter_node_bandwidth: 1e9,
                pcie_bandwidth: 10e9,
                memory_bandwidth: 20e9,
                host_adam_params_per_s: 0.25e9,
            },
        }
    }
}

/// One feasible layout and what it is predicted to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub data: usize,
    pub tensor: usize,
    pub pipeline: usize,
    pub virtual_stages: usize,
    pub zero: Zero,
    pub recompute: Recompute,
    pub micro_batch: usize,
    pub offload: bool,
    /// The layout as a config (for the dry-run or a run).
    pub config: Config,
    /// Largest device total over all ranks, bytes.
    pub peak_bytes: u64,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub mfu: f64,
    pub breakdown: StepTime,
}

impl Candidate {
    /// The `--set` arguments that turn the searched config into this layout.
    pub fn overrides(&self) -> Vec<String> {
        let config = &self.config;
        vec![
            format!("parallel.data={}", self.data),
            format!("parallel.tensor={}", self.tensor),
            format!("parallel.pipeline={}", self.pipeline),
            format!("parallel.virtual_stages={}", self.virtual_stages),
            match &config.parallel.pipeline_layers {
                Some(split) => format!("parallel.pipeline_layers={split:?}"),
                None => "parallel.pipeline_layers=[]".into(),
            },
            format!("parallel.schedule={}", config.parallel.schedule),
            format!(
                "parallel.sequence_parallel={}",
                config.parallel.sequence_parallel
            ),
            format!("parallel.zero={}", self.zero.stage()),
            format!("parallel.recompute={}", self.recompute),
            format!("parallel.offload.optimizer={}", self.offload),
            format!("training.micro_batch={}", self.micro_batch),
            format!("cluster.nodes={}", config.cluster.nodes),
            format!("cluster.gpus_per_node={}", config.cluster.gpus_per_node),
        ]
    }
}

/// Predicted seconds per step, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepTime {
    pub compute: f64,
    pub recompute: f64,
    pub tensor: f64,
    pub bubble: f64,
    pub pipeline: f64,
    pub data: f64,
    pub offload: f64,
    pub optimizer: f64,
}

impl StepTime {
    pub fn total(&self) -> f64 {
        self.compute
            + self.recompute
            + self.tensor
            + self.bubble
            + self.pipeline
            + self.data
            + self.offload
            + self.optimizer
    }
}

/// What the search looked at and found.
#[derive(Debug, Clone)]
pub struct SearchResult {
    pub gpus: usize,
    /// Layouts that passed validation (fitting or not).
    pub valid: usize,
    /// Fitting layouts, fastest first.
    pub fitting: Vec<Candidate>,
    /// When nothing fits: the valid layout with the smallest peak, to explain why.
    pub smallest: Option<Candidate>,
}

/// Largest micro_batch and virtual_stages the search tries.
const MAX_MICRO_BATCH: usize = 64;
const MAX_VIRTUAL_STAGES: usize = 8;

/// Every layout of `base`'s model and batch on `gpus` devices of `gpu_memory` bytes (nodes of
/// `base.cluster.gpus_per_node`, or one partial node when `gpus` is smaller), fastest first.
pub fn search(base: &Config, gpus: usize, gpu_memory: u64, hardware: &Hardware) -> SearchResult {
    let per_node = base.cluster.gpus_per_node.min(gpus).max(1);
    let mut result = SearchResult {
        gpus,
        valid: 0,
        fitting: Vec::new(),
        smallest: None,
    };
    if gpus == 0 || !gpus.is_multiple_of(per_node) {
        return result;
    }
    let mut cluster = base.cluster.clone();
    cluster.nodes = gpus / per_node;
    cluster.gpus_per_node = per_node;
    cluster.gpu_memory = gpu_memory;
    let usable = cluster.usable_memory();

    for tensor in divisors(per_node) {
        for pipeline in divisors(gpus / tensor) {
            let data = gpus / (tensor * pipeline);
            let per_rank = base.training.global_batch / data;
            for micro_batch in divisors(per_rank.max(1))
                .into_iter()
                .filter(|&b| b <= MAX_MICRO_BATCH)
            {
                if pipeline > base.model.layers {
                    continue;
                }
                // Layers that do not divide over the stages are split unevenly (one chunk
                // per stage), the earlier stages taking one more, as Megatron does.
                let even = base.model.layers.is_multiple_of(pipeline);
                let split = (!even).then(|| even_split(base.model.layers, pipeline));
                let chunks = if pipeline == 1 || !even {
                    vec![1]
                } else {
                    divisors(base.model.layers / pipeline)
                };
                for virtual_stages in chunks.into_iter().filter(|&v| v <= MAX_VIRTUAL_STAGES) {
                    for zero in Zero::ALL {
                        if data == 1 && zero != Zero::Off {
                            continue; // ZeRO shards across data ranks: nothing to shard.
                        }
                        for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
                            for offload in [false, true] {
                                let mut config = base.clone();
                                config.cluster = cluster.clone();
                                config.training.micro_batch = micro_batch;
                                config.parallel.data = data;
                                config.parallel.tensor = tensor;
                                config.parallel.pipeline = pipeline;
                                config.parallel.virtual_stages = virtual_stages;
                                config.parallel.pipeline_layers = split.clone();
                                config.parallel.schedule = if virtual_stages > 1 {
                                    Schedule::Interleaved
                                } else {
                                    Schedule::OneFOneB
                                };
                                config.parallel.sequence_parallel = tensor > 1;
                                config.parallel.zero = zero;
                                config.parallel.recompute = recompute;
                                config.parallel.offload.optimizer = offload;
                                if !is_valid(&config) {
                                    continue;
                                }
                                result.valid += 1;
                                let peak = peak_bytes(&config);
                                let fits = peak <= usable;
                                if !fits
                                    && result
                                        .smallest
                                        .as_ref()
                                        .is_some_and(|s| s.peak_bytes <= peak)
                                {
                                    continue;
                                }
                                let candidate = evaluate(config, peak, hardware);
                                if fits {
                                    result.fitting.push(candidate);
                                } else {
                                    result.smallest = Some(candidate);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    result.fitting.sort_by(|a, b| {
        b.tokens_per_second
            .total_cmp(&a.tokens_per_second)
            .then(a.peak_bytes.cmp(&b.peak_bytes))
    });
    if !result.fitting.is_empty() {
        result.smallest = None;
    }
    result
}

fn is_valid(config: &Config) -> bool {
    let batch = Batch {
        global: config.training.global_batch,
        micro: config.training.micro_batch,
    };
    layout_violations(
        &config.model,
        &config.parallel,
        batch,
        config.cluster.nodes,
        config.cluster.gpus_per_node,
    )
    .is_empty()
}

/// The largest device total of any rank. The first and last stage bound every other one (the
/// first holds the most microbatches and the embedding, the last the head; middle stages hold
/// only layers), which a property test of `memory` checks.
pub fn peak_bytes(config: &Config) -> u64 {
    let first = StagePlan::new(config, 0).device_bytes();
    let last_stage = config.parallel.pipeline - 1;
    if last_stage == 0 {
        return first;
    }
    first.max(StagePlan::new(config, last_stage).device_bytes())
}

/// Predicts a layout's step time (see the module docs for the model).
pub fn evaluate(config: Config, peak_bytes: u64, hardware: &Hardware) -> Candidate {
    let parallel = &config.parallel;
    let shape = ModelShape::new(&config.model, parallel.tensor);
    let mesh = Mesh::from_config(&config);
    let world = mesh.world_size() as f64;
    let (t, p, d, v) = (
        parallel.tensor as f64,
        parallel.pipeline as f64,
        parallel.data as f64,
        parallel.virtual_stages as f64,
    );
    let m = config.microbatches() as f64;
    let tokens = (config.training.micro_batch * config.model.seq_len) as f64;
    let act_bytes = config.training.precision.bytes() as f64;
    let hidden = config.model.hidden as f64;
    // The stage with the most layers sets the pace (uneven splits give the first ones more).
    let layers_per_rank = (0..parallel.pipeline)
        .map(|s| {
            parallel
                .stage_layers(config.model.layers, s)
                .iter()
                .map(|r| r.len())
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0) as f64;
    let slowest_stage = layers_per_rank / (config.model.layers as f64 / p);

    let model_flops = shape.flops_per_token() * config.tokens_per_step() as f64;
    let recompute_factor = if parallel.recompute == Recompute::Full {
        4.0 / 3.0
    } else {
        1.0
    };
    let compute =
        model_flops * recompute_factor * slowest_stage / world / hardware.achievable_flops;
    let held = if parallel.sequence_sharded() {
        tokens / t
    } else {
        tokens
    };
    let recompute = if parallel.recompute == Recompute::Selective {
        let ffn_local = config.model.ffn_hidden as f64 / t;
        // Two norms read and write the residual stream; GELU reads and writes the MLP's
        // width, SwiGLU reads twice it (gate and up) and writes it.
        let mlp = match config.model.arch {
            crate::config::Arch::Gpt2 => 2.0,
            crate::config::Arch::Llama => 3.0,
        };
        let elements = 2.0 * 2.0 * held * hidden + mlp * tokens * ffn_local;
        layers_per_rank * m * elements * act_bytes / hardware.memory_bandwidth
    } else {
        0.0
    };

    let all_reduce = |bytes: f64, ranks: f64, bandwidth: f64| {
        if ranks <= 1.0 {
            0.0
        } else {
            2.0 * (ranks - 1.0) / ranks * bytes / bandwidth
        }
    };
    let collectives_per_layer = if parallel.recompute == Recompute::Full {
        6.0
    } else {
        4.0
    };
    let tensor = collectives_per_layer
        * layers_per_rank
        * m
        * all_reduce(
            tokens * hidden * act_bytes,
            t,
            hardware.intra_node_bandwidth,
        );
    let bubble = (p - 1.0) / (m * v) * (compute + recompute + tensor);

    let stage_link = if mesh.nodes_spanned(Axis::Pipeline) > 1 {
        hardware.inter_node_bandwidth
    } else {
        hardware.intra_node_bandwidth
    };
    let pipeline = if p > 1.0 {
        2.0 * m * v * held * hidden * act_bytes / stage_link
    } else {
        0.0
    };

    let psi = StagePlan::new(&config, 0).params as f64;
    let grad_bytes = psi * act_bytes;
    let data_link = if mesh.nodes_spanned(Axis::Data) > 1 {
        hardware.inter_node_bandwidth
    } else {
        hardware.intra_node_bandwidth
    };
    let one_way = |bytes: f64| {
        if d <= 1.0 {
            0.0
        } else {
            (d - 1.0) / d * bytes / data_link
        }
    };
    let data_volume = match parallel.zero {
        Zero::Off | Zero::Optimizer => 2.0 * one_way(grad_bytes),
        Zero::Gradients => m * one_way(grad_bytes) + one_way(grad_bytes),
        Zero::Parameters => m * 3.0 * one_way(grad_bytes),
    };
    let last_backward = (compute + recompute + tensor) / m * 2.0 / 3.0;
    let data = (data_volume - last_backward).max(0.0);

    let shard = if parallel.zero >= Zero::Optimizer {
        psi / d
    } else {
        psi
    };
    let (offload, optimizer) = if parallel.offload.optimizer {
        let transfers = 2.0 * shard * act_bytes / hardware.pcie_bandwidth;
        (transfers + shard / hardware.host_adam_params_per_s, 0.0)
    } else {
        let bytes_per_param = if config.training.precision == Precision::Fp32 {
            28.0
        } else {
            32.0
        };
        (0.0, shard * bytes_per_param / hardware.memory_bandwidth)
    };

    let breakdown = StepTime {
        compute,
        recompute,
        tensor,
        bubble,
        pipeline,
        data,
        offload,
        optimizer,
    };
    let step_seconds = breakdown.total();
    Candidate {
        data: parallel.data,
        tensor: parallel.tensor,
        pipeline: parallel.pipeline,
        virtual_stages: parallel.virtual_stages,
        zero: parallel.zero,
        recompute: parallel.recompute,
        micro_batch: config.training.micro_batch,
        offload: parallel.offload.optimizer,
        peak_bytes,
        step_seconds,
        tokens_per_second: config.tokens_per_step() as f64 / step_seconds,
        mfu: model_flops / step_seconds / (world * hardware.peak_flops),
        breakdown,
        config,
    }
}

/// A change to a config that does not fit, and the peak it leads to.
#[derive(Debug, Clone, PartialEq)]
pub struct Remedy {
    /// `key=value` settings, as for `--set`.
    pub changes: Vec<String>,
    pub peak_bytes: u64,
    pub fits: bool,
}

/// Changes that lower the peak of `config`, each evaluated with the exact plan: more
/// recompute, a higher ZeRO stage, optimizer offload, a smaller micro_batch, more pipeline or
/// tensor stages (taken from the data degree). Fitting remedies come first, smallest peak
/// first; when no single change fits, the greedy combination of the best ones is added.
pub fn remedies(config: &Config) -> Vec<Remedy> {
    let usable = config.cluster.usable_memory();
    let mut found: Vec<Remedy> = single_changes(config)
        .into_iter()
        .map(|(changes, changed)| {
            let peak = peak_bytes(&changed);
            Remedy {
                changes,
                peak_bytes: peak,
                fits: peak <= usable,
            }
        })
        .filter(|r| r.peak_bytes < peak_bytes(config))
        .collect();
    found.sort_by(|a, b| b.fits.cmp(&a.fits).then(a.peak_bytes.cmp(&b.peak_bytes)));
    if !found.iter().any(|r| r.fits) {
        let mut current = config.clone();
        let mut changes = Vec::new();
        let mut peak = peak_bytes(config);
        while peak > usable {
            let best = single_changes(&current)
                .into_iter()
                .map(|(change, changed)| (peak_bytes(&changed), change, changed))
                .min_by_key(|(p, ..)| *p);
            match best {
                Some((next_peak, change, changed)) if next_peak < peak => {
                    changes.extend(change);
                    current = changed;
                    peak = next_peak;
                }
                _ => break,
            }
        }
        if changes.len() > 1 || (peak <= usable && !changes.is_empty()) {
            found.insert(
                0,
                Remedy {
                    changes,
                    peak_bytes: peak,
                    fits: peak <= usable,
                },
            );
        }
    }
    found
}

/// Each single memory-saving change that keeps the layout valid.
fn single_changes(config: &Config) -> Vec<(Vec<String>, Config)> {
    let parallel = &config.parallel;
    let mut out = Vec::new();
    let mut try_change = |changes: Vec<String>, edit: &dyn Fn(&mut Config)| {
        let mut changed = config.clone();
        edit(&mut changed);
        if is_valid(&changed) {
            out.push((changes, changed));
        }
    };
    for mode in [Recompute::Selective, Recompute::Full] {
        if mode > parallel.recompute {
            try_change(vec![format!("parallel.recompute={mode}")], &|c| {
                c.parallel.recompute = mode
            });
        }
    }
    if parallel.data > 1 {
        for stage in Zero::ALL.into_iter().filter(|&z| z > parallel.zero) {
            try_change(vec![format!("parallel.zero={}", stage.stage())], &|c| {
                c.parallel.zero = stage
            });
        }
    }
    if !parallel.offload.optimizer {
        try_change(vec!["parallel.offload.optimizer=true".into()], &|c| {
            c.parallel.offload.optimizer = true
        });
    }
    if config.training.micro_batch > 1 {
        let half = config.training.micro_batch / 2;
        try_change(vec![format!("training.micro_batch={half}")], &|c| {
            c.training.micro_batch = half
        });
    }
    if parallel.data.is_multiple_of(2) {
        let (data, pipeline) = (parallel.data / 2, parallel.pipeline * 2);
        try_change(
            vec![
                format!("parallel.pipeline={pipeline}"),
                format!("parallel.data={data}"),
            ],
            &|c| {
                c.parallel.pipeline = pipeline;
                c.parallel.data = data;
            },
        );
        let tensor = parallel.tensor * 2;
        try_change(
            vec![
                format!("parallel.tensor={tensor}"),
                format!("parallel.data={data}"),
                "parallel.sequence_parallel=true".into(),
            ],
            &|c| {
                c.parallel.tensor = tensor;
                c.parallel.data = data;
                c.parallel.sequence_parallel = true;
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt3() -> Config {
        Config::from_yaml("175b.yaml", include_str!("../../configs/175b.yaml"), &[]).unwrap()
    }

    fn small(sets: &[&str]) -> Config {
        let text = "model: {layers: 24, hidden: 2048, heads: 16, seq_len: 1024}\n\
                    training: {global_batch: 512, micro_batch: 4, steps: 10}\n\
                    cluster: {nodes: 1, gpus_per_node: 8}\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_yaml("t.yaml", text, &sets).unwrap()
    }

    #[test]
    fn every_plan_the_search_returns_fits_and_validates() {
        let config = gpt3();
        let hardware = Hardware::for_device(Device::Cuda);
        let result = search(&config, 1024, 80 << 30, &hardware);
        assert!(!result.fitting.is_empty());
        let usable = config.cluster.usable_memory();
        for candidate in &result.fitting {
            assert!(is_valid(&candidate.config));
            let plan = crate::memory::MemoryPlan::new(&candidate.config);
            assert_eq!(
                plan.peak_bytes(),
                candidate.peak_bytes,
                "the search's peak is the full plan's peak"
            );
            assert!(candidate.peak_bytes <= usable);
            assert_eq!(candidate.data * candidate.tensor * candidate.pipeline, 1024);
        }
        for pair in result.fitting.windows(2) {
            assert!(pair[0].tokens_per_second >= pair[1].tokens_per_second);
        }
    }

    #[test]
    fn the_cost_model_prefers_what_megatron_found_for_gpt3() {
        let result = search(&gpt3(), 1024, 80 << 30, &Hardware::for_device(Device::Cuda));
        let best = &result.fitting[0];
        // Tensor parallelism stays inside the node and the MFU is plausible for this size.
        assert!(best.tensor <= 8);
        assert!(best.mfu > 0.2 && best.mfu < 0.55, "mfu {}", best.mfu);
        let total: f64 = best.breakdown.total();
        assert!((total - best.step_seconds).abs() < 1e-12);
    }

    #[test]
    fn gpt3_on_one_node_does_not_fit_and_says_why() {
        let result = search(&gpt3(), 8, 80 << 30, &Hardware::for_device(Device::Cuda));
        assert!(result.fitting.is_empty());
        assert!(result.valid > 0);
        let smallest = result
            .smallest
            .expect("the smallest layout explains the failure");
        // Even ZeRO-3 over 8 GPUs leaves 16 x 175B / 8 bytes of model state per GPU.
        assert!(smallest.peak_bytes > 80 << 30);
    }

    #[test]
    fn more_bandwidth_never_predicts_a_slower_step() {
        let config = small(&["parallel.data=2", "parallel.tensor=4", "parallel.zero=1"]);
        let base = Hardware::for_device(Device::Cuda);
        let slow = evaluate(config.clone(), 0, &base);
        let faster = Hardware {
            intra_node_bandwidth: base.intra_node_bandwidth * 2.0,
            ..base
        };
        assert!(evaluate(config, 0, &faster).step_seconds < slow.step_seconds);
    }

    #[test]
    fn recomputing_costs_time() {
        let hardware = Hardware::for_device(Device::Cuda);
        let time = |mode: &str| {
            evaluate(
                small(&["parallel.data=8", &format!("parallel.recompute={mode}")]),
                0,
                &hardware,
            )
            .step_seconds
        };
        assert!(time("none") < time("selective"));
        assert!(time("selective") < time("full"));
    }

    #[test]
    fn the_bubble_follows_p_minus_1_over_m_v() {
        let config = small(&[
            "parallel.pipeline=4",
            "parallel.data=2",
            "training.micro_batch=4",
        ]);
        let candidate = evaluate(config.clone(), 0, &Hardware::for_device(Device::Cuda));
        let m = config.microbatches() as f64;
        let t = &candidate.breakdown;
        let expected = 3.0 / m * (t.compute + t.recompute + t.tensor);
        assert!((candidate.breakdown.bubble - expected).abs() < 1e-12);
    }

    #[test]
    fn remedies_are_valid_lower_and_fitting_first() {
        // 1.3B with bf16 Adam on one 8 GiB device does not fit; offload or ZeRO must help.
        let config = small(&[
            "parallel.data=8",
            "cluster.gpu_memory=12GiB",
            "training.micro_batch=8",
            "training.global_batch=512",
        ]);
        let before = peak_bytes(&config);
        assert!(before > config.cluster.usable_memory());
        let found = remedies(&config);
        assert!(!found.is_empty());
        for remedy in &found {
            assert!(remedy.peak_bytes < before);
            let sets: Vec<String> = remedy.changes.clone();
            let text = "model: {layers: 24, hidden: 2048, heads: 16, seq_len: 1024}\ntraining: {global_batch: 512, micro_batch: 8, steps: 10}\ncluster: {nodes: 1, gpus_per_node: 8, gpu_memory: 12GiB}\nparallel: {data: 8}\n";
            let applied = Config::from_yaml("t.yaml", text, &sets)
                .unwrap_or_else(|e| panic!("{sets:?}: {e}"));
            assert_eq!(peak_bytes(&applied), remedy.peak_bytes, "{sets:?}");
        }
        let first_unfit = found.iter().position(|r| !r.fits).unwrap_or(found.len());
        assert!(found[first_unfit..].iter().all(|r| !r.fits));
    }

    fn deepseek() -> Config {
        Config::from_yaml(
            "deepseek-67b.yaml",
            include_str!("../../configs/deepseek-67b.yaml"),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn layers_that_do_not_divide_are_split_unevenly_and_kv_heads_bound_the_tensor_degree() {
        let base = deepseek();
        let hardware = Hardware::for_device(Device::Cuda);
        let result = search(&base, 256, 80 << 30, &hardware);
        let uneven: Vec<&Candidate> = result
            .fitting
            .iter()
            .filter(|c| c.config.parallel.pipeline_layers.is_some())
            .collect();
        assert!(!uneven.is_empty(), "95 layers over 2, 4 or 8 stages");
        for candidate in &uneven {
            let split = candidate.config.parallel.pipeline_layers.as_ref().unwrap();
            assert_eq!(split.len(), candidate.pipeline);
            assert_eq!(split.iter().sum::<usize>(), 95);
            assert!(split.iter().max().unwrap() - split.iter().min().unwrap() <= 1);
            // The overrides reproduce the layout from the searched config.
            let sets = candidate.overrides();
            let text = include_str!("../../configs/deepseek-67b.yaml");
            let again = Config::from_yaml("deepseek-67b.yaml", text, &sets).unwrap();
            assert_eq!(again.parallel, candidate.config.parallel);
        }
        // 8 key/value heads: no tensor degree above 8 (and none that does not divide 8).
        assert!(result.fitting.iter().all(|c| 8 % c.tensor == 0));
        let two_kv = Config {
            model: crate::config::Model {
                kv_heads: 2,
                ..base.model.clone()
            },
            ..base.clone()
        };
        let result = search(&two_kv, 256, 80 << 30, &hardware);
        assert!(!result.fitting.is_empty());
        assert!(result.fitting.iter().all(|c| c.tensor <= 2), "kv_heads 2");
    }

    #[test]
    fn an_uneven_split_is_as_slow_as_its_largest_stage() {
        let base = deepseek();
        let hardware = Hardware::for_device(Device::Cuda);
        let mut even = base.clone();
        even.model.layers = 96;
        even.parallel.pipeline_layers = None;
        let (a, b) = (
            evaluate(base.clone(), 0, &hardware),
            evaluate(even, 0, &hardware),
        );
        // 95 layers as 24+24+24+23 compute as long as 96 as 4 x 24 (the slowest stage
        // sets the pace), less the one layer's share of the head and embedding.
        assert!((a.breakdown.compute / b.breakdown.compute - 1.0).abs() < 0.01);
    }
}
