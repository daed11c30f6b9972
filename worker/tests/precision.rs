//! bf16 and fp16 (with fp32 master weights) train like fp32.

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::data::{Dataset, Sampler};
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

/// bf16 keeps 8 bits of mantissa: the first loss (before any update) moves by about that.
const FIRST_LOSS_ATOL: f64 = 0.02;

fn losses(precision: &str, steps: u64) -> Vec<f64> {
    let sets: Vec<String> = [
        "parallel.data=1",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "cluster.gpus_per_node=1",
        "model.layers=2",
        "training.global_batch=4",
        "training.optimizer.warmup=2",
        &format!("training.steps={steps}"),
        &format!("training.precision={precision}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let config = Config::from_yaml(
        "tiny-cpu.yaml",
        include_str!("../../configs/tiny-cpu.yaml"),
        &sets,
    )
    .unwrap();
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap();
    let dataset = Dataset::open(&config.data, config.model.vocab, config.model.seq_len, 1).unwrap();
    let sampler = Sampler {
        global_batch: 4,
        micro_batch: 2,
        dp: 1,
        dp_rank: 0,
    };
    let mut rank = Rank::new(config, backend).unwrap();
    rank.initialize().unwrap();
    (0..steps)
        .map(|_| rank.train_step(&dataset, &sampler).unwrap().loss)
        .collect()
}

#[test]
fn mixed_precision_trains_like_fp32() {
    let fp32 = losses("fp32", 12);
    for precision in ["bf16", "fp16"] {
        let mixed = losses(precision, 12);
        assert!(
            (mixed[0] - fp32[0]).abs() < FIRST_LOSS_ATOL,
            "{precision}: first loss {} vs fp32 {}",
            mixed[0],
            fp32[0]
        );
        assert!(
            mixed.iter().all(|l| l.is_finite()),
            "{precision}: {mixed:?}"
        );
        assert!(mixed[11] < mixed[0] - 0.3, "{precision} learns: {mixed:?}");
    }
}
