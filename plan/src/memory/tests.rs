//! The memory plan against the formulas it must reproduce (ZeRO, 1F1B, interleaving,
//! recompute) and against hand-computed sizes of the 175B model.

use proptest::prelude::*;

use super::*;
use crate::config::Schedule;

/// A GPT-2-shaped model on `gpus` devices; `sets` adjust it.
fn config(sets: &[&str]) -> Config {
    let text = "model: {layers: 24, hidden: 2048, heads: 16, seq_len: 1024}\n\
                training: {global_batch: 512, micro_batch: 4, steps: 10}\n\
                cluster: {nodes: 1, gpus_per_node: 8}\n\
                parallel: {data: 8}\n";
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_yaml("test.yaml", text, &sets).unwrap_or_else(|e| panic!("{e}"))
}

fn states(stage: &StagePlan) -> u64 {
    [
        Category::Params,
        Category::Grads,
        Category::Master,
        Category::Optimizer,
    ]
    .iter()
    .map(|&c| stage.bytes(Place::Device, c))
    .sum()
}

/// Bytes of the per-layer activation rows (those indexed by slot and layer).
fn layer_activations(stage: &StagePlan) -> u64 {
    stage
        .regions
        .iter()
        .filter(|r| matches!(r.per, Per::SlotLayer { .. }))
        .map(Region::bytes)
        .sum()
}

#[test]
fn zero_stages_reproduce_the_model_state_formulas() {
    for (zero, formula) in [
        ("0", (|psi: f64, _d: f64| 16.0 * psi) as fn(f64, f64) -> f64),
        ("1", |psi, d| 4.0 * psi + 12.0 * psi / d),
        ("2", |psi, d| 2.0 * psi + 14.0 * psi / d),
        ("3", |psi, d| 16.0 * psi / d),
    ] {
        let config = config(&[&format!("parallel.zero={zero}")]);
        let plan = MemoryPlan::new(&config);
        let stage = &plan.stages[0];
        let psi = stage.params as f64;
        let expected = formula(psi, 8.0);
        let measured = states(stage) as f64;
        // Padding: per unit, < PARAM_ALIGN elements after each parameter and < PARAM_ALIGN x d
        // for the shard rounding, at 16 bytes per element; plus < ALIGN per region.
        let units = 26.0;
        let slack = units * (16.0 * PARAM_ALIGN as f64 + 8.0 * PARAM_ALIGN as f64) * 16.0
            + stage.regions.len() as f64 * ALIGN as f64;
        assert!(measured >= expected, "zero {zero}: {measured} < {expected}");
        assert!(
            measured - expected <= slack,
            "zero {zero}: {measured} vs {expected} (slack {slack})"
        );
    }
}

#[test]
fn one_f_one_b_stage_i_keeps_p_minus_i_microbatches_of_activations() {
    let config = config(&[
        "parallel.data=2",
        "parallel.pipeline=4",
        "training.global_batch=64",
    ]);
    let plan = MemoryPlan::new(&config);
    let per_microbatch = layer_activations(&plan.stages[3]);
    for (i, stage) in plan.stages.iter().enumerate() {
        assert_eq!(stage.in_flight.total, 4 - i);
        assert_eq!(
            layer_activations(stage),
            (4 - i) as u64 * per_microbatch,
            "stage {i}"
        );
        assert_eq!(stage.layers, vec![i * 6..(i + 1) * 6]);
    }
}

