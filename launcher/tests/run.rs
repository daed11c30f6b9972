//! `launch` training for real: a coordinator, worker processes on 127.0.0.1, collectives over
//! TCP. Checks data parallelism against one process, failure handling, and that no worker
//! outlives the launcher.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Losses of different meshes may differ by float summation order only.
const MESH_TOLERANCE: f64 = 1e-5;

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tessera-run-{name}-{}", std::process::id()));
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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent")
        .to_path_buf()
}

/// `launch --config configs/tiny-cpu.yaml` with `sets` (each `key=value`) and `extra` flags,
/// checkpoints in `scratch/ckpt`, metrics in `scratch/metrics.jsonl`.
fn launch(scratch: &Scratch, sets: &[&str], extra: &[&str]) -> Command {
    launch_config(TINY_GPT2, scratch, sets, extra)
}

const TINY_GPT2: &str = "configs/tiny-cpu.yaml";
const TINY_LLAMA: &str = "configs/tiny-llama-cpu.yaml";

/// `launch` as above, of `config`.
fn launch_config(config: &str, scratch: &Scratch, sets: &[&str], extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_launch"));
    command
        .current_dir(repo())
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_COORDINATOR")
        .args(["--config", config, "--threads", "1"])
        .arg("--metrics")
        .arg(scratch.path("metrics.jsonl"))
        .args(["--set", "parallel.tensor=1", "--set", "parallel.pipeline=1"])
        .arg("--set")
        .arg(format!("checkpoint.dir={}", scratch.path("ckpt").display()));
    for set in sets {
        command.args(["--set", set]);
    }
    command.args(extra);
    command
}

fn output(mut command: Command) -> Output {
    command.output().expect("launch runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// (step, `key`) of each line of a metrics file.
fn metric(metrics: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            (
                value["step"].as_u64().expect("step"),
                value[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key} in {line}")),
            )
        })
        .collect()
}

fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    metric(metrics, "loss")
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], tolerance: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (&(step_a, loss_a), &(step_b, loss_b)) in a.iter().zip(b) {
        assert_eq!(step_a, step_b);
        let relative = (loss_a - loss_b).abs() / loss_b.abs();
        assert!(
            relative <= tolerance,
            "step {step_a}: {loss_a} vs {loss_b} ({relative:e} relative)"
        );
    }
}

/// Processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// The RANK a worker process was started with.
fn rank_of(pid: u32) -> Option<u32> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes; /proc/PID/stat's state is after the name.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Polls `condition` every 50 ms for up to `limit`.
fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts `launch` in the background and waits until rank 0 has reported `step` steps.
fn start_and_wait_for_step(scratch: &Scratch, sets: &[&str], step: u64) -> (Child, Vec<u32>) {
    let mut command = launch(scratch, sets, &[]);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("launch starts");
    let metrics = scratch.path("metrics.jsonl");
    let reached = wait_for(Duration::from_secs(120), || {
        losses(&metrics).last().is_some_and(|&(s, _)| s >= step)
    });
    if !reached {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("the run never reached step {step}: {}", text(&out.stderr));
    }
    let workers = children(child.id());
    (child, workers)
}

