//! A run on this machine: start the coordinator, spawn one worker per rank, show progress,
//! write `--metrics`, and stop everything on the first failure or on Ctrl-C.
//!
//! The main thread is the supervisor: it spawns the workers (so their parent-death signal is
//! tied to a thread that lives as long as the launcher), polls their exits, and reads the
//! coordinator's events. The coordinator itself runs on a small tokio runtime.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use tessera_plan::bytes::format_size;
use tessera_plan::config::{Device, Watchdog};
use tessera_plan::memory::{MemoryPlan, Place};
use tessera_plan::mesh::Mesh;
use tessera_proto::tls::{Setting, Tls, TlsFiles};
use tessera_worker::arena::ArenaLayout;
use tessera_worker::checkpoint;

use crate::agent::{Worker, WorkerSpec};
use crate::blame::Blame;
use crate::capacity::{Machine, RankBytes, shortfall};
use crate::config_file::Loaded;
use crate::coordinator::{Coordinator, Event, JobSpec, Reshape, describe_ranks};
use crate::exit::Failure;
use crate::fleet::{Fleet, LocalFleet, RemoteFleet};
use crate::hostfile::{self, Host, RemoteAgents};
use crate::progress::{Progress, StepLine};

/// How the run behaves beyond the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub metrics: Option<PathBuf>,
    pub fresh: bool,
    /// Where the coordinator listens for node agents; None: this machine's run starts its
    /// own workers unless cluster.nodes is above 1.
    pub listen: Option<std::net::SocketAddr>,
    /// Kernel threads per worker (default: the machine's cores shared among the workers).
    pub threads: Option<usize>,
    /// Where each worker writes its trace.
    pub trace: Option<PathBuf>,
}

/// How long workers get to exit on their own after a failure or a Ctrl-C before SIGKILL.
pub(crate) const GRACE: Duration = Duration::from_secs(5);
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// How long past `watchdog.rendezvous_timeout` the supervisor gives the coordinator's own
/// barrier timeout (which names the ranks it waited for) before it fails the rendezvous itself.
const RENDEZVOUS_GRACE: Duration = Duration::from_secs(1);
/// How long after a failure the coordinator tells the remaining workers to abort.
const ABORT_AFTER: Duration = Duration::from_secs(1);
/// How long after SIGKILL a run waits for exits that nobody reports (a node that left the
/// network) before it ends anyway.
const GIVE_UP: Duration = Duration::from_secs(5);

pub(crate) static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: nix::libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP are counted instead of killing the launcher, so that it can
/// stop its workers first.
pub(crate) fn catch_signals() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only increments an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.context("cannot install signal handlers")?;
    }
    Ok(())
}

