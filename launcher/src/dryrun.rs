//! `launch --dry-run`: the memory plan as a table, as JSON (the interface in DESIGN.md), or
//! as an SVG chart (`svg.rs`).

use std::fmt::Write as _;

use serde::Serialize;
use tessera_plan::bytes::{Unit, format_size};
use tessera_plan::config::{Choice, Config};
use tessera_plan::memory::{Category, MemoryPlan, Place, Region, StagePlan};
use tessera_plan::search::{Remedy, remedies};

/// Consecutive pipeline stages whose ranks need exactly the same bytes, shown as one row.
pub struct StageGroup<'a> {
    pub first: usize,
    pub last: usize,
    /// The plan shared by the group (the first stage's; the others only differ in layers).
    pub plan: &'a StagePlan,
}

impl StageGroup<'_> {
    pub fn label(&self) -> String {
        if self.first == self.last {
            format!("stage {}", self.first)
        } else {
            format!("stages {}-{}", self.first, self.last)
        }
    }
}

/// The device and host bytes of every category: what makes two stages the same row.
fn footprint(stage: &StagePlan) -> Vec<u64> {
    Category::ALL
        .iter()
        .flat_map(|&c| [stage.bytes(Place::Device, c), stage.bytes(Place::Host, c)])
        .collect()
}

pub fn stage_groups(plan: &MemoryPlan) -> Vec<StageGroup<'_>> {
    let mut groups: Vec<StageGroup> = Vec::new();
    for stage in &plan.stages {
        match groups.last_mut() {
            Some(group) if footprint(group.plan) == footprint(stage) => group.last = stage.pp_rank,
            _ => groups.push(StageGroup {
                first: stage.pp_rank,
                last: stage.pp_rank,
                plan: stage,
            }),
        }
    }
    groups
}

