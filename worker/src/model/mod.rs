//! GPT-2 on one rank: named views of the arena ([`Weights`], [`LayerActs`], [`Scratch`]),
//! deterministic initialisation, and the explicit forward and backward in `gpt.rs`.
//!
//! Parameters are stored per unit (embedding, each layer, head) as one flat buffer laid out by
//! `tessera_plan::model`; [`Unit`]s pair each unit's parameters with its gradients, master
//! weights and Adam moments, which is what the optimizer and checkpoints walk. The model
//! itself only sees [`Weights`]: one handle per named parameter, no offset arithmetic.

pub mod gpt;
pub mod init;

use std::ops::Range;

use tessera_plan::Config;
use tessera_plan::config::Zero;
use tessera_plan::memory::StagePlan;
use tessera_plan::model::{ModelShape, Unit as UnitKind, UnitLayout};

use crate::arena::ArenaLayout;
use crate::error::Result;
use crate::tensor::Tensor;

pub use gpt::Gpt;

/// One unit's buffers on this rank.
///
/// A unit's flat buffer is `S x dp` elements under ZeRO (see `tessera_plan::memory`), cut into
/// `dp` shards of `S`; this rank's `shard` is the part whose optimizer state it holds. What
/// else is sharded depends on the stage: nothing else at ZeRO 1 (reduce-scatter and all-gather
/// work in place on the whole buffers), the gradients at 2, the parameters too at 3. A sharded
/// buffer holds just the shard; a whole one the full flat buffer.
#[derive(Debug, Clone)]
pub struct Unit {
    pub kind: UnitKind,
    /// The global layer index of a `Unit::Layer`.
    pub layer: Option<usize>,
    pub layout: UnitLayout,
    /// The parameters: the whole flat buffer, or this rank's shard (ZeRO 3).
    pub flat_params: Tensor,
    /// The gradients: the whole flat buffer, or this rank's shard (ZeRO 2 and 3).
    pub flat_grads: Tensor,
    /// The elements of the flat buffer whose optimizer state this rank holds: all of them
    /// without ZeRO, chunk `dp_rank` of `dp` equal chunks with it.
    pub shard: Range<usize>,
    pub states_sharded: bool,
    pub grads_sharded: bool,
    pub params_sharded: bool,
    /// fp32 master weights of the shard (mixed precision only).
    pub master: Option<Tensor>,
    /// Adam moments of the shard.
    pub adam_m: Tensor,
    pub adam_v: Tensor,
    /// Optimizer offload: the host buffer (the shard, compute dtype) that carries the
    /// gradients down to the host step and the updated weights back.
    pub staging: Option<Tensor>,
}

impl Unit {
    /// The name of a parameter in checkpoints and fixtures: `wte`, `layers.3.qkv_w`, `lnf_w`.
    pub fn param_name(&self, param: &str) -> String {
        match self.layer {
            Some(layer) => format!("layers.{layer}.{param}"),
            None => param.to_string(),
        }
    }

    /// The unit's own name: `embedding`, `layers.3`, `head`.
    pub fn name(&self) -> String {
        match (self.kind, self.layer) {
            (UnitKind::Embedding, _) => "embedding".into(),
            (UnitKind::Head { .. }, _) => "head".into(),
            (UnitKind::Layer, layer) => format!("layers.{}", layer.unwrap_or(0)),
        }
    }

    /// Whether this rank holds the optimizer state of the whole unit (no ZeRO, or one rank).
    /// The same on every rank of a data-parallel group, which is what lets them agree on
    /// all-reduce or reduce-scatter.
    pub fn is_whole(&self) -> bool {
        !self.states_sharded
    }

    /// The whole parameters, laid out like the unit (`None` under ZeRO 3: gather them).
    pub fn params(&self) -> Option<Tensor> {
        (!self.params_sharded).then_some(self.flat_params)
    }

    /// The whole gradients (`None` under ZeRO 2 and 3, which accumulate in buckets).
    pub fn grads(&self) -> Option<Tensor> {
        (!self.grads_sharded).then_some(self.flat_grads)
    }

    /// Elements `range` of the flat buffer (inside the shard) in the parameters.
    pub fn params_at(&self, range: &Range<usize>) -> Tensor {
        self.at(self.flat_params, self.params_sharded, range)
    }

    /// Elements `range` of the flat buffer (inside the shard) in the gradients.
    pub fn grads_at(&self, range: &Range<usize>) -> Tensor {
        self.at(self.flat_grads, self.grads_sharded, range)
    }

