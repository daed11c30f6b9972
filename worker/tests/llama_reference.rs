//! Our llama against Hugging Face transformers' `LlamaForCausalLM`: the fixture (made by
//! tests/fixtures/make_llama_reference.py) holds a small GQA llama's initial weights under
//! Hugging Face's names, a batch, the loss, every gradient and the weights after three
//! PyTorch AdamW steps. We load the same weights (q|k|v and gate|up fused into our row
//! blocks), run the same batch as two microbatches with gradient accumulation, and compare.

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
/// Updated weights, absolute (see pytorch_reference.rs for why absolute).
const WEIGHT_ATOL: f32 = 1e-4;
/// Gradients below this fraction of their tensor's largest are rounding noise (f32 sums of a
/// few hundred terms in another order differ by about 1e-7 of the largest).
const NOISE_FLOOR: f32 = 1e-5;
/// The most three AdamW steps can move a weight: lr 1e-2 each (Adam's normalised update is at
/// most about 1 per step), plus decay.
const MAX_MOVE: f32 = 3.1e-2;

const FIXTURE: &[u8] = include_bytes!("fixtures/llama_reference.safetensors");

const CONFIG: &str = "
model: {arch: llama, layers: 2, hidden: 64, heads: 4, kv_heads: 2, vocab: 256, seq_len: 32,
        ffn_hidden: 172, rope_theta: 10000, norm_eps: 1.0e-5}
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

/// Our parameter `name` (`wte`, `layers.1.qkv_w`, `norm_w`) as Hugging Face tensors `prefix.*`,
/// stacked by rows in our order where we fuse them.
fn hugging_face(fixture: &SafeTensors, prefix: &str, name: &str) -> Vec<f32> {
    let hf = |suffix: &str| tensor(fixture, &format!("{prefix}.{suffix}"));
    let stacked = |parts: &[String]| parts.iter().flat_map(|p| hf(p)).collect();
    if let Some(rest) = name.strip_prefix("layers.") {
        let (layer, param) = rest.split_once('.').expect("layers.N.param");
        let at = |s: &str| format!("model.layers.{layer}.{s}.weight");
        return match param {
            "attn_norm_w" => hf(&at("input_layernorm")),
            "qkv_w" => stacked(&[
                at("self_attn.q_proj"),
                at("self_attn.k_proj"),
                at("self_attn.v_proj"),
            ]),
            "o_w" => hf(&at("self_attn.o_proj")),
            "mlp_norm_w" => hf(&at("post_attention_layernorm")),
            "gate_up_w" => stacked(&[at("mlp.gate_proj"), at("mlp.up_proj")]),
            "down_w" => hf(&at("mlp.down_proj")),
            other => panic!("no Hugging Face name for layer parameter {other}"),
        };
    }
    match name {
        "wte" => hf("model.embed_tokens.weight"),
        "norm_w" => hf("model.norm.weight"),
        "lm_head_w" => hf("lm_head.weight"),
        other => panic!("no Hugging Face name for {other}"),
    }
}

fn rank(sets: &[&str]) -> Rank<CpuBackend> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let config = Config::from_yaml("llama.yaml", CONFIG, &sets).expect("valid config");
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).expect("arena");
    Rank::new(config, backend).expect("rank")
}

fn load_weights(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str) {
    for unit in rank.units.clone() {
        for placed in &unit.layout.params {
            let name = placed.spec.name;
            let mut values = hugging_face(fixture, prefix, &unit.param_name(name));
            assert_eq!(
                values.len(),
                placed.numel() as usize,
                "{name}: 256 rows, no padding"
            );
            values.resize(placed.numel() as usize, 0.0);
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

fn assert_matches(rank: &Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str, grads: bool) {
    for unit in &rank.units {
        for placed in &unit.layout.params {
            let full = unit.param_name(placed.spec.name);
            let expected = hugging_face(fixture, prefix, &full);
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
            // Adam divides each gradient by its own magnitude, so an element whose gradient is
            // at the noise floor (`grad` 1.7e-8 in a tensor of max 1.7e-2 happens; exact zeros,
            // rows no token read, are no noise) moves by a step that noise decides. There the
            // weights can only be held to what three steps can move them.
            let first = hugging_face(fixture, "grad", &full);
            let noise = NOISE_FLOOR * first.iter().fold(0f32, |m, v| m.max(v.abs()));
            let init = hugging_face(fixture, "init", &full);
            let mut by_noise = 0;
            for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
                if !grads && first[i] != 0.0 && first[i].abs() <= noise {
                    by_noise += 1;
                    assert!(
                        (a - init[i]).abs() <= MAX_MOVE,
                        "{prefix}.{full}[{i}]: moved {a}"
                    );
                    continue;
                }
                assert!(
                    (a - b).abs() <= tolerance,
                    "{prefix}.{full}[{i}]: ours {a}, transformers {b} (tensor max {scale})"
                );
            }
            assert!(
                by_noise * 100 <= ours.len(),
                "{full}: {by_noise} of {} gradients at the noise floor",
                ours.len()
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
fn the_rotary_table_is_hugging_faces() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    let table = tessera_worker::tensor::rope_table(32, 16, 10_000.0);
    let (cos, sin) = (tensor(&fixture, "rope.cos"), tensor(&fixture, "rope.sin"));
    for p in 0..32 {
        for j in 0..8 {
            // Hugging Face repeats the 8 frequencies over both halves of the 16 channels.
            let (c, s) = (cos[p * 16 + j], sin[p * 16 + j]);
            assert!((table[p * 16 + j] - c).abs() <= 1e-6, "cos p {p} j {j}");
            assert!((table[p * 16 + 8 + j] - s).abs() <= 1e-6, "sin p {p} j {j}");
            assert_eq!(cos[p * 16 + 8 + j], c);
        }
    }
}

#[test]
fn loss_and_gradients_match_transformers() {
    let fixture = SafeTensors::deserialize(FIXTURE).unwrap();
    for recompute in ["none", "selective", "full"] {
        let mut rank = rank(&[&format!("parallel.recompute={recompute}")]);
        load_weights(&mut rank, &fixture, "init");
        let loss = rank.forward_backward(batch(&fixture)).unwrap();
        let expected = tensor(&fixture, "loss0")[0] as f64;
        assert!(
            ((loss - expected) / expected).abs() < LOSS_RTOL,
            "recompute {recompute}: loss {loss}, transformers {expected}"
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
