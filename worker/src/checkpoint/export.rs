//! A distributed checkpoint as the one model it shards: every parameter (and every optimizer
//! state) as the global tensor a single process holds, in f32, the vocabulary's padding rows
//! removed, like DeepSpeed's `zero_to_fp32`. `launch export` writes the parameters as one
//! safetensors file, and tests compare the weights of different meshes with it. A run on
//! another mesh does not consolidate: each rank reads only its shards (`super::reshard`),
//! located through the same map of shards (`shard_sources`).
//!
//! The files are read as the layout that wrote them (the manifest's mesh, ZeRO stage and
//! virtual stages) places the model: each (pipeline stage, tensor rank) holds its units; a
//! whole tensor is in the file of the first data-parallel rank under its name
//! (`layers.3.qkv_w`, `adam_m.layers.3.qkv_w`), a ZeRO shard in every data-parallel rank's file
//! as a flat slice of its unit (`adam_m.layers.3`), concatenated here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tessera_plan::Config;
use tessera_plan::config::{Schedule, Zero};
use tessera_plan::memory::StagePlan;
use tessera_plan::mesh::{Coord, Mesh};
use tessera_plan::model::{ModelShape, Placed, Role, Split, Unit as UnitKind};

use super::read::Reader;
use super::{Manifest, rank_file};
use crate::error::{Error, Result};
use crate::units::stage_units;

/// A global tensor: its shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// What a checkpoint keeps per parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Params,
    /// fp32 master weights (mixed precision or offload only).
    Master,
    AdamM,
    AdamV,
}

impl State {
    /// Whether `written` keeps this state at all (master weights only with mixed precision or
    /// optimizer offload).
    fn kept(self, written: &Config) -> bool {
        self != State::Master
            || written.training.precision.has_master_weights()
            || written.parallel.offload.optimizer
    }

    /// Whether `written` sharded this state's flat buffers over the data-parallel group (the
    /// optimizer states from ZeRO 1 on, the parameters under ZeRO 3).
    fn sharded(self, written: &Config) -> bool {
        let parallel = &written.parallel;
        parallel.data > 1
            && match self {
                State::Params => parallel.zero == Zero::Parameters,
                _ => parallel.zero >= Zero::Optimizer,
            }
    }

    /// The prefix of its tensors in checkpoint files (none for parameters).
    fn prefix(self) -> &'static str {
        match self {
            State::Params => "params",
            State::Master => "master",
            State::AdamM => "adam_m",
            State::AdamV => "adam_v",
        }
    }
}

/// `config` as the run that wrote `manifest` laid it out: its mesh, ZeRO stage and model
/// chunks (the model and precision must be `config`'s: `read_manifest` checks, as it checks
/// that the layout is possible). Only the layout of the files is taken from it, so the rest
/// is made to fit any possible layout: the cluster is one node holding every rank, and a step
/// is one microbatch of one sequence per pipeline stage and data-parallel rank.
pub fn written_config(manifest: &Manifest, config: &Config) -> Config {
    let mut written = config.clone();
    let run = &manifest.run;
    let parallel = &mut written.parallel;
    [parallel.data, parallel.tensor, parallel.pipeline] = run.mesh;
    parallel.zero = Zero::ALL[run.zero]; // read_manifest checked 0..=3
    parallel.virtual_stages = run.virtual_stages;
    parallel.sequence_parallel = false;
    if run.virtual_stages > 1 {
        parallel.schedule = Schedule::Interleaved;
    } else if parallel.schedule == Schedule::Interleaved {
        parallel.schedule = Schedule::OneFOneB;
    }
    written.cluster.nodes = 1;
    written.cluster.gpus_per_node = parallel.world_size();
    written.training.micro_batch = 1;
    written.training.global_batch = parallel.data * parallel.pipeline;
    written
}