/// 32 random hex digits from the kernel.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .context("cannot read /dev/urandom for the run's token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Trains the job in `loaded` with one worker process per rank on this machine, restarting
/// from the newest checkpoint after a failure up to `restart.max` times.
pub fn run_local(loaded: &Loaded, options: &RunOptions) -> Result<(), Failure> {
    let config = &loaded.config;
    // Validated before anything starts.
    let hosts = hostfile::read(config)?;
    let cluster = config.cluster.nodes > 1 || options.listen.is_some() || hosts.is_some();
    let tls = head_tls(config, cluster, options.listen)?;
    if config.cluster.device == Device::Cuda
        && let Err(e) = tessera_worker::tensor::cuda::check_config(config)
    {
        return Err(Failure::usage(e.to_string()));
    }
    // On one machine, say it once rather than once per worker. (Only the library's presence:
    // a CUDA context here would take half a GiB of the GPU from the workers.)
    if !cluster
        && config.cluster.device == Device::Cuda
        && !tessera_worker::tensor::cuda::driver_present()
    {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "cluster.device is cuda, but this machine has no CUDA driver (libcuda.so.1 does not \
             load)\n  help: run on a machine with an NVIDIA GPU and its driver, or train on CPU \
             workers with --set cluster.device=cpu --set cluster.backend=tcp"
        )));
    }
    // A run starts only what the dry-run accepts, with the dry-run's own verdict.
    let plan = MemoryPlan::new(config);
    if !plan.fits() {
        eprint!("{}", crate::dryrun::verdict(&loaded.name, config, &plan));
        return Err(Failure::DoesNotFit(crate::dryrun::does_not_fit(&plan)));
    }
    // What each worker must allocate: the arena its plan lays out (checked again by the worker).
    let mut layout = Layout {
        sets: loaded.sets.clone(),
        planned: planned_bytes(config, &plan),
        mesh: Mesh::from_config(config),
    };
    // Whether this machine holds the ranks (its GPUs, its memory), before any worker starts;
    // a node agent's machine is checked by the coordinator when it registers.
    if !cluster {
        let (gpus, free) = match config.cluster.device {
            Device::Cuda => crate::capacity::visible(),
            Device::Cpu => (0, Vec::new()),
        };
        let machine = Machine {
            host: "this machine",
            gpus,
            free: &free,
            available: crate::capacity::available_memory(),
        };
        let (device, backend) = (config.cluster.device, config.cluster.backend);
        if let Some(reason) = shortfall(&machine, &layout.planned, device, backend) {
            return Err(Failure::DoesNotFit(reason));
        }
    }
    // What the run writes, before anything starts (a cluster's workers check their own
    // checkpoint.dir: it may be another file system there).
    if let Some(path) = &options.metrics {
        tessera_worker::cli::check_output_file(path, "--metrics").map_err(Failure::Usage)?;
    }
    if let Some(dir) = &options.trace {
        tessera_worker::cli::check_output_dir(dir, "--trace").map_err(Failure::Usage)?;
    }
    if !cluster {
        tessera_worker::cli::check_checkpoint_dir(config).map_err(Failure::Usage)?;
    }
    let token = if cluster {
        token_from_env(
            "a run across nodes needs a secret shared with its node agents: set TESSERA_TOKEN to \
             the same value here and on every node (e.g. export TESSERA_TOKEN=$(openssl rand -hex 16))",
        )?
    } else {
        random_hex(16)?
    };
    catch_signals()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tessera-coordinator")
        .enable_all()
        .build()
        .context("cannot start the coordinator's runtime")?;
    let progress = Progress::new(config.training.steps);
    let launched = SystemTime::now();
    let mut fresh = options.fresh;
    let mut restarts = 0;
    // A run across nodes keeps one coordinator (the agents know its address) for all attempts.
    let mut head: Option<Head> = None;
    let outcome = loop {
        let spec = JobSpec {
            config_name: loaded.name.clone(),
            config_yaml: loaded.text.clone(),
            config_sets: layout.sets.clone(),
            mesh: layout.mesh,
            device: config.cluster.device,
            backend: config.cluster.backend,
            planned: layout.planned.clone(),
            collective_timeout: config.watchdog.collective_timeout,
            rendezvous_timeout: config.watchdog.rendezvous_timeout,
            heartbeat: config.watchdog.heartbeat,
            heartbeat_timeout: config.watchdog.heartbeat_timeout,
            worker_args: worker_args(options, fresh)?,
            // Each attempt's own: its collective connections cannot meet the last one's.
            run_id: random_hex(4)?,
            token: token.clone(),
            tls: tls.clone(),
        };
        let result = if cluster {
            cluster_attempt(
                &runtime,
                &mut head,
                spec,
                ClusterJob {
                    loaded,
                    layout: &mut layout,
                    hosts: hosts.as_deref(),
                },
                &config.watchdog,
                &progress,
                options,
            )
        } else {
            attempt(&runtime, spec, &config.watchdog, &progress, options)
        };
        match result {
            Err(Failure::Runtime(error))
                if restarts < config.restart.max && SIGNALS.load(Ordering::SeqCst) == 0 =>
            {
                restarts += 1;
                progress.println(&format!("error: {error:#}"), true);
                let from = match restart_point(config, launched, options.fresh) {
                    Ok(from) => from,
                    Err(e) => break Err(Failure::Runtime(e)),
                };
                fresh = from.is_none();
                progress.status(&format!(
                    "restart {restarts} of {}: {}",
                    config.restart.max,
                    from.map_or("from the initial weights (no checkpoint yet)".into(), |p| {
                        format!("from {}", p.display())
                    })
                ));
            }
            other => break other,
        }
    };
    if let Some(head) = head {
        head.coordinator.stop(&runtime);
        drop(head.remote);
    }
    // After every worker's output has been relayed and the bar is gone.
    progress.finish();
    let (steps, measured) = outcome?;
    let device: Vec<u64> = layout.planned.iter().map(|r| r.device).collect();
    print_memory(&layout.mesh, &device, &measured);
    if let Some(dir) = &options.trace {
        println!(
            "traces: {}/rank-*.json (open in ui.perfetto.dev or chrome://tracing)",
            dir.display()
        );
    }
    let restarted = match restarts {
        0 => String::new(),
        1 => " after 1 restart".into(),
        n => format!(" after {n} restarts"),
    };
    // After a restart on fewer nodes, the layout it finished with.
    let world = layout.mesh.world_size();
    println!(
        "done: {steps} steps on {world} rank{}{restarted}",
        if world == 1 { "" } else { "s" }
    );
    Ok(())
}

