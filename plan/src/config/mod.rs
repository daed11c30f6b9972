//! The YAML config: schema, defaults, `--set` overrides and validation.
//!
//! Reading goes `text -> RawConfig` (`raw`: serde, every key optional and tagged with where it
//! came from) `-> Config` (`validate`: defaults applied, every rule checked, no `Option` left).
//! Problems come back as [`Issue`]s naming the file, line and column (or the `--set` argument),
//! the key, what is wrong and how to fix it. This module does no I/O: the caller reads the file.

mod issue;
mod raw;
pub(crate) mod validate;

pub use issue::{Issue, Origin, did_you_mean};

use crate::error::{Error, Result};

/// Most ranks one job may have: beyond the largest clusters, and a bound on the dry-run's
/// output (one JSON entry per rank).
pub const MAX_RANKS: usize = 1 << 20;

/// A validated config: every default applied, every cross-key rule checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub model: Model,
    pub parallel: Parallel,
    pub training: Training,
    pub data: Data,
    pub cluster: Cluster,
    pub checkpoint: Checkpoint,
    pub restart: Restart,
    pub watchdog: Watchdog,
    pub eval: Eval,
    /// Things that are allowed but probably not meant (shown, never fatal).
    pub warnings: Vec<String>,
}

/// `model:` — the transformer's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention; `heads` without it). Divides `heads`.
    pub kv_heads: usize,
    /// Channels per head (default `hidden / heads`).
    pub head_dim: usize,
    /// The tokenizer's vocabulary; the embedding is padded beyond it (see `plan::model`).
    pub vocab: usize,
    pub seq_len: usize,
    pub ffn_hidden: usize,
    /// The normalisation's epsilon (LayerNorm for gpt2, RMSNorm for llama).
    pub norm_eps: f64,
    /// The rotary embedding's base (llama).
    pub rope_theta: f64,
    /// The LM head reads the token embedding's weights (gpt2's default) instead of its own.
    pub tie_embeddings: bool,
}

impl Model {
    /// A model of `arch` with the defaults of every optional key: `heads` key/value heads,
    /// `hidden / heads` channels per head, the family's epsilon, theta and tying.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        arch: Arch,
        layers: usize,
        hidden: usize,
        heads: usize,
        vocab: usize,
        seq_len: usize,
        ffn_hidden: usize,
    ) -> Model {
        Model {
            arch,
            layers,
            hidden,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            vocab,
            seq_len,
            ffn_hidden,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: arch == Arch::Gpt2,
        }
    }
}

/// `parallel:` — how ranks split the work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parallel {
    pub data: usize,
    pub tensor: usize,
    pub pipeline: usize,
    /// Model chunks per pipeline rank (interleaved 1F1B); 1 otherwise.
    pub virtual_stages: usize,
    /// Layers of each pipeline stage, when they are not split evenly (`pipeline_layers`).
    pub pipeline_layers: Option<Vec<usize>>,
    /// Shard LayerNorm/residual regions along the tokens across the tensor group. Only
    /// takes effect with `tensor > 1` (see [`Parallel::sequence_sharded`]).
    pub sequence_parallel: bool,
    pub zero: Zero,
    pub offload: Offload,
    pub recompute: Recompute,
    pub schedule: Schedule,
}

impl Parallel {
    pub fn world_size(&self) -> usize {
        self.data * self.tensor * self.pipeline
    }

    /// Whether activations outside attention/MLP are split along the tokens across the tensor
    /// group (sequence parallelism is a no-op at tensor 1).
    pub fn sequence_sharded(&self) -> bool {
        self.sequence_parallel && self.tensor > 1
    }

    /// The layers (of `layers` in all) of each model chunk of pipeline stage `pp_rank`, in
    /// chunk order: `pipeline_layers[pp_rank]` layers after the earlier stages' when given,
    /// else chunk `c` is virtual stage `c p + pp_rank` of `p v` equal ones.
    pub fn stage_layers(&self, layers: usize, pp_rank: usize) -> Vec<std::ops::Range<usize>> {
        if let Some(split) = &self.pipeline_layers {
            let first: usize = split[..pp_rank].iter().sum();
            return std::iter::once(first..first + split[pp_rank]).collect();
        }
        let (p, v) = (self.pipeline, self.virtual_stages);
        let per_chunk = layers / (p * v);
        (0..v)
            .map(|chunk| {
                let first = (chunk * p + pp_rank) * per_chunk;
                first..first + per_chunk
            })
            .collect()
    }
}

