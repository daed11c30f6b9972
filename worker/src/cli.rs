//! The worker's command line: `tessera-worker` (and `launch worker`, which is the same code
//! inside the launcher's binary, so that `launch` can start its workers from itself).
//!
//! Started by `launch` (TESSERA_COORDINATOR in the environment) a worker registers with the
//! coordinator, gets its rank's assignment and config from it, connects to its peers and
//! trains its share; run alone (`tessera-worker --config F`) it trains a single-rank config,
//! for tests and debugging.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tessera_plan::Config;
use tessera_plan::config::{Backend as CommBackend, Device};
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::mesh::Mesh;
use tessera_proto::v1::{Beat, WorkerHello};

use crate::Error;
use crate::arena::ArenaLayout;
use crate::comm::nccl::NcclCommunicator;
use crate::comm::staged::{DeviceCopy, Staged};
use crate::comm::tcp::TcpEndpoint;
use crate::comm::{CommError, Communicator, Group};
use crate::control::{Control, LaunchEnv};
use crate::parallel::Comms;
use crate::tensor::Backend;
use crate::tensor::cpu::CpuBackend;
use crate::tensor::cuda::{CudaBackend, CudaCopy};
use crate::trace::{LastCollective, Observed, Trace};
use crate::train::{self, Rank, RunOptions, StepMetrics};

/// Train one rank of a tessera job.
///
/// Alone it runs a single-rank config (data, tensor and pipeline degrees 1) on the CPU, or on
/// GPU 0 with cluster.device=cuda: it resumes from the newest checkpoint in checkpoint.dir, prints one line per step, and
/// writes checkpoints as the config says. Exit status: 0 done, 2 bad config, data or usage, 1 a
/// failure while training.
#[derive(Debug, Parser)]
#[command(name = "tessera-worker", version, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The job's YAML config (not used when started by `launch`: the coordinator sends it).
    #[arg(long, value_name = "FILE", required_unless_present = "launched")]
    config: Option<PathBuf>,

    /// Started by `launch`: set from TESSERA_COORDINATOR, not meant to be given by hand.
    #[arg(
        long,
        hide = true,
        env = "TESSERA_COORDINATOR",
        value_name = "HOST:PORT"
    )]
    launched: Option<String>,

    /// Override a config key, validated like the file (repeatable): --set training.steps=50
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,

    /// Append one JSON line per optimizer step to FILE: step, loss, lr, grad_norm,
    /// tokens_per_s, mfu, peak_bytes.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,

    /// Stop after this many completed steps; the learning-rate schedule still spans
    /// training.steps, so a later run resumes exactly where this one stopped.
    #[arg(long, value_name = "STEP")]
    until_step: Option<u64>,

    /// Ignore existing checkpoints and start from the initial weights.
    #[arg(long)]
    fresh: bool,

    /// Threads for the CPU kernels (default: every core).
    #[arg(long, env = "TESSERA_THREADS", value_name = "N")]
    threads: Option<usize>,

    /// Write a Chrome/Perfetto trace of the run to DIR/rank-NNNNN.json (forward, backward,
    /// each collective, optimizer); open it in ui.perfetto.dev or chrome://tracing.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Compile the CUDA kernels with NVRTC into the kernel cache, so that workers start
    /// without compiling (no GPU needed: run it on a login node for the cluster's GPUs).
    ///
    /// Workers compile what the cache lacks themselves; this only moves that time out of the
    /// job. Exit status: 0 every source compiled or was cached, 1 otherwise.
    Kernels {
        /// The GPU architecture: sm_90 for H100/H200, sm_80 for A100, sm_89 for L4/L40
        /// (default: GPU 0's).
        #[arg(long, value_name = "sm_XY")]
        arch: Option<String>,

        /// The cache folder (default: $TESSERA_KERNEL_CACHE, else ~/.cache/tessera/kernels,
        /// where workers look).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
}

