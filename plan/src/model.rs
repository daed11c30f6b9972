//! Parameter shapes and counts, and how tensor parallelism splits each parameter.
//!
//! [`PARAMS`] is the one table of parameters. The memory plan, tensor-parallel initialisation,
//! ZeRO sharding and checkpoint resharding all read it, so a new parameter is one new row.
//!
//! Parameters are grouped into *units* that are stored, sharded and gathered together as one
//! flat buffer: the embedding, each transformer layer, and the head. A rank holds the units of
//! its pipeline stage; a unit's flat buffer lays its parameters out in table order, each
//! starting on a [`PARAM_ALIGN`]-element boundary so that every tensor view is aligned.

use crate::config::{Arch, Model};

/// Elements between parameter starts inside a unit, and the granule of ZeRO shards: 64
/// elements is 128 bytes in bf16 and 256 in fp32, enough for vectorised loads and cuBLASLt.
pub const PARAM_ALIGN: u64 = 64;

/// The embedding's rows are padded to a multiple of this times the tensor degree, so that
/// every tensor-parallel shard is equal and its matmuls have friendly shapes.
pub const VOCAB_PAD: usize = 128;

/// A group of parameters stored, sharded and gathered as one flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Token and position embeddings (first pipeline stage).
    Embedding,
    /// One transformer block.
    Layer,
    /// The final LayerNorm (last pipeline stage). With more than one pipeline stage it also
    /// holds a copy of the token embedding for the tied LM head; the copies' gradients are
    /// summed between the first and last stage.
    Head { tied_copy: bool },
}

/// How tensor parallelism splits a parameter across the `tp` ranks of a tensor group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole parameter.
    Replicated,
    /// Dimension 0 is split. With `chunks > 1` the parameter is that many stacked blocks
    /// (q|k|v) and each block is split, so a rank gets its slice of every block.
    Rows { chunks: usize },
    /// Dimension 1 (the input features of a row-parallel linear) is split.
    Columns,
}

/// A parameter's global shape in terms of the model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Hidden,
    /// `3 x hidden` (fused q|k|v).
    Hidden3,
    Ffn,
    VocabPadded,
    SeqLen,
}

/// One row of the parameter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    /// Name inside its unit (`qkv_w`), as in checkpoints and the worker's `params.layer(l)`.
    pub name: &'static str,
    pub unit: UnitKind,
    /// Global shape: `[rows, cols]` for matrices (PyTorch's `(out, in)` for linears), `[n]`
    /// for vectors.
    pub shape: &'static [Dim],
    pub split: Split,
    /// AdamW weight decay applies (matrices yes; biases and LayerNorm no).
    pub decay: bool,
}

/// A unit without its stage-dependent contents (see [`Unit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    Embedding,
    Layer,
    Head,
}

impl Unit {
    pub fn kind(self) -> UnitKind {
        match self {
            Unit::Embedding => UnitKind::Embedding,
            Unit::Layer => UnitKind::Layer,
            Unit::Head { .. } => UnitKind::Head,
        }
    }
}

use Dim::*;

