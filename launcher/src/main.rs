//! `launch`: plans, starts and supervises tessera training jobs.
//!
//! `--dry-run` prints every rank's exact memory plan (table, JSON or SVG) and `search` ranks
//! the layouts that fit; the logic lives in `tessera-plan`. Without `--dry-run`, `run` starts
//! the gRPC `coordinator`, spawns and watches the workers (`agent`) and shows `progress`.
//! The workers are this same binary (`launch worker`, the code of `tessera_worker::cli`), so
//! one executable is all a machine needs. `exit.rs` maps outcomes to exit statuses.

use tessera_launcher::{cli, config_file, dryrun, exit, run as run_job, search, svg};

use std::fs;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tessera_plan::memory::MemoryPlan;
use tessera_worker::checkpoint;

use cli::{Cli, Command, Format};
use exit::Failure;

fn main() -> ExitCode {
    // `launch worker ...` is how `launch` starts its workers: the worker's own command line.
    let mut args = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "worker") {
        let program = args.next().unwrap_or_default();
        return tessera_worker::cli::main(std::iter::once(program).chain(args.skip(1)));
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // A broken pipe (`launch ... | head`) is not worth a message.
            let _ = writeln!(std::io::stderr(), "error: {failure}");
            failure.code()
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Some(Command::Search(args)) => search::run(&args),
        Some(Command::Export(args)) => export(&args),
        Some(Command::Sample(args)) => sample(&args),
        Some(Command::Agent(args)) => tessera_launcher::node::run_agent(&args),
        Some(Command::Certs(args)) => tessera_launcher::certs::run(&args),
        None => {
            let loaded = config_file::load(cli.job.config.as_deref(), &cli.job.sets)?;
            for warning in &loaded.config.warnings {
                eprintln!("warning: {warning}");
            }
            if !cli.report.dry_run {
                refuse_report_flags(&cli.report)?;
                let options = run_job::RunOptions {
                    metrics: cli.run.metrics.clone(),
                    fresh: cli.run.fresh,
                    listen: cli.run.listen,
                    threads: cli.run.threads,
                    trace: cli.run.trace.clone(),
                };
                return run_job::run_local(&loaded, &options);
            }
            dry_run(&loaded, &cli.report)
        }
    }
}

fn export(args: &cli::ExportArgs) -> Result<(), Failure> {
    // Before the consolidation, which reads the whole checkpoint.
    check_output_file(&args.out, "--out")?;
    let loaded = config_file::load(args.job.config.as_deref(), &args.job.sets)?;
    let config = &loaded.config;
    let checkpoint = checkpoint_dir(args.checkpoint.as_deref(), config)?;
    // The checkpoint's own layout (mesh, ZeRO, virtual stages) places the tensors, whatever the
    // config says about them now.
    let usage = |e: tessera_worker::Error| Failure::usage(e.to_string());
    let manifest = checkpoint::read_manifest(&checkpoint, config).map_err(usage)?;
    let written = checkpoint::export::written_config(&manifest, config);
    let model = checkpoint::export::Files::read(&checkpoint, &manifest)
        .consolidate(&written, checkpoint::export::State::Params)
        .map_err(usage)?
        .expect("invariant: every checkpoint has parameters");
    // The error's message already holds its cause: no second copy from the source chain.
    checkpoint::export::write(&model, &args.out)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("{e}")))?;
    let elements: usize = model.values().map(|t| t.values.len()).sum();
    println!(
        "wrote {}: {} tensors, {elements} parameters, from {}",
        args.out.display(),
        model.len(),
        checkpoint.display()
    );
    Ok(())
}

/// The checkpoint `given`, or the newest in the config's checkpoint.dir.
fn checkpoint_dir(
    given: Option<&std::path::Path>,
    config: &tessera_plan::Config,
) -> Result<std::path::PathBuf, Failure> {
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    let dir = std::path::Path::new(&config.checkpoint.dir);
    checkpoint::latest(dir)
        .map_err(|e| Failure::usage(e.to_string()))?
        .ok_or_else(|| {
            Failure::usage(format!(
                "no checkpoint in {} (checkpoint.dir); pass --checkpoint DIR",
                dir.display()
            ))
        })
}