/// Runs the worker with `args` (the program name first) and returns its exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Some(Command::Kernels { arch, cache }) = &cli.command {
        return finish(compile_kernels(arch.as_deref(), cache.as_deref()));
    }
    finish(match LaunchEnv::from_env() {
        Ok(Some(env)) => run_launched(&cli, &env),
        Ok(None) => run(&cli),
        Err(message) => Err(usage(message)),
    })
}

/// Why the worker stops early: its exit status, its message, and whether the error is a
/// peer's failure seen through a collective (a consequence, not a cause).
struct Stop {
    code: u8,
    message: String,
    caused_by_peer: bool,
}

fn finish(result: Result<(), Stop>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop { code, message, .. }) => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
            ExitCode::from(code)
        }
    }
}

/// `tessera-worker kernels`: every source compiled (or found) in the cache, a line each.
fn compile_kernels(arch: Option<&str>, cache: Option<&std::path::Path>) -> Result<(), Stop> {
    use crate::tensor::cuda::compile;
    let arch = match arch {
        Some(arch) => arch.to_string(),
        None => crate::tensor::cuda::device_arch(0).map_err(|e| {
            usage(format!(
                "{e}\n  note: without a GPU, name the architecture: tessera-worker kernels --arch sm_90"
            ))
        })?,
    };
    let cache = cache.map(PathBuf::from).or_else(compile::default_cache);
    let (major, minor) = compile::nvrtc_version().map_err(failure)?;
    println!(
        "compiling {} kernel sources for {arch} with NVRTC {major}.{minor} into {}",
        compile::SOURCES.len(),
        cache
            .as_ref()
            .map_or("no cache (no HOME)".into(), |c| c.display().to_string())
    );
    for source in compile::SOURCES {
        let started = std::time::Instant::now();
        let cubin = compile::cubin(source, &arch, cache.as_deref()).map_err(failure)?;
        let how = if cubin.cached {
            "cached".to_string()
        } else {
            format!("compiled in {} ms", started.elapsed().as_millis())
        };
        let path = cubin
            .path
            .map_or("(not cached)".into(), |p| p.display().to_string());
        println!(
            "  {}.cu: {how}, {} bytes: {path}",
            source.name,
            cubin.bytes.len()
        );
    }
    Ok(())
}

/// A directory the run writes into (`--trace`), made now: a file in its place, or a folder it
/// may not write, is found before training instead of after it.
pub fn check_output_dir(path: &Path, flag: &str) -> Result<(), String> {
    if path.exists() && !path.is_dir() {
        return Err(format!(
            "{flag} {} is a file, but names the directory to write into\n  help: pass a \
             directory (it is made if missing), e.g. {flag} traces/",
            path.display()
        ));
    }
    writable_dir(path).map_err(|what| format!("{flag} {}: {what}", path.display()))
}

/// A file the command writes (`--metrics`, `--out`): not a directory, in a directory that
/// exists.
pub fn check_output_file(path: &Path, flag: &str) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "{flag} {} is a directory; name the file to write, e.g. {flag} {}",
            path.display(),
            path.join("out.safetensors").display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "{flag} {}: the directory {} does not exist\n  help: make it first (mkdir -p {})",
            path.display(),
            parent.display(),
            parent.display()
        ));
    }
    Ok(())
}

/// Whether checkpoints can be written to `config`'s checkpoint.dir (made if missing), checked
/// before training: a directory that cannot be written would otherwise be found at the first
/// save, possibly hours in.
pub fn check_checkpoint_dir(config: &Config) -> Result<(), String> {
    if config.checkpoint.every == 0 {
        return Ok(());
    }
    let dir = Path::new(&config.checkpoint.dir);
    writable_dir(dir).map_err(|what| {
        format!(
            "checkpoint.dir {}: {what}\n  help: point checkpoint.dir at a writable directory \
             (--set checkpoint.dir=PATH), or turn checkpoints off with --set checkpoint.every=0",
            dir.display()
        )
    })
}

