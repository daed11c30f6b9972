//! `tessera-worker` as a user runs it: training, metrics, checkpoints, resume, crashes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("tessera-worker-{name}-{}", std::process::id()));
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

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The default demo config reduced to one rank.
const ONE_RANK: [&str; 4] = [
    "parallel.data=1",
    "parallel.tensor=1",
    "parallel.pipeline=1",
    "cluster.gpus_per_node=1",
];

fn worker(config: &Path, sets: &[&str], extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-worker"));
    command.arg("--config").arg(config);
    for set in sets {
        command.args(["--set", set]);
    }
    command.args(extra);
    command
}

fn run(mut command: Command) -> Output {
    command.output().expect("tessera-worker starts")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `loss` of each line of a metrics file.
fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            for key in [
                "step",
                "loss",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "mfu",
                "peak_bytes",
            ] {
                assert!(value.get(key).is_some(), "metrics line lacks {key}: {line}");
            }
            (
                value["step"].as_u64().unwrap(),
                value["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_default_config_learns_text_well_below_uniform_loss() {
    let scratch = Scratch::new("learns");
    let metrics = scratch.path("metrics.jsonl");
    let ckpt = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let text = format!("data.path={}", repo("plan/src/**/*.rs").display());
    let mut sets = ONE_RANK.to_vec();
    sets.extend([
        "data.kind=text",
        &text,
        "training.steps=60",
        &ckpt,
        "checkpoint.every=0",
    ]);
    let output = run(worker(
        &repo("configs/tiny-cpu.yaml"),
        &sets,
        &["--metrics", metrics.to_str().unwrap()],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let losses = losses(&metrics);
    assert_eq!(losses.len(), 60);
    let uniform = 256f64.ln();
    // Before any update the model is near uniform (indentation repeats bytes, which tied
    // embeddings already favour a little, so a bit under ln 256).
    let first = losses[0].1;
    assert!(
        first > uniform - 1.0,
        "starts near ln(256) = {uniform:.3}: {first}"
    );
    // Byte-level source code: a 4-layer model gets well under 3 nats in 60 steps. Averaged
    // over the last 5 steps, as single batches vary by a few tenths.
    let last: f64 = losses[55..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    assert!(
        last < 3.0,
        "the last 5 steps average {last}, expected < 3.0 (uniform {uniform:.3})"
    );
}

#[test]
fn a_resumed_run_continues_with_bit_identical_losses() {
    let scratch = Scratch::new("resume");
    let config = repo("configs/tiny-cpu.yaml");
    let mut sets = ONE_RANK.to_vec();
    sets.extend([
        "model.layers=2",
        "training.steps=6",
        "training.global_batch=4",
        "checkpoint.every=3",
    ]);
    let dir_a = format!("checkpoint.dir={}", scratch.path("a").display());
    let dir_b = format!("checkpoint.dir={}", scratch.path("b").display());
    let metrics_a = scratch.path("a.jsonl");
    let metrics_b = scratch.path("b.jsonl");

    let mut sets_a = sets.clone();
    sets_a.push(&dir_a);
    let output = run(worker(
        &config,
        &sets_a,
        &["--metrics", metrics_a.to_str().unwrap()],
    ));
    assert!(output.status.success(), "{}", stderr(&output));

    let mut sets_b = sets.clone();
    sets_b.push(&dir_b);
    let metrics_flag = ["--metrics", metrics_b.to_str().unwrap()];
    let output = run(worker(
        &config,
        &sets_b,
        &[&metrics_flag[..], &["--until-step", "3"]].concat(),
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(worker(&config, &sets_b, &metrics_flag));
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("resuming from"), "{stdout}");

    let (a, b) = (losses(&metrics_a), losses(&metrics_b));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "same steps, same losses, to the bit");
}

#[test]
fn a_kill_during_a_checkpoint_write_leaves_the_previous_one_resumable() {
    let scratch = Scratch::new("kill");
    let config = repo("configs/tiny-cpu.yaml");
    // A wide, short model: a step is quick and a checkpoint (~20 MB, fsynced) is not, so most
    // kills land inside a save.
    let mut sets = ONE_RANK.to_vec();
    sets.extend([
        "model.layers=2",
        "model.hidden=256",
        "model.heads=4",
        "model.ffn_hidden=1024",
        "model.seq_len=16",
        "training.global_batch=2",
        "training.micro_batch=2",
        "training.steps=100",
        "checkpoint.every=1",
        "checkpoint.keep=2",
    ]);
    let dir = scratch.path("ckpt");
    let dir_set = format!("checkpoint.dir={}", dir.display());
    sets.push(&dir_set);

    let mut killed_mid_save = false;
    for attempt in 0..30 {
        let mut child = worker(&config, &sets, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300 + 37 * attempt));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        let partial = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(".partial-"))
            })
            .unwrap_or(false);
        // A kill inside the very first save has no previous checkpoint to fall back on.
        let previous = tessera_worker::checkpoint::latest(&dir).unwrap().is_some();
        if partial && previous {
            killed_mid_save = true;
            break;
        }
    }
    assert!(
        killed_mid_save,
        "no kill landed inside a checkpoint write in 30 tries"
    );

    let metrics = scratch.path("metrics.jsonl");
    let output = run(worker(
        &config,
        &sets,
        &["--metrics", metrics.to_str().unwrap()],
    ));
    assert!(
        output.status.success(),
        "resume after the kill: {}",
        stderr(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("resuming from"), "{stdout}");
    let resumed = losses(&metrics);
    assert_eq!(resumed.last().map(|l| l.0), Some(100));

    // The same steps from scratch give the same losses.
    let fresh_dir = format!("checkpoint.dir={}", scratch.path("fresh").display());
    let mut fresh_sets = sets.clone();
    fresh_sets.push(&fresh_dir);
    fresh_sets.push("checkpoint.every=0");
    let fresh_metrics = scratch.path("fresh.jsonl");
    let output = run(worker(
        &config,
        &fresh_sets,
        &["--metrics", fresh_metrics.to_str().unwrap()],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let fresh = losses(&fresh_metrics);
    assert_eq!(&fresh[fresh.len() - resumed.len()..], &resumed[..]);
    assert!(
        !std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".partial-")),
        "the next save removes the dead partial directory"
    );
}

#[test]
fn a_multi_rank_config_is_refused_with_the_fix() {
    let output = run(worker(&repo("configs/tiny-cpu.yaml"), &[], &[]));
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("runs one rank") && err.contains("8"), "{err}");
    assert!(err.contains("--set parallel.data=1"), "{err}");
}

#[test]
fn bad_config_input_exits_2_without_a_panic() {
    let scratch = Scratch::new("bad-config");
    let output = run(worker(&scratch.path("missing.yaml"), &[], &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("missing.yaml"),
        "{}",
        stderr(&output)
    );
    let output = run(worker(
        &repo("configs/tiny-cpu.yaml"),
        &["parallel.tensr=1"],
        &[],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("did you mean"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("panicked"));
}

/// One rank of a 2-layer model, 2 steps, a checkpoint after each, into `dir` (a
/// `checkpoint.dir=...` setting).
fn checkpointing_every_step(dir: &str) -> Vec<&str> {
    let mut sets = ONE_RANK.to_vec();
    sets.extend([
        "model.layers=2",
        "training.steps=2",
        "training.global_batch=2",
        "checkpoint.every=1",
        dir,
    ]);
    sets
}

#[test]
fn resuming_with_a_different_model_is_refused() {
    let scratch = Scratch::new("mismatch");
    let dir = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let mut sets = checkpointing_every_step(&dir);
    let config = repo("configs/tiny-cpu.yaml");
    assert!(run(worker(&config, &sets, &[])).status.success());
    sets.push("model.hidden=64");
    let output = run(worker(&config, &sets, &[]));
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("different run") && err.contains("checkpoint.dir"),
        "{err}"
    );
}

#[test]
fn a_manifest_with_an_impossible_layout_is_refused() {
    let scratch = Scratch::new("bad-layout");
    let dir = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let sets = checkpointing_every_step(&dir);
    let config = repo("configs/tiny-cpu.yaml");
    assert!(
        run(worker(&config, &sets, &["--until-step", "1"]))
            .status
            .success()
    );
    let manifest = scratch
        .path("ckpt")
        .join("step-00000001")
        .join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let damaged = text.replace("\"zero\": 1", "\"zero\": 9");
    assert_ne!(text, damaged, "the manifest names its ZeRO stage: {text}");
    std::fs::write(&manifest, damaged).unwrap();
    let output = run(worker(&config, &sets, &[]));
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("layout is impossible") && err.contains("zero 9"),
        "{err}"
    );
}

#[test]
fn bad_data_exits_2_naming_the_file_and_offset() {
    let scratch = Scratch::new("bad-data");
    let shard = scratch.path("train.bin");
    let mut tokens = vec![7u16; 400];
    tokens[300] = 999; // past the vocabulary of 256
    tessera_worker::data::write_shard(&shard, &tokens).unwrap();
    let path = format!("data.path={}", shard.display());
    let mut sets = ONE_RANK.to_vec();
    sets.extend(["data.kind=tokens", &path]);
    let output = run(worker(&repo("configs/tiny-cpu.yaml"), &sets, &[]));
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    // The header is 1024 bytes, then 2 bytes per token.
    assert!(
        err.contains("train.bin") && err.contains(&format!("{}", 1024 + 2 * 300)),
        "{err}"
    );
    assert!(err.contains("999"), "{err}");
}

#[test]
fn output_paths_are_checked_before_training() {
    let scratch = Scratch::new("outputs");
    let file = scratch.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let config = repo("configs/tiny-cpu.yaml");
    let checkpoints = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let sets = [&ONE_RANK[..], &[checkpoints.as_str(), "training.steps=2"]].concat();
    let cases: [(Vec<String>, Vec<&str>, String); 3] = [
        (
            vec!["--trace".into(), file.display().to_string()],
            vec![],
            format!("--trace {} is a file", file.display()),
        ),
        (
            vec![
                "--metrics".into(),
                scratch.path("no/such/dir/m.jsonl").display().to_string(),
            ],
            vec![],
            "does not exist".into(),
        ),
        (
            vec![],
            vec!["checkpoint.every=1"],
            format!("checkpoint.dir {}: is a file", file.display()),
        ),
    ];
    for (extra, more_sets, expected) in cases {
        let mut all_sets = sets.clone();
        let in_place = format!("checkpoint.dir={}", file.display());
        if !more_sets.is_empty() {
            all_sets.push(&in_place);
            all_sets.extend(more_sets);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let output = run(worker(&config, &all_sets, &extra));
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{message}");
        assert!(message.contains(&expected), "{expected:?} not in {message}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!stdout.contains("step "), "nothing trained: {stdout}");
    }
}

#[test]
fn a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_one_before() {
    let scratch = Scratch::new("damaged");
    let config = repo("configs/tiny-cpu.yaml");
    let dir = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let mut sets = checkpointing_every_step(&dir);
    sets.push("training.steps=4");
    let reference = scratch.path("reference.jsonl");
    let reference_dir = format!("checkpoint.dir={}", scratch.path("reference").display());
    let mut reference_sets = sets.clone();
    reference_sets.push(&reference_dir);
    let output = run(worker(
        &config,
        &reference_sets,
        &["--metrics", reference.to_str().unwrap()],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(worker(&config, &sets, &["--until-step", "3"]));
    assert!(output.status.success(), "{}", stderr(&output));

    // Overwrite bytes in the middle of one tensor of the newest checkpoint (step 3).
    let file = scratch
        .path("ckpt")
        .join("step-00000003")
        .join("rank-00000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header["layers.1.fc_w"]["data_offsets"];
    let middle = 8 + n + (offsets[0].as_u64().unwrap() + offsets[1].as_u64().unwrap()) as usize / 2;
    bytes[middle..middle + 16].fill(0xff);
    std::fs::write(&file, bytes).unwrap();

    let metrics = scratch.path("metrics.jsonl");
    let output = run(worker(
        &config,
        &sets,
        &["--metrics", metrics.to_str().unwrap()],
    ));
    let (out, err) = (String::from_utf8_lossy(&output.stdout), stderr(&output));
    assert!(output.status.success(), "{err}");
    assert!(
        err.contains("step-00000003 is damaged: rank-00000.safetensors tensor `layers.1.fc_w`")
            && err.contains("fail their crc32c check"),
        "the damage is named with its file and tensor: {err}"
    );
    assert!(
        err.contains("set aside the damaged checkpoint") && err.contains("step-00000003.damaged"),
        "{err}"
    );
    assert!(
        out.contains("resuming from") && out.contains("step-00000002"),
        "{out}"
    );
    // Steps 3 and 4 again, with the losses of the run that was never damaged.
    assert_eq!(losses(&metrics), losses(&reference)[2..]);
}

#[test]
fn a_failed_background_write_fails_the_run_naming_the_file() {
    let scratch = Scratch::new("write-fails");
    let dir = format!("checkpoint.dir={}", scratch.path("ckpt").display());
    let sets = checkpointing_every_step(&dir);
    // Files may not grow past 64 KiB (ulimit -f counts 512-byte blocks in sh, 1024 in bash:
    // either is below a checkpoint of this model), and going past fails the write instead of
    // killing the process.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("--config")
        .arg(repo("configs/tiny-cpu.yaml"));
    for set in &sets {
        command.args(["--set", set]);
    }
    let output = run(command);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step-00000001.partial-") && err.contains("rank-00000.safetensors"),
        "the error names the file it could not write: {err}"
    );
    assert!(err.contains("File too large"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        tessera_worker::checkpoint::list(&scratch.path("ckpt"))
            .unwrap()
            .is_empty(),
        "nothing half-written is committed"
    );
}