fn sample(args: &cli::SampleArgs) -> Result<(), Failure> {
    use std::io::Write as _;
    use tessera_worker::sample::{Sampling, generate, load, sampler_config};

    let loaded = config_file::load(args.job.config.as_deref(), &args.job.sets)?;
    let config = &loaded.config;
    let vocab = config.model.vocab;
    if vocab > 256 {
        return Err(Failure::usage(format!(
            "model.vocab is {vocab}: the prompt needs the run's tokenizer, and this run has none \
             (only byte-level vocabularies of up to 256 ids take text as bytes)"
        )));
    }
    let checkpoint = checkpoint_dir(args.checkpoint.as_deref(), config)?;
    let usage = |e: tessera_worker::Error| Failure::usage(e.to_string());
    let manifest = checkpoint::read_manifest(&checkpoint, config).map_err(usage)?;
    let written = checkpoint::export::written_config(&manifest, config);
    let model = checkpoint::export::Files::read(&checkpoint, &manifest)
        .consolidate(&written, checkpoint::export::State::Params)
        .map_err(usage)?
        .expect("invariant: every checkpoint has parameters");
    let one = sampler_config(config);
    let layout =
        tessera_worker::arena::ArenaLayout::new(&tessera_plan::memory::StagePlan::new(&one, 0));
    let runtime = |e: tessera_worker::Error| Failure::Runtime(anyhow::anyhow!("{e}"));
    let backend = tessera_worker::tensor::cpu::CpuBackend::new(
        layout.bytes(tessera_plan::memory::Place::Device),
        layout.bytes(tessera_plan::memory::Place::Host),
    )
    .map_err(runtime)?;
    let mut rank = tessera_worker::train::Rank::new(one, backend).map_err(runtime)?;
    load(&mut rank, &model).map_err(usage)?;
    let prompt: Vec<i32> = args.prompt.bytes().map(i32::from).collect();
    let sampling = Sampling {
        tokens: args.tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    eprintln!("sampling from {}", checkpoint.display());
    let mut out = std::io::stdout().lock();
    let write = |out: &mut std::io::StdoutLock, bytes: &[u8]| {
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| tessera_worker::Error::Unsupported {
                what: format!("cannot write the sample: {e}"),
                help: "check standard output".into(),
            })
    };
    // Text data's ids are its bytes; other byte-level data (the synthetic chain) is no text,
    // so its ids are printed as numbers.
    let text = match &config.data {
        tessera_plan::config::Data::Text { .. } => true,
        tessera_plan::config::Data::Blend { sources } => sources
            .iter()
            .all(|(d, _)| matches!(d, tessera_plan::config::Data::Text { .. })),
        _ => false,
    };
    if text {
        write(&mut out, args.prompt.as_bytes()).map_err(runtime)?;
    } else {
        let ids: Vec<String> = prompt.iter().map(i32::to_string).collect();
        write(&mut out, format!("[{}]", ids.join(" ")).as_bytes()).map_err(runtime)?;
    }
    generate(&mut rank, &prompt, &sampling, |token| {
        if text {
            // A UTF-8 character split over tokens shows once it is whole.
            write(&mut out, &[token as u8])
        } else {
            write(&mut out, format!(" {token}").as_bytes())
        }
    })
    .map_err(|e| match e {
        tessera_worker::Error::Unsupported { .. } => usage(e),
        other => runtime(other),
    })?;
    write(&mut out, b"\n").map_err(runtime)?;
    Ok(())
}

/// A file the command will write: not a directory, in a directory that exists.
fn check_output_file(path: &std::path::Path, flag: &str) -> Result<(), Failure> {
    tessera_worker::cli::check_output_file(path, flag).map_err(Failure::Usage)
}

/// The dry-run's own flags mean nothing to a run: refuse them rather than ignore them.
fn refuse_report_flags(report: &cli::ReportArgs) -> Result<(), Failure> {
    let given = [
        (
            report.format.is_some(),
            "--format",
            "chooses how the plan is printed",
        ),
        (report.svg.is_some(), "--svg", "draws the plan"),
        (
            report.rank.is_some(),
            "--rank",
            "lists one rank's buffers in the plan",
        ),
    ];
    match given.iter().find(|(given, ..)| *given) {
        Some((_, flag, what)) => Err(Failure::usage(format!(
            "{flag} is a --dry-run option (it {what}), and this command starts a run\n  help: \
             add --dry-run to see the plan (launch --dry-run {flag} ...), or drop {flag} to train"
        ))),
        None => Ok(()),
    }
}

fn dry_run(loaded: &config_file::Loaded, report: &cli::ReportArgs) -> Result<(), Failure> {
    let plan = MemoryPlan::new(&loaded.config);
    let output = match report.format.unwrap_or(Format::Table) {
        Format::Table => {
            let mut text = dryrun::table(&loaded.name, &loaded.config, &plan);
            if let Some(rank) = report.rank {
                let regions =
                    dryrun::rank_regions(&plan, rank).map_err(|e| Failure::usage(e.to_string()))?;
                text.push('\n');
                text.push_str(&regions);
            }
            text
        }
        Format::Json => {
            if report.rank.is_some() {
                return Err(Failure::usage(
                    "--rank lists one rank's regions in the table format; the JSON already has every rank",
                ));
            }
            let mut text = serde_json::to_string_pretty(&dryrun::json(&loaded.config, &plan))
                .context("cannot encode the plan as JSON")?;
            text.push('\n');
            text
        }
    };
    write_stdout(&output)?;
    if let Some(path) = &report.svg {
        fs::write(path, svg::render(&loaded.name, &loaded.config, &plan))
            .with_context(|| format!("cannot write the SVG chart to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if plan.fits() {
        Ok(())
    } else {
        Err(Failure::DoesNotFit(dryrun::does_not_fit(&plan)))
    }
}

/// Writes to stdout, treating a closed pipe (`| head`) as success.
fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Runtime(
            anyhow::Error::new(e).context("cannot write to stdout"),
        )),
        _ => Ok(()),
    }
}
