//! `launch search`: the layouts that fit N GPUs, fastest first.

use std::fmt::Write as _;

use serde::Serialize;
use tessera_plan::bytes::{format_size, parse_size};
use tessera_plan::config::MAX_RANKS;
use tessera_plan::model::ModelShape;
use tessera_plan::search::{Candidate, Hardware, SearchResult, search};

use crate::cli::{Format, SearchArgs};
use crate::config_file;
use crate::dryrun::thousands;
use crate::exit::Failure;

pub fn run(args: &SearchArgs) -> Result<(), Failure> {
    let loaded = config_file::load(args.job.config.as_deref(), &args.job.sets)?;
    let config = &loaded.config;
    let per_node = config.cluster.gpus_per_node;
    if args.gpus == 0 || args.gpus > MAX_RANKS {
        return Err(Failure::usage(format!(
            "--gpus must be between 1 and {MAX_RANKS}"
        )));
    }
    if args.gpus > per_node && !args.gpus.is_multiple_of(per_node) {
        return Err(Failure::usage(format!(
            "--gpus {} does not fill whole nodes of cluster.gpus_per_node ({per_node}); use a multiple of {per_node}, or --set cluster.gpus_per_node=...",
            args.gpus
        )));
    }
    let gpu_memory = match &args.gpu_memory {
        Some(text) => parse_size(text).map_err(|e| Failure::usage(format!("--gpu-memory: {e}")))?,
        None => config.cluster.gpu_memory,
    };
    let mut hardware = Hardware::for_device(config.cluster.device);
    if let Some(tflops) = args.peak_tflops {
        hardware.peak_flops = tflops * 1e12;
    }
    if let Some(tflops) = args.achievable_tflops {
        hardware.achievable_flops = tflops * 1e12;
    }
    if let Some(gbps) = args.intra_node_gbps {
        hardware.intra_node_bandwidth = gbps * 1e9;
    }
    if let Some(gbps) = args.inter_node_gbps {
        hardware.inter_node_bandwidth = gbps * 1e9;
    }
    for (flag, value) in [
        ("--peak-tflops", hardware.peak_flops),
        ("--achievable-tflops", hardware.achievable_flops),
        ("--intra-node-gbps", hardware.intra_node_bandwidth),
        ("--inter-node-gbps", hardware.inter_node_bandwidth),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(Failure::usage(format!("{flag} must be a positive number")));
        }
    }
    let result = search(config, args.gpus, gpu_memory, &hardware);
    let usable = (gpu_memory as f64 * (1.0 - config.cluster.headroom)).floor() as u64;
    let output = match args.format {
        Format::Table => table(&loaded.name, args, &result, gpu_memory, usable, &hardware),
        Format::Json => {
            let top: Vec<JsonCandidate> = result
                .fitting
                .iter()
                .take(args.top)
                .map(JsonCandidate::from)
                .collect();
            let json = JsonSearch {
                gpus: args.gpus,
                gpu_memory_bytes: gpu_memory,
                usable_bytes: usable,
                valid_layouts: result.valid,
                fitting_layouts: result.fitting.len(),
                best: top,
            };
            serde_json::to_string_pretty(&json).map_err(anyhow::Error::from)? + "\n"
        }
    };
    print!("{output}");
    if result.fitting.is_empty() {
        return Err(Failure::DoesNotFit(no_fit_reason(
            &result, gpu_memory, usable, config,
        )));
    }
    Ok(())
}

