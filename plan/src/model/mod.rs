//! The architectures' tables: every parameter (shape, tensor-parallel split, initialisation,
//! weight decay, gradient sync and role as columns) and every per-layer activation, and the
//! model's sizes.
//!
//! One architecture is one file here (`gpt2.rs`, `llama.rs`) holding its tables, plus its layer
//! forward and backward in the worker. The memory plan, initialisation, ZeRO sharding,
//! sequence-parallel reductions and checkpoint resharding all read the tables, never parameter
//! names, so a new parameter is one new row.
//!
//! Parameters are grouped into *units* that are stored, sharded and gathered together as one
//! flat buffer: the embedding, each transformer layer, and the head. A rank holds the units of
//! its pipeline stage; a unit's flat buffer lays its parameters out in table order, each
//! starting on a [`PARAM_ALIGN`]-element boundary so that every tensor view is aligned.

mod gpt2;
mod llama;

use crate::config::{Arch, Model, Recompute};

/// Elements between parameter starts inside a unit, and the granule of ZeRO shards: 64
/// elements is 128 bytes in bf16 and 256 in fp32, enough for vectorised loads and cuBLASLt.
pub const PARAM_ALIGN: u64 = 64;

/// The embedding's rows are padded to a multiple of this times the tensor degree, so that
/// every tensor-parallel shard is equal and its matmuls have friendly shapes.
pub const VOCAB_PAD: usize = 128;

/// One architecture's tables.
#[derive(Debug)]
pub struct Architecture {
    pub arch: Arch,
    /// Every parameter, unit by unit, in storage order.
    pub params: &'static [ParamSpec],
    /// What one layer's forward makes and its backward reads, in the order forward makes it.
    pub layer_tensors: &'static [LayerTensor],
    /// The buffers of one layer's backward (one at a time on a rank).
    pub layer_scratch: &'static [ScratchTensor],
    /// The normalisation before the LM head (and in every layer).
    pub final_norm: FinalNorm,
    /// Rotary position embeddings (a `rope.table` row in the plan).
    pub rope: bool,
}

/// The tables of `arch`.
pub fn architecture(arch: Arch) -> &'static Architecture {
    match arch {
        Arch::Gpt2 => &gpt2::ARCH,
        Arch::Llama => &llama::ARCH,
    }
}

/// The normalisation an architecture uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalNorm {
    /// Mean and variance, weight and bias; saves mean and rstd.
    LayerNorm,
    /// Root mean square, weight only; saves rstd.
    RmsNorm,
}

/// A group of parameters stored, sharded and gathered as one flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Token (and, for gpt2, position) embeddings (first pipeline stage).
    Embedding,
    /// One transformer block.
    Layer,
    /// The final norm and, when untied, the LM head's own weights (last pipeline stage). With
    /// tied embeddings and more than one pipeline stage it also holds a copy of the token
    /// embedding; the copies' gradients are summed between the first and last stage.
    Head { tied_copy: bool },
}

/// How tensor parallelism splits a parameter across the `tp` ranks of a tensor group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole parameter.
    Replicated,
    /// Dimension 0 is split. When `blocks` is not empty the parameter is those blocks stacked
    /// (q|k|v, gate|up) and each block is split, so a rank gets its slice of every block.
    Rows { blocks: &'static [Dim] },
    /// Dimension 1 (the input features of a row-parallel linear) is split.
    Columns,
}

/// A parameter's global shape in terms of the model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Hidden,
    /// `heads x head_dim`: the queries' width.
    QWidth,
    /// `kv_heads x head_dim`: the keys' (and the values') width.
    KvWidth,
    /// `(heads + 2 kv_heads) x head_dim` (fused q|k|v).
    Qkv,
    Ffn,
    /// `2 x ffn_hidden` (fused gate|up).
    Ffn2,
    VocabPadded,
    SeqLen,
}

/// How a parameter starts (see the worker's `model::init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// normal(0, 0.02).
    Normal,
    /// normal(0, 0.02 / sqrt(2 layers)): the projections into the residual stream.
    Residual,
    Ones,
    Zeros,
}