/// ZeRO stage: what data-parallel ranks shard between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Zero {
    /// Nothing sharded; gradients are all-reduced.
    Off = 0,
    /// fp32 master weights and optimizer states sharded.
    Optimizer = 1,
    /// ... and gradients.
    Gradients = 2,
    /// ... and parameters, gathered layer by layer when used.
    Parameters = 3,
}

impl Zero {
    pub const ALL: [Zero; 4] = [
        Zero::Off,
        Zero::Optimizer,
        Zero::Gradients,
        Zero::Parameters,
    ];

    pub fn stage(self) -> u8 {
        self as u8
    }
}

/// `parallel.offload:` — what lives in host memory instead of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// fp32 master weights and Adam states in host memory, the AdamW step on the CPU.
    pub optimizer: bool,
}

/// `training:` — batch, precision, length and the optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Training {
    /// Sequences per optimizer step, over all data-parallel ranks.
    pub global_batch: usize,
    /// Sequences per forward/backward on one rank.
    pub micro_batch: usize,
    pub precision: Precision,
    pub steps: u64,
    pub seed: u64,
    pub optimizer: Optimizer,
}

/// `training.optimizer:` — AdamW with warmup and cosine decay.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub grad_clip: f64,
}

/// `data:` — where training tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A deterministic, learnable token sequence generated from the seed.
    Synthetic,
    /// llm.c-format `.bin` token shards (a path or a glob).
    Tokens { path: String },
    /// UTF-8 text read byte by byte (vocabulary 256).
    Text { path: String },
    /// Datasets of one kind (`Tokens` or `Text`) blended by weight (`data.sources`).
    Blend { sources: Vec<(Data, f64)> },
}

/// `eval:` — the loss on held-out data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eval {
    /// Steps between evaluations (and after the last step); 0 evaluates never.
    pub every: u64,
    /// Global batches of held-out sequences per evaluation: the same sequences every time.
    pub batches: usize,
    /// Where the held-out data is (the same kind as `data`); `None`: the held-out split of the
    /// data itself (a prepared directory's validation shards, or synthetic data's own).
    pub path: Option<String>,
}

/// `cluster:` — the machines.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub nodes: usize,
    /// Devices per node (workers per node on CPU).
    pub gpus_per_node: usize,
    /// Memory of one device in bytes (per worker on CPU).
    pub gpu_memory: u64,
    pub backend: Backend,
    pub device: Device,
    pub hostfile: Option<String>,
    /// Fraction of each device kept free: a plan fits when its peak is at most
    /// `gpu_memory * (1 - headroom)`.
    pub headroom: f64,
    /// TLS with mutual authentication on the control plane; None: plain text.
    pub tls: Option<Tls>,
}

/// `cluster.tls:` — the head's PEM files, paths relative to the directory `launch` runs in
/// (like every path of the config). The launcher reads and checks them; this crate does no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA certificate every node trusts (`ca.pem` of `launch certs`).
    pub ca: String,
    /// The head's certificate (`HOST.pem`): the coordinator presents it, and a run on one
    /// machine's workers present it too.
    pub cert: String,
    /// Its private key (`HOST-key.pem`).
    pub key: String,
}

impl Cluster {
    pub fn world_size(&self) -> usize {
        self.nodes * self.gpus_per_node
    }

    /// Bytes a rank may plan to use: capacity less the headroom.
    pub fn usable_memory(&self) -> u64 {
        (self.gpu_memory as f64 * (1.0 - self.headroom)).floor() as u64
    }
}

/// `checkpoint:` — when and where to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub dir: String,
    /// Steps between checkpoints; 0 saves none.
    pub every: u64,
    /// How many complete checkpoints to keep.
    pub keep: usize,
}

/// `restart:` — what to do when a worker fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// Restarts from the newest checkpoint before the job gives up.
    pub max: u32,
    /// The fewest nodes a restart may go on with after nodes are lost (fewer data-parallel
    /// replicas, same global batch); `cluster.nodes` (the default) waits for replacements.
    pub min_nodes: usize,
}

/// `watchdog:` — how a failure is noticed. Every duration is in seconds in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watchdog {
    /// Between two heartbeats of a worker (they come from their own thread, also mid-step).
    pub heartbeat: std::time::Duration,
    /// Silence after which a worker counts as hung (or stopped) and the job fails.
    pub heartbeat_timeout: std::time::Duration,
    /// How long a collective waits for a silent peer before the rank fails, naming it.
    pub collective_timeout: std::time::Duration,
    /// How long the coordinator waits for every rank (and node) to register.
    pub rendezvous_timeout: std::time::Duration,
}

