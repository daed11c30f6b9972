//! A distributed checkpoint as the one model it shards: every parameter as the global tensor a
//! single process holds (the vocabulary's padding rows removed), in f32, like DeepSpeed's
//! `zero_to_fp32`. `launch export` writes it as one safetensors file; tests compare the
//! weights of different meshes with it.
//!
//! The files are read as the config lays them out: each (pipeline stage, tensor rank) holds
//! its units, parameters whole in the file of the first data-parallel rank, or under ZeRO 3
//! as flat shards (`params.layers.3`) in every data-parallel rank's file, concatenated here.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::SafeTensors;
use tessera_plan::Config;
use tessera_plan::config::Zero;
use tessera_plan::memory::StagePlan;
use tessera_plan::mesh::{Coord, Mesh};
use tessera_plan::model::{ModelShape, Unit as UnitKind};

use super::{encode, rank_file, read_manifest};
use crate::error::{Error, Result};
use crate::model::init::global_index;
use crate::model::stage_units;

/// A global tensor: its shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every parameter of the model in the checkpoint at `path`, which `config` wrote, by global
/// name (`wte`, `wpe`, `layers.3.qkv_w`, `lnf_w`, ...).
pub fn consolidate(path: &Path, config: &Config) -> Result<BTreeMap<String, Global>> {
    read_manifest(path, config)?;
    let parallel = &config.parallel;
    let mesh = Mesh::from_config(config);
    let shape = ModelShape::new(&config.model, parallel.tensor);
    let sharded = parallel.zero == Zero::Parameters && parallel.data > 1;
    let mut files: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    let mut model: BTreeMap<String, Global> = BTreeMap::new();
    for pp_rank in 0..parallel.pipeline {
        let stage = StagePlan::new(config, pp_rank);
        for (kind, _, layer, _) in stage_units(config, &stage) {
            let layout = shape.layout(kind);
            let unit_name = match (kind, layer) {
                (UnitKind::Embedding, _) => "embedding".to_string(),
                (UnitKind::Head { .. }, _) => "head".to_string(),
                (UnitKind::Layer, layer) => format!("layers.{}", layer.unwrap_or(0)),
            };
            for tp_rank in 0..parallel.tensor {
                let rank_of = |dp_rank| {
                    mesh.rank(Coord {
                        dp_rank,
                        pp_rank,
                        tp_rank,
                    })
                };
                // ZeRO 3: the unit's flat buffer, from every data-parallel rank's shard.
                let flat = if sharded {
                    let mut flat = Vec::new();
                    for dp_rank in 0..parallel.data {
                        let bytes = file(&mut files, path, rank_of(dp_rank))?;
                        flat.extend(tensor(bytes, &format!("params.{unit_name}"), path)?);
                    }
                    Some(flat)
                } else {
                    None
                };
                let bytes = file(&mut files, path, rank_of(0))?.to_vec();
                for placed in &layout.params {
                    let name = placed.spec.name;
                    if name == "wte" && matches!(kind, UnitKind::Head { tied_copy: true }) {
                        continue;
                    }
                    let global_name = match layer {
                        Some(layer) => format!("layers.{layer}.{name}"),
                        None => name.to_string(),
                    };
                    let local = match &flat {
                        Some(flat) => {
                            let start = placed.offset as usize;
                            flat[start..start + placed.numel() as usize].to_vec()
                        }
                        None => tensor(&bytes, &global_name, path)?,
                    };
                    let global_shape = shape.global_shape(&placed.spec);
                    let entry = model.entry(global_name).or_insert_with(|| Global {
                        values: vec![0.0; global_shape.iter().product()],
                        shape: global_shape,
                    });
                    for (i, value) in local.into_iter().enumerate() {
                        entry.values[global_index(placed, &shape, tp_rank, i)] = value;
                    }
                }
            }
        }
    }
    // The vocabulary is padded to a multiple the tensor degree divides: drop the padding rows.
    if let Some(wte) = model.get_mut("wte") {
        let hidden = wte.shape[1];
        wte.values.truncate(shape.vocab * hidden);
        wte.shape[0] = shape.vocab;
    }
    Ok(model)
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
    let encoded = encode(tensors, out)?;
    std::fs::write(out, encoded).map_err(Error::io(out))
}

/// The bytes of rank `rank`'s file in the checkpoint at `path`, read once.
fn file<'a>(files: &'a mut BTreeMap<usize, Vec<u8>>, path: &Path, rank: usize) -> Result<&'a [u8]> {
    if let std::collections::btree_map::Entry::Vacant(entry) = files.entry(rank) {
        let file = path.join(rank_file(rank));
        entry.insert(std::fs::read(&file).map_err(Error::io(&file))?);
    }
    Ok(&files[&rank])
}

/// Tensor `name` of a rank file, converted to f32.
fn tensor(bytes: &[u8], name: &str, path: &Path) -> Result<Vec<f32>> {
    let bad = |what: String| Error::Checkpoint {
        path: path.to_path_buf(),
        what,
        help: "the checkpoint is damaged, or the config is not the one that wrote it".into(),
    };
    let stored = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("a rank file is not valid safetensors: {e}")))?;
    let view = stored
        .tensor(name)
        .map_err(|_| bad(format!("no rank file there holds `{name}`")))?;
    let data = view.data();
    Ok(match view.dtype() {
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
        other => return Err(bad(format!("`{name}` is {other:?}, not a float tensor"))),
    })
}
