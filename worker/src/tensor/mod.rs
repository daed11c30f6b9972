//! The `Backend` trait: the closed list of kernels our model families need (GPT-2's, and
//! Llama's RMSNorm, rotary embeddings, SwiGLU and grouped-query attention), written once per
//! device.
//!
//! Buffers are not owned tensors but [`Tensor`] handles: a typed range of one of the backend's
//! arenas (see `crate::arena`). The model asks the arena for handles by region name and passes
//! them to backend methods; the backend resolves them to memory. There is no autograd: the
//! model calls each `*_fwd` in order and each `*_bwd` in reverse.
//!
//! Conventions every implementation keeps:
//! - Argument order: outputs, inputs, saved statistics, then the sizes (`Dims` or `Linear`).
//! - Backward *adds* (`+=`) into parameter gradients, so accumulating over microbatches is
//!   free; it *overwrites* (`=`) activation gradients, except the residual stream, where
//!   LayerNorm backward adds into the gradient flowing down.
//! - Storage dtypes are f32, bf16 or f16 (the region's dtype in the plan); arithmetic is f32.
//!   LayerNorm and RMSNorm statistics, rotary tables, log-sum-exps and losses are always f32.
//! - An output never overlaps an input unless the method says it is in place.
//! - Results are deterministic: the same inputs give the same bits, whatever the thread count.

pub mod check;
pub mod cpu;
pub mod cuda;

use half::{bf16, f16};
use tessera_plan::memory::{Dtype, Place};

use crate::comm::CommBuf;
use crate::error::Result;

/// A storage element type. Kernels load it as f32, compute in f32 and store it back.
pub trait Elem: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
}

impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> f32 {
        value
    }
}

impl Elem for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> bf16 {
        bf16::from_f32(value)
    }
}

impl Elem for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> f16 {
        f16::from_f32(value)
    }
}

/// A typed range of an arena: `len` elements of `dtype` starting `offset` bytes into the arena
/// of `place`. Copying a handle does not copy data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tensor {
    pub place: Place,
    /// Bytes from the start of the arena; a multiple of the element size.
    pub offset: usize,
    pub len: usize,
    pub dtype: Dtype,
}

impl Tensor {
    pub fn bytes(self) -> usize {
        self.len * self.dtype.size() as usize
    }

    /// Elements `start..start + len` of this tensor.
    pub fn slice(self, start: usize, len: usize) -> Tensor {
        assert!(
            start + len <= self.len,
            "invariant: slice {start}+{len} of a tensor of {}",
            self.len
        );
        Tensor {
            offset: self.offset + start * self.dtype.size() as usize,
            len,
            ..self
        }
    }

    /// Whether two handles share any byte.
    pub fn overlaps(self, other: Tensor) -> bool {
        self.place == other.place
            && self.len > 0
            && other.len > 0
            && self.offset < other.offset + other.bytes()
            && other.offset < self.offset + self.bytes()
    }
}

/// The sizes of one microbatch on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Sequences in the microbatch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Hidden width (the residual stream's, never split).
    pub c: usize,
    /// Attention (query) heads on this rank.
    pub nh: usize,
    /// Key/value heads on this rank; `nh` is a multiple of it; query head h reads key/value
    /// head h / (nh / nkv). Equal to `nh` without grouped-query attention (GPT-2).
    pub nkv: usize,
    /// Head size.
    pub hs: usize,
    /// Real vocabulary: logits at or past it are padding and get no probability.
    pub v: usize,
    /// Padded vocabulary rows on this rank (the embedding's and the logits' width).
    pub vp: usize,
    /// The token id of this rank's first vocabulary row: its tensor-parallel shard is ids
    /// `vocab_start..vocab_start + vp` (0 without tensor parallelism).
    pub vocab_start: usize,
}

impl Dims {
    /// Tokens in the microbatch, `b * t`.
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }

    /// This rank's vocabulary rows that are real tokens (the rest is padding).
    pub fn real_vocab(&self) -> usize {
        self.v.saturating_sub(self.vocab_start).min(self.vp)
    }

    /// Query heads per key/value head, `nh / nkv`.
    pub fn group(&self) -> usize {
        self.nh / self.nkv.max(1)
    }

    /// Width of a `qkv` row, `(nh + 2 nkv) hs`: `[q: nh hs | k: nkv hs | v: nkv hs]`.
    pub fn qkv_width(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }

    /// The row of token `id` in this rank's shard, if it has it.
    pub fn local_token(&self, id: usize) -> Option<usize> {
        id.checked_sub(self.vocab_start)
            .filter(|&row| row < self.vp)
    }
}

