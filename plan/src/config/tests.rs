//! Config behaviour as a user sees it: every shipped config loads, every rule's message names
//! the place, the key and the fix, and no input makes the reader panic.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const SHIPPED: &[(&str, &str)] = &[
    (
        "configs/175b.yaml",
        include_str!("../../../configs/175b.yaml"),
    ),
    (
        "configs/gpt2-124m.yaml",
        include_str!("../../../configs/gpt2-124m.yaml"),
    ),
    (
        "configs/gpt2-350m.yaml",
        include_str!("../../../configs/gpt2-350m.yaml"),
    ),
    (
        "configs/gpt2-1.3b.yaml",
        include_str!("../../../configs/gpt2-1.3b.yaml"),
    ),
    (
        "configs/tiny-cpu.yaml",
        include_str!("../../../configs/tiny-cpu.yaml"),
    ),
    (
        "configs/tiny-llama-cpu.yaml",
        include_str!("../../../configs/tiny-llama-cpu.yaml"),
    ),
    (
        "configs/llama3-8b.yaml",
        include_str!("../../../configs/llama3-8b.yaml"),
    ),
    (
        "configs/llama3-70b.yaml",
        include_str!("../../../configs/llama3-70b.yaml"),
    ),
    (
        "configs/deepseek-67b.yaml",
        include_str!("../../../configs/deepseek-67b.yaml"),
    ),
];

const MINIMAL: &str = "model: {layers: 2, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\n";

fn load(text: &str) -> Result<Config> {
    Config::from_yaml("c.yaml", text, &[])
}

fn load_with(text: &str, sets: &[&str]) -> Result<Config> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_yaml("c.yaml", text, &sets)
}

/// The rendered error of a config that must fail.
fn error(text: &str) -> String {
    load(text).expect_err("config must be rejected").to_string()
}