/// Makes `dir` if it is missing and creates and removes a file in it; what is wrong if that
/// fails.
fn writable_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err("is a file, not a directory".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make the directory: {e}"))?;
    let probe = dir.join(format!(".tessera-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("cannot write into it: {e}"))
}

impl Stop {
    fn new(code: u8, message: impl ToString, caused_by_peer: bool) -> Stop {
        Stop {
            code,
            message: message.to_string(),
            caused_by_peer,
        }
    }
}

fn usage(error: impl ToString) -> Stop {
    Stop::new(2, error, false)
}

/// The exit status says the class, as `launch` does: 2 bad input the user can fix before
/// training (a restart would fail the same way), 3 memory that is not there (does not fit),
/// 1 anything else.
fn failure(error: Error) -> Stop {
    let code = match error {
        Error::Plan(_)
        | Error::Unsupported { .. }
        | Error::DataIo { .. }
        | Error::DataNoFiles { .. }
        | Error::DataFormat { .. } => 2,
        Error::Allocation { .. } => 3,
        _ => 1,
    };
    let caused_by_peer = match &error {
        Error::Comm(comm) => !matches!(**comm, CommError::Invalid { .. }),
        _ => false,
    };
    Stop::new(code, error, caused_by_peer)
}

fn run(cli: &Cli) -> Result<(), Stop> {
    let path = cli
        .config
        .as_ref()
        .ok_or_else(|| usage("--config FILE is required"))?;
    let shown = path.display();
    let text = crate::config_file::read(path).map_err(usage)?;
    let config = Config::from_yaml(&shown.to_string(), &text, &cli.sets).map_err(usage)?;
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    train::check_single_rank(&config).map_err(failure)?;
    if config.cluster.device == Device::Cuda {
        crate::tensor::cuda::check_config(&config).map_err(failure)?;
    }
    start_threads(cli.threads)?;
    let plan = tessera_plan::memory::StagePlan::new(&config, 0);
    let layout = ArenaLayout::new(&plan);
    match config.cluster.device {
        Device::Cpu => {
            let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host))
                .map_err(failure)?;
            train_alone(cli, config, &layout, backend)
        }
        Device::Cuda => {
            let backend = cuda_backend(&layout, 0)?;
            train_alone(cli, config, &layout, backend)
        }
    }
}

/// The CUDA backend on GPU `ordinal`, with the plan's arenas.
fn cuda_backend(layout: &ArenaLayout, ordinal: usize) -> Result<CudaBackend, Stop> {
    let cache = crate::tensor::cuda::compile::default_cache();
    CudaBackend::new(
        ordinal,
        layout.bytes(Place::Device),
        layout.bytes(Place::Host),
        cache.as_deref(),
    )
    .map_err(failure)
}

fn train_alone<B: Backend>(
    cli: &Cli,
    config: Config,
    layout: &ArenaLayout,
    backend: B,
) -> Result<(), Stop> {
    // What the run will write, checked before it trains (after the device is known to work:
    // the checks make missing directories).
    if let Some(dir) = &cli.trace {
        check_output_dir(dir, "--trace").map_err(usage)?;
    }
    if let Some(file) = &cli.metrics {
        check_output_file(file, "--metrics").map_err(usage)?;
    }
    check_checkpoint_dir(&config).map_err(usage)?;
    let steps = config.training.steps;
    let mut rank = Rank::new(config, backend).map_err(failure)?;
    rank.trace = cli.trace.as_ref().map(|_| Trace::new(0));
    println!(
        "arena: {} device + {} host bytes, as planned",
        layout.bytes(Place::Device),
        layout.bytes(Place::Host)
    );
    let options = RunOptions {
        metrics: cli.metrics.clone(),
        until_step: cli.until_step,
        fresh: cli.fresh,
        trace: cli.trace.clone(),
    };
    let mut first = true;
    train::run(rank, &options, |rank, m| {
        let mfu = m
            .mfu
            .map_or(String::new(), |mfu| format!(" | MFU {:.1}%", mfu * 100.0));
        let val = m
            .val_loss
            .map_or(String::new(), |v| format!(" | val loss {v:.6}"));
        println!(
            "step {:>6}/{steps} | loss {:.6}{val} | lr {:.3e} | grad norm {:.4} | {:.0} tok/s{mfu}",
            m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
        // The plan's promise, checked where it can be: the GPU's own count after a step.
        if std::mem::take(&mut first)
            && let Some(measured) = rank.backend.measured_device_bytes()
        {
            let planned = rank.stage.device_bytes();
            println!(
                "device memory after the first step: {measured} bytes in use on the GPU, {planned} \
                 planned (arena + runtime rows of the dry-run), {:+.2}%",
                (measured as f64 / planned as f64 - 1.0) * 100.0
            );
        }
    })
    .map_err(failure)?;
    Ok(())
}

fn start_threads(threads: Option<usize>) -> Result<(), Stop> {
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .map_err(|e| usage(format!("cannot start {threads} threads: {e}")))?;
    }
    Ok(())
}

