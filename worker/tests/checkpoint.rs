//! Checkpoints through the library, one rank in this process: damaged checkpoints are found
//! and fallen back from, manifests that cannot be right are refused, older formats load.

use std::path::{Path, PathBuf};

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::checkpoint;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::{self, Rank, RunOptions, Summary};

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("tessera-checkpoint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One rank of a 2-layer tiny model, checkpoints in `dir`, with `sets` on top.
fn config(dir: &Path, sets: &[&str]) -> Config {
    let mut all: Vec<String> = [
        "parallel.data=1",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "cluster.gpus_per_node=1",
        "model.layers=2",
        "training.global_batch=4",
        "training.steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push(format!("checkpoint.dir={}", dir.display()));
    all.extend(sets.iter().map(|s| s.to_string()));
    Config::from_yaml(
        "tiny-cpu.yaml",
        include_str!("../../configs/tiny-cpu.yaml"),
        &all,
    )
    .unwrap()
}

/// Trains `config` (resuming from its checkpoint directory unless `fresh`).
fn train(config: &Config, fresh: bool) -> tessera_worker::Result<Summary> {
    let layout = ArenaLayout::new(&StagePlan::new(config, 0));
    let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host))?;
    let rank = Rank::new(config.clone(), backend)?;
    let options = RunOptions {
        fresh,
        ..RunOptions::default()
    };
    train::run(rank, &options, |_, _| {})
}

/// (step, loss bits) of a run.
fn losses(summary: &Summary) -> Vec<(u64, u64)> {
    summary
        .metrics
        .iter()
        .map(|m| (m.step, m.loss.to_bits()))
        .collect()
}

/// The steps of the checkpoints in `dir`.
fn steps(dir: &Path) -> Vec<u64> {
    checkpoint::list(dir)
        .unwrap()
        .into_iter()
        .map(|(step, _)| step)
        .collect()
}

/// Where tensor `key`'s data is in the safetensors file `file`: (first byte, bytes).
fn tensor_bytes(file: &Path, key: &str) -> (usize, usize) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header[key]["data_offsets"];
    let (start, end) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    (8 + n + start, end - start)
}

/// Rewrites `file` with `change` applied to the bytes of tensor `key`.
fn damage(file: &Path, key: &str, change: impl Fn(&mut [u8])) {
    let (start, len) = tensor_bytes(file, key);
    let mut bytes = std::fs::read(file).unwrap();
    change(&mut bytes[start..start + len]);
    std::fs::write(file, bytes).unwrap();
}

/// Rewrites `step`'s manifest in `dir` with `change` applied to its JSON.
fn edit_manifest(dir: &Path, step: u64, change: impl Fn(&mut serde_json::Value)) {
    let path = checkpoint::step_dir(dir, step).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    change(&mut manifest);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// A 6-step run that checkpoints at 2, 4 and 6 into `scratch/ckpt`, and the losses of an
/// uninterrupted run of the same config.
fn trained(scratch: &Scratch) -> (PathBuf, Vec<(u64, u64)>) {
    let dir = scratch.path("ckpt");
    let summary = train(&config(&dir, &[]), true).unwrap();
    assert_eq!(steps(&dir), [2, 4, 6]);
    (dir, losses(&summary))
}

#[test]
fn changed_tensor_bytes_make_the_run_resume_from_the_newest_intact_checkpoint() {
    let scratch = Scratch::new("changed");
    let (dir, reference) = trained(&scratch);
    let file = checkpoint::step_dir(&dir, 6).join("rank-00000.safetensors");
    damage(&file, "adam_v.layers.1.fc_w", |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle..middle + 64].fill(0x5a);
    });

    // The run resumes from step 4, trains steps 5 and 6 again with the uninterrupted run's
    // losses, and saves an intact step 6.
    let summary = train(&config(&dir, &[]), false).unwrap();
    assert_eq!(
        summary.resumed_from,
        Some(checkpoint::step_dir(&dir, 4)),
        "the damaged step 6 is not resumed"
    );
    assert_eq!(summary.first_step, 4);
    assert_eq!(losses(&summary), reference[4..]);
    // The damaged checkpoint is set aside, not counted: pruning (keep 3) kept the intact 2.
    assert!(
        dir.join("step-00000006.damaged")
            .join("manifest.json")
            .is_file()
    );
    assert_eq!(steps(&dir), [2, 4, 6]);
}

