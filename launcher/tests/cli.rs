//! `launch` as a user runs it: real processes, real files, exit statuses and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The memory categories, bottom of the stack first, as in the JSON and the SVG.
const CATEGORIES: [&str; 8] = [
    "params",
    "grads",
    "master",
    "optimizer",
    "activations",
    "workspace",
    "comm",
    "runtime",
];

/// Runs `launch` from the repository root with these arguments.
fn launch(args: &[&str]) -> Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent");
    Command::new(env!("CARGO_BIN_EXE_launch"))
        .args(args)
        .current_dir(repo)
        .env_remove("TESSERA_CONFIG")
        .output()
        .expect("launch runs")
}

/// A command line of space-separated arguments.
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .expect("launch exits normally, not by a signal")
}

/// Runs `launch`, checks that it exits 0, and returns its stdout.
fn succeeds(args: &[&str]) -> String {
    let output = launch(args);
    assert_eq!(code(&output), 0, "{args:?}: {}", stderr(&output));
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Runs `launch`, checks that it exits with `status` and that stderr contains `expected`
/// without a panic, and returns the output.
fn fails(args: &[&str], status: i32, expected: &str) -> Output {
    let output = launch(args);
    let message = stderr(&output);
    assert_eq!(code(&output), status, "{args:?}: {message}");
    assert!(
        message.contains(expected),
        "{args:?}: expected {expected:?} in:\n{message}"
    );
    assert!(!message.contains("panicked"), "{args:?}: {message}");
    output
}

fn assert_contains(text: &str, phrases: &[&str]) {
    for phrase in phrases {
        assert!(text.contains(phrase), "{phrase:?} missing from:\n{text}");
    }
}

/// A scratch directory unique to one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tessera-cli-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_175b_dry_run_prints_every_stage_and_fits() {
    let text = succeeds(&words("--config configs/175b.yaml --dry-run"));
    assert_contains(
        &text,
        &[
            "data 8 x tensor 8 x pipeline 16 = 1024 ranks on 128 nodes x 8 cuda devices",
            "174,615,846,912 parameters",
            "per rank, GiB",
            "fits: the largest ranks (stage 0)",
        ],
    );
    for stage in 0..16 {
        assert!(
            text.contains(&format!("\nstage {stage} ")),
            "stage {stage} missing:\n{text}"
        );
    }
}

#[test]
fn the_llama_family_dry_runs_plan_every_stage_with_the_published_sizes() {
    let text = succeeds(&words("--config configs/deepseek-67b.yaml --dry-run"));
    assert_contains(
        &text,
        &[
            "llama, 67,425,001,472 parameters (67.4B): 95 layers, hidden 8192, 64 heads (8 key/value)",
            "untied head",
            "data 8 x tensor 8 x pipeline 4 = 256 ranks",
            "stage 0        64     0-23",
            "stage 3        64     72-94",
            "fits: the largest ranks",
        ],
    );
    let text = succeeds(&words("--config configs/llama3-70b.yaml --dry-run"));
    assert_contains(&text, &["70,566,289,408 parameters", "stage 7 ", "fits:"]);
    let text = succeeds(&words("--config configs/llama3-8b.yaml --dry-run"));
    assert_contains(
        &text,
        &["8,030,261,248 parameters (8.0B)", "ZeRO-3", "fits:"],
    );
    let plan: Value = serde_json::from_str(&succeeds(&words(
        "--config configs/deepseek-67b.yaml --dry-run --format json",
    )))
    .expect("valid JSON");
    assert_eq!(plan["model"]["kv_heads"], 8);
    assert_eq!(plan["model"]["tie_embeddings"], false);
    assert_eq!(plan["ranks"][0]["layers"], serde_json::json!([0, 24]));
    assert_eq!(plan["ranks"][255]["layers"], serde_json::json!([72, 95]));
}