/// The sizes of a linear layer applied to `rows` vectors: `out (rows, out) = inp (rows, in)
/// @ weight (out, in)^T + bias (out)`, with PyTorch's `(out, in)` weight layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// AdamW's hyperparameters for one step (see `crate::optim`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay for this tensor (0 for biases and LayerNorm).
    pub weight_decay: f32,
    /// `1 - beta1^t` and `1 - beta2^t` for this step `t` (1-based).
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    /// Multiplies every gradient before use: gradient clipping and loss-scale removal.
    pub grad_scale: f32,
}

/// The table `rope_fwd` reads: row p (0..t) holds cos then sin of p * inv_freq[j], j < hs/2,
/// with inv_freq[j] = 1 / theta^(2j / hs), computed in f32 the way Hugging Face's
/// LlamaRotaryEmbedding (default rope type) does, so our rotations match its to the last bits.
///
/// As there: the exponent `2j / hs` is an f32 division, the power and its reciprocal are f32,
/// and the angle is the f32 product `p * inv_freq[j]` (near p = 8191 its rounding moves the
/// angle by up to 2.4e-4 rad, so a table made in f64 would not match). The cosine and sine of that f32
/// angle are taken in f64 and rounded once: the correctly rounded value, which PyTorch's f32
/// cos/sin (within 1 ulp) give too except in rare last-bit cases.
pub fn rope_table(t: usize, hs: usize, theta: f64) -> Vec<f32> {
    let half = hs / 2;
    let base = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0 / base.powf((2 * j) as f32 / hs as f32))
        .collect();
    let mut table = vec![0.0f32; t * hs];
    for (p, row) in table.chunks_mut(hs.max(1)).enumerate().take(t) {
        for (j, &freq) in inv_freq.iter().enumerate() {
            let angle = (p as f32 * freq) as f64;
            row[j] = angle.cos() as f32;
            row[half + j] = angle.sin() as f32;
        }
    }
    table
}

/// The kernels of our model families on one device. See the module docs for the conventions.
pub trait Backend: Sized {
    /// Bytes allocated for the arena of `place`.
    fn arena_bytes(&self, place: Place) -> usize;

    /// The memory of `t` as a communicator sees it (host or device addresses). Collectives
    /// write it from another thread, so the caller must not pass `t` to a kernel until the
    /// collective has finished. A device whose kernels run asynchronously first waits for
    /// every kernel queued so far, so the collective reads finished data.
    fn comm_buf(&self, t: Tensor) -> CommBuf;

    /// Device memory in use as the device itself reports it (the arena plus what the runtime
    /// takes: CUDA context, library workspaces), or `None` where it cannot be measured (CPU).
    fn measured_device_bytes(&self) -> Option<u64> {
        None
    }

    /// The device's peak dense FLOP/s in the training dtype, for MFU; `None` when unknown.
    fn peak_flops(&self) -> Option<f64> {
        None
    }

    // --- host <-> arena ---

    /// Converts `src` to `dst`'s float dtype and stores it.
    fn write(&mut self, dst: Tensor, src: &[f32]) -> Result<()>;
    /// Stores token ids into an i32 tensor.
    fn write_i32(&mut self, dst: Tensor, src: &[i32]) -> Result<()>;
    /// Loads a float tensor as f32.
    fn read(&self, src: Tensor, dst: &mut [f32]) -> Result<()>;
    /// Stores raw bytes (`dst.bytes()` of them): checkpoints restore exact bits.
    fn write_bytes(&mut self, dst: Tensor, src: &[u8]) -> Result<()>;
    /// Loads raw bytes (`src.bytes()` of them).
    fn read_bytes(&self, src: Tensor, dst: &mut [u8]) -> Result<()>;

    // --- element-wise ---