fn runtime_error(message: impl ToString) -> Stop {
    Stop::new(1, message, false)
}

/// A collective's failure or a group that could not be set up: what this rank saw of a peer
/// that died, hung or never started.
fn peer_failure(error: CommError) -> Stop {
    Stop::new(1, error, true)
}

/// One rank of a run started by `launch`. Its last beat says how it ended: finished, or the
/// error it stops with (so that the launcher can tell a cause from its consequences).
fn run_launched(cli: &Cli, env: &LaunchEnv) -> Result<(), Stop> {
    let mut control = Control::connect(env, Duration::from_secs(30)).map_err(runtime_error)?;
    match launched(cli, env, &mut control) {
        Ok(last) => {
            control.finish(last);
            Ok(())
        }
        Err(stop) => {
            control.fail(env.rank, &stop.message, stop.caused_by_peer);
            Err(stop)
        }
    }
}

/// Registers, joins the mesh and trains; returns the final beat.
fn launched(cli: &Cli, env: &LaunchEnv, control: &mut Control) -> Result<Beat, Stop> {
    // Peers on other nodes reach this worker at TESSERA_COMM_HOST (the node's address); a
    // local run keeps everything on the loopback interface.
    let host = std::env::var("TESSERA_COMM_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let endpoint = TcpEndpoint::bind(&host, &env.token).map_err(runtime_error)?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let assignment = control
        .register(WorkerHello {
            rank: env.rank,
            comm_address: endpoint.address().to_string(),
            hostname,
            pid: std::process::id(),
        })
        .map_err(runtime_error)?;
    let config = Config::from_yaml(
        &assignment.config_name,
        &assignment.config_yaml,
        &assignment.config_sets,
    )
    .map_err(usage)?;
    start_threads(cli.threads)?;

    let rank = assignment.rank as usize;
    let mesh = Mesh::from_config(&config);
    if mesh.world_size() != assignment.world_size as usize
        || assignment.peer_addresses.len() != mesh.world_size()
    {
        return Err(runtime_error(format!(
            "the coordinator's assignment has {} ranks and {} peers, but the config's mesh has {}",
            assignment.world_size,
            assignment.peer_addresses.len(),
            mesh.world_size()
        )));
    }
    let peers = assignment
        .peer_addresses
        .iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| runtime_error(format!("peer address `{a}` is not HOST:PORT")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_millis(assignment.collective_timeout_ms.into());
    let trace = cli.trace.as_ref().map(|_| Trace::new(rank));
    let last = LastCollective::default();
    // Beating from here on lets the launcher tell a rank that hangs while connecting or
    // loading a checkpoint from one that is merely slow.
    control
        .start_heartbeat(env.rank, last.clone(), config.watchdog.heartbeat)
        .map_err(runtime_error)?;
    // Every rank writes its own checkpoint file and trace: each checks where, before training.
    if let Some(dir) = &cli.trace {
        check_output_dir(dir, "--trace").map_err(usage)?;
    }
    check_checkpoint_dir(&config).map_err(usage)?;
    // Ranks share the node's GPUs round-robin (one each when there are enough; several ranks
    // on one GPU talk over TCP staged through the host).
    let gpu = match config.cluster.device {
        Device::Cuda => {
            crate::tensor::cuda::check_config(&config).map_err(failure)?;
            let gpus = crate::tensor::cuda::device_count().map_err(failure)?;
            Some(env.local_rank as usize % gpus)
        }
        Device::Cpu => None,
    };
    let staging: Option<Arc<dyn DeviceCopy>> = match gpu {
        Some(gpu) => Some(Arc::new(CudaCopy::new(gpu).map_err(failure)?)),
        None => None,
    };
    let nccl = config.cluster.backend == CommBackend::Nccl;
    let comms = Comms::connect(
        rank,
        &config,
        assignment.run_id.clone(),
        &mut |group: Group| {
            let communicator: Box<dyn Communicator> = match (gpu, &staging) {
                (Some(gpu), _) if nccl => {
                    let id = control.nccl_id(&group).map_err(|what| CommError::Setup {
                        group: group.name.clone(),
                        what,
                        help: "the coordinator hands out each NCCL group's id; its log says \
                               more"
                            .into(),
                    })?;
                    Box::new(NcclCommunicator::new(group, gpu, id, timeout)?)
                }
                (_, staging) => {
                    let addresses: Vec<SocketAddr> =
                        group.ranks.iter().map(|&r| peers[r]).collect();
                    let tcp = Box::new(endpoint.communicator(group, &addresses, timeout)?);
                    match staging {
                        // Device buffers travel through the host (several ranks per GPU).
                        Some(device) => Box::new(Staged::new(tcp, device.clone())),
                        None => tcp,
                    }
                }
            };
            Ok(Box::new(Observed::new(
                communicator,
                last.clone(),
                trace.clone(),
            )))
        },
    )
    .map_err(peer_failure)?;
    let coord = comms.coord;

    let plan = StagePlan::new(&config, coord.pp_rank);
    let layout = ArenaLayout::new(&plan);
    let planned = assignment.planned_device_bytes;
    if layout.bytes(Place::Device) as u64 != planned {
        return Err(runtime_error(format!(
            "this worker lays out {} device bytes but the launcher planned {planned}: the launcher \
             and the worker are different tessera versions",
            layout.bytes(Place::Device)
        )));
    }
    match gpu {
        None => {
            let backend = CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host))
                .map_err(failure)?;
            train_in_mesh(cli, env, control, config, comms, backend, (trace, last))
        }
        Some(gpu) => {
            let backend = cuda_backend(&layout, gpu)?;
            train_in_mesh(cli, env, control, config, comms, backend, (trace, last))
        }
    }
}