/// How a parameter's gradient is made whole before the data-parallel reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSync {
    /// Every tensor-parallel rank computes the whole gradient of its shard (or replica).
    Whole,
    /// A replicated parameter applied to each rank's own tokens under sequence parallelism
    /// (the norms): its gradient is a partial sum, summed over the tensor group once a step.
    SequencePartial,
}

/// What the code outside an architecture needs to find in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A parameter only the architecture's own layer code reads.
    Layer,
    /// The token embedding `(V, C)`: its padding rows start at 0; the LM head when tied.
    TokenEmbedding,
    /// Learned position embeddings `(T, C)`.
    Positions,
    /// The final norm's weight and (LayerNorm) bias.
    FinalNorm,
    FinalNormBias,
    /// The LM head's own weights `(V, C)`, present only with untied embeddings.
    LmHead,
}

/// One row of the parameter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    /// Name inside its unit (`qkv_w`), as in checkpoints.
    pub name: &'static str,
    pub unit: UnitKind,
    /// Global shape: `[rows, cols]` for matrices (PyTorch's `(out, in)` for linears), `[n]`
    /// for vectors.
    pub shape: &'static [Dim],
    pub split: Split,
    pub init: Init,
    /// AdamW weight decay applies (matrices yes; biases and norms no).
    pub decay: bool,
    pub sync: GradSync,
    pub role: Role,
}

impl ParamSpec {
    /// A replicated matrix (or vector) with normal initialisation, decayed.
    pub const fn new(name: &'static str, unit: UnitKind, shape: &'static [Dim]) -> ParamSpec {
        ParamSpec {
            name,
            unit,
            shape,
            split: Split::Replicated,
            init: Init::Normal,
            decay: true,
            sync: GradSync::Whole,
            role: Role::Layer,
        }
    }

    pub const fn split(self, split: Split) -> ParamSpec {
        ParamSpec { split, ..self }
    }

    pub const fn init(self, init: Init) -> ParamSpec {
        ParamSpec { init, ..self }
    }

    pub const fn role(self, role: Role) -> ParamSpec {
        ParamSpec { role, ..self }
    }

    /// A bias: starts at 0, no decay.
    pub const fn bias(self) -> ParamSpec {
        ParamSpec {
            init: Init::Zeros,
            decay: false,
            ..self
        }
    }

    /// A norm's weight or bias: no decay, and applied to each rank's own tokens under sequence
    /// parallelism.
    pub const fn norm(self, init: Init) -> ParamSpec {
        ParamSpec {
            init,
            decay: false,
            sync: GradSync::SequencePartial,
            ..self
        }
    }
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

/// Sizes of one microbatch on one rank, for the activation and scratch tables. `n` tokens
/// held outside attention and the MLP (`N / t` under sequence parallelism), `N` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActDims {
    /// `b`
    pub batch: u64,
    /// `T`
    pub seq: u64,
    /// `C`
    pub hidden: u64,
    /// `F / t`
    pub ffn_local: u64,
    /// `H / t`
    pub heads_local: u64,
    /// `H hs / t`
    pub q_local: u64,
    /// `(H + 2 KV) hs / t`
    pub qkv_local: u64,
    /// `N = b T`
    pub tokens: u64,
    /// `n`
    pub tokens_held: u64,
}

impl ActDims {
    /// `n C`: a tensor of the residual stream.
    pub fn held(&self) -> u64 {
        self.tokens_held * self.hidden
    }
    /// `n`: one statistic per held token.
    pub fn rows(&self) -> u64 {
        self.tokens_held
    }
    /// `N (H + 2 KV) hs / t`
    pub fn qkv(&self) -> u64 {
        self.tokens * self.qkv_local
    }
    /// `N H hs / t`: attention's output.
    pub fn atty(&self) -> u64 {
        self.tokens * self.q_local
    }
    /// `b H/t T`: one statistic per query row.
    pub fn lse(&self) -> u64 {
        self.batch * self.heads_local * self.seq
    }
    /// `N F / t`
    pub fn ffn(&self) -> u64 {
        self.tokens * self.ffn_local
    }
    /// `2 N F / t`
    pub fn gate_up(&self) -> u64 {
        2 * self.tokens * self.ffn_local
    }
}

