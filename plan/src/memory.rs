//! The exact per-rank memory plan: every buffer a worker allocates, in bytes.
//!
//! A plan is an ordered table of [`Region`]s per pipeline stage (ranks of one stage are
//! identical: tensor shards are equal because the vocabulary is padded and tokens split evenly,
//! ZeRO shards because units are padded to a multiple of the data degree). The worker's arena
//! (issue 4) makes one allocation per device and hands out views by region name, and startup
//! checks that what it allocated equals [`StagePlan::device_bytes`]. The dry-run prints the same
//! table, so the dry-run is the allocation, not an estimate.
//!
//! Model notation used in the formulas below, per microbatch on one rank:
//! `b` micro_batch, `T` seq_len, `C` hidden, `F` ffn_hidden, `H` heads, `t` tensor degree,
//! `N = b T` tokens, `n` tokens held outside attention/MLP (`N / t` under sequence parallelism,
//! else `N`), `V` padded vocabulary. Activations are stored in the compute dtype (bf16, fp16 or
//! fp32); LayerNorm statistics, log-sum-exps and losses always in fp32.

use std::ops::Range;

use crate::config::{Backend, Config, Device, Precision, Zero};
use crate::error::Result;
use crate::mesh::Mesh;
use crate::model::{ActDims, Architecture, FinalNorm, ModelShape, PARAM_ALIGN, Unit, UnitKind};
use crate::schedule::{InFlight, in_flight};

/// Every region (and every instance of a repeated region) starts on this many bytes: what
/// `cudaMalloc` guarantees and cuBLASLt prefers.
pub const ALIGN: u64 = 256;

/// Target size of one chunk of logits in the fused LM-head/cross-entropy: logits are produced,
/// turned into loss and gradient, and consumed chunk by chunk, never all at once.
pub const LOGITS_CHUNK_BYTES: u64 = 128 << 20;

/// fp32 partial sums for the global gradient norm (one per GPU thread block / CPU thread).
pub const NORM_PARTIALS: u64 = 1024;

/// Device memory a CUDA context takes before any allocation: measured on an H100 80GB with
/// driver 580.159 and CUDA 13.0, lazy module loading (bench/gpu_runtime; 527 MiB). Other
/// drivers and GPUs differ by tens of MiB, so the row stays marked as an estimate.
pub const CUDA_CONTEXT_BYTES: u64 = 552_402_944;

/// The workspace cudarc's `CudaBlasLT::new` allocates (exact, see shared/GPU.md).
pub const CUBLASLT_WORKSPACE_BYTES: u64 = 32 << 20;

/// Device memory `cublasLtCreate` takes with lazy module loading (bench/gpu_runtime: 2 MiB).
pub const CUBLASLT_HANDLE_BYTES: u64 = 2 << 20;

/// Device memory of the worker's own kernels once loaded: the seven cubins for sm_90 are 3.8 MB
/// (`tessera-worker kernels --arch sm_90` prints each); rounded up, as the driver pads code.
pub const KERNELS_BYTES: u64 = 5 << 20;

/// Device memory each NCCL communicator takes: measured for a second single-rank communicator
/// with NCCL 2.28 on an H100 (bench/gpu_runtime; 388 MiB). Communicators of more ranks size
/// their channel buffers by topology, so this stays an estimate until the worker measures it.
pub const NCCL_COMMUNICATOR_BYTES: u64 = 406_847_488;

/// Device memory NCCL takes once per process with its first communicator (its kernels and
/// shared state): the first communicator's 584 MiB less the second's, measured as above.
pub const NCCL_LIBRARY_BYTES: u64 = 205_520_896;

/// What a region holds, as the dry-run groups it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Model weights in the compute dtype.
    Params,
    Grads,
    /// fp32 master weights (mixed precision).
    Master,
    /// Adam's first and second moments, fp32.
    Optimizer,
    /// Tensors saved by forward for backward, per microbatch in flight.
    Activations,
    /// Transient buffers of one forward or backward at a time (the largest op's needs).
    Workspace,
    /// Communication buffers: ZeRO gather/reduce buckets, offload staging.
    Comm,
    /// CUDA context, library workspaces and NCCL's own buffers (outside the arena).
    Runtime,
    /// Host staging of asynchronous checkpoints (host memory only).
    Checkpoint,
}

