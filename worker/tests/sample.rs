//! Decoding through the key/value cache gives the logits of a full forward of the longer
//! sequence, for both families; sampling is deterministic for a seed.

use tessera_plan::Config;
use tessera_plan::memory::{Place, StagePlan};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::sample::{Sampling, generate, sampler_config};
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::Rank;

const GPT2: &str = "model: {arch: gpt2, layers: 2, hidden: 64, heads: 4, vocab: 100, seq_len: 24}\n\
                    training: {global_batch: 8, micro_batch: 2, steps: 4, seed: 3}\n";
const LLAMA: &str = "model: {arch: llama, layers: 2, hidden: 64, heads: 4, kv_heads: 2, vocab: 100, seq_len: 24, ffn_hidden: 96}\n\
                     training: {global_batch: 8, micro_batch: 2, steps: 4, seed: 3}\n";

fn rank(text: &str) -> Rank<CpuBackend> {
    let config = Config::from_yaml("sample.yaml", text, &[]).expect("valid config");
    let config = sampler_config(&config);
    let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).expect("arena");
    let mut rank = Rank::new(config, backend).expect("rank");
    rank.initialize().expect("init");
    // Larger weights than the init's, so that the logits are far from uniform.
    for unit in rank.units.clone() {
        let params = unit.params().unwrap();
        let mut values = vec![0.0; params.len];
        tessera_worker::tensor::Backend::read(&rank.backend, params, &mut values).unwrap();
        let values: Vec<f32> = values.iter().map(|v| v * 20.0).collect();
        tessera_worker::tensor::Backend::write(&mut rank.backend, params, &values).unwrap();
    }
    rank
}

fn full_forward_logits(rank: &mut Rank<CpuBackend>, tokens: &[i32]) -> Vec<f32> {
    rank.model
        .prefill(&mut rank.backend, &mut rank.comms.tp, tokens)
        .unwrap();
    rank.model
        .logits(&mut rank.backend, tokens.len() - 1)
        .unwrap()
}

#[test]
fn each_decoded_position_has_the_logits_of_a_full_forward() {
    for text in [GPT2, LLAMA] {
        let mut rank = rank(text);
        let mut tokens = vec![5, 17, 42];
        rank.model
            .prefill(&mut rank.backend, &mut rank.comms.tp, &tokens)
            .unwrap();
        for next in [7, 99, 0, 63, 63] {
            let pos = tokens.len();
            rank.model.decode(&mut rank.backend, next, pos).unwrap();
            let decoded = rank.model.logits(&mut rank.backend, pos).unwrap();
            tokens.push(next);
            // A fresh full forward overwrites the cache with the same values.
            let full = full_forward_logits(&mut rank, &tokens);
            let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.1, "logits are not trivially small");
            for (i, (a, b)) in decoded.iter().zip(&full).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale.max(1.0),
                    "{text}: position {pos}, logit {i}: decoded {a}, full forward {b}"
                );
            }
        }
    }
}

#[test]
fn generation_is_deterministic_for_a_seed_and_stops_when_the_context_is_full() {
    for text in [GPT2, LLAMA] {
        // A high temperature: the scaled-up weights make sharp distributions.
        let sampling = Sampling {
            tokens: 40,
            temperature: 20.0,
            top_k: 10,
            seed: 11,
        };
        let mut streamed = Vec::new();
        let a = generate(&mut rank(text), &[1, 2, 3], &sampling, |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(a, streamed, "tokens are emitted as they come");
        // 3 prompt tokens in a context of 24: 21 new positions, plus the last logits.
        assert_eq!(a.len(), 22);
        let b = generate(&mut rank(text), &[1, 2, 3], &sampling, |_| Ok(())).unwrap();
        assert_eq!(a, b);
        let other = Sampling {
            seed: 12,
            ..sampling
        };
        let c = generate(&mut rank(text), &[1, 2, 3], &other, |_| Ok(())).unwrap();
        assert_ne!(a, c);
        let long = vec![1; 25];
        let error = generate(&mut rank(text), &long, &sampling, |_| Ok(())).unwrap_err();
        assert!(
            error.to_string().contains("needs 1 to model.seq_len (24)"),
            "{error}"
        );
        let error = generate(&mut rank(text), &[100], &sampling, |_| Ok(())).unwrap_err();
        assert!(
            error.to_string().contains("outside the vocabulary of 100"),
            "{error}"
        );
    }
}
