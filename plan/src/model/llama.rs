//! `arch: llama` (Llama 2/3, DeepSeek-LLM, Mistral): RMSNorm, rotary positions (no position
//! embedding), grouped-query attention, a SwiGLU MLP, no biases, and an untied LM head unless
//! `tie_embeddings: true`. Hugging Face's `q_proj|k_proj|v_proj` are the row blocks of `qkv_w`,
//! `gate_proj|up_proj` those of `gate_up_w`.

use super::Dim::*;
use super::{
    ActDims, Architecture, Dim, FinalNorm, Init, LayerTensor, ParamSpec, Role, ScratchTensor,
    Split, UnitKind, always, unless_full, unless_recomputing,
};
use crate::config::Arch;

pub(super) const ARCH: Architecture = Architecture {
    arch: Arch::Llama,
    params: PARAMS,
    layer_tensors: LAYER_TENSORS,
    layer_scratch: LAYER_SCRATCH,
    final_norm: FinalNorm::RmsNorm,
    rope: true,
};

const QKV: &[Dim] = &[QWidth, KvWidth, KvWidth];
const GATE_UP: &[Dim] = &[Ffn, Ffn];

/// Every parameter, unit by unit, in storage order.
const PARAMS: &[ParamSpec] = &[
    ParamSpec::new("wte", UnitKind::Embedding, &[VocabPadded, Hidden])
        .split(Split::Rows { blocks: &[] })
        .role(Role::TokenEmbedding),
    ParamSpec::new("attn_norm_w", UnitKind::Layer, &[Hidden]).norm(Init::Ones),
    ParamSpec::new("qkv_w", UnitKind::Layer, &[Qkv, Hidden]).split(Split::Rows { blocks: QKV }),
    ParamSpec::new("o_w", UnitKind::Layer, &[Hidden, QWidth])
        .split(Split::Columns)
        .init(Init::Residual),
    ParamSpec::new("mlp_norm_w", UnitKind::Layer, &[Hidden]).norm(Init::Ones),
    ParamSpec::new("gate_up_w", UnitKind::Layer, &[Ffn2, Hidden])
        .split(Split::Rows { blocks: GATE_UP }),
    ParamSpec::new("down_w", UnitKind::Layer, &[Hidden, Ffn])
        .split(Split::Columns)
        .init(Init::Residual),
    ParamSpec::new("norm_w", UnitKind::Head, &[Hidden])
        .norm(Init::Ones)
        .role(Role::FinalNorm),
    ParamSpec::new("lm_head_w", UnitKind::Head, &[VocabPadded, Hidden])
        .split(Split::Rows { blocks: &[] })
        .role(Role::LmHead),
];

/// The per-layer activations, in the order forward makes them.
///
/// | tensor     | elements          | needed by backward of      | none | selective | full |
/// |------------|-------------------|----------------------------|------|-----------|------|
/// | resid      | n C               | attn_norm (the layer's input) | kept | kept   | kept |
/// | attn_norm  | n C               | qkv matmul                 | kept | recomputed from resid + rstd | recomputed |
/// | attn_rstd  | n (fp32)          | attn_norm                  | kept | kept      | recomputed |
/// | qkv        | N (H + 2 KV) hs/t | attention (rotated q, k)   | kept | kept      | recomputed |
/// | atty       | N H hs/t          | attention, o matmul        | kept | kept      | recomputed |
/// | att_lse    | b H/t T (fp32)    | flash attention backward   | kept | kept      | recomputed |
/// | resid2     | n C               | mlp_norm                   | kept | kept      | recomputed |
/// | mlp_norm   | n C               | gate_up matmul             | kept | recomputed | recomputed |
/// | mlp_rstd   | n (fp32)          | mlp_norm                   | kept | kept      | recomputed |
/// | gate_up    | N 2F/t            | SwiGLU                     | kept | kept      | recomputed |
/// | swiglu     | N F/t             | down matmul                | kept | recomputed from gate_up | recomputed |
///
/// Rotary embeddings rotate q and k in place inside `qkv`, so nothing else is kept for them.
const LAYER_TENSORS: &[LayerTensor] = &[
    LayerTensor::new(
        "resid",
        "act.resid",
        "recompute.resid",
        ActDims::held,
        always,
    ),
    LayerTensor::new(
        "attn_norm",
        "act.attn_norm",
        "recompute.attn_norm",
        ActDims::held,
        unless_recomputing,
    ),
    LayerTensor::new(
        "attn_rstd",
        "act.attn_rstd",
        "recompute.attn_rstd",
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
        "mlp_norm",
        "act.mlp_norm",
        "recompute.mlp_norm",
        ActDims::held,
        unless_recomputing,
    ),
    LayerTensor::new(
        "mlp_rstd",
        "act.mlp_rstd",
        "recompute.mlp_rstd",
        ActDims::rows,
        unless_full,
    )
    .fp32(),
    LayerTensor::new(
        "gate_up",
        "act.gate_up",
        "recompute.gate_up",
        ActDims::gate_up,
        unless_full,
    ),
    LayerTensor::new(
        "swiglu",
        "act.swiglu",
        "recompute.swiglu",
        ActDims::ffn,
        unless_recomputing,
    ),
];

/// One layer's backward buffers: the gradients of q|k|v, attention's output, the SwiGLU output
/// and gate|up, and flash attention's `rowsum(dO * O)`.
const LAYER_SCRATCH: &[ScratchTensor] = &[
    ScratchTensor::new("dqkv", "scratch.dqkv", ActDims::qkv),
    ScratchTensor::new("datty", "scratch.datty", ActDims::atty),
    ScratchTensor::new("dswiglu", "scratch.dswiglu", ActDims::ffn),
    ScratchTensor::new("dgate_up", "scratch.dgate_up", ActDims::gate_up),
    ScratchTensor::new("att_delta", "scratch.att_delta", ActDims::lse).fp32(),
];
