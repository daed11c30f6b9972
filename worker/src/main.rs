//! `tessera-worker`: one training rank. `launch` starts one per device; run alone
//! (`tessera-worker --config F`) it trains a single-rank config, for tests and debugging.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tessera_plan::Config;
use tessera_plan::config::Device;
use tessera_plan::memory::Place;
use tessera_worker::Error;
use tessera_worker::arena::ArenaLayout;
use tessera_worker::tensor::cpu::CpuBackend;
use tessera_worker::train::{self, Rank, RunOptions};

/// Train one rank of a tessera job.
///
/// Alone it runs a single-rank config (data, tensor and pipeline degrees 1) on CPU workers:
/// it resumes from the newest checkpoint in checkpoint.dir, prints one line per step, and
/// writes checkpoints as the config says. Exit status: 0 done, 2 bad config, data or usage, 1 a
/// failure while training.
#[derive(Debug, Parser)]
#[command(name = "tessera-worker", version)]
struct Cli {
    /// The job's YAML config.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
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
    let shown = cli.config.display();
    let bytes = std::fs::read(&cli.config)
        .map_err(|e| usage(format!("cannot read config file {shown}: {e}")))?;
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
    if config.cluster.device != Device::Cpu {
        return Err(usage(
            "cluster.device is cuda, but this build's worker has the CPU backend only (the CUDA backend is \
             issue 8); use --set cluster.device=cpu --set cluster.backend=tcp",
        ));
    }
    train::check_single_rank(&config).map_err(failure)?;
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .map_err(|e| usage(format!("cannot start {threads} threads: {e}")))?;
    }
    let plan = tessera_plan::memory::StagePlan::new(&config, 0);
    let layout = ArenaLayout::new(&plan);
    let backend =
        CpuBackend::new(layout.bytes(Place::Device), layout.bytes(Place::Host)).map_err(failure)?;
    let steps = config.training.steps;
    let rank = Rank::new(config, backend).map_err(failure)?;
    println!(
        "arena: {} device + {} host bytes, as planned",
        layout.bytes(Place::Device),
        layout.bytes(Place::Host)
    );
    if !cli.fresh {
        let dir = std::path::Path::new(&rank.config.checkpoint.dir);
        if let Some(path) = tessera_worker::checkpoint::latest(dir).map_err(failure)? {
            println!("resuming from {}", path.display());
        }
    }
    let options = RunOptions {
        metrics: cli.metrics.clone(),
        until_step: cli.until_step,
        fresh: cli.fresh,
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