#[test]
fn zeroed_parameters_are_found_and_the_run_falls_back() {
    let scratch = Scratch::new("zeroed");
    let (dir, reference) = trained(&scratch);
    for step in [4, 6] {
        let file = checkpoint::step_dir(&dir, step).join("rank-00000.safetensors");
        damage(&file, "layers.0.qkv_w", |bytes| bytes.fill(0));
    }
    let summary = train(&config(&dir, &[]), false).unwrap();
    assert_eq!(summary.resumed_from, Some(checkpoint::step_dir(&dir, 2)));
    assert_eq!(losses(&summary), reference[2..]);
    assert!(dir.join("step-00000004.damaged").is_dir());
    assert!(dir.join("step-00000006.damaged").is_dir());
}

#[test]
fn a_manifest_whose_step_is_not_its_directorys_is_damaged() {
    let scratch = Scratch::new("step");
    let (dir, reference) = trained(&scratch);
    edit_manifest(&dir, 6, |m| m["step"] = 5.into());
    let summary = train(&config(&dir, &[]), false).unwrap();
    assert_eq!(summary.resumed_from, Some(checkpoint::step_dir(&dir, 4)));
    assert_eq!(losses(&summary), reference[4..]);
}

#[test]
fn a_manifest_mesh_no_run_can_have_is_an_error_naming_it_not_a_panic() {
    let scratch = Scratch::new("mesh");
    let dir = scratch.path("ckpt");
    train(&config(&dir, &["training.steps=2"]), true).unwrap();
    // Tensor 3 fits no node of this cluster and divides neither heads (4) nor ffn (512).
    edit_manifest(&dir, 2, |m| m["run"]["mesh"] = serde_json::json!([1, 3, 1]));
    let err = train(&config(&dir, &["training.steps=4"]), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no checkpoint there is intact")
            && err.contains("layout is impossible")
            && err.contains("tensor 3 does not divide heads 4"),
        "{err}"
    );
    // Nothing intact to fall back on: the damaged one stays where it is.
    assert_eq!(steps(&dir), [2]);
}

#[test]
fn a_format_2_checkpoint_without_checksums_still_resumes() {
    let scratch = Scratch::new("format-2");
    let (dir, reference) = trained(&scratch);
    // Step 4 as the previous version wrote it: no checksums in the manifest or the file.
    edit_manifest(&dir, 4, |m| {
        m["format"] = 2.into();
        m.as_object_mut().unwrap().remove("checksums");
    });
    let file = checkpoint::step_dir(&dir, 4).join("rank-00000.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let stored = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let plain = safetensors::serialize(stored.tensors(), None).unwrap();
    std::fs::write(&file, plain).unwrap();
    std::fs::remove_dir_all(checkpoint::step_dir(&dir, 6)).unwrap();

    let summary = train(&config(&dir, &[]), false).unwrap();
    assert_eq!(summary.resumed_from, Some(checkpoint::step_dir(&dir, 4)));
    assert_eq!(losses(&summary), reference[4..]);
}

#[test]
fn a_save_does_not_wait_for_its_files_and_the_run_ends_once_they_are_committed() {
    let scratch = Scratch::new("async");
    let dir = scratch.path("ckpt");
    let config = config(&dir, &[]);
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap();
    let rank = Rank::new(config.clone(), backend).unwrap();
    let mut committed_at_save = Vec::new();
    let summary = train::run(rank, &RunOptions::default(), |_, metrics| {
        if metrics.step % 2 == 0 {
            // The step loop goes on while the save of this step is being written: it is
            // committed after a later step (or at the end), never before the loop moves on.
            committed_at_save.push(steps(&dir).contains(&metrics.step));
        }
    })
    .unwrap();
    assert_eq!(committed_at_save, [false, false, false]);
    assert_eq!(
        steps(&dir),
        [2, 4, 6],
        "the run ends once the last save is committed"
    );
    // What was written is the state of its step, though training went on meanwhile: a resume
    // from step 4 continues with the same bits.
    std::fs::remove_dir_all(checkpoint::step_dir(&dir, 6)).unwrap();
    let resumed = train(&config, false).unwrap();
    assert_eq!(resumed.first_step, 4);
    assert_eq!(losses(&resumed), losses(&summary)[4..]);
}
