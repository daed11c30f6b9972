//! Which samples a rank reads, and in what order: the [`Sampler`] (global batch → data-parallel
//! rank → microbatch), the stateless per-epoch [`permute`] of the windows, and the splitmix64
//! hash everything random in `data` is derived from.

/// Which global samples a data-parallel rank reads.
///
/// Data order follows the global sample index, never the rank, so any mesh sees the same global
/// batches: step `s`'s global batch is samples `s*global_batch .. (s+1)*global_batch`, and
/// data-parallel rank `r` takes the contiguous block `r*(global_batch/dp) .. (r+1)*(global_batch/dp)`
/// of it, microbatch by microbatch. The only state is the step, so resuming is continuing at the
/// next step.
///
/// Invariant (checked by config validation): `global_batch` is a multiple of `dp * micro_batch`
/// and `dp_rank < dp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampler {
    pub global_batch: usize,
    pub micro_batch: usize,
    pub dp: usize,
    pub dp_rank: usize,
}

impl Sampler {
    /// Global index of row `row` (`0..micro_batch`) of microbatch `microbatch` on this rank at
    /// `step`.
    pub fn index(&self, step: u64, microbatch: usize, row: usize) -> u64 {
        debug_assert!(row < self.micro_batch, "row {row} >= micro_batch");
        debug_assert!(microbatch < self.microbatches(), "microbatch out of range");
        let per_rank = (self.global_batch / self.dp) as u64;
        step * self.global_batch as u64
            + self.dp_rank as u64 * per_rank
            + (microbatch * self.micro_batch + row) as u64
    }

    /// Microbatches per step on this rank: `global_batch / (dp * micro_batch)`.
    pub fn microbatches(&self) -> usize {
        self.global_batch / (self.dp * self.micro_batch)
    }
}

/// One splitmix64 output for the state `z` (a bijection on `u64` with good avalanche).
pub(crate) fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a short list of words into one: a keyed, order-sensitive mix. Callers put a distinct
/// tag first so independent uses of the same seed never share a stream.
pub(crate) fn hash(words: &[u64]) -> u64 {
    words.iter().fold(0x6A09_E667_F3BC_C908, |acc, &word| {
        splitmix64(acc ^ splitmix64(word))
    })
}

/// A uniform integer in `0..n` from 64 random bits (multiply-shift; the bias is below 2^-32
/// for any `n` we use).
pub(crate) fn below(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

/// Rounds of the Feistel network: four rounds of a strong round function make a good
/// pseudo-random permutation (Luby–Rackoff); shuffle quality, not secrecy, is the goal.
const FEISTEL_ROUNDS: u64 = 4;

/// Position `position` (`< count`) of a pseudo-random permutation of `0..count` keyed by `key`.
///
/// Stateless and allocation-free, so each epoch's order costs nothing to keep: a balanced
/// Feistel network on the smallest power of four `>= count` (a bijection there), with
/// cycle-walking (apply again until the value lands below `count`), which restricts a bijection
/// to a bijection on `0..count`. The domain is under `4 * count`, so walks are short on average,
/// and they always end because the cycle through `position` returns to it.
pub(crate) fn permute(position: u64, count: u64, key: u64) -> u64 {
    debug_assert!(position < count, "position {position} >= count {count}");
    if count <= 1 {
        return 0;
    }
    let bits = 64 - (count - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut value = position;
    loop {
        let mut left = value >> half;
        let mut right = value & mask;
        for round in 0..FEISTEL_ROUNDS {
            let mixed = left ^ (hash(&[key, round, right]) & mask);
            left = right;
            right = mixed;
        }
        value = (left << half) | right;
        if value < count {
            return value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for count in [1u64, 2, 3, 4, 5, 7, 16, 17, 100, 997, 1000, 1024, 4099] {
            for key in [0u64, 1, 0xDEAD_BEEF] {
                let mut seen = vec![false; count as usize];
                for position in 0..count {
                    let value = permute(position, count, key);
                    assert!(value < count, "count {count}: {value} out of range");
                    assert!(
                        !seen[value as usize],
                        "count {count} key {key}: {value} twice"
                    );
                    seen[value as usize] = true;
                }
            }
        }
    }

    #[test]
    fn permutation_depends_on_key_and_shuffles() {
        let count = 1000;
        let first: Vec<u64> = (0..count).map(|p| permute(p, count, 1)).collect();
        let second: Vec<u64> = (0..count).map(|p| permute(p, count, 2)).collect();
        assert_ne!(first, second);
        let fixed = first
            .iter()
            .enumerate()
            .filter(|(p, v)| *p as u64 == **v)
            .count();
        assert!(fixed < 20, "{fixed} fixed points: not shuffled");
    }

    #[test]
    fn dp1_and_dp2_read_the_same_global_batch() {
        let one = Sampler {
            global_batch: 8,
            micro_batch: 2,
            dp: 1,
            dp_rank: 0,
        };
        for step in [0u64, 1, 7] {
            let mut single: Vec<u64> = Vec::new();
            for micro in 0..one.microbatches() {
                for row in 0..one.micro_batch {
                    single.push(one.index(step, micro, row));
                }
            }
            let mut split: Vec<u64> = Vec::new();
            for dp_rank in 0..2 {
                let rank = Sampler {
                    global_batch: 8,
                    micro_batch: 2,
                    dp: 2,
                    dp_rank,
                };
                assert_eq!(rank.microbatches(), 2);
                for micro in 0..rank.microbatches() {
                    for row in 0..rank.micro_batch {
                        split.push(rank.index(step, micro, row));
                    }
                }
            }
            let expected: Vec<u64> = (step * 8..(step + 1) * 8).collect();
            assert_eq!(single, expected);
            // Rank blocks are contiguous and in rank order, so concatenating gives the batch.
            assert_eq!(split, expected);
        }
    }

    #[test]
    fn microbatch_size_does_not_change_the_rank_block() {
        let coarse = Sampler {
            global_batch: 12,
            micro_batch: 3,
            dp: 2,
            dp_rank: 1,
        };
        let fine = Sampler {
            global_batch: 12,
            micro_batch: 1,
            dp: 2,
            dp_rank: 1,
        };
        let collect = |sampler: &Sampler| -> Vec<u64> {
            (0..sampler.microbatches())
                .flat_map(|m| (0..sampler.micro_batch).map(move |r| (m, r)))
                .map(|(m, r)| sampler.index(3, m, r))
                .collect()
        };
        assert_eq!(collect(&coarse), collect(&fine));
        assert_eq!(collect(&coarse), (42..48).collect::<Vec<u64>>());
    }

    #[test]
    fn below_is_in_range() {
        for bits in [0u64, 1, u64::MAX, 0x8000_0000_0000_0000] {
            for n in [1u64, 2, 3, 256, 50_257] {
                assert!(below(bits, n) < n);
            }
        }
        assert_eq!(below(u64::MAX, 10), 9);
    }
}