/// The checkpoint a restart resumes from (None: from the initial weights). Workers resume
/// from the newest checkpoint in `checkpoint.dir`; after `--fresh` that is right only if this
/// launch wrote it, so an older run's newer checkpoint stops the restart instead.
fn restart_point(
    config: &tessera_plan::Config,
    launched: SystemTime,
    fresh: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let dir = PathBuf::from(&config.checkpoint.dir);
    let all = checkpoint::list(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some((newest_step, newest)) = all.last().cloned() else {
        return Ok(None);
    };
    if !fresh {
        return Ok(Some(newest));
    }
    let written_since = |path: &PathBuf| {
        std::fs::metadata(path.join("manifest.json"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= launched)
    };
    match all.iter().rev().find(|(_, path)| written_since(path)) {
        // Nothing of ours yet: start over, as the first attempt did.
        None => Ok(None),
        Some((_, ours)) if *ours == newest => Ok(Some(newest)),
        Some((ours, _)) => anyhow::bail!(
            "cannot restart: {} holds step {newest_step} from an earlier run, newer than this \
             run's step {ours} (it started with --fresh); move the old checkpoints away or use \
             another checkpoint.dir",
            dir.display()
        ),
    }
}

/// One start of every worker, until they all exit: the steps rank 0 reported and each rank's
/// measured device bytes.
fn attempt(
    runtime: &tokio::runtime::Runtime,
    spec: JobSpec,
    watchdog: &Watchdog,
    progress: &Progress,
    options: &RunOptions,
) -> Result<(u64, Vec<Option<u64>>), Failure> {
    let world = spec.mesh.world_size();
    let token = spec.token.clone();
    let spec_args = spec.worker_args.clone();
    let tls = spec.tls.clone();
    let (events, received) = mpsc::channel();
    let localhost = "127.0.0.1:0".parse().expect("invariant: a valid address");
    let coordinator = Coordinator::start(runtime, localhost, spec, events)
        .context("cannot start the coordinator on 127.0.0.1")?;
    progress.status(&format!(
        "coordinator on {}; starting {world} worker{}",
        coordinator.address,
        if world == 1 { "" } else { "s" }
    ));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = options.threads.unwrap_or((cores / world).max(1));
    let mut args = vec!["--threads".to_string(), threads.to_string()];
    args.extend(spec_args);
    let mut workers = Vec::with_capacity(world);
    let mut outcome = Ok(0);
    let mut measured = vec![None; world];
    for rank in 0..world {
        let mut env = vec![
            ("RANK".into(), rank.to_string()),
            ("WORLD_SIZE".into(), world.to_string()),
            ("LOCAL_RANK".into(), rank.to_string()),
            ("LOCAL_WORLD_SIZE".into(), world.to_string()),
            ("MASTER_ADDR".into(), coordinator.address.ip().to_string()),
            ("MASTER_PORT".into(), coordinator.address.port().to_string()),
            (
                "TESSERA_COORDINATOR".into(),
                coordinator.address.to_string(),
            ),
            ("TESSERA_TOKEN".into(), token.clone()),
        ];
        // They present the head's certificate.
        env.extend(match &tls {
            Some(tls) => tls.files().env(),
            None => TlsFiles::env_off(),
        });
        let spec = WorkerSpec {
            rank,
            env,
            args: args.clone(),
        };
        match Worker::spawn(&spec, progress) {
            Ok(worker) => workers.push(worker),
            Err(e) => {
                outcome = Err(Failure::Runtime(e));
                break;
            }
        }
    }
    if outcome.is_ok() {
        outcome = supervise(
            &mut LocalFleet {
                workers: &mut workers,
            },
            &coordinator,
            &received,
            progress,
            options,
            watchdog,
            &mut measured,
        );
    }
    // Whatever happened, nothing outlives the attempt.
    for worker in &workers {
        worker.signal(Signal::SIGKILL);
    }
    for worker in workers {
        worker.reap();
    }
    coordinator.stop(runtime);
    outcome.map(|steps| (steps, measured))
}

/// What every worker gets after `launch worker` besides `--threads`.
fn worker_args(options: &RunOptions, fresh: bool) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    if fresh {
        args.push("--fresh".into());
    }
    if let Some(dir) = &options.trace {
        // Absolute, so that it means the same whatever the workers' directory.
        let dir = std::path::absolute(dir)
            .with_context(|| format!("cannot resolve --trace {}", dir.display()))?;
        args.push("--trace".into());
        args.push(dir.display().to_string());
    }
    Ok(args)
}

/// The fewest bytes a shared token may have: 128 bits, which nobody guesses.
pub(crate) const MIN_TOKEN_BYTES: usize = 16;

/// The secret every node of a run across nodes shares, from TESSERA_TOKEN; `missing` says
/// what to do when it is unset or empty. One shorter than [`MIN_TOKEN_BYTES`] is refused.
pub(crate) fn token_from_env(missing: &str) -> Result<String, Failure> {
    match std::env::var("TESSERA_TOKEN") {
        Ok(token) if token.len() >= MIN_TOKEN_BYTES => Ok(token),
        Ok(token) if !token.is_empty() => Err(Failure::usage(format!(
            "TESSERA_TOKEN has {} byte{}, but a token needs at least {MIN_TOKEN_BYTES} to be \
             hard to guess; make one with `export TESSERA_TOKEN=$(openssl rand -hex 16)` and use \
             it on the head and every node",
            token.len(),
            if token.len() == 1 { "" } else { "s" }
        ))),
        _ => Err(Failure::usage(missing)),
    }
}

/// The head's TLS (`cluster.tls`), read and checked before anything starts. A run on this
/// machine's workers dial 127.0.0.1, so there the certificate must be valid for it. Without
/// TLS a run that listens beyond loopback warns that its token crosses the network in plain
/// text.
fn head_tls(
    config: &tessera_plan::Config,
    cluster: bool,
    listen: Option<std::net::SocketAddr>,
) -> Result<Option<Tls>, Failure> {
    let Some(paths) = &config.cluster.tls else {
        if cluster && !listen.is_some_and(|a| a.ip().is_loopback()) {
            eprintln!(
                "warning: cluster.tls is not set, so the run's token and control messages cross \
                 the network in plain text (`launch certs --help` says how to turn TLS on)"
            );
        }
        return Ok(None);
    };
    let usage = |e: tessera_proto::Error| Failure::usage(e.to_string());
    let files = TlsFiles {
        ca: paths.ca.clone().into(),
        cert: paths.cert.clone().into(),
        key: paths.key.clone().into(),
        setting: Setting::Config,
    };
    let tls = Tls::load(&files).map_err(usage)?;
    if !cluster {
        tls.check_server_name("127.0.0.1", "this machine's workers")
            .map_err(usage)?;
    }
    Ok(Some(tls))
}

/// The coordinator of a run across nodes, kept from one attempt to the next.
struct Head {
    coordinator: Coordinator,
    events: mpsc::Receiver<Event>,
    attempt: u32,
    /// The agents the head started over ssh (`cluster.hostfile`); dropped after the
    /// coordinator stops.
    remote: Option<RemoteAgents>,
}

/// One attempt of a run across nodes: the first starts the coordinator on `options.listen`
/// and waits for the node agents; a later one starts a new rendezvous on the same coordinator
/// and tells the live agents to start their workers again (a node that is gone gets its ranks
/// when a replacement agent registers).
fn cluster_attempt(
    runtime: &tokio::runtime::Runtime,
    head: &mut Option<Head>,
    spec: JobSpec,
    job: ClusterJob,
    watchdog: &Watchdog,
    progress: &Progress,
    options: &RunOptions,
) -> Result<(u64, Vec<Option<u64>>), Failure> {
    let ClusterJob {
        loaded,
        layout,
        hosts,
    } = job;
    let nodes = spec.mesh.nodes();
    let head = match head {
        Some(head) => {
            // Whatever the last attempt's ranks still said is about the last attempt.
            while head.events.try_recv().is_ok() {}
            let nodes_now = head.coordinator.nodes();
            let live = nodes_now.iter().filter(|n| !n.lost).count();
            let reshape = if live < layout.mesh.nodes() && live >= loaded.config.restart.min_nodes {
                shrink(loaded, layout, live)
            } else {
                None
            };
            if let Some((smaller, what)) = &reshape {
                progress.status(&format!("going on with the {live} live nodes: {what}"));
                *layout = smaller.clone();
            }
            let reshape = reshape.map(|(smaller, _)| Reshape {
                mesh: smaller.mesh,
                config_sets: smaller.sets,
                planned: smaller.planned,
            });
            let reshaped = reshape.is_some();
            head.attempt = head
                .coordinator
                .restart(spec.run_id, spec.worker_args, reshape);
            // Without a reshape the lost nodes keep their slots, waiting for replacements.
            let gone: Vec<String> = nodes_now
                .iter()
                .filter(|n| n.lost)
                .map(|n| format!("node {} ({}, {})", n.node, n.hostname, n.address))
                .collect();
            if !gone.is_empty() && !reshaped {
                progress.status(&format!(
                    "waiting for a new agent in place of {} (launch agent --coordinator \
                     THIS_HOST:{})",
                    gone.join(", "),
                    head.coordinator.address.port()
                ));
            }
            head
        }
        None => {
            let token = spec.token.clone();
            let tls = spec.tls.clone();
            let (events, received) = mpsc::channel();
            let listen = options.listen.unwrap_or(DEFAULT_LISTEN.into());
            // A port in use (or an address this machine lacks) fails every attempt alike:
            // the command line must change, no restart can help.
            let coordinator = Coordinator::start(runtime, listen, spec, events).map_err(|e| {
                Failure::usage(format!(
                    "cannot listen on {listen} for the node agents: {e}\n  help: choose another \
                     address or port with --listen ADDR:PORT"
                ))
            })?;
            progress.status(&format!(
                "coordinator on {}: waiting for {nodes} node agent{} (on each node: launch \
                 agent --coordinator THIS_HOST:{}, with this TESSERA_TOKEN)",
                coordinator.address,
                if nodes == 1 { "" } else { "s" },
                coordinator.address.port()
            ));
            let remote = match hosts {
                Some(hosts) => {
                    // Agents reach the head at the address it listens on, or its host name.
                    let host = if listen.ip().is_unspecified() {
                        nix::unistd::gethostname()
                            .ok()
                            .and_then(|h| h.into_string().ok())
                            .context("cannot read this machine's host name for the agents")?
                    } else {
                        listen.ip().to_string()
                    };
                    if let Some(tls) = &tls {
                        tls.check_server_name(&host, "the agents it starts over ssh")
                            .map_err(|e| Failure::usage(e.to_string()))?;
                    }
                    let address = format!("{host}:{}", coordinator.address.port());
                    progress.status(&format!(
                        "starting the agents of {} hosts over ssh (coordinator at {address})",
                        hosts.len()
                    ));
                    let files = tls.as_ref().map(Tls::files);
                    Some(RemoteAgents::start(
                        hosts, &address, &token, files, progress,
                    )?)
                }
                None => None,
            };
            head.insert(Head {
                coordinator,
                events: received,
                attempt: 0,
                remote,
            })
        }
    };
    cluster_supervise(head, layout.mesh.world_size(), watchdog, progress, options)
}

/// Watches one attempt of a run across nodes until every rank has stopped.
fn cluster_supervise(
    head: &mut Head,
    world: usize,
    watchdog: &Watchdog,
    progress: &Progress,
    options: &RunOptions,
) -> Result<(u64, Vec<Option<u64>>), Failure> {
    let mut fleet = RemoteFleet::new(world, head.attempt, &head.coordinator.nodes());
    let mut measured = vec![None; world];
    let outcome = supervise(
        &mut fleet,
        &head.coordinator,
        &head.events,
        progress,
        options,
        watchdog,
        &mut measured,
    );
    // Nodes whose ranks never reported their exit are unreachable: their slots go to
    // replacements.
    for node in fleet.silent_nodes() {
        head.coordinator.mark_lost(node);
    }
    outcome.map(|steps| (steps, measured))
}

/// What a run across nodes needs beyond one attempt's spec: the config as loaded, the layout
/// (which a restart on fewer nodes replaces) and the hostfile's hosts.
struct ClusterJob<'a> {
    loaded: &'a Loaded,
    layout: &'a mut Layout,
    hosts: Option<&'a [Host]>,
}