impl Config {
    /// Reads the YAML `text` of the config file named `path`, applies each `--set key=value` in
    /// `sets` in order, fills in defaults and validates everything.
    pub fn from_yaml(path: &str, text: &str, sets: &[String]) -> Result<Config> {
        validate::from_yaml(path, text, sets).map_err(|issues| Error::InvalidConfig { issues })
    }

    /// Sequences per microbatch times microbatches per step on one data-parallel rank.
    pub fn microbatches(&self) -> usize {
        self.training.global_batch / (self.parallel.data * self.training.micro_batch)
    }

    /// Tokens processed by one optimizer step over the whole job.
    pub fn tokens_per_step(&self) -> u64 {
        (self.training.global_batch * self.model.seq_len) as u64
    }
}

/// A config enum: a closed set of names as written in YAML.
pub trait Choice: Copy + PartialEq + 'static {
    /// The names, in the order messages list them.
    const NAMES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, value)| *value == self)
            .map(|(name, _)| *name)
            .expect("invariant: every variant has a name")
    }

    /// The value for a name, ignoring case.
    fn parse(text: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
            .map(|(_, value)| *value)
    }

    /// "a, b or c".
    fn listing() -> String {
        let names: Vec<&str> = Self::NAMES.iter().map(|(name, _)| *name).collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        }
    }
}

macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $( $(#[$vmeta])* $variant, )* }

        impl Choice for $name {
            const NAMES: &'static [(&'static str, Self)] = &[$( ($text, $name::$variant), )*];
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice!(
    /// `model.arch`.
    Arch {
        /// GPT-2: learned positions, LayerNorm, GELU MLP, tied embeddings, biases.
        Gpt2 = "gpt2",
        /// Llama (Llama 2/3, DeepSeek-LLM, Mistral): RMSNorm, rotary positions, SwiGLU MLP,
        /// grouped-query attention, no biases, an untied LM head.
        Llama = "llama",
    }
);

choice!(
    /// `parallel.recompute`: what backward recomputes instead of keeping from forward, in
    /// increasing order of recomputation.
    Recompute {
        /// Keep every activation backward needs.
        None = "none",
        /// Recompute the cheap element-wise outputs (LayerNorm outputs, GELU) from what is kept.
        Selective = "selective",
        /// Keep only each layer's input; recompute the whole layer in backward.
        Full = "full",
    }
);

choice!(
    /// `parallel.schedule`: the pipeline schedule.
    Schedule {
        /// All forwards, then all backwards.
        Gpipe = "gpipe",
        /// One forward, one backward (PipeDream-flush / Megatron's default).
        OneFOneB = "1f1b",
        /// 1F1B over `virtual_stages` model chunks per rank (Megatron's interleaved schedule).
        Interleaved = "interleaved",
    }
);

choice!(
    /// `training.precision`: the dtype of parameters, gradients and activations.
    Precision {
        /// bfloat16 compute with fp32 master weights.
        Bf16 = "bf16",
        /// float16 compute with fp32 master weights and loss scaling.
        Fp16 = "fp16",
        /// float32 throughout (no separate master copy).
        Fp32 = "fp32",
    }
);

choice!(
    /// `cluster.backend`: how ranks exchange tensors.
    Backend {
        Nccl = "nccl",
        /// Ring collectives over TCP sockets (CPU workers, or GPUs staged through the host).
        Tcp = "tcp",
    }
);

choice!(
    /// `cluster.device`.
    Device {
        Cuda = "cuda",
        Cpu = "cpu",
    }
);

choice!(
    /// `data.kind`.
    DataKind {
        Synthetic = "synthetic",
        Tokens = "tokens",
        Text = "text",
    }
);

impl Recompute {
    /// "no recompute", "selective recompute", "full recompute".
    pub fn describe(self) -> &'static str {
        match self {
            Recompute::None => "no recompute",
            Recompute::Selective => "selective recompute",
            Recompute::Full => "full recompute",
        }
    }
}

impl Precision {
    /// Bytes of one parameter, gradient or activation element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Bf16 | Precision::Fp16 => 2,
            Precision::Fp32 => 4,
        }
    }

    /// Whether a separate fp32 master copy of the weights is kept for the optimizer.
    pub fn has_master_weights(self) -> bool {
        self != Precision::Fp32
    }
}

#[cfg(test)]
mod tests;