fn issues(text: &str) -> Vec<Issue> {
    match load(text) {
        Err(Error::InvalidConfig { issues }) => issues,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// MINIMAL with one more section appended (later keys of a section go in one block).
fn with(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

#[test]
fn every_shipped_config_loads() {
    for (path, text) in SHIPPED {
        let config = Config::from_yaml(path, text, &[]).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(config.warnings.is_empty(), "{path}: {:?}", config.warnings);
    }
}

#[test]
fn the_175b_config_is_gpt3_on_1024_gpus() {
    let config = Config::from_yaml("175b", SHIPPED[0].1, &[]).unwrap();
    assert_eq!(
        (config.model.layers, config.model.hidden, config.model.heads),
        (96, 12288, 96)
    );
    assert_eq!(
        (
            config.parallel.data,
            config.parallel.tensor,
            config.parallel.pipeline
        ),
        (8, 8, 16)
    );
    assert_eq!(config.cluster.world_size(), 1024);
    assert_eq!(config.cluster.gpu_memory, 80 << 30);
    assert_eq!(config.parallel.zero, Zero::Optimizer);
    assert_eq!(config.parallel.recompute, Recompute::Selective);
    assert!(config.parallel.sequence_sharded());
    assert_eq!(config.microbatches(), 192);
}

#[test]
fn defaults_fill_what_is_not_given() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.model.arch, Arch::Gpt2);
    assert_eq!(config.model.vocab, 50257);
    assert_eq!(config.model.ffn_hidden, 256);
    assert_eq!(
        (
            config.parallel.data,
            config.parallel.tensor,
            config.parallel.pipeline
        ),
        (1, 1, 1)
    );
    assert_eq!(config.parallel.schedule, Schedule::OneFOneB);
    assert_eq!(config.parallel.zero, Zero::Off);
    assert_eq!(config.parallel.recompute, Recompute::None);
    assert_eq!(config.training.micro_batch, 1);
    assert_eq!(config.training.precision, Precision::Bf16);
    assert_eq!(config.training.seed, 1234);
    assert_eq!(
        config.training.optimizer.min_lr,
        config.training.optimizer.lr / 10.0
    );
    assert_eq!(config.data, Data::Synthetic);
    assert_eq!((config.cluster.nodes, config.cluster.gpus_per_node), (1, 1));
    assert_eq!(config.cluster.device, Device::Cuda);
    assert_eq!(config.cluster.backend, Backend::Nccl);
    assert_eq!(config.cluster.headroom, 0.2);
    assert_eq!(config.checkpoint.keep, 3);
    assert_eq!(config.restart.max, 0);
    assert_eq!(config.watchdog.heartbeat, Duration::from_secs(1));
    assert_eq!(config.watchdog.heartbeat_timeout, Duration::from_secs(10));
    assert_eq!(config.watchdog.collective_timeout, Duration::from_secs(60));
    assert_eq!(config.watchdog.rendezvous_timeout, Duration::from_secs(120));
}

#[test]
fn restart_min_nodes_defaults_to_every_node_and_cannot_exceed_them() {
    let config = load(&with("cluster: {nodes: 4, gpus_per_node: 2}\n")).unwrap();
    assert_eq!(config.restart.min_nodes, 4);
    let config = load_with(
        &with("cluster: {nodes: 4, gpus_per_node: 2}\n"),
        &["restart.min_nodes=2"],
    )
    .unwrap();
    assert_eq!(config.restart.min_nodes, 2);
    let message = error(&with(
        "cluster: {nodes: 4, gpus_per_node: 2}\nrestart: {min_nodes: 5}\n",
    ));
    assert!(message.contains("restart.min_nodes"), "{message}");
    assert!(message.contains("at most 4"), "{message}");
}

#[test]
fn watchdog_durations_are_seconds_and_the_timeout_spans_two_beats() {
    let config = load_with(
        MINIMAL,
        &["watchdog.heartbeat=0.5", "watchdog.collective_timeout=5"],
    )
    .unwrap();
    assert_eq!(config.watchdog.heartbeat, Duration::from_millis(500));
    assert_eq!(config.watchdog.collective_timeout, Duration::from_secs(5));

    let message = error(&with("watchdog: {heartbeat: 2, heartbeat_timeout: 3}\n"));
    assert!(message.contains("watchdog.heartbeat_timeout"), "{message}");
    assert!(
        message.contains("must be at least twice watchdog.heartbeat (2 s), got 3 s"),
        "{message}"
    );
    assert!(message.contains("heartbeat_timeout: 20"), "{message}");
    let message = error(&with("watchdog: {collective_timeout: 0}\n"));
    assert!(
        message.contains("must be a number of seconds from 1 to a day"),
        "{message}"
    );
}

#[test]
fn every_watchdog_duration_has_a_floor() {
    // A beat every nanosecond flooded the coordinator and the workers' queues.
    for (set, floor) in [
        ("watchdog.heartbeat=1e-9", "from 0.1"),
        ("watchdog.heartbeat=0.05", "from 0.1"),
        ("watchdog.heartbeat_timeout=0.5", "from 1"),
        ("watchdog.collective_timeout=0.001", "from 1"),
        ("watchdog.rendezvous_timeout=0.2", "from 1"),
        ("watchdog.rendezvous_timeout=1e9", "to a day"),
    ] {
        let message = load_with(MINIMAL, &[set]).unwrap_err().to_string();
        let key = set.split('=').next().unwrap();
        assert!(message.contains(key), "{set}: {message}");
        assert!(message.contains(floor), "{set}: {message}");
    }
    let config = load_with(
        MINIMAL,
        &["watchdog.heartbeat=0.1", "watchdog.heartbeat_timeout=1"],
    )
    .unwrap();
    assert_eq!(config.watchdog.heartbeat, Duration::from_millis(100));
}

#[test]
fn data_defaults_to_the_gpus_left_after_tensor_and_pipeline() {
    let config = load(&with(
        "cluster: {nodes: 2, gpus_per_node: 8}\nparallel: {tensor: 4, pipeline: 2}\n",
    ))
    .unwrap();
    assert_eq!(config.parallel.data, 2);
    let message = error(&with(
        "cluster: {nodes: 1, gpus_per_node: 8}\nparallel: {pipeline: 3}\n",
    ));
    assert!(message.contains("parallel.data: cannot be derived: tensor (1) x pipeline (3) = 3 does not divide the cluster's 8 GPUs"), "{message}");
}

#[test]
fn cpu_devices_default_to_the_tcp_backend() {
    let config = load(&with("cluster: {device: cpu, gpus_per_node: 2}\n")).unwrap();
    assert_eq!(config.cluster.backend, Backend::Tcp);
    let message = error(&with("cluster: {device: cpu, backend: nccl}\n"));
    assert!(
        message.contains("cluster.backend: nccl needs CUDA devices"),
        "{message}"
    );
    assert!(message.contains("use `backend: tcp`"), "{message}");
}

#[test]
fn set_overrides_keys_and_is_validated_like_the_file() {
    let config = load_with(
        MINIMAL,
        &[
            "parallel.zero=2",
            "training.optimizer.lr=1e-4",
            "cluster.gpu_memory=40GB",
        ],
    )
    .unwrap();
    assert_eq!(config.parallel.zero, Zero::Gradients);
    assert_eq!(config.training.optimizer.lr, 1e-4);
    assert_eq!(config.cluster.gpu_memory, 40_000_000_000);
    // Later overrides win.
    let config = load_with(MINIMAL, &["training.steps=5", "training.steps=7"]).unwrap();
    assert_eq!(config.training.steps, 7);

    let message = load_with(MINIMAL, &["parallel.data=0"])
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("--set parallel.data=0: parallel.data: must be at least 1, got 0"),
        "{message}"
    );
    let message = load_with(MINIMAL, &["parallel.data=two"])
        .unwrap_err()
        .to_string();
    assert!(
        message
            .contains("--set parallel.data=two: parallel.data: expects a whole number, got `two`"),
        "{message}"
    );
    let message = load_with(MINIMAL, &["parallel.tensr=2"])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("--set parallel.tensr=2: parallel.tensr: unknown key `tensr`"),
        "{message}"
    );
    assert!(
        message.contains("did you mean `parallel.tensor`"),
        "{message}"
    );
}

