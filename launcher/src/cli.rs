//! The command line: `launch --config F [--dry-run]`, `launch search`, `launch export`,
//! `launch agent` and `launch certs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Plans, starts and supervises tessera training jobs.
///
/// `launch --config job.yaml` trains the job on this machine: it starts a coordinator, one
/// worker process per rank (their output prefixed `[rank N]`), shows progress, checkpoints as
/// the config says and resumes from the newest checkpoint in checkpoint.dir. A worker that
/// fails, or goes silent for watchdog.heartbeat_timeout seconds (hung or stopped), stops them
/// all, naming it and each rank's last collective; with restart.max above 0 the job then
/// starts again from the newest checkpoint, up to that many times. Ctrl-C stops everything.
///
/// `launch --config job.yaml --dry-run` prints every rank's exact memory plan: parameters,
/// gradients, optimizer states, activations, workspace and communication buffers, against the
/// device's capacity.
///
/// Exit status: 0 success (or the plan fits), 1 a failure while running, 2 the config or the
/// command line is wrong, 3 the plan does not fit, 130 interrupted.
#[derive(Debug, Parser)]
#[command(
    name = "launch",
    version,
    propagate_version = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub job: JobArgs,

    #[command(flatten)]
    pub report: ReportArgs,

    #[command(flatten)]
    pub run: RunArgs,
}

/// How a run (without --dry-run) behaves.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Append one JSON line per optimizer step to FILE: step, loss, lr, grad_norm,
    /// tokens_per_s, mfu, peak_bytes.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,

    /// Start from the initial weights even if checkpoint.dir has a checkpoint.
    #[arg(long)]
    pub fresh: bool,

    /// Kernel threads per CPU worker [default: the machine's cores divided among the workers].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Write a Chrome/Perfetto trace per rank to DIR/rank-NNNNN.json: forward, backward, each
    /// collective (per process group) and the optimizer. Open in ui.perfetto.dev.
    #[arg(long, value_name = "DIR")]
    pub trace: Option<PathBuf>,

    /// Leave the workers to node agents (`launch agent --coordinator HOST:PORT` on each
    /// node) and listen for them here [default when cluster.nodes is above 1: 0.0.0.0:29400].
    /// With one node too, this is how Slurm and Kubernetes start a job.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find every parallel layout of the config's model that fits N GPUs, ranked by predicted
    /// throughput.
    ///
    /// Tries every data x tensor x pipeline split, interleaving, ZeRO stage, recompute mode,
    /// micro_batch and optimizer offload; keeps those whose exact memory plan fits with the
    /// config's headroom; predicts each one's step time (see `plan::search` for the model).
    /// Exit status 3 when nothing fits.
    Search(SearchArgs),

    /// Write a checkpoint's model as one safetensors file of global f32 tensors.
    ///
    /// Reassembles the weights the ranks of a run saved (tensor shards, pipeline stages,
    /// ZeRO 3 shards) into the tensors one process holds, named `wte`, `wpe`,
    /// `layers.N.qkv_w`, ..., `lnf_w`, `lnf_b` (GPT-2's layout, PyTorch's (out, in) weights),
    /// without the vocabulary's padding rows. Give the config (and --set) of the run's model;
    /// its parallel layout is read from the checkpoint.
    Export(ExportArgs),

    /// Generate text from a checkpoint of the job's model, in one CPU process.
    ///
    /// Loads the newest checkpoint in checkpoint.dir (or --checkpoint; any mesh, ZeRO stage or
    /// pipeline), runs the prompt's forward and then one token at a time through a key/value
    /// cache, printing each token as it comes. The same --seed, prompt and checkpoint give the
    /// same text. Models with a byte-level vocabulary (up to 256 ids: data.kind text, or the
    /// synthetic demo) take the prompt's UTF-8 bytes as token ids; text data's tokens print
    /// as text, other data's as ids.
    Sample(SampleArgs),

    /// Run this node's workers for a job across nodes.
    ///
    /// One agent per node (started by srun, a Kubernetes pod or ssh) registers with the
    /// coordinator of `launch --config F` on the head node, gets this node's ranks, starts one
    /// worker per rank, relays their output prefixed `[rank N]`, reports their exits, and stops
    /// them when the coordinator says so or when it loses the coordinator. It reports the
    /// node's GPUs and their free memory: a CUDA run refuses a node that cannot hold its share.
    /// TESSERA_TOKEN must hold the same secret on every node and on the head. When the head's
    /// config has cluster.tls, give the agent this node's certificate too (--tls-ca, --tls-cert,
    /// --tls-key, as `launch certs` made them); its workers get them in TESSERA_TLS_CA,
    /// TESSERA_TLS_CERT and TESSERA_TLS_KEY. Exits 0 when all its workers finished, 1 otherwise.
    Agent(AgentArgs),

    /// Make a CA and a certificate per host for TLS on the control plane (cluster.tls).
    ///
    /// Without TLS the run's token and every control message cross the network in plain text.
    /// With it the coordinator accepts only clients that present a certificate of this CA,
    /// and agents and workers accept only a coordinator whose certificate the CA made for the
    /// name they dial. Writes into DIR: ca.pem (the CA certificate every node trusts),
    /// ca-key.pem (the CA's key: it only makes certificates, keep it off the cluster), and
    /// for each host HOST.pem and HOST-key.pem. Keys are written with mode 0600.
    ///
    /// List each host as the others reach it: a host name or an IP address (the head's as in
    /// `launch agent --coordinator HEAD:PORT`); `localhost` also covers 127.0.0.1 and ::1, for
    /// a run on one machine. Every certificate serves as server and client certificate. Then:
    ///
    ///   head:       cluster: {tls: {ca: DIR/ca.pem, cert: DIR/HEAD.pem, key: DIR/HEAD-key.pem}}
    ///
    ///   each node:  launch agent --coordinator HEAD:29400 --tls-ca DIR/ca.pem --tls-cert
    ///               DIR/NODE.pem --tls-key DIR/NODE-key.pem
    ///
    /// On Slurm put DIR on the shared filesystem; on Kubernetes make it a Secret mounted into
    /// the pods (README: "TLS"). An existing non-empty DIR is refused unless --force.
    Certs(CertsArgs),
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// The directory to write the files to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// The head and every node, comma-separated, as the others reach them: host names or IP
    /// addresses.
    #[arg(long, value_name = "HOST,...", value_delimiter = ',', required = true)]
    pub hosts: Vec<String>,

    /// Days the certificates are valid.
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    pub days: u32,

    /// Write into a non-empty DIR, replacing files of the same names.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The coordinator: the head node's address and its `--listen` port.
    #[arg(long, value_name = "HOST:PORT", env = "TESSERA_COORDINATOR")]
    pub coordinator: String,

    /// This node's address as the other nodes reach it [default: the local address of the
    /// connection to the coordinator].
    #[arg(long, value_name = "ADDR")]
    pub host: Option<String>,

    /// Seconds to keep trying to reach the coordinator (the head may start after the agents).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub wait: u64,

    /// Kernel threads per CPU worker [default: this node's cores divided among its workers].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// With TLS (the head's cluster.tls): the CA certificate (ca.pem of `launch certs`).
    #[arg(long, value_name = "FILE", env = "TESSERA_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// With TLS: this node's certificate (HOST.pem), which the agent and its workers present.
    #[arg(long, value_name = "FILE", env = "TESSERA_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,

    /// With TLS: this node's private key (HOST-key.pem).
    #[arg(long, value_name = "FILE", env = "TESSERA_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// The checkpoint directory (step-NNNNNNNN) [default: the newest in checkpoint.dir].
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// The safetensors file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// The checkpoint directory (step-NNNNNNNN) [default: the newest in checkpoint.dir].
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// The text to continue.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,

    /// Tokens to generate (fewer if the model's seq_len fills up first).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub tokens: usize,

    /// Divides the logits before the draw; 0 takes the most likely token every time.
    #[arg(long, value_name = "T", default_value_t = 1.0)]
    pub temperature: f32,

    /// Draw among the K most likely tokens only; 0 draws among all of them.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,

    /// The draws' seed: the same seed gives the same text.
    #[arg(long, value_name = "S", default_value_t = 1234)]
    pub seed: u64,
}