    fn at(&self, buffer: Tensor, sharded: bool, range: &Range<usize>) -> Tensor {
        let start = if sharded {
            range.start - self.shard.start
        } else {
            range.start
        };
        buffer.slice(start, range.len())
    }

    /// The handle of parameter `name` inside a flat buffer laid out like this unit.
    pub fn view(&self, buffer: Tensor, name: &str) -> Tensor {
        let placed = self
            .layout
            .get(name)
            .expect("invariant: the unit has this parameter");
        buffer.slice(placed.offset as usize, placed.numel() as usize)
    }

    /// The part of parameter `name` inside this rank's shard, as a range of the flat buffer.
    pub fn shard_of(&self, name: &str) -> Option<Range<usize>> {
        let placed = self
            .layout
            .get(name)
            .expect("invariant: the unit has this parameter");
        let (start, end) = (
            placed.offset as usize,
            (placed.offset + placed.numel()) as usize,
        );
        let (start, end) = (start.max(self.shard.start), end.min(self.shard.end));
        (start < end).then_some(start..end)
    }

    /// `range` (of the flat buffer, inside the shard) of a shard-sized state buffer.
    pub fn state_view(&self, state: Tensor, range: &Range<usize>) -> Tensor {
        state.slice(range.start - self.shard.start, range.len())
    }
}

/// The units of pipeline stage `stage` in storage order: (kind, the suffix of its plan
/// regions, its global layer, its index among the stage's units of that kind).
pub fn stage_units(
    config: &Config,
    stage: &StagePlan,
) -> Vec<(UnitKind, &'static str, Option<usize>, usize)> {
    let p = config.parallel.pipeline;
    let mut kinds = Vec::new();
    if stage.pp_rank == 0 {
        kinds.push((UnitKind::Embedding, "embedding", None, 0));
    }
    let layers = stage.layers.iter().flat_map(Range::clone);
    for (index, layer) in layers.enumerate() {
        kinds.push((UnitKind::Layer, "layer", Some(layer), index));
    }
    if stage.pp_rank == p - 1 {
        kinds.push((UnitKind::Head { tied_copy: p > 1 }, "head", None, 0));
    }
    kinds
}

/// The units of this rank in storage order: embedding (first stage), the stage's layers, head
/// (last stage). `dp_rank` picks the ZeRO shard.
pub fn units(
    layout: &ArenaLayout,
    config: &Config,
    stage: &StagePlan,
    dp_rank: usize,
) -> Result<Vec<Unit>> {
    let shape = ModelShape::new(&config.model, config.parallel.tensor);
    let dp = config.parallel.data;
    let kinds = stage_units(config, stage);
    let get = |state: &str, suffix: &str, index: usize| -> Result<Tensor> {
        let region = layout.region(&format!("{state}.{suffix}"))?;
        Ok(region.get(index))
    };
    kinds
        .into_iter()
        .map(|(kind, suffix, layer, index)| {
            let unit_layout = shape.layout(kind);
            let elems = unit_layout.elems as usize;
            let flat_params = get("params", suffix, index)?;
            let flat_grads = get("grads", suffix, index)?;
            let adam_m = get("adam_m", suffix, index)?;
            let chunk = adam_m.len;
            let sharded = |stage: Zero| config.parallel.zero >= stage && dp > 1;
            let (states_sharded, grads_sharded, params_sharded) = (
                sharded(Zero::Optimizer),
                sharded(Zero::Gradients),
                sharded(Zero::Parameters),
            );
            let shard = if states_sharded {
                dp_rank * chunk..(dp_rank + 1) * chunk
            } else {
                0..chunk
            };
            let whole = if states_sharded { chunk * dp } else { chunk };
            let length = |sharded: bool| if sharded { chunk } else { whole };
            assert!(
                whole >= elems
                    && flat_params.len == length(params_sharded)
                    && flat_grads.len == length(grads_sharded),
                "invariant: the plan holds the whole unit and its shards"
            );
            let master_name = format!("master.{suffix}");
            Ok(Unit {
                kind,
                layer,
                flat_params,
                flat_grads,
                shard,
                states_sharded,
                grads_sharded,
                params_sharded,
                master: if layout.contains(&master_name) {
                    Some(get("master", suffix, index)?)
                } else {
                    None
                },
                adam_m,
                adam_v: get("adam_v", suffix, index)?,
                staging: if layout.contains(&format!("offload.{suffix}")) {
                    Some(get("offload", suffix, index)?)
                } else {
                    None
                },
                layout: unit_layout,
            })
        })
        .collect()
}