/// One unit of the model on one (pipeline, tensor) coordinate: the parameters it places and
/// their global names (the last stage's copy of a tied embedding left out: the embedding's own
/// is the one).
struct UnitShard {
    pp_rank: usize,
    tp_rank: usize,
    /// `embedding`, `layers.3`, `head`: the name of its flat ZeRO shards.
    name: String,
    params: Vec<(Placed, String)>,
}

/// Every unit of every (pipeline, tensor) coordinate of `written`'s layout.
fn unit_shards(written: &Config) -> Vec<UnitShard> {
    let parallel = &written.parallel;
    let shape = ModelShape::new(&written.model, parallel.tensor);
    let mut shards = Vec::new();
    for pp_rank in 0..parallel.pipeline {
        let stage = StagePlan::new(written, pp_rank);
        for (kind, _, layer, _) in stage_units(written, &stage) {
            let layout = shape.layout(kind);
            let name = match (kind, layer) {
                (UnitKind::Embedding, _) => "embedding".to_string(),
                (UnitKind::Head { .. }, _) => "head".to_string(),
                (UnitKind::Layer, layer) => format!("layers.{}", layer.unwrap_or(0)),
            };
            let params: Vec<(Placed, String)> = layout
                .params
                .iter()
                .filter(|placed| {
                    !(placed.spec.role == Role::TokenEmbedding
                        && matches!(kind, UnitKind::Head { tied_copy: true }))
                })
                .map(|placed| {
                    let global = match layer {
                        Some(layer) => format!("layers.{layer}.{}", placed.spec.name),
                        None => placed.spec.name.to_string(),
                    };
                    (placed.clone(), global)
                })
                .collect();
            for tp_rank in 0..parallel.tensor {
                shards.push(UnitShard {
                    pp_rank,
                    tp_rank,
                    name: name.clone(),
                    params: params.clone(),
                });
            }
        }
    }
    shards
}

/// Where a global tensor's pieces are in a checkpoint's files: one entry of the manifest's
/// `tensors`, so that other tools can reassemble it without tessera.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorMap {
    /// `wte`, `layers.3.qkv_w`, ... (the architecture's table's names; PyTorch's (out, in) for
    /// linears).
    pub name: String,
    /// Its global shape, the vocabulary padded to what the tensor degree divides.
    pub shape: Vec<usize>,
    /// How tensor parallelism splits it: `replicated`, `rows`, `rows in N blocks` (q|k|v,
    /// each block split) or `columns`.
    pub tensor_split: String,
    pub pipeline_stage: usize,
    /// One per tensor-parallel rank.
    pub shards: Vec<ShardMap>,
}

/// One tensor-parallel shard of a [`TensorMap`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardMap {
    pub tensor_rank: usize,
    pub shape: Vec<usize>,
    /// Per state (`params`, `master`, `adam_m`, `adam_v`): where its values are.
    pub states: BTreeMap<String, Location>,
}

/// Where a shard's values of one state are.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Location {
    /// Whole, as tensor `key` of `file`.
    Whole { file: String, key: String },
    /// ZeRO: the tensors `key` of `files` (the data-parallel ranks' files, in order)
    /// concatenated hold the unit's flat buffer; the shard is `[offset, offset + numel)` of it,
    /// row-major.
    Flat {
        files: Vec<String>,
        key: String,
        offset: u64,
        numel: u64,
    },
}

/// One tensor-parallel shard of a global tensor in a checkpoint: how its unit places it and
/// where each state's values are.
pub(super) struct SourceShard {
    pub pipeline_stage: usize,
    pub tp_rank: usize,
    pub placed: Placed,
    /// By state prefix (`params`, `master`, `adam_m`, `adam_v`); only the states kept.
    pub states: BTreeMap<String, Location>,
}

