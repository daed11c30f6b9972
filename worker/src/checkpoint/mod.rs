//! Checkpoints of a rank: its parameters, fp32 master weights and Adam moments in a safetensors
//! file, and a JSON manifest with what resuming needs (step, data position, loss scale), what
//! must match (model, precision, batch, seed), the layout that wrote it (mesh, ZeRO stage,
//! virtual stages), and a map of every global tensor to its shards in the files (so that tools
//! other than tessera can reassemble it). A run with another layout resumes too: [`export`]
//! reassembles the global tensors and each rank takes its shards.
//!
//! A checkpoint is written into `DIR/step-NNNNNNNN.partial-PID`, every file fsynced, then the
//! directory is renamed to `DIR/step-NNNNNNNN` and `DIR` fsynced: the rename is the commit, so
//! a crash at any point leaves the previous checkpoint intact and a `.partial-*` directory
//! that the next save removes. Only directories without that suffix count as checkpoints.
//!
//! Resuming restores every byte of the model and optimizer state; the data order is a
//! function of (seed, step) and there is no other random state, so the losses that follow
//! are bit-identical to an uninterrupted run.

pub mod export;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use tessera_plan::Config;
use tessera_plan::config::Choice as _;
use tessera_plan::memory::Dtype;
use tessera_plan::mesh::Mesh;
use tessera_plan::model::ModelShape;

use crate::comm::CommunicatorExt as _;
use crate::error::{Error, Result};
use crate::model::Unit;
use crate::model::init::global_index;
use crate::optim::LossScale;
use crate::parallel::Comms;
use crate::tensor::{Backend, Tensor};

const FORMAT: u32 = 2;
const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "step-";
const PARTIAL: &str = ".partial-";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps completed; training resumes at this step.
    pub step: u64,
    /// Global samples consumed: `step x global_batch` (the data position).
    pub samples: u64,
    pub loss_scale: LossScale,
    /// Must match the config that resumes.
    pub run: RunIdentity,
    /// The tensor files, one per rank.
    pub files: Vec<String>,
    /// Every global tensor: its shape, how tensor parallelism splits it, and where each
    /// shard's parameters and optimizer states are in `files`.
    #[serde(default)]
    pub tensors: Vec<export::TensorMap>,
}

/// Everything that must be equal for a checkpoint to be resumable by a config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub vocab: usize,
    pub seq_len: usize,
    pub ffn_hidden: usize,
    pub precision: String,
    pub global_batch: usize,
    pub seed: u64,
    pub mesh: [usize; 3],
    /// ZeRO stage and model chunks per pipeline stage: how the files shard the model.
    pub zero: usize,
    pub virtual_stages: usize,
}

impl RunIdentity {
    /// Whether a checkpoint of `self` can resume `other`: the same model, precision, batch and
    /// seed. The layout (mesh, ZeRO stage, virtual stages) may differ; loading reshards.
    pub fn same_model(&self, other: &RunIdentity) -> bool {
        let layout_free = |run: &RunIdentity| RunIdentity {
            mesh: [0; 3],
            zero: 0,
            virtual_stages: 0,
            ..run.clone()
        };
        layout_free(self) == layout_free(other)
    }

    /// Whether `self` lays the model out like `other` (the files load as they are).
    pub fn same_layout(&self, other: &RunIdentity) -> bool {
        (self.mesh, self.zero, self.virtual_stages)
            == (other.mesh, other.zero, other.virtual_stages)
    }

    pub fn of(config: &Config) -> RunIdentity {
        let m = &config.model;
        let p = &config.parallel;
        RunIdentity {
            arch: m.arch.name().into(),
            layers: m.layers,
            hidden: m.hidden,
            heads: m.heads,
            vocab: m.vocab,
            seq_len: m.seq_len,
            ffn_hidden: m.ffn_hidden,
            precision: config.training.precision.name().into(),
            global_batch: config.training.global_batch,
            seed: config.training.seed,
            mesh: [p.data, p.tensor, p.pipeline],
            zero: p.zero.stage().into(),
            virtual_stages: p.virtual_stages,
        }
    }
}