impl Category {
    pub const ALL: [Category; 9] = [
        Category::Params,
        Category::Grads,
        Category::Master,
        Category::Optimizer,
        Category::Activations,
        Category::Workspace,
        Category::Comm,
        Category::Runtime,
        Category::Checkpoint,
    ];

    /// The categories that can have device memory, the columns of a device table: all but the
    /// last, `Checkpoint`, which is host memory only.
    pub const DEVICE: &[Category] = Category::ALL.split_at(Category::ALL.len() - 1).0;

    /// The key used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Category::Params => "params",
            Category::Grads => "grads",
            Category::Master => "master",
            Category::Optimizer => "optimizer",
            Category::Activations => "activations",
            Category::Workspace => "workspace",
            Category::Comm => "comm",
            Category::Runtime => "runtime",
            Category::Checkpoint => "checkpoint",
        }
    }
}

/// Which memory a region lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// The device's memory (the GPU; the worker's own RAM on CPU).
    Device,
    /// Pinned host memory (CPU offload).
    Host,
}

/// Element type of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    I32,
    U8,
}

impl Dtype {
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::I32 => "i32",
            Dtype::U8 => "u8",
        }
    }

    fn compute(precision: Precision) -> Dtype {
        match precision {
            Precision::Bf16 => Dtype::Bf16,
            Precision::Fp16 => Dtype::F16,
            Precision::Fp32 => Dtype::F32,
        }
    }
}

/// How many instances of a region a rank holds, and what indexes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Per {
    /// One buffer.
    Rank,
    /// One per transformer layer on this rank, indexed by its position on the rank.
    Layer(usize),
    /// One per activation slot: a microbatch in flight through one model chunk.
    Slot(usize),
    /// One per (slot, layer of a chunk), indexed `slot * layers + layer`.
    SlotLayer { slots: usize, layers: usize },
    /// Interchangeable copies (double buffering).
    Copies(usize),
}

impl Per {
    pub fn count(self) -> u64 {
        match self {
            Per::Rank => 1,
            Per::Layer(n) | Per::Slot(n) | Per::Copies(n) => n as u64,
            Per::SlotLayer { slots, layers } => (slots * layers) as u64,
        }
    }
}

/// One row of the plan: a named buffer (or array of equal buffers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: &'static str,
    pub category: Category,
    pub place: Place,
    pub dtype: Dtype,
    /// Elements of one instance.
    pub elems: u64,
    pub per: Per,
    /// Sized by an estimate rather than by the model (runtime rows the worker measures).
    pub estimated: bool,
}

impl Region {
    /// Bytes of one instance, rounded up to [`ALIGN`].
    pub fn bytes_each(&self) -> u64 {
        self.elems
            .saturating_mul(self.dtype.size())
            .div_ceil(ALIGN)
            .saturating_mul(ALIGN)
    }

    /// Bytes of all instances.
    pub fn bytes(&self) -> u64 {
        self.bytes_each().saturating_mul(self.per.count())
    }

    /// Bytes lost to alignment over all instances.
    pub fn padding(&self) -> u64 {
        let unpadded = self.elems.saturating_mul(self.dtype.size());
        (self.bytes_each() - unpadded).saturating_mul(self.per.count())
    }
}

/// Everything one rank of a pipeline stage allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub pp_rank: usize,
    /// The layers of each of this stage's model chunks, in chunk order.
    pub layers: Vec<Range<usize>>,
    /// Parameter elements on each rank of this stage (its tensor shard of its units, before
    /// ZeRO): the Ψ of the ZeRO formulas.
    pub params: u64,
    /// Microbatches whose activations the schedule keeps at once.
    pub in_flight: InFlight,
    pub regions: Vec<Region>,
}