/// The layout a run trains with: its `--set` overrides, mesh and what each rank plans to
/// allocate. A restart on fewer nodes makes a smaller one.
#[derive(Debug, Clone)]
struct Layout {
    sets: Vec<String>,
    mesh: Mesh,
    planned: Vec<RankBytes>,
}

/// What each worker of `config` (whose plan is `plan`) must allocate: the arenas its plan
/// lays out (the device one is checked again by the worker).
fn planned_bytes(config: &tessera_plan::Config, plan: &MemoryPlan) -> Vec<RankBytes> {
    (0..config.parallel.world_size())
        .map(|rank| {
            let layout = ArenaLayout::new(plan.rank(rank).expect("invariant: rank < world"));
            let (device, host) = (
                layout.bytes(Place::Device) as u64,
                layout.bytes(Place::Host) as u64,
            );
            RankBytes {
                device,
                host_memory: match config.cluster.device {
                    Device::Cpu => device + host,
                    Device::Cuda => host,
                },
            }
        })
        .collect()
}

/// `layout` on `live` nodes: fewer data-parallel replicas, the same tensor and pipeline
/// degrees and global batch (each replica takes more microbatches), if the config allows it;
/// and what changed, for the user.
fn shrink(loaded: &Loaded, layout: &Layout, live: usize) -> Option<(Layout, String)> {
    let mesh = layout.mesh;
    let per_node = mesh.world_size() / mesh.nodes();
    let ranks = live * per_node;
    let (tp, pp) = (mesh.tp, mesh.pp);
    if !ranks.is_multiple_of(tp * pp) {
        return None;
    }
    let data = ranks / (tp * pp);
    let mut sets = layout.sets.clone();
    sets.push(format!("cluster.nodes={live}"));
    sets.push(format!("parallel.data={data}"));
    let config = tessera_plan::Config::from_yaml(&loaded.name, &loaded.text, &sets).ok()?;
    let what = format!(
        "parallel.data {} -> {data}, cluster.nodes {} -> {live}",
        mesh.dp,
        mesh.nodes()
    );
    Some((
        Layout {
            sets,
            mesh: Mesh::from_config(&config),
            planned: planned_bytes(&config, &MemoryPlan::new(&config)),
        },
        what,
    ))
}

