//! Checkpoints of a rank: its parameters, fp32 master weights and Adam moments in a safetensors
//! file, and a JSON manifest with what resuming needs (step, data position, loss scale), what
//! must match (model, precision, batch, seed), the layout that wrote it (mesh, ZeRO stage,
//! virtual stages), and a map of every global tensor to its shards in the files (so that tools
//! other than tessera can reassemble it). A run with another layout resumes too: each rank
//! reads just the parts of the files that hold its shards (`reshard`), and [`export`]
//! reassembles the global tensors for tools.
//!
//! A checkpoint is written into `DIR/step-NNNNNNNN.partial-PID`, every file fsynced, then the
//! directory is renamed to `DIR/step-NNNNNNNN` and `DIR` fsynced: the rename is the commit, so
//! a crash at any point leaves the previous checkpoint intact and a `.partial-*` directory
//! that the next save removes. Only directories without that suffix count as checkpoints.
//! The files are written in the background from a host copy of the state ([`Saver`]), and
//! the commit happens once every rank's file is written: after a later step, at the next
//! save, or at the end of the run.
//!
//! Integrity (format 3): each file's header holds the crc32c of every 64 KiB chunk of every
//! tensor, and the manifest holds the crc32c of every file's header ([`read`]), so every byte a
//! rank uses is checked before use. A checkpoint that fails a check (a changed or missing byte,
//! file or tensor, a manifest whose step is not its directory's, or whose layout cannot be)
//! is *damaged*: the rank that found it says where ([`Error::CheckpointDamaged`]), the ranks
//! agree over `comms.world` that the checkpoint is damaged (each checks only what it reads),
//! and all of them try the next older one together. Once they find an intact one, rank 0
//! renames every damaged checkpoint newer than it to `step-NNNNNNNN.damaged`, which
//! [`list`] (and so resuming, restarts and [`prune`]) no longer counts, so a damaged
//! checkpoint never takes the place of an intact one; it stays for a person to look at. When
//! none is intact the run fails and renames nothing. Format-2 manifests (no checksums) still
//! load, unverified.
//!
//! Resuming restores every byte of the model and optimizer state; the data order is a
//! function of (seed, step) and there is no other random state, so the losses that follow
//! are bit-identical to an uninterrupted run.

pub mod export;
pub mod read;
mod reshard;
mod save;
pub mod write;

pub use save::Saver;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_plan::Config;
use tessera_plan::config::Choice as _;
use tessera_plan::memory::Dtype;
use tessera_plan::mesh::Coord;

use crate::error::{Error, Result};
use crate::optim::LossScale;
use crate::parallel::Comms;
use crate::parallel::data::gather_over_group;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;
use read::{IoCount, Reader};

/// The manifest format this build writes.
const FORMAT: u32 = 3;
/// The oldest format it reads: format 2 has no checksums.
const OLDEST_FORMAT: u32 = 2;
const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "step-";
const PARTIAL: &str = ".partial-";
const DAMAGED: &str = ".damaged";

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
    /// How the files' bytes are checked (format 3 on; `None` in format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<Checksums>,
}

/// The checksums of a format-3 checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksums {
    /// `crc32c`.
    pub algorithm: String,
    /// Each tensor's data is checked in chunks of this many bytes (the checksums are in each
    /// file's header, under `__metadata__`: `crc32c.<tensor>`).
    pub chunk_bytes: u64,
    /// The crc32c of each file's header (its 8-byte length and JSON), by file name.
    pub headers: BTreeMap<String, u32>,
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

    /// Why no run can have had this layout, if none can: the manifest is damaged.
    fn impossible_layout(&self) -> Option<String> {
        let [data, tensor, pipeline] = self.mesh;
        let chunks = pipeline.saturating_mul(self.virtual_stages);
        let why = if self.zero > 3 || self.virtual_stages == 0 || self.mesh.contains(&0) {
            "a degree of 0 or a ZeRO stage above 3".to_string()
        } else if !self.heads.is_multiple_of(tensor) || !self.ffn_hidden.is_multiple_of(tensor) {
            format!(
                "tensor {tensor} does not divide heads {} and ffn_hidden {}",
                self.heads, self.ffn_hidden
            )
        } else if !self.layers.is_multiple_of(chunks) {
            format!(
                "pipeline {pipeline} x virtual stages {} does not divide {} layers",
                self.virtual_stages, self.layers
            )
        } else if !self.global_batch.is_multiple_of(data) {
            format!(
                "data {data} does not divide the global batch {}",
                self.global_batch
            )
        } else {
            return None;
        };
        Some(format!(
            "its layout is impossible: mesh {:?}, zero {}, virtual stages {} ({why})",
            self.mesh, self.zero, self.virtual_stages
        ))
    }
}

