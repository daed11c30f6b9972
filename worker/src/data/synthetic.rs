//! Synthetic tokens: a sparse first-order Markov chain over the vocabulary, built from the seed.
//!
//! Every token has [`SUCCESSORS`] distinct likely successors, chosen by hashing (seed, token),
//! and moves to them with the fixed skewed probabilities [`WEIGHTS`] (percent). The
//! only storage is that table (`vocab * SUCCESSORS` `u32`s); sample `index` is `seq_len + 1`
//! steps of the chain from a start token and a random stream both hashed from (seed, index), so
//! the stream is infinite, deterministic and needs no state to resume.
//!
//! Because every row of the transition matrix has the same probabilities (only the successor
//! tokens differ), the chain's entropy rate is the entropy of one row whatever the stationary
//! distribution is: for `vocab >= SUCCESSORS` it is
//! `-(0.70 ln 0.70 + 0.15 ln 0.15 + 0.10 ln 0.10 + 0.05 ln 0.05) ≈ 0.9143` nats per token
//! (ln 256 ≈ 5.545, ln 50257 ≈ 10.825). Every target of a sample is one transition of the chain,
//! so that is the loss a perfect model reaches; see [`entropy_rate`].

use super::sampler::{below, hash, splitmix64};

/// Likely successors per token.
pub const SUCCESSORS: usize = 4;

/// Relative probability of each successor slot, most likely first.
pub const WEIGHTS: [u64; SUCCESSORS] = [70, 15, 10, 5];

/// Hash tags keeping the table and the per-sample streams independent.
const TAG_TABLE: u64 = 0x5359_4E54_4142_4C45;
const TAG_SAMPLE: u64 = 0x5359_4E53_414D_504C;

/// splitmix64's state increment: consecutive draws of one sample are the splitmix64 sequence.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Successor slots actually used for `vocab` (fewer than [`SUCCESSORS`] only for tiny vocabs).
fn slots(vocab: usize) -> usize {
    SUCCESSORS.min(vocab)
}