#[test]
fn search_ranks_llama3_8b_layouts_that_fit_on_one_node() {
    let text = succeeds(&words("search --config configs/llama3-8b.yaml --gpus 8"));
    assert_contains(
        &text,
        &[
            "The 10 fastest",
            "plan #1 in full: launch --config configs/llama3-8b.yaml --dry-run --set",
        ],
    );
    let json: Value = serde_json::from_str(&succeeds(&words(
        "search --config configs/llama3-8b.yaml --gpus 8 --format json --top 3",
    )))
    .unwrap();
    let candidates = json["best"].as_array().expect("best");
    assert_eq!(candidates.len(), 3);
    for candidate in candidates {
        // 8 key/value heads and 8 GPUs per node bound the tensor degree; every layout fits.
        assert!(8 % candidate["tensor"].as_u64().unwrap() == 0);
        assert!(candidate["peak_bytes"].as_u64().unwrap() <= 64 << 30);
    }
}

#[test]
fn the_json_plan_lists_all_1024_ranks_with_every_category() {
    let plan: Value = serde_json::from_str(&succeeds(&words(
        "--config configs/175b.yaml --dry-run --format json",
    )))
    .expect("valid JSON");
    assert_eq!(plan["world_size"], 1024);
    assert_eq!(
        plan["mesh"],
        serde_json::json!({"data": 8, "tensor": 8, "pipeline": 16, "virtual_stages": 1})
    );
    assert_eq!(plan["model"]["params"], 174_615_846_912u64);
    assert_eq!(plan["gpu_memory_bytes"], 80u64 << 30);
    assert_eq!(plan["headroom"], 0.2);
    assert_eq!(plan["fits"], true);
    let ranks = plan["ranks"].as_array().expect("ranks array");
    assert_eq!(ranks.len(), 1024);
    let number = |value: &Value| {
        value
            .as_u64()
            .unwrap_or_else(|| panic!("{value} is not a number"))
    };
    let mut peak = 0;
    for (i, rank) in ranks.iter().enumerate() {
        let (dp, pp, tp) = (
            number(&rank["dp"]),
            number(&rank["pp"]),
            number(&rank["tp"]),
        );
        assert_eq!(number(&rank["rank"]), i as u64);
        assert_eq!(
            (dp * 16 + pp) * 8 + tp,
            i as u64,
            "tensor innermost, pipeline next, data outermost"
        );
        assert_eq!(rank["node"], i / 8);
        assert_eq!(rank["local_rank"], i % 8);
        assert_eq!(rank["layers"], serde_json::json!([pp * 6, pp * 6 + 6]));
        let bytes = &rank["bytes"];
        let parts: u64 = CATEGORIES.iter().map(|k| number(&bytes[k])).sum();
        assert_eq!(
            parts,
            number(&bytes["total"]),
            "rank {i}: categories add up to the total"
        );
        // Without offload the host holds only the staging of asynchronous checkpoints.
        let checkpoint = number(&rank["host_bytes"]["checkpoint"]);
        assert!(checkpoint > 0, "rank {i}: checkpoint staging");
        assert_eq!(number(&rank["host_bytes"]["total"]), checkpoint);
        peak = peak.max(number(&bytes["total"]));
    }
    assert_eq!(plan["peak_bytes"], peak);
}

#[test]
fn gpt2_small_reports_124_475_904_parameters() {
    let text = succeeds(&words("--config configs/gpt2-124m.yaml --dry-run"));
    assert_contains(
        &text,
        &[
            "124,475,904 parameters (124.5M)",
            "data 8 x tensor 1 x pipeline 1 = 8 ranks",
        ],
    );
    let plan: Value = serde_json::from_str(&succeeds(&words(
        "--config configs/gpt2-124m.yaml --dry-run --format json",
    )))
    .unwrap();
    assert_eq!(plan["model"]["params"], 124_475_904);
    assert_eq!(plan["model"]["vocab_padded"], 50304);
}