/// Where a run across nodes listens unless `--listen` says otherwise.
const DEFAULT_LISTEN: ([u8; 4], u16) = ([0, 0, 0, 0], 29400);

/// Why the run is stopping.
enum Stop {
    /// A rank failed: why, and the rank whose own failure it was (not one that went silent).
    Failed(String, Option<usize>),
    /// A node cannot run its share (no GPU, too little free memory): no restart can help.
    Refused(String),
    Interrupted,
}

/// Prints, for each pipeline stage, the device bytes the plan gave its ranks and what they
/// reported allocating.
fn print_memory(mesh: &Mesh, planned: &[u64], measured: &[Option<u64>]) {
    let mut lines = Vec::new();
    for stage in 0..mesh.pp {
        let ranks: Vec<usize> = (0..planned.len())
            .filter(|&r| mesh.coord(r).is_ok_and(|c| c.pp_rank == stage))
            .collect();
        let Some(&first) = ranks.first() else {
            continue;
        };
        let reported: Vec<u64> = ranks.iter().filter_map(|&r| measured[r]).collect();
        let verdict = if reported.len() < ranks.len() {
            format!("{} of {} ranks reported", reported.len(), ranks.len())
        } else if reported.iter().all(|&b| b == planned[first]) {
            "equal".to_string()
        } else {
            format!(
                "DIFFERENT: {}",
                reported
                    .iter()
                    .map(|&b| format_size(b))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let measured = reported
            .iter()
            .copied()
            .max()
            .map_or("-".into(), format_size);
        lines.push(format!(
            "  stage {stage} ({} rank{}): planned {}, measured {measured} ({verdict})",
            ranks.len(),
            if ranks.len() == 1 { "" } else { "s" },
            format_size(planned[first]),
        ));
    }
    println!("device memory per rank (the dry-run's plan against the workers' arenas):");
    for line in lines {
        println!("{line}");
    }
}

/// Each distinct last collective with the ranks that reported it, the rarest first (a rank
/// stuck behind the others stands out): "\n  last collectives: rank 3: all_reduce #12 in
/// group dp 0; ranks 0, 1, 2: all_reduce #13 in group dp 0". Empty when no rank reported one.
fn describe_last_collectives(last: &[String]) -> String {
    let mut by_collective: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
    for (rank, collective) in last.iter().enumerate() {
        if !collective.is_empty() {
            by_collective
                .entry(collective)
                .or_default()
                .push(rank as u32);
        }
    }
    if by_collective.is_empty() {
        return String::new();
    }
    let mut groups: Vec<(&str, Vec<u32>)> = by_collective.into_iter().collect();
    groups.sort_by_key(|(_, ranks)| ranks.len());
    let listed: Vec<String> = groups
        .iter()
        .map(|(collective, ranks)| format!("{}: {collective}", describe_ranks(ranks)))
        .collect();
    format!("\n  last collectives: {}", listed.join("; "))
}

/// Watches the workers until all have exited; returns the steps rank 0 reported. Each rank's
/// reported device bytes land in `measured`.
fn supervise(
    fleet: &mut dyn Fleet,
    coordinator: &Coordinator,
    events: &mpsc::Receiver<Event>,
    progress: &Progress,
    options: &RunOptions,
    watchdog: &Watchdog,
    measured: &mut [Option<u64>],
) -> Result<u64, Failure> {
    let mut metrics = match &options.metrics {
        Some(path) => Some((
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the metrics file {}", path.display()))?,
            path.clone(),
        )),
        None => None,
    };
    let mut stopping: Option<(Stop, Instant)> = None;
    let mut announced = false;
    let mut aborted = false;
    // Whether the launcher has signalled the ranks: their deaths by signal are its own doing.
    let mut signalled = false;
    let mut blame = Blame::new(fleet.ranks());
    let mut last_step = 0;
    // Each rank's last collective, as its heartbeats said: where a stuck rank waits.
    let mut last_collectives = vec![String::new(); fleet.ranks()];
    // When each rank last beat (from its first beat on), and whether it said it finished.
    let mut heard: Vec<Option<Instant>> = vec![None; fleet.ranks()];
    let mut finished = vec![false; fleet.ranks()];
    // The rendezvous: every rank registered (the coordinator fails it itself once a worker
    // waits at its barrier; this covers a run whose node agents never all came).
    let started = Instant::now();
    let mut joined = false;
    loop {
        // Read before this round's events: the ranks' last beats reach the channel before they
        // exit, so once every rank had exited, this round's events hold every beat.
        let (all_exited, none_running) = (fleet.all_exited(), !fleet.any_running());
        while let Ok(event) = events.try_recv() {
            fleet.observe(&event);
            if let Event::Beat(beat) = &event {
                let rank = beat.rank as usize;
                if !beat.error.is_empty() {
                    blame.reported(rank, &beat.error, beat.caused_by_peer);
                }
                if let Some(slot) = heard.get_mut(rank) {
                    *slot = Some(Instant::now());
                }
                if beat.finished
                    && let Some(slot) = finished.get_mut(rank)
                {
                    *slot = true;
                }
                if beat.peak_bytes > 0
                    && let Some(slot) = measured.get_mut(rank)
                {
                    *slot = Some(beat.peak_bytes);
                }
                if !beat.last_collective.is_empty()
                    && let Some(slot) = last_collectives.get_mut(rank)
                {
                    slot.clone_from(&beat.last_collective);
                }
            }
            match event {
                Event::Beat(beat) if beat.rank == 0 && beat.step > last_step => {
                    last_step = beat.step;
                    progress.step(StepLine {
                        step: beat.step,
                        loss: beat.loss,
                        lr: beat.lr,
                        grad_norm: beat.grad_norm,
                        tokens_per_s: beat.tokens_per_s,
                        val_loss: beat.val_loss,
                    });
                    if let Some((file, path)) = &mut metrics {
                        let mut line = serde_json::json!({
                            "step": beat.step,
                            "loss": beat.loss,
                            "lr": beat.lr,
                            "grad_norm": beat.grad_norm,
                            "tokens_per_s": beat.tokens_per_s,
                            "mfu": beat.mfu,
                            "peak_bytes": beat.peak_bytes,
                        });
                        if let Some(val_loss) = beat.val_loss {
                            line["val_loss"] = val_loss.into();
                        }
                        // One write per line: a reader following the file (a dashboard, the
                        // tests) never sees half a line, as `writeln!` on a File could show.
                        file.write_all(format!("{line}\n").as_bytes())
                            .with_context(|| format!("cannot write {}", path.display()))?;
                    }
                }
                Event::RendezvousComplete => {
                    joined = true;
                    progress.status(&format!("all {} ranks joined; training", fleet.ranks()));
                }
                Event::NodeRefused { reason } if stopping.is_none() => {
                    // Nothing can start without that node: stop the others at once.
                    coordinator.abort(&format!("a node agent was refused: {reason}"));
                    aborted = true;
                    stopping = Some((
                        Stop::Refused(format!("the coordinator refused a node agent: {reason}")),
                        Instant::now(),
                    ));
                }
                Event::RendezvousFailed { missing } if stopping.is_none() => {
                    stopping = Some((
                        Stop::Failed(
                            format!(
                                "{} never reached the rendezvous within {:.0?}",
                                describe_ranks(&missing),
                                watchdog.rendezvous_timeout
                            ),
                            None,
                        ),
                        Instant::now(),
                    ));
                }
                _ => {}
            }
        }

        if SIGNALS.load(Ordering::SeqCst) > 0 && !matches!(stopping, Some((Stop::Interrupted, _))) {
            progress.status("interrupted: stopping the workers (again to kill them now)");
            fleet.stop(coordinator, false);
            signalled = true;
            stopping = Some((Stop::Interrupted, Instant::now()));
        }

        for failed in fleet.newly_failed() {
            blame.ended(&failed, signalled);
        }
        // The cause is the rank whose own failure it was (see `blame`), once that is clear.
        if stopping.is_none()
            && let Some(cause) = blame.cause(all_exited)
        {
            stopping = Some((
                Stop::Failed(
                    format!(
                        "{} {}{}{}{}",
                        fleet.describe(cause),
                        blame.how(cause),
                        if last_step > 0 {
                            format!(" after step {last_step}")
                        } else {
                            String::new()
                        },
                        blame
                            .error(cause)
                            .map_or(String::new(), |e| format!(": {e}")),
                        if fleet.ranks() > 1 {
                            "; stopped the other ranks"
                        } else {
                            ""
                        }
                    ),
                    Some(cause),
                ),
                Instant::now(),
            ));
        }

        if stopping.is_none()
            && let Some(rank) = (0..fleet.ranks()).find(|&rank| {
                !fleet.exited(rank)
                    && !finished[rank]
                    && heard[rank].is_some_and(|t| t.elapsed() > watchdog.heartbeat_timeout)
            })
        {
            let silent = heard[rank].map_or(Duration::ZERO, |t| t.elapsed());
            stopping = Some((
                Stop::Failed(
                    format!(
                        "{} sent no heartbeat for {:.0?} (watchdog.heartbeat_timeout): it hangs, \
                         was stopped, or its node is unreachable{}; stopped the other ranks",
                        fleet.describe(rank),
                        silent,
                        if last_step > 0 {
                            format!(", after step {last_step}")
                        } else {
                            String::new()
                        }
                    ),
                    Some(rank),
                ),
                Instant::now(),
            ));
            // A stopped process ignores everything but SIGKILL; don't wait for it.
            fleet.kill(rank);
            signalled = true;
        }

        if stopping.is_none()
            && !joined
            && started.elapsed() > watchdog.rendezvous_timeout + RENDEZVOUS_GRACE
        {
            let nodes = coordinator.nodes();
            let live: Vec<String> = nodes
                .iter()
                .filter(|n| !n.lost)
                .map(|n| format!("{} ({})", n.hostname, n.address))
                .collect();
            let expected = coordinator.expected_nodes();
            let agents = if options.listen.is_some() || expected > 1 || !nodes.is_empty() {
                format!(
                    "; {} of {expected} node agents registered{}",
                    live.len(),
                    if live.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", live.join(", "))
                    }
                )
            } else {
                String::new()
            };
            stopping = Some((
                Stop::Failed(
                    format!(
                        "the rendezvous did not complete within {:.0?} (watchdog.rendezvous_timeout): \
                         {} never registered{agents}",
                        watchdog.rendezvous_timeout,
                        describe_ranks(&coordinator.missing())
                    ),
                    None,
                ),
                Instant::now(),
            ));
        }

        if let Some((Stop::Failed(reason, _), _)) = &stopping
            && !announced
        {
            // At once: stopping every rank can take a while, the cause should not wait.
            progress.status(&format!("stopping the run: {reason}"));
            announced = true;
        }

        // A rank whose exit nobody can report (its node is unreachable) is given up on.
        let gave_up = stopping
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() > GRACE + GIVE_UP);
        // A remote rank whose node never registered never ran: nothing to wait for.
        if all_exited || gave_up || stopping.is_some() && none_running {
            return match stopping {
                None => Ok(last_step),
                Some((Stop::Refused(message), _)) => Err(Failure::DoesNotFit(message)),
                Some((Stop::Failed(message, cause), _)) => {
                    let then = cause.map_or(String::new(), |rank| blame.consequences(rank));
                    let message = format!(
                        "{message}{then}{}",
                        describe_last_collectives(&last_collectives)
                    );
                    // A rank's own bad input or missing memory fails every attempt alike: it
                    // keeps its class, and no restart is tried.
                    Err(match cause.and_then(|rank| blame.status(rank)) {
                        Some(2) => Failure::Usage(message),
                        Some(3) => Failure::DoesNotFit(message),
                        _ => Failure::Runtime(anyhow::anyhow!("{message}")),
                    })
                }
                Some((Stop::Interrupted, _)) => Err(Failure::Interrupted),
            };
        }

        if let Some((stop, since)) = &stopping {
            // Let the other ranks fail on their own first: their errors name what they saw.
            if let Stop::Failed(reason, _) = stop
                && !aborted
                && since.elapsed() > ABORT_AFTER
            {
                coordinator.abort(reason);
                aborted = true;
            }
            let hurry = SIGNALS.load(Ordering::SeqCst) > 1;
            if since.elapsed() > GRACE || hurry {
                fleet.stop(coordinator, true);
                signalled = true;
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Failed;
    use tessera_proto::v1::Beat;

    /// Ranks that all finish at once, with their last beats still on the way when the
    /// supervisor first sees them exited: the race that lost metrics lines.
    struct Finishing {
        ranks: usize,
        /// The beats each rank sent before exiting; they reach the channel at the first look.
        late: Vec<Beat>,
        events: mpsc::Sender<Event>,
        looked: bool,
    }

    impl Fleet for Finishing {
        fn ranks(&self) -> usize {
            self.ranks
        }
        fn observe(&mut self, _: &Event) {}
        /// The supervisor polls exits after reading events: the beats land in between.
        fn newly_failed(&mut self) -> Vec<Failed> {
            if !self.looked {
                self.looked = true;
                for beat in self.late.drain(..) {
                    self.events.send(Event::Beat(beat)).unwrap();
                }
            }
            Vec::new()
        }
        fn exited(&self, _: usize) -> bool {
            self.looked
        }
        fn all_exited(&self) -> bool {
            self.looked
        }
        fn describe(&self, rank: usize) -> String {
            format!("rank {rank}")
        }
        fn stop(&self, _: &Coordinator, _: bool) {}
        fn kill(&self, _: usize) {}
    }

    #[test]
    fn beats_that_arrive_as_the_last_rank_exits_still_become_metrics_lines() {
        let (runtime, coordinator, _) =
            crate::coordinator::tests::started(1, Duration::from_secs(5));
        let (events, received) = mpsc::channel();
        let dir = std::env::temp_dir().join(format!("tessera-late-beats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        let _ = std::fs::remove_file(&metrics);
        let beat = |step| Beat {
            rank: 0,
            step,
            loss: 1.0,
            finished: step == 20,
            ..Beat::default()
        };
        let mut fleet = Finishing {
            ranks: 1,
            late: (1..=20).map(beat).collect(),
            events,
            looked: false,
        };
        let options = RunOptions {
            metrics: Some(metrics.clone()),
            fresh: false,
            listen: None,
            threads: None,
            trace: None,
        };
        let watchdog = crate::config_file::load(None, &[]).unwrap().config.watchdog;
        let steps = supervise(
            &mut fleet,
            &coordinator,
            &received,
            &Progress::new(20),
            &options,
            &watchdog,
            &mut [None],
        )
        .unwrap();
        coordinator.stop(&runtime);
        let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            (steps, lines),
            (20, 20),
            "every step's line, and `done: 20 steps`"
        );
    }

    #[test]
    fn last_collectives_are_grouped_with_the_odd_one_first() {
        let last = [
            "all_reduce #13 in group dp 0".to_string(),
            "all_reduce #12 in group dp 0".to_string(),
            "all_reduce #13 in group dp 0".to_string(),
            String::new(),
        ];
        assert_eq!(
            describe_last_collectives(&last),
            "\n  last collectives: rank 1: all_reduce #12 in group dp 0; ranks 0, 2: all_reduce #13 in group dp 0"
        );
        assert_eq!(describe_last_collectives(&[String::new()]), "");
    }
}