/// The job: its config and overrides.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's YAML config. Without it, the built-in configs/tiny-cpu.yaml is used.
    #[arg(short, long, value_name = "FILE", env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,

    /// Override a config key, validated like the file: --set parallel.data=2 --set
    /// training.steps=50 (repeatable; later ones win).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// What `--dry-run` prints (each is refused without `--dry-run`).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Print the per-rank memory plan and exit without starting anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Output format of the plan (with --dry-run) [default: table].
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Also draw the plan as an SVG stacked-bar chart per pipeline stage (with --dry-run).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// List every buffer of this rank (with --dry-run and the table format).
    #[arg(long, value_name = "RANK")]
    pub rank: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    Table,
    /// One JSON document, for tools (the dry-run's lists every rank).
    Json,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Number of GPUs (or CPU workers) to plan for. Nodes hold cluster.gpus_per_node of them.
    #[arg(long, value_name = "N")]
    pub gpus: usize,

    /// Memory of one device, e.g. 80GiB or 40GB [default: the config's cluster.gpu_memory].
    #[arg(long, value_name = "SIZE")]
    pub gpu_memory: Option<String>,

    /// How many of the fastest layouts to show.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Dense peak TFLOP/s of one device, for MFU [default: 989 on cuda (H100 bf16)].
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,

    /// TFLOP/s a tuned run reaches on one device [default: 495 on cuda, half of peak].
    #[arg(long, value_name = "TFLOPS")]
    pub achievable_tflops: Option<f64>,

    /// Collective bus bandwidth inside a node, GB/s [default: 360 on cuda (NVLink 4)].
    #[arg(long, value_name = "GB/S")]
    pub intra_node_gbps: Option<f64>,

    /// Collective bus bandwidth across nodes per device, GB/s [default: 45 on cuda (400 Gb/s IB)].
    #[arg(long, value_name = "GB/S")]
    pub inter_node_gbps: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