#[test]
fn unknown_keys_are_named_with_a_suggestion() {
    let message = error(&with("parallel:\n  data: 1\n  tensr: 2\n"));
    assert!(
        message.starts_with("c.yaml:5:3: parallel.tensr: unknown key `tensr`"),
        "{message}"
    );
    assert!(
        message.contains("did you mean `parallel.tensor`?"),
        "{message}"
    );
    assert!(message.contains("5 |   tensr: 2"), "{message}");

    let message = error(&with("tensor: 8\n"));
    assert!(message.contains("unknown key `tensor`"), "{message}");
    assert!(
        message.contains("`tensor` belongs under `parallel.tensor`"),
        "{message}"
    );

    let message = error(&with("paralel:\n  data: 1\n"));
    assert!(message.contains("did you mean `parallel`?"), "{message}");
}

#[test]
fn wrong_types_say_what_was_expected_and_what_was_found() {
    let message = error(&with("parallel:\n  data: abc\n"));
    assert!(
        message.starts_with("c.yaml:4:9: parallel.data: expects a whole number, got `abc`"),
        "{message}"
    );
    let message = error(&with("parallel:\n  data: 2.5 # half a replica\n"));
    assert!(
        message.contains("parallel.data: expects a whole number, got `2.5`"),
        "{message}"
    );
    let message = error(&with("cluster:\n  headroom: lots\n"));
    assert!(
        message.contains("cluster.headroom: expects a number, got `lots`"),
        "{message}"
    );
    let message = error(&with("parallel:\n  sequence_parallel: yes\n"));
    assert!(
        message.contains("parallel.sequence_parallel: expects true or false, got `yes`"),
        "{message}"
    );
    let message = error(&with("parallel: [1, 2]\n"));
    assert!(
        message.contains("parallel: is a section: it takes keys, not `[1, 2]`"),
        "{message}"
    );
    assert!(
        message.contains("its keys are: data, tensor, pipeline"),
        "{message}"
    );
    let message = error("- 1\n- 2\n");
    assert!(
        message.contains("a config must be a YAML mapping of sections"),
        "{message}"
    );
    let message = error(&with("data:\n  kind: [tokens]\n"));
    assert!(
        message.contains("data.kind: expects a single value"),
        "{message}"
    );
}

#[test]
fn degrees_must_be_positive_integers() {
    for (value, expected) in [
        ("0", "must be at least 1, got 0"),
        ("-4", "must be at least 1, got -4"),
    ] {
        for key in ["data", "tensor", "pipeline", "virtual_stages"] {
            let message = error(&with(&format!("parallel:\n  {key}: {value}\n")));
            let prefix = format!("parallel.{key}: {expected}");
            assert!(message.contains(&prefix), "{key}={value}: {message}");
            assert!(
                message.contains("1 turns this kind of parallelism off") || key == "virtual_stages",
                "{message}"
            );
        }
    }
    let message = error(&with("parallel:\n  zero: 4\n"));
    assert!(
        message.contains("parallel.zero: must be at most 3, got 4"),
        "{message}"
    );
}

#[test]
fn the_world_size_must_match_the_cluster_and_the_fix_is_given() {
    let text = "model: {layers: 96, hidden: 12288, heads: 96, seq_len: 2048}\n\
                parallel:\n  data: 32\n  tensor: 8\n  pipeline: 4\n\
                training: {global_batch: 1536, steps: 10}\n\
                cluster: {nodes: 32, gpus_per_node: 8}\n";
    let message = error(text);
    assert!(
        message.starts_with("c.yaml:3:9: parallel: data (32) x tensor (8) x pipeline (4) = 1024 ranks, but cluster has 256 GPUs (32 nodes x 8); for 256 GPUs with tensor 8 and pipeline 4 use data 8"),
        "{message}"
    );
    let message = error(&with(
        "parallel: {data: 3, tensor: 1, pipeline: 3}\ncluster: {gpus_per_node: 8}\n",
    ));
    assert!(
        message.contains("tensor x pipeline = 3 does not divide 8"),
        "{message}"
    );
}