/// The directory of the checkpoint after `step` steps.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{step:08}"))
}

/// Complete checkpoints in `dir`, oldest first. A missing `dir` has none.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io(dir))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(MANIFEST).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint in `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, path)| path))
}

fn safetensors_dtype(dtype: Dtype) -> safetensors::Dtype {
    match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::Bf16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::I32 => safetensors::Dtype::I32,
        Dtype::U8 => safetensors::Dtype::U8,
    }
}

/// What a tensor of a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A parameter: equal on every data-parallel rank, written by the first.
    Param,
    /// Master weights or Adam moments: written by the first data-parallel rank, or by every
    /// rank as flat per-unit shards (`adam_m.layers.3`) under ZeRO.
    State,
}

/// Every tensor of a rank's state: (name, handle, shape, kind).
fn state_tensors(units: &[Unit]) -> Vec<(String, Tensor, Vec<usize>, Kind)> {
    let mut tensors = Vec::new();
    for unit in units {
        for placed in &unit.layout.params {
            let name = unit.param_name(placed.spec.name);
            let shape = placed.local_shape.clone();
            if let Some(params) = unit.params() {
                tensors.push((
                    name.clone(),
                    unit.view(params, placed.spec.name),
                    shape.clone(),
                    Kind::Param,
                ));
            }
            if !unit.is_whole() {
                continue;
            }
            let view = |buffer: Tensor| unit.view(buffer, placed.spec.name);
            if let Some(master) = unit.master {
                tensors.push((
                    format!("master.{name}"),
                    view(master),
                    shape.clone(),
                    Kind::State,
                ));
            }
            tensors.push((
                format!("adam_m.{name}"),
                view(unit.adam_m),
                shape.clone(),
                Kind::State,
            ));
            tensors.push((
                format!("adam_v.{name}"),
                view(unit.adam_v),
                shape,
                Kind::State,
            ));
        }
        if !unit.is_whole() {
            let name = unit.name();
            let states = [
                // ZeRO 3 parameters are per-rank shards like the states.
                ("params", unit.params_sharded.then_some(unit.flat_params)),
                ("master", unit.master),
                ("adam_m", Some(unit.adam_m)),
                ("adam_v", Some(unit.adam_v)),
            ];
            for (state, buffer) in states {
                if let Some(buffer) = buffer {
                    tensors.push((
                        format!("{state}.{name}"),
                        buffer,
                        vec![buffer.len],
                        Kind::State,
                    ));
                }
            }
        }
    }
    tensors
}

/// Whether the rank's optimizer states are ZeRO shards (then every data-parallel rank writes
/// its own file).
fn sharded(units: &[Unit]) -> bool {
    !units.iter().all(Unit::is_whole)
}

fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Writes the checkpoint of `step` atomically. Every rank of the run calls it at the same
/// step: rank 0 prepares the directory, each rank that holds state no other rank holds writes
/// its file into the shared partial directory, and once all have (a barrier) rank 0 writes
/// the manifest and renames the directory, which commits the checkpoint for all of them.
pub fn save<B: Backend>(
    dir: &Path,
    step: u64,
    config: &Config,
    backend: &B,
    units: &[Unit],
    loss_scale: LossScale,
    comms: &mut Comms,
) -> Result<PathBuf> {
    let leader = comms.rank == 0;
    let target = step_dir(dir, step);
    let partial = dir.join(format!("{PREFIX}{step:08}{PARTIAL}{}", comms.run_id));
    if leader {
        fs::create_dir_all(dir).map_err(Error::io(dir))?;
        remove_stale_partials(dir)?;
        fs::create_dir(&partial).map_err(Error::io(&partial))?;
    }
    comms.world.barrier()?;

    let first = comms.dp_rank() == 0;
    let sharded = sharded(units);
    if first || sharded {
        let tensors: Vec<_> = state_tensors(units)
            .into_iter()
            .filter(|t| t.3 == Kind::State || first)
            .collect();
        write_tensors(&partial, &rank_file(comms.rank), backend, &tensors)?;
    }
    comms.world.barrier()?;

    if leader {
        // Every rank's file under ZeRO, else those of the first data-parallel rank of each
        // (pipeline, tensor) coordinate.
        let mesh = Mesh::from_config(config);
        let files = (0..mesh.world_size())
            .filter(|&r| sharded || mesh.coord(r).is_ok_and(|c| c.dp_rank == 0))
            .map(rank_file)
            .collect();
        let manifest = Manifest {
            format: FORMAT,
            step,
            samples: step * config.training.global_batch as u64,
            loss_scale,
            run: RunIdentity::of(config),
            files,
            tensors: export::tensor_maps(config),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("invariant: a manifest serialises");
        write_synced(&partial.join(MANIFEST), &json)?;
        sync_dir(&partial)?;
        if target.exists() {
            // A run restarted from an older checkpoint saves this step again: replace it.
            fs::remove_dir_all(&target).map_err(Error::io(&target))?;
        }
        fs::rename(&partial, &target).map_err(Error::io(&target))?;
        sync_dir(dir)?;
    }
    comms.world.barrier()?;
    Ok(target)
}

/// Writes `tensors` into `partial/file`, fsynced.
fn write_tensors<B: Backend>(
    partial: &Path,
    file: &str,
    backend: &B,
    tensors: &[(String, Tensor, Vec<usize>, Kind)],
) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (_, tensor, _, _) in tensors {
        let mut bytes = vec![0u8; tensor.bytes()];
        backend.read_bytes(*tensor, &mut bytes)?;
        data.push(bytes);
    }
    let views = tensors
        .iter()
        .zip(&data)
        .map(|((name, tensor, shape, _), bytes)| {
            (
                name.as_str(),
                safetensors_dtype(tensor.dtype),
                shape.clone(),
                bytes.as_slice(),
            )
        });
    let encoded = encode(views, partial)?;
    write_synced(&partial.join(file), &encoded)
}

/// A safetensors file of `(name, dtype, shape, bytes)` tensors; `path` names it in errors.
fn encode<'a>(
    tensors: impl Iterator<Item = (&'a str, safetensors::Dtype, Vec<usize>, &'a [u8])>,
    path: &Path,
) -> Result<Vec<u8>> {
    let views = tensors.map(|(name, dtype, shape, bytes)| {
        let view =
            TensorView::new(dtype, shape, bytes).expect("invariant: the shape matches the bytes");
        (name, view)
    });
    safetensors::serialize(views, None).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        what: format!("cannot encode the tensors: {e}"),
        help: "this is a bug in tessera; please report it".into(),
    })
}

/// Deletes all but the newest `keep` complete checkpoints.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        fs::remove_dir_all(path).map_err(Error::io(path))?;
    }
    Ok(())
}

