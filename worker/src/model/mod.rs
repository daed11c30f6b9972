//! The model on one pipeline stage of one rank, written once against `Backend`, at local widths.
//!
//! An architecture is one file here (`gpt2.rs`, `llama.rs`): its transformer layer's forward,
//! backward and recompute, behind [`Layers`], reading the handles of its parameters,
//! activations and scratch by the names of its tables in `tessera_plan::model`. Everything
//! else is the same for every architecture and lives in [`Stage`]: the token embedding, the
//! final norm and the fused LM head with its loss, activation slots and the input and output
//! of model chunks. Where each microbatch goes when (the pipeline schedule), where parameters
//! and gradients live (ZeRO, offload) and how partial results are combined over ranks are
//! outside the model: `crate::parallel` drives it, `crate::units` stores it, and the two
//! collectives of tensor-parallel regions come in through [`Regions`].
//!
//! A microbatch lives in an activation *slot* from its forward to its backward. Forward is the
//! same code in every recompute mode: the handles of tensors the mode does not keep point at
//! the shared `recompute.*` buffers, which backward refills first.

pub mod gpt2;
pub mod init;
pub mod llama;

use tessera_plan::Config;
use tessera_plan::config::{Arch, Recompute};
use tessera_plan::memory::StagePlan;
use tessera_plan::model::{FinalNorm, LayerTensor, ModelShape, Role, ScratchTensor};

use crate::arena::ArenaLayout;
use crate::comm::ReduceOp;
use crate::error::Result;
use crate::tensor::{Backend, Dims, Linear, Tensor};
use crate::units::Unit;

/// The two collectives at the edges of a tensor-parallel region (see `parallel::tensor`), and
/// the all-reduce the sharded cross-entropy combines its statistics with.
pub trait Regions<B: Backend> {
    /// The group's size, `t`.
    fn size(&self) -> usize;
    /// Whether this rank adds the terms that must count once in a partial sum (the bias of a
    /// row-parallel matmul, the position embedding).
    fn adds_replicated(&self) -> bool;
    /// Makes `held` (this rank's rows of the residual stream) whole, in `full` if need be.
    fn gather(&mut self, backend: &B, held: Tensor, full: Tensor) -> Result<Tensor>;
    /// Sums the partial outputs `partial` over the group; returns this rank's rows of the sum.
    fn reduce(&mut self, backend: &B, partial: Tensor) -> Result<Tensor>;
    /// `t` combined over the group with `op`, in place.
    fn all_reduce(&mut self, backend: &B, t: Tensor, op: ReduceOp) -> Result<()>;
}

/// One architecture's transformer layers on one rank: `l` is a layer's index among the rank's
/// layers, `i` its index within its chunk, `slot` the microbatch's activation slot.
pub trait Layers<B: Backend> {
    /// Reads layer `l`'s parameters from `buffer`, laid out like `unit`, from now on.
    fn point_params(&mut self, l: usize, unit: &Unit, buffer: Tensor);
    /// Accumulates layer `l`'s gradients into `buffer`, laid out like `unit`, from now on.
    fn point_grads(&mut self, l: usize, unit: &Unit, buffer: Tensor);
    /// Layer `i`'s input (the residual stream it keeps) for the microbatch in `slot`.
    fn input(&self, slot: usize, i: usize) -> Tensor;
    /// Forward into `out`. With `out = None` it stops before the last matmul: what `full`
    /// recompute needs to rebuild the layer's tensors.
    fn forward(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
        out: Option<Tensor>,
    ) -> Result<()>;
    /// Rebuilds the tensors the recompute mode did not keep.
    fn recompute(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
    ) -> Result<()>;
    /// Decoding (one sequence, one chunk, recompute `none`): layer `l`'s forward of the one
    /// token at position `pos`, from row `pos` of its input into row `pos` of `out` (the next
    /// layer's input or the stage output). Attention reads the kept `q|k|v` of rows `0..pos`
    /// (the key/value cache, written by the prompt's forward and by earlier steps).
    fn decode(&self, backend: &mut B, l: usize, pos: usize, out: Tensor) -> Result<()>;
    /// Backward from the gradient of the layer's output in `dresid` to its input's, in place.
    fn backward(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        l: usize,
        i: usize,
        dresid: Tensor,
    ) -> Result<()>;
}

