//! Our llama against Hugging Face transformers' `LlamaForCausalLM`: the fixture (made by
//! tests/fixtures/make_llama_reference.py) holds a small GQA llama's initial weights under
//! Hugging Face's names, a batch, the loss, every gradient and the weights after three
//! PyTorch AdamW steps. We load the same weights (q|k|v and gate|up fused into our row
//! blocks), run the same batch as two microbatches with gradient accumulation, and compare.

mod reference;

use reference::{first_loss_matches, load_weights, rank, read, tensor, three_steps_match};
use safetensors::SafeTensors;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

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

/// Loads the fixture's `prefix.*` tensors as the model's parameters (and master weights).
fn load(rank: &mut Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str) {
    load_weights(rank, |unit, placed| {
        let values = hugging_face(fixture, prefix, &unit.param_name(placed.spec.name));
        assert_eq!(
            values.len(),
            placed.numel() as usize,
            "256 rows, no padding"
        );
        values
    });
}

fn assert_matches(rank: &Rank<CpuBackend>, fixture: &SafeTensors, prefix: &str, grads: bool) {
    for unit in &rank.units {
        for placed in &unit.layout.params {
            let full = unit.param_name(placed.spec.name);
            let expected = hugging_face(fixture, prefix, &full);
            let ours = read(rank, unit, placed, grads);
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