#[test]
fn interleaved_chunks_and_offload_show_in_table_and_json() {
    let command = "--config configs/175b.yaml --dry-run --set parallel.virtual_stages=2 --set parallel.schedule=interleaved --set parallel.offload.optimizer=true";
    let text = succeeds(&words(command));
    assert_contains(
        &text,
        &[
            "interleaved x 2 chunks",
            "optimizer offloaded to host",
            "0-2,48-50",
            "host",
        ],
    );
    let plan: Value =
        serde_json::from_str(&succeeds(&words(&format!("{command} --format json")))).unwrap();
    assert_eq!(
        plan["ranks"][0]["layer_chunks"],
        serde_json::json!([[0, 3], [48, 51]])
    );
    assert_eq!(plan["ranks"][0]["bytes"]["optimizer"], 0);
    assert!(
        plan["ranks"][0]["host_bytes"]["optimizer"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn warnings_go_to_stderr_and_do_not_fail_the_plan() {
    let output = launch(&words(
        "--dry-run --set parallel.tensor=1 --set parallel.data=4",
    ));
    assert_eq!(code(&output), 0);
    assert!(
        stderr(&output).contains("warning: parallel.sequence_parallel has no effect with tensor 1"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn each_rank_of_a_32_stage_plan_gets_its_own_layers() {
    let command = "--config configs/175b.yaml --dry-run --format json --set parallel.pipeline=32 --set parallel.data=4";
    let plan: Value = serde_json::from_str(&succeeds(&words(command))).unwrap();
    assert_eq!(plan["ranks"][1023]["layers"], serde_json::json!([93, 96]));
    assert_eq!(plan["ranks"][8]["layers"], serde_json::json!([3, 6]));
}

#[test]
fn the_256_gpu_world_size_mismatch_exits_2_with_the_fix() {
    let output = fails(
        &words("--config launcher/tests/fixtures/world-256.yaml --dry-run"),
        2,
        "launcher/tests/fixtures/world-256.yaml:4:9: parallel: data (32) x tensor (8) x pipeline (4) = 1024 ranks, \
         but cluster has 256 GPUs (32 nodes x 8); for 256 GPUs with tensor 8 and pipeline 4 use data 8",
    );
    assert!(output.stdout.is_empty());
    assert!(!stderr(&output).contains("RUST_BACKTRACE"));
}

#[test]
fn bad_files_exit_2_with_what_where_and_how() {
    let dir = Scratch::new("bad-files");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let empty = write("empty.yaml", String::new());
    let huge = write("huge.yaml", "# padding\n".repeat(200_000));
    let deep = write(
        "deep.yaml",
        format!("model: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)),
    );
    for (path, expected) in [
        (
            "configs/no-such.yaml",
            "does not exist; the shipped configs are in configs/",
        ),
        ("configs", "is a directory, not a config file"),
        (&empty, "the config is empty"),
        (&huge, "a config is a few hundred bytes"),
        (
            "launcher/tests/fixtures/garbage.bin",
            "is not UTF-8 text (invalid byte at offset",
        ),
        (&deep, "model"),
        // Endless, and 0 bytes long as far as its metadata says: the read itself is bounded.
        ("/dev/zero", "holds more than 1048576 bytes"),
    ] {
        let output = fails(&["--config", path, "--dry-run"], 2, expected);
        assert!(stderr(&output).starts_with("error: "), "{path}");
        // An excerpt, not the whole 20 KB line.
        assert!(stderr(&output).len() < 1000, "{path}: {}", stderr(&output));
    }
}

#[test]
fn dry_run_flags_without_dry_run_are_refused_with_the_fix() {
    for (flags, named) in [
        (&["--format", "json"][..], "--format"),
        (&["--svg", "plan.svg"][..], "--svg"),
        (&["--rank", "3"][..], "--rank"),
    ] {
        let output = fails(flags, 2, &format!("{named} is a --dry-run option"));
        assert_contains(&stderr(&output), &["add --dry-run"]);
        assert!(output.stdout.is_empty(), "nothing started");
    }
}

#[test]
fn set_overrides_reach_the_plan_and_are_validated() {
    let text = succeeds(&words(
        "--config configs/175b.yaml --dry-run --set parallel.pipeline=8 --set parallel.data=16",
    ));
    assert_contains(&text, &["data 16 x tensor 8 x pipeline 8 = 1024 ranks"]);
    fails(
        &words("--config configs/175b.yaml --dry-run --set parallel.data=0"),
        2,
        "--set parallel.data=0: parallel.data: must be at least 1, got 0",
    );
    fails(
        &words("--config configs/175b.yaml --dry-run --set parallel.tensr=4"),
        2,
        "did you mean `parallel.tensor`?",
    );
}

#[test]
fn a_plan_that_does_not_fit_exits_3_naming_ranks_and_remedies() {
    const OVER: &str = "--config configs/175b.yaml --dry-run --set parallel.recompute=none \
                        --set training.micro_batch=8 --set parallel.pipeline=4 --set parallel.data=32";
    let output = fails(&words(OVER), 3, "error: does not fit");
    let text = String::from_utf8(output.stdout).unwrap();
    assert_contains(
        &text,
        &[
            "does not fit: stages 0 and 1 (512 ranks, e.g. rank 0)",
            "the largest part is activations",
            "--set parallel.recompute=full",
            "--set training.micro_batch=4",
            "launch search --config configs/175b.yaml --gpus 1024",
        ],
    );
    // Every remedy marked "fits" does fit when applied.
    let remedies = text
        .lines()
        .filter(|l| l.trim_end().ends_with(" fits") && l.trim_start().starts_with("--set"));
    for line in remedies {
        let sets = line.split(" peak ").next().unwrap_or_default().trim();
        succeeds(&words(&format!("{OVER} {sets}")));
    }
}

#[test]
fn the_svg_chart_draws_a_bar_per_stage_against_capacity() {
    let dir = Scratch::new("svg");
    let path = dir.join("plan.svg");
    succeeds(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--svg",
        path.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&path).expect("the SVG was written");
    let svg = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let of_class = |class: &'static str| {
        svg.descendants()
            .filter(move |n| n.attribute("class") == Some(class))
    };
    let number = |node: roxmltree::Node, attribute: &str| -> f64 {
        node.attribute(attribute).unwrap().parse().unwrap()
    };
    let bars: Vec<_> = of_class("bar").collect();
    assert_eq!(bars.len(), 16, "one bar per distinct stage");
    let capacity = of_class("capacity").next().expect("capacity line");
    let usable = of_class("usable").next().expect("usable line");
    let bottom = 470.0;
    // The usable line sits at 80% of the capacity line's height above the axis.
    let ratio = (bottom - number(usable, "y1")) / (bottom - number(capacity, "y1"));
    assert!((ratio - 0.8).abs() < 1e-3, "{ratio}");
    // Segment heights are proportional to their bytes, on the capacity line's scale.
    let bytes_per_pixel = (80u64 << 30) as f64 / (bottom - number(capacity, "y1"));
    for segment in of_class("segment") {
        let (bytes, height) = (number(segment, "data-bytes"), number(segment, "height"));
        assert!(
            (height * bytes_per_pixel - bytes).abs() / bytes < 0.01 || height < 1.0,
            "{bytes} bytes drawn {height} px high"
        );
    }
    let stage0: Vec<_> = bars[0]
        .children()
        .filter(|n| n.attribute("class") == Some("segment"))
        .map(|n| n.attribute("data-category").unwrap())
        .collect();
    let expected: Vec<_> = CATEGORIES
        .iter()
        .copied()
        .filter(|&c| c != "comm")
        .collect();
    assert_eq!(
        stage0, expected,
        "stacked in category order; ZeRO-1 has no comm buffers"
    );
}

#[test]
fn a_plan_far_below_capacity_is_charted_at_its_own_scale() {
    let dir = Scratch::new("svg-zoom");
    let path = dir.join("tiny.svg");
    succeeds(&["--dry-run", "--svg", path.to_str().unwrap()]);
    let text = std::fs::read_to_string(&path).unwrap();
    let svg = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let of_class = |class: &'static str| {
        svg.descendants()
            .filter(move |n| n.attribute("class") == Some(class))
            .count()
    };
    assert_eq!(of_class("capacity"), 0, "capacity is off the chart");
    assert_eq!(of_class("off-chart"), 1, "and the chart says so");
    assert_eq!(of_class("bar"), 2);
    assert!(text.contains("the peak uses 0.9% of usable"), "{text}");
    // The bars are drawn hundreds of pixels high, not one.
    let drawn: f64 = svg
        .descendants()
        .filter(|n| n.attribute("class") == Some("segment"))
        .map(|n| n.attribute("height").unwrap().parse::<f64>().unwrap())
        .sum::<f64>();
    assert!(drawn > 300.0, "{drawn}");
}

#[test]
fn without_a_config_the_built_in_tiny_cpu_job_is_planned() {
    let text = succeeds(&["--dry-run"]);
    assert_contains(
        &text,
        &[
            "configs/tiny-cpu.yaml (built in)",
            "data 2 x tensor 2 x pipeline 2 = 8 ranks on 1 node x 8 cpu devices, tcp backend",
        ],
    );
    assert!(
        !text.contains("runtime column"),
        "CPU workers have no CUDA runtime lines"
    );
}

#[test]
fn rank_lists_every_region_of_one_rank() {
    let text = succeeds(&words("--config configs/175b.yaml --dry-run --rank 1023"));
    assert_contains(
        &text,
        &[
            "rank 1023: data 7, pipeline 15, tensor 7 (node 127, local rank 7); stage 15, layers 90-95",
            "params.head",
            "head.logits",
            "(est.)",
        ],
    );
    fails(
        &words("--config configs/175b.yaml --dry-run --rank 1024"),
        2,
        "rank 1024 does not exist: the world has 1024 ranks",
    );
}

#[test]
fn help_explains_the_exit_statuses_and_overrides() {
    let text = succeeds(&["--help"]);
    assert_contains(
        &text,
        &[
            "--dry-run",
            "--set <KEY=VALUE>",
            "--svg <FILE>",
            "Exit status: 0 success (or the plan fits), 1 a failure while running, 2",
            "130 interrupted",
            "--metrics <FILE>",
            "watchdog.heartbeat_timeout",
            "restart.max",
            "search",
        ],
    );
    fails(&["--bogus"], 2, "--bogus");
}

#[test]
fn search_ranks_layouts_that_all_fit() {
    let result: Value = serde_json::from_str(&succeeds(&words(
        "search --config configs/175b.yaml --gpus 1024 --format json --top 5",
    )))
    .unwrap();
    let best = result["best"].as_array().unwrap();
    assert_eq!(best.len(), 5);
    assert!(result["fitting_layouts"].as_u64().unwrap() >= 5);
    let mut last = f64::INFINITY;
    for candidate in best {
        let speed = candidate["tokens_per_second"].as_f64().unwrap();
        assert!(speed <= last, "ranked fastest first");
        last = speed;
        // Plan it in full through the dry-run: it fits, with the same peak.
        let mut args = words("--config configs/175b.yaml --dry-run --format json");
        for set in candidate["overrides"].as_array().unwrap() {
            args.extend(["--set", set.as_str().unwrap()]);
        }
        let plan: Value = serde_json::from_str(&succeeds(&args)).unwrap();
        assert_eq!(plan["peak_bytes"], candidate["peak_bytes"]);
    }
    let text = succeeds(&words("search --config configs/175b.yaml --gpus 1024"));
    assert_contains(
        &text,
        &[
            "The 10 fastest",
            "plan #1 in full: launch --config configs/175b.yaml --dry-run --set",
        ],
    );
}

#[test]
fn search_for_175b_on_one_node_exits_3_with_a_reason() {
    let output = fails(
        &words("search --config configs/175b.yaml --gpus 8 --gpu-memory 80GiB"),
        3,
        "error: no layout fits 8 devices of 80.00 GiB",
    );
    assert_contains(
        &stderr(&output),
        &["the smallest peak", "16 bytes per parameter"],
    );
}

#[test]
fn search_rejects_gpu_counts_that_do_not_fill_nodes() {
    fails(
        &words("search --config configs/175b.yaml --gpus 12"),
        2,
        "--gpus 12 does not fill whole nodes",
    );
    fails(
        &words("search --config configs/175b.yaml --gpus 16 --gpu-memory lots"),
        2,
        "--gpu-memory: `lots` is not a size",
    );
}

#[test]
fn a_cuda_run_without_a_driver_fails_once_before_any_worker_starts() {
    if tessera_worker::tensor::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver (tests/gpu.rs trains there)");
        return;
    }
    let output = fails(
        &words(
            "--config configs/tiny-cpu.yaml --set cluster.device=cuda --set cluster.backend=tcp \
             --set training.steps=1",
        ),
        1,
        "cluster.device is cuda, but this machine has no CUDA driver",
    );
    let message = stderr(&output);
    assert!(message.contains("--set cluster.device=cpu"), "{message}");
    assert!(!message.contains("[rank "), "no worker started: {message}");
}

#[test]
fn a_cuda_run_with_a_head_size_the_kernels_lack_is_a_config_error() {
    // hidden 128 / heads 8 = 16: planned fine, but no attention kernel variant exists.
    let output = fails(
        &words(
            "--config configs/tiny-cpu.yaml --set cluster.device=cuda --set cluster.backend=tcp \
             --set model.heads=8",
        ),
        2,
        "head size 16, but the CUDA attention kernels are built for head sizes [32, 64, 80, 96, 128]",
    );
    let message = stderr(&output);
    assert!(
        message.contains("for hidden 128 use heads: 4 or heads: 2"),
        "{message}"
    );
    assert!(!message.contains("[rank "), "no worker started: {message}");
}

#[test]
fn a_run_refuses_before_any_worker_what_its_dry_run_refuses() {
    let scratch = Scratch::new("run-does-not-fit");
    let checkpoints = format!("checkpoint.dir={}", scratch.0.join("ckpt").display());
    let set = ["--set", "cluster.gpu_memory=8MiB", "--set", &checkpoints];
    let dry = fails(&[&["--dry-run"], &set[..]].concat(), 3, "does not fit: ");
    let run = fails(&set, 3, "does not fit: ");
    let last_line = |output: &Output| stderr(output).lines().last().unwrap_or("").to_string();
    assert_eq!(
        last_line(&run),
        last_line(&dry),
        "the dry-run's own message"
    );
    assert_contains(
        &stderr(&run),
        &["what would fit (each change planned exactly):"],
    );
    // Nothing started: no coordinator, no worker, no checkpoint directory.
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!stdout.contains("coordinator on"), "{stdout}");
    assert!(!scratch.0.join("ckpt").exists());
}

#[test]
fn a_cpu_run_whose_arenas_exceed_the_available_memory_is_refused_naming_the_machine() {
    // 8 ranks of up to 9.33 GiB each: more than any machine this runs on but a large server.
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    if available * 1024 > 74 << 30 {
        eprintln!("skipped: this machine has more memory available than the test's arenas");
        return;
    }
    let scratch = Scratch::new("run-beyond-memory");
    let checkpoints = format!("checkpoint.dir={}", scratch.0.join("ckpt").display());
    // 8 ranks of a hidden-8192 model: a few GiB each, more than this machine has, with a
    // device size that lets the plan itself fit.
    let output = fails(
        &[
            "--set",
            "model.hidden=8192",
            "--set",
            "model.heads=64",
            "--set",
            "model.ffn_hidden=32768",
            "--set",
            "cluster.gpu_memory=1TiB",
            "--set",
            &checkpoints,
        ],
        3,
        "this machine has ",
    );
    assert_contains(
        &stderr(&output),
        &[
            "of memory available (MemAvailable), but its 8 ranks plan ",
            "help: ",
        ],
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("coordinator on"));
}

/// `launch ARGS` with TESSERA_TOKEN=`token`, killed if it runs past 30 s (a head that accepts
/// the token waits for agents).
fn with_token(token: &str, args: &[&str]) -> Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent");
    let mut child = Command::new(env!("CARGO_BIN_EXE_launch"))
        .args(args)
        .current_dir(repo)
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_COORDINATOR")
        .env("TESSERA_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch runs");
    let start = std::time::Instant::now();
    while child.try_wait().expect("launch is waited for").is_none()
        && start.elapsed() < std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().expect("launch ends")
}

#[test]
fn a_token_under_16_bytes_is_refused_on_the_head_and_the_agent_with_how_to_make_one() {
    let head = ["--set", "training.steps=1", "--listen", "127.0.0.1:0"];
    let agent = ["agent", "--coordinator", "127.0.0.1:1", "--wait", "1"];
    for args in [&head[..], &agent[..]] {
        let output = with_token("abc", args);
        let message = stderr(&output);
        assert_eq!(code(&output), 2, "{args:?}: {message}");
        assert_contains(
            &message,
            &[
                "TESSERA_TOKEN has 3 bytes",
                "at least 16",
                "export TESSERA_TOKEN=$(openssl rand -hex 16)",
            ],
        );
    }
    // 16 bytes pass the check: the agent then fails to reach the coordinator (status 1).
    let output = with_token("0123456789abcdef", &agent);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot reach the coordinator"));
}

#[test]
fn export_to_a_directory_is_refused_once_before_reading_the_checkpoint() {
    let scratch = Scratch::new("export-dir");
    let out = scratch.0.display().to_string();
    let output = fails(
        &["export", "--out", &out],
        2,
        "is a directory; name the file",
    );
    assert_eq!(
        stderr(&output).matches("is a directory").count(),
        1,
        "{}",
        stderr(&output)
    );
}
