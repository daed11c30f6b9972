//! Sampling from a trained model in one CPU process: the checkpoint's global tensors (any mesh,
//! through `checkpoint::export`) loaded into one rank, the prompt's forward, then one token at
//! a time through the layers' `decode`, with the kept `q|k|v` as the key/value cache. The model
//! code is the training code: `model::Stage` and each family's `Layers`.

use std::collections::BTreeMap;

use tessera_plan::Config;
use tessera_plan::config::{Backend as CommBackend, Device, Precision, Recompute, Schedule, Zero};

use crate::checkpoint::export::Global;
use crate::data::sampler_hash;
use crate::error::{Error, Result};
use crate::tensor::Backend;
use crate::train::Rank;

/// How to choose each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Tokens to generate after the prompt (fewer when the context fills up).
    pub tokens: usize,
    /// Divides the logits; 0 picks the most likely token every time.
    pub temperature: f32,
    /// Draw among the `top_k` most likely tokens only; 0 draws among all.
    pub top_k: usize,
    /// The same seed, prompt and model give the same tokens.
    pub seed: u64,
}

/// The config of a one-process sampler for `config`'s model: one rank on the CPU, one
/// sequence, fp32, every activation kept (the cache), no checkpoints or evaluation.
pub fn sampler_config(config: &Config) -> Config {
    let mut config = config.clone();
    let parallel = &mut config.parallel;
    parallel.data = 1;
    parallel.tensor = 1;
    parallel.pipeline = 1;
    parallel.virtual_stages = 1;
    parallel.pipeline_layers = None;
    parallel.sequence_parallel = false;
    parallel.zero = Zero::Off;
    parallel.offload.optimizer = false;
    parallel.recompute = Recompute::None;
    parallel.schedule = Schedule::OneFOneB;
    config.training.micro_batch = 1;
    config.training.global_batch = 1;
    config.training.precision = Precision::Fp32;
    config.cluster.nodes = 1;
    config.cluster.gpus_per_node = 1;
    config.cluster.device = Device::Cpu;
    config.cluster.backend = CommBackend::Tcp;
    config.checkpoint.every = 0;
    config.eval.every = 0;
    config
}

/// Writes the global tensors of `model` (as `checkpoint::export` gives them: our names, the
/// vocabulary's padding dropped) into a one-rank `rank` of the same model.
pub fn load<B: Backend>(rank: &mut Rank<B>, model: &BTreeMap<String, Global>) -> Result<()> {
    for unit in rank.units.clone() {
        for placed in &unit.layout.params {
            let name = unit.param_name(placed.spec.name);
            let global = model.get(&name).ok_or_else(|| Error::Unsupported {
                what: format!("the checkpoint has no tensor {name}"),
                help: "sample with the config the checkpoint was trained with".into(),
            })?;
            let numel = placed.numel() as usize;
            if global.values.len() > numel {
                return Err(Error::Unsupported {
                    what: format!(
                        "{name} has {} values in the checkpoint but {numel} in this model",
                        global.values.len()
                    ),
                    help: "sample with the config the checkpoint was trained with".into(),
                });
            }
            let mut values = global.values.clone();
            values.resize(numel, 0.0); // the vocabulary's padding rows
            let params = unit
                .params()
                .expect("invariant: one rank holds whole units");
            rank.backend
                .write(unit.view(params, placed.spec.name), &values)?;
        }
    }
    Ok(())
}

/// Generates after `prompt` (token ids below the vocabulary), calling `emit` with each token as
/// it comes; returns them all. The context is the model's `seq_len`: generation stops when it
/// is full.
pub fn generate<B: Backend>(
    rank: &mut Rank<B>,
    prompt: &[i32],
    sampling: &Sampling,
    mut emit: impl FnMut(i32) -> Result<()>,
) -> Result<Vec<i32>> {
    let (t, vocab) = (rank.config.model.seq_len, rank.config.model.vocab);
    if prompt.is_empty() || prompt.len() > t {
        return Err(Error::Unsupported {
            what: format!(
                "the prompt is {} tokens; it needs 1 to model.seq_len ({t})",
                prompt.len()
            ),
            help: "give a shorter (or a non-empty) prompt".into(),
        });
    }
    if let Some(bad) = prompt.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        return Err(Error::Unsupported {
            what: format!("the prompt holds token {bad}, outside the vocabulary of {vocab}"),
            help: "use the tokenizer the model was trained with".into(),
        });
    }
    rank.model
        .prefill(&mut rank.backend, &mut rank.comms.tp, prompt)?;
    let mut pos = prompt.len() - 1;
    let mut out = Vec::with_capacity(sampling.tokens);
    for step in 0..sampling.tokens {
        let logits = rank.model.logits(&mut rank.backend, pos)?;
        let token = choose(&logits, sampling, step as u64);
        emit(token)?;
        out.push(token);
        if pos + 1 >= t {
            break;
        }
        pos += 1;
        rank.model.decode(&mut rank.backend, token, pos)?;
    }
    Ok(out)
}

/// The next token: the most likely (temperature 0), or a draw from the softmax of the
/// tempered logits over the `top_k` most likely, with a uniform number that depends only on
/// (seed, step).
fn choose(logits: &[f32], sampling: &Sampling, step: u64) -> i32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as i32
    };
    if sampling.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Most likely first; ties by id, so the order is a function of the logits alone.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if sampling.top_k > 0 {
        order.truncate(sampling.top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / sampling.temperature as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let bits = sampler_hash(&[0x5341_4D50_4C45_2121, sampling.seed, step]);
    let mut u = (bits >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as i32;
        }
        u -= w;
    }
    order[order.len() - 1] as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_greedy_and_top_1_is_too() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let greedy = Sampling {
            tokens: 1,
            temperature: 0.0,
            top_k: 0,
            seed: 1,
        };
        assert_eq!(choose(&logits, &greedy, 0), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..greedy
        };
        for step in 0..20 {
            assert_eq!(choose(&logits, &top1, step), 1);
        }
    }

    #[test]
    fn draws_follow_the_tempered_softmax_and_repeat_for_a_seed() {
        let logits = [0.0, (3.0f32).ln(), f32::NEG_INFINITY];
        let sampling = Sampling {
            tokens: 1,
            temperature: 1.0,
            top_k: 0,
            seed: 7,
        };
        let draws: Vec<i32> = (0..4000).map(|s| choose(&logits, &sampling, s)).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "p(1) = 3/4, drew {ones}");
        assert!(!draws.contains(&2), "a -inf logit is never drawn");
        let again: Vec<i32> = (0..4000).map(|s| choose(&logits, &sampling, s)).collect();
        assert_eq!(draws, again);
        let other = Sampling {
            seed: 8,
            ..sampling
        };
        let changed: Vec<i32> = (0..4000).map(|s| choose(&logits, &other, s)).collect();
        assert_ne!(draws, changed);
    }
}