    /// `dst = value` for every element.
    fn fill(&mut self, dst: Tensor, value: f32) -> Result<()>;
    /// `dst = src`, converting between float dtypes.
    fn copy(&mut self, dst: Tensor, src: Tensor) -> Result<()>;
    /// `dst *= factor`.
    fn scale(&mut self, dst: Tensor, factor: f32) -> Result<()>;
    /// `dst += src` (same dtype and length: a reduced gradient shard into the accumulated one).
    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()>;
    /// `out = a + b` (the residual connection).
    fn residual_fwd(&mut self, out: Tensor, a: Tensor, b: Tensor) -> Result<()>;

    // --- embedding ---

    /// `out (b t, c) = wte[tokens] + wpe[position]`. `tokens (b t)` i32 (ids below `dims.v`),
    /// `wte (vp, c)` the shard of ids `dims.vocab_start..`: a token outside it contributes 0
    /// (tensor-parallel ranks sum their outputs). `wpe (t_max, c)` is added when given.
    fn embedding_fwd(
        &mut self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        dims: Dims,
    ) -> Result<()>;
    /// `dwte[tokens] += dout` for the tokens in this rank's shard, `dwpe[position] += dout`
    /// when given.
    fn embedding_bwd(
        &mut self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        dims: Dims,
    ) -> Result<()>;

    // --- LayerNorm over the last dim, eps 1e-5 ---

    /// `out (rows, c) = (inp - mean) * rstd * weight + bias`, saving `mean (rows)` and
    /// `rstd (rows)` (f32).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &mut self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()>;
    /// `dinp += ...` (the residual stream), `dweight += ...`, `dbias += ...`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dbias: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()>;

    // --- matmul ---