#[test]
fn data_parallel_over_four_processes_trains_like_one_process() {
    let steps = "training.steps=6";
    let single = Scratch::new("dp1");
    let out = output(launch(&single, &[steps, "parallel.data=1"], &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let four = Scratch::new("dp4");
    let out = output(launch(
        &four,
        &[steps, "parallel.data=4", "checkpoint.every=3"],
        &[],
    ));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("done: 6 steps on 4 ranks"), "{stdout}");
    let reference = losses(&single.path("metrics.jsonl"));
    let parallel = losses(&four.path("metrics.jsonl"));
    assert_eq!(reference.len(), 6);
    assert_close(&parallel, &reference, MESH_TOLERANCE);
    assert!(
        reference[5].1 < reference[0].1,
        "the loss falls: {reference:?}"
    );

    // Run again: the checkpoint of the last step is there, so there is nothing to train.
    let again = output(launch(
        &four,
        &[steps, "parallel.data=4", "checkpoint.every=3"],
        &[],
    ));
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(stdout.contains("nothing to train"), "{stdout}");
    assert!(stdout.contains("done: 0 steps on 4 ranks"), "{stdout}");
    assert_eq!(
        losses(&four.path("metrics.jsonl")),
        parallel,
        "no new metrics"
    );

    // ZeRO 1 shards resume on the same mesh with the same losses: restart from step 3.
    let resumed = Scratch::new("dp4-resume");
    let source = four.path("ckpt").join("step-00000003");
    let target = resumed.path("ckpt").join("step-00000003");
    std::fs::create_dir_all(&target).unwrap();
    for file in std::fs::read_dir(&source).unwrap().flatten() {
        std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
    }
    let out = output(launch(
        &resumed,
        &[steps, "parallel.data=4", "checkpoint.every=3"],
        &[],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[rank 0] resuming from"));
    assert_eq!(
        losses(&resumed.path("metrics.jsonl")),
        parallel[3..],
        "a resumed run continues with the same bits"
    );
}

/// One run of the equivalence matrix: a mesh and how it keeps its state.
#[derive(Debug, Clone, Copy)]
struct Layout {
    data: usize,
    tensor: usize,
    pipeline: usize,
    virtual_stages: usize,
    zero: usize,
    recompute: &'static str,
    offload: bool,
    /// `parallel.pipeline_layers`, when the stages' layers are not even.
    split: Option<&'static str>,
}

impl Layout {
    const fn mesh(data: usize, tensor: usize, pipeline: usize, virtual_stages: usize) -> Layout {
        Layout {
            data,
            tensor,
            pipeline,
            virtual_stages,
            zero: 0,
            recompute: "none",
            offload: false,
            split: None,
        }
    }

    fn sets(&self) -> Vec<String> {
        let schedule = if self.virtual_stages > 1 {
            "interleaved"
        } else {
            "1f1b"
        };
        vec![
            format!("parallel.data={}", self.data),
            format!("parallel.tensor={}", self.tensor),
            format!("parallel.pipeline={}", self.pipeline),
            format!("parallel.virtual_stages={}", self.virtual_stages),
            format!("parallel.schedule={schedule}"),
            format!("parallel.zero={}", self.zero),
            format!("parallel.recompute={}", self.recompute),
            format!("parallel.offload.optimizer={}", self.offload),
            format!("parallel.pipeline_layers={}", self.split.unwrap_or("[]")),
        ]
    }
}

/// The meshes of the equivalence matrix: every axis alone, interleaving, and all three.
const MESHES: [Layout; 6] = [
    Layout::mesh(1, 1, 1, 1),
    Layout::mesh(2, 1, 1, 1),
    Layout::mesh(1, 2, 1, 1),
    Layout::mesh(1, 1, 2, 1),
    Layout::mesh(1, 1, 4, 2),
    Layout::mesh(2, 2, 2, 1),
];

/// `launch export` of `scratch/ckpt`'s newest checkpoint into `scratch/model.safetensors`.
fn export(scratch: &Scratch, sets: &[&str]) -> Command {
    export_config(TINY_GPT2, scratch, sets)
}

fn export_config(config: &str, scratch: &Scratch, sets: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_launch"));
    command
        .current_dir(repo())
        .args(["export", "--config", config, "--out"])
        .arg(scratch.path("model.safetensors"))
        .arg("--set")
        .arg(format!("checkpoint.dir={}", scratch.path("ckpt").display()));
    for set in sets {
        command.args(["--set", set]);
    }
    command
}

/// The model of `scratch`'s newest checkpoint as global tensors, through `launch export`.
fn exported(config: &str, scratch: &Scratch, sets: &[&str]) -> Vec<(String, Vec<f32>)> {
    let out = scratch.path("model.safetensors");
    let result = output(export_config(config, scratch, sets));
    assert!(result.status.success(), "{}", text(&result.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Trains each layout for 3 steps of an 8-layer tiny model of `config` (so that 4 stages x 2
/// chunks divide it) and checks every step's loss and gradient norm against one process, the
/// final weights (exported from each run's checkpoint) to 1e-4, and that every rank allocated
/// what the dry-run planned.
fn trains_like_one_process(config: &str, layouts: &[Layout]) {
    let common = ["model.layers=8", "training.steps=3", "checkpoint.every=3"];
    let run = |name: &str, layout: &Layout| {
        let scratch = Scratch::new(name);
        let sets: Vec<String> = common
            .iter()
            .map(|s| s.to_string())
            .chain(layout.sets())
            .collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = output(launch_config(config, &scratch, &sets, &[]));
        assert!(out.status.success(), "{layout:?}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        for stage in 0..layout.pipeline {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(&format!("stage {stage} (")) && l.ends_with("(equal)")),
                "{layout:?}: {stdout}\n{}",
                text(&out.stderr)
            );
        }
        let metrics = scratch.path("metrics.jsonl");
        let mut all_sets = vec!["parallel.tensor=1", "parallel.pipeline=1"];
        all_sets.extend(&sets);
        let weights = exported(config, &scratch, &all_sets);
        (losses(&metrics), metric(&metrics, "grad_norm"), weights)
    };
    // Scratch directories per config: the two families' matrices run at the same time.
    let family = std::path::Path::new(config)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("config")
        .to_string();
    let (loss, norm, weights) = run(&format!("matrix-{family}-reference"), &MESHES[0]);
    assert_eq!(loss.len(), 3);
    for (i, layout) in layouts.iter().enumerate() {
        let (got_loss, got_norm, got_weights) = run(&format!("matrix-{family}-{i}"), layout);
        assert_close(&got_loss, &loss, MESH_TOLERANCE);
        assert_close(&got_norm, &norm, MESH_TOLERANCE);
        assert_eq!(
            got_weights.len(),
            weights.len(),
            "{layout:?}: the same tensors"
        );
        for ((name, got), (expected_name, expected)) in got_weights.iter().zip(&weights) {
            assert_eq!(name, expected_name);
            assert_eq!(got.len(), expected.len(), "{layout:?}: {name}");
            let worst = got
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "{layout:?}: {name} differs by {worst}");
        }
    }
}

#[test]
fn every_parallel_mode_trains_like_one_process() {
    // A representative subset of the whole matrix (the release test below): each mesh, each
    // recompute mode, each ZeRO stage and offload on some.
    let with = |mesh: Layout, zero: usize, recompute: &'static str, offload: bool| Layout {
        zero,
        recompute,
        offload,
        ..mesh
    };
    trains_like_one_process(
        TINY_GPT2,
        &[
            with(MESHES[1], 3, "selective", false),
            with(MESHES[2], 0, "full", false),
            with(MESHES[3], 1, "none", true),
            with(MESHES[4], 0, "selective", false),
            with(MESHES[5], 2, "full", false),
            with(MESHES[5], 3, "none", true),
        ],
    );
}

#[test]
fn every_parallel_mode_trains_a_llama_like_one_process() {
    // Grouped-query attention with kv_heads = tensor, rotary positions, SwiGLU and the untied
    // head, through each axis: ZeRO 1 over data, tensor with sequence parallelism, the head on
    // the last of two stages, all three with ZeRO 3 and full recompute, an uneven split.
    let with = |mesh: Layout, zero: usize, recompute: &'static str| Layout {
        zero,
        recompute,
        ..mesh
    };
    let uneven = Layout {
        split: Some("[5, 3]"),
        ..with(MESHES[3], 2, "selective")
    };
    trains_like_one_process(
        TINY_LLAMA,
        &[
            with(MESHES[1], 1, "none"),
            with(MESHES[2], 0, "none"),
            with(MESHES[3], 0, "selective"),
            with(MESHES[5], 3, "full"),
            uneven,
        ],
    );
}

/// The whole matrix: every mesh x ZeRO stage x recompute mode x offload, for both families.
/// Minutes on two cores;
/// run with `cargo test --release -p tessera-launcher --test run -- --ignored`.
#[test]
#[ignore = "the whole equivalence matrix takes minutes; CI runs the subset above"]
fn the_whole_equivalence_matrix_trains_like_one_process() {
    let mut layouts = Vec::new();
    for mesh in MESHES {
        for zero in [0, 1, 2, 3] {
            for recompute in ["none", "selective", "full"] {
                for offload in [false, true] {
                    layouts.push(Layout {
                        zero,
                        recompute,
                        offload,
                        ..mesh
                    });
                }
            }
        }
    }
    trains_like_one_process(TINY_GPT2, &layouts);
    trains_like_one_process(TINY_LLAMA, &layouts);
}

#[test]
fn a_killed_worker_stops_every_rank_and_the_launcher_names_it() {
    let scratch = Scratch::new("kill");
    let sets = [
        "parallel.data=4",
        "training.steps=100000",
        "checkpoint.every=0",
        "restart.max=0",
    ];
    let (child, workers) = start_and_wait_for_step(&scratch, &sets, 2);
    assert_eq!(workers.len(), 4, "one process per rank");
    let victim = *workers
        .iter()
        .find(|&&pid| rank_of(pid) == Some(2))
        .expect("a worker with RANK=2");
    let killed = Instant::now();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = killed.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: rank 2 (pid {victim}) was killed by SIGKILL"
        )),
        "{stderr}"
    );
    // Where each rank was: the heartbeats' last collectives, the rarest first.
    assert!(stderr.contains("last collectives: "), "{stderr}");
    assert!(stderr.contains(" in group "), "{stderr}");
    for rank in [0, 1, 3] {
        assert!(
            stderr
                .lines()
                .any(
                    |l| l.starts_with(&format!("[rank {rank}] ")) && l.contains("failed after")
                        || l.starts_with(&format!("[rank {rank}] rank {rank}: stopping"))
                ),
            "rank {rank} reported its failure: {stderr}"
        );
    }
    // Detected at once (the process exits); every rank stopped well within 10 s.
    assert!(elapsed < Duration::from_secs(10), "stopped in {elapsed:?}");
    assert!(workers.iter().all(|&pid| !alive(pid)), "no worker survives");
}

/// `runs` runs of the 8-rank tiny job (data 2 x tensor 2 x pipeline 2, checkpointing every
/// 3 steps), each with a random worker SIGKILLed at a random moment after step 1: the
/// launcher names the killed rank first, and every survivor exits on its own with status 1
/// after a failed collective (none dies of a signal, none has to be stopped).
fn random_kills(runs: usize) {
    // Printed, so that a failing run can be repeated with TESSERA_KILL_SEED.
    let seed = std::env::var("TESSERA_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("random kills: TESSERA_KILL_SEED={seed}");
    let mut state = seed | 1;
    let mut random = move |below: u64| {
        // xorshift64: enough to spread victims and moments.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let sets = [
        "parallel.data=2",
        "parallel.tensor=2",
        "parallel.pipeline=2",
        "training.steps=100000",
        "checkpoint.every=3",
        "restart.max=0",
    ];
    for run in 0..runs {
        let scratch = Scratch::new(&format!("random-kill-{run}"));
        let (child, workers) = start_and_wait_for_step(&scratch, &sets, 1 + random(3));
        assert_eq!(workers.len(), 8, "one process per rank");
        std::thread::sleep(Duration::from_millis(random(400)));
        let victim = workers[random(8) as usize];
        let rank = rank_of(victim).expect("a worker has a RANK");
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        let context = format!("run {run} (seed {seed}), rank {rank} killed:\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "{context}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {context}"));
        assert!(
            error.starts_with(&format!(
                "error: rank {rank} (pid {victim}) was killed by SIGKILL"
            )),
            "the killed rank is named first: {context}"
        );
        let then = stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix("then: "))
            .unwrap_or_else(|| panic!("no consequences: {context}"));
        let others: Vec<String> = (0..8)
            .filter(|&r| r != rank)
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            then,
            format!(
                "ranks {} exited with status 1 (their collectives failed with it)",
                others.join(", ")
            ),
            "every survivor ended on its own after a failed collective: {context}"
        );
        assert!(
            workers.iter().all(|&pid| !alive(pid)),
            "no worker survives: {context}"
        );
    }
}

#[test]
fn a_randomly_killed_worker_is_named_first_and_every_survivor_exits_on_its_own() {
    random_kills(5);
}

/// The stress version: `cargo test --release -p tessera-launcher --test run -- --ignored
/// thirty_random_kills` (about 3 minutes on two cores).
#[test]
#[ignore = "30 runs take minutes; CI runs 5"]
fn thirty_random_kills() {
    random_kills(30);
}

#[test]
fn a_stopped_worker_is_named_once_its_heartbeats_stop_and_nothing_is_left_running() {
    let scratch = Scratch::new("sigstop");
    let sets = [
        "parallel.data=2",
        "training.steps=100000",
        "checkpoint.every=0",
        "restart.max=0",
        "watchdog.heartbeat=0.5",
        "watchdog.heartbeat_timeout=3",
    ];
    let (child, workers) = start_and_wait_for_step(&scratch, &sets, 1);
    let victim = *workers
        .iter()
        .find(|&&pid| rank_of(pid) == Some(1))
        .expect("a worker with RANK=1");
    let stopped = Instant::now();
    // A hang: the process exists, its sockets stay open, it just never answers.
    kill(Pid::from_raw(victim as i32), Signal::SIGSTOP).unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = stopped.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: rank 1 (pid {victim}) sent no heartbeat for "
        )),
        "{stderr}"
    );
    assert!(stderr.contains("last collectives: "), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "detected in {elapsed:?}");
    assert!(workers.iter().all(|&pid| !alive(pid)), "no worker survives");
}