/// Removes `.partial-*` directories left by crashed saves.
fn remove_stale_partials(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(Error::io(dir))? {
        let entry = entry.map_err(Error::io(dir))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX) && n.contains(PARTIAL))
        {
            fs::remove_dir_all(entry.path()).map_err(Error::io(entry.path()))?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(Error::io(path))?;
    file.write_all(bytes).map_err(Error::io(path))?;
    file.sync_all().map_err(Error::io(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

/// The manifest of the checkpoint in `path`, checked to be one `config` can read.
pub fn read_manifest(path: &Path, config: &Config) -> Result<Manifest> {
    let bad = |what: String, help: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        what,
        help: help.into(),
    };
    let manifest_path = path.join(MANIFEST);
    let text = fs::read(&manifest_path).map_err(Error::io(&manifest_path))?;
    let not_ours = |e: serde_json::Error| {
        bad(
            format!("{MANIFEST} is not a tessera manifest: {e}"),
            "remove this directory or point checkpoint.dir elsewhere",
        )
    };
    // The format first: an older manifest lacks fields this build reads.
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format = serde_json::from_slice(&text).map_err(not_ours)?;
    if format.format != FORMAT {
        return Err(bad(
            format!("format {} (this build reads {FORMAT})", format.format),
            "resume with the tessera version that wrote it, or start afresh with --fresh",
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&text).map_err(not_ours)?;
    let run = &manifest.run;
    if run.zero > 3 || run.virtual_stages == 0 || run.mesh.contains(&0) {
        return Err(bad(
            format!(
                "its layout is impossible: mesh {:?}, zero {}, virtual stages {}",
                run.mesh, run.zero, run.virtual_stages
            ),
            "the checkpoint is damaged; remove it to resume from the one before",
        ));
    }
    let expected = RunIdentity::of(config);
    if !manifest.run.same_model(&expected) {
        return Err(bad(
            format!(
                "it was written by a different run: {} but the config has {}",
                describe(&manifest.run),
                describe(&expected)
            ),
            "point checkpoint.dir at a new directory to start fresh, or restore the config that wrote it \
             (the mesh, ZeRO stage and virtual stages may differ: the checkpoint is resharded)",
        ));
    }
    Ok(manifest)
}

/// Restores the checkpoint in `path` into the arena; returns its manifest.
pub fn load<B: Backend>(
    path: &Path,
    config: &Config,
    backend: &mut B,
    units: &[Unit],
    comms: &Comms,
) -> Result<Manifest> {
    let bad = |what: String, help: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        what,
        help: help.into(),
    };
    let manifest = read_manifest(path, config)?;
    if !manifest.run.same_layout(&RunIdentity::of(config)) {
        reshard(path, &manifest, config, backend, units, comms)?;
        return Ok(manifest);
    }
    // Parameters (and unsharded states) come from the file of the first rank of this rank's
    // data-parallel group, sharded states from this rank's own.
    let leader = comms.dp.group().ranks[0];
    let own = if sharded(units) { comms.rank } else { leader };
    let first = read_file(path, leader, &bad)?;
    let mine = if own == leader {
        None
    } else {
        Some(read_file(path, own, &bad)?)
    };
    for (name, tensor, shape, kind) in state_tensors(units) {
        let (rank, bytes) = match (&mine, kind) {
            (Some(mine), Kind::State) => (own, mine),
            _ => (leader, &first),
        };
        let stored = safetensors::SafeTensors::deserialize(bytes)
            .expect("invariant: read_file checked the file");
        let view = stored.tensor(&name).map_err(|_| {
            bad(
                format!("{} has no tensor `{name}`", rank_file(rank)),
                "the checkpoint is damaged; remove it to resume from the one before",
            )
        })?;
        if view.dtype() != safetensors_dtype(tensor.dtype) || view.shape() != shape.as_slice() {
            return Err(bad(
                format!(
                    "`{name}` is {:?} {:?}, expected {:?} {shape:?}",
                    view.dtype(),
                    view.shape(),
                    safetensors_dtype(tensor.dtype)
                ),
                "the checkpoint is damaged; remove it to resume from the one before",
            ));
        }
        backend.write_bytes(tensor, view.data())?;
    }
    Ok(manifest)
}

/// Loads a checkpoint written with another layout: every state is consolidated into global
/// tensors (see [`export`]) and this rank takes its tensor shard and ZeRO shard of each. Every
/// rank reads the whole checkpoint (each file once), which is fine for the models a CPU run
/// trains and slow for large ones.
fn reshard<B: Backend>(
    path: &Path,
    manifest: &Manifest,
    config: &Config,
    backend: &mut B,
    units: &[Unit],
    comms: &Comms,
) -> Result<()> {
    use export::{Global, State};
    let written = export::written_config(manifest, config);
    let files = export::Files::read(path, &written)?;
    let consolidate = |state| files.consolidate(&written, state);
    let missing = |what: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        what: format!("it has no {what}"),
        help: "the checkpoint is damaged; remove it to resume from the one before".into(),
    };
    let params = consolidate(State::Params)?.ok_or_else(|| missing("parameters"))?;
    let master = consolidate(State::Master)?;
    let adam_m = consolidate(State::AdamM)?.ok_or_else(|| missing("Adam moments"))?;
    let adam_v = consolidate(State::AdamV)?.ok_or_else(|| missing("Adam moments"))?;
    let shape = ModelShape::new(&config.model, config.parallel.tensor);
    let tp_rank = comms.coord.tp_rank;
    for unit in units {
        for placed in &unit.layout.params {
            let name = placed.spec.name;
            let global_name = unit.param_name(name);
            // This rank's shard of a global tensor; the vocabulary's padding rows are 0.
            let local = |tensors: &BTreeMap<String, Global>| -> Result<Vec<f32>> {
                let global = tensors
                    .get(&global_name)
                    .ok_or_else(|| missing(&format!("tensor `{global_name}`")))?;
                Ok((0..placed.numel() as usize)
                    .map(|i| {
                        let index = global_index(placed, &shape, tp_rank, i);
                        global.values.get(index).copied().unwrap_or(0.0)
                    })
                    .collect())
            };
            let offset = placed.offset as usize;
            let part = |values: &[f32], range: &std::ops::Range<usize>| {
                values[range.start - offset..range.end - offset].to_vec()
            };
            let values = local(&params)?;
            let range = unit.shard_of(name);
            match (unit.params(), &range) {
                (Some(whole), _) => backend.write(unit.view(whole, name), &values)?,
                (None, Some(range)) => {
                    backend.write(unit.params_at(range), &part(&values, range))?
                }
                (None, None) => {}
            }
            let Some(range) = range else { continue };
            if let Some(target) = unit.master {
                // An fp32 run without master weights wrote its parameters in fp32.
                let master = match &master {
                    Some(master) => local(master)?,
                    None => values.clone(),
                };
                backend.write(unit.state_view(target, &range), &part(&master, &range))?;
            }
            let m = local(&adam_m)?;
            backend.write(unit.state_view(unit.adam_m, &range), &part(&m, &range))?;
            let v = local(&adam_v)?;
            backend.write(unit.state_view(unit.adam_v, &range), &part(&v, &range))?;
        }
    }
    Ok(())
}

/// The bytes of rank `rank`'s tensor file, checked to be safetensors.
fn read_file(path: &Path, rank: usize, bad: &impl Fn(String, &str) -> Error) -> Result<Vec<u8>> {
    let file = path.join(rank_file(rank));
    let bytes = fs::read(&file).map_err(Error::io(&file))?;
    if let Err(e) = safetensors::SafeTensors::deserialize(&bytes) {
        return Err(bad(
            format!("{} is not a valid safetensors file: {e}", rank_file(rank)),
            "the checkpoint is damaged; remove it to resume from the one before",
        ));
    }
    Ok(bytes)
}

fn describe(run: &RunIdentity) -> String {
    format!(
        "{} layers x {} hidden, {} heads, vocab {}, seq {}, ffn {}, {}, global batch {}, seed {}, mesh {:?}, zero {}, virtual stages {}",
        run.layers,
        run.hidden,
        run.heads,
        run.vocab,
        run.seq_len,
        run.ffn_hidden,
        run.precision,
        run.global_batch,
        run.seed,
        run.mesh,
        run.zero,
        run.virtual_stages
    )
}

/// Tensors of a checkpoint file by name, as f32 (for tests and tools).
pub fn read_f32(file: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let bytes = fs::read(file).map_err(Error::io(file))?;
    let stored = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Checkpoint {
        path: file.to_path_buf(),
        what: format!("not a valid safetensors file: {e}"),
        help: "pass a checkpoint's rank-*.safetensors file".into(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in stored.iter() {
        let values = match view.dtype() {
            safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(view.data()),
            safetensors::Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(view.data())
                .into_iter()
                .map(f32::from)
                .collect(),
            safetensors::Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(view.data())
                .into_iter()
                .map(f32::from)
                .collect(),
            _ => continue,
        };
        out.insert(name.to_string(), values);
    }
    Ok(out)
}