/// The parameters of one transformer layer (or their gradients), at this rank's widths:
/// `C` hidden, `C' = C/tp`, `F' = F/tp`.
#[derive(Debug, Clone, Copy)]
pub struct LayerParams {
    /// `(C)`
    pub ln1_w: Tensor,
    /// `(C)`
    pub ln1_b: Tensor,
    /// `(3C', C)`: this rank's rows of each of q, k and v.
    pub qkv_w: Tensor,
    /// `(3C')`
    pub qkv_b: Tensor,
    /// `(C, C')`
    pub attproj_w: Tensor,
    /// `(C)`
    pub attproj_b: Tensor,
    /// `(C)`
    pub ln2_w: Tensor,
    /// `(C)`
    pub ln2_b: Tensor,
    /// `(F', C)`
    pub fc_w: Tensor,
    /// `(F')`
    pub fc_b: Tensor,
    /// `(C, F')`
    pub fcproj_w: Tensor,
    /// `(C)`
    pub fcproj_b: Tensor,
}

/// Every parameter of this rank (or every gradient), by name.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `(Vp/tp, C)` on the first stage; the tied copy on the last stage when pipelined.
    pub wte: Option<Tensor>,
    /// `(T, C)`, first stage.
    pub wpe: Option<Tensor>,
    /// The LM head's weights: `wte` itself, or its copy on the last stage.
    pub head_wte: Option<Tensor>,
    /// The stage's layers in order.
    pub layers: Vec<LayerParams>,
    /// `(C)`, last stage.
    pub lnf_w: Option<Tensor>,
    pub lnf_b: Option<Tensor>,
}

impl Weights {
    /// Views of `buffer(unit)` (the parameters, or the gradients) of each unit.
    pub fn new(units: &[Unit], buffer: impl Fn(&Unit) -> Tensor) -> Weights {
        let mut weights = Weights {
            wte: None,
            wpe: None,
            head_wte: None,
            layers: Vec::new(),
            lnf_w: None,
            lnf_b: None,
        };
        let mut layer = 0;
        for unit in units {
            if unit.kind == UnitKind::Layer {
                weights
                    .layers
                    .push(LayerParams::in_unit(unit, buffer(unit)));
                layer += 1;
            } else {
                weights.point(unit, layer, buffer(unit));
            }
        }
        weights
    }

    /// Points the handles of `unit` at `buffer`, laid out like the unit; `layer` is the
    /// position of a layer unit among the rank's layers. ZeRO 2 and 3 move a unit's gradients
    /// and parameters between buffers from one use to the next.
    pub fn point(&mut self, unit: &Unit, layer: usize, buffer: Tensor) {
        let t = |name: &str| Some(unit.view(buffer, name));
        match unit.kind {
            UnitKind::Embedding => {
                self.wte = t("wte");
                self.wpe = t("wpe");
                self.head_wte = t("wte");
            }
            UnitKind::Layer => self.layers[layer] = LayerParams::in_unit(unit, buffer),
            UnitKind::Head { tied_copy } => {
                if tied_copy {
                    self.head_wte = t("wte");
                }
                self.lnf_w = t("lnf_w");
                self.lnf_b = t("lnf_b");
            }
        }
    }
}

impl LayerParams {
    fn in_unit(unit: &Unit, buffer: Tensor) -> LayerParams {
        let t = |name: &str| unit.view(buffer, name);
        LayerParams {
            ln1_w: t("ln1_w"),
            ln1_b: t("ln1_b"),
            qkv_w: t("qkv_w"),
            qkv_b: t("qkv_b"),
            attproj_w: t("attproj_w"),
            attproj_b: t("attproj_b"),
            ln2_w: t("ln2_w"),
            ln2_b: t("ln2_b"),
            fc_w: t("fc_w"),
            fc_b: t("fc_b"),
            fcproj_w: t("fcproj_w"),
            fcproj_b: t("fcproj_b"),
        }
    }
}