impl StagePlan {
    /// Bytes of one category in one place.
    pub fn bytes(&self, place: Place, category: Category) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.place == place && r.category == category)
            .fold(0u64, |sum, r| sum.saturating_add(r.bytes()))
    }

    /// Everything on the device: what must fit in `gpu_memory` less headroom.
    pub fn device_bytes(&self) -> u64 {
        self.total(Place::Device)
    }

    pub fn host_bytes(&self) -> u64 {
        self.total(Place::Host)
    }

    fn total(&self, place: Place) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.place == place)
            .fold(0u64, |sum, r| sum.saturating_add(r.bytes()))
    }

    /// Device bytes that are alignment padding rather than elements.
    pub fn device_padding(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.place == Place::Device)
            .map(Region::padding)
            .sum()
    }

    /// The device category with the most bytes.
    pub fn largest_category(&self) -> Category {
        Category::ALL
            .into_iter()
            .max_by_key(|&c| self.bytes(Place::Device, c))
            .expect("invariant: there are categories")
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The plan of every rank of pipeline stage `pp_rank`.
    pub fn new(config: &Config, pp_rank: usize) -> StagePlan {
        Builder::new(config, pp_rank).build()
    }
}

/// The plan of every rank of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub mesh: Mesh,
    pub shape: ModelShape,
    /// Device memory of one rank (`cluster.gpu_memory`).
    pub capacity: u64,
    /// What a rank may use: capacity less the headroom.
    pub usable: u64,
    /// One plan per pipeline stage, indexed by `pp_rank`.
    pub stages: Vec<StagePlan>,
}

impl MemoryPlan {
    pub fn new(config: &Config) -> MemoryPlan {
        MemoryPlan {
            mesh: Mesh::from_config(config),
            shape: ModelShape::new(&config.model, config.parallel.tensor),
            capacity: config.cluster.gpu_memory,
            usable: config.cluster.usable_memory(),
            stages: (0..config.parallel.pipeline)
                .map(|s| StagePlan::new(config, s))
                .collect(),
        }
    }

    /// The plan of `rank`.
    pub fn rank(&self, rank: usize) -> Result<&StagePlan> {
        let coord = self.mesh.coord(rank)?;
        Ok(&self.stages[coord.pp_rank])
    }

    /// The stage with the largest device total (the first such stage).
    pub fn peak_stage(&self) -> &StagePlan {
        self.stages
            .iter()
            .rev()
            .max_by_key(|s| s.device_bytes())
            .expect("invariant: a job has at least one stage")
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_stage().device_bytes()
    }

    pub fn fits(&self) -> bool {
        self.peak_bytes() <= self.usable
    }

    /// Stages whose ranks exceed the usable memory.
    pub fn over_budget(&self) -> impl Iterator<Item = &StagePlan> {
        self.stages
            .iter()
            .filter(|s| s.device_bytes() > self.usable)
    }
}

/// Model-state buffers kept per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Params,
    Grads,
    Master,
    AdamM,
    AdamV,
    /// Host staging for offload: gradients go down, updated weights come back up.
    Staging,
}

fn state_name(state: State, unit: UnitKind) -> &'static str {
    use State::*;
    use UnitKind::*;
    match (state, unit) {
        (Params, Embedding) => "params.embedding",
        (Params, Layer) => "params.layer",
        (Params, Head) => "params.head",
        (Grads, Embedding) => "grads.embedding",
        (Grads, Layer) => "grads.layer",
        (Grads, Head) => "grads.head",
        (Master, Embedding) => "master.embedding",
        (Master, Layer) => "master.layer",
        (Master, Head) => "master.head",
        (AdamM, Embedding) => "adam_m.embedding",
        (AdamM, Layer) => "adam_m.layer",
        (AdamM, Head) => "adam_m.head",
        (AdamV, Embedding) => "adam_v.embedding",
        (AdamV, Layer) => "adam_v.layer",
        (AdamV, Head) => "adam_v.head",
        (Staging, Embedding) => "offload.embedding",
        (Staging, Layer) => "offload.layer",
        (Staging, Head) => "offload.head",
    }
}

struct Builder<'a> {
    config: &'a Config,
    shape: ModelShape,
    pp_rank: usize,
    arch: &'static Architecture,
    compute: Dtype,
    dims: ActDims,
    regions: Vec<Region>,
}