/// The shards of every global tensor of a checkpoint that `written` lays out, by global name,
/// each in tensor-rank order.
pub(super) fn shard_sources(written: &Config) -> BTreeMap<String, Vec<SourceShard>> {
    let parallel = &written.parallel;
    let mesh = Mesh::from_config(written);
    let dp = parallel.data;
    let states: Vec<State> = [State::Params, State::Master, State::AdamM, State::AdamV]
        .into_iter()
        .filter(|state| state.kept(written))
        .collect();
    let mut sources: BTreeMap<String, Vec<SourceShard>> = BTreeMap::new();
    for unit in unit_shards(written) {
        let file_of = |dp_rank| {
            rank_file(mesh.rank(Coord {
                dp_rank,
                pp_rank: unit.pp_rank,
                tp_rank: unit.tp_rank,
            }))
        };
        for (placed, global_name) in &unit.params {
            let mut locations = BTreeMap::new();
            for &state in &states {
                let location = if state.sharded(written) {
                    Location::Flat {
                        files: (0..dp).map(file_of).collect(),
                        key: format!("{}.{}", state.prefix(), unit.name),
                        offset: placed.offset,
                        numel: placed.numel(),
                    }
                } else {
                    let key = match state {
                        State::Params => global_name.clone(),
                        _ => format!("{}.{global_name}", state.prefix()),
                    };
                    Location::Whole {
                        file: file_of(0),
                        key,
                    }
                };
                locations.insert(state.prefix().to_string(), location);
            }
            sources
                .entry(global_name.clone())
                .or_default()
                .push(SourceShard {
                    pipeline_stage: unit.pp_rank,
                    tp_rank: unit.tp_rank,
                    placed: placed.clone(),
                    states: locations,
                });
        }
    }
    sources
}

/// The manifest's `tensors` for a checkpoint that `written` lays out.
pub fn tensor_maps(written: &Config) -> Vec<TensorMap> {
    let shape = ModelShape::new(&written.model, written.parallel.tensor);
    shard_sources(written)
        .into_iter()
        .map(|(name, shards)| {
            let first = &shards[0];
            TensorMap {
                shape: shape.global_shape(&first.placed.spec),
                tensor_split: match first.placed.spec.split {
                    Split::Replicated => "replicated".into(),
                    Split::Rows { blocks } if blocks.len() <= 1 => "rows".into(),
                    Split::Rows { blocks } => format!("rows in {} blocks", blocks.len()),
                    Split::Columns => "columns".into(),
                },
                pipeline_stage: first.pipeline_stage,
                shards: shards
                    .into_iter()
                    .map(|shard| ShardMap {
                        tensor_rank: shard.tp_rank,
                        shape: shard.placed.local_shape,
                        states: shard.states,
                    })
                    .collect(),
                name,
            }
        })
        .collect()
}

/// The rank files of a checkpoint, read through a [`Reader`] (each byte checked).
pub struct Files {
    path: PathBuf,
    reader: Reader,
}

impl Files {
    /// The files of the checkpoint at `path`, checked against the checksums of its
    /// `manifest` (from [`super::read_manifest`]).
    pub fn read(path: &Path, manifest: &Manifest) -> Files {
        Files {
            path: path.to_path_buf(),
            reader: super::reader(path, manifest),
        }
    }

