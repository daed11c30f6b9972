//! Initialisation, computed element by element from a counter-based generator, as the
//! parameter table's `init` column says.
//!
//! The value of a parameter element depends only on (seed, parameter name, layer, its index in
//! the *global* tensor), never on the rank, so every mesh starts from the same model and a
//! tensor-parallel rank computes just its shard. `Normal` is normal(0, 0.02); `Residual` (the
//! projections into the residual stream) 0.02/sqrt(2 layers), GPT-2's scaling; `Ones` and
//! `Zeros` are the norms' and biases'. The padding rows of the token embedding and of the LM
//! head are 0 and stay 0 (no token reads them and no logit uses them).

use tessera_plan::model::{Init, ModelShape, Placed, Role};

const STD: f64 = 0.02;

/// The initial values of one parameter's shard on tensor-parallel rank `tp_rank`.
pub fn initial_values(
    placed: &Placed,
    layer: Option<usize>,
    shape: &ModelShape,
    tp_rank: usize,
    seed: u64,
) -> Vec<f32> {
    let spec = &placed.spec;
    let numel = placed.numel() as usize;
    let std = match spec.init {
        Init::Ones => return vec![1.0; numel],
        Init::Zeros => return vec![0.0; numel],
        Init::Normal => STD,
        Init::Residual => STD / (2.0 * shape.layers as f64).sqrt(),
    };
    let key = mix(seed ^ mix(fnv1a(spec.name)) ^ mix(layer.map_or(u64::MAX, |l| l as u64)));
    let global_cols = shape.global_shape(spec).get(1).copied().unwrap_or(1);
    let vocab_rows = matches!(spec.role, Role::TokenEmbedding | Role::LmHead);
    (0..numel)
        .map(|i| {
            let index = shape.global_index(placed, tp_rank, i);
            if vocab_rows && index / global_cols >= shape.vocab {
                return 0.0;
            }
            (std * normal(key, index as u64)) as f32
        })
        .collect()
}

/// A standard normal sample, the `index`-th of the stream `key` (Box-Muller on two uniforms).
fn normal(key: u64, index: u64) -> f64 {
    let u1 = uniform(mix(key ^ mix(2 * index)));
    let u2 = uniform(mix(key ^ mix(2 * index + 1)));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A uniform sample in (0, 1].
fn uniform(bits: u64) -> f64 {
    ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// splitmix64's finaliser: a bijective mix of 64 bits.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use tessera_plan::config::{Arch, Model};
    use tessera_plan::model::Unit;

    use super::*;

    fn shape(arch: Arch, tp: usize) -> ModelShape {
        let mut model = Model::new(arch, 2, 64, 4, 200, 16, 256);
        model.kv_heads = 2;
        if arch == Arch::Gpt2 {
            model.kv_heads = 4;
        }
        ModelShape::new(&model, tp)
    }

    #[test]
    fn tensor_parallel_shards_assemble_the_unsharded_values() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let whole = shape(arch, 1);
            let split = shape(arch, 2);
            for spec in whole.params_of(tessera_plan::model::UnitKind::Layer) {
                let name = spec.name;
                let full_layout = whole.layout(Unit::Layer);
                let full = initial_values(full_layout.get(name).unwrap(), Some(1), &whole, 0, 7);
                let local = split.layout(Unit::Layer);
                let placed = local.get(name).unwrap();
                let global_cols = whole.global_shape(spec).get(1).copied().unwrap_or(1);
                let local_cols = placed.local_shape.get(1).copied().unwrap_or(1);
                let mut seen = vec![0u32; full.len()];
                for tp_rank in 0..2 {
                    let shard = initial_values(placed, Some(1), &split, tp_rank, 7);
                    for (i, value) in shard.iter().enumerate() {
                        let (r, c) =
                            split.global_position(spec, i / local_cols, i % local_cols, tp_rank);
                        let index = r * global_cols + c;
                        seen[index] += 1;
                        assert_eq!(*value, full[index], "{arch} {name} rank {tp_rank}");
                    }
                }
                let expected = if spec.split == tessera_plan::model::Split::Replicated {
                    2
                } else {
                    1
                };
                assert!(
                    seen.iter().all(|&n| n == expected),
                    "{arch} {name}: shards cover it"
                );
            }
        }
    }

    #[test]
    fn grouped_query_blocks_give_each_rank_its_slice_of_q_k_and_v() {
        let split = shape(Arch::Llama, 2);
        let qkv = split.layout(Unit::Layer).get("qkv_w").unwrap().spec;
        // hidden 64, 4 heads of 16, 2 kv heads: q rows 0..64, k 64..96, v 96..128.
        let rows: Vec<usize> = [0, 31, 32, 47, 48, 63]
            .iter()
            .map(|&r| split.global_position(&qkv, r, 0, 1).0)
            .collect();
        assert_eq!(rows, [32, 63, 80, 95, 112, 127]);
    }

    #[test]
    fn statistics_and_padding_follow_gpt2() {
        let shape = shape(Arch::Gpt2, 1);
        let embedding = shape.layout(Unit::Embedding);
        let wte = initial_values(embedding.get("wte").unwrap(), None, &shape, 0, 1);
        assert!(
            wte[200 * 64..].iter().all(|&v| v == 0.0),
            "padding rows are zero"
        );
        let real = &wte[..200 * 64];
        let mean = real.iter().map(|&v| v as f64).sum::<f64>() / real.len() as f64;
        let var = real.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / real.len() as f64;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "{}", var.sqrt());
        let layer = shape.layout(Unit::Layer);
        let proj = initial_values(layer.get("fcproj_w").unwrap(), Some(0), &shape, 0, 1);
        let std =
            (proj.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / proj.len() as f64).sqrt();
        assert!((std - 0.01).abs() < 1e-3, "0.02/sqrt(4) = 0.01, got {std}");
        assert!(
            initial_values(layer.get("ln1_w").unwrap(), Some(0), &shape, 0, 1)
                .iter()
                .all(|&v| v == 1.0)
        );
        assert!(
            initial_values(layer.get("qkv_b").unwrap(), Some(0), &shape, 0, 1)
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn an_untied_head_has_zero_padding_rows_and_norms_start_at_one() {
        let shape = shape(Arch::Llama, 1);
        let head = shape.layout(Unit::Head { tied_copy: false });
        let lm_head = initial_values(head.get("lm_head_w").unwrap(), None, &shape, 0, 1);
        assert_eq!(lm_head.len(), 256 * 64);
        assert!(lm_head[200 * 64..].iter().all(|&v| v == 0.0));
        assert!(lm_head[..200 * 64].iter().any(|&v| v != 0.0));
        let norm = initial_values(head.get("norm_w").unwrap(), None, &shape, 0, 1);
        assert!(norm.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn layers_and_seeds_give_different_values() {
        let shape = shape(Arch::Gpt2, 1);
        let layer = shape.layout(Unit::Layer);
        let qkv = layer.get("qkv_w").unwrap();
        let a = initial_values(qkv, Some(0), &shape, 0, 1);
        assert_ne!(a, initial_values(qkv, Some(1), &shape, 0, 1));
        assert_ne!(a, initial_values(qkv, Some(0), &shape, 0, 2));
        assert_eq!(a, initial_values(qkv, Some(0), &shape, 0, 1));
    }
}
