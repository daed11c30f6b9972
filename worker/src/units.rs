//! Storage units: a unit's parameters with its gradients, master weights, Adam moments and
//! offload staging, each the whole flat buffer or this rank's ZeRO shard. The optimizer,
//! checkpoints, ZeRO and the pipeline executor walk these; the model only sees the handles of
//! its parameters (see `crate::model`).

use std::ops::Range;

use tessera_plan::Config;
use tessera_plan::config::Zero;
use tessera_plan::memory::StagePlan;
use tessera_plan::model::{ModelShape, Role, Unit as UnitKind, UnitLayout};

use crate::arena::ArenaLayout;
use crate::error::Result;
use crate::tensor::Tensor;

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

    /// The handle of the parameter with `role` inside a flat buffer laid out like this unit.
    pub fn view_role(&self, buffer: Tensor, role: Role) -> Option<Tensor> {
        let placed = self.layout.with_role(role)?;
        Some(buffer.slice(placed.offset as usize, placed.numel() as usize))
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
        let tied_copy = p > 1 && config.model.tie_embeddings;
        kinds.push((UnitKind::Head { tied_copy }, "head", None, 0));
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
