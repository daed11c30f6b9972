//! `launch` as a user runs it: real processes, real files, exit statuses and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent")
        .to_path_buf()
}

/// Runs `launch` from the repository root.
fn launch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_launch"))
        .args(args)
        .current_dir(repo())
        .env_remove("TESSERA_CONFIG")
        .output()
        .expect("launch runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
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

/// A scratch directory unique to one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn the_175b_dry_run_prints_every_stage_and_fits() {
    let output = launch(&["--config", "configs/175b.yaml", "--dry-run"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("data 8 x tensor 8 x pipeline 16 = 1024 ranks on 128 nodes x 8 cuda devices"),
        "{text}"
    );
    assert!(text.contains("174,615,846,912 parameters"), "{text}");
    for stage in 0..16 {
        assert!(
            text.contains(&format!("\nstage {stage} ")),
            "stage {stage} missing:\n{text}"
        );
    }
    assert!(text.contains("fits: the largest ranks (stage 0)"), "{text}");
    assert!(text.contains("per rank, GiB"), "{text}");
}

#[test]
fn the_json_plan_lists_all_1024_ranks_with_every_category() {
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--format",
        "json",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let plan: Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    assert_eq!(plan["world_size"], 1024);
    assert_eq!(plan["mesh"]["data"], 8);
    assert_eq!(plan["mesh"]["tensor"], 8);
    assert_eq!(plan["mesh"]["pipeline"], 16);
    assert_eq!(plan["mesh"]["virtual_stages"], 1);
    assert_eq!(plan["model"]["params"], 174_615_846_912u64);
    assert_eq!(plan["gpu_memory_bytes"], 80u64 << 30);
    assert_eq!(plan["headroom"], 0.2);
    assert_eq!(plan["fits"], true);
    let ranks = plan["ranks"].as_array().expect("ranks array");
    assert_eq!(ranks.len(), 1024);
    let mut peak = 0;
    for (i, rank) in ranks.iter().enumerate() {
        assert_eq!(rank["rank"], i);
        let (dp, pp, tp) = (
            rank["dp"].as_u64().unwrap(),
            rank["pp"].as_u64().unwrap(),
            rank["tp"].as_u64().unwrap(),
        );
        assert_eq!(
            (dp * 16 + pp) * 8 + tp,
            i as u64,
            "tensor innermost, pipeline next, data outermost"
        );
        assert_eq!(rank["node"], i / 8);
        assert_eq!(rank["local_rank"], i % 8);
        assert_eq!(rank["layers"], serde_json::json!([pp * 6, pp * 6 + 6]));
        let bytes = &rank["bytes"];
        let parts: u64 = [
            "params",
            "grads",
            "master",
            "optimizer",
            "activations",
            "workspace",
            "comm",
            "runtime",
        ]
        .iter()
        .map(|k| {
            bytes[k]
                .as_u64()
                .unwrap_or_else(|| panic!("rank {i} lacks bytes.{k}"))
        })
        .sum();
        assert_eq!(
            parts,
            bytes["total"].as_u64().unwrap(),
            "rank {i}: categories add up to the total"
        );
        for key in ["optimizer", "master"] {
            assert_eq!(rank["host_bytes"][key], 0);
        }
        peak = peak.max(bytes["total"].as_u64().unwrap());
    }
    assert_eq!(plan["peak_bytes"], peak);
}

#[test]
fn each_rank_of_a_32_stage_plan_gets_its_own_layers() {
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--format",
        "json",
        "--set",
        "parallel.pipeline=32",
        "--set",
        "parallel.data=4",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let plan: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["ranks"][1023]["layers"], serde_json::json!([93, 96]));
}

#[test]
fn the_256_gpu_world_size_mismatch_exits_2_with_the_fix() {
    let output = launch(&[
        "--config",
        "launcher/tests/fixtures/world-256.yaml",
        "--dry-run",
    ]);
    assert_eq!(code(&output), 2);
    let message = stderr(&output);
    assert!(
        message.contains("parallel: data (32) x tensor (8) x pipeline (4) = 1024 ranks, but cluster has 256 GPUs (32 nodes x 8); for 256 GPUs with tensor 8 and pipeline 4 use data 8"),
        "{message}"
    );
    assert!(
        message.contains("launcher/tests/fixtures/world-256.yaml:4:9"),
        "{message}"
    );
    assert!(
        !message.contains("panicked") && !message.contains("RUST_BACKTRACE"),
        "{message}"
    );
    assert!(stdout(&output).is_empty());
}