#[test]
fn tensor_must_divide_heads_ffn_and_the_node() {
    let training = "training: {global_batch: 8, steps: 10}\n";
    let message = error(&format!(
        "{training}parallel: {{tensor: 8}}\ncluster: {{gpus_per_node: 8}}\nmodel: {{layers: 2, hidden: 96, heads: 12, seq_len: 32}}\n"
    ));
    assert!(
        message.contains("parallel.tensor: heads (12) must be divisible by tensor (8)"),
        "{message}"
    );
    assert!(
        message.contains("tensor degrees that fit: 1, 2 or 4"),
        "{message}"
    );

    let message = error(&format!(
        "{training}parallel: {{tensor: 4}}\ncluster: {{gpus_per_node: 4}}\nmodel: {{layers: 2, hidden: 64, heads: 4, seq_len: 32, ffn_hidden: 90}}\n"
    ));
    assert!(
        message.contains("parallel.tensor: ffn_hidden (90) must be divisible by tensor (4)"),
        "{message}"
    );

    let message = error(&with(
        "parallel: {tensor: 4}\ncluster: {nodes: 2, gpus_per_node: 2}\n",
    ));
    assert!(
        message.contains("tensor (4) must divide gpus_per_node (2)"),
        "{message}"
    );
}

#[test]
fn heads_must_divide_hidden() {
    let message = error(
        "model: {layers: 2, hidden: 64, heads: 5, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\n",
    );
    assert!(
        message.contains("model.heads: hidden (64) must be divisible by heads (5)"),
        "{message}"
    );
    assert!(
        message.contains("heads that divide 64: 1, 2, 4 or 8"),
        "{message}"
    );
}

#[test]
fn layers_must_divide_into_pipeline_stages() {
    let message = error(&with(
        "parallel: {pipeline: 3}\ncluster: {gpus_per_node: 3}\n",
    ));
    assert!(message.contains("parallel.pipeline: layers (2) must be divisible by pipeline (3) x virtual_stages (1) = 3"), "{message}");
    let message = error(&with(
        "parallel: {pipeline: 2, virtual_stages: 2, schedule: interleaved}\ncluster: {gpus_per_node: 2}\n",
    ));
    assert!(
        message.contains("layers (2) must be divisible by pipeline (2) x virtual_stages (2) = 4"),
        "{message}"
    );
}

#[test]
fn global_batch_must_divide_into_whole_microbatches() {
    let message = error(
        "model: {layers: 2, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 100, micro_batch: 2, steps: 10}\nparallel: {data: 8}\ncluster: {gpus_per_node: 8}\n",
    );
    assert!(
        message.contains("training.global_batch: global_batch (100) must be divisible by data (8) x micro_batch (2) = 16"),
        "{message}"
    );
    assert!(message.contains("use global_batch 96 or 112"), "{message}");
}

#[test]
fn interleaving_needs_a_pipeline_and_chunks() {
    let message = error(&with(
        "parallel: {schedule: interleaved, virtual_stages: 2}\n",
    ));
    assert!(
        message.contains("parallel.schedule: interleaved needs pipeline of 2 or more"),
        "{message}"
    );
    let message = error(&with(
        "parallel: {pipeline: 2, schedule: interleaved}\ncluster: {gpus_per_node: 2}\n",
    ));
    assert!(
        message.contains("interleaved needs virtual_stages of 2 or more"),
        "{message}"
    );
    let message = error(
        "model: {layers: 4, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\nparallel: {pipeline: 2, virtual_stages: 2, schedule: 1f1b}\ncluster: {gpus_per_node: 2}\n",
    );
    assert!(
        message.contains(
            "parallel.virtual_stages: virtual_stages (2) above 1 needs `schedule: interleaved`"
        ),
        "{message}"
    );
    let message = error(
        "model: {layers: 4, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 6, steps: 10}\nparallel: {pipeline: 4, virtual_stages: 1, schedule: interleaved}\ncluster: {gpus_per_node: 4}\n",
    );
    assert!(
        message.contains("interleaved needs virtual_stages"),
        "{message}"
    );
    let message = error(
        "model: {layers: 8, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 6, steps: 10}\nparallel: {pipeline: 4, virtual_stages: 2}\ncluster: {gpus_per_node: 4}\n",
    );
    assert!(
        message.contains("6 microbatches is not a multiple of 4"),
        "{message}"
    );
    // virtual_stages > 1 implies the interleaved schedule when none is named.
    let config = load("model: {layers: 8, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\nparallel: {pipeline: 4, virtual_stages: 2}\ncluster: {gpus_per_node: 4}\n").unwrap();
    assert_eq!(config.parallel.schedule, Schedule::Interleaved);
}

