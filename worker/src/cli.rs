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
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tessera_plan::Config;
use tessera_plan::config::Device;
use tessera_plan::memory::{Place, StagePlan};
use tessera_plan::mesh::Mesh;
use tessera_proto::v1::{Beat, WorkerHello};

use crate::Error;
use crate::arena::ArenaLayout;
use crate::comm::tcp::TcpEndpoint;
use crate::comm::{Communicator, Group};
use crate::control::{Control, LaunchEnv};
use crate::parallel::Comms;
use crate::tensor::cpu::CpuBackend;
use crate::trace::{LastCollective, Observed, Trace};
use crate::train::{self, Rank, RunOptions, StepMetrics};

/// Train one rank of a tessera job.
///
/// Alone it runs a single-rank config (data, tensor and pipeline degrees 1) on CPU workers:
/// it resumes from the newest checkpoint in checkpoint.dir, prints one line per step, and
/// writes checkpoints as the config says. Exit status: 0 done, 2 bad config, data or usage, 1 a
/// failure while training.
#[derive(Debug, Parser)]
#[command(name = "tessera-worker", version)]
struct Cli {
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

/// Runs the worker with `args` (the program name first) and returns its exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match LaunchEnv::from_env() {
        Ok(Some(env)) => run_launched(&cli, &env),
        Ok(None) => run(&cli),
        Err(message) => Err(usage(message)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
            ExitCode::from(code)
        }
    }
}

fn usage(error: impl ToString) -> (u8, String) {
    (2, error.to_string())
}

fn failure(error: Error) -> (u8, String) {
    let code = match error {
        // Bad input the user can fix before training: the same status as a bad config.
        Error::Plan(_)
        | Error::Unsupported { .. }
        | Error::DataIo { .. }
        | Error::DataNoFiles { .. }
        | Error::DataFormat { .. } => 2,
        _ => 1,
    };
    (code, error.to_string())
}

fn run(cli: &Cli) -> Result<(), (u8, String)> {
    let path = cli
        .config
        .as_ref()
        .ok_or_else(|| usage("--config FILE is required"))?;
    let shown = path.display();
    let bytes =
        std::fs::read(path).map_err(|e| usage(format!("cannot read config file {shown}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        usage(format!(
            "config file {shown} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let config = Config::from_yaml(&shown.to_string(), &text, &cli.sets).map_err(usage)?;
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    check_device(&config)?;
    train::check_single_rank(&config).map_err(failure)?;
    start_threads(cli.threads)?;
    let plan = tessera_plan::memory::StagePlan::new(&config, 0);
    let layout = ArenaLayout::new(&plan);
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).map_err(failure)?;
    let steps = config.training.steps;
    let mut rank = Rank::new(config, backend).map_err(failure)?;
    rank.trace = cli.trace.as_ref().map(|_| Trace::new(0));
    println!(
        "arena: {} device + {} host bytes, as planned",
        layout.bytes(Place::Device),
        layout.bytes(Place::Host)
    );
    if !cli.fresh {
        let dir = std::path::Path::new(&rank.config.checkpoint.dir);
        if let Some(path) = crate::checkpoint::latest(dir).map_err(failure)? {
            println!("resuming from {}", path.display());
        }
    }
    let options = RunOptions {
        metrics: cli.metrics.clone(),
        until_step: cli.until_step,
        fresh: cli.fresh,
        trace: cli.trace.clone(),
    };
    train::run(rank, &options, |_, m| {
        println!(
            "step {:>6}/{steps} | loss {:.6} | lr {:.3e} | grad norm {:.4} | {:.0} tok/s",
            m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
    })
    .map_err(failure)?;
    Ok(())
}

fn check_device(config: &Config) -> Result<(), (u8, String)> {
    if config.cluster.device != Device::Cpu {
        return Err(usage(
            "cluster.device is cuda, but this build's worker has the CPU backend only (the CUDA backend is \
             issue 8); use --set cluster.device=cpu --set cluster.backend=tcp",
        ));
    }
    Ok(())
}

fn start_threads(threads: Option<usize>) -> Result<(), (u8, String)> {
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .map_err(|e| usage(format!("cannot start {threads} threads: {e}")))?;
    }
    Ok(())
}

fn runtime_error(message: impl ToString) -> (u8, String) {
    (1, message.to_string())
}

/// One rank of a run started by `launch`.
fn run_launched(cli: &Cli, env: &LaunchEnv) -> Result<(), (u8, String)> {
    let mut control = Control::connect(env, Duration::from_secs(30)).map_err(runtime_error)?;
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
    check_device(&config)?;
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
    let comms = Comms::connect(
        rank,
        &config,
        assignment.run_id.clone(),
        &mut |group: Group| {
            let addresses: Vec<SocketAddr> = group.ranks.iter().map(|&r| peers[r]).collect();
            let communicator = Box::new(endpoint.communicator(group, &addresses, timeout)?);
            Ok(
                Box::new(Observed::new(communicator, last.clone(), trace.clone()))
                    as Box<dyn Communicator>,
            )
        },
    )
    .map_err(runtime_error)?;
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
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).map_err(failure)?;
    let steps = config.training.steps;
    let mut rank_state = Rank::in_mesh(config, backend, comms).map_err(failure)?;
    rank_state.trace = trace;
    if rank == 0 && !cli.fresh {
        let dir = std::path::Path::new(&rank_state.config.checkpoint.dir);
        if let Some(path) = crate::checkpoint::latest(dir).map_err(failure)? {
            println!("resuming from {}", path.display());
        }
    }
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
        peak_bytes: m.peak_bytes,
        arena_bytes: m.peak_bytes,
        last_collective: last.get(),
        finished,
    };
    let summary =
        train::run(rank_state, &options, |_, m| control.beat(beat(m, false))).map_err(failure)?;
    let last = summary.metrics.last().copied();
    control.finish(match last {
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
    });
    Ok(())
}