/// "0-5" or "0-2,24-26" for interleaved chunks.
pub fn layer_ranges(stage: &StagePlan) -> String {
    stage
        .layers
        .iter()
        .map(|r| {
            if r.len() == 1 {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// 124475904 -> "124,475,904".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 174.6B, 124.5M, 3.2K.
fn short_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The lines above the table: what is being planned.
fn header(name: &str, config: &Config, plan: &MemoryPlan) -> String {
    let model = &config.model;
    let parallel = &config.parallel;
    let shape = &plan.shape;
    let mut out = String::new();
    let params = shape.total_params();
    let padding = if shape.vocab_padded != shape.vocab {
        format!(
            " (embedding padded to {} for tensor {})",
            shape.vocab_padded, parallel.tensor
        )
    } else {
        String::new()
    };
    let _ = writeln!(out, "tessera dry-run: {name}");
    let _ = writeln!(
        out,
        "model     {}, {} parameters ({}): {} layers, hidden {}, {} heads{}, ffn {}, seq_len {}, vocab {}{padding}{}",
        model.arch,
        thousands(params),
        short_count(params),
        model.layers,
        model.hidden,
        model.heads,
        if model.kv_heads == model.heads {
            String::new()
        } else {
            format!(" ({} key/value)", model.kv_heads)
        },
        model.ffn_hidden,
        model.seq_len,
        model.vocab,
        if model.tie_embeddings {
            ""
        } else {
            ", untied head"
        },
    );
    let _ = writeln!(
        out,
        "mesh      data {} x tensor {} x pipeline {} = {} ranks on {} node{} x {} {} device{}, {} backend",
        parallel.data,
        parallel.tensor,
        parallel.pipeline,
        parallel.world_size(),
        config.cluster.nodes,
        if config.cluster.nodes == 1 { "" } else { "s" },
        config.cluster.gpus_per_node,
        config.cluster.device,
        if config.cluster.gpus_per_node == 1 {
            ""
        } else {
            "s"
        },
        config.cluster.backend,
    );
    let chunks = if parallel.virtual_stages > 1 {
        format!(" x {} chunks", parallel.virtual_stages)
    } else {
        String::new()
    };
    let sp = if parallel.sequence_sharded() {
        ", sequence parallel"
    } else {
        ""
    };
    let recompute = parallel.recompute.describe();
    let _ = writeln!(
        out,
        "schedule  {}{chunks}: {} microbatches of {} per step on each data rank (global batch {}); {recompute}{sp}",
        parallel.schedule,
        config.microbatches(),
        config.training.micro_batch,
        config.training.global_batch,
    );
    let offload = if parallel.offload.optimizer {
        ", optimizer offloaded to host"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "memory    {}, ZeRO-{}{offload}; {} per device, {}% headroom: {} usable",
        config.training.precision,
        parallel.zero.stage(),
        format_size(plan.capacity),
        (config.cluster.headroom * 100.0).round(),
        format_size(plan.usable),
    );
    out
}

/// The table of `--dry-run`, with the verdict and, if it does not fit, what would.
pub fn table(name: &str, config: &Config, plan: &MemoryPlan) -> String {
    let mut out = header(name, config, plan);
    let groups = stage_groups(plan);
    let unit = Unit::for_bytes(plan.peak_bytes().max(plan.usable));
    let host = plan.stages.iter().any(|s| s.host_bytes() > 0);
    let ranks_per_stage = plan.mesh.dp * plan.mesh.tp;

    let mut headings = vec![
        format!("per rank, {}", unit.name()),
        "ranks".into(),
        "layers".into(),
    ];
    headings.extend(Category::DEVICE.iter().map(|c| short_name(*c).to_string()));
    headings.extend(["total".to_string(), "free".to_string(), "fits".to_string()]);
    if host {
        headings.push("host".into());
    }
    let mut rows = vec![headings];
    for group in &groups {
        let stage = group.plan;
        let stages = group.last - group.first + 1;
        let mut row = vec![
            group.label(),
            (stages * ranks_per_stage).to_string(),
            if stages == 1 {
                layer_ranges(stage)
            } else {
                format!(
                    "{} each",
                    stage.layers.iter().map(|r| r.len()).sum::<usize>()
                )
            },
        ];
        for &category in Category::DEVICE {
            let bytes = stage.bytes(Place::Device, category);
            row.push(if bytes == 0 {
                "-".into()
            } else {
                unit.format(bytes)
            });
        }
        let total = stage.device_bytes();
        row.push(unit.format(total));
        row.push(signed(plan.usable as i128 - total as i128, unit));
        row.push(if total <= plan.usable {
            "yes".into()
        } else {
            "NO".into()
        });
        if host {
            row.push(unit.format(stage.host_bytes()));
        }
        rows.push(row);
    }
    out.push('\n');
    out.push_str(&render_rows(&rows, 3));
    out.push('\n');
    out.push_str(&verdict(name, config, plan));
    out
}

fn short_name(category: Category) -> &'static str {
    match category {
        Category::Optimizer => "optim",
        Category::Activations => "activ",
        Category::Workspace => "work",
        other => other.name(),
    }
}

/// Bytes that may be negative, in `unit`.
fn signed(bytes: i128, unit: Unit) -> String {
    let magnitude = unit.format(bytes.unsigned_abs() as u64);
    if bytes < 0 {
        format!("-{magnitude}")
    } else {
        magnitude
    }
}

/// Left-aligns the first `text_columns` columns and right-aligns the rest.
fn render_rows(rows: &[Vec<String>], text_columns: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c < text_columns {
                    format!("{cell:<width$}", width = widths[c])
                } else {
                    format!("{cell:>width$}", width = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Whether the plan fits, and if not, which ranks, why, and what would fit.
pub fn verdict(name: &str, config: &Config, plan: &MemoryPlan) -> String {
    let mut out = String::new();
    let peak = plan.peak_stage();
    let estimated: u64 = peak
        .regions
        .iter()
        .filter(|r| r.estimated && r.place == Place::Device)
        .map(Region::bytes)
        .sum();
    if plan.fits() {
        let _ = writeln!(
            out,
            "fits: the largest ranks (stage {}) need {} of the {} usable, {} to spare.",
            peak.pp_rank,
            format_size(peak.device_bytes()),
            format_size(plan.usable),
            format_size(plan.usable - peak.device_bytes()),
        );
    } else {
        let _ = writeln!(out, "{}", does_not_fit(plan));
        let found = remedies(config);
        if !found.is_empty() {
            let _ = writeln!(out, "what would fit (each change planned exactly):");
            let rows: Vec<Vec<String>> = found.iter().take(6).map(remedy_row).collect();
            for line in render_rows(&rows, 1).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(
            out,
            "or rank every layout that fits: launch search --config {name} --gpus {}",
            plan.mesh.world_size()
        );
    }
    if estimated > 0 {
        let _ = writeln!(
            out,
            "note: {} per rank of the runtime column (CUDA context, cuBLASLt, kernels, NCCL buffers) is measured on an H100, not computed; a worker prints its GPU's own count after the first step.",
            format_size(estimated)
        );
    }
    out
}

fn remedy_row(remedy: &Remedy) -> Vec<String> {
    let sets: Vec<String> = remedy
        .changes
        .iter()
        .map(|c| format!("--set {c}"))
        .collect();
    vec![
        sets.join(" "),
        format!("peak {}", format_size(remedy.peak_bytes)),
        if remedy.fits {
            "fits".into()
        } else {
            "still over".into()
        },
    ]
}

/// One line naming the ranks that do not fit, by how much, and their largest category.
pub fn does_not_fit(plan: &MemoryPlan) -> String {
    let over: Vec<&StagePlan> = plan.over_budget().collect();
    let worst = plan.peak_stage();
    let numbers: Vec<String> = over.iter().map(|s| s.pp_rank.to_string()).collect();
    let stages = match numbers.as_slice() {
        [one] => format!("stage {one}"),
        [rest @ .., last] => format!("stages {} and {last}", rest.join(", ")),
        [] => "no stage".to_string(),
    };
    let ranks = over.len() * plan.mesh.dp * plan.mesh.tp;
    let largest = worst.largest_category();
    format!(
        "does not fit: {stages} ({ranks} ranks, e.g. rank {}) need up to {}, {} more than the {} usable; the largest part is {} ({}).",
        plan.mesh.rank(tessera_plan::mesh::Coord {
            dp_rank: 0,
            pp_rank: worst.pp_rank,
            tp_rank: 0
        }),
        format_size(worst.device_bytes()),
        format_size(worst.device_bytes() - plan.usable),
        format_size(plan.usable),
        largest.name(),
        format_size(worst.bytes(Place::Device, largest)),
    )
}

/// `--rank N`: every region of one rank.
pub fn rank_regions(plan: &MemoryPlan, rank: usize) -> Result<String, tessera_plan::Error> {
    let stage = plan.rank(rank)?;
    let coord = plan.mesh.coord(rank)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rank {rank}: data {}, pipeline {}, tensor {} (node {}, local rank {}); stage {}, layers {}",
        coord.dp_rank,
        coord.pp_rank,
        coord.tp_rank,
        plan.mesh.node(rank),
        plan.mesh.local_rank(rank),
        stage.pp_rank,
        layer_ranges(stage),
    );
    let mut rows = vec![vec![
        "region".to_string(),
        "category".into(),
        "place".into(),
        "dtype".into(),
        "count".into(),
        "elements each".into(),
        "bytes".into(),
    ]];
    for region in &stage.regions {
        rows.push(vec![
            region.name.to_string(),
            region.category.name().to_string(),
            match region.place {
                Place::Device => "device".into(),
                Place::Host => "host".into(),
            },
            region.dtype.name().to_string(),
            count_label(region),
            thousands(region.elems),
            format!(
                "{}{}",
                thousands(region.bytes()),
                if region.estimated { " (est.)" } else { "" }
            ),
        ]);
    }
    out.push_str(&render_rows(&rows, 5));
    let _ = writeln!(
        out,
        "device total {} bytes ({}), of which {} bytes alignment padding",
        thousands(stage.device_bytes()),
        format_size(stage.device_bytes()),
        thousands(stage.device_padding()),
    );
    if stage.host_bytes() > 0 {
        let _ = writeln!(
            out,
            "host total {} bytes ({})",
            thousands(stage.host_bytes()),
            format_size(stage.host_bytes())
        );
    }
    Ok(out)
}

fn count_label(region: &Region) -> String {
    use tessera_plan::memory::Per;
    match region.per {
        Per::Rank => "1".into(),
        Per::Layer(n) => format!("{n} layers"),
        Per::Slot(n) => format!("{n} slots"),
        Per::SlotLayer { slots, layers } => format!("{slots} slots x {layers} layers"),
        Per::Copies(n) => format!("{n} copies"),
    }
}

/// The dry-run JSON of DESIGN.md ("Interfaces"), one entry per rank.
#[derive(Debug, Serialize)]
pub struct JsonPlan {
    pub model: JsonModel,
    pub mesh: JsonMesh,
    pub world_size: usize,
    pub gpu_memory_bytes: u64,
    pub headroom: f64,
    pub usable_bytes: u64,
    pub fits: bool,
    pub peak_bytes: u64,
    pub ranks: Vec<JsonRank>,
}

#[derive(Debug, Serialize)]
pub struct JsonModel {
    pub arch: &'static str,
    pub params: u64,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab: usize,
    pub vocab_padded: usize,
    pub seq_len: usize,
    pub tie_embeddings: bool,
}

#[derive(Debug, Serialize)]
pub struct JsonMesh {
    pub data: usize,
    pub tensor: usize,
    pub pipeline: usize,
    pub virtual_stages: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonRank {
    pub rank: usize,
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub node: usize,
    pub local_rank: usize,
    /// `[first, end)` of the rank's first model chunk.
    pub layers: [usize; 2],
    /// `[first, end)` of every model chunk (one unless interleaved).
    pub layer_chunks: Vec<[usize; 2]>,
    pub bytes: JsonBytes,
    pub host_bytes: JsonHostBytes,
}

#[derive(Debug, Clone, Serialize)]
pub struct JsonBytes {
    pub params: u64,
    pub grads: u64,
    pub master: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub workspace: u64,
    pub comm: u64,
    pub runtime: u64,
    pub total: u64,
    /// Part of `total` that is alignment padding.
    pub alignment: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JsonHostBytes {
    pub optimizer: u64,
    pub master: u64,
    pub staging: u64,
    /// The staging buffer of asynchronous checkpoints.
    pub checkpoint: u64,
    pub total: u64,
}

pub fn json(config: &Config, plan: &MemoryPlan) -> JsonPlan {
    let device = |stage: &StagePlan| {
        let b = |c| stage.bytes(Place::Device, c);
        JsonBytes {
            params: b(Category::Params),
            grads: b(Category::Grads),
            master: b(Category::Master),
            optimizer: b(Category::Optimizer),
            activations: b(Category::Activations),
            workspace: b(Category::Workspace),
            comm: b(Category::Comm),
            runtime: b(Category::Runtime),
            total: stage.device_bytes(),
            alignment: stage.device_padding(),
        }
    };
    let host = |stage: &StagePlan| JsonHostBytes {
        optimizer: stage.bytes(Place::Host, Category::Optimizer),
        master: stage.bytes(Place::Host, Category::Master),
        staging: stage.bytes(Place::Host, Category::Comm),
        checkpoint: stage.bytes(Place::Host, Category::Checkpoint),
        total: stage.host_bytes(),
    };
    let per_stage: Vec<(JsonBytes, JsonHostBytes)> =
        plan.stages.iter().map(|s| (device(s), host(s))).collect();
    let ranks = (0..plan.mesh.world_size())
        .map(|rank| {
            let coord = plan.mesh.coord(rank).expect("invariant: rank < world");
            let stage = &plan.stages[coord.pp_rank];
            let (bytes, host_bytes) = per_stage[coord.pp_rank].clone();
            let chunks: Vec<[usize; 2]> = stage.layers.iter().map(|r| [r.start, r.end]).collect();
            JsonRank {
                rank,
                dp: coord.dp_rank,
                tp: coord.tp_rank,
                pp: coord.pp_rank,
                node: plan.mesh.node(rank),
                local_rank: plan.mesh.local_rank(rank),
                layers: chunks[0],
                layer_chunks: chunks,
                bytes,
                host_bytes,
            }
        })
        .collect();
    JsonPlan {
        model: JsonModel {
            arch: config.model.arch.name(),
            params: plan.shape.total_params(),
            layers: config.model.layers,
            hidden: config.model.hidden,
            heads: config.model.heads,
            kv_heads: config.model.kv_heads,
            head_dim: config.model.head_dim,
            ffn_hidden: config.model.ffn_hidden,
            vocab: config.model.vocab,
            vocab_padded: plan.shape.vocab_padded,
            seq_len: config.model.seq_len,
            tie_embeddings: config.model.tie_embeddings,
        },
        mesh: JsonMesh {
            data: config.parallel.data,
            tensor: config.parallel.tensor,
            pipeline: config.parallel.pipeline,
            virtual_stages: config.parallel.virtual_stages,
        },
        world_size: plan.mesh.world_size(),
        gpu_memory_bytes: plan.capacity,
        headroom: config.cluster.headroom,
        usable_bytes: plan.usable,
        fits: plan.fits(),
        peak_bytes: plan.peak_bytes(),
        ranks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(124_475_904), "124,475,904");
    }

    #[test]
    fn rows_align_numbers_right() {
        let rows = vec![
            vec!["a".to_string(), "1".into()],
            vec!["bbb".to_string(), "100".into()],
        ];
        assert_eq!(render_rows(&rows, 1), "a      1\nbbb  100\n");
    }
}
