//! `arch: gpt2`: learned positions, LayerNorm with biases, a GELU MLP, fused q|k|v with biases,
//! the LM head tied to the token embedding unless `tie_embeddings: false`.

use super::Dim::*;
use super::{
    ActDims, Architecture, Dim, FinalNorm, Init, LayerTensor, ParamSpec, Role, ScratchTensor,
    Split, UnitKind, always, unless_full, unless_recomputing,
};
use crate::config::Arch;

pub(super) const ARCH: Architecture = Architecture {
    arch: Arch::Gpt2,
    params: PARAMS,
    layer_tensors: LAYER_TENSORS,
    layer_scratch: LAYER_SCRATCH,
    final_norm: FinalNorm::LayerNorm,
    rope: false,
};

const QKV: &[Dim] = &[QWidth, KvWidth, KvWidth];

/// Every parameter, unit by unit, in storage order.
const PARAMS: &[ParamSpec] = &[
    ParamSpec::new("wte", UnitKind::Embedding, &[VocabPadded, Hidden])
        .split(Split::Rows { blocks: &[] })
        .role(Role::TokenEmbedding),
    ParamSpec::new("wpe", UnitKind::Embedding, &[SeqLen, Hidden]).role(Role::Positions),
    ParamSpec::new("ln1_w", UnitKind::Layer, &[Hidden]).norm(Init::Ones),
    ParamSpec::new("ln1_b", UnitKind::Layer, &[Hidden]).norm(Init::Zeros),
    ParamSpec::new("qkv_w", UnitKind::Layer, &[Qkv, Hidden]).split(Split::Rows { blocks: QKV }),
    ParamSpec::new("qkv_b", UnitKind::Layer, &[Qkv])
        .split(Split::Rows { blocks: QKV })
        .bias(),
    ParamSpec::new("attproj_w", UnitKind::Layer, &[Hidden, QWidth])
        .split(Split::Columns)
        .init(Init::Residual),
    ParamSpec::new("attproj_b", UnitKind::Layer, &[Hidden]).bias(),
    ParamSpec::new("ln2_w", UnitKind::Layer, &[Hidden]).norm(Init::Ones),
    ParamSpec::new("ln2_b", UnitKind::Layer, &[Hidden]).norm(Init::Zeros),
    ParamSpec::new("fc_w", UnitKind::Layer, &[Ffn, Hidden]).split(Split::Rows { blocks: &[] }),
    ParamSpec::new("fc_b", UnitKind::Layer, &[Ffn])
        .split(Split::Rows { blocks: &[] })
        .bias(),
    ParamSpec::new("fcproj_w", UnitKind::Layer, &[Hidden, Ffn])
        .split(Split::Columns)
        .init(Init::Residual),
    ParamSpec::new("fcproj_b", UnitKind::Layer, &[Hidden]).bias(),
    ParamSpec::new("lnf_w", UnitKind::Head, &[Hidden])
        .norm(Init::Ones)
        .role(Role::FinalNorm),
    ParamSpec::new("lnf_b", UnitKind::Head, &[Hidden])
        .norm(Init::Zeros)
        .role(Role::FinalNormBias),
    ParamSpec::new("lm_head_w", UnitKind::Head, &[VocabPadded, Hidden])
        .split(Split::Rows { blocks: &[] })
        .role(Role::LmHead),
];

/// The per-layer activations, in the order forward makes them.
///
/// | tensor      | elements   | needed by backward of          | none | selective | full |
/// |-------------|------------|--------------------------------|------|-----------|------|
/// | resid       | n C        | ln1 (the layer's input)        | kept | kept      | kept |
/// | ln1         | n C        | qkv matmul (weight gradient)   | kept | recomputed from resid + stats | recomputed |
/// | ln1 mean/rstd | n, n (fp32) | ln1                         | kept | kept      | recomputed |
/// | qkv         | N (H + 2 KV) hs/t | attention               | kept | kept      | recomputed |
/// | atty        | N H hs/t   | attention (its output), attproj | kept | kept     | recomputed |
/// | att_lse     | b H/t T (fp32) | flash attention backward   | kept | kept      | recomputed |
/// | resid2      | n C        | ln2 (input)                    | kept | kept      | recomputed |
/// | ln2         | n C        | fc matmul                      | kept | recomputed | recomputed |
/// | ln2 mean/rstd | n, n (fp32) | ln2                         | kept | kept      | recomputed |
/// | fch         | N F/t      | GELU                           | kept | kept      | recomputed |
/// | fch_gelu    | N F/t      | fcproj matmul                  | kept | recomputed from fch | recomputed |
///
/// Attention is flash-style: only the per-row log-sum-exp is kept, never a `T x T` matrix.
/// Selective recompute re-runs only element-wise ops (LayerNorm, GELU), never a matmul.
const LAYER_TENSORS: &[LayerTensor] = &[
    LayerTensor::new(
        "resid",
        "act.resid",
        "recompute.resid",
        ActDims::held,
        always,
    ),
    LayerTensor::new(
        "ln1",
        "act.ln1",
        "recompute.ln1",
        ActDims::held,
        unless_recomputing,
    ),
    LayerTensor::new(
        "ln1_mean",
        "act.ln1_mean",
        "recompute.ln1_mean",
        ActDims::rows,
        unless_full,
    )
    .fp32(),
    LayerTensor::new(
        "ln1_rstd",
        "act.ln1_rstd",
        "recompute.ln1_rstd",
        ActDims::rows,
        unless_full,
    )
    .fp32(),
    LayerTensor::new("qkv", "act.qkv", "recompute.qkv", ActDims::qkv, unless_full),
    LayerTensor::new(
        "atty",
        "act.atty",
        "recompute.atty",
        ActDims::atty,
        unless_full,
    ),
    LayerTensor::new(
        "att_lse",
        "act.att_lse",
        "recompute.att_lse",
        ActDims::lse,
        unless_full,
    )
    .fp32(),
    LayerTensor::new(
        "resid2",
        "act.resid2",
        "recompute.resid2",
        ActDims::held,
        unless_full,
    ),
    LayerTensor::new(
        "ln2",
        "act.ln2",
        "recompute.ln2",
        ActDims::held,
        unless_recomputing,
    ),
    LayerTensor::new(
        "ln2_mean",
        "act.ln2_mean",
        "recompute.ln2_mean",
        ActDims::rows,
        unless_full,
    )
    .fp32(),
    LayerTensor::new(
        "ln2_rstd",
        "act.ln2_rstd",
        "recompute.ln2_rstd",
        ActDims::rows,
        unless_full,
    )
    .fp32(),
    LayerTensor::new("fch", "act.fch", "recompute.fch", ActDims::ffn, unless_full),
    LayerTensor::new(
        "fch_gelu",
        "act.fch_gelu",
        "recompute.fch_gelu",
        ActDims::ffn,
        unless_recomputing,
    ),
];

/// One layer's backward buffers: the gradients of q|k|v, of attention's output and of the MLP's
/// hidden activations (GELU's backward works in place), and `rowsum(dO * O)` of flash
/// attention's backward.
const LAYER_SCRATCH: &[ScratchTensor] = &[
    ScratchTensor::new("dqkv", "scratch.dqkv", ActDims::qkv),
    ScratchTensor::new("datty", "scratch.datty", ActDims::atty),
    ScratchTensor::new("dfch", "scratch.dfch", ActDims::ffn),
    ScratchTensor::new("att_delta", "scratch.att_delta", ActDims::lse).fp32(),
];