/// The directory of the checkpoint after `step` steps.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{step:08}"))
}

/// Complete checkpoints in `dir`, oldest first (not partial ones, nor those set aside as
/// damaged). A missing `dir` has none.
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

/// The tensor files a checkpoint of `run`'s layout has: every rank's under ZeRO with more than
/// one data-parallel rank, else those of the first data-parallel rank of each (pipeline,
/// tensor) coordinate.
fn layout_files(run: &RunIdentity) -> Vec<String> {
    let [data, tensor, pipeline] = run.mesh;
    let sharded = run.zero >= 1 && data > 1;
    // dp is outermost: the first data-parallel rank's coordinates are the first ranks.
    let per_replica = tensor * pipeline;
    (0..data * per_replica)
        .filter(|&rank| sharded || rank < per_replica)
        .map(rank_file)
        .collect()
}

/// Which rank loads a checkpoint: what choosing its files needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loader {
    pub rank: usize,
    pub coord: Coord,
    /// The first rank of its data-parallel group (whose file holds whole tensors).
    pub dp_leader: usize,
}

impl Loader {
    pub fn of(comms: &Comms) -> Loader {
        Loader {
            rank: comms.rank,
            coord: comms.coord,
            dp_leader: comms.dp.group().ranks[0],
        }
    }
}

/// Writes `manifest` into `partial` and renames it to `target`: the commit.
fn commit(dir: &Path, partial: &Path, target: &Path, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(manifest).expect("invariant: a manifest serialises");
    write_synced(&partial.join(MANIFEST), &json)?;
    sync_dir(partial)?;
    if target.exists() {
        // A run restarted from an older checkpoint saves this step again: replace it.
        fs::remove_dir_all(target).map_err(Error::io(target))?;
    }
    fs::rename(partial, target).map_err(Error::io(target))?;
    sync_dir(dir)
}

/// Deletes all but the newest `keep` complete checkpoints. Those set aside as damaged are not
/// counted (nor deleted): they never push out an intact one.
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

/// A damage error about the checkpoint in `path`.
fn damaged(path: &Path, what: String) -> Error {
    Error::CheckpointDamaged {
        path: path.to_path_buf(),
        what,
        help: "the run resumes from the newest intact checkpoint; remove this one once you have \
               looked at it"
            .into(),
    }
}

/// The manifest of the checkpoint in `path`, checked to be one `config` can read.
pub fn read_manifest(path: &Path, config: &Config) -> Result<Manifest> {
    Ok(read_manifest_sized(path, config)?.0)
}