/// The last loss reported for each step (a restart reports the steps since its checkpoint
/// again).
fn last_per_step(losses: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for &(step, loss) in losses {
        by_step.insert(step, loss);
    }
    by_step.into_iter().collect()
}

/// A 12-step run that checkpoints every 3 steps and may restart once: after the first
/// checkpoint rank 1 gets `signal`; the run must name it (`named`, given its pid), restart from
/// a checkpoint and end with the uninterrupted run's losses, bit for bit.
fn restarts_after(tag: &str, signal: Signal, named: impl Fn(u32) -> String) {
    let sets = [
        "parallel.data=2",
        "training.steps=12",
        "checkpoint.every=3",
        "restart.max=1",
        "watchdog.heartbeat=0.5",
        "watchdog.heartbeat_timeout=3",
    ];
    let uninterrupted = Scratch::new(&format!("{tag}-reference"));
    let out = output(launch(&uninterrupted, &sets, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reference = losses(&uninterrupted.path("metrics.jsonl"));
    assert_eq!(reference.len(), 12);

    let scratch = Scratch::new(tag);
    let mut command = launch(&scratch, &sets, &[]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("launch starts");
    let metrics = scratch.path("metrics.jsonl");
    let checkpoint = scratch.path("ckpt").join("step-00000003");
    assert!(
        wait_for(Duration::from_secs(120), || {
            checkpoint.join("manifest.json").exists()
                && losses(&metrics).last().is_some_and(|&(s, _)| s >= 4)
        }),
        "the run never passed its first checkpoint"
    );
    let victim = children(child.id())
        .into_iter()
        .find(|&pid| rank_of(pid) == Some(1))
        .expect("a worker with RANK=1");
    kill(Pid::from_raw(victim as i32), signal).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(&named(victim)), "{stderr}");
    assert!(
        stdout.contains("restart 1 of 1: from ") && stdout.contains("step-0000000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("done: 12 steps on 2 ranks after 1 restart"),
        "{stdout}"
    );
    // Resuming restores every byte, so the losses are the uninterrupted run's, bit for bit.
    assert_eq!(last_per_step(&losses(&metrics)), reference);
    assert!(!alive(victim), "the stopped worker was killed");
}

#[test]
fn a_killed_worker_restarts_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run() {
    restarts_after("restart-kill", Signal::SIGKILL, |pid| {
        format!("error: rank 1 (pid {pid}) was killed by SIGKILL")
    });
}

#[test]
fn a_stopped_worker_restarts_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run() {
    restarts_after("restart-stop", Signal::SIGSTOP, |pid| {
        format!("error: rank 1 (pid {pid}) sent no heartbeat for ")
    });
}

#[test]
fn a_second_failure_after_the_last_restart_fails_the_job() {
    let scratch = Scratch::new("restart-exhausted");
    let sets = [
        "parallel.data=2",
        "training.steps=100000",
        "checkpoint.every=0",
        "restart.max=1",
    ];
    let mut command = launch(&scratch, &sets, &[]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("launch starts");
    let metrics = scratch.path("metrics.jsonl");
    let mut killed = Vec::new();
    for round in 0..2 {
        // Each attempt starts its own workers; wait for the new ones to train a step.
        let before = losses(&metrics).len();
        assert!(
            wait_for(Duration::from_secs(120), || losses(&metrics).len() > before),
            "attempt {round} never trained"
        );
        let victim = children(child.id())
            .into_iter()
            .find(|&pid| rank_of(pid) == Some(0) && !killed.contains(&pid))
            .expect("a worker with RANK=0");
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        killed.push(victim);
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("restart 1 of 1: from the initial weights (no checkpoint yet)"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "error: rank 0 (pid {}) was killed by SIGKILL",
            killed[1]
        )),
        "{stderr}"
    );
}

#[test]
fn no_worker_outlives_a_sigkilled_launcher() {
    let scratch = Scratch::new("orphans");
    let sets = [
        "parallel.data=2",
        "training.steps=100000",
        "checkpoint.every=0",
    ];
    let (mut child, workers) = start_and_wait_for_step(&scratch, &sets, 1);
    assert_eq!(workers.len(), 2);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || workers
            .iter()
            .all(|&pid| !alive(pid))),
        "workers {workers:?} survived the launcher"
    );
}

#[test]
fn ctrl_c_stops_every_worker_and_exits_130() {
    let scratch = Scratch::new("ctrl-c");
    let sets = [
        "parallel.data=2",
        "training.steps=100000",
        "checkpoint.every=0",
    ];
    let (child, workers) = start_and_wait_for_step(&scratch, &sets, 1);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted; every worker was stopped"));
    assert!(workers.iter().all(|&pid| !alive(pid)), "no worker survives");
}

#[test]
fn trace_holds_every_ranks_forward_backward_collectives_and_optimizer() {
    let scratch = Scratch::new("trace");
    let dir = scratch.path("trace");
    let sets = [
        "parallel.data=2",
        "parallel.pipeline=2",
        "training.steps=2",
        "checkpoint.every=0",
    ];
    let out = output(launch(&scratch, &sets, &["--trace", dir.to_str().unwrap()]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("traces: "),
        "{}",
        text(&out.stdout)
    );
    // 16 sequences per step in microbatches of 2 over 2 data-parallel ranks: 4 per rank.
    let microbatches = 2 * 4;
    for rank in 0..4 {
        let path = dir.join(format!("rank-{rank:05}.json"));
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).expect("valid JSON");
        let events = trace["traceEvents"].as_array().expect("traceEvents");
        let spans = |category: &str| {
            events
                .iter()
                .filter(|e| e["ph"] == "X" && e["cat"] == category)
                .map(|e| e["name"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(spans("forward").len(), microbatches, "rank {rank}");
        assert_eq!(spans("backward").len(), microbatches, "rank {rank}");
        assert_eq!(spans("optimizer").len(), 2, "rank {rank}");
        assert_eq!(spans("step"), ["step 1", "step 2"], "rank {rank}");
        let collectives = spans("collective");
        // Tensor 1: ranks alternate between the two stages.
        let stage = rank % 2;
        let (sent, received) = if stage == 0 {
            ("send", "recv")
        } else {
            ("recv", "send")
        };
        assert!(
            collectives.iter().any(|c| c.starts_with(sent))
                && collectives.iter().any(|c| c.starts_with(received)),
            "rank {rank}: activations one way, gradients the other: {collectives:?}"
        );
        assert!(
            collectives.iter().any(|c| c.starts_with("reduce_scatter")),
            "rank {rank}: ZeRO 1's gradient reduction: {collectives:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "M" && e["args"]["name"] == "compute"),
            "rank {rank}: named tracks"
        );
    }
}

#[test]
fn export_without_a_checkpoint_says_where_it_looked() {
    let scratch = Scratch::new("export-none");
    let out = output(export(&scratch, &[]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no checkpoint in"), "{stderr}");
    assert!(stderr.contains("--checkpoint DIR"), "{stderr}");
    assert!(!scratch.path("model.safetensors").exists());
}

#[test]
fn a_checkpoint_resumes_on_other_meshes_with_the_losses_of_one_process() {
    // 20 steps on (data 2, tensor 2, pipeline 2), then steps 21-24 on (4,1,1), (1,2,1) and
    // (1,1,4), each with ZeRO 0 and 3, against one process that trained all 24.
    let common = ["training.steps=24", "checkpoint.every=20"];
    let single = Scratch::new("reshard-1");
    let mut sets = common.to_vec();
    sets.push("parallel.data=1");
    let out = output(launch(&single, &sets, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reference = losses(&single.path("metrics.jsonl"));
    assert_eq!(reference.len(), 24);

    let source = Scratch::new("reshard-222");
    let mut sets = common.to_vec();
    sets.extend([
        "parallel.data=2",
        "parallel.tensor=2",
        "parallel.pipeline=2",
    ]);
    let out = output(launch(&source, &sets, &["--fresh"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let checkpoint = source.path("ckpt").join("step-00000020");

    for (data, tensor, pipeline) in [(4, 1, 1), (1, 2, 1), (1, 1, 4)] {
        for zero in [0, 3] {
            let name = format!("reshard-{data}{tensor}{pipeline}-zero{zero}");
            let target = Scratch::new(&name);
            let copy = target.path("ckpt").join("step-00000020");
            std::fs::create_dir_all(&copy).unwrap();
            for file in std::fs::read_dir(&checkpoint).unwrap().flatten() {
                std::fs::copy(file.path(), copy.join(file.file_name())).unwrap();
            }
            let mesh = [
                format!("parallel.data={data}"),
                format!("parallel.tensor={tensor}"),
                format!("parallel.pipeline={pipeline}"),
                format!("parallel.zero={zero}"),
            ];
            let mut sets = common.to_vec();
            sets.extend(mesh.iter().map(String::as_str));
            let out = output(launch(&target, &sets, &[]));
            assert!(out.status.success(), "{name}: {}", text(&out.stderr));
            assert!(text(&out.stdout).contains("resuming from"), "{name}");
            assert_close(
                &losses(&target.path("metrics.jsonl")),
                &reference[20..],
                MESH_TOLERANCE,
            );
        }
    }
}

/// (step, val_loss) of the metrics lines that have one.
fn val_losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            Some((value["step"].as_u64()?, value["val_loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn the_validation_loss_is_the_same_on_every_mesh_and_leaves_training_alone() {
    for config in [TINY_GPT2, TINY_LLAMA] {
        let common = ["training.steps=5", "checkpoint.every=0", "model.layers=4"];
        let eval = ["eval.every=2", "eval.batches=2"];
        let run = |name: &str, mesh: [&str; 3], with_eval: bool| {
            let scratch = Scratch::new(name);
            let mut sets = common.to_vec();
            sets.extend(mesh);
            if with_eval {
                sets.extend(eval);
            }
            let out = output(launch_config(config, &scratch, &sets, &["--fresh"]));
            assert!(out.status.success(), "{name}: {}", text(&out.stderr));
            let metrics = scratch.path("metrics.jsonl");
            (losses(&metrics), val_losses(&metrics), text(&out.stdout))
        };
        let one = [
            "parallel.data=1",
            "parallel.tensor=1",
            "parallel.pipeline=1",
        ];
        let (plain, none, _) = run("eval-off", one, false);
        assert!(none.is_empty(), "no eval section, no val_loss");
        let (loss, val, stdout) = run("eval-1", one, true);
        assert_eq!(
            loss, plain,
            "{config}: evaluating changes no bit of training"
        );
        let steps: Vec<u64> = val.iter().map(|&(step, _)| step).collect();
        assert_eq!(steps, [2, 4, 5], "every 2 steps and after the last");
        assert!(stdout.contains("| val loss "), "{stdout}");
        let (_, mesh_val, _) = run(
            "eval-222",
            [
                "parallel.data=2",
                "parallel.tensor=2",
                "parallel.pipeline=2",
            ],
            true,
        );
        assert_close(&mesh_val, &val, MESH_TOLERANCE);
        // Held-out, not training data: the values differ from the training losses.
        for &(step, v) in &val {
            let trained = loss.iter().find(|&&(s, _)| s == step).expect("that step").1;
            assert_ne!(v, trained, "step {step}");
        }
    }
}

/// `launch sample` of `scratch/ckpt`'s newest checkpoint.
fn sample(config: &str, scratch: &Scratch, sets: &[&str], extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_launch"));
    command
        .current_dir(repo())
        .args(["sample", "--config", config])
        .arg("--set")
        .arg(format!("checkpoint.dir={}", scratch.path("ckpt").display()));
    for set in sets {
        command.args(["--set", set]);
    }
    command.args(extra);
    output(command)
}

#[test]
fn sample_continues_a_prompt_from_a_checkpoint_of_any_mesh_and_repeats_for_a_seed() {
    let scratch = Scratch::new("sample");
    let corpus = scratch.path("corpus.txt");
    let line = "To be, or not to be, that is the question.\n";
    std::fs::write(&corpus, line.repeat(60)).unwrap();
    let data = [
        "data.kind=text".to_string(),
        format!("data.path={}", corpus.display()),
    ];
    for config in [TINY_GPT2, TINY_LLAMA] {
        // Enough steps for the model to learn the line by heart (loss about 0.01).
        let mut sets: Vec<&str> = vec![
            "model.layers=2",
            "training.steps=150",
            "checkpoint.every=150",
            "training.global_batch=8",
            "training.optimizer.lr=3e-3",
            "training.optimizer.warmup=5",
            "parallel.data=1",
            "parallel.tensor=2",
            "parallel.pipeline=2",
        ];
        sets.extend(data.iter().map(String::as_str));
        let out = output(launch_config(config, &scratch, &sets, &["--fresh"]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut data_sets = vec!["model.layers=2", "training.global_batch=8"];
        data_sets.extend(data.iter().map(String::as_str));
        let args = [
            "--prompt", "To be", "--tokens", "30", "--seed", "5", "--top-k", "5",
        ];
        let first = sample(config, &scratch, &data_sets, &args);
        assert!(first.status.success(), "{}", text(&first.stderr));
        let again = sample(config, &scratch, &data_sets, &args);
        assert_eq!(
            first.stdout, again.stdout,
            "the same seed gives the same text"
        );
        let generated = text(&first.stdout);
        assert!(generated.starts_with("To be"), "{generated}");
        assert_eq!(first.stdout.len(), "To be".len() + 30 + 1, "{generated}");
        // Greedy decoding of a model that has seen one line 60 times continues it.
        let greedy = sample(
            config,
            &scratch,
            &data_sets,
            &[
                "--prompt",
                "To be, or not",
                "--tokens",
                "8",
                "--temperature",
                "0",
            ],
        );
        assert!(greedy.status.success(), "{}", text(&greedy.stderr));
        assert!(
            text(&greedy.stdout).starts_with("To be, or not to be"),
            "{config}: {}",
            text(&greedy.stdout)
        );
    }
    // No checkpoint: a usage error naming where it looked.
    let empty = Scratch::new("sample-empty");
    let out = sample(TINY_GPT2, &empty, &[], &["--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no checkpoint in"),
        "{}",
        text(&out.stderr)
    );
}

/// Copies checkpoint `from` into `scratch/ckpt`, under the same name.
fn copy_checkpoint_dir(from: &Path, scratch: &Scratch) {
    let copy = scratch
        .path("ckpt")
        .join(from.file_name().expect("a step directory"));
    std::fs::create_dir_all(&copy).unwrap();
    for file in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(file.path(), copy.join(file.file_name())).unwrap();
    }
}

#[test]
fn a_llama_checkpoint_resumes_on_other_meshes_with_the_losses_of_one_process() {
    // The grouped-query q|k|v blocks and the untied head, resharded both ways: 4 steps on
    // (data 2, tensor 2, pipeline 2) resume on (4,1,1) ZeRO 3 and (1,1,4); one process's own
    // checkpoint resumes on (1,2,1) with sequence parallelism.
    let common = ["training.steps=6", "checkpoint.every=4"];
    let run = |scratch: &Scratch, mesh: [&str; 4], extra: &[&str]| {
        let mut sets = common.to_vec();
        sets.extend(mesh);
        let out = output(launch_config(TINY_LLAMA, scratch, &sets, extra));
        assert!(out.status.success(), "{mesh:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let single = Scratch::new("llama-reshard-1");
    run(
        &single,
        [
            "parallel.data=1",
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "parallel.zero=0",
        ],
        &[],
    );
    let reference = losses(&single.path("metrics.jsonl"));
    assert_eq!(reference.len(), 6);
    let source = Scratch::new("llama-reshard-222");
    run(
        &source,
        [
            "parallel.data=2",
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.zero=1",
        ],
        &[],
    );
    let targets = [
        (
            source.path("ckpt").join("step-00000004"),
            [
                "parallel.data=4",
                "parallel.tensor=1",
                "parallel.pipeline=1",
                "parallel.zero=3",
            ],
        ),
        (
            source.path("ckpt").join("step-00000004"),
            [
                "parallel.data=1",
                "parallel.tensor=1",
                "parallel.pipeline=4",
                "parallel.zero=0",
            ],
        ),
        (
            single.path("ckpt").join("step-00000004"),
            [
                "parallel.data=1",
                "parallel.tensor=2",
                "parallel.pipeline=1",
                "parallel.zero=0",
            ],
        ),
    ];
    for (i, (checkpoint, mesh)) in targets.into_iter().enumerate() {
        let target = Scratch::new(&format!("llama-reshard-target-{i}"));
        copy_checkpoint_dir(&checkpoint, &target);
        let stdout = run(&target, mesh, &[]);
        assert!(stdout.contains("resuming from"), "{mesh:?}: {stdout}");
        assert_close(
            &losses(&target.path("metrics.jsonl")),
            &reference[4..],
            MESH_TOLERANCE,
        );
    }
}

/// Tensor `key` of a safetensors file of the checkpoint `dir`, as f32 (the tiny job is fp32).
fn stored(dir: &Path, file: &str, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors
        .tensor(key)
        .unwrap_or_else(|_| panic!("{key} in {file}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn the_manifest_maps_every_global_tensor_to_its_shards() {
    // Tensor and ZeRO-3 data parallelism: every kind of split and flat shards.
    let scratch = Scratch::new("manifest-map");
    let sets = [
        "parallel.data=2",
        "parallel.tensor=2",
        "parallel.pipeline=1",
        "parallel.zero=3",
        "training.steps=2",
        "checkpoint.every=2",
    ];
    let out = output(launch(&scratch, &sets, &["--fresh"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = scratch.path("ckpt").join("step-00000002");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let exported: std::collections::BTreeMap<String, Vec<f32>> =
        exported(TINY_GPT2, &scratch, &sets[..4])
            .into_iter()
            .collect();
    let maps = manifest["tensors"].as_array().expect("tensors");
    assert_eq!(maps.len(), exported.len(), "one entry per global tensor");
    let mut splits = std::collections::BTreeSet::new();
    for map in maps {
        let name = map["name"].as_str().unwrap();
        let shape: Vec<usize> = map["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let split = map["tensor_split"].as_str().unwrap();
        splits.insert(split.split(' ').next().unwrap().to_string());
        // Each tensor-parallel shard's parameters, from the map alone.
        let shards: Vec<Vec<f32>> = map["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|shard| {
                let at = &shard["states"]["params"];
                match at.get("files") {
                    Some(files) => {
                        let key = at["key"].as_str().unwrap();
                        let flat: Vec<f32> = files
                            .as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|f| stored(&dir, f.as_str().unwrap(), key))
                            .collect();
                        let offset = at["offset"].as_u64().unwrap() as usize;
                        flat[offset..offset + at["numel"].as_u64().unwrap() as usize].to_vec()
                    }
                    None => stored(
                        &dir,
                        at["file"].as_str().unwrap(),
                        at["key"].as_str().unwrap(),
                    ),
                }
            })
            .collect();
        let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
        let tp = shards.len();
        let mut global = vec![0.0f32; rows * cols];
        match split {
            "replicated" => global.copy_from_slice(&shards[0]),
            "columns" => {
                let local = cols / tp;
                for (t, shard) in shards.iter().enumerate() {
                    for r in 0..rows {
                        global[r * cols + t * local..][..local]
                            .copy_from_slice(&shard[r * local..][..local]);
                    }
                }
            }
            _ => {
                // `rows`, or `rows in N blocks`: each block of rows is split over the ranks.
                let blocks: usize = split
                    .strip_prefix("rows in ")
                    .map_or(1, |b| b.split(' ').next().unwrap().parse().unwrap());
                let block_rows = rows / blocks;
                let local = block_rows / tp;
                for (t, shard) in shards.iter().enumerate() {
                    for b in 0..blocks {
                        let from = &shard[b * local * cols..][..local * cols];
                        global[(b * block_rows + t * local) * cols..][..local * cols]
                            .copy_from_slice(from);
                    }
                }
            }
        }
        let expected = &exported[name];
        assert_eq!(&global[..expected.len()], &expected[..], "{name} ({split})");
    }
    assert_eq!(
        splits.into_iter().collect::<Vec<_>>(),
        ["columns", "replicated", "rows"],
        "every kind of split is covered"
    );
}

/// A failure no restart can mend: `launch` with `sets` and restart.max=2 exits `status` with
/// `expected` in its error, trying once (no "restart 1 of" anywhere).
fn fails_without_restarting(
    scratch: &Scratch,
    sets: &[&str],
    status: i32,
    expected: &str,
    prepare: impl FnOnce(&mut Command),
) -> String {
    let mut command = launch(scratch, &[sets, &["restart.max=2"]].concat(), &[]);
    prepare(&mut command);
    let out = output(command);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(status), "{stdout}\n{stderr}");
    assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    assert!(
        !stdout.contains("restart 1 of") && !stderr.contains("restart 1 of"),
        "a deterministic failure is not restarted:\n{stdout}\n{stderr}"
    );
    stderr
}

#[test]
fn a_bad_data_shard_keeps_its_class_and_is_not_restarted() {
    let scratch = Scratch::new("bad-shard");
    let shard = scratch.path("train.bin");
    std::fs::write(&shard, vec![7u8; 4096]).unwrap();
    let path = format!("data.path={}", shard.display());
    let stderr = fails_without_restarting(
        &scratch,
        &["data.kind=tokens", &path, "parallel.data=2"],
        2,
        &shard.display().to_string(),
        |_| {},
    );
    // The rank whose own error it is comes first, with that error.
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(error.contains("exited with status 2: "), "{stderr}");
}

#[test]
fn an_arena_that_cannot_be_allocated_keeps_its_class_and_is_not_restarted() {
    use nix::sys::resource::{Resource, setrlimit};
    use std::os::unix::process::CommandExt as _;
    let scratch = Scratch::new("no-arena");
    // One rank of a 3 GiB arena under a 2 GiB address-space limit: the plan fits the device
    // and the machine's memory, but the allocation is refused.
    let sets = [
        "parallel.data=1",
        "cluster.gpus_per_node=1",
        "model.hidden=2048",
        "model.heads=16",
        "model.ffn_hidden=8192",
        "cluster.gpu_memory=64GiB",
    ];
    fails_without_restarting(&scratch, &sets, 3, "exited with status 3: ", |command| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                setrlimit(Resource::RLIMIT_AS, 2 << 30, 2 << 30).map_err(std::io::Error::from)
            });
        }
    });
}

#[test]
fn a_listen_port_in_use_is_a_usage_error_said_once() {
    let scratch = Scratch::new("port-in-use");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let stderr = fails_without_restarting(
        &scratch,
        &[],
        2,
        &format!("cannot listen on {address} for the node agents"),
        |command| {
            command
                .args(["--listen", &address])
                .env("TESSERA_TOKEN", "0123456789abcdef0123456789abcdef");
        },
    );
    assert_eq!(stderr.matches("cannot listen on").count(), 1, "{stderr}");
}

#[test]
fn an_unwritable_checkpoint_dir_is_found_before_training() {
    let scratch = Scratch::new("ckpt-file");
    let file = scratch.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let dir = format!("checkpoint.dir={}", file.display());
    let mut command = launch(&scratch, &[&dir, "checkpoint.every=1"], &[]);
    let out = output({
        command.stdout(Stdio::piped());
        command
    });
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "checkpoint.dir {}: is a file, not a directory",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        !text(&out.stdout).contains("coordinator on"),
        "nothing started"
    );
}

#[test]
fn a_head_whose_agents_never_come_gives_up_at_the_rendezvous_timeout_and_refused_calls_are_throttled()
 {
    use std::io::BufRead as _;
    let scratch = Scratch::new("no-agents");
    let sets = ["watchdog.rendezvous_timeout=3", "restart.max=0"];
    let mut command = launch(&scratch, &sets, &[]);
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("TESSERA_TOKEN", "0123456789abcdef0123456789abcdef")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the head says where it listens")
            .unwrap();
        if let Some(rest) = line.split("coordinator on ").nth(1) {
            break rest.split(':').take(2).collect::<Vec<_>>().join(":");
        }
    };
    // A client without the token calls the coordinator 300 times.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = tessera_proto::client(channel, "not-the-token-of-this-run").unwrap();
        for _ in 0..300 {
            let refused = client
                .register_agent(tessera_proto::v1::AgentHello::default())
                .await;
            assert!(refused.is_err());
        }
    });
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "the rendezvous did not complete within 3s (watchdog.rendezvous_timeout): ranks 0, 1 \
             never registered; 0 of 1 node agents registered"
        ),
        "{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "gave up after {elapsed:?}"
    );
    let refused = stderr.matches("refused a call").count();
    assert!((1..=5).contains(&refused), "{refused} lines: {stderr}");
}

#[test]
fn a_damaged_file_that_one_rank_reads_makes_every_rank_fall_back_together() {
    // ZeRO 1 over two data-parallel ranks: rank 1 alone reads its optimizer shard's file.
    let sets = [
        "parallel.data=2",
        "parallel.zero=1",
        "training.steps=6",
        "checkpoint.every=2",
    ];
    let scratch = Scratch::new("fallback");
    let out = output(launch(&scratch, &sets, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reference = losses(&scratch.path("metrics.jsonl"));
    assert_eq!(reference.len(), 6);

    let dir = scratch.path("ckpt");
    let file = dir.join("step-00000006").join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();

    let out = output(launch(&scratch, &sets, &[]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("step-00000006 is damaged: rank-00001.safetensors tensor `"),
        "rank 1 names what it found: {stderr}"
    );
    assert!(
        stdout.contains("resuming from") && stdout.contains("step-00000004"),
        "both ranks resume from step 4: {stdout}\n{stderr}"
    );
    assert!(dir.join("step-00000006.damaged").is_dir());
    // Steps 5 and 6 again, bit for bit the first run's.
    assert_eq!(
        last_per_step(&losses(&scratch.path("metrics.jsonl"))),
        reference
    );
}

/// Each rank's `checkpoint read:` line: (data, headers, files, state) bytes, by rank.
fn reads(stdout: &str) -> std::collections::BTreeMap<usize, [u64; 4]> {
    let mut out = std::collections::BTreeMap::new();
    for line in stdout.lines() {
        let Some((rank, rest)) = line
            .strip_prefix("[rank ")
            .and_then(|l| l.split_once("] checkpoint read: "))
        else {
            continue;
        };
        let numbers: Vec<u64> = rest
            .split(' ')
            .filter_map(|word| word.parse().ok())
            .collect();
        out.insert(rank.parse().unwrap(), numbers.try_into().unwrap());
    }
    out
}

/// (tensor name, data bytes) of each tensor of a safetensors file, and its header's bytes.
fn tensor_sizes(file: &Path) -> (Vec<(String, u64)>, u64) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap();
    let tensors = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let offsets = &info["data_offsets"];
            let size = offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap();
            (name.clone(), size)
        })
        .collect();
    (tensors, 8 + n)
}

/// Copies checkpoint directory `from` to `scratch/ckpt/<its name>`.
fn copy_checkpoint(from: &Path, scratch: &Scratch) {
    let copy = scratch.path("ckpt").join(from.file_name().unwrap());
    std::fs::create_dir_all(&copy).unwrap();
    for file in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(file.path(), copy.join(file.file_name())).unwrap();
    }
}

#[test]
fn a_resume_reads_only_the_ranks_own_shards_and_a_reshard_only_the_overlapping_ranges() {
    // (data 2, tensor 2, pipeline 2) with ZeRO 1: parameters in the first data-parallel rank's
    // files, optimizer shards in every rank's.
    // A model wider than the tiny one, so that its tensors are several checksum chunks each.
    let model = [
        "model.hidden=256",
        "model.ffn_hidden=1024",
        "model.seq_len=32",
        "training.global_batch=8",
        "training.micro_batch=1",
    ];
    let source = Scratch::new("io-source");
    let mut sets = model.to_vec();
    sets.extend([
        "parallel.data=2",
        "parallel.tensor=2",
        "parallel.pipeline=2",
        "parallel.zero=1",
        "training.steps=2",
        "checkpoint.every=2",
    ]);
    let out = output(launch(&source, &sets, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let checkpoint = source.path("ckpt").join("step-00000002");
    let manifest_bytes = std::fs::metadata(checkpoint.join("manifest.json"))
        .unwrap()
        .len();
    let files: Vec<(Vec<(String, u64)>, u64)> = (0..8)
        .map(|rank| tensor_sizes(&checkpoint.join(format!("rank-{rank:05}.safetensors"))))
        .collect();
    let total: u64 = files.iter().flat_map(|(t, _)| t.iter().map(|t| t.1)).sum();
    let is_state = |name: &str| {
        ["master.", "adam_m.", "adam_v."]
            .iter()
            .any(|p| name.starts_with(p))
    };

    // The same layout again: each rank reads its parameters from its data-parallel group's
    // first file and its optimizer shard from its own, nothing else.
    let mut longer = sets.to_vec();
    longer.push("training.steps=3");
    let out = output(launch(&source, &longer, &[]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let same = reads(&stdout);
    assert_eq!(same.len(), 8, "every rank says what it read: {stdout}");
    for (&rank, &[data, headers, opened, state]) in &same {
        let first = rank % 4; // dp is outermost: (0, pp, tp) is rank % (tp x pp)
        let params: u64 = files[first]
            .0
            .iter()
            .filter(|t| !is_state(&t.0))
            .map(|t| t.1)
            .sum();
        let states: u64 = files[rank]
            .0
            .iter()
            .filter(|t| is_state(&t.0))
            .map(|t| t.1)
            .sum();
        let own = params + states;
        assert_eq!(state, own, "rank {rank} holds its shards");
        assert!(
            data as f64 <= 1.05 * own as f64,
            "rank {rank} read {data} bytes for {own} of its own"
        );
        let header_bytes = files[first].1 + if rank == first { 0 } else { files[rank].1 };
        assert_eq!(opened, if rank == first { 1 } else { 2 }, "rank {rank}");
        assert_eq!(headers, header_bytes + manifest_bytes, "rank {rank}");
    }

    // Another mesh: one tensor rank and four stages, or four data-parallel ranks with ZeRO 3.
    // Each rank reads the checksum chunks that overlap its shards: what it holds, plus parts of
    // the chunks at the ends of each run it takes from a source shard (ZeRO 3 cuts many
    // tensors, so it has more runs), and far from everything.
    for (mesh, zero, bound) in [([1, 1, 4], 0, 1.05), ([4, 1, 1], 3, 1.25)] {
        let name = format!("io-{}{}{}-zero{zero}", mesh[0], mesh[1], mesh[2]);
        let target = Scratch::new(&name);
        copy_checkpoint(&checkpoint, &target);
        let sets = [
            model.map(String::from).to_vec(),
            vec![
                format!("parallel.data={}", mesh[0]),
                format!("parallel.tensor={}", mesh[1]),
                format!("parallel.pipeline={}", mesh[2]),
                format!("parallel.zero={zero}"),
                "training.steps=3".into(),
                "checkpoint.every=0".into(),
            ],
        ]
        .concat();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = output(launch(&target, &sets, &[]));
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let read = reads(&stdout);
        assert_eq!(read.len(), 4, "{name}: {stdout}");
        let mut all = 0;
        for (&rank, &[data, _, opened, state]) in &read {
            let chunks = 2 * 65536 * opened;
            assert!(
                data as f64 <= bound * state as f64 + chunks as f64 && data < total / 2,
                "{name}: rank {rank} read {data} bytes for {state} of its own ({total} in all)"
            );
            all += data;
        }
        assert!(
            all as f64 <= bound * total as f64,
            "{name}: the ranks read {all} bytes of {total}"
        );
    }
}