/// The layers of `arch`: the one place that lists the architectures' layer code.
fn layers<B: Backend>(arch: Arch, build: &Build) -> Result<Box<dyn Layers<B>>> {
    Ok(match arch {
        Arch::Gpt2 => Box::new(gpt2::Gpt2::new(build)?),
        Arch::Llama => Box::new(llama::Llama::new(build)?),
    })
}

/// A set of handles an architecture resolves by the names of its tables (see [`handles!`]).
pub trait Named: Sized + Copy {
    /// Each field from `get(its name)`; `None` names what is missing.
    fn resolve(get: &dyn Fn(&'static str) -> Option<Tensor>) -> std::result::Result<Self, String>;
}

/// A struct of tensor handles and its [`Named`] implementation: required fields, then
/// `optional { .. }` ones (`Option<Tensor>`, present when the table has the row).
macro_rules! handles {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$fmeta:meta])* $field:ident ),* $(,)? }
        $( optional { $( $(#[$ometa:meta])* $opt:ident ),* $(,)? } )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $crate::tensor::Tensor, )*
            $( $( $(#[$ometa])* pub $opt: Option<$crate::tensor::Tensor>, )* )?
        }

        impl $crate::model::Named for $name {
            fn resolve(
                get: &dyn Fn(&'static str) -> Option<$crate::tensor::Tensor>,
            ) -> std::result::Result<Self, String> {
                Ok($name {
                    $( $field: get(stringify!($field)).ok_or(stringify!($field))?, )*
                    $( $( $opt: get(stringify!($opt)), )* )?
                })
            }
        }
    };
}
pub(crate) use handles;

/// What an architecture's layers are built from.
pub struct Build<'a> {
    pub layout: &'a ArenaLayout,
    pub config: &'a Config,
    pub stage: &'a StagePlan,
    pub units: &'a [Unit],
}

/// What every architecture's layer code shares: the sizes, the recompute mode, and the
/// workspace that is the same for all of them.
#[derive(Debug, Clone, Copy)]
pub struct Shared {
    pub dims: Dims,
    pub recompute: Recompute,
    /// Tokens of the residual stream on this rank: `N / t` under sequence parallelism.
    pub tokens_held: usize,
    /// `(N, C)` x2: a gathered input, a matmul's partial output before its reduction.
    pub btc: [Tensor; 2],
    pub norm_eps: f32,
    /// Query, key/value and MLP widths on this rank.
    pub q_width: usize,
    pub kv_width: usize,
    pub ffn: usize,
}

impl Shared {
    /// Row `pos` of a `(N, width)` tensor.
    pub fn row(&self, t: Tensor, width: usize, pos: usize) -> Tensor {
        t.slice(pos * width, width)
    }

    /// The sizes of one token of one sequence (decoding).
    pub fn one(&self) -> Dims {
        Dims {
            b: 1,
            t: 1,
            ..self.dims
        }
    }

    /// A linear over one token.
    pub fn linear_one(&self, inp: usize, out: usize) -> Linear {
        Linear { rows: 1, inp, out }
    }

    /// A linear over the microbatch's tokens.
    pub fn linear(&self, inp: usize, out: usize) -> Linear {
        Linear {
            rows: self.dims.tokens(),
            inp,
            out,
        }
    }
}

/// An architecture's handles: each layer's parameters and gradients (`P`), each (slot, layer
/// of a chunk)'s activations (`A`), the layer scratch (`S`).
pub struct Handles<P, A, S> {
    pub shared: Shared,
    pub params: Vec<P>,
    pub grads: Vec<P>,
    acts: Vec<A>,
    pub scratch: S,
    per_chunk: usize,
}

impl<P: Named, A: Named, S: Named> Handles<P, A, S> {
    /// Resolves every handle from the plan's rows and the units, pointing each layer's
    /// parameters and gradients at its unit's buffers (or, where ZeRO moves them, at the
    /// first bucket until the runtime points them before each use).
    pub fn new(build: &Build) -> Result<Self> {
        let Build {
            layout,
            config,
            stage,
            units,
        } = *build;
        let shape = ModelShape::new(&config.model, config.parallel.tensor);
        let arch = shape.architecture();
        let shared = shared(layout, config, &shape)?;
        let per_chunk = stage.layers[0].len();
        let mut acts = Vec::new();
        for index in 0..stage.in_flight.total * per_chunk {
            let get = |name: &'static str| act_handle(layout, arch.layer_tensors, name, index);
            acts.push(resolve("an activation", &get));
        }
        let scratch = resolve("a layer scratch buffer", &|name| {
            scratch_handle(layout, arch.layer_scratch, name)
        });
        let layer_units: Vec<&Unit> = units
            .iter()
            .filter(|u| u.kind == tessera_plan::model::Unit::Layer)
            .collect();
        let placeholder = |name: &str| {
            layout
                .region(name)
                .expect("invariant: the plan has ZeRO's buffers when units are sharded")
                .get(0)
        };
        let params = layer_units
            .iter()
            .map(|u| {
                let buffer = u
                    .params()
                    .unwrap_or_else(|| placeholder("zero.param_gather"));
                in_unit(u, buffer)
            })
            .collect();
        let grads = layer_units
            .iter()
            .map(|u| {
                let buffer = u.grads().unwrap_or_else(|| placeholder("zero.grad_bucket"));
                in_unit(u, buffer)
            })
            .collect();
        Ok(Handles {
            shared,
            params,
            grads,
            acts,
            scratch,
            per_chunk,
        })
    }

    /// The activations of layer `i` of a chunk for the microbatch in `slot`.
    pub fn acts(&self, slot: usize, i: usize) -> A {
        self.acts[slot * self.per_chunk + i]
    }

    pub fn point_params(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.params[l] = in_unit(unit, buffer);
    }

    pub fn point_grads(&mut self, l: usize, unit: &Unit, buffer: Tensor) {
        self.grads[l] = in_unit(unit, buffer);
    }
}

/// `P`'s handles inside `buffer`, laid out like `unit`.
fn in_unit<P: Named>(unit: &Unit, buffer: Tensor) -> P {
    let get = |name: &'static str| unit.layout.get(name).map(|_| unit.view(buffer, name));
    resolve("a parameter", &get)
}

/// Resolves a set of handles; a name missing from the tables means the architecture's layer
/// code and its tables in `tessera_plan::model` disagree, which every test run would show.
fn resolve<T: Named>(what: &str, get: &dyn Fn(&'static str) -> Option<Tensor>) -> T {
    T::resolve(get).unwrap_or_else(|name| {
        panic!("invariant: the architecture's tables have {what} named `{name}`")
    })
}

/// The handle of activation `name` for (slot, layer) `index`: its saved copy when the
/// recompute mode keeps it, else the shared recompute buffer.
fn act_handle(
    layout: &ArenaLayout,
    table: &[LayerTensor],
    name: &str,
    index: usize,
) -> Option<Tensor> {
    let row = table.iter().find(|t| t.name == name)?;
    if layout.contains(row.saved) {
        Some(layout.region(row.saved).ok()?.get(index))
    } else {
        Some(layout.region(row.recomputed).ok()?.single())
    }
}

fn scratch_handle(layout: &ArenaLayout, table: &[ScratchTensor], name: &str) -> Option<Tensor> {
    let row = table.iter().find(|t| t.name == name)?;
    Some(layout.region(row.region).ok()?.single())
}

fn shared(layout: &ArenaLayout, config: &Config, shape: &ModelShape) -> Result<Shared> {
    let tp = config.parallel.tensor;
    let btc = layout.region("scratch.btc")?;
    // Layers never look at the vocabulary, so rank 0's vocabulary shard stands for any.
    let dims = dims(config, shape, 0);
    Ok(Shared {
        dims,
        recompute: config.parallel.recompute,
        tokens_held: dims.tokens()
            / if config.parallel.sequence_sharded() {
                tp
            } else {
                1
            },
        btc: [btc.get(0), btc.get(1)],
        norm_eps: config.model.norm_eps as f32,
        q_width: dims.nh * dims.hs,
        kv_width: dims.nkv * dims.hs,
        ffn: config.model.ffn_hidden / tp,
    })
}

/// The kernel sizes of one microbatch on tensor-parallel rank `tp_rank`.
fn dims(config: &Config, shape: &ModelShape, tp_rank: usize) -> Dims {
    let tp = config.parallel.tensor;
    Dims {
        b: config.training.micro_batch,
        t: config.model.seq_len,
        c: config.model.hidden,
        nh: config.model.heads / tp,
        nkv: config.model.kv_heads / tp,
        hs: shape.head_dim(),
        v: config.model.vocab,
        vp: shape.vocab_padded / tp,
        vocab_start: tp_rank * (shape.vocab_padded / tp),
    }
}

/// The handles outside the layers: the embedding's and the head's parameters (or gradients).
#[derive(Debug, Clone, Copy, Default)]
struct Ends {
    /// `(Vp/tp, C)` on the first stage.
    wte: Option<Tensor>,
    /// `(T, C)`, first stage, gpt2.
    wpe: Option<Tensor>,
    /// The LM head's weights: `wte` itself, its copy on the last stage, or the head's own.
    head_w: Option<Tensor>,
    /// The final norm's weight and (LayerNorm) bias, last stage.
    norm_w: Option<Tensor>,
    norm_b: Option<Tensor>,
}

impl Ends {
    fn point(&mut self, unit: &Unit, buffer: Tensor, tied: bool) {
        let role = |role| unit.view_role(buffer, role);
        match unit.kind {
            tessera_plan::model::Unit::Embedding => {
                self.wte = role(Role::TokenEmbedding);
                self.wpe = role(Role::Positions);
                if tied {
                    self.head_w = self.wte;
                }
            }
            tessera_plan::model::Unit::Layer => {}
            tessera_plan::model::Unit::Head { .. } => {
                self.norm_w = role(Role::FinalNorm);
                self.norm_b = role(Role::FinalNormBias);
                if let Some(w) = role(Role::TokenEmbedding).or(role(Role::LmHead)) {
                    self.head_w = Some(w);
                }
            }
        }
    }
}

/// The LM head's buffers (last stage).
#[derive(Debug, Clone, Copy)]
struct HeadBuffers {
    /// `(N)` i32
    targets: Tensor,
    /// `(n, C)` and its f32 statistics `(n)` (the mean for LayerNorm only).
    lnf: Tensor,
    lnf_mean: Option<Tensor>,
    lnf_rstd: Tensor,
    /// `(K, Vp/tp)` one chunk of logits, turned into their gradient in place.
    logits: Tensor,
    /// `(K)` f32 each.
    logit_max: Tensor,
    logit_sumexp: Tensor,
    losses: Tensor,
}

/// The model on one pipeline stage of one rank.
pub struct Stage<B: Backend> {
    layers: Box<dyn Layers<B>>,
    dims: Dims,
    norm: FinalNorm,
    norm_eps: f32,
    tied: bool,
    /// Model chunks on this rank (interleaved pipeline schedules have more than one).
    chunks: usize,
    per_chunk: usize,
    /// Tokens of the residual stream on this rank.
    tokens_held: usize,
    params: Ends,
    grads: Ends,
    btc: [Tensor; 2],
    /// `(n, C)` a chunk's output, sent on or fed to the head.
    stage_out: Tensor,
    /// `(n, C)` the residual stream's gradient.
    dresid: Tensor,
    norm_partials: Tensor,
    /// `act.tokens`, one per slot (first stage).
    tokens: Option<Vec<Tensor>>,
    /// `act.dhead`, one per slot (last stage).
    dhead: Option<Vec<Tensor>>,
    head: Option<HeadBuffers>,
    /// `rope.table`, written once at startup.
    rope_table: Option<Tensor>,
    /// Rows per chunk of logits.
    chunk_rows: usize,
    /// Host copy of one chunk's losses.
    chunk_losses: Vec<f32>,
}

impl<B: Backend> Stage<B> {
    pub fn new(
        layout: &ArenaLayout,
        config: &Config,
        stage: &StagePlan,
        units: &[Unit],
        tp_rank: usize,
    ) -> Result<Stage<B>> {
        let shape = ModelShape::new(&config.model, config.parallel.tensor);
        let build = Build {
            layout,
            config,
            stage,
            units,
        };
        let shared = shared(layout, config, &shape)?;
        let one = |name: &str| -> Result<Tensor> { Ok(layout.region(name)?.single()) };
        let per_slot = |name: &str| -> Result<Vec<Tensor>> {
            let region = layout.region(name)?;
            Ok((0..region.count()).map(|i| region.get(i)).collect())
        };
        let first = stage.pp_rank == 0;
        let last = stage.pp_rank == config.parallel.pipeline - 1;
        let head = if last {
            Some(HeadBuffers {
                targets: one("data.targets")?,
                lnf: one("head.lnf")?,
                lnf_mean: if layout.contains("head.lnf_mean") {
                    Some(one("head.lnf_mean")?)
                } else {
                    None
                },
                lnf_rstd: one("head.lnf_rstd")?,
                logits: one("head.logits")?,
                logit_max: one("head.logit_max")?,
                logit_sumexp: one("head.logit_sumexp")?,
                losses: one("head.losses")?,
            })
        } else {
            None
        };
        let chunk_rows = head.map_or(0, |h| h.losses.len);
        let tied = config.model.tie_embeddings;
        let mut params = Ends::default();
        let mut grads = Ends::default();
        let placeholder = |name: &str| {
            layout
                .region(name)
                .expect("invariant: the plan has ZeRO's buffers when units are sharded")
                .get(0)
        };
        for unit in units {
            let p = unit
                .params()
                .unwrap_or_else(|| placeholder("zero.param_gather"));
            let g = unit
                .grads()
                .unwrap_or_else(|| placeholder("zero.grad_bucket"));
            params.point(unit, p, tied);
            grads.point(unit, g, tied);
        }
        Ok(Stage {
            layers: layers(config.model.arch, &build)?,
            dims: dims(config, &shape, tp_rank),
            norm: shape.architecture().final_norm,
            norm_eps: shared.norm_eps,
            tied,
            chunks: stage.layers.len(),
            per_chunk: stage.layers[0].len(),
            tokens_held: shared.tokens_held,
            params,
            grads,
            btc: shared.btc,
            stage_out: one("scratch.stage_out")?,
            dresid: one("scratch.dresid")?,
            norm_partials: one("optim.norm_partials")?,
            tokens: if first {
                Some(per_slot("act.tokens")?)
            } else {
                None
            },
            dhead: if last {
                Some(per_slot("act.dhead")?)
            } else {
                None
            },
            head,
            rope_table: if layout.contains("rope.table") {
                Some(one("rope.table")?)
            } else {
                None
            },
            chunk_rows,
            chunk_losses: vec![0.0; chunk_rows],
        })
    }

    /// Writes the constant buffers (the rotary table), once before training.
    pub fn write_constants(&self, backend: &mut B, config: &Config) -> Result<()> {
        if let Some(table) = self.rope_table {
            let values = crate::tensor::rope_table(
                config.model.seq_len,
                config.model.head_dim,
                config.model.rope_theta,
            );
            backend.write(table, &values)?;
        }
        Ok(())
    }

    /// Whether the LM head reads the token embedding's weights.
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// Where the host writes the token ids of the microbatch in `slot` (first stage).
    pub fn tokens(&self, slot: usize) -> Option<Tensor> {
        self.tokens.as_ref().map(|t| t[slot])
    }

    /// Where the host writes the targets of the next microbatch (last stage).
    pub fn targets(&self) -> Option<Tensor> {
        self.head.map(|h| h.targets)
    }

    /// Scratch for the gradient norm's partial sums.
    pub fn norm_partials(&self) -> Tensor {
        self.norm_partials
    }

    /// Reads `unit`'s parameters (the `layer`-th of the rank's layers) from `buffer` from now on.
    pub fn point_params(&mut self, unit: &Unit, layer: usize, buffer: Tensor) {
        match unit.kind {
            tessera_plan::model::Unit::Layer => self.layers.point_params(layer, unit, buffer),
            _ => self.params.point(unit, buffer, self.tied),
        }
    }

    /// Accumulates `unit`'s gradients into `buffer` from now on.
    pub fn point_grads(&mut self, unit: &Unit, layer: usize, buffer: Tensor) {
        match unit.kind {
            tessera_plan::model::Unit::Layer => self.layers.point_grads(layer, unit, buffer),
            _ => self.grads.point(unit, buffer, self.tied),
        }
    }

    /// Model chunks on this rank (`virtual_stages`); chunk `c` runs layers
    /// `c * layers_per_chunk..` of the rank's layers.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Layers of one chunk.
    pub fn layers_per_chunk(&self) -> usize {
        self.per_chunk
    }

    /// Whether `chunk` is the model's first virtual stage (it embeds the tokens).
    pub fn embeds(&self, chunk: usize) -> bool {
        chunk == 0 && self.tokens.is_some()
    }

    /// Whether `chunk` is the model's last virtual stage (it runs the LM head and the loss).
    pub fn has_head(&self, chunk: usize) -> bool {
        chunk + 1 == self.chunks && self.head.is_some()
    }

    /// Where the input activations of `chunk`'s microbatch in `slot` go when they come from
    /// the previous virtual stage (the first layer's saved input).
    pub fn chunk_input(&self, slot: usize) -> Tensor {
        self.layers.input(slot, 0)
    }

    /// A chunk's output, sent on to the next virtual stage.
    pub fn chunk_output(&self) -> Tensor {
        self.stage_out
    }

    /// The gradient of the residual stream: filled from the next virtual stage before a
    /// backward, holding the gradient of the chunk's input after it.
    pub fn dresid(&self) -> Tensor {
        self.dresid
    }

    /// Forward of the `i`-th layer of `chunk` for the microbatch in activation slot `slot`:
    /// a forward of a chunk is `embed` (the model's first chunk), this for each of its layers,
    /// then `head` (the model's last chunk). The runtime calls the pieces so that it can fetch
    /// each unit's parameters just before use (ZeRO 3).
    pub fn forward_layer(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        chunk: usize,
        slot: usize,
        i: usize,
    ) -> Result<()> {
        let out = if i + 1 < self.per_chunk {
            self.layers.input(slot, i + 1)
        } else {
            self.stage_out
        };
        let l = chunk * self.per_chunk + i;
        self.layers.forward(backend, tp, slot, l, i, Some(out))
    }

    /// Token (and learned position) embeddings into the first layer's input. Each
    /// tensor-parallel rank looks up the tokens of its vocabulary shard (and the first adds
    /// the positions); the sum over the group is the embedding.
    pub fn embed(
        &self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        slot: usize,
        io: usize,
    ) -> Result<()> {
        let tokens = self.tokens.as_ref().expect("invariant: first stage")[io];
        let wte = self.params.wte.expect("invariant: first stage");
        let wpe = self.params.wpe;
        let resid = self.layers.input(slot, 0);
        if tp.size() == 1 {
            return backend.embedding_fwd(resid, tokens, wte, wpe, self.dims);
        }
        let partial = self.btc[0];
        let wpe = wpe.filter(|_| tp.adds_replicated());
        backend.embedding_fwd(partial, tokens, wte, wpe, self.dims)?;
        let summed = tp.reduce(backend, partial)?;
        backend.copy(resid, summed)
    }

    fn norm_fwd(&self, backend: &mut B, h: &HeadBuffers) -> Result<()> {
        let w = self.params.norm_w.expect("invariant: last stage");
        let (n, c) = (self.tokens_held, self.dims.c);
        match self.norm {
            FinalNorm::LayerNorm => backend.layernorm_fwd(
                h.lnf,
                h.lnf_mean.expect("invariant: LayerNorm keeps its mean"),
                h.lnf_rstd,
                self.stage_out,
                w,
                self.params.norm_b.expect("invariant: LayerNorm has a bias"),
                n,
                c,
            ),
            FinalNorm::RmsNorm => {
                backend.rmsnorm_fwd(h.lnf, h.lnf_rstd, self.stage_out, w, n, c, self.norm_eps)
            }
        }
    }

    fn norm_bwd(&self, backend: &mut B, h: &HeadBuffers, dinp: Tensor, dout: Tensor) -> Result<()> {
        let w = self.params.norm_w.expect("invariant: last stage");
        let dw = self.grads.norm_w.expect("invariant: last stage");
        let (n, c) = (self.tokens_held, self.dims.c);
        match self.norm {
            FinalNorm::LayerNorm => backend.layernorm_bwd(
                dinp,
                dw,
                self.grads.norm_b.expect("invariant: LayerNorm has a bias"),
                dout,
                self.stage_out,
                w,
                h.lnf_mean.expect("invariant: LayerNorm keeps its mean"),
                h.lnf_rstd,
                n,
                c,
            ),
            FinalNorm::RmsNorm => {
                backend.rmsnorm_bwd(dinp, dw, dout, self.stage_out, w, h.lnf_rstd, n, c)
            }
        }
    }

    /// The model's last chunk, after its layers: the final norm, then logits, loss and their
    /// gradients chunk by chunk with `dloss` as the gradient of each token's loss, then the
    /// final norm's backward into `act.dhead[io]`; returns the sum of the token losses. Under
    /// tensor parallelism each rank holds the logits of its vocabulary shard and the softmax's
    /// statistics are combined over the group. With `backward` false (evaluation) it stops at
    /// the losses: no gradient is touched.
    pub fn head(
        &mut self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        io: usize,
        dloss: f32,
        backward: bool,
    ) -> Result<f64> {
        let h = self.head.expect("invariant: last stage");
        let w = self.params.head_w.expect("invariant: last stage");
        let dw = self.grads.head_w.expect("invariant: last stage");
        let c = self.dims.c;
        let [gathered, dlnf] = self.btc;
        self.norm_fwd(backend, &h)?;
        let lnf_all = tp.gather(backend, h.lnf, gathered)?;
        let mut loss = 0.0f64;
        let (vp, rows_all) = (self.dims.vp, self.dims.tokens());
        for first in (0..rows_all).step_by(self.chunk_rows) {
            let rows = self.chunk_rows.min(rows_all - first);
            let logits = h.logits.slice(0, rows * vp);
            let lnf = lnf_all.slice(first * c, rows * c);
            let shape = Linear {
                rows,
                inp: c,
                out: vp,
            };
            backend.matmul_fwd(logits, lnf, w, None, shape)?;
            let losses = h.losses.slice(0, rows);
            let (max, sumexp) = (h.logit_max.slice(0, rows), h.logit_sumexp.slice(0, rows));
            let targets = h.targets.slice(first, rows);
            if tp.size() == 1 {
                backend
                    .crossentropy_fwd_bwd(logits, losses, max, sumexp, targets, dloss, self.dims)?;
            } else {
                backend.crossentropy_max(logits, max, self.dims)?;
                tp.all_reduce(backend, max, ReduceOp::Max)?;
                backend.crossentropy_sumexp(logits, losses, max, sumexp, targets, self.dims)?;
                tp.all_reduce(backend, sumexp, ReduceOp::Sum)?;
                tp.all_reduce(backend, losses, ReduceOp::Sum)?;
                backend
                    .crossentropy_finish(logits, losses, max, sumexp, targets, dloss, self.dims)?;
            }
            backend.read(losses, &mut self.chunk_losses[..rows])?;
            loss += self.chunk_losses[..rows]
                .iter()
                .map(|&l| l as f64)
                .sum::<f64>();
            if !backward {
                continue;
            }
            backend.matmul_bwd(
                Some(dlnf.slice(first * c, rows * c)),
                dw,
                None,
                logits,
                lnf,
                w,
                shape,
            )?;
        }
        if !backward {
            return Ok(loss);
        }
        let dlnf = tp.reduce(backend, dlnf)?;
        let dhead = self.dhead.as_ref().expect("invariant: last stage")[io];
        backend.fill(dhead, 0.0)?;
        self.norm_bwd(backend, &h, dhead, dlnf)?;
        Ok(loss)
    }

    /// Backward of `chunk` for the microbatch in `slot` is `backward_begin`, `backward_layer`
    /// for each of the chunk's layers from the last, then `backward_end`: from the gradient of
    /// the chunk's output (the head's on the model's last chunk, else what the runtime put in
    /// `dresid`) down to the gradient of its input in `dresid` (or into the embedding on the
    /// first). The runtime calls the pieces so that each unit's gradients can be reduced as
    /// soon as they are done.
    ///
    /// This piece takes the gradient of the chunk's output from the head (the model's last
    /// chunk).
    pub fn backward_begin(&mut self, backend: &mut B, chunk: usize, io: usize) -> Result<()> {
        if self.has_head(chunk) {
            let dhead = self.dhead.as_ref().expect("invariant: last stage")[io];
            backend.copy(self.dresid, dhead)?;
        }
        Ok(())
    }

    /// Backward of the `i`-th layer of `chunk` (after the `i + 1`-th's).
    pub fn backward_layer(
        &mut self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        chunk: usize,
        slot: usize,
        i: usize,
    ) -> Result<()> {
        let l = chunk * self.per_chunk + i;
        self.layers.recompute(backend, tp, slot, l, i)?;
        self.layers.backward(backend, tp, slot, l, i, self.dresid)
    }

    /// Decoding, step 1 (one process, micro_batch 1, recompute `none`): the forward of the
    /// prompt `tokens` (at most seq_len; the rows after it hold token 0 and, attention being
    /// causal, change nothing before them). It fills every layer's kept `q|k|v`, the cache.
    pub fn prefill(&self, backend: &mut B, tp: &mut dyn Regions<B>, tokens: &[i32]) -> Result<()> {
        let t = self.dims.t;
        let mut padded = vec![0; t];
        padded[..tokens.len()].copy_from_slice(tokens);
        backend.write_i32(self.tokens(0).expect("invariant: one stage"), &padded)?;
        self.embed(backend, tp, 0, 0)?;
        for i in 0..self.per_chunk {
            self.forward_layer(backend, tp, 0, 0, i)?;
        }
        Ok(())
    }

    /// Decoding, each next step: the forward of `token` at position `pos`, through the cache.
    pub fn decode(&self, backend: &mut B, token: i32, pos: usize) -> Result<()> {
        let c = self.dims.c;
        let tokens = self.tokens(0).expect("invariant: one stage").slice(pos, 1);
        backend.write_i32(tokens, &[token])?;
        let one = Dims {
            b: 1,
            t: 1,
            ..self.dims
        };
        let wte = self.params.wte.expect("invariant: one stage");
        let wpe = self.params.wpe.map(|w| w.slice(pos * c, c));
        let resid = self.layers.input(0, 0).slice(pos * c, c);
        backend.embedding_fwd(resid, tokens, wte, wpe, one)?;
        for i in 0..self.per_chunk {
            let out = if i + 1 < self.per_chunk {
                self.layers.input(0, i + 1)
            } else {
                self.stage_out
            };
            self.layers.decode(backend, i, pos, out)?;
        }
        Ok(())
    }

    /// Decoding: the logits of position `pos` (after `prefill` or `decode` reached it), over
    /// the real vocabulary.
    pub fn logits(&mut self, backend: &mut B, pos: usize) -> Result<Vec<f32>> {
        let h = self.head.expect("invariant: one stage");
        let c = self.dims.c;
        let w = self.params.norm_w.expect("invariant: one stage");
        let (lnf, rstd) = (h.lnf.slice(0, c), h.lnf_rstd.slice(0, 1));
        let inp = self.stage_out.slice(pos * c, c);
        match self.norm {
            FinalNorm::LayerNorm => backend.layernorm_fwd(
                lnf,
                h.lnf_mean
                    .expect("invariant: LayerNorm keeps its mean")
                    .slice(0, 1),
                rstd,
                inp,
                w,
                self.params.norm_b.expect("invariant: LayerNorm has a bias"),
                1,
                c,
            )?,
            FinalNorm::RmsNorm => backend.rmsnorm_fwd(lnf, rstd, inp, w, 1, c, self.norm_eps)?,
        }
        let vp = self.dims.vp;
        let logits = h.logits.slice(0, vp);
        let head_w = self.params.head_w.expect("invariant: one stage");
        let shape = Linear {
            rows: 1,
            inp: c,
            out: vp,
        };
        backend.matmul_fwd(logits, lnf, head_w, None, shape)?;
        let mut values = vec![0.0; vp];
        backend.read(logits, &mut values)?;
        values.truncate(self.dims.v);
        Ok(values)
    }

    /// The embedding's backward (the model's first chunk; nothing elsewhere).
    pub fn backward_end(
        &mut self,
        backend: &mut B,
        tp: &mut dyn Regions<B>,
        chunk: usize,
        io: usize,
    ) -> Result<()> {
        if !self.embeds(chunk) {
            return Ok(());
        }
        let tokens = self.tokens.as_ref().expect("invariant: first stage")[io];
        let dwte = self.grads.wte.expect("invariant: first stage");
        let dout = tp.gather(backend, self.dresid, self.btc[1])?;
        backend.embedding_bwd(dwte, self.grads.wpe, dout, tokens, self.dims)
    }
}