impl<'a> Builder<'a> {
    fn new(config: &'a Config, pp_rank: usize) -> Builder<'a> {
        let parallel = &config.parallel;
        let tp = parallel.tensor as u64;
        let batch = config.training.micro_batch as u64;
        let seq = config.model.seq_len as u64;
        let tokens = batch * seq;
        let shape = ModelShape::new(&config.model, parallel.tensor);
        let model = &config.model;
        Builder {
            config,
            shape,
            pp_rank,
            arch: shape.architecture(),
            compute: Dtype::compute(config.training.precision),
            dims: ActDims {
                batch,
                seq,
                hidden: model.hidden as u64,
                ffn_local: model.ffn_hidden as u64 / tp,
                heads_local: model.heads as u64 / tp,
                q_local: (model.heads * model.head_dim) as u64 / tp,
                qkv_local: ((model.heads + 2 * model.kv_heads) * model.head_dim) as u64 / tp,
                tokens,
                tokens_held: if parallel.sequence_sharded() {
                    tokens / tp
                } else {
                    tokens
                },
            },
            regions: Vec::new(),
        }
    }

    fn add(
        &mut self,
        name: &'static str,
        category: Category,
        place: Place,
        dtype: Dtype,
        elems: u64,
        per: Per,
    ) {
        if elems > 0 && per.count() > 0 {
            self.regions.push(Region {
                name,
                category,
                place,
                dtype,
                elems,
                per,
                estimated: false,
            });
        }
    }

    fn add_estimate(&mut self, name: &'static str, bytes: u64, per: Per) {
        self.regions.push(Region {
            name,
            category: Category::Runtime,
            place: Place::Device,
            dtype: Dtype::U8,
            elems: bytes,
            per,
            estimated: true,
        });
    }

    fn build(mut self) -> StagePlan {
        let parallel = &self.config.parallel;
        let (p, v) = (parallel.pipeline, parallel.virtual_stages);
        let layers = parallel.stage_layers(self.config.model.layers, self.pp_rank);
        let layers_per_chunk = layers[0].len();
        let first_stage = self.pp_rank == 0;
        let last_stage = self.pp_rank == p - 1;
        let mut units = Vec::new();
        if first_stage {
            units.push((Unit::Embedding, Per::Rank));
        }
        units.push((Unit::Layer, Per::Layer(layers_per_chunk * v)));
        if last_stage {
            let tied_copy = p > 1 && self.shape.tie_embeddings;
            units.push((Unit::Head { tied_copy }, Per::Rank));
        }
        let in_flight = in_flight(
            parallel.schedule,
            p,
            v,
            self.config.microbatches(),
            self.pp_rank,
        );

        let params = self.model_states(&units);
        self.activations(&in_flight, layers_per_chunk, first_stage, last_stage);
        self.workspace(last_stage);
        self.communication(&units);
        self.checkpoint_staging();
        self.runtime((first_stage || last_stage) && self.shape.tie_embeddings);

        StagePlan {
            pp_rank: self.pp_rank,
            layers,
            params,
            in_flight,
            regions: self.regions,
        }
    }

    /// Parameters, gradients, master weights and Adam states of each unit on this rank.
    ///
    /// A unit of `U` elements (its flat buffer, see `plan::model`) is cut into `d` ZeRO shards
    /// of `S = ceil(U / d)` rounded up to `PARAM_ALIGN` elements:
    ///
    /// | ZeRO | params      | grads       | master, adam_m, adam_v |
    /// |------|-------------|-------------|------------------------|
    /// | 0    | U           | U           | U each                 |
    /// | 1    | S d         | S d         | S each                 |
    /// | 2    | S d         | S           | S each                 |
    /// | 3    | S           | S           | S each                 |
    ///
    /// params and grads are in the compute dtype, the rest fp32. With bf16 that is the
    /// (2 + 2 + 12)Ψ of ZeRO stage 0, 4Ψ + 12Ψ/d at stage 1, 2Ψ + 14Ψ/d at 2 and 16Ψ/d at 3.
    /// fp32 training keeps no separate master copy. Stages 1 and 2 keep params (and stage 1
    /// grads) at `S d` so that reduce-scatter and all-gather work in place. With optimizer
    /// offload the fp32 states live in host memory, with a host staging buffer of `S` in the
    /// compute dtype for the gradients going down and the weights coming back.
    fn model_states(&mut self, units: &[(Unit, Per)]) -> u64 {
        let parallel = &self.config.parallel;
        let dp = parallel.data as u64;
        let zero = parallel.zero;
        let offload = parallel.offload.optimizer;
        let master = self.config.training.precision.has_master_weights() || offload;
        let state_place = if offload { Place::Host } else { Place::Device };
        let mut params = 0u64;
        for &(unit, per) in units {
            let layout = self.shape.layout(unit);
            params = params.saturating_add(layout.numel().saturating_mul(per.count()));
            let whole = layout.elems;
            let shard = whole.div_ceil(dp).div_ceil(PARAM_ALIGN) * PARAM_ALIGN;
            let kind = unit.kind();
            let (param_elems, grad_elems, state_elems) = match zero {
                Zero::Off => (whole, whole, whole),
                Zero::Optimizer => (shard * dp, shard * dp, shard),
                Zero::Gradients => (shard * dp, shard, shard),
                Zero::Parameters => (shard, shard, shard),
            };
            let compute = self.compute;
            let rows = [
                (
                    State::Params,
                    Category::Params,
                    Place::Device,
                    compute,
                    param_elems,
                    true,
                ),
                (
                    State::Grads,
                    Category::Grads,
                    Place::Device,
                    compute,
                    grad_elems,
                    true,
                ),
                (
                    State::Master,
                    Category::Master,
                    state_place,
                    Dtype::F32,
                    state_elems,
                    master,
                ),
                (
                    State::AdamM,
                    Category::Optimizer,
                    state_place,
                    Dtype::F32,
                    state_elems,
                    true,
                ),
                (
                    State::AdamV,
                    Category::Optimizer,
                    state_place,
                    Dtype::F32,
                    state_elems,
                    true,
                ),
                (
                    State::Staging,
                    Category::Comm,
                    Place::Host,
                    compute,
                    state_elems,
                    offload,
                ),
            ];
            for (state, category, place, dtype, elems, kept) in rows {
                if kept {
                    self.add(state_name(state, kind), category, place, dtype, elems, per);
                }
            }
        }
        params
    }

    /// Tensors forward keeps for backward, for each microbatch in flight.
    ///
    /// Each layer keeps the tensors of the architecture's activation table (`plan::model`) that
    /// the recompute mode keeps, once per
    /// (slot, layer of a chunk); slots are the schedule's peak of microbatches in flight on this
    /// stage (1F1B stage `i` of `p`: `min(p - i, m)`; GPipe: `m`; interleaved: per chunk of
    /// `L/(p v)` layers). The first stage also keeps each microbatch's token ids (`N` int32) for
    /// the embedding's backward. The last stage runs the LM head and cross-entropy forward and
    /// backward in one fused pass, so it keeps the gradient of the last layer's output (`n C`)
    /// instead of the head's activations.
    fn activations(
        &mut self,
        in_flight: &InFlight,
        layers_per_chunk: usize,
        first: bool,
        last: bool,
    ) {
        let recompute = self.config.parallel.recompute;
        let slots = Per::SlotLayer {
            slots: in_flight.total,
            layers: layers_per_chunk,
        };
        for tensor in self
            .arch
            .layer_tensors
            .iter()
            .filter(|t| (t.kept)(recompute))
        {
            let dtype = if tensor.fp32 {
                Dtype::F32
            } else {
                self.compute
            };
            let elems = (tensor.elems)(&self.dims);
            self.add(
                tensor.saved,
                Category::Activations,
                Place::Device,
                dtype,
                elems,
                slots,
            );
        }
        if first {
            let per = Per::Slot(in_flight.per_chunk[0]);
            self.add(
                "act.tokens",
                Category::Activations,
                Place::Device,
                Dtype::I32,
                self.dims.tokens,
                per,
            );
        }
        if last {
            let per = Per::Slot(
                *in_flight
                    .per_chunk
                    .last()
                    .expect("invariant: at least one chunk"),
            );
            let elems = self.dims.tokens_held * self.dims.hidden;
            self.add(
                "act.dhead",
                Category::Activations,
                Place::Device,
                self.compute,
                elems,
                per,
            );
        }
    }

    /// Buffers used by one forward or backward at a time, sized for the largest use.
    ///
    /// - `scratch.btc` x2 (`N C`): one holds an all-gathered input (sequence parallelism) or a
    ///   gathered gradient, the other a matmul's partial output before its all-reduce or
    ///   reduce-scatter.
    /// - `scratch.stage_out` (`n C`): the stage's last layer output, sent on or fed to the head.
    /// - `scratch.dresid` (`n C`): the residual-stream gradient carried down through backward.
    /// - The architecture's layer scratch (`plan::model`): the activation gradients of one
    ///   layer's backward (gpt2: `scratch.dqkv`, `scratch.datty`, `scratch.dfch`,
    ///   `scratch.att_delta`).
    /// - `rope.table` (`T hs`, fp32): cos and sin of every position's rotary angles (llama).
    /// - `recompute.*`: one transient copy of each layer tensor the recompute mode does not keep.
    /// - Last stage: `data.targets` (`N` int32); the final norm's output and statistics
    ///   (`n C`, and `n` for the rstd and for LayerNorm's mean); one chunk of logits (`K V/t`
    ///   for a chunk of `K` tokens sized to `LOGITS_CHUNK_BYTES`) with its fp32 row max, sum
    ///   of exponentials and losses (`K` each).
    /// - `optim.norm_partials`: the gradient norm's partial sums.
    fn workspace(&mut self, last: bool) {
        let d = self.dims;
        let (compute, recompute) = (self.compute, self.config.parallel.recompute);
        let (full, held) = (d.tokens * d.hidden, d.tokens_held * d.hidden);
        let (tokens, held_tokens) = (d.tokens, d.tokens_held);
        self.add(
            "scratch.btc",
            Category::Workspace,
            Place::Device,
            compute,
            full,
            Per::Copies(2),
        );
        self.work("scratch.stage_out", compute, held);
        self.work("scratch.dresid", compute, held);
        let dtype = |fp32: bool| if fp32 { Dtype::F32 } else { compute };
        for tensor in self.arch.layer_scratch {
            self.work(tensor.region, dtype(tensor.fp32), (tensor.elems)(&d));
        }
        if self.arch.rope {
            let elems = (self.shape.seq_len * self.shape.head_dim) as u64;
            self.work("rope.table", Dtype::F32, elems);
        }
        for tensor in self
            .arch
            .layer_tensors
            .iter()
            .filter(|t| !(t.kept)(recompute))
        {
            self.work(tensor.recomputed, dtype(tensor.fp32), (tensor.elems)(&d));
        }
        if last {
            let vocab_local = (self.shape.vocab_padded / self.shape.tp) as u64;
            let chunk = logits_chunk_tokens(tokens, vocab_local, compute);
            self.work("data.targets", Dtype::I32, tokens);
            self.work("head.lnf", compute, held);
            if self.arch.final_norm == FinalNorm::LayerNorm {
                self.work("head.lnf_mean", Dtype::F32, held_tokens);
            }
            self.work("head.lnf_rstd", Dtype::F32, held_tokens);
            self.work("head.logits", compute, chunk * vocab_local);
            self.work("head.logit_max", Dtype::F32, chunk);
            self.work("head.logit_sumexp", Dtype::F32, chunk);
            self.work("head.losses", Dtype::F32, chunk);
        }
        self.work("optim.norm_partials", Dtype::F32, NORM_PARTIALS);
    }

    /// One device workspace buffer.
    fn work(&mut self, name: &'static str, dtype: Dtype, elems: u64) {
        self.add(
            name,
            Category::Workspace,
            Place::Device,
            dtype,
            elems,
            Per::Rank,
        );
    }

    /// ZeRO's buckets. Stages 2 and 3 produce each unit's full gradient in a bucket and
    /// reduce-scatter it into the rank's shard; stage 3 also all-gathers each unit's parameters
    /// into a gather buffer just before use. Both are double-buffered (the next unit's transfer
    /// overlaps this unit's compute) and sized for the largest unit on the rank. Stages 0 and 1
    /// reduce gradients in place. Pipeline transfers need no buffer of their own: activations
    /// are received straight into the slot of the next layer and sent from `scratch.stage_out`,
    /// gradients received into and sent from `scratch.dresid`.
    fn communication(&mut self, units: &[(Unit, Per)]) {
        let parallel = &self.config.parallel;
        let dp = parallel.data as u64;
        let largest = units
            .iter()
            .map(|&(unit, _)| {
                self.shape
                    .layout(unit)
                    .elems
                    .div_ceil(dp)
                    .div_ceil(PARAM_ALIGN)
                    * PARAM_ALIGN
                    * dp
            })
            .max()
            .unwrap_or(0);
        if parallel.zero >= Zero::Gradients {
            self.add(
                "zero.grad_bucket",
                Category::Comm,
                Place::Device,
                self.compute,
                largest,
                Per::Copies(2),
            );
        }
        if parallel.zero == Zero::Parameters {
            self.add(
                "zero.param_gather",
                Category::Comm,
                Place::Device,
                self.compute,
                largest,
                Per::Copies(2),
            );
        }
    }

    /// Host staging for asynchronous checkpoints, when the run saves any: a save copies the
    /// rank's parameters, master weights and Adam moments here (each buffer whole, at the
    /// offset it would have in a table of just those rows) and a background thread writes
    /// the rank's file from it while training goes on. Sized as the sum of those rows, wherever
    /// they live (offloaded states are copied too, as the optimizer updates them meanwhile).
    /// Every rank of a stage has it, though only the ranks that write a file use it (all of
    /// them under ZeRO; the first data-parallel rank of each coordinate without).
    fn checkpoint_staging(&mut self) {
        if self.config.checkpoint.every == 0 {
            return;
        }
        let bytes = self
            .regions
            .iter()
            .filter(|r| {
                matches!(
                    r.category,
                    Category::Params | Category::Master | Category::Optimizer
                )
            })
            .fold(0u64, |sum, r| sum.saturating_add(r.bytes()));
        self.add(
            "checkpoint.staging",
            Category::Checkpoint,
            Place::Host,
            Dtype::U8,
            bytes,
            Per::Rank,
        );
    }

    /// Memory outside the arena on a GPU: the CUDA context, cuBLASLt's handle and workspace,
    /// the worker's loaded kernels, and one NCCL communicator per group of more than one rank
    /// that this rank is in (tensor, pipeline, data, and the embedding group joining the first
    /// and last stage). None on CPU.
    fn runtime(&mut self, embedding_stage: bool) {
        if self.config.cluster.device != Device::Cuda {
            return;
        }
        self.add_estimate("runtime.cuda_context", CUDA_CONTEXT_BYTES, Per::Rank);
        self.add_estimate("runtime.cublaslt_handle", CUBLASLT_HANDLE_BYTES, Per::Rank);
        self.add_estimate("runtime.kernels", KERNELS_BYTES, Per::Rank);
        self.regions.push(Region {
            name: "runtime.cublaslt_workspace",
            category: Category::Runtime,
            place: Place::Device,
            dtype: Dtype::U8,
            elems: CUBLASLT_WORKSPACE_BYTES,
            per: Per::Rank,
            estimated: false,
        });
        if self.config.cluster.backend == Backend::Nccl {
            let parallel = &self.config.parallel;
            let groups = [parallel.tensor, parallel.pipeline, parallel.data]
                .iter()
                .filter(|&&degree| degree > 1)
                .count()
                + usize::from(embedding_stage && parallel.pipeline > 1);
            if groups > 0 {
                self.add_estimate("runtime.nccl_library", NCCL_LIBRARY_BYTES, Per::Rank);
                self.add_estimate("runtime.nccl", NCCL_COMMUNICATOR_BYTES, Per::Copies(groups));
            }
        }
    }
}

/// Tokens per chunk of the fused LM head: as many as fit in `LOGITS_CHUNK_BYTES` (a multiple
/// of 64 when there is room, for matmul-friendly shapes), at least 1, at most the microbatch.
fn logits_chunk_tokens(tokens: u64, vocab_local: u64, dtype: Dtype) -> u64 {
    let fit = LOGITS_CHUNK_BYTES / (vocab_local * dtype.size()).max(1);
    let fit = if fit >= 64 { fit / 64 * 64 } else { fit.max(1) };
    fit.min(tokens)
}

#[cfg(test)]
mod tests;