/// What one layer's forward makes for one microbatch. Each handle is the microbatch's saved
/// copy when the recompute mode keeps it, else the shared `recompute.*` buffer backward
/// refills. `n` tokens held (N, or N/tp under sequence parallelism), `N` tokens.
#[derive(Debug, Clone, Copy)]
pub struct LayerActs {
    /// `(n, C)` the layer's input.
    pub resid: Tensor,
    /// `(n, C)`
    pub ln1: Tensor,
    /// `(n)` f32
    pub ln1_mean: Tensor,
    /// `(n)` f32
    pub ln1_rstd: Tensor,
    /// `(N, 3C')`
    pub qkv: Tensor,
    /// `(N, C')` attention output.
    pub atty: Tensor,
    /// `(N, nh')` f32 log-sum-exp per query row.
    pub att_lse: Tensor,
    /// `(n, C)` the residual after attention.
    pub resid2: Tensor,
    /// `(n, C)`
    pub ln2: Tensor,
    /// `(n)` f32
    pub ln2_mean: Tensor,
    /// `(n)` f32
    pub ln2_rstd: Tensor,
    /// `(N, F')` before GELU.
    pub fch: Tensor,
    /// `(N, F')` after GELU.
    pub fch_gelu: Tensor,
}

/// Buffers used by one op at a time (see `tessera_plan::memory`'s workspace rows).
#[derive(Debug, Clone, Copy)]
pub struct Scratch {
    /// `(N, C)` x2: a linear's output before the residual add, a LayerNorm input gradient.
    pub btc: [Tensor; 2],
    /// `(n, C)` the stage's output.
    pub stage_out: Tensor,
    /// `(n, C)` the residual stream's gradient.
    pub dresid: Tensor,
    /// `(N, 3C')`
    pub dqkv: Tensor,
    /// `(N, C')`
    pub datty: Tensor,
    /// `(N, F')`
    pub dfch: Tensor,
    /// `(N, nh')` f32
    pub att_delta: Tensor,
    /// f32 partial sums of the gradient norm.
    pub norm_partials: Tensor,
}

/// The LM head's buffers (last stage).
#[derive(Debug, Clone, Copy)]
pub struct HeadBuffers {
    /// `(N)` i32
    pub targets: Tensor,
    /// `(n, C)` and its f32 statistics `(n)`.
    pub lnf: Tensor,
    pub lnf_mean: Tensor,
    pub lnf_rstd: Tensor,
    /// `(K, Vp/tp)` one chunk of logits, turned into their gradient in place.
    pub logits: Tensor,
    /// `(K)` f32 each.
    pub logit_max: Tensor,
    pub logit_sumexp: Tensor,
    pub losses: Tensor,
}

/// The layer tensors, by the suffix of their `act.*` / `recompute.*` rows.
const LAYER_TENSORS: [&str; 13] = [
    "resid", "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "att_lse", "resid2", "ln2", "ln2_mean",
    "ln2_rstd", "fch", "fch_gelu",
];

/// The activation views of every (slot, layer) of this rank, resolved once at startup.
#[derive(Debug, Clone)]
pub struct Activations {
    table: Vec<LayerActs>,
    layers_per_chunk: usize,
}

impl Activations {
    pub fn new(layout: &ArenaLayout, slots: usize, layers_per_chunk: usize) -> Result<Self> {
        let mut table = Vec::with_capacity(slots * layers_per_chunk);
        for index in 0..slots * layers_per_chunk {
            let mut t = [None; LAYER_TENSORS.len()];
            for (handle, name) in t.iter_mut().zip(LAYER_TENSORS) {
                let saved = format!("act.{name}");
                *handle = Some(if layout.contains(&saved) {
                    layout.region(&saved)?.get(index)
                } else {
                    layout.region(&format!("recompute.{name}"))?.single()
                });
            }
            let t = t.map(|h| h.expect("invariant: every tensor resolved"));
            table.push(LayerActs {
                resid: t[0],
                ln1: t[1],
                ln1_mean: t[2],
                ln1_rstd: t[3],
                qkv: t[4],
                atty: t[5],
                att_lse: t[6],
                resid2: t[7],
                ln2: t[8],
                ln2_mean: t[9],
                ln2_rstd: t[10],
                fch: t[11],
                fch_gelu: t[12],
            });
        }
        Ok(Activations {
            table,
            layers_per_chunk,
        })
    }

    /// Layer `layer` (0-based within its chunk) of the microbatch in `slot`.
    pub fn layer(&self, slot: usize, layer: usize) -> LayerActs {
        self.table[slot * self.layers_per_chunk + layer]
    }
}