/// The training loop of a launched rank, once its backend and communicators exist.
fn train_in_mesh<B: Backend>(
    cli: &Cli,
    env: &LaunchEnv,
    control: &Control,
    config: Config,
    comms: Comms,
    backend: B,
    (trace, last): (Option<Trace>, LastCollective),
) -> Result<Beat, Stop> {
    let steps = config.training.steps;
    let mut rank_state = Rank::in_mesh(config, backend, comms).map_err(failure)?;
    rank_state.trace = trace;
    let options = RunOptions {
        metrics: None,
        until_step: cli.until_step,
        fresh: cli.fresh,
        trace: cli.trace.clone(),
    };
    let beat = |m: &StepMetrics, finished: bool| Beat {
        rank: env.rank,
        step: m.step,
        loss: m.loss,
        lr: m.lr,
        grad_norm: m.grad_norm,
        tokens_per_s: m.tokens_per_s,
        mfu: m.mfu,
        val_loss: m.val_loss,
        peak_bytes: m.peak_bytes,
        arena_bytes: m.peak_bytes,
        last_collective: last.get(),
        finished,
        ..Beat::default()
    };
    let summary =
        train::run(rank_state, &options, |_, m| control.beat(beat(m, false))).map_err(failure)?;
    let last = summary.metrics.last().copied();
    Ok(match last {
        Some(m) => beat(&m, true),
        None => {
            if env.rank == 0 {
                println!(
                    "nothing to train: the checkpoint is already at step {steps} of training.steps \
                     {steps}; pass --fresh to start over, or raise training.steps"
                );
            }
            // Step 0: no step was trained by this run.
            Beat {
                rank: env.rank,
                finished: true,
                ..Beat::default()
            }
        }
    })
}