#[test]
fn sequence_parallel_needs_tokens_that_split_evenly() {
    let message = error(
        "model: {layers: 2, hidden: 64, heads: 4, seq_len: 5}\ntraining: {global_batch: 1, steps: 10}\nparallel: {tensor: 2, sequence_parallel: true}\ncluster: {gpus_per_node: 2}\n",
    );
    assert!(
        message.contains("parallel.sequence_parallel: splits the micro_batch x seq_len = 5 tokens"),
        "{message}"
    );
    let config = load(&with("parallel: {sequence_parallel: true}\n")).unwrap();
    assert!(config.warnings[0].contains("no effect with tensor 1"));
}

#[test]
fn unknown_enum_values_list_the_choices_and_the_nearest() {
    for (key, section, value, near) in [
        ("precision", "training", "bf61", Some("bf16")),
        ("recompute", "parallel", "sometimes", None),
        ("schedule", "parallel", "1f2b", Some("1f1b")),
        ("backend", "cluster", "mpi", None),
        ("device", "cluster", "metal", None),
        ("kind", "data", "tokenz", Some("tokens")),
    ] {
        let text = if section == "training" {
            format!(
                "model: {{layers: 2, hidden: 64, heads: 4, seq_len: 32}}\ntraining: {{global_batch: 8, steps: 10, {key}: {value}}}\n"
            )
        } else {
            with(&format!("{section}:\n  {key}: {value}\n"))
        };
        let message = error(&text);
        assert!(
            message.contains(&format!("{section}.{key}: must be one of ")),
            "{message}"
        );
        assert!(message.contains(&format!("got `{value}`")), "{message}");
        match near {
            Some(near) => assert!(
                message.contains(&format!("did you mean `{near}`?")),
                "{message}"
            ),
            None => assert!(message.contains("write one of"), "{message}"),
        }
    }
    // Names are matched without regard to case.
    let config = load(&with("parallel: {schedule: GPipe, recompute: FULL}\n")).unwrap();
    assert_eq!(config.parallel.schedule, Schedule::Gpipe);
    assert_eq!(config.parallel.recompute, Recompute::Full);
}

#[test]
fn sizes_accept_units_and_plain_bytes() {
    for (text, bytes) in [
        ("80GiB", 80u64 << 30),
        ("40GB", 40_000_000_000),
        ("85899345920", 85_899_345_920),
        ("\"512 MiB\"", 512 << 20),
    ] {
        let config = load(&with(&format!("cluster:\n  gpu_memory: {text}\n"))).unwrap();
        assert_eq!(config.cluster.gpu_memory, bytes, "{text}");
    }
    let message = error(&with("cluster:\n  gpu_memory: 80 parsecs\n"));
    assert!(
        message.contains("cluster.gpu_memory: `80 parsecs` is not a size"),
        "{message}"
    );
    let message = error(&with("cluster:\n  gpu_memory: 0\n"));
    assert!(
        message.contains("cluster.gpu_memory: must be more than 0 bytes"),
        "{message}"
    );
}

#[test]
fn missing_required_keys_are_all_listed() {
    let found = issues("model: {hidden: 64}\n");
    let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "model.layers",
            "model.heads",
            "model.seq_len",
            "training.global_batch",
            "training.steps"
        ]
    );
    assert!(
        found[0]
            .to_string()
            .starts_with("c.yaml: model.layers: is required but not set")
    );
    assert!(
        found[0]
            .to_string()
            .contains("help: add it: the number of transformer blocks")
    );
}

#[test]
fn data_files_are_required_for_file_kinds() {
    let message = error(&with("data: {kind: tokens}\n"));
    assert!(
        message.contains("data.path: is required with data.kind: tokens"),
        "{message}"
    );
    let config = load(&with("data: {kind: text, path: corpus.txt}\n")).unwrap();
    assert_eq!(
        config.data,
        Data::Text {
            path: "corpus.txt".into()
        }
    );
}