/// A tensor a transformer layer makes in forward and reads in backward. Kept tensors live in
/// the microbatch's activation slot (`saved`); the others are recomputed in backward into one
/// transient buffer (`recomputed`), which forward also writes them to.
#[derive(Debug, Clone, Copy)]
pub struct LayerTensor {
    /// The name the layer code asks for.
    pub name: &'static str,
    pub saved: &'static str,
    pub recomputed: &'static str,
    pub elems: fn(&ActDims) -> u64,
    /// Statistics are fp32; everything else is in the compute dtype.
    pub fp32: bool,
    pub kept: fn(Recompute) -> bool,
}

impl LayerTensor {
    pub const fn new(
        name: &'static str,
        saved: &'static str,
        recomputed: &'static str,
        elems: fn(&ActDims) -> u64,
        kept: fn(Recompute) -> bool,
    ) -> LayerTensor {
        LayerTensor {
            name,
            saved,
            recomputed,
            elems,
            fp32: false,
            kept,
        }
    }

    pub const fn fp32(self) -> LayerTensor {
        LayerTensor { fp32: true, ..self }
    }
}

/// A buffer of one layer's backward.
#[derive(Debug, Clone, Copy)]
pub struct ScratchTensor {
    pub name: &'static str,
    pub region: &'static str,
    pub elems: fn(&ActDims) -> u64,
    pub fp32: bool,
}

impl ScratchTensor {
    pub const fn new(
        name: &'static str,
        region: &'static str,
        elems: fn(&ActDims) -> u64,
    ) -> ScratchTensor {
        ScratchTensor {
            name,
            region,
            elems,
            fp32: false,
        }
    }

    pub const fn fp32(self) -> ScratchTensor {
        ScratchTensor { fp32: true, ..self }
    }
}

/// Kept in every recompute mode (a layer's input).
pub fn always(_: Recompute) -> bool {
    true
}
/// Kept unless `selective` or `full` recompute rebuilds it (element-wise outputs).
pub fn unless_recomputing(mode: Recompute) -> bool {
    mode == Recompute::None
}
/// Kept unless `full` recompute runs the layer again.
pub fn unless_full(mode: Recompute) -> bool {
    mode != Recompute::Full
}