/// The chain's entropy rate in nats per token for a vocabulary of `vocab` tokens: the loss a
/// perfect model of the synthetic data reaches (≈ 0.9143 for any `vocab >= 4`).
pub fn entropy_rate(vocab: usize) -> f64 {
    let weights = &WEIGHTS[..slots(vocab)];
    let total: u64 = weights.iter().sum();
    weights
        .iter()
        .map(|&w| {
            let p = w as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

/// The transition table of one seed.
#[derive(Clone)]
pub(crate) struct Chain {
    vocab: usize,
    /// `successors[t * slots + k]`: the token in slot `k` after token `t`.
    successors: Vec<u32>,
    slots: usize,
    /// Sum of the weights of the used slots.
    total: u64,
}

impl Chain {
    /// Builds the table: `vocab` rows of distinct successors. Needs `1 <= vocab <= u32::MAX`.
    pub(crate) fn new(vocab: usize, seed: u64) -> Chain {
        let slots = slots(vocab);
        let mut successors = Vec::with_capacity(vocab * slots);
        for token in 0..vocab {
            let row_start = successors.len();
            for slot in 0..slots {
                let bits = hash(&[TAG_TABLE, seed, token as u64, slot as u64]);
                let mut candidate = below(bits, vocab as u64) as u32;
                // Probe linearly past successors already in this row, so the row has `slots`
                // distinct entries (there are `slots <= vocab` free choices, so this ends).
                while successors[row_start..].contains(&candidate) {
                    candidate = ((candidate as usize + 1) % vocab) as u32;
                }
                successors.push(candidate);
            }
        }
        Chain {
            vocab,
            successors,
            slots,
            total: WEIGHTS[..slots].iter().sum(),
        }
    }

    pub(crate) fn vocab(&self) -> usize {
        self.vocab
    }

    /// Entropy rate of this chain in nats per token (see [`entropy_rate`]).
    pub(crate) fn entropy_rate(&self) -> f64 {
        entropy_rate(self.vocab)
    }

    /// The successor of `token` for 64 random bits.
    fn step(&self, token: u32, bits: u64) -> u32 {
        let mut draw = below(bits, self.total);
        let row = &self.successors[token as usize * self.slots..][..self.slots];
        for (&next, &weight) in row.iter().zip(WEIGHTS.iter()) {
            if draw < weight {
                return next;
            }
            draw -= weight;
        }
        row[self.slots - 1]
    }

    /// Writes `inputs.len() + 1` consecutive tokens of the chain for sample `index`, shifted by
    /// one between `inputs` and `targets` (which have the same length). Allocation-free.
    pub(crate) fn fill(&self, seed: u64, index: u64, inputs: &mut [i32], targets: &mut [i32]) {
        let stream = hash(&[TAG_SAMPLE, seed, index]);
        let mut token = below(splitmix64(stream), self.vocab as u64) as u32;
        for (position, (input, target)) in inputs.iter_mut().zip(targets.iter_mut()).enumerate() {
            let counter = (position as u64 + 1).wrapping_mul(GOLDEN_GAMMA);
            let next = self.step(token, splitmix64(stream.wrapping_add(counter)));
            *input = token as i32;
            *target = next as i32;
            token = next;
        }
    }

    /// Probability of moving from `from` to `to` (test helper: the dense transition matrix).
    #[cfg(test)]
    fn probability(&self, from: usize, to: usize) -> f64 {
        let row = &self.successors[from * self.slots..][..self.slots];
        row.iter()
            .zip(WEIGHTS.iter())
            .filter(|(next, _)| **next as usize == to)
            .map(|(_, &w)| w as f64 / self.total as f64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy rate from the transition table itself: `sum_s pi(s) H(P(s, .))` with the
    /// stationary distribution `pi` found by power iteration from uniform.
    fn table_entropy_rate(chain: &Chain) -> f64 {
        let vocab = chain.vocab;
        let matrix: Vec<Vec<f64>> = (0..vocab)
            .map(|from| (0..vocab).map(|to| chain.probability(from, to)).collect())
            .collect();
        for row in &matrix {
            assert!(
                (row.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "row does not sum to 1"
            );
        }
        let mut pi = vec![1.0 / vocab as f64; vocab];
        for _ in 0..200 {
            let mut next = vec![0.0; vocab];
            for (from, row) in matrix.iter().enumerate() {
                for (to, p) in row.iter().enumerate() {
                    next[to] += pi[from] * p;
                }
            }
            pi = next;
        }
        matrix
            .iter()
            .zip(&pi)
            .map(|(row, weight)| {
                let row_entropy: f64 = row.iter().filter(|p| **p > 0.0).map(|p| -p * p.ln()).sum();
                weight * row_entropy
            })
            .sum()
    }

    #[test]
    fn entropy_rate_matches_the_table_and_is_well_below_uniform() {
        for vocab in [256usize, 300, 7] {
            let chain = Chain::new(vocab, 1234);
            let from_table = table_entropy_rate(&chain);
            assert!(
                (from_table - chain.entropy_rate()).abs() < 1e-9,
                "vocab {vocab}: table {from_table} vs formula {}",
                chain.entropy_rate()
            );
        }
        let rate = entropy_rate(256);
        assert!(
            (rate - 0.914_3).abs() < 1e-3,
            "documented value is stale: {rate}"
        );
        assert!(rate < 0.2 * (256f64).ln());
    }

    #[test]
    fn tiny_vocabularies_work() {
        for vocab in 1..=5 {
            let chain = Chain::new(vocab, 9);
            let mut inputs = [0i32; 16];
            let mut targets = [0i32; 16];
            chain.fill(9, 3, &mut inputs, &mut targets);
            assert!(inputs.iter().chain(&targets).all(|&t| (t as usize) < vocab));
            assert!((table_entropy_rate(&chain) - entropy_rate(vocab)).abs() < 1e-9);
        }
        assert_eq!(entropy_rate(1), 0.0);
    }

    #[test]
    fn rows_have_distinct_successors() {
        let chain = Chain::new(256, 77);
        for row in chain.successors.chunks(chain.slots) {
            for (i, a) in row.iter().enumerate() {
                assert!(row[i + 1..].iter().all(|b| b != a), "row {row:?} repeats");
            }
        }
    }

    #[test]
    fn samples_follow_the_chain_with_the_expected_frequencies() {
        let chain = Chain::new(256, 5);
        let mut inputs = [0i32; 64];
        let mut targets = [0i32; 64];
        let mut slot_counts = [0u64; SUCCESSORS];
        for index in 0..500 {
            chain.fill(5, index, &mut inputs, &mut targets);
            assert_eq!(inputs[1..], targets[..63]);
            for (&from, &to) in inputs.iter().zip(&targets) {
                let row = &chain.successors[from as usize * SUCCESSORS..][..SUCCESSORS];
                let slot = row
                    .iter()
                    .position(|&s| s as i32 == to)
                    .expect("a successor");
                slot_counts[slot] += 1;
            }
        }
        let total: u64 = slot_counts.iter().sum();
        for (count, weight) in slot_counts.iter().zip(WEIGHTS) {
            let observed = *count as f64 / total as f64;
            let expected = weight as f64 / WEIGHTS.iter().sum::<u64>() as f64;
            assert!(
                (observed - expected).abs() < 0.01,
                "{observed} vs {expected}"
            );
        }
    }
}