fn table(
    name: &str,
    args: &SearchArgs,
    result: &SearchResult,
    gpu_memory: u64,
    usable: u64,
    hardware: &Hardware,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tessera search: {name} on {} devices of {} ({} usable per device)",
        args.gpus,
        format_size(gpu_memory),
        format_size(usable)
    );
    let _ = writeln!(
        out,
        "checked {} valid layouts; {} fit.",
        thousands(result.valid as u64),
        thousands(result.fitting.len() as u64)
    );
    if result.fitting.is_empty() {
        return out;
    }
    let shown = result.fitting.len().min(args.top);
    let _ = writeln!(
        out,
        "The {shown} fastest by the step-time model (plan::search):\n"
    );
    let mut rows = vec![
        [
            "#",
            "data",
            "tensor",
            "pipeline",
            "chunks",
            "zero",
            "recompute",
            "micro",
            "offload",
            "tokens/s",
            "MFU",
            "step s",
            "peak",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>(),
    ];
    for (i, c) in result.fitting.iter().take(shown).enumerate() {
        rows.push(vec![
            (i + 1).to_string(),
            c.data.to_string(),
            c.tensor.to_string(),
            c.pipeline.to_string(),
            c.virtual_stages.to_string(),
            c.zero.stage().to_string(),
            c.recompute.to_string(),
            c.micro_batch.to_string(),
            if c.offload { "yes".into() } else { "no".into() },
            thousands(c.tokens_per_second.round() as u64),
            format!("{:.1}%", c.mfu * 100.0),
            format!("{:.3}", c.step_seconds),
            format_size(c.peak_bytes),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
    }
    let best = &result.fitting[0];
    let t = &best.breakdown;
    let _ = writeln!(
        out,
        "\n#1 per step: compute {:.3}s, recompute {:.3}s, tensor comm {:.3}s, pipeline bubble {:.3}s, pipeline transfers {:.3}s, exposed data comm {:.3}s, offload {:.3}s, optimizer {:.3}s",
        t.compute, t.recompute, t.tensor, t.bubble, t.pipeline, t.data, t.offload, t.optimizer
    );
    let _ = writeln!(
        out,
        "assumed: {:.0} TFLOP/s peak, {:.0} achievable; {:.0} GB/s inside a node, {:.0} GB/s across nodes (see --help to change)",
        hardware.peak_flops / 1e12,
        hardware.achievable_flops / 1e12,
        hardware.intra_node_bandwidth / 1e9,
        hardware.inter_node_bandwidth / 1e9
    );
    let sets: Vec<String> = best
        .overrides()
        .iter()
        .map(|s| format!("--set {s}"))
        .collect();
    let _ = writeln!(
        out,
        "plan #1 in full: launch --config {name} --dry-run {}",
        sets.join(" ")
    );
    out
}

/// Why nothing fits: the layout that came closest and what model states alone need.
fn no_fit_reason(
    result: &SearchResult,
    gpu_memory: u64,
    usable: u64,
    config: &tessera_plan::Config,
) -> String {
    let params = ModelShape::new(&config.model, 1).total_params();
    let states = 16 * params;
    let mut reason = format!(
        "no layout fits {} devices of {} ({} usable)",
        result.gpus,
        format_size(gpu_memory),
        format_size(usable)
    );
    if let Some(smallest) = &result.smallest {
        let _ = write!(
            reason,
            "; the smallest peak, {}, is data {} x tensor {} x pipeline {} with ZeRO-{}, {} recompute, micro_batch {}{}",
            format_size(smallest.peak_bytes),
            smallest.data,
            smallest.tensor,
            smallest.pipeline,
            smallest.zero.stage(),
            smallest.recompute,
            smallest.micro_batch,
            if smallest.offload {
                " and optimizer offload"
            } else {
                ""
            }
        );
    } else if result.valid == 0 {
        reason.push_str("; no data x tensor x pipeline split of this GPU count is valid for the model and batch (check heads, layers and global_batch divisibility)");
    }
    let needed = states.div_ceil(usable.max(1));
    let _ = write!(
        reason,
        ". Parameters, gradients and Adam states alone take 16 bytes per parameter: {} for {} parameters, so at least {needed} devices of this size without offload",
        format_size(states),
        thousands(params)
    );
    reason
}

#[derive(Serialize)]
struct JsonSearch {
    gpus: usize,
    gpu_memory_bytes: u64,
    usable_bytes: u64,
    valid_layouts: usize,
    fitting_layouts: usize,
    best: Vec<JsonCandidate>,
}

#[derive(Serialize)]
struct JsonCandidate {
    data: usize,
    tensor: usize,
    pipeline: usize,
    virtual_stages: usize,
    zero: u8,
    recompute: String,
    micro_batch: usize,
    offload_optimizer: bool,
    tokens_per_second: f64,
    mfu: f64,
    step_seconds: f64,
    peak_bytes: u64,
    overrides: Vec<String>,
}

impl From<&Candidate> for JsonCandidate {
    fn from(c: &Candidate) -> JsonCandidate {
        JsonCandidate {
            data: c.data,
            tensor: c.tensor,
            pipeline: c.pipeline,
            virtual_stages: c.virtual_stages,
            zero: c.zero.stage(),
            recompute: c.recompute.to_string(),
            micro_batch: c.micro_batch,
            offload_optimizer: c.offload,
            tokens_per_second: c.tokens_per_second,
            mfu: c.mfu,
            step_seconds: c.step_seconds,
            peak_bytes: c.peak_bytes,
            overrides: c.overrides(),
        }
    }
}
