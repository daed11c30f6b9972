//! Our GPT-2 against PyTorch: the fixture (made by tests/fixtures/make_gpt2_reference.py) holds
//! a tiny GPT-2's initial weights, a batch, the loss, every gradient and the weights after
//! three AdamW steps. We load the same weights, run the same batch as two microbatches with
//! gradient accumulation, and compare.

mod reference;

use reference::{first_loss_matches, load_weights, rank, read, tensor, three_steps_match};
use safetensors::SafeTensors;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

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

/// Compares every parameter's `buffer` (params or grads) with the fixture's `prefix.*`.
fn assert_matches(rank: &Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str, grads: bool) {
    for unit in &rank.units {
        for placed in &unit.layout.params {
            let full = unit.param_name(placed.spec.name);
            let expected = tensor(fixture, &format!("{prefix}.{full}"));
            let ours = read(rank, unit, placed, grads);
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

/// Loads the fixture's `prefix.*` tensors as the model's parameters (and master weights).
fn load(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str) {
    load_weights(rank, |unit, placed| {
        tensor(
            fixture,
            &format!("{prefix}.{}", unit.param_name(placed.spec.name)),
        )
    });
}

#[test]
fn loss_and_gradients_match_pytorch() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    for recompute in ["none", "selective", "full"] {
        let mut rank = rank(CONFIG, &[&format!("parallel.recompute={recompute}")]);
        load(&mut rank, &fixture, "init");
        first_loss_matches(&mut rank, &fixture, &format!("recompute {recompute}"));
        assert_matches(&rank, &fixture, "grad", true);
    }
}

#[test]
fn three_adamw_steps_match_pytorch() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    let mut rank = rank(CONFIG, &[]);
    load(&mut rank, &fixture, "init");
    three_steps_match(&mut rank, &fixture);
    assert_matches(&rank, &fixture, "step3", false);
}