#[test]
fn optimizer_values_are_range_checked() {
    let message = error(
        &with("training:\n  global_batch: 8\n  steps: 10\n  optimizer: {lr: 0}\n")
            .replace("training: {global_batch: 8, steps: 10}\n", ""),
    );
    assert!(
        message.contains("training.optimizer.lr: must be greater than 0, got 0"),
        "{message}"
    );
    let message = error(
        "model: {layers: 2, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10, optimizer: {lr: 1e-4, min_lr: 1e-3}}\n",
    );
    assert!(
        message.contains("training.optimizer.min_lr: must not exceed lr"),
        "{message}"
    );
    let message = error(
        "model: {layers: 2, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10, optimizer: {beta2: 1.0}}\n",
    );
    assert!(
        message.contains("training.optimizer.beta2: must be in [0, 1), got 1"),
        "{message}"
    );
}

#[test]
fn empty_and_comment_only_files_are_reported_as_empty() {
    for text in ["", "   \n\n", "# nothing here\n"] {
        let message = error(text);
        assert!(
            message.starts_with("c.yaml: the config is empty"),
            "{text:?}: {message}"
        );
        assert!(message.contains("configs/tiny-cpu.yaml"), "{message}");
    }
}

#[test]
fn malformed_documents_are_errors_not_panics() {
    let message = error("model: {layers: 2\n");
    assert!(message.contains("is not valid YAML"), "{message}");
    let message = error("\u{0}\u{1}\u{2}ELF garbage");
    assert!(
        message.contains("is not valid YAML") || message.contains("unknown key"),
        "{message}"
    );
    let message = error(&format!("{MINIMAL}---\n{MINIMAL}"));
    assert!(message.contains("more than one YAML document"), "{message}");
    let message = error("model:\n  layers: 2\n  layers: 3\n");
    assert!(
        message.contains("model: key `layers` is given twice"),
        "{message}"
    );
    let message = error(&format!("{MINIMAL}{MINIMAL}"));
    assert!(
        message.starts_with("c.yaml:3:1: key `model` is given twice"),
        "{message}"
    );
}

#[test]
fn deep_or_huge_input_is_refused_cleanly() {
    let deep_flow = format!("model: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(error(&deep_flow).contains("model"));
    let deep_block: String = (0..5_000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    assert!(error(&deep_block).contains("unknown key `k0`"));
    let nested_in_a_section = format!(
        "model:\n{}",
        (1..200)
            .map(|i| format!("{}a:\n", "  ".repeat(i)))
            .collect::<String>()
    );
    let message = error(&nested_in_a_section);
    assert!(message.contains("unknown key `a`"), "{message}");
    let wide: String = (0..200_000).map(|i| format!("k{i}: 1\n")).collect();
    assert!(error(&wide).contains("unknown key `k0`"));
    let alias_bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
    assert!(!error(alias_bomb).is_empty());
    let long_value = format!("{MINIMAL}checkpoint: {{dir: {}}}\n", "x".repeat(2_000_000));
    assert_eq!(load(&long_value).unwrap().checkpoint.dir.len(), 2_000_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        let _ = load(&text);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = load(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_configs_never_panic(
        which in 0..SHIPPED.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, "[ -~\n]{0,3}"), 1..6),
    ) {
        let mut text = SHIPPED[which].1.to_string();
        for (at, action, insert) in edits {
            if text.is_empty() { break; }
            let mut index = at.index(text.len());
            while !text.is_char_boundary(index) { index -= 1; }
            match action {
                0 => text.insert_str(index, &insert),
                1 => { let end = (index + 3).min(text.len()); if text.is_char_boundary(end) { text.replace_range(index..end, ""); } }
                _ => { let end = (index + insert.len()).min(text.len()); if text.is_char_boundary(end) { text.replace_range(index..end, &insert); } }
            }
        }
        let _ = load(&text);
    }

    #[test]
    fn any_set_value_is_accepted_or_explained(key in "[a-z_.]{1,30}", value in "[ -~]{0,20}") {
        let result = load_with(MINIMAL, &[&format!("{key}={value}")]);
        if let Err(error) = result {
            prop_assert!(error.to_string().starts_with("--set "), "{}", error);
        }
    }
}

#[test]
fn one_node_may_run_fewer_ranks_than_it_has_devices_with_a_warning() {
    let config = load(&with(
        "parallel: {data: 4, tensor: 1, pipeline: 1}\ncluster: {nodes: 1, gpus_per_node: 8}\n",
    ))
    .unwrap();
    assert_eq!(config.parallel.world_size(), 4);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("uses 4 of the node's 8 devices")),
        "{:?}",
        config.warnings
    );
    let message = error(&with(
        "parallel: {data: 4, tensor: 1, pipeline: 1}\ncluster: {nodes: 2, gpus_per_node: 8}\n",
    ));
    assert!(
        message.contains("= 4 ranks, but cluster has 16 GPUs"),
        "{message}"
    );
}