    /// Every tensor of `state` in the files, which `written` laid out, by global parameter
    /// name (`wte`, `wpe`, `layers.3.qkv_w`, `lnf_w`, ...). `None` when the checkpoint has no
    /// such state (master weights of an fp32 run).
    pub fn consolidate(
        &self,
        written: &Config,
        state: State,
    ) -> Result<Option<BTreeMap<String, Global>>> {
        let parallel = &written.parallel;
        let mesh = Mesh::from_config(written);
        let shape = ModelShape::new(&written.model, parallel.tensor);
        let dp = parallel.data;
        let sharded = state.sharded(written);
        if !state.kept(written) {
            return Ok(None);
        }
        let file = |rank: usize| Ok::<_, Error>(rank_file(rank));
        let mut model: BTreeMap<String, Global> = BTreeMap::new();
        for unit in unit_shards(written) {
            let rank_of = |dp_rank| {
                mesh.rank(Coord {
                    dp_rank,
                    pp_rank: unit.pp_rank,
                    tp_rank: unit.tp_rank,
                })
            };
            // The unit's flat buffer, from every data-parallel rank's shard.
            let flat = if sharded {
                let mut flat = Vec::new();
                for dp_rank in 0..dp {
                    let name = format!("{}.{}", state.prefix(), unit.name);
                    flat.extend(self.tensor(&file(rank_of(dp_rank))?, &name)?);
                }
                Some(flat)
            } else {
                None
            };
            let first = file(rank_of(0))?;
            for (placed, global_name) in &unit.params {
                let local = match &flat {
                    Some(flat) => {
                        let start = placed.offset as usize;
                        flat[start..start + placed.numel() as usize].to_vec()
                    }
                    None if state == State::Params => self.tensor(&first, global_name)?,
                    None => {
                        let stored = format!("{}.{global_name}", state.prefix());
                        self.tensor(&first, &stored)?
                    }
                };
                let global_shape = shape.global_shape(&placed.spec);
                let entry = model.entry(global_name.clone()).or_insert_with(|| Global {
                    values: vec![0.0; global_shape.iter().product()],
                    shape: global_shape,
                });
                for (i, value) in local.into_iter().enumerate() {
                    entry.values[shape.global_index(placed, unit.tp_rank, i)] = value;
                }
            }
        }
        // The vocabulary is padded to a multiple the tensor degree divides: drop the padding
        // rows of the token embedding and of an untied LM head.
        let vocab_rows = shape
            .architecture()
            .params
            .iter()
            .filter(|p| matches!(p.role, Role::TokenEmbedding | Role::LmHead));
        for spec in vocab_rows {
            if let Some(tensor) = model.get_mut(spec.name) {
                let hidden = tensor.shape[1];
                tensor.values.truncate(shape.vocab * hidden);
                tensor.shape[0] = shape.vocab;
            }
        }
        Ok(Some(model))
    }

    /// Tensor `name` of rank file `file`, converted to f32.
    fn tensor(&self, file: &str, name: &str) -> Result<Vec<f32>> {
        let stored = self.reader.stored(file, name)?;
        let data = self.reader.read(file, name)?;
        to_f32(&data, stored.dtype).ok_or_else(|| Error::CheckpointDamaged {
            path: self.path.clone(),
            what: format!("{file}: `{name}` is {:?}, not a float tensor", stored.dtype),
            help: "the checkpoint is damaged, or the config is not the one that wrote it".into(),
        })
    }
}

/// Little-endian `data` of `dtype` as f32 values; `None` for a dtype that is not a float.
pub fn to_f32(data: &[u8], dtype: safetensors::Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Writes `model` as one safetensors file of f32 tensors.
pub fn write(model: &BTreeMap<String, Global>, out: &Path) -> Result<()> {
    let bytes: Vec<(&String, &Global, Vec<u8>)> = model
        .iter()
        .map(|(name, tensor)| (name, tensor, bytemuck::cast_slice(&tensor.values).to_vec()))
        .collect();
    let tensors = bytes.iter().map(|(name, tensor, data)| {
        (
            name.as_str(),
            safetensors::Dtype::F32,
            tensor.shape.clone(),
            data.as_slice(),
        )
    });
    let views = tensors.map(|(name, dtype, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(dtype, shape, bytes)
            .expect("invariant: the shape matches the bytes");
        (name, view)
    });
    let encoded = safetensors::serialize(views, None).map_err(|e| Error::Checkpoint {
        path: out.to_path_buf(),
        what: format!("cannot encode the tensors: {e}"),
        help: "this is a bug in tessera; please report it".into(),
    })?;
    std::fs::write(out, encoded).map_err(Error::io(out))
}
