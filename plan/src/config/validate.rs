//! `RawConfig -> Config`: defaults, ranges, and the rules that tie keys together.
//!
//! Every problem is collected (not just the first), each with the place its value came from.
//! The layout rules (`layout_violations`) are shared with the topology search so that the
//! search only proposes layouts this validation accepts.

use std::collections::BTreeMap;

use super::MAX_RANKS;
use super::issue::{Issue, Origin, Place};
use super::raw::{self, Leaf, RawConfig, ReadError, Section};
use super::{
    Arch, Backend, Checkpoint, Choice, Cluster, Config, Data, DataKind, Device, Eval, Model,
    Offload, Optimizer, Parallel, Precision, Recompute, Restart, Schedule, Tls, Training, Watchdog,
    Zero, did_you_mean,
};
use crate::bytes::parse_size;

/// Upper bounds that keep every size the planner multiplies within 64 bits while staying far
/// beyond any real model or cluster.
const MAX_LAYERS: i64 = 10_000;
const MAX_WIDTH: i64 = 1 << 22;
const MAX_SEQ_LEN: i64 = 1 << 24;
const MAX_DEGREE: i64 = 1 << 20;
const MAX_BATCH: i64 = 1 << 31;
/// Tokens in one microbatch on one rank (micro_batch x seq_len).
const MAX_MICROBATCH_TOKENS: usize = 1 << 27;

/// The file's name and text and the `--set` arguments, to turn places into origins.
struct Sources<'a> {
    path: &'a str,
    text: &'a str,
    sets: &'a [String],
}

impl Sources<'_> {
    fn origin(&self, place: Place) -> Origin {
        match place {
            Place::Text { line, column } => Origin::File {
                path: self.path.to_string(),
                line,
                column,
                line_text: self
                    .text
                    .lines()
                    .nth(line.saturating_sub(1) as usize)
                    .unwrap_or_default()
                    .to_string(),
            },
            Place::Set { index } => Origin::Set {
                arg: self.sets.get(index).cloned().unwrap_or_default(),
            },
            Place::Default => Origin::Default {
                path: self.path.to_string(),
            },
        }
    }

    fn document(&self) -> Origin {
        Origin::Document {
            path: self.path.to_string(),
        }
    }

    /// A read error from the file (`set: None`) or from the `--set` with that index.
    fn read_issue(&self, error: ReadError, set: Option<usize>) -> Issue {
        let origin = match (set, error.at) {
            (Some(index), _) => self.origin(Place::Set { index }),
            (None, Some((line, column))) => self.origin(Place::Text { line, column }),
            (None, None) => self.document(),
        };
        Issue {
            origin,
            key: error.key,
            message: error.message,
            help: error.help,
        }
    }
}