#[test]
fn bad_files_exit_2_with_what_where_and_how() {
    let dir = scratch("bad-files");
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let huge = dir.join("huge.yaml");
    std::fs::write(&huge, "# padding\n".repeat(200_000)).unwrap();
    let deep = dir.join("deep.yaml");
    std::fs::write(
        &deep,
        format!("model: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)),
    )
    .unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            "configs/no-such.yaml".into(),
            "does not exist; the shipped configs are in configs/",
        ),
        ("configs".into(), "is a directory, not a config file"),
        (empty.display().to_string(), "the config is empty"),
        (
            huge.display().to_string(),
            "a config is a few hundred bytes",
        ),
        (
            "launcher/tests/fixtures/garbage.bin".into(),
            "is not UTF-8 text (invalid byte at offset",
        ),
        (deep.display().to_string(), "model"),
    ];
    for (path, expected) in cases {
        let output = launch(&["--config", &path, "--dry-run"]);
        assert_eq!(code(&output), 2, "{path}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.starts_with("error: "), "{path}: {message}");
        assert!(message.contains(expected), "{path}: {message}");
        assert!(!message.contains("panicked"), "{path}: {message}");
    }
}

#[test]
fn set_overrides_reach_the_plan_and_are_validated() {
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--set",
        "parallel.pipeline=8",
        "--set",
        "parallel.data=16",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("data 16 x tensor 8 x pipeline 8 = 1024 ranks"));
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--set",
        "parallel.data=0",
    ]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("--set parallel.data=0: parallel.data: must be at least 1, got 0"),
        "{}",
        stderr(&output)
    );
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--set",
        "parallel.tensr=4",
    ]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("did you mean `parallel.tensor`?"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_plan_that_does_not_fit_exits_3_naming_ranks_and_remedies() {
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--set",
        "parallel.recompute=none",
        "--set",
        "training.micro_batch=8",
        "--set",
        "parallel.pipeline=4",
        "--set",
        "parallel.data=32",
    ]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("does not fit: stages 0 and 1 (512 ranks, e.g. rank 0)"),
        "{text}"
    );
    assert!(text.contains("the largest part is activations"), "{text}");
    assert!(text.contains("--set parallel.recompute=full"), "{text}");
    assert!(text.contains("--set training.micro_batch=4"), "{text}");
    assert!(
        text.contains("launch search --config configs/175b.yaml --gpus 1024"),
        "{text}"
    );
    assert!(
        stderr(&output).contains("error: does not fit"),
        "{}",
        stderr(&output)
    );

    // Every remedy marked "fits" does fit when applied.
    for line in text
        .lines()
        .filter(|l| l.trim_end().ends_with(" fits") && l.trim_start().starts_with("--set"))
    {
        let sets: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| *w != "peak")
            .filter(|w| *w != "--set")
            .collect();
        let mut args = vec![
            "--config",
            "configs/175b.yaml",
            "--dry-run",
            "--set",
            "parallel.recompute=none",
            "--set",
            "training.micro_batch=8",
            "--set",
            "parallel.pipeline=4",
            "--set",
            "parallel.data=32",
        ];
        for set in &sets {
            args.extend(["--set", set]);
        }
        assert_eq!(code(&launch(&args)), 0, "remedy {sets:?} was said to fit");
    }
}

#[test]
fn the_svg_chart_draws_a_bar_per_stage_against_capacity() {
    let dir = scratch("svg");
    let path = dir.join("plan.svg");
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--svg",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = std::fs::read_to_string(&path).expect("the SVG was written");
    let svg = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let bars: Vec<_> = svg
        .descendants()
        .filter(|n| n.attribute("class") == Some("bar"))
        .collect();
    assert_eq!(bars.len(), 16, "one bar per distinct stage");
    let capacity = svg
        .descendants()
        .find(|n| n.attribute("class") == Some("capacity"))
        .expect("capacity line");
    let usable = svg
        .descendants()
        .find(|n| n.attribute("class") == Some("usable"))
        .expect("usable line");
    let line_y = |n: roxmltree::Node| n.attribute("y1").unwrap().parse::<f64>().unwrap();
    let bottom = 470.0;
    // The usable line sits at 80% of the capacity line's height above the axis.
    let ratio = (bottom - line_y(usable)) / (bottom - line_y(capacity));
    assert!((ratio - 0.8).abs() < 1e-3, "{ratio}");
    // Segment heights are proportional to their bytes, on the same scale as the capacity line.
    let per_pixel = (80u64 << 30) as f64 / (bottom - line_y(capacity));
    for bar in &bars {
        for segment in bar
            .children()
            .filter(|n| n.attribute("class") == Some("segment"))
        {
            let bytes: f64 = segment.attribute("data-bytes").unwrap().parse().unwrap();
            let height: f64 = segment.attribute("height").unwrap().parse().unwrap();
            assert!(
                (height * per_pixel - bytes).abs() / bytes < 0.01 || height < 1.0,
                "{bytes} bytes drawn {height} px high"
            );
        }
    }
    let stage0: Vec<_> = bars[0]
        .children()
        .filter(|n| n.attribute("class") == Some("segment"))
        .map(|n| n.attribute("data-category").unwrap())
        .collect();
    assert_eq!(
        stage0,
        [
            "params",
            "grads",
            "master",
            "optimizer",
            "activations",
            "workspace",
            "runtime"
        ]
    );
}

