//! The CPU backend gives the same bits whatever the number of threads: data-parallel ranks
//! with different core counts, and a resumed run on another machine, must agree exactly.

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::data::{Dataset, Sampler};
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

/// Bits of the loss and gradient norm of each of 3 steps, in a pool of `threads` threads.
fn step_bits(threads: usize, precision: &str) -> Vec<(u64, u64)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let sets: Vec<String> = [
            "parallel.data=1",
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "cluster.gpus_per_node=1",
            "model.layers=2",
            // Three attention blocks of 64 rows, the last one partial.
            "model.seq_len=150",
            "training.global_batch=4",
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
        let backend =
            CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap();
        let dataset =
            Dataset::open(&config.data, config.model.vocab, config.model.seq_len, 1).unwrap();
        let sampler = Sampler {
            global_batch: 4,
            micro_batch: 2,
            dp: 1,
            dp_rank: 0,
        };
        let mut rank = Rank::new(config, backend).unwrap();
        rank.initialize().unwrap();
        (0..3)
            .map(|_| {
                let metrics = rank.train_step(&dataset, &sampler).unwrap();
                (metrics.loss.to_bits(), metrics.grad_norm.to_bits())
            })
            .collect()
    })
}

#[test]
fn training_steps_have_the_same_bits_for_any_thread_count() {
    for precision in ["fp32", "bf16"] {
        let one = step_bits(1, precision);
        for threads in [2, 3] {
            assert_eq!(
                step_bits(threads, precision),
                one,
                "{precision}: {threads} threads changed the result"
            );
        }
    }
}