pub(super) fn from_yaml(path: &str, text: &str, sets: &[String]) -> Result<Config, Vec<Issue>> {
    let sources = Sources { path, text, sets };
    let empty = || Issue {
        origin: sources.document(),
        key: String::new(),
        message: "the config is empty".into(),
        help: Some(
            "a config needs at least `model:` (layers, hidden, heads, seq_len) and `training:` \
             (global_batch, steps); start from configs/tiny-cpu.yaml"
                .into(),
        ),
    };
    if text.trim().is_empty() {
        return Err(vec![empty()]);
    }
    let mut config = raw::read(text).map_err(|e| vec![sources.read_issue(e, None)])?;
    if is_empty(&config) {
        return Err(vec![empty()]);
    }
    let mut issues = Vec::new();
    for (index, arg) in sets.iter().enumerate() {
        let overlay = raw::override_document(arg).and_then(|document| raw::read(&document));
        match overlay {
            Ok(mut overlay) => {
                overlay.set_place(Place::Set { index });
                config.merge(overlay);
            }
            Err(error) => issues.push(sources.read_issue(error, Some(index))),
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    Reader {
        sources: &sources,
        issues: Vec::new(),
        places: BTreeMap::new(),
        warnings: Vec::new(),
    }
    .config(config)
}

fn is_empty(config: &RawConfig) -> bool {
    config.model.is_none()
        && config.parallel.is_none()
        && config.training.is_none()
        && config.data.is_none()
        && config.cluster.is_none()
        && config.checkpoint.is_none()
        && config.restart.is_none()
        && config.watchdog.is_none()
}

/// Reads values with defaults and ranges, remembering where each came from.
struct Reader<'a> {
    sources: &'a Sources<'a>,
    issues: Vec<Issue>,
    places: BTreeMap<&'static str, Place>,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn fail(&mut self, key: &str, message: String, help: Option<String>) {
        self.fail_at(key, key, message, help);
    }

    /// An issue about `key`, pointing at where the value of `at` came from.
    fn fail_at(&mut self, key: &str, at: &str, message: String, help: Option<String>) {
        let place = self.places.get(at).copied().unwrap_or(Place::Default);
        self.issues.push(Issue {
            origin: self.sources.origin(place),
            key: key.to_string(),
            message,
            help,
        });
    }

    /// The value and its place, the default, or an issue if the key is required.
    fn take<T>(
        &mut self,
        key: &'static str,
        leaf: Option<Leaf<T>>,
        default: Option<T>,
        what: &str,
    ) -> Option<T> {
        match (leaf, default) {
            (Some(leaf), _) => {
                self.places.insert(key, leaf.place);
                Some(leaf.value)
            }
            (None, Some(default)) => {
                self.places.insert(key, Place::Default);
                Some(default)
            }
            (None, None) => {
                self.issues.push(Issue {
                    origin: self.sources.document(),
                    key: key.to_string(),
                    message: "is required but not set".into(),
                    help: Some(format!("add it: {what}")),
                });
                None
            }
        }
    }

    /// A whole number in `min..=max`.
    fn int(
        &mut self,
        key: &'static str,
        leaf: Option<Leaf<i64>>,
        default: Option<i64>,
        min: i64,
        max: i64,
        what: &str,
    ) -> Option<i64> {
        let value = self.take(key, leaf, default, what)?;
        if value < min {
            let help = if min == 1 {
                format!("{what}; it counts something, so it is 1 or more")
            } else {
                what.to_string()
            };
            self.fail(
                key,
                format!("must be at least {min}, got {value}"),
                Some(help),
            );
            return None;
        }
        if value > max {
            self.fail(
                key,
                format!("must be at most {max}, got {value}"),
                Some(what.to_string()),
            );
            return None;
        }
        Some(value)
    }

    /// A count of at least 1.
    fn count(
        &mut self,
        key: &'static str,
        leaf: Option<Leaf<i64>>,
        default: Option<i64>,
        max: i64,
        what: &str,
    ) -> Option<usize> {
        self.int(key, leaf, default, 1, max, what)
            .map(|v| v as usize)
    }

    /// A finite number accepted by `ok`, which `requirement` describes.
    fn number(
        &mut self,
        key: &'static str,
        leaf: Option<Leaf<f64>>,
        default: f64,
        ok: fn(f64) -> bool,
        requirement: &str,
    ) -> Option<f64> {
        let value = self.take(key, leaf, Some(default), "")?;
        if !value.is_finite() || !ok(value) {
            self.fail(key, format!("must be {requirement}, got {value}"), None);
            return None;
        }
        Some(value)
    }

    fn flag(&mut self, key: &'static str, leaf: Option<Leaf<bool>>, default: bool) -> bool {
        self.take(key, leaf, Some(default), "").unwrap_or(default)
    }

    fn choice<C: Choice>(
        &mut self,
        key: &'static str,
        leaf: Option<Leaf<String>>,
        default: C,
    ) -> Option<C> {
        let text = self.take(key, leaf, Some(default.name().to_string()), "")?;
        if let Some(value) = C::parse(&text) {
            return Some(value);
        }
        let names = C::NAMES.iter().map(|(name, _)| *name);
        let help = match did_you_mean(&text, names) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!("write one of {}", C::listing()),
        };
        self.fail(
            key,
            format!("must be one of {}, got `{text}`", C::listing()),
            Some(help),
        );
        None
    }

    fn config(mut self, raw: RawConfig) -> Result<Config, Vec<Issue>> {
        let model = self.model(raw.model.unwrap_or_default());
        let training = self.training(raw.training.unwrap_or_default());
        let cluster = self.cluster(raw.cluster.unwrap_or_default());
        let parallel = self.parallel(raw.parallel.unwrap_or_default(), cluster.as_ref());
        let data = self.data(raw.data.unwrap_or_default());
        let eval = self.eval(raw.eval.unwrap_or_default());
        let checkpoint = self.checkpoint(raw.checkpoint.unwrap_or_default());
        let raw_restart = raw.restart.unwrap_or_default();
        let max = self.int(
            "restart.max",
            raw_restart.max,
            Some(0),
            0,
            1000,
            "restarts from the newest checkpoint before giving up",
        );
        let nodes = cluster.as_ref().map_or(1, |c| c.nodes as i64);
        let min_nodes = self.int(
            "restart.min_nodes",
            raw_restart.min_nodes,
            Some(nodes),
            1,
            nodes,
            "the fewest nodes a restart may go on with, at most cluster.nodes",
        );
        let restart = match (max, min_nodes) {
            (Some(max), Some(min_nodes)) => Some(Restart {
                max: max as u32,
                min_nodes: min_nodes as usize,
            }),
            _ => None,
        };
        let watchdog = self.watchdog(raw.watchdog.unwrap_or_default());

        if let (Some(model), Some(parallel), Some(training), Some(cluster)) =
            (&model, &parallel, &training, &cluster)
        {
            let batch = Batch {
                global: training.global_batch,
                micro: training.micro_batch,
            };
            for violation in
                layout_violations(model, parallel, batch, cluster.nodes, cluster.gpus_per_node)
            {
                self.fail_at(
                    violation.key,
                    violation.at,
                    violation.message,
                    violation.help,
                );
            }
            let ranks = parallel.world_size();
            if cluster.nodes == 1 && ranks < cluster.gpus_per_node {
                self.warnings.push(format!(
                    "the job uses {ranks} of the node's {} devices (cluster.gpus_per_node)",
                    cluster.gpus_per_node
                ));
            }
            if parallel.sequence_parallel && parallel.tensor == 1 {
                self.warnings.push(
                    "parallel.sequence_parallel has no effect with tensor 1 (there is no tensor group to shard across)"
                        .into(),
                );
            }
            if training.optimizer.warmup > training.steps {
                self.warnings.push(format!(
                    "training.optimizer.warmup ({}) is longer than training.steps ({}): the learning rate never reaches lr",
                    training.optimizer.warmup, training.steps
                ));
            }
        }

        match (
            model, parallel, training, data, cluster, checkpoint, restart, watchdog, eval,
        ) {
            (
                Some(model),
                Some(parallel),
                Some(training),
                Some(data),
                Some(cluster),
                Some(checkpoint),
                Some(restart),
                Some(watchdog),
                Some(eval),
            ) if self.issues.is_empty() => Ok(Config {
                model,
                parallel,
                training,
                data,
                cluster,
                checkpoint,
                restart,
                watchdog,
                eval,
                warnings: self.warnings,
            }),
            _ => Err(self.issues),
        }
    }

    fn watchdog(&mut self, raw: raw::RawWatchdog) -> Option<Watchdog> {
        // Floors: a beat is a message from every rank to the coordinator (a thousand ranks
        // beating every millisecond would drown it), and no timeout can be shorter than the
        // scheduling hiccups of a loaded machine without failing healthy runs.
        let beat_ok = |v: f64| (0.1..=86_400.0).contains(&v);
        const BEAT: &str = "a number of seconds from 0.1 to a day (86400)";
        let timeout_ok = |v: f64| (1.0..=86_400.0).contains(&v);
        const TIMEOUT: &str = "a number of seconds from 1 to a day (86400)";
        let heartbeat = self.number("watchdog.heartbeat", raw.heartbeat, 1.0, beat_ok, BEAT);
        let heartbeat_timeout = self.number(
            "watchdog.heartbeat_timeout",
            raw.heartbeat_timeout,
            10.0,
            timeout_ok,
            TIMEOUT,
        );
        let collective_timeout = self.number(
            "watchdog.collective_timeout",
            raw.collective_timeout,
            60.0,
            timeout_ok,
            TIMEOUT,
        );
        let rendezvous_timeout = self.number(
            "watchdog.rendezvous_timeout",
            raw.rendezvous_timeout,
            120.0,
            timeout_ok,
            TIMEOUT,
        );
        if let (Some(beat), Some(timeout)) = (heartbeat, heartbeat_timeout)
            && timeout < 2.0 * beat
        {
            self.fail(
                "watchdog.heartbeat_timeout",
                format!(
                    "must be at least twice watchdog.heartbeat ({beat} s), got {timeout} s: one late beat would fail the job"
                ),
                Some(format!("e.g. `heartbeat_timeout: {}`", 10.0 * beat)),
            );
            return None;
        }
        let duration = std::time::Duration::from_secs_f64;
        Some(Watchdog {
            heartbeat: duration(heartbeat?),
            heartbeat_timeout: duration(heartbeat_timeout?),
            collective_timeout: duration(collective_timeout?),
            rendezvous_timeout: duration(rendezvous_timeout?),
        })
    }

    fn model(&mut self, raw: raw::RawModel) -> Option<Model> {
        let arch = self.choice("model.arch", raw.arch, Arch::Gpt2);
        let layers = self.count(
            "model.layers",
            raw.layers,
            None,
            MAX_LAYERS,
            "the number of transformer blocks, e.g. `layers: 12`",
        );
        let hidden = self.count(
            "model.hidden",
            raw.hidden,
            None,
            MAX_WIDTH,
            "the model width, e.g. `hidden: 768`",
        );
        let heads = self.count(
            "model.heads",
            raw.heads,
            None,
            MAX_WIDTH,
            "attention heads per layer, e.g. `heads: 12`",
        );
        let vocab = self.count(
            "model.vocab",
            raw.vocab,
            Some(50257),
            MAX_SEQ_LEN,
            "the tokenizer's vocabulary size",
        );
        let seq_len = self.count(
            "model.seq_len",
            raw.seq_len,
            None,
            MAX_SEQ_LEN,
            "tokens per sequence, e.g. `seq_len: 1024`",
        );
        let ffn_default = hidden.map(|h| 4 * h as i64);
        let ffn_hidden = self.count(
            "model.ffn_hidden",
            raw.ffn_hidden,
            ffn_default,
            MAX_WIDTH,
            "the MLP width (default 4 x hidden)",
        );
        let (arch, layers, hidden, heads, vocab, seq_len, ffn_hidden) = (
            arch?,
            layers?,
            hidden?,
            heads?,
            vocab?,
            seq_len?,
            ffn_hidden?,
        );
        let kv_heads = self.count(
            "model.kv_heads",
            raw.kv_heads,
            Some(heads as i64),
            MAX_WIDTH,
            "key/value heads of grouped-query attention (default: heads)",
        )?;
        let head_dim_given = raw.head_dim.is_some();
        if !head_dim_given && hidden % heads != 0 {
            let near = divisors(hidden)
                .into_iter()
                .filter(|d| d.abs_diff(heads) <= heads)
                .collect::<Vec<_>>();
            self.fail(
                "model.heads",
                format!("hidden ({hidden}) must be divisible by heads ({heads}): every head gets hidden / heads channels"),
                Some(format!("heads that divide {hidden}: {}, or set model.head_dim", list(&near))),
            );
            return None;
        }
        let head_dim = self.count(
            "model.head_dim",
            raw.head_dim,
            Some((hidden / heads) as i64),
            MAX_WIDTH,
            "channels per attention head (default hidden / heads)",
        )?;
        if head_dim % 2 != 0 && arch == Arch::Llama {
            self.fail(
                "model.head_dim",
                format!("must be even for rotary embeddings, got {head_dim}"),
                Some("rotary embeddings rotate pairs of channels: use an even head_dim".into()),
            );
        }
        if heads % kv_heads != 0 {
            let options: Vec<usize> = divisors(heads);
            self.fail(
                "model.kv_heads",
                format!("heads ({heads}) must be divisible by kv_heads ({kv_heads}): each key/value head serves an equal group of query heads"),
                Some(format!("kv_heads that divide {heads}: {}", list(&options))),
            );
        }
        let eps_given = raw.norm_eps.is_some();
        let norm_eps = self.number(
            "model.norm_eps",
            raw.norm_eps,
            1e-5,
            |v| v > 0.0 && v < 1.0,
            "between 0 and 1 (exclusive), e.g. 1.0e-5",
        )?;
        let theta_given = raw.rope_theta.is_some();
        let rope_theta = self.number(
            "model.rope_theta",
            raw.rope_theta,
            10_000.0,
            |v| v > 1.0,
            "above 1, e.g. 10000 (Llama 2) or 500000 (Llama 3)",
        )?;
        let tie_embeddings = self.flag(
            "model.tie_embeddings",
            raw.tie_embeddings,
            arch == Arch::Gpt2,
        );
        if arch == Arch::Gpt2 {
            // GPT-2's LayerNorm kernels use its epsilon, and it has learned positions.
            if eps_given && norm_eps != 1e-5 {
                self.fail(
                    "model.norm_eps",
                    format!("arch gpt2's LayerNorm uses eps 1e-5, got {norm_eps}"),
                    Some("remove model.norm_eps, or use `arch: llama`".into()),
                );
            }
            if theta_given {
                self.fail(
                    "model.rope_theta",
                    "is for rotary embeddings, which arch gpt2 does not have (it learns its positions)".into(),
                    Some("remove model.rope_theta, or use `arch: llama`".into()),
                );
            }
        }
        Some(Model {
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            vocab,
            seq_len,
            ffn_hidden,
            norm_eps,
            rope_theta,
            tie_embeddings,
        })
    }

    fn training(&mut self, raw: raw::RawTraining) -> Option<Training> {
        let global_batch = self.count(
            "training.global_batch",
            raw.global_batch,
            None,
            MAX_BATCH,
            "sequences per optimizer step over all data-parallel ranks, e.g. `global_batch: 512`",
        );
        let micro_batch = self.count(
            "training.micro_batch",
            raw.micro_batch,
            Some(1),
            MAX_BATCH,
            "sequences per forward/backward on one rank",
        );
        let precision = self.choice("training.precision", raw.precision, Precision::Bf16);
        let steps = self.count(
            "training.steps",
            raw.steps,
            None,
            i64::MAX,
            "optimizer steps to run, e.g. `steps: 1000`",
        );
        let seed = self.int(
            "training.seed",
            raw.seed,
            Some(1234),
            0,
            i64::MAX,
            "the random seed",
        );
        let optimizer = self.optimizer(raw.optimizer.unwrap_or_default());
        Some(Training {
            global_batch: global_batch?,
            micro_batch: micro_batch?,
            precision: precision?,
            steps: steps? as u64,
            seed: seed? as u64,
            optimizer: optimizer?,
        })
    }

    fn optimizer(&mut self, raw: raw::RawOptimizer) -> Option<Optimizer> {
        let lr = self.number(
            "training.optimizer.lr",
            raw.lr,
            6.0e-4,
            |v| v > 0.0,
            "greater than 0",
        );
        let min_lr_default = lr.unwrap_or(6.0e-4) / 10.0;
        let min_lr = self.number(
            "training.optimizer.min_lr",
            raw.min_lr,
            min_lr_default,
            |v| v >= 0.0,
            "0 or more",
        );
        let warmup = self.int(
            "training.optimizer.warmup",
            raw.warmup,
            Some(0),
            0,
            i64::MAX,
            "steps of linear warmup",
        );
        let beta1 = self.number(
            "training.optimizer.beta1",
            raw.beta1,
            0.9,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        );
        let beta2 = self.number(
            "training.optimizer.beta2",
            raw.beta2,
            0.95,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        );
        let eps = self.number(
            "training.optimizer.eps",
            raw.eps,
            1.0e-8,
            |v| v > 0.0,
            "greater than 0",
        );
        let weight_decay = self.number(
            "training.optimizer.weight_decay",
            raw.weight_decay,
            0.1,
            |v| v >= 0.0,
            "0 or more",
        );
        let grad_clip = self.number(
            "training.optimizer.grad_clip",
            raw.grad_clip,
            1.0,
            |v| v >= 0.0,
            "0 (off) or more",
        );
        if let (Some(lr), Some(min_lr)) = (lr, min_lr)
            && min_lr > lr
        {
            self.fail(
                "training.optimizer.min_lr",
                format!("must not exceed lr ({lr}), got {min_lr}"),
                Some("the cosine schedule decays from lr down to min_lr".into()),
            );
            return None;
        }
        Some(Optimizer {
            lr: lr?,
            min_lr: min_lr?,
            warmup: warmup? as u64,
            beta1: beta1?,
            beta2: beta2?,
            eps: eps?,
            weight_decay: weight_decay?,
            grad_clip: grad_clip?,
        })
    }

    fn cluster(&mut self, raw: raw::RawCluster) -> Option<Cluster> {
        let nodes = self.count(
            "cluster.nodes",
            raw.nodes,
            Some(1),
            MAX_DEGREE,
            "machines in the job",
        );
        let gpus_per_node = self.count(
            "cluster.gpus_per_node",
            raw.gpus_per_node,
            Some(1),
            1024,
            "devices per machine (CPU workers per machine with device: cpu)",
        );
        let device = self.choice("cluster.device", raw.device, Device::Cuda);
        let default_backend = match device {
            Some(Device::Cpu) => Backend::Tcp,
            _ => Backend::Nccl,
        };
        let backend = self.choice("cluster.backend", raw.backend, default_backend);
        let memory_text = self.take(
            "cluster.gpu_memory",
            raw.gpu_memory,
            Some("80GiB".to_string()),
            "",
        );
        let gpu_memory = memory_text.and_then(|text| match parse_size(&text) {
            Ok(0) => {
                self.fail(
                    "cluster.gpu_memory",
                    "must be more than 0 bytes".into(),
                    Some("e.g. `gpu_memory: 80GiB`".into()),
                );
                None
            }
            Ok(bytes) => Some(bytes),
            Err(error) => {
                self.fail("cluster.gpu_memory", error.to_string(), None);
                None
            }
        });
        let hostfile = raw.hostfile.map(|leaf| {
            self.places.insert("cluster.hostfile", leaf.place);
            leaf.value
        });
        let tls = raw.tls.and_then(|tls| self.tls(tls));
        let headroom = self.number(
            "cluster.headroom",
            raw.headroom,
            0.2,
            |v| (0.0..1.0).contains(&v),
            "a fraction in [0, 1), e.g. 0.2 keeps 20% of each device free",
        );
        if let (Some(nodes), Some(per_node)) = (nodes, gpus_per_node)
            && nodes * per_node > MAX_RANKS
        {
            self.fail(
                "cluster.nodes",
                format!(
                    "nodes ({nodes}) x gpus_per_node ({per_node}) = {} devices is more than tessera plans (at most {MAX_RANKS})",
                    nodes * per_node
                ),
                Some("check cluster.nodes and cluster.gpus_per_node".into()),
            );
            return None;
        }
        if device == Some(Device::Cpu) && backend == Some(Backend::Nccl) {
            self.fail(
                "cluster.backend",
                "nccl needs CUDA devices, but cluster.device is cpu".into(),
                Some("use `backend: tcp` for CPU workers".into()),
            );
            return None;
        }
        Some(Cluster {
            nodes: nodes?,
            gpus_per_node: gpus_per_node?,
            gpu_memory: gpu_memory?,
            backend: backend?,
            device: device?,
            hostfile,
            headroom: headroom?,
            tls,
        })
    }

    /// `cluster.tls`: all three files or none, each a path that is not empty.
    fn tls(&mut self, raw: raw::RawTls) -> Option<Tls> {
        const KEYS: [&str; 3] = ["cluster.tls.ca", "cluster.tls.cert", "cluster.tls.key"];
        const HELP: &str = "cluster.tls needs the CA certificate, this node's certificate and its \
                            key: `tls: {ca: DIR/ca.pem, cert: DIR/HOST.pem, key: DIR/HOST-key.pem}` \
                            as `launch certs --out DIR --hosts HOST,...` writes them";
        let leaves = [raw.ca, raw.cert, raw.key];
        // A missing key is reported where the section's other keys are.
        let Some(given) = (0..3).find(|&i| leaves[i].is_some()) else {
            self.issues.push(Issue {
                origin: self.sources.document(),
                key: "cluster.tls".into(),
                message: "is empty".into(),
                help: Some(format!("{HELP}; or remove it to run without TLS")),
            });
            return None;
        };
        let mut paths = Vec::new();
        for (index, leaf) in leaves.into_iter().enumerate() {
            let key = KEYS[index];
            match leaf {
                Some(leaf) => {
                    self.places.insert(key, leaf.place);
                    if leaf.value.trim().is_empty() {
                        self.fail(
                            key,
                            "must be a path, got an empty one".into(),
                            Some(HELP.into()),
                        );
                    }
                    paths.push(leaf.value);
                }
                None => self.fail_at(
                    key,
                    KEYS[given],
                    "is required when cluster.tls is set".into(),
                    Some(HELP.into()),
                ),
            }
        }
        let [ca, cert, key] = <[String; 3]>::try_from(paths).ok()?;
        if [&ca, &cert, &key].iter().any(|p| p.trim().is_empty()) {
            return None;
        }
        Some(Tls { ca, cert, key })
    }

    fn parallel(&mut self, raw: raw::RawParallel, cluster: Option<&Cluster>) -> Option<Parallel> {
        const DEGREE: &str = "a degree counts ranks; 1 turns this kind of parallelism off";
        let tensor = self.count("parallel.tensor", raw.tensor, Some(1), MAX_DEGREE, DEGREE);
        let pipeline = self.count(
            "parallel.pipeline",
            raw.pipeline,
            Some(1),
            MAX_DEGREE,
            DEGREE,
        );
        let virtual_stages = self.count(
            "parallel.virtual_stages",
            raw.virtual_stages,
            Some(1),
            MAX_LAYERS,
            "model chunks per pipeline rank (interleaved schedule)",
        );
        // `data` defaults to whatever GPUs tensor x pipeline leave, like Megatron.
        let data = match (raw.data, cluster, tensor, pipeline) {
            (Some(leaf), ..) => self.count("parallel.data", Some(leaf), None, MAX_DEGREE, DEGREE),
            (None, Some(cluster), Some(tensor), Some(pipeline)) => {
                let world = cluster.world_size();
                if world % (tensor * pipeline) == 0 {
                    self.count(
                        "parallel.data",
                        None,
                        Some((world / (tensor * pipeline)) as i64),
                        MAX_DEGREE,
                        DEGREE,
                    )
                } else {
                    self.places.insert("parallel.data", Place::Default);
                    self.fail(
                        "parallel.data",
                        format!(
                            "cannot be derived: tensor ({tensor}) x pipeline ({pipeline}) = {} does not divide the cluster's {world} GPUs",
                            tensor * pipeline
                        ),
                        Some("set parallel.data, or choose tensor and pipeline so that their product divides the GPU count".into()),
                    );
                    None
                }
            }
            _ => None,
        };
        let pipeline_layers = raw.pipeline_layers.map(|leaf| {
            self.places.insert("parallel.pipeline_layers", leaf.place);
            leaf.value
        });
        let pipeline_layers = match pipeline_layers {
            Some(counts) if counts.iter().any(|c| !(1..=MAX_LAYERS).contains(c)) => {
                self.fail(
                    "parallel.pipeline_layers",
                    format!("every stage holds 1 to {MAX_LAYERS} layers, got {counts:?}"),
                    Some("list the layers of each pipeline stage, e.g. [24, 24, 24, 23]".into()),
                );
                None
            }
            // An empty list is the even split (what `launch search` writes to undo a split).
            Some(counts) if counts.is_empty() => Some(None),
            Some(counts) => Some(Some(counts.into_iter().map(|c| c as usize).collect())),
            None => Some(None),
        };
        let sequence_parallel =
            self.flag("parallel.sequence_parallel", raw.sequence_parallel, false);
        let zero = self.int("parallel.zero", raw.zero, Some(0), 0, 3, "the ZeRO stage: 0 shards nothing, 1 optimizer states, 2 also gradients, 3 also parameters");
        let offload = raw.offload.unwrap_or_default();
        let offload = Offload {
            optimizer: self.flag("parallel.offload.optimizer", offload.optimizer, false),
        };
        let recompute = self.choice("parallel.recompute", raw.recompute, Recompute::None);
        let default_schedule = if virtual_stages.is_some_and(|v| v > 1) {
            Schedule::Interleaved
        } else {
            Schedule::OneFOneB
        };
        let schedule = self.choice("parallel.schedule", raw.schedule, default_schedule);
        Some(Parallel {
            data: data?,
            tensor: tensor?,
            pipeline: pipeline?,
            virtual_stages: virtual_stages?,
            pipeline_layers: pipeline_layers?,
            sequence_parallel,
            zero: Zero::ALL[zero? as usize],
            offload,
            recompute: recompute?,
            schedule: schedule?,
        })
    }

    fn data(&mut self, raw: raw::RawData) -> Option<Data> {
        let kind = self.choice("data.kind", raw.kind, DataKind::Synthetic)?;
        let path = raw.path.map(|leaf| {
            self.places.insert("data.path", leaf.place);
            leaf.value
        });
        let sources = raw.sources.map(|leaf| {
            self.places.insert("data.sources", leaf.place);
            leaf.value
        });
        if let Some(sources) = sources {
            return self.blend(kind, path, sources);
        }
        match (kind, path) {
            (DataKind::Synthetic, path) => {
                if path.is_some() {
                    self.warnings
                        .push("data.path is ignored with data.kind: synthetic".into());
                }
                Some(Data::Synthetic)
            }
            (DataKind::Tokens, Some(path)) => Some(Data::Tokens { path }),
            (DataKind::Text, Some(path)) => Some(Data::Text { path }),
            (kind, None) => {
                let example = match kind {
                    DataKind::Tokens => "a .bin token shard or a glob such as data/train_*.bin",
                    _ => "a UTF-8 text file",
                };
                self.issues.push(Issue {
                    origin: self.sources.document(),
                    key: "data.path".into(),
                    message: format!("is required with data.kind: {kind}"),
                    help: Some(format!("add `path:` under `data:`: {example}")),
                });
                None
            }
        }
    }

    /// `data.sources`: datasets of `kind` blended by weight, instead of `data.path`.
    fn blend(
        &mut self,
        kind: DataKind,
        path: Option<String>,
        sources: Vec<raw::RawSource>,
    ) -> Option<Data> {
        const KEY: &str = "data.sources";
        if path.is_some() {
            self.fail(
                KEY,
                "and data.path are both set: a run reads one or the other".into(),
                Some("move data.path into data.sources, or remove data.sources".into()),
            );
            return None;
        }
        if kind == DataKind::Synthetic {
            self.fail(
                KEY,
                "blends files, but data.kind is synthetic".into(),
                Some("set data.kind: tokens (or text)".into()),
            );
            return None;
        }
        if sources.is_empty() {
            self.fail(
                KEY,
                "is empty".into(),
                Some("list at least one {path, weight}, or use data.path".into()),
            );
            return None;
        }
        if let Some(bad) = sources
            .iter()
            .find(|s| !s.weight.is_finite() || s.weight <= 0.0)
        {
            self.fail(
                KEY,
                format!(
                    "the weight of {} must be a positive number, got {}",
                    bad.path, bad.weight
                ),
                Some("weights are relative: [0.7, 0.3] and [7, 3] blend alike".into()),
            );
            return None;
        }
        let sources = sources
            .into_iter()
            .map(|s| {
                let data = match kind {
                    DataKind::Text => Data::Text { path: s.path },
                    _ => Data::Tokens { path: s.path },
                };
                (data, s.weight)
            })
            .collect();
        Some(Data::Blend { sources })
    }

    fn eval(&mut self, raw: raw::RawEval) -> Option<Eval> {
        let every = self.int(
            "eval.every",
            raw.every,
            Some(0),
            0,
            i64::MAX,
            "steps between evaluations of the held-out loss; 0 evaluates never",
        );
        let batches = self.count(
            "eval.batches",
            raw.batches,
            Some(4),
            100_000,
            "global batches of held-out sequences per evaluation",
        );
        let path = raw.path.map(|leaf| {
            self.places.insert("eval.path", leaf.place);
            leaf.value
        });
        Some(Eval {
            every: every? as u64,
            batches: batches?,
            path,
        })
    }

    fn checkpoint(&mut self, raw: raw::RawCheckpoint) -> Option<Checkpoint> {
        let dir = self.take(
            "checkpoint.dir",
            raw.dir,
            Some("checkpoints".to_string()),
            "",
        )?;
        if dir.trim().is_empty() {
            self.fail(
                "checkpoint.dir",
                "is empty".into(),
                Some("name a directory, e.g. `dir: checkpoints`".into()),
            );
        }
        let every = self.int(
            "checkpoint.every",
            raw.every,
            Some(100),
            0,
            i64::MAX,
            "steps between checkpoints; 0 saves none",
        );
        let keep = self.count(
            "checkpoint.keep",
            raw.keep,
            Some(3),
            1_000_000,
            "how many complete checkpoints to keep",
        );
        Some(Checkpoint {
            dir,
            every: every? as u64,
            keep: keep?,
        })
    }
}

