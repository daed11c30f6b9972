//! What the worker allocates, measured with a counting global allocator: the arena is one
//! allocation of exactly the planned bytes, and a training step after warm-up makes no heap
//! allocation larger than 64 KiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tessera_plan::Config;
use tessera_plan::config::{Choice as _, Precision, Recompute};
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::data::{Dataset, Sampler};
use tessera_worker::tensor::Backend;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

/// The step loop may allocate bookkeeping (rayon jobs, small vectors) but no buffer: anything
/// larger than this would be a tensor-sized allocation.
const LARGE: usize = 64 << 10;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// The sizes of the first large allocations while counting (the allocator cannot allocate).
static LARGE_SIZES: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            if layout.size() > LARGE {
                let index = LARGE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
                if let Some(size) = LARGE_SIZES.get(index) {
                    size.store(layout.size(), Ordering::Relaxed);
                }
            }
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests share the counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn count<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGE_ALLOCATIONS.store(0, Ordering::SeqCst);
    LARGEST.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (
        out,
        LARGE_ALLOCATIONS.load(Ordering::SeqCst),
        LARGEST.load(Ordering::SeqCst),
    )
}

fn config(recompute: Recompute, precision: Precision) -> Config {
    config_with(recompute, precision, &[])
}

fn config_with(recompute: Recompute, precision: Precision, extra: &[&str]) -> Config {
    let mut sets = vec![
        "parallel.data=1".to_string(),
        "parallel.tensor=1".into(),
        "parallel.pipeline=1".into(),
        "cluster.gpus_per_node=1".into(),
        "model.layers=2".into(),
        "training.global_batch=4".into(),
        format!("parallel.recompute={}", recompute.name()),
        format!("training.precision={}", precision.name()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let text = include_str!("../../configs/tiny-cpu.yaml");
    Config::from_yaml("tiny-cpu.yaml", text, &sets).expect("valid config")
}

#[test]
fn the_arena_is_one_allocation_of_exactly_the_planned_bytes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
        for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
            let config = config(recompute, precision);
            let plan = StagePlan::new(&config, 0);
            let layout = ArenaLayout::new(&plan);
            let (backend, _, largest) = count(|| {
                CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap()
            });
            let planned = plan.device_bytes();
            assert_eq!(backend.arena_bytes(Place::Device) as u64, planned);
            // The allocation itself, measured: whole 8-byte words.
            assert_eq!(
                largest as u64,
                planned.div_ceil(8) * 8,
                "{recompute:?} {precision:?}"
            );
            Rank::new(config, backend).expect("the rank accepts the arena");
        }
    }
}

#[test]
fn offloaded_optimizer_states_are_one_host_allocation_of_the_planned_bytes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let offload = ["parallel.offload.optimizer=true"];
    let config = config_with(Recompute::None, Precision::Bf16, &offload);
    let plan = StagePlan::new(&config, 0);
    assert!(
        plan.host_bytes() > 0,
        "master weights and moments on the host"
    );
    let layout = ArenaLayout::new(&plan);
    // The GEMM's per-thread packing buffers are allocated once per process, by the first
    // backend: make them now, so that the count sees the arenas alone.
    drop(CpuBackend::new(0, 0).unwrap());
    let (backend, large, _) =
        count(|| CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap());
    assert_eq!(
        large, 2,
        "the device and the host arena, nothing else large"
    );
    let sizes: Vec<u64> = LARGE_SIZES[..large]
        .iter()
        .map(|s| s.load(Ordering::SeqCst) as u64)
        .collect();
    for (place, planned) in [("device", plan.device_bytes()), ("host", plan.host_bytes())] {
        assert!(
            sizes.contains(&(planned.div_ceil(8) * 8)),
            "one {place} allocation of the planned {planned} bytes: {sizes:?}"
        );
    }
    assert_eq!(backend.arena_bytes(Place::Host) as u64, plan.host_bytes());
    Rank::new(config, backend).expect("the rank accepts the arenas");
}

#[test]
fn a_training_step_allocates_nothing_large_after_warm_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (recompute, precision, extra) in [
        (Recompute::None, Precision::Fp32, None),
        (Recompute::Full, Precision::Bf16, None),
        (
            Recompute::None,
            Precision::Bf16,
            Some("parallel.offload.optimizer=true"),
        ),
    ] {
        let config = config_with(recompute, precision, extra.as_slice());
        let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
        let backend =
            CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).unwrap();
        let dataset =
            Dataset::open(&config.data, config.model.vocab, config.model.seq_len, 1).unwrap();
        let sampler = Sampler {
            global_batch: config.training.global_batch,
            micro_batch: config.training.micro_batch,
            dp: 1,
            dp_rank: 0,
        };
        let mut rank = Rank::new(config, backend).unwrap();
        rank.initialize().unwrap();
        for _ in 0..2 {
            rank.train_step(&dataset, &sampler).unwrap();
        }
        let (metrics, large, largest) = count(|| rank.train_step(&dataset, &sampler).unwrap());
        assert!(metrics.loss.is_finite());
        assert_eq!(
            large, 0,
            "{recompute:?} {precision:?}: {large} allocations over {LARGE} bytes (largest {largest})"
        );
    }
}