#[test]
fn a_set_value_yaml_would_read_as_an_alias_anchor_or_tag_says_to_quote_it() {
    for (value, means) in [
        ("*.bin", "an alias"),
        ("&x", "an anchor"),
        ("!bin", "a tag"),
    ] {
        let set = format!("data.path={value}");
        let message = load_with(MINIMAL, &[set.as_str()]).unwrap_err().to_string();
        assert!(
            message.contains(&format!(
                "starts with `{}`, which YAML reads as {means}",
                &value[..1]
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!("--set 'data.path=\"{value}\"'")),
            "{message}"
        );
    }
    let quoted = load_with(MINIMAL, &["data.kind=tokens", "data.path=\"*.bin\""]).unwrap();
    assert_eq!(
        quoted.data,
        crate::config::Data::Tokens {
            path: "*.bin".into()
        }
    );
}

#[test]
fn cluster_tls_takes_three_paths_and_names_a_missing_one_where_the_others_are() {
    assert_eq!(load(MINIMAL).unwrap().cluster.tls, None);
    let config = load(&with(
        "cluster:\n  tls: {ca: certs/ca.pem, cert: certs/head.pem, key: certs/head-key.pem}\n",
    ))
    .unwrap();
    assert_eq!(
        config.cluster.tls,
        Some(Tls {
            ca: "certs/ca.pem".into(),
            cert: "certs/head.pem".into(),
            key: "certs/head-key.pem".into(),
        })
    );
    // Line 5 holds the section's ca; the key that is missing is reported there.
    let message = error(&with(
        "cluster:\n  tls:\n    ca: certs/ca.pem\n    cert: certs/head.pem\n",
    ));
    assert!(
        message.starts_with("c.yaml:5:9: cluster.tls.key: is required when cluster.tls is set"),
        "{message}"
    );
    assert!(
        message.contains("help: cluster.tls needs the CA certificate")
            && message.contains("launch certs --out DIR --hosts HOST"),
        "{message}"
    );
    let message = error(&with("cluster: {tls: {}}\n"));
    assert!(
        message.contains("c.yaml: cluster.tls: is empty") && message.contains("remove it"),
        "{message}"
    );
    let message = error(&with("cluster: {tls: {ca: '', cert: c.pem, key: k.pem}}\n"));
    assert!(
        message.contains("cluster.tls.ca: must be a path, got an empty one"),
        "{message}"
    );
    let message = error(&with("cluster: {tls: {ca: a, cert: b, key: c, crt: d}}\n"));
    assert!(message.contains("unknown key `crt`"), "{message}");
    // --set fills in the section like the file.
    let config = load_with(
        MINIMAL,
        &[
            "cluster.tls.ca=/tls/ca.pem",
            "cluster.tls.cert=/tls/n.pem",
            "cluster.tls.key=/tls/n-key.pem",
        ],
    )
    .unwrap();
    assert_eq!(config.cluster.tls.unwrap().key, "/tls/n-key.pem");
}

const LLAMA: &str = "model: {arch: llama, layers: 4, hidden: 64, heads: 4, kv_heads: 2, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\n";

#[test]
fn llama_defaults_untie_the_head_and_gpt2_keeps_it_tied() {
    let llama = load(LLAMA).unwrap();
    assert_eq!(llama.model.arch, Arch::Llama);
    assert_eq!((llama.model.kv_heads, llama.model.head_dim), (2, 16));
    assert!(!llama.model.tie_embeddings);
    assert_eq!(llama.model.rope_theta, 10_000.0);
    let gpt2 = load(MINIMAL).unwrap();
    assert!(gpt2.model.tie_embeddings);
    assert_eq!(gpt2.model.kv_heads, gpt2.model.heads);
    let tied = load_with(LLAMA, &["model.tie_embeddings=true"]).unwrap();
    assert!(tied.model.tie_embeddings);
}

#[test]
fn kv_heads_must_divide_heads_and_the_tensor_degree_must_divide_kv_heads() {
    let text = error(&LLAMA.replace("kv_heads: 2", "kv_heads: 3"));
    assert!(text.contains("model.kv_heads"), "{text}");
    assert!(text.contains("kv_heads that divide 4: 1, 2 or 4"), "{text}");
    let text = load_with(
        &LLAMA.replace("kv_heads: 2", "kv_heads: 1"),
        &["parallel.tensor=2", "cluster.gpus_per_node=2"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("kv_heads (1) must be divisible by tensor (2)"),
        "{text}"
    );
    assert!(text.contains("tensor degrees that fit: 1"), "{text}");
}

#[test]
fn gpt2_refuses_llama_only_keys_with_the_fix() {
    let text = error(&MINIMAL.replace("seq_len: 32", "seq_len: 32, rope_theta: 500000"));
    assert!(text.contains("model.rope_theta"), "{text}");
    assert!(text.contains("arch: llama"), "{text}");
    let text = error(&MINIMAL.replace("seq_len: 32", "seq_len: 32, norm_eps: 1.0e-6"));
    assert!(text.contains("model.norm_eps"), "{text}");
    let odd = LLAMA.replace("kv_heads: 2", "kv_heads: 2, head_dim: 15");
    assert!(error(&odd).contains("must be even for rotary embeddings"));
}

#[test]
fn an_uneven_pipeline_split_is_checked_and_gives_each_stage_its_layers() {
    let base = "model: {arch: llama, layers: 7, hidden: 64, heads: 4, seq_len: 32}\ntraining: {global_batch: 8, steps: 10}\ncluster: {gpus_per_node: 2}\n";
    let text = load_with(base, &["parallel.pipeline=2"])
        .unwrap_err()
        .to_string();
    assert!(text.contains("parallel.pipeline_layers: [4, 3]"), "{text}");
    let config = load_with(
        base,
        &["parallel.pipeline=2", "parallel.pipeline_layers=[4, 3]"],
    )
    .unwrap();
    assert_eq!(config.parallel.stage_layers(7, 0), vec![(0..4)]);
    assert_eq!(config.parallel.stage_layers(7, 1), vec![(4..7)]);
    let text = load_with(
        base,
        &["parallel.pipeline=2", "parallel.pipeline_layers=[4, 4]"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("add up to 8, but the model has 7 layers"),
        "{text}"
    );
    let text = load_with(
        base,
        &["parallel.pipeline=2", "parallel.pipeline_layers=[7]"],
    )
    .unwrap_err()
    .to_string();
    assert!(text.contains("lists 1 stages, but pipeline is 2"), "{text}");
    let text = load_with(
        base,
        &["parallel.pipeline=2", "parallel.pipeline_layers=[7, 0]"],
    )
    .unwrap_err()
    .to_string();
    assert!(text.contains("every stage holds 1 to"), "{text}");
    let text = load_with(
        base,
        &["parallel.pipeline=2", "parallel.pipeline_layers=seven"],
    )
    .unwrap_err()
    .to_string();
    assert!(text.contains("a list of whole numbers"), "{text}");
}

#[test]
fn data_sources_blend_files_of_one_kind_by_positive_weights() {
    let text = with(
        "data:\n  kind: tokens\n  sources: [{path: a/*.bin, weight: 0.7}, {path: b.bin, weight: 3}]\n",
    );
    let config = load(&text).unwrap();
    assert_eq!(
        config.data,
        Data::Blend {
            sources: vec![
                (
                    Data::Tokens {
                        path: "a/*.bin".into()
                    },
                    0.7
                ),
                (
                    Data::Tokens {
                        path: "b.bin".into()
                    },
                    3.0
                ),
            ]
        }
    );
    let both = error(&with(
        "data: {kind: tokens, path: c.bin, sources: [{path: a.bin, weight: 1}]}\n",
    ));
    assert!(
        both.contains("data.sources") && both.contains("data.path are both set"),
        "{both}"
    );
    let zero = error(&with(
        "data: {kind: tokens, sources: [{path: a.bin, weight: 0}]}\n",
    ));
    assert!(
        zero.contains("the weight of a.bin must be a positive number"),
        "{zero}"
    );
    let synthetic = error(&with("data: {sources: [{path: a.bin, weight: 1}]}\n"));
    assert!(synthetic.contains("data.kind is synthetic"), "{synthetic}");
    let typo = error(&with(
        "data: {kind: tokens, sources: [{path: a.bin, wieght: 1}]}\n",
    ));
    assert!(typo.contains("data.sources"), "{typo}");
}

#[test]
fn eval_is_off_by_default_and_counts_its_batches() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(
        config.eval,
        Eval {
            every: 0,
            batches: 4,
            path: None
        }
    );
    let config = load(&with(
        "eval: {every: 50, batches: 2, path: data/val_*.bin}\n",
    ))
    .unwrap();
    assert_eq!(config.eval.every, 50);
    assert_eq!(config.eval.path.as_deref(), Some("data/val_*.bin"));
    assert!(error(&with("eval: {every: -1}\n")).contains("eval.every"));
    assert!(error(&with("eval: {batches: 0}\n")).contains("eval.batches"));
    assert!(error(&with("eval: {evry: 5}\n")).contains("did you mean `eval.every`"));
}
