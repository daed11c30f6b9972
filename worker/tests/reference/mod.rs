//! What the parity tests against a Python peer share: reading the fixture, one rank of a
//! config, loading the fixture's weights into it, feeding its batch, and the three optimizer
//! steps whose losses and gradient norm must match.

use safetensors::SafeTensors;
use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::model::Placed;
use tessera_worker::arena::ArenaLayout;
use tessera_worker::tensor::Backend;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;
use tessera_worker::units::Unit;

/// f32 sums in a different order (fused attention, chunked cross-entropy) differ from the
/// peer's in the last bits; the loss agrees to far better than this.
pub const LOSS_RTOL: f64 = 1e-5;

pub fn tensor(fixture: &SafeTensors, name: &str) -> Vec<f32> {
    let view = fixture
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture has {name}"));
    bytemuck::pod_collect_to_vec(view.data())
}

pub fn ints(fixture: &SafeTensors, name: &str) -> Vec<i32> {
    bytemuck::pod_collect_to_vec(fixture.tensor(name).expect("fixture tensor").data())
}

/// The one rank of `config` (YAML) with `sets` applied.
pub fn rank(config: &str, sets: &[&str]) -> Rank<CpuBackend> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let config = Config::from_yaml("reference.yaml", config, &sets).expect("valid config");
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).expect("arena");
    Rank::new(config, backend).expect("rank")
}

/// Writes `values(unit, parameter)` (the global tensor, without the vocabulary's padding) into
/// every parameter and its master weights.
pub fn load_weights(rank: &mut Rank<CpuBackend>, values: impl Fn(&Unit, &Placed) -> Vec<f32>) {
    for unit in rank.units.clone() {
        for placed in &unit.layout.params {
            let mut values = values(&unit, placed);
            values.resize(placed.numel() as usize, 0.0); // the embedding's padding rows
            let name = placed.spec.name;
            rank.backend
                .write(unit.view(unit.flat_params, name), &values)
                .unwrap();
            if let Some(master) = unit.master {
                rank.backend
                    .write(unit.view(master, name), &values)
                    .unwrap();
            }
        }
    }
}

/// Parameter `placed` of `unit`: its weights, or its gradients.
pub fn read(rank: &Rank<CpuBackend>, unit: &Unit, placed: &Placed, grads: bool) -> Vec<f32> {
    let buffer = if grads {
        unit.flat_grads
    } else {
        unit.flat_params
    };
    let mut ours = vec![0.0; placed.numel() as usize];
    rank.backend
        .read(unit.view(buffer, placed.spec.name), &mut ours)
        .unwrap();
    ours
}

/// The fixture's batch, as two microbatches.
pub fn batch(
    fixture: &SafeTensors,
) -> impl FnMut(usize, &mut [i32], &mut [i32]) -> tessera_worker::Result<()> {
    let (tokens, targets) = (ints(fixture, "tokens"), ints(fixture, "targets"));
    move |microbatch, inputs, outputs| {
        let range = microbatch * inputs.len()..(microbatch + 1) * inputs.len();
        inputs.copy_from_slice(&tokens[range.clone()]);
        outputs.copy_from_slice(&targets[range]);
        Ok(())
    }
}

/// One forward and backward of the fixture's batch: the loss matches `loss0`.
pub fn first_loss_matches(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors, what: &str) {
    let loss = rank.forward_backward(batch(fixture)).unwrap();
    let expected = tensor(fixture, "loss0")[0] as f64;
    assert!(
        ((loss - expected) / expected).abs() < LOSS_RTOL,
        "{what}: loss {loss}, the peer's {expected}"
    );
}

/// Three optimizer steps on the fixture's batch: each step's loss matches `losses`, the first
/// step's gradient norm `grad_norm0`.
pub fn three_steps_match(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors) {
    let losses = tensor(fixture, "losses");
    for (step, expected) in losses.iter().enumerate() {
        let metrics = rank.train_step_with(batch(fixture)).unwrap();
        let expected = *expected as f64;
        assert!(
            ((metrics.loss - expected) / expected).abs() < LOSS_RTOL,
            "step {step}: loss {}, the peer's {expected}",
            metrics.loss
        );
        if step == 0 {
            let norm = tensor(fixture, "grad_norm0")[0] as f64;
            assert!(
                ((metrics.grad_norm - norm) / norm).abs() < LOSS_RTOL,
                "norm {} vs {norm}",
                metrics.grad_norm
            );
        }
    }
}