/// The model's sizes for one tensor degree: everything needed to size parameters and
/// activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// `vocab` rounded up to a multiple of `VOCAB_PAD x tp`.
    pub vocab_padded: usize,
    pub seq_len: usize,
    pub ffn_hidden: usize,
    pub tie_embeddings: bool,
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

    /// The parameter with `role` (the first, if several).
    pub fn with_role(&self, role: Role) -> Option<&Placed> {
        self.params.iter().find(|p| p.spec.role == role)
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
            kv_heads: model.kv_heads,
            head_dim: model.head_dim,
            vocab: model.vocab,
            vocab_padded: model.vocab.div_ceil(pad) * pad,
            seq_len: model.seq_len,
            ffn_hidden: model.ffn_hidden,
            tie_embeddings: model.tie_embeddings,
            tp,
        }
    }

    pub fn architecture(&self) -> &'static Architecture {
        architecture(self.arch)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn size(&self, dim: Dim) -> usize {
        match dim {
            Dim::Hidden => self.hidden,
            Dim::QWidth => self.heads * self.head_dim,
            Dim::KvWidth => self.kv_heads * self.head_dim,
            Dim::Qkv => (self.heads + 2 * self.kv_heads) * self.head_dim,
            Dim::Ffn => self.ffn_hidden,
            Dim::Ffn2 => 2 * self.ffn_hidden,
            Dim::VocabPadded => self.vocab_padded,
            Dim::SeqLen => self.seq_len,
        }
    }

    /// The global sizes of a split's row blocks (one block, all rows, when it has none).
    pub fn row_blocks(&self, spec: &ParamSpec) -> Vec<usize> {
        match spec.split {
            Split::Rows { blocks } if !blocks.is_empty() => {
                blocks.iter().map(|&d| self.size(d)).collect()
            }
            _ => vec![self.size(spec.shape[0])],
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

    /// Where element `i` (row-major) of `placed`, the shard of tensor-parallel rank `tp_rank`,
    /// sits in the global tensor: its row-major index there.
    pub fn global_index(&self, placed: &Placed, tp_rank: usize, i: usize) -> usize {
        let local_cols = placed.local_shape.get(1).copied().unwrap_or(1);
        let global_cols = self.global_shape(&placed.spec).get(1).copied().unwrap_or(1);
        let (row, col) =
            self.global_position(&placed.spec, i / local_cols, i % local_cols, tp_rank);
        row * global_cols + col
    }

    /// Where local element `(row, col)` of tensor-parallel rank `tp_rank`'s shard of `spec`
    /// sits in the global tensor.
    pub fn global_position(
        &self,
        spec: &ParamSpec,
        row: usize,
        col: usize,
        tp_rank: usize,
    ) -> (usize, usize) {
        let tp = self.tp;
        match spec.split {
            Split::Replicated => (row, col),
            Split::Rows { .. } => {
                // Rank `tp_rank` holds its slice of every block, one after the other.
                let (mut global_start, mut local_start) = (0, 0);
                for block in self.row_blocks(spec) {
                    let local = block / tp;
                    if row < local_start + local {
                        return (global_start + tp_rank * local + row - local_start, col);
                    }
                    global_start += block;
                    local_start += local;
                }
                unreachable!("invariant: a local row lies in one of the blocks")
            }
            Split::Columns => {
                let global_cols = self.size(spec.shape[1]);
                (row, tp_rank * (global_cols / tp) + col)
            }
        }
    }

    /// Whether the architecture's row `spec` exists in this model (the LM head's own weights
    /// only with untied embeddings).
    fn present(&self, spec: &ParamSpec) -> bool {
        spec.role != Role::LmHead || !self.tie_embeddings
    }

    /// The rows of the parameter table this model has, for units of `kind`.
    pub fn params_of(&self, kind: UnitKind) -> impl Iterator<Item = &'static ParamSpec> + '_ {
        self.architecture()
            .params
            .iter()
            .filter(move |p| p.unit == kind && self.present(p))
    }

    /// The flat buffer of `unit` on one tensor-parallel rank.
    pub fn layout(&self, unit: Unit) -> UnitLayout {
        let mut specs: Vec<&ParamSpec> = self.params_of(unit.kind()).collect();
        if unit == (Unit::Head { tied_copy: true }) {
            let embedding = self
                .architecture()
                .params
                .iter()
                .find(|p| p.role == Role::TokenEmbedding)
                .expect("invariant: every architecture has a token embedding");
            specs.insert(0, embedding);
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

    fn count(&self, kind: UnitKind) -> u64 {
        self.params_of(kind)
            .map(|p| {
                self.global_shape(p)
                    .iter()
                    .map(|&d| d as u64)
                    .product::<u64>()
            })
            .sum()
    }

    /// Distinct parameters of the whole model (a tied embedding counted once), at the padded
    /// vocabulary: the number a model card quotes.
    pub fn total_params(&self) -> u64 {
        self.count(UnitKind::Embedding)
            + self.layers as u64 * self.count(UnitKind::Layer)
            + self.count(UnitKind::Head)
    }

    /// Parameters outside the embeddings and the LM head (the `N` of scaling laws).
    pub fn non_embedding_params(&self) -> u64 {
        let vocab_rows = |kind| -> u64 {
            self.params_of(kind)
                .filter(|p| {
                    matches!(
                        p.role,
                        Role::TokenEmbedding | Role::Positions | Role::LmHead
                    )
                })
                .map(|p| {
                    self.global_shape(p)
                        .iter()
                        .map(|&d| d as u64)
                        .product::<u64>()
                })
                .sum()
        };
        self.total_params() - vocab_rows(UnitKind::Embedding) - vocab_rows(UnitKind::Head)
    }

    /// Training FLOPs per token, forward and backward: 6 per parameter (SwiGLU's three
    /// matrices and grouped-query attention's narrower k and v count through their
    /// parameters) plus causal attention's `12 x layers x heads x head_dim x seq_len` (the
    /// convention of the PaLM paper and llm.c; the reference numbers in shared/reference count
    /// the same).
    pub fn flops_per_token(&self) -> f64 {
        let attention = self.layers * self.heads * self.head_dim * self.seq_len;
        6.0 * self.total_params() as f64 + 12.0 * attention as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2(layers: usize, hidden: usize, heads: usize, tp: usize) -> ModelShape {
        let model = Model::new(Arch::Gpt2, layers, hidden, heads, 50257, 1024, 4 * hidden);
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
        for spec in shape.params_of(UnitKind::Layer) {
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
        for spec in gpt2::ARCH.params.iter().chain(llama::ARCH.params) {
            assert_eq!(spec.decay, spec.shape.len() == 2, "{}", spec.name);
        }
    }

    fn llama(
        layers: usize,
        hidden: usize,
        heads: usize,
        kv: usize,
        vocab: usize,
        ffn: usize,
    ) -> ModelShape {
        let mut model = Model::new(Arch::Llama, layers, hidden, heads, vocab, 8192, ffn);
        model.kv_heads = kv;
        ModelShape::new(&model, 1)
    }

    #[test]
    fn llama_3_and_deepseek_67b_have_their_published_parameter_counts() {
        // Meta's model cards: 8.03B and 70.6B; DeepSeek-LLM 67B.
        assert_eq!(
            llama(32, 4096, 32, 8, 128256, 14336).total_params(),
            8_030_261_248
        );
        assert_eq!(
            llama(80, 8192, 64, 8, 128256, 28672).total_params(),
            70_553_706_496
        );
        let deepseek = llama(95, 8192, 64, 8, 102400, 22016);
        let layer = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 22016 + 2 * 8192;
        assert_eq!(
            deepseek.total_params(),
            95 * layer + 2 * 102400 * 8192 + 8192
        );
        assert_eq!(deepseek.non_embedding_params(), 95 * layer + 8192);
    }

    #[test]
    fn grouped_query_attention_and_swiglu_split_their_blocks_over_tensor_ranks() {
        let mut model = Model::new(Arch::Llama, 2, 64, 4, 256, 32, 172);
        model.kv_heads = 2;
        let shape = ModelShape::new(&model, 2);
        let layer = shape.layout(Unit::Layer);
        // q: 4 heads of 16 = 64 rows, k and v: 2 heads = 32 rows each; half of each per rank.
        assert_eq!(layer.get("qkv_w").unwrap().local_shape, [64, 64]);
        assert_eq!(layer.get("o_w").unwrap().local_shape, [64, 32]);
        assert_eq!(layer.get("gate_up_w").unwrap().local_shape, [172, 64]);
        assert_eq!(layer.get("down_w").unwrap().local_shape, [64, 86]);
        assert!(layer.get("qkv_b").is_none(), "llama has no biases");
        let head = shape.layout(Unit::Head { tied_copy: false });
        let names: Vec<&str> = head.params.iter().map(|p| p.spec.name).collect();
        assert_eq!(
            names,
            ["norm_w", "lm_head_w"],
            "an untied head holds its own weights"
        );
        assert!(shape.layout(Unit::Embedding).get("wpe").is_none());
    }

    #[test]
    fn the_norms_are_the_sequence_partial_parameters() {
        for arch in [&gpt2::ARCH, &llama::ARCH] {
            for spec in arch.params {
                let norm = spec.init == Init::Ones
                    || (spec.name.starts_with("ln") && spec.name.ends_with("_b"));
                assert_eq!(
                    spec.sync == GradSync::SequencePartial,
                    norm,
                    "{}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn an_untied_gpt2_gets_its_own_head_and_counts_it() {
        let tied = gpt2(2, 64, 4, 1);
        let mut model = Model::new(Arch::Gpt2, 2, 64, 4, 50257, 1024, 256);
        model.tie_embeddings = false;
        let untied = ModelShape::new(&model, 1);
        let head = untied.layout(Unit::Head { tied_copy: false });
        let names: Vec<&str> = head.params.iter().map(|p| p.spec.name).collect();
        assert_eq!(names, ["lnf_w", "lnf_b", "lm_head_w"]);
        assert_eq!(
            untied.total_params() - tied.total_params(),
            (50304 * 64) as u64
        );
        assert_eq!(untied.non_embedding_params(), tied.non_embedding_params());
    }
}