/// [`read_manifest`], and the manifest's size in bytes.
fn read_manifest_sized(path: &Path, config: &Config) -> Result<(Manifest, u64)> {
    let bad = |what: String, help: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        what,
        help: help.into(),
    };
    let manifest_path = path.join(MANIFEST);
    let text = match fs::read(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(damaged(path, format!("{MANIFEST} is missing")));
        }
        Err(e) => return Err(Error::io(&manifest_path)(e)),
    };
    let not_ours =
        |e: serde_json::Error| damaged(path, format!("{MANIFEST} is not a tessera manifest: {e}"));
    // The format first: an older manifest lacks fields this build reads.
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format = serde_json::from_slice(&text).map_err(not_ours)?;
    if !(OLDEST_FORMAT..=FORMAT).contains(&format.format) {
        return Err(bad(
            format!(
                "format {} (this build reads {OLDEST_FORMAT} to {FORMAT})",
                format.format
            ),
            "resume with the tessera version that wrote it, or start afresh with --fresh",
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&text).map_err(not_ours)?;
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(PREFIX))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(named) = named
        && named != manifest.step
    {
        return Err(damaged(
            path,
            format!(
                "its manifest says step {}, but the directory is step {named}",
                manifest.step
            ),
        ));
    }
    if let Some(why) = manifest.run.impossible_layout() {
        return Err(damaged(path, why));
    }
    let files = layout_files(&manifest.run);
    if manifest.files != files {
        return Err(damaged(
            path,
            format!(
                "its manifest lists the files {:?}, but its layout has {:?}",
                manifest.files, files
            ),
        ));
    }
    match &manifest.checksums {
        None if manifest.format >= 3 => {
            return Err(damaged(
                path,
                format!("its format-{} manifest has no checksums", manifest.format),
            ));
        }
        Some(sums)
            if sums.algorithm != "crc32c"
                || sums.headers.keys().ne(manifest.files.iter())
                || sums.chunk_bytes == 0 =>
        {
            return Err(damaged(
                path,
                format!(
                    "its manifest's checksums ({} per {} bytes of {} files) do not cover its files",
                    sums.algorithm,
                    sums.chunk_bytes,
                    sums.headers.len()
                ),
            ));
        }
        _ => {}
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
    Ok((manifest, text.len() as u64))
}

/// A reader of the checkpoint in `path` that checks what `manifest` vouches for.
fn reader(path: &Path, manifest: &Manifest) -> Reader {
    Reader::new(
        path,
        manifest.checksums.as_ref().map(|sums| sums.headers.clone()),
    )
}

/// What a rank loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub manifest: Manifest,
    /// What it read (the manifest counts as a header).
    pub read: IoCount,
    /// Bytes of the state it holds (its shard of every parameter and optimizer state).
    pub state_bytes: u64,
}

/// Restores the checkpoint in `path` into the arena of the rank `loader`.
pub fn load<B: Backend>(
    path: &Path,
    config: &Config,
    backend: &mut B,
    units: &[Unit],
    loader: Loader,
) -> Result<Loaded> {
    let (manifest, manifest_bytes) = read_manifest_sized(path, config)?;
    let reader = reader(path, &manifest);
    let state_bytes = state_tensors(units)
        .iter()
        .map(|t| t.1.bytes() as u64)
        .sum();
    if !manifest.run.same_layout(&RunIdentity::of(config)) {
        reshard::reshard(path, &manifest, &reader, config, backend, units, loader)?;
    } else {
        load_same_layout(path, &reader, backend, units, loader)?;
    }
    let mut read = reader.count();
    read.headers += manifest_bytes;
    Ok(Loaded {
        manifest,
        read,
        state_bytes,
    })
}

/// Loads the files of a run laid out like this one: parameters (and unsharded states) from
/// the file of the first rank of this rank's data-parallel group, sharded states from this
/// rank's own; only the tensors this rank holds are read.
fn load_same_layout<B: Backend>(
    path: &Path,
    reader: &Reader,
    backend: &mut B,
    units: &[Unit],
    loader: Loader,
) -> Result<()> {
    let leader = loader.dp_leader;
    let own = if sharded(units) { loader.rank } else { leader };
    for (name, tensor, shape, kind) in state_tensors(units) {
        let rank = if kind == Kind::State { own } else { leader };
        let file = rank_file(rank);
        let stored = reader.stored(&file, &name)?;
        if stored.dtype != safetensors_dtype(tensor.dtype) || stored.shape != shape {
            return Err(damaged(
                path,
                format!(
                    "{file}: `{name}` is {:?} {:?}, expected {:?} {shape:?}",
                    stored.dtype,
                    stored.shape,
                    safetensors_dtype(tensor.dtype)
                ),
            ));
        }
        backend.write_bytes(tensor, &reader.read(&file, &name)?)?;
    }
    Ok(())
}

/// Where a run resumed from.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub path: PathBuf,
    pub loaded: Loaded,
    /// Damaged checkpoints newer than `path`, set aside (by rank 0) as `step-N.damaged`.
    pub set_aside: Vec<(PathBuf, PathBuf)>,
}