#[test]
fn interleaving_multiplies_stage_zero_activations_by_one_plus_p_minus_1_over_pv() {
    for (p, v) in [(4usize, 2usize), (8, 3)] {
        let base = [
            format!("parallel.data={}", 8 / p.min(8)),
            format!("parallel.pipeline={p}"),
            "cluster.gpus_per_node=8".to_string(),
            "training.global_batch=64".to_string(),
            "model.layers=48".to_string(),
        ];
        let mut interleaved: Vec<String> = base.to_vec();
        interleaved.push(format!("parallel.virtual_stages={v}"));
        let plain_plan = MemoryPlan::new(&config(
            &base.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let inter_plan = MemoryPlan::new(&config(
            &interleaved.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert_eq!(inter_plan.stages[0].layers.len(), v);
        let ratio = layer_activations(&inter_plan.stages[0]) as f64
            / layer_activations(&plain_plan.stages[0]) as f64;
        let expected = 1.0 + (p as f64 - 1.0) / (p * v) as f64;
        assert!(
            (ratio - expected).abs() < 1e-9,
            "p{p} v{v}: {ratio} vs {expected}"
        );
    }
}

#[test]
fn full_recompute_keeps_only_each_layers_input() {
    let config = config(&["parallel.recompute=full"]);
    let stage = &MemoryPlan::new(&config).stages[0];
    let saved: Vec<&str> = stage
        .regions
        .iter()
        .filter(|r| matches!(r.per, Per::SlotLayer { .. }))
        .map(|r| r.name)
        .collect();
    assert_eq!(saved, ["act.resid"]);
    let (b, t, c) = (4u64, 1024u64, 2048u64);
    assert_eq!(layer_activations(stage), 24 * b * t * c * 2);
    // Backward re-runs a layer's forward into one transient copy of every other tensor.
    assert!(
        stage.region("recompute.qkv").is_some() && stage.region("recompute.fch_gelu").is_some()
    );
}

#[test]
fn selective_recompute_drops_layernorm_and_gelu_outputs() {
    let none = MemoryPlan::new(&config(&[])).stages.remove(0);
    let selective = MemoryPlan::new(&config(&["parallel.recompute=selective"]))
        .stages
        .remove(0);
    for name in ["act.ln1", "act.ln2", "act.fch_gelu"] {
        assert!(
            none.region(name).is_some() && selective.region(name).is_none(),
            "{name}"
        );
    }
    for name in ["act.qkv", "act.fch", "act.ln1_mean", "act.att_lse"] {
        assert!(selective.region(name).is_some(), "{name}");
    }
    // 16 of the 16 C-wide tensors per token with none, 10 with selective (F = 4C).
    let per_layer = |s: &StagePlan| layer_activations(s) as f64;
    let ratio = per_layer(&selective) / per_layer(&none);
    assert!((ratio - 10.0 / 16.0).abs() < 0.01, "{ratio}");
}

#[test]
fn sequence_parallelism_splits_the_tokens_outside_attention_and_mlp() {
    let plain = MemoryPlan::new(&config(&["parallel.tensor=4", "parallel.data=2"]))
        .stages
        .remove(0);
    let sp = MemoryPlan::new(&config(&[
        "parallel.tensor=4",
        "parallel.data=2",
        "parallel.sequence_parallel=true",
    ]))
    .stages
    .remove(0);
    let elems = |s: &StagePlan, name| s.region(name).unwrap().elems;
    assert_eq!(elems(&plain, "act.resid"), 4 * 1024 * 2048);
    assert_eq!(elems(&sp, "act.resid"), 4 * 1024 * 2048 / 4);
    assert_eq!(elems(&sp, "act.ln1_mean"), 1024);
    assert_eq!(elems(&sp, "act.qkv"), elems(&plain, "act.qkv"));
    assert_eq!(elems(&sp, "act.qkv"), 4 * 1024 * 3 * 2048 / 4);
}

#[test]
fn attention_keeps_no_seq_by_seq_matrix() {
    // A long sequence on a narrow model, so a T x T buffer would stand out.
    let text = "model: {layers: 2, hidden: 64, heads: 4, vocab: 256, seq_len: 4096}\ntraining: {global_batch: 1, steps: 1}\n";
    let config = Config::from_yaml("long.yaml", text, &[]).unwrap();
    let stage = &MemoryPlan::new(&config).stages[0];
    for region in &stage.regions {
        if region.category != Category::Runtime {
            assert!(
                region.elems < 4096 * 4096,
                "{} has {} elements",
                region.name,
                region.elems
            );
        }
    }
    assert_eq!(stage.region("act.att_lse").unwrap().elems, 4 * 4096);
}

#[test]
fn offloaded_optimizer_states_move_to_host_memory() {
    let plain = MemoryPlan::new(&config(&["parallel.zero=1"]))
        .stages
        .remove(0);
    let offload = MemoryPlan::new(&config(&[
        "parallel.zero=1",
        "parallel.offload.optimizer=true",
    ]))
    .stages
    .remove(0);
    assert_eq!(offload.bytes(Place::Device, Category::Master), 0);
    assert_eq!(offload.bytes(Place::Device, Category::Optimizer), 0);
    assert_eq!(
        offload.bytes(Place::Host, Category::Master),
        plain.bytes(Place::Device, Category::Master)
    );
    assert_eq!(
        offload.bytes(Place::Host, Category::Optimizer),
        plain.bytes(Place::Device, Category::Optimizer)
    );
    // Staging holds one shard in bf16: a sixth of the master + Adam bytes.
    assert_eq!(
        offload.bytes(Place::Host, Category::Comm) * 6,
        offload.bytes(Place::Host, Category::Master)
            + offload.bytes(Place::Host, Category::Optimizer)
    );
    assert_eq!(
        plain.host_bytes(),
        plain.bytes(Place::Host, Category::Checkpoint),
        "without offload the host holds only the checkpoint staging"
    );
}

#[test]
fn checkpoint_staging_holds_the_parameters_master_weights_and_adam_moments() {
    for sets in [
        &["parallel.zero=0"][..],
        &["parallel.zero=1", "training.precision=bf16"],
        &["parallel.zero=3", "parallel.offload.optimizer=true"],
    ] {
        let stage = MemoryPlan::new(&config(sets)).stages.remove(0);
        let staging = stage.region("checkpoint.staging").expect("a staging row");
        assert_eq!(staging.place, Place::Host, "{sets:?}");
        let state: u64 = [Category::Params, Category::Master, Category::Optimizer]
            .iter()
            .flat_map(|&c| [Place::Device, Place::Host].map(|p| stage.bytes(p, c)))
            .sum();
        assert_eq!(staging.bytes(), state, "{sets:?}");
        assert_eq!(stage.bytes(Place::Host, Category::Checkpoint), state);
        assert_eq!(stage.bytes(Place::Device, Category::Checkpoint), 0);
    }
    let none = MemoryPlan::new(&config(&["checkpoint.every=0"]));
    assert!(none.stages[0].region("checkpoint.staging").is_none());
    assert_eq!(
        none.stages[0].host_bytes(),
        0,
        "a run that saves nothing stages nothing"
    );
}

#[test]
fn fp32_training_keeps_no_master_copy() {
    let stage = MemoryPlan::new(&config(&["training.precision=fp32"]))
        .stages
        .remove(0);
    assert_eq!(stage.bytes(Place::Device, Category::Master), 0);
    assert_eq!(stage.region("params.layer").unwrap().dtype, Dtype::F32);
    let offload = MemoryPlan::new(&config(&[
        "training.precision=fp32",
        "parallel.offload.optimizer=true",
    ]))
    .stages
    .remove(0);
    assert!(
        offload.bytes(Place::Host, Category::Master) > 0,
        "the host step needs its fp32 copy"
    );
}

#[test]
fn embedding_and_head_sit_on_the_first_and_last_stage() {
    let config = config(&[
        "parallel.data=2",
        "parallel.pipeline=4",
        "training.global_batch=64",
    ]);
    let plan = MemoryPlan::new(&config);
    assert!(plan.stages[0].region("params.embedding").is_some());
    assert!(plan.stages[0].region("act.tokens").is_some());
    assert!(plan.stages[1].region("params.embedding").is_none());
    assert!(plan.stages[3].region("params.head").is_some());
    assert!(plan.stages[3].region("head.logits").is_some());
    assert!(plan.stages[2].region("head.logits").is_none());
    // With 4 stages the head keeps its own copy of the tied embedding.
    let head = plan.stages[3].region("params.head").unwrap().elems;
    assert!(head > (plan.shape.vocab_padded * 2048) as u64);
    let single = MemoryPlan::new(&self::config(&[])).stages.remove(0);
    assert!(single.region("params.head").unwrap().elems < 2 * 2048 + 2 * PARAM_ALIGN);
}

#[test]
fn zero_buckets_appear_at_stages_two_and_three() {
    for (zero, bucket, gather) in [("1", false, false), ("2", true, false), ("3", true, true)] {
        let stage = MemoryPlan::new(&config(&[&format!("parallel.zero={zero}")]))
            .stages
            .remove(0);
        assert_eq!(
            stage.region("zero.grad_bucket").is_some(),
            bucket,
            "zero {zero}"
        );
        assert_eq!(
            stage.region("zero.param_gather").is_some(),
            gather,
            "zero {zero}"
        );
    }
}

#[test]
fn runtime_lines_appear_on_gpus_only() {
    let gpu = MemoryPlan::new(&config(&["parallel.tensor=2", "parallel.data=4"]))
        .stages
        .remove(0);
    let nccl = gpu.region("runtime.nccl").unwrap();
    assert_eq!(nccl.per, Per::Copies(2), "tensor and data groups");
    assert!(nccl.estimated && gpu.region("runtime.cuda_context").unwrap().estimated);
    assert!(!gpu.region("runtime.cublaslt_workspace").unwrap().estimated);
    let cpu = MemoryPlan::new(&config(&["cluster.device=cpu"]))
        .stages
        .remove(0);
    assert_eq!(cpu.bytes(Place::Device, Category::Runtime), 0);
}

#[test]
fn every_rank_of_a_stage_shares_its_plan() {
    let config = config(&[
        "parallel.data=2",
        "parallel.pipeline=2",
        "parallel.tensor=2",
        "training.global_batch=64",
    ]);
    let plan = MemoryPlan::new(&config);
    for rank in 0..8 {
        let coord = plan.mesh.coord(rank).unwrap();
        assert_eq!(plan.rank(rank).unwrap().pp_rank, coord.pp_rank);
    }
    assert!(plan.rank(8).is_err());
}

#[test]
fn regions_are_aligned_and_totals_add_up() {
    let stage = MemoryPlan::new(&config(&[])).stages.remove(0);
    for region in &stage.regions {
        assert_eq!(region.bytes_each() % ALIGN, 0);
        assert!(region.bytes_each() >= region.elems * region.dtype.size());
        assert!(region.bytes_each() - region.elems * region.dtype.size() < ALIGN);
    }
    let by_category: u64 = Category::ALL
        .iter()
        .map(|&c| stage.bytes(Place::Device, c))
        .sum();
    assert_eq!(by_category, stage.device_bytes());
    assert!(stage.device_padding() < stage.regions.len() as u64 * ALIGN);
    let mut names: Vec<&str> = stage.regions.iter().map(|r| r.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), stage.regions.len(), "region names are unique");
}

#[test]
fn the_175b_plan_matches_hand_computed_sizes_and_fits() {
    let text = include_str!("../../../configs/175b.yaml");
    let config = Config::from_yaml("175b.yaml", text, &[]).unwrap();
    let plan = MemoryPlan::new(&config);
    let (c, t) = (12288u64, 8u64);
    // A layer on one tensor rank: 12 C^2 / t weights, 7 C / t sharded biases, 6 C replicated
    // (two LayerNorms, attproj_b, fcproj_b); every size is a multiple of PARAM_ALIGN.
    let layer = 12 * c * c / t + 7 * c / t + 6 * c;
    let stage = &plan.stages[7];
    let params = stage.region("params.layer").unwrap();
    assert_eq!((params.elems, params.per), (layer, Per::Layer(6)));
    assert_eq!(
        stage.region("master.layer").unwrap().elems,
        layer / 8,
        "ZeRO-1 over 8 replicas"
    );
    assert_eq!(stage.params, 6 * layer);
    assert_eq!(stage.in_flight.total, 16 - 7);
    // Selective recompute with sequence parallelism: per layer and microbatch, (1 + 1 + 4) C/t
    // per token in bf16 (resid, resid2, fch... of which qkv 3, atty 1) = 10 C/t, plus fp32 stats.
    let tokens = 2048u64;
    let per_layer = 2 * tokens * (10 * c / t) + 4 * (4 * tokens / t + 96 / t * tokens);
    assert_eq!(layer_activations(stage), per_layer * 6 * 9);
    assert!(plan.fits(), "peak {}", plan.peak_bytes());
    assert_eq!(plan.peak_stage().pp_rank, 0);
    assert_eq!(plan.mesh.world_size(), 1024);
}

#[test]
fn the_largest_configs_validation_admits_plan_instantly_without_overflow() {
    let text = "model: {layers: 10000, hidden: 4194304, heads: 1, vocab: 16777216, seq_len: 32, ffn_hidden: 4194304}\n\
                training: {global_batch: 2147483648, micro_batch: 1, steps: 1}\n\
                parallel: {pipeline: 1, data: 1}\n";
    let config = Config::from_yaml("huge.yaml", text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let plan = MemoryPlan::new(&config);
    assert!(!plan.fits());
    let gpipe = Config::from_yaml("huge.yaml", text, &["parallel.schedule=gpipe".into()]).unwrap();
    assert_eq!(MemoryPlan::new(&gpipe).stages[0].in_flight.total, 1 << 31);
    let message = Config::from_yaml(
        "huge.yaml",
        text,
        &[
            "cluster.nodes=1048576".into(),
            "cluster.gpus_per_node=8".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("8388608 devices is more than tessera plans"),
        "{message}"
    );
}

/// Random valid layouts: the planner never overflows or panics, and the largest stage is
/// always the first or the last (the search evaluates only those two).
fn arbitrary_config() -> impl Strategy<Value = Config> {
    (
        (1usize..=4, 0u32..=3, 0u32..=3, 0usize..3),
        (1usize..=3, 0usize..3, 0usize..4, 0usize..3),
        (any::<bool>(), any::<bool>(), 0usize..3, 1usize..=4),
    )
        .prop_filter_map(
            "layout must validate",
            |((layers_per_stage, tp_log, pp_log, heads_pick), (v, dp_pick, zero, recompute), (sp, offload, schedule, micro))| {
                let (tp, pp) = (1usize << tp_log, 1usize << pp_log);
                let dp = [1usize, 2, 3][dp_pick];
                let heads = [8usize, 16, 24][heads_pick];
                let schedule = if v > 1 { Schedule::Interleaved } else { [Schedule::Gpipe, Schedule::OneFOneB, Schedule::OneFOneB][schedule] };
                let text = format!(
                    "model: {{layers: {}, hidden: {}, heads: {heads}, vocab: 1000, seq_len: 64}}\n\
                     parallel: {{data: {dp}, tensor: {tp}, pipeline: {pp}, virtual_stages: {v}, sequence_parallel: {sp}, zero: {zero}, \
                     offload: {{optimizer: {offload}}}, recompute: {}, schedule: {}}}\n\
                     training: {{global_batch: {}, micro_batch: {micro}, steps: 1}}\n\
                     cluster: {{nodes: {dp}, gpus_per_node: {}}}\n",
                    layers_per_stage * pp * v,
                    heads * 16,
                    ["none", "selective", "full"][recompute],
                    schedule,
                    dp * micro * pp * 2,
                    tp * pp,
                );
                Config::from_yaml("random.yaml", &text, &[]).ok()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_peak_is_at_the_first_or_last_stage(config in arbitrary_config()) {
        let plan = MemoryPlan::new(&config);
        let peak = plan.peak_bytes();
        let ends = plan.stages[0].device_bytes().max(plan.stages.last().unwrap().device_bytes());
        prop_assert_eq!(peak, ends);
    }
}

/// A small llama on `gpus_per_node: 8`; `sets` adjust it.
fn llama(sets: &[&str]) -> Config {
    let text = "model: {arch: llama, layers: 8, hidden: 512, heads: 8, kv_heads: 2, seq_len: 256, ffn_hidden: 1408, vocab: 1000}\n\
                training: {global_batch: 64, micro_batch: 2, steps: 10}\n\
                cluster: {nodes: 1, gpus_per_node: 8}\n";
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_yaml("llama.yaml", text, &sets).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_llama_layer_keeps_its_own_tensors_and_recompute_drops_the_element_wise_ones() {
    let config = llama(&["parallel.data=8"]);
    let stage = &MemoryPlan::new(&config).stages[0];
    let (n, c) = (2 * 256, 512u64);
    let row = |name: &str| stage.region(name).unwrap_or_else(|| panic!("{name}"));
    // q: 8 heads x 64, k and v: 2 heads x 64 each.
    assert_eq!(row("act.qkv").elems, n * (512 + 2 * 128));
    assert_eq!(row("act.gate_up").elems, n * 2 * 1408);
    assert_eq!(row("act.swiglu").elems, n * 1408);
    assert_eq!(row("act.attn_rstd").dtype, Dtype::F32);
    assert_eq!(row("act.attn_norm").elems, n * c);
    assert_eq!(row("rope.table").elems, 256 * 64);
    assert_eq!(row("scratch.dgate_up").elems, n * 2 * 1408);
    assert!(stage.region("act.ln1_mean").is_none() && stage.region("head.lnf_mean").is_none());
    assert!(stage.region("act.fch").is_none(), "no GELU MLP");
    let selective =
        &MemoryPlan::new(&llama(&["parallel.data=8", "parallel.recompute=selective"])).stages[0];
    for name in ["act.attn_norm", "act.mlp_norm", "act.swiglu"] {
        assert!(selective.region(name).is_none(), "{name} is recomputed");
        let recomputed = name.replace("act.", "recompute.");
        assert!(selective.region(&recomputed).is_some(), "{recomputed}");
    }
    assert!(selective.region("act.gate_up").is_some());
    assert!(layer_activations(selective) < layer_activations(stage));
}

#[test]
fn an_untied_head_lives_on_the_last_stage_only_and_needs_no_embedding_group() {
    let config = llama(&[
        "parallel.pipeline=2",
        "parallel.data=4",
        "cluster.backend=nccl",
        "cluster.device=cuda",
    ]);
    let plan = MemoryPlan::new(&config);
    let (first, last) = (&plan.stages[0], &plan.stages[1]);
    let vp = 1024u64; // 1000 padded to a multiple of 128
    let layer = 512 * (512 + 256) + 512 * 512 + 3 * 512 * 1408 + 2 * 512;
    assert_eq!(first.params, vp * 512 + 4 * layer);
    assert_eq!(last.params, 4 * layer + 512 + vp * 512);
    // Groups: pipeline and data only; no embedding group joins the two stages.
    let nccl = |s: &StagePlan| s.region("runtime.nccl").map(|r| r.per.count());
    assert_eq!((nccl(first), nccl(last)), (Some(2), Some(2)));
    let tied = MemoryPlan::new(&Config {
        model: crate::config::Model {
            tie_embeddings: true,
            ..config.model.clone()
        },
        ..config.clone()
    });
    assert_eq!(
        tied.stages[1].region("runtime.nccl").unwrap().per.count(),
        3
    );
    assert_eq!(
        tied.stages[1].params,
        4 * layer + 512 + vp * 512,
        "the tied copy"
    );
}

#[test]
fn an_uneven_pipeline_split_plans_each_stage_with_its_own_layers() {
    let config = llama(&[
        "model.layers=7",
        "parallel.pipeline=2",
        "parallel.data=4",
        "parallel.pipeline_layers=[4, 3]",
    ]);
    let plan = MemoryPlan::new(&config);
    assert_eq!(plan.stages[0].layers, vec![(0..4)]);
    assert_eq!(plan.stages[1].layers, vec![(4..7)]);
    let layers = |s: &StagePlan| match s.region("params.layer").unwrap().per {
        Per::Layer(n) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!((layers(&plan.stages[0]), layers(&plan.stages[1])), (4, 3));
    let slots = |s: &StagePlan| match s.region("act.resid").unwrap().per {
        Per::SlotLayer { layers, .. } => layers,
        other => panic!("{other:?}"),
    };
    assert_eq!((slots(&plan.stages[0]), slots(&plan.stages[1])), (4, 3));
}