    /// `out (rows, out) = inp (rows, in) @ weight (out, in)^T + bias (out)`.
    fn matmul_fwd(
        &mut self,
        out: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        shape: Linear,
    ) -> Result<()>;
    /// `dinp = dout @ weight` (skipped when `None`), `dweight += dout^T @ inp`,
    /// `dbias += sum over rows of dout`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd(
        &mut self,
        dinp: Option<Tensor>,
        dweight: Tensor,
        dbias: Option<Tensor>,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        shape: Linear,
    ) -> Result<()>;

    // --- causal self-attention, flash-style: no (t, t) matrix is kept ---

    /// `out (b t, nh hs)` from `qkv (b t, (nh + 2 nkv) hs)` laid out `[q: nh hs | k: nkv hs |
    /// v: nkv hs]` (with `nkv == nh`, GPT-2's `[q | k | v]`), query head h attending with
    /// key/value head h / (nh / nkv), scale `1/sqrt(hs)`, saving the log-sum-exp of each query
    /// row, `lse (b t, nh)` (f32).
    fn attention_fwd(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, dims: Dims) -> Result<()>;
    /// `dqkv = ...` (same layout as `qkv`) from `dout`, recomputing probabilities from `qkv`
    /// and `lse`; a key/value head's gradient sums over the query heads of its group, in head
    /// order. `delta (b t, nh)` (f32) is scratch for `rowsum(dout * out)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &mut self,
        dqkv: Tensor,
        delta: Tensor,
        dout: Tensor,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dims: Dims,
    ) -> Result<()>;

    // --- RMSNorm over the last dim (Llama; Hugging Face's LlamaRMSNorm, computed in f32) ---

    /// `out (rows, c) = inp * rstd * weight`, saving `rstd (rows)` (f32) = 1 / sqrt(mean(inp^2)
    /// + eps). `weight (c)`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(
        &mut self,
        out: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dinp += ...` (the residual stream, like `layernorm_bwd`), `dweight += ...`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &mut self,
        dinp: Tensor,
        dweight: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()>;

    // --- rotary position embeddings, Hugging Face's rotate-half layout ---

    /// In place on the query and key heads of `qkv (b t, (nh + 2 nkv) hs)` (attention's
    /// layout): for each head vector x of a token at position p (its row index mod t) and j <
    /// hs/2, (x[j], x[j + hs/2]) <- (x[j] cos - x[j + hs/2] sin, x[j + hs/2] cos + x[j] sin),
    /// with cos = table[p * hs + j], sin = table[p * hs + hs/2 + j]. The value heads are
    /// untouched. `table (t_max >= t, hs)` is f32 (see [`rope_table`]); `hs` is even.
    fn rope_fwd(&mut self, qkv: Tensor, table: Tensor, dims: Dims) -> Result<()>;
    /// In place on the query and key gradients of `dqkv` (same layout): the transposed
    /// rotation (angle -p θ), which is the gradient of `rope_fwd`. Value gradients untouched.
    fn rope_bwd(&mut self, dqkv: Tensor, table: Tensor, dims: Dims) -> Result<()>;

    // --- SwiGLU ---

    /// `out (rows, f) = silu(gate) * up` where each row of `inp (rows, 2f)` is `[gate (f) | up
    /// (f)]`, `silu(x) = x / (1 + e^-x)`.
    fn swiglu_fwd(&mut self, out: Tensor, inp: Tensor, f: usize) -> Result<()>;
    /// Overwrites `dinp (rows, 2f)` = `[dgate | dup]` from `dout (rows, f)` and `inp`.
    fn swiglu_bwd(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, f: usize) -> Result<()>;

    /// Decoding with the kept `q|k|v` as the key/value cache: `out (b, nh hs)` is each
    /// sequence's attention of the queries in its row `pos` of `qkv (b t, (nh + 2 nkv) hs)`
    /// over the keys and values of its rows `0..=pos`, scale `1/sqrt(hs)` (row `pos` of a
    /// causal `attention_fwd`, without recomputing the rows before it).
    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, dims: Dims) -> Result<()>;

    // --- GELU, tanh approximation ---

    /// `out = gelu(inp)`.
    fn gelu_fwd(&mut self, out: Tensor, inp: Tensor) -> Result<()>;
    /// In place: `dinout = dinout * gelu'(inp)`.
    fn gelu_bwd(&mut self, dinout: Tensor, inp: Tensor) -> Result<()>;

    // --- fused softmax cross-entropy over one chunk of rows ---

    /// In place: `logits (rows, vp)` become `dlogits = (softmax - onehot(target)) * dloss`
    /// over the real vocabulary (padding columns get 0). Writes `losses (rows)` (f32, the
    /// unscaled `-log p[target]`) and the row statistics `max`, `sumexp` (f32). `targets
    /// (rows)` i32.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_fwd_bwd(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()>;

    // --- the same, with the vocabulary split over tensor-parallel ranks ---
    //
    // Each rank holds the logits of its vocabulary shard (`dims.vocab_start..`); between the
    // steps the caller all-reduces over the ranks: `max` with Max after step 1, `sumexp` and
    // `losses` with Sum after step 2. Together they compute what `crossentropy_fwd_bwd` does,
    // without any rank holding a whole row of logits.

    /// Step 1: `max (rows)` = each row's largest logit among this rank's real tokens.
    fn crossentropy_max(&mut self, logits: Tensor, max: Tensor, dims: Dims) -> Result<()>;
    /// Step 2, `max` being the maximum over every rank: `sumexp (rows)` = the sum of `exp(l -
    /// max)` over this rank's real tokens; `losses (rows)` = the target's logit where this rank
    /// holds the target, else 0.
    fn crossentropy_sumexp(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()>;
    /// Step 3, `sumexp` and `losses` summed over every rank: `losses = max + ln(sumexp) -
    /// losses` (in place), and the logits become `(softmax - onehot(target)) * dloss`, 0 in the
    /// padding.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_finish(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dloss: f32,
        dims: Dims,
    ) -> Result<()>;

    // --- optimizer ---

    /// Sum of squares of `grads` (its float dtype), accumulated in f64 on the host: the
    /// gradient norm's contribution of one tensor.
    fn sum_squares(&mut self, grads: Tensor, partials: Tensor) -> Result<f64>;
    /// One AdamW step on a flat buffer: updates `master` (f32) when present, else `param`
    /// (then f32), and the moments `m`, `v` (f32); stores the result in `param`'s dtype. With
    /// `grad` `None` the gradient is read from `param` itself, which then receives the new
    /// weights (optimizer offload: one host staging buffer carries the gradient down and the
    /// weights back up; needs `master`).
    fn adamw(
        &mut self,
        param: Tensor,
        master: Option<Tensor>,
        m: Tensor,
        v: Tensor,
        grad: Option<Tensor>,
        hyper: AdamW,
    ) -> Result<()>;
}
