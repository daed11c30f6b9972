//! Our GPT-2 against PyTorch: the fixture (made by tests/fixtures/make_gpt2_reference.py) holds
//! a tiny GPT-2's initial weights, a batch, the loss, every gradient and the weights after
//! three AdamW steps. We load the same weights, run the same batch as two microbatches with
//! gradient accumulation, and compare.

use safetensors::SafeTensors;
use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::tensor::Backend;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

/// f32 sums in a different order (fused attention, chunked cross-entropy) differ from PyTorch's
/// in the last bits; the loss agrees to far better than this.
const LOSS_RTOL: f64 = 1e-5;
/// Gradients, relative to the largest magnitude in each tensor.
const GRAD_RTOL: f32 = 1e-4;
/// Updated weights, absolute: AdamW divides by sqrt(v), which turns last-bit differences of
/// tiny gradients into ~1e-5 differences of the update, while a wrong update after three
/// steps of lr 1e-2 would be off by ~1e-2.
const WEIGHT_ATOL: f32 = 1e-4;

const FIXTURE: &[u8] = include_bytes!("fixtures/gpt2_reference.safetensors");

const CONFIG: &str = "
model: {arch: gpt2, layers: 2, hidden: 32, heads: 4, vocab: 100, seq_len: 16, ffn_hidden: 128}
parallel: {data: 1, tensor: 1, pipeline: 1, zero: 0, recompute: none}
training:
  global_batch: 4
  micro_batch: 2
  precision: fp32
  steps: 4
  seed: 1
  optimizer: {lr: 1.0e-2, min_lr: 1.0e-3, warmup: 1, beta1: 0.9, beta2: 0.95, eps: 1.0e-8,
              weight_decay: 0.1, grad_clip: 1.0}
data: {kind: synthetic}
cluster: {nodes: 1, gpus_per_node: 1, gpu_memory: 1GiB, device: cpu, backend: tcp}
checkpoint: {dir: unused, every: 0}
";

fn tensor(fixture: &SafeTensors, name: &str) -> Vec<f32> {
    let view = fixture
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture has {name}"));
    bytemuck::pod_collect_to_vec(view.data())
}

fn ints(fixture: &SafeTensors, name: &str) -> Vec<i32> {
    bytemuck::pod_collect_to_vec(fixture.tensor(name).expect("fixture tensor").data())
}

fn rank(sets: &[&str]) -> Rank<CpuBackend> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let config = Config::from_yaml("reference.yaml", CONFIG, &sets).expect("valid config");
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).expect("arena");
    Rank::new(config, backend).expect("rank")
}

/// Loads the fixture's `prefix.*` tensors as the model's parameters (and master weights).
fn load_weights(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str) {
    for unit in rank.units.clone() {
        for placed in &unit.layout.params {
            let mut values = tensor(
                fixture,
                &format!("{prefix}.{}", unit.param_name(placed.spec.name)),
            );
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

/// Compares every parameter's `buffer` (params or grads) with the fixture's `prefix.*`.
fn assert_matches(rank: &Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str, grads: bool) {
    for unit in &rank.units {
        for placed in &unit.layout.params {
            let full = unit.param_name(placed.spec.name);
            let expected = tensor(fixture, &format!("{prefix}.{full}"));
            let buffer = if grads {
                unit.flat_grads
            } else {
                unit.flat_params
            };
            let mut ours = vec![0.0; placed.numel() as usize];
            rank.backend
                .read(unit.view(buffer, placed.spec.name), &mut ours)
                .unwrap();
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tolerance = if grads {
                GRAD_RTOL * scale
            } else {
                WEIGHT_ATOL
            };
            for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "{prefix}.{full}[{i}]: ours {a}, PyTorch {b} (tensor max {scale})"
                );
            }
            assert!(
                ours[expected.len()..].iter().all(|&v| v == 0.0),
                "{full}: padding stays 0"
            );
        }
    }
}

fn batch(
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

#[test]
fn loss_and_gradients_match_pytorch() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    for recompute in ["none", "selective", "full"] {
        let mut rank = rank(&[&format!("parallel.recompute={recompute}")]);
        load_weights(&mut rank, &fixture, "init");
        let loss = rank.forward_backward(batch(&fixture)).unwrap();
        let expected = tensor(&fixture, "loss0")[0] as f64;
        assert!(
            ((loss - expected) / expected).abs() < LOSS_RTOL,
            "recompute {recompute}: loss {loss}, PyTorch {expected}"
        );
        assert_matches(&rank, &fixture, "grad", true);
    }
}

#[test]
fn three_adamw_steps_match_pytorch() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    let mut rank = rank(&[]);
    load_weights(&mut rank, &fixture, "init");
    let losses = tensor(&fixture, "losses");
    for (step, expected) in losses.iter().enumerate() {
        let metrics = rank.train_step_with(batch(&fixture)).unwrap();
        let expected = *expected as f64;
        assert!(
            ((metrics.loss - expected) / expected).abs() < LOSS_RTOL,
            "step {step}: loss {}, PyTorch {expected}",
            metrics.loss
        );
        if step == 0 {
            let norm = tensor(&fixture, "grad_norm0")[0] as f64;
            assert!(
                ((metrics.grad_norm - norm) / norm).abs() < LOSS_RTOL,
                "norm {} vs {norm}",
                metrics.grad_norm
            );
        }
    }
    assert_matches(&rank, &fixture, "step3", false);
}