/// The batch sizes the layout rules need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    pub(crate) global: usize,
    pub(crate) micro: usize,
}

/// A broken layout rule: the key to blame, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The key the message is about (`parallel` for a rule over several of its keys).
    pub(crate) key: &'static str,
    /// The key whose position the message points at.
    pub(crate) at: &'static str,
    pub(crate) message: String,
    pub(crate) help: Option<String>,
}

/// The rules that tie the parallel layout to the model, the batch and the cluster. Validation
/// reports them with origins; the search skips the layouts that break them.
pub(crate) fn layout_violations(
    model: &Model,
    parallel: &Parallel,
    batch: Batch,
    nodes: usize,
    gpus_per_node: usize,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let Parallel {
        data,
        tensor,
        pipeline,
        virtual_stages,
        ..
    } = *parallel;
    let world = nodes * gpus_per_node;
    let ranks = data * tensor * pipeline;
    // One machine may run fewer ranks than it has devices (torchrun's --nproc-per-node);
    // across nodes every device of every node is used.
    let part_of_one_node = nodes == 1 && ranks < gpus_per_node;
    if ranks != world && !part_of_one_node {
        let cluster = format!(
            "{world} GPUs ({nodes} node{} x {gpus_per_node})",
            if nodes == 1 { "" } else { "s" }
        );
        let fix = if world.is_multiple_of(tensor * pipeline) {
            format!(
                "for {world} GPUs with tensor {tensor} and pipeline {pipeline} use data {}",
                world / (tensor * pipeline)
            )
        } else {
            format!(
                "tensor x pipeline = {} does not divide {world}: choose tensor and pipeline whose product divides {world}, or use a multiple of {} GPUs",
                tensor * pipeline,
                tensor * pipeline
            )
        };
        out.push(Violation {
            key: "parallel",
            at: "parallel.data",
            message: format!(
                "data ({data}) x tensor ({tensor}) x pipeline ({pipeline}) = {ranks} ranks, but cluster has {cluster}; {fix}"
            ),
            help: None,
        });
    }
    let mut fail = |key: &'static str, message: String, help: Option<String>| {
        out.push(Violation {
            key,
            at: key,
            message,
            help,
        })
    };
    let tensor_fits = |t: &usize| {
        model.heads.is_multiple_of(*t)
            && model.kv_heads.is_multiple_of(*t)
            && model.ffn_hidden.is_multiple_of(*t)
            && gpus_per_node.is_multiple_of(*t)
    };
    let tensor_options = || {
        list(
            &divisors(gpus_per_node.max(1))
                .into_iter()
                .filter(tensor_fits)
                .collect::<Vec<_>>(),
        )
    };
    if !model.heads.is_multiple_of(tensor) {
        fail(
            "parallel.tensor",
            format!(
                "heads ({}) must be divisible by tensor ({tensor}): each tensor-parallel rank computes whole attention heads",
                model.heads
            ),
            Some(format!("tensor degrees that fit: {}", tensor_options())),
        );
    }
    if model.kv_heads != model.heads && !model.kv_heads.is_multiple_of(tensor) {
        fail(
            "parallel.tensor",
            format!(
                "kv_heads ({}) must be divisible by tensor ({tensor}): each tensor-parallel rank holds whole key/value heads",
                model.kv_heads
            ),
            Some(format!("tensor degrees that fit: {}", tensor_options())),
        );
    }
    if !model.ffn_hidden.is_multiple_of(tensor) {
        fail(
            "parallel.tensor",
            format!(
                "ffn_hidden ({}) must be divisible by tensor ({tensor}): each tensor-parallel rank holds an equal slice of the MLP",
                model.ffn_hidden
            ),
            Some(format!("tensor degrees that fit: {}", tensor_options())),
        );
    }
    if !gpus_per_node.is_multiple_of(tensor) {
        fail(
            "parallel.tensor",
            format!(
                "tensor ({tensor}) must divide gpus_per_node ({gpus_per_node}): a tensor-parallel group exchanges activations in every layer and must sit inside one node"
            ),
            Some(format!("tensor degrees that fit: {}", tensor_options())),
        );
    }
    let chunks = pipeline * virtual_stages;
    if let Some(split) = &parallel.pipeline_layers {
        let sum: usize = split.iter().sum();
        if split.len() != pipeline {
            fail(
                "parallel.pipeline_layers",
                format!(
                    "lists {} stages, but pipeline is {pipeline}: give one layer count per pipeline stage",
                    split.len()
                ),
                Some(format!("e.g. {:?}", even_split(model.layers, pipeline))),
            );
        } else if sum != model.layers {
            fail(
                "parallel.pipeline_layers",
                format!(
                    "its layers add up to {sum}, but the model has {} layers",
                    model.layers
                ),
                Some(format!("e.g. {:?}", even_split(model.layers, pipeline))),
            );
        }
        if virtual_stages > 1 {
            fail(
                "parallel.pipeline_layers",
                "an uneven split needs virtual_stages 1 (interleaved chunks are equal)".into(),
                Some("remove parallel.pipeline_layers, or set virtual_stages: 1".into()),
            );
        }
    } else if !model.layers.is_multiple_of(chunks) {
        let stage_options: Vec<usize> = divisors(model.layers)
            .into_iter()
            .filter(|p| p % virtual_stages == 0 || virtual_stages == 1)
            .collect();
        fail(
            "parallel.pipeline",
            format!(
                "layers ({}) must be divisible by pipeline ({pipeline}) x virtual_stages ({virtual_stages}) = {chunks} so that every stage holds the same layers",
                model.layers
            ),
            Some(format!(
                "pipeline x virtual_stages must divide {}: {}; or split unevenly with parallel.pipeline_layers: {:?}",
                model.layers,
                list(&stage_options),
                even_split(model.layers, pipeline)
            )),
        );
    }
    let per_step = data * batch.micro;
    if !batch.global.is_multiple_of(per_step) {
        let below = batch.global / per_step * per_step;
        let above = below + per_step;
        let options = if below == 0 {
            format!("{above}")
        } else {
            format!("{below} or {above}")
        };
        fail(
            "training.global_batch",
            format!(
                "global_batch ({}) must be divisible by data ({data}) x micro_batch ({}) = {per_step} so that every data-parallel rank runs whole microbatches",
                batch.global, batch.micro
            ),
            Some(format!(
                "use global_batch {options}, or another micro_batch"
            )),
        );
    }
    match parallel.schedule {
        Schedule::Interleaved => {
            if pipeline == 1 {
                fail(
                    "parallel.schedule",
                    "interleaved needs pipeline of 2 or more: it interleaves model chunks across pipeline stages".into(),
                    Some("use `schedule: 1f1b` with pipeline 1, or set parallel.pipeline to 2 or more".into()),
                );
            }
            if virtual_stages == 1 {
                fail(
                    "parallel.schedule",
                    "interleaved needs virtual_stages of 2 or more (model chunks per pipeline rank)".into(),
                    Some("set parallel.virtual_stages: 2".into()),
                );
            }
            let microbatches = batch.global / per_step;
            if pipeline > 1
                && batch.global.is_multiple_of(per_step)
                && !microbatches.is_multiple_of(pipeline)
            {
                let step = per_step * pipeline;
                fail(
                    "parallel.schedule",
                    format!(
                        "interleaved runs microbatches in groups of pipeline ({pipeline}), but global_batch / (data x micro_batch) = {microbatches} microbatches is not a multiple of {pipeline}"
                    ),
                    Some(format!(
                        "use a global_batch that is a multiple of {step}, or `schedule: 1f1b`"
                    )),
                );
            }
        }
        Schedule::Gpipe | Schedule::OneFOneB => {
            if virtual_stages > 1 {
                fail(
                    "parallel.virtual_stages",
                    format!(
                        "virtual_stages ({virtual_stages}) above 1 needs `schedule: interleaved`, but schedule is {}",
                        parallel.schedule
                    ),
                    Some("set parallel.schedule: interleaved, or virtual_stages: 1".into()),
                );
            }
        }
    }
    let microbatch_tokens = batch.micro.saturating_mul(model.seq_len);
    if microbatch_tokens > MAX_MICROBATCH_TOKENS {
        fail(
            "training.micro_batch",
            format!(
                "micro_batch x seq_len = {microbatch_tokens} tokens per microbatch is beyond any device (at most {MAX_MICROBATCH_TOKENS})"
            ),
            Some("lower micro_batch".into()),
        );
    }
    if parallel.sequence_sharded() && !microbatch_tokens.is_multiple_of(tensor) {
        fail(
            "parallel.sequence_parallel",
            format!(
                "splits the micro_batch x seq_len = {microbatch_tokens} tokens of a microbatch across tensor ({tensor}) ranks, which needs a multiple of {tensor}"
            ),
            Some("change micro_batch or seq_len, or turn sequence_parallel off".into()),
        );
    }
    out
}

/// `layers` over `stages` as evenly as can be, the larger stages first (Megatron gives the
/// last stage fewer layers, as it also runs the LM head).
pub(crate) fn even_split(layers: usize, stages: usize) -> Vec<usize> {
    let stages = stages.max(1);
    (0..stages)
        .map(|s| layers / stages + usize::from(s < layers % stages))
        .collect()
}

/// The divisors of `n`, ascending.
pub(crate) fn divisors(n: usize) -> Vec<usize> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// "1, 2, 4 or 8" (at most 12 shown).
fn list(values: &[usize]) -> String {
    let shown: Vec<String> = values.iter().take(12).map(|v| v.to_string()).collect();
    let mut text = match shown.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => "none".into(),
    };
    if values.len() > 12 {
        text.push_str(", ...");
    }
    text
}