/// Every parameter of `arch: gpt2`, unit by unit, in storage order.
pub const PARAMS: &[ParamSpec] = &[
    param(
        "wte",
        UnitKind::Embedding,
        &[VocabPadded, Hidden],
        Split::Rows { chunks: 1 },
        true,
    ),
    param(
        "wpe",
        UnitKind::Embedding,
        &[SeqLen, Hidden],
        Split::Replicated,
        true,
    ),
    param(
        "ln1_w",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param(
        "ln1_b",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param(
        "qkv_w",
        UnitKind::Layer,
        &[Hidden3, Hidden],
        Split::Rows { chunks: 3 },
        true,
    ),
    param(
        "qkv_b",
        UnitKind::Layer,
        &[Hidden3],
        Split::Rows { chunks: 3 },
        false,
    ),
    param(
        "attproj_w",
        UnitKind::Layer,
        &[Hidden, Hidden],
        Split::Columns,
        true,
    ),
    param(
        "attproj_b",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param(
        "ln2_w",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param(
        "ln2_b",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param(
        "fc_w",
        UnitKind::Layer,
        &[Ffn, Hidden],
        Split::Rows { chunks: 1 },
        true,
    ),
    param(
        "fc_b",
        UnitKind::Layer,
        &[Ffn],
        Split::Rows { chunks: 1 },
        false,
    ),
    param(
        "fcproj_w",
        UnitKind::Layer,
        &[Hidden, Ffn],
        Split::Columns,
        true,
    ),
    param(
        "fcproj_b",
        UnitKind::Layer,
        &[Hidden],
        Split::Replicated,
        false,
    ),
    param("lnf_w", UnitKind::Head, &[Hidden], Split::Replicated, false),
    param("lnf_b", UnitKind::Head, &[Hidden], Split::Replicated, false),
];

const fn param(
    name: &'static str,
    unit: UnitKind,
    shape: &'static [Dim],
    split: Split,
    decay: bool,
) -> ParamSpec {
    ParamSpec {
        name,
        unit,
        shape,
        split,
        decay,
    }
}

/// The model's sizes for one tensor degree: everything needed to size parameters and
/// activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub vocab: usize,
    /// `vocab` rounded up to a multiple of `VOCAB_PAD x tp`.
    pub vocab_padded: usize,
    pub seq_len: usize,
    pub ffn_hidden: usize,
    pub tp: usize,
}

/// A parameter placed in its unit's flat buffer on one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub spec: ParamSpec,
    /// This rank's shape.
    pub local_shape: Vec<usize>,
    /// Element offset inside the unit's flat buffer.
    pub offset: u64,
}

impl Placed {
    pub fn numel(&self) -> u64 {
        self.local_shape.iter().map(|&d| d as u64).product()
    }
}

/// The flat buffer of one unit on one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitLayout {
    pub unit: Unit,
    pub params: Vec<Placed>,
    /// Elements of the flat buffer, including the alignment gaps between parameters.
    pub elems: u64,
}

impl UnitLayout {
    /// Parameter elements (without alignment gaps).
    pub fn numel(&self) -> u64 {
        self.params.iter().map(Placed::numel).sum()
    }

    pub fn get(&self, name: &str) -> Option<&Placed> {
        self.params.iter().find(|p| p.spec.name == name)
    }
}

impl ModelShape {
    pub fn new(model: &Model, tp: usize) -> ModelShape {
        let pad = VOCAB_PAD * tp;
        ModelShape {
            arch: model.arch,
            layers: model.layers,
            hidden: model.hidden,
            heads: model.heads,
            vocab: model.vocab,
            vocab_padded: model.vocab.div_ceil(pad) * pad,
            seq_len: model.seq_len,
            ffn_hidden: model.ffn_hidden,
            tp,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn size(&self, dim: Dim) -> usize {
        match dim {
            Hidden => self.hidden,
            Hidden3 => 3 * self.hidden,
            Ffn => self.ffn_hidden,
            VocabPadded => self.vocab_padded,
            SeqLen => self.seq_len,
        }
    }

    /// A parameter's global shape.
    pub fn global_shape(&self, spec: &ParamSpec) -> Vec<usize> {
        spec.shape.iter().map(|&d| self.size(d)).collect()
    }

    /// A parameter's shape on one tensor-parallel rank.
    pub fn local_shape(&self, spec: &ParamSpec) -> Vec<usize> {
        let mut shape = self.global_shape(spec);
        match spec.split {
            Split::Replicated => {}
            Split::Rows { .. } => shape[0] /= self.tp,
            Split::Columns => shape[1] /= self.tp,
        }
        shape
    }

    /// The flat buffer of `unit` on one tensor-parallel rank.
    pub fn layout(&self, unit: Unit) -> UnitLayout {
        let wte = PARAMS
            .iter()
            .find(|p| p.name == "wte")
            .expect("invariant: the table has wte");
        let mut specs: Vec<&ParamSpec> = PARAMS.iter().filter(|p| p.unit == unit.kind()).collect();
        if unit == (Unit::Head { tied_copy: true }) {
            specs.insert(0, wte);
        }
        let mut offset = 0;
        let params = specs
            .into_iter()
            .map(|spec| {
                let placed = Placed {
                    spec: *spec,
                    local_shape: self.local_shape(spec),
                    offset,
                };
                offset += placed.numel().div_ceil(PARAM_ALIGN) * PARAM_ALIGN;
                placed
            })
            .collect();
        UnitLayout {
            unit,
            params,
            elems: offset,
        }
    }

    /// Distinct parameters of the whole model (the tied embedding counted once), at the padded
    /// vocabulary: the number a model card quotes.
    pub fn total_params(&self) -> u64 {
        let count = |kind| -> u64 {
            PARAMS
                .iter()
                .filter(|p| p.unit == kind)
                .map(|p| {
                    self.global_shape(p)
                        .iter()
                        .map(|&d| d as u64)
                        .product::<u64>()
                })
                .sum()
        };
        count(UnitKind::Embedding)
            + self.layers as u64 * count(UnitKind::Layer)
            + count(UnitKind::Head)
    }

    /// Parameters outside the embeddings (the `N` of scaling laws).
    pub fn non_embedding_params(&self) -> u64 {
        self.total_params() - ((self.vocab_padded + self.seq_len) * self.hidden) as u64
    }

    /// Training FLOPs per token, forward and backward: 6 per parameter plus causal attention's
    /// `12 x layers x hidden x seq_len` (the convention of the PaLM paper and llm.c; the
    /// reference numbers in shared/reference count the same).
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.total_params() as f64 + 12.0 * (self.layers * self.hidden * self.seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2(layers: usize, hidden: usize, heads: usize, tp: usize) -> ModelShape {
        let model = Model {
            arch: Arch::Gpt2,
            layers,
            hidden,
            heads,
            vocab: 50257,
            seq_len: 1024,
            ffn_hidden: 4 * hidden,
        };
        ModelShape::new(&model, tp)
    }

    #[test]
    fn gpt2_small_has_124_475_904_parameters() {
        let shape = gpt2(12, 768, 12, 1);
        assert_eq!(shape.vocab_padded, 50304);
        assert_eq!(shape.total_params(), 124_475_904);
        assert_eq!(
            shape.non_embedding_params(),
            124_475_904 - (50304 + 1024) * 768
        );
    }

    #[test]
    fn gpt2_medium_and_xl_counts() {
        // 24 x (12 C^2 + 13 C) + (V + T) C + 2 C.
        let count = |c: u64| 24 * (12 * c * c + 13 * c) + (50304 + 1024) * c + 2 * c;
        assert_eq!(gpt2(24, 1024, 16, 1).total_params(), count(1024));
        assert_eq!(gpt2(24, 2048, 16, 1).total_params(), count(2048));
    }

    #[test]
    fn vocab_is_padded_for_the_tensor_degree() {
        assert_eq!(gpt2(12, 768, 12, 8).vocab_padded, 51200);
        assert_eq!(gpt2(12, 768, 12, 4).vocab_padded, 50688);
    }

    #[test]
    fn tensor_parallel_shards_cover_each_parameter_exactly() {
        let shape = gpt2(2, 768, 12, 4);
        let whole = gpt2(2, 768, 12, 1);
        let layer = shape.layout(Unit::Layer);
        assert_eq!(layer.get("qkv_w").unwrap().local_shape, [576, 768]);
        assert_eq!(layer.get("attproj_w").unwrap().local_shape, [768, 192]);
        assert_eq!(layer.get("fc_b").unwrap().local_shape, [768]);
        assert_eq!(layer.get("ln1_w").unwrap().local_shape, [768]);
        for spec in PARAMS {
            let local: u64 = shape.local_shape(spec).iter().map(|&d| d as u64).product();
            let global: u64 = shape.global_shape(spec).iter().map(|&d| d as u64).product();
            match spec.split {
                Split::Replicated => assert_eq!(local, global, "{}", spec.name),
                _ => assert_eq!(local * 4, global, "{}", spec.name),
            }
        }
        // Every parameter except the padded embedding has the same global size at any degree.
        let layer_numel = |s: &ModelShape| s.layout(Unit::Layer).numel();
        assert_eq!(layer_numel(&whole), 12 * 768 * 768 + 13 * 768);
    }

    #[test]
    fn units_lay_parameters_out_aligned_and_in_table_order() {
        let shape = gpt2(2, 100, 4, 1);
        let layer = shape.layout(Unit::Layer);
        let mut end = 0;
        for placed in &layer.params {
            assert_eq!(placed.offset % PARAM_ALIGN, 0, "{}", placed.spec.name);
            assert!(placed.offset >= end);
            end = placed.offset + placed.numel();
        }
        assert_eq!(layer.elems, end.div_ceil(PARAM_ALIGN) * PARAM_ALIGN);
        let head = shape.layout(Unit::Head { tied_copy: true });
        assert_eq!(head.params[0].spec.name, "wte");
        assert_eq!(
            shape.layout(Unit::Head { tied_copy: false }).params.len(),
            2
        );
    }

    #[test]
    fn decay_applies_to_matrices_only() {
        for spec in PARAMS {
            assert_eq!(spec.decay, spec.shape.len() == 2, "{}", spec.name);
        }
    }
}