#[test]
fn without_a_config_the_built_in_tiny_cpu_job_is_planned() {
    let output = launch(&["--dry-run"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("configs/tiny-cpu.yaml (built in)"), "{text}");
    assert!(
        text.contains(
            "data 2 x tensor 2 x pipeline 2 = 8 ranks on 1 node x 8 cpu devices, tcp backend"
        ),
        "{text}"
    );
    assert!(
        !text.contains("runtime column"),
        "CPU workers have no CUDA runtime lines"
    );
}

#[test]
fn rank_lists_every_region_of_one_rank() {
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--rank",
        "1023",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("rank 1023: data 7, pipeline 15, tensor 7 (node 127, local rank 7); stage 15, layers 90-95"), "{text}");
    assert!(text.contains("params.head"), "{text}");
    assert!(text.contains("head.logits"), "{text}");
    assert!(text.contains("(est.)"), "{text}");
    let output = launch(&[
        "--config",
        "configs/175b.yaml",
        "--dry-run",
        "--rank",
        "1024",
    ]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("rank 1024 does not exist: the world has 1024 ranks"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn running_without_dry_run_says_what_this_build_can_do() {
    let output = launch(&["--config", "configs/tiny-cpu.yaml"]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("Add --dry-run to print the memory plan"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_explains_the_exit_statuses_and_overrides() {
    let output = launch(&["--help"]);
    assert_eq!(code(&output), 0);
    let text = stdout(&output);
    for phrase in [
        "--dry-run",
        "--set <KEY=VALUE>",
        "--svg <FILE>",
        "Exit status: 0 it fits, 3 it does not, 2",
        "search",
    ] {
        assert!(text.contains(phrase), "--help lacks {phrase:?}:\n{text}");
    }
    let output = launch(&["--bogus"]);
    assert_eq!(code(&output), 2);
}

#[test]
fn search_ranks_layouts_that_all_fit() {
    let output = launch(&[
        "search",
        "--config",
        "configs/175b.yaml",
        "--gpus",
        "1024",
        "--format",
        "json",
        "--top",
        "5",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let best = result["best"].as_array().unwrap();
    assert_eq!(best.len(), 5);
    assert!(result["fitting_layouts"].as_u64().unwrap() >= 5);
    let mut last = f64::INFINITY;
    for candidate in best {
        let speed = candidate["tokens_per_second"].as_f64().unwrap();
        assert!(speed <= last, "ranked fastest first");
        last = speed;
        // Plan it in full through the dry-run: it fits, with the same peak.
        let mut args = vec![
            "--config".to_string(),
            "configs/175b.yaml".into(),
            "--dry-run".into(),
            "--format".into(),
            "json".into(),
        ];
        for set in candidate["overrides"].as_array().unwrap() {
            args.extend(["--set".to_string(), set.as_str().unwrap().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let planned = launch(&args);
        assert_eq!(code(&planned), 0, "{}", stderr(&planned));
        let plan: Value = serde_json::from_slice(&planned.stdout).unwrap();
        assert_eq!(plan["peak_bytes"], candidate["peak_bytes"]);
    }
    let table = launch(&["search", "--config", "configs/175b.yaml", "--gpus", "1024"]);
    assert_eq!(code(&table), 0);
    let text = stdout(&table);
    assert!(text.contains("The 10 fastest"), "{text}");
    assert!(
        text.contains("plan #1 in full: launch --config configs/175b.yaml --dry-run --set"),
        "{text}"
    );
}

#[test]
fn search_for_175b_on_one_node_exits_3_with_a_reason() {
    let output = launch(&[
        "search",
        "--config",
        "configs/175b.yaml",
        "--gpus",
        "8",
        "--gpu-memory",
        "80GiB",
    ]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("error: no layout fits 8 devices of 80.00 GiB"),
        "{message}"
    );
    assert!(message.contains("the smallest peak"), "{message}");
    assert!(message.contains("16 bytes per parameter"), "{message}");
}

#[test]
fn search_rejects_gpu_counts_that_do_not_fill_nodes() {
    let output = launch(&["search", "--config", "configs/175b.yaml", "--gpus", "12"]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("--gpus 12 does not fill whole nodes"),
        "{}",
        stderr(&output)
    );
    let output = launch(&[
        "search",
        "--config",
        "configs/175b.yaml",
        "--gpus",
        "16",
        "--gpu-memory",
        "lots",
    ]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("--gpu-memory: `lots` is not a size"),
        "{}",
        stderr(&output)
    );
}
