//! GPT-2's initialisation, computed element by element from a counter-based generator.
//!
//! The value of a parameter element depends only on (seed, parameter name, layer, its index in
//! the *global* tensor), never on the rank, so every mesh starts from the same model and a
//! tensor-parallel rank computes just its shard. Weights are normal(0, 0.02); the residual
//! projections (`attproj_w`, `fcproj_w`) use 0.02/sqrt(2 layers) (GPT-2's scaling for the
//! residual stream); biases start at 0 and LayerNorm weights at 1. The embedding's padding
//! rows are 0 and stay 0 (no token reads them and no logit uses them).

use tessera_plan::model::{ModelShape, Placed, Split};

const STD: f64 = 0.02;

/// The initial values of one parameter's shard on tensor-parallel rank `tp_rank`.
pub fn initial_values(
    placed: &Placed,
    layer: Option<usize>,
    shape: &ModelShape,
    tp_rank: usize,
    seed: u64,
) -> Vec<f32> {
    let name = placed.spec.name;
    let global = shape.global_shape(&placed.spec);
    let numel = placed.numel() as usize;
    let std = match name {
        "attproj_w" | "fcproj_w" => STD / (2.0 * shape.layers as f64).sqrt(),
        _ if name.starts_with("ln") && name.ends_with("_w") => return vec![1.0; numel],
        _ if name.ends_with("_b") => return vec![0.0; numel],
        _ => STD,
    };
    let key = mix(seed ^ mix(fnv1a(name)) ^ mix(layer.map_or(u64::MAX, |l| l as u64)));
    let global_cols = global.get(1).copied().unwrap_or(1);
    (0..numel)
        .map(|i| {
            let index = global_index(placed, shape, tp_rank, i);
            if name == "wte" && index / global_cols >= shape.vocab {
                return 0.0;
            }
            (std * normal(key, index as u64)) as f32
        })
        .collect()
}

/// Where element `i` (row-major) of `placed`, the shard of tensor-parallel rank `tp_rank`,
/// sits in the global tensor: its row-major index there.
pub fn global_index(placed: &Placed, shape: &ModelShape, tp_rank: usize, i: usize) -> usize {
    let global = shape.global_shape(&placed.spec);
    let local_cols = placed.local_shape.get(1).copied().unwrap_or(1);
    let global_cols = global.get(1).copied().unwrap_or(1);
    let (row, col) = (i / local_cols, i % local_cols);
    let (grow, gcol) = global_position(
        placed.spec.split,
        row,
        col,
        global[0],
        global_cols,
        shape.tp,
        tp_rank,
    );
    grow * global_cols + gcol
}

/// Where local element `(row, col)` of a shard sits in the global tensor.
fn global_position(
    split: Split,
    row: usize,
    col: usize,
    global_rows: usize,
    global_cols: usize,
    tp: usize,
    tp_rank: usize,
) -> (usize, usize) {
    match split {
        Split::Replicated => (row, col),
        Split::Rows { chunks } => {
            let block = global_rows / chunks;
            let local_block = block / tp;
            let (chunk, within) = (row / local_block, row % local_block);
            (chunk * block + tp_rank * local_block + within, col)
        }
        Split::Columns => (row, tp_rank * (global_cols / tp) + col),
    }
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

    fn shape(tp: usize) -> ModelShape {
        let model = Model {
            arch: Arch::Gpt2,
            layers: 2,
            hidden: 64,
            heads: 4,
            vocab: 200,
            seq_len: 16,
            ffn_hidden: 256,
        };
        ModelShape::new(&model, tp)
    }

    #[test]
    fn tensor_parallel_shards_assemble_the_unsharded_values() {
        let whole = shape(1);
        for name in ["qkv_w", "qkv_b", "attproj_w", "fc_w", "fc_b", "fcproj_w"] {
            let layout = whole.layout(Unit::Layer);
            let full = initial_values(layout.get(name).unwrap(), Some(1), &whole, 0, 7);
            let split = shape(2);
            let local = split.layout(Unit::Layer);
            let placed = local.get(name).unwrap();
            let global_cols = whole
                .global_shape(&placed.spec)
                .get(1)
                .copied()
                .unwrap_or(1);
            let local_cols = placed.local_shape.get(1).copied().unwrap_or(1);
            for tp_rank in 0..2 {
                let shard = initial_values(placed, Some(1), &split, tp_rank, 7);
                for (i, value) in shard.iter().enumerate() {
                    let (r, c) = global_position(
                        placed.spec.split,
                        i / local_cols,
                        i % local_cols,
                        whole.global_shape(&placed.spec)[0],
                        global_cols,
                        2,
                        tp_rank,
                    );
                    assert_eq!(*value, full[r * global_cols + c], "{name} rank {tp_rank}");
                }
            }
        }
    }

    #[test]
    fn statistics_and_padding_follow_gpt2() {
        let shape = shape(1);
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
    fn layers_and_seeds_give_different_values() {
        let shape = shape(1);
        let layer = shape.layout(Unit::Layer);
        let qkv = layer.get("qkv_w").unwrap();
        let a = initial_values(qkv, Some(0), &shape, 0, 1);
        assert_ne!(a, initial_values(qkv, Some(1), &shape, 0, 1));
        assert_ne!(a, initial_values(qkv, Some(0), &shape, 0, 2));
        assert_eq!(a, initial_values(qkv, Some(0), &shape, 0, 1));
    }
}