/// Restores the newest intact checkpoint in `dir` on every rank of the run (each calls it):
/// the ranks agree on a candidate, load it, and agree on whether every rank found its part
/// intact; if one did not, all try the next older one (see the module docs). `None` when `dir`
/// has no checkpoint; an error when none is intact or a rank failed otherwise.
pub fn resume<B: Backend>(
    dir: &Path,
    config: &Config,
    backend: &mut B,
    units: &[Unit],
    comms: &mut Comms,
) -> Result<Option<Resumed>> {
    let loader = Loader::of(comms);
    let mut older_than = u64::MAX;
    // (path, what this rank found, the ranks that found it damaged)
    let mut damage: Vec<(PathBuf, Option<String>, Vec<usize>)> = Vec::new();
    loop {
        let mine = list(dir)?.into_iter().rev().find(|(s, _)| *s < older_than);
        let proposed = mine.as_ref().map_or(-1.0, |(step, _)| *step as f64);
        let proposals = gather_over_group(comms.world.as_mut(), proposed)?;
        if proposals.iter().any(|&p| p != proposals[0]) {
            let seen: Vec<String> = proposals
                .iter()
                .enumerate()
                .map(|(rank, &p)| match p {
                    p if p < 0.0 => format!("rank {rank}: none"),
                    p => format!("rank {rank}: step {p}"),
                })
                .collect();
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                what: format!(
                    "the ranks see different newest checkpoints ({})",
                    seen.join(", ")
                ),
                help: "checkpoint.dir must be one directory that every rank shares".into(),
            });
        }
        let Some((step, path)) = mine else {
            return match damage.first() {
                None => Ok(None),
                Some((newest, found, ranks)) => Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    what: format!(
                        "no checkpoint there is intact; the newest, {}, is damaged ({})",
                        newest.display(),
                        found
                            .clone()
                            .unwrap_or_else(|| format!("found by rank {}", ranks_list(ranks)))
                    ),
                    help: "look at them and remove the damaged ones, or start afresh with --fresh"
                        .into(),
                }),
            };
        };
        let outcome = load(&path, config, backend, units, loader);
        let code = match &outcome {
            Ok(_) => 0.0,
            Err(Error::CheckpointDamaged { .. }) => 1.0,
            Err(_) => 2.0,
        };
        let codes = gather_over_group(comms.world.as_mut(), code)?;
        let ranks_with =
            |c: f64| -> Vec<usize> { (0..codes.len()).filter(|&r| codes[r] == c).collect() };
        match outcome {
            Err(e) if code == 2.0 => return Err(e),
            _ if codes.contains(&2.0) => {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    what: format!(
                        "rank {} could not read it (its message says why)",
                        ranks_list(&ranks_with(2.0))
                    ),
                    help: "fix what that rank reports, then resume again".into(),
                });
            }
            Ok(loaded) if !codes.contains(&1.0) => {
                let set_aside = if comms.rank == 0 {
                    set_aside(&damage)?
                } else {
                    Vec::new()
                };
                return Ok(Some(Resumed {
                    path,
                    loaded,
                    set_aside,
                }));
            }
            outcome => {
                let found = outcome.err().map(|e| {
                    eprintln!("{e}");
                    e.to_string()
                });
                let ranks = ranks_with(1.0);
                if comms.rank == 0 {
                    eprintln!(
                        "checkpoint {} is damaged (rank {} found where); trying the one before",
                        path.display(),
                        ranks_list(&ranks)
                    );
                }
                damage.push((path, found, ranks));
                older_than = step;
            }
        }
    }
}

/// "0, 3 and 5".
fn ranks_list(ranks: &[usize]) -> String {
    let names: Vec<String> = ranks.iter().map(usize::to_string).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// Renames each damaged checkpoint to `step-N.damaged` (`.damaged-2`, ... if taken), saying
/// so; returns (from, to) for each.
fn set_aside(damage: &[(PathBuf, Option<String>, Vec<usize>)]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut moved = Vec::new();
    for (path, _, _) in damage {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("invariant: list() returns step-N directories");
        let mut to = path.with_file_name(format!("{name}{DAMAGED}"));
        let mut n = 2;
        while to.exists() {
            to = path.with_file_name(format!("{name}{DAMAGED}-{n}"));
            n += 1;
        }
        fs::rename(path, &to).map_err(Error::io(path))?;
        eprintln!(
            "set aside the damaged checkpoint {} as {}",
            path.display(),
            to.display()
        );
        moved.push((path.clone(), to));
    }
    Ok(moved)
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
