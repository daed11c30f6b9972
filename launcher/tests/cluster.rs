//! Runs across nodes, on this machine: two network namespaces joined by a veth pair act as two
//! nodes, each with its own address. The head's `launch` and node 0's agent run in the first,
//! node 1's agent in the second; workers find each other over the veth link. Needs root (to
//! make namespaces); without it the tests say so and pass nothing off as checked.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Two namespaces and the veth link between them, removed on drop.
struct Nodes {
    /// This test's run token: its processes carry it, which is how `leftovers` finds them.
    token: String,
    names: [String; 2],
    addresses: [String; 2],
    links: [String; 2],
}

impl Nodes {
    /// None when this machine cannot make namespaces (not root, no `ip`).
    fn new(tag: &str) -> Option<Nodes> {
        let id = std::process::id() % 100_000;
        let names = [format!("tsr{tag}{id}a"), format!("tsr{tag}{id}b")];
        let subnet = format!("10.{}.{}", 100 + id % 100, id % 250);
        let addresses = [format!("{subnet}.1"), format!("{subnet}.2")];
        let links = [format!("tv{tag}{id}a"), format!("tv{tag}{id}b")];
        let nodes = Nodes {
            token: format!("cluster-test-{tag}-{id}"),
            names,
            addresses,
            links: links.clone(),
        };
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for name in &nodes.names {
            if !ip(&["netns", "add", name]) {
                eprintln!(
                    "skipped: cannot create network namespaces here (needs root and iproute2)"
                );
                return None;
            }
        }
        let ok = ip(&[
            "link", "add", &links[0], "type", "veth", "peer", "name", &links[1],
        ]) && (0..2).all(|i| {
            ip(&["link", "set", &links[i], "netns", &nodes.names[i]])
                && ip(&[
                    "-n",
                    &nodes.names[i],
                    "addr",
                    "add",
                    &format!("{}/24", nodes.addresses[i]),
                    "dev",
                    &links[i],
                ])
                && ip(&["-n", &nodes.names[i], "link", "set", &links[i], "up"])
                && ip(&["-n", &nodes.names[i], "link", "set", "lo", "up"])
        });
        assert!(ok, "cannot set up the veth link between the namespaces");
        Some(nodes)
    }

    /// `launch ARGS` inside node `i`'s namespace.
    fn launch(&self, i: usize, args: &[String]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.names[i]])
            .arg(env!("CARGO_BIN_EXE_launch"))
            .args(args)
            .current_dir(repo())
            .env("TESSERA_TOKEN", &self.token)
            .env_remove("TESSERA_COORDINATOR")
            .env_remove("TESSERA_CONFIG")
            .env_remove("TESSERA_TLS_CA")
            .env_remove("TESSERA_TLS_CERT")
            .env_remove("TESSERA_TLS_KEY");
        command
    }

    /// Takes node `i` off the network: its end of the veth link goes down.
    fn cut(&self, i: usize) {
        let status = Command::new("ip")
            .args(["-n", &self.names[i], "link", "set", &self.links[i], "down"])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Puts node `i` back on the network.
    fn reconnect(&self, i: usize) {
        for j in 0..2 {
            let status = Command::new("ip")
                .args(["-n", &self.names[j], "link", "set", &self.links[j], "up"])
                .status()
                .unwrap();
            assert!(status.success(), "cannot bring link {j} up for node {i}");
        }
    }

    fn agent(&self, i: usize, port: u16) -> Child {
        self.agent_with(i, port, None)
    }

    /// Node `i`'s agent; with `certs` (what [`make_certs`] wrote) it presents node `i`'s
    /// certificate, given in the environment as a job's script would.
    fn agent_with(&self, i: usize, port: u16, certs: Option<&Path>) -> Child {
        let mut command = self.launch(
            i,
            &[
                "agent".into(),
                "--coordinator".into(),
                format!("{}:{port}", self.addresses[0]),
                "--threads".into(),
                "1".into(),
            ],
        );
        if let Some(certs) = certs {
            let address = &self.addresses[i];
            command
                .env("TESSERA_TLS_CA", certs.join("ca.pem"))
                .env("TESSERA_TLS_CERT", certs.join(format!("{address}.pem")))
                .env("TESSERA_TLS_KEY", certs.join(format!("{address}-key.pem")));
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("an agent starts")
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent")
        .to_path_buf()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            (
                value["step"].as_u64().unwrap(),
                value["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The job: data 2 x pipeline 2 of the tiny config, `steps` steps, on `nodes` nodes of
/// 4 / `nodes` workers.
fn job_args(scratch: &Path, nodes: usize, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--config",
        "configs/tiny-cpu.yaml",
        "--fresh",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for set in [
        "parallel.data=2".to_string(),
        "parallel.tensor=1".into(),
        "parallel.pipeline=2".into(),
        format!("training.steps={steps}"),
        "checkpoint.every=0".into(),
        "restart.max=0".into(),
        format!("cluster.nodes={nodes}"),
        format!("cluster.gpus_per_node={}", 4 / nodes),
        format!("checkpoint.dir={}", scratch.join("ckpt").display()),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    {
        args.push("--set".into());
        args.push(set);
    }
    args.push("--metrics".into());
    args.push(scratch.join("metrics.jsonl").display().to_string());
    args
}

/// The losses of the job on one node (a local run, no agents), the reference of the others.
fn one_node_losses(dir: &Path, steps: u64, sets: &[&str]) -> Vec<(u64, f64)> {
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .args(job_args(dir, 1, steps, sets))
        .current_dir(repo())
        .env_remove("TESSERA_TOKEN")
        .env_remove("TESSERA_TLS_CA")
        .env_remove("TESSERA_TLS_CERT")
        .env_remove("TESSERA_TLS_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reference = losses(&dir.join("metrics.jsonl"));
    assert_eq!(reference.len(), steps as usize);
    reference
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_with_limit(child: Child, limit: Duration) -> Output {
    let id = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{id}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
    });
    let out = child.wait_with_output().expect("the process ends");
    let _ = watchdog.join();
    out
}

/// Lines a process printed, each with when it arrived.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Collects `child`'s stdout line by line as it comes.
fn watch_stdout(child: &mut Child) -> (Lines, std::thread::JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let stdout = child.stdout.take().expect("piped");
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    (lines, reader)
}

fn when(lines: &Lines, text: &str) -> Option<Instant> {
    lines
        .lock()
        .unwrap()
        .iter()
        .find(|(_, line)| line.contains(text))
        .map(|(at, _)| *at)
}

fn port() -> u16 {
    29_500 + (std::process::id() % 400) as u16
}

/// The head in node 0's namespace and an agent in each; `steps` steps of the job.
fn start(nodes: &Nodes, scratch: &Path, steps: u64, extra: &[&str]) -> (Child, [Child; 2]) {
    start_with(nodes, scratch, steps, extra, None)
}

/// [`start`], over TLS with `certs` (what [`make_certs`] wrote).
fn start_with(
    nodes: &Nodes,
    scratch: &Path,
    steps: u64,
    extra: &[&str],
    certs: Option<&Path>,
) -> (Child, [Child; 2]) {
    let port = port();
    let tls = certs.map_or(Vec::new(), |certs| tls_sets(certs, &nodes.addresses[0]));
    let extra: Vec<&str> = extra
        .iter()
        .copied()
        .chain(tls.iter().map(String::as_str))
        .collect();
    let mut head_args = job_args(scratch, 2, steps, &extra);
    head_args.extend(["--listen".into(), format!("{}:{port}", nodes.addresses[0])]);
    let head = nodes
        .launch(0, &head_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (
        head,
        [
            nodes.agent_with(0, port, certs),
            nodes.agent_with(1, port, certs),
        ],
    )
}

/// `launch certs` for the two nodes' addresses, into `dir/certs`.
fn make_certs(nodes: &Nodes, dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg("certs")
        .arg("--out")
        .arg(&certs)
        .arg("--hosts")
        .arg(nodes.addresses.join(","))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    certs
}

/// The head's `--set`s for its certificate of `certs` as `host`.
fn tls_sets(certs: &Path, host: &str) -> Vec<String> {
    vec![
        format!("cluster.tls.ca={}", certs.join("ca.pem").display()),
        format!(
            "cluster.tls.cert={}",
            certs.join(format!("{host}.pem")).display()
        ),
        format!(
            "cluster.tls.key={}",
            certs.join(format!("{host}-key.pem")).display()
        ),
    ]
}

/// Processes of `nodes`' run still alive (they carry its token in their environment).
fn leftovers(nodes: &Nodes) -> Vec<u32> {
    let needle = format!("TESSERA_TOKEN={}", nodes.token);
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            let ours = std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()));
            ours && !zombie
        })
        .collect()
}

/// Starts a long job across the two nodes and waits for its first step.
fn start_long(nodes: &Nodes, scratch: &Path) -> (Child, [Child; 2]) {
    let extra = [
        "watchdog.heartbeat=0.5",
        "watchdog.heartbeat_timeout=3",
        "watchdog.collective_timeout=5",
    ];
    let (head, agents) = start(nodes, scratch, 100_000, &extra);
    let metrics = scratch.join("metrics.jsonl");
    let start = Instant::now();
    while losses(&metrics).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job never trained a step"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (head, agents)
}

/// Starts a long job, waits for its first step, does `fault`, then checks: the head says it
/// is stopping the run within 10 s, naming each of `expected`; it exits 1; both agents end;
/// no process of the run is left.
fn fault_is_handled(
    tag: &str,
    fault: impl FnOnce(&Nodes, &mut [Child; 2]),
    expected: impl FnOnce(&Nodes) -> Vec<String>,
) {
    let Some(nodes) = Nodes::new(tag) else { return };
    let dir = scratch(&format!("fault-{tag}"));
    let (mut head, mut agents) = start_long(&nodes, &dir);
    let (lines, reader) = watch_stdout(&mut head);
    let at = Instant::now();
    fault(&nodes, &mut agents);
    let out = wait_with_limit(head, Duration::from_secs(60));
    reader.join().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let announced = when(&lines, "stopping the run: ").expect("the head says why it stops");
    let detected = announced.saturating_duration_since(at);
    assert!(
        detected < Duration::from_secs(10),
        "detected after {detected:?}"
    );
    for text in expected(&nodes) {
        assert!(stderr.contains(text.as_str()), "`{text}` in: {stderr}");
    }
    for agent in agents {
        let start = Instant::now();
        let _ = wait_with_limit(agent, Duration::from_secs(30));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "an agent was left running"
        );
    }
    let start = Instant::now();
    while !leftovers(&nodes).is_empty() && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        leftovers(&nodes),
        Vec::<u32>::new(),
        "processes left running"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_agent_fails_the_run_naming_its_node_and_nothing_is_left_running() {
    fault_is_handled(
        "k",
        |_, agents| agents[1].kill().unwrap(),
        |nodes| {
            vec![
                format!(", {}): its agent died", nodes.addresses[1]),
                "last collectives: ".into(),
            ]
        },
    );
}

#[test]
fn a_cut_link_fails_the_run_naming_the_unreachable_rank_and_nothing_is_left_running() {
    fault_is_handled(
        "c",
        |nodes, _| nodes.cut(1),
        |nodes| {
            vec![
                format!(", {}) sent no heartbeat for", nodes.addresses[1]),
                "its node is unreachable".into(),
            ]
        },
    );
}

#[test]
fn a_job_across_two_namespaces_trains_like_one_node() {
    trains_like_one_node("t", false);
}

#[test]
fn a_job_across_two_namespaces_trains_like_one_node_over_tls() {
    trains_like_one_node("l", true);
}

/// The job on two nodes, over TLS with `tls` (each agent and its workers presenting their
/// node's certificate), against the same job on one node.
fn trains_like_one_node(tag: &str, tls: bool) {
    let Some(nodes) = Nodes::new(tag) else { return };
    let single = scratch(&format!("{tag}-single"));
    let reference = one_node_losses(&single, 6, &[]);

    let two = scratch(&format!("{tag}-two"));
    let certs = tls.then(|| make_certs(&nodes, &two));
    let (head, agents) = start_with(&nodes, &two, 6, &[], certs.as_deref());
    let out = wait_with_limit(head, Duration::from_secs(120));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // Every connection was a client of the CA; without TLS the head says what that risks.
    assert!(!stderr.contains("refused a connection"), "{stderr}");
    assert_eq!(
        stderr.contains("warning: cluster.tls is not set"),
        !tls,
        "{stderr}"
    );
    let agent_logs: Vec<String> = agents
        .into_iter()
        .map(|a| {
            let out = wait_with_limit(a, Duration::from_secs(30));
            format!("{}{}", text(&out.stdout), text(&out.stderr))
        })
        .collect();
    assert!(out.status.success(), "{stdout}\n{stderr}\n{agent_logs:?}");
    assert!(stdout.contains("done: 6 steps on 4 ranks"), "{stdout}");
    // Nodes are numbered in the order their agents registered; each ran at its own address.
    let mut numbers = Vec::new();
    for (i, log) in agent_logs.iter().enumerate() {
        let number = (0..2).find(|n| log.contains(&format!("node {n} of 2 (")));
        numbers.push(number.unwrap_or_else(|| panic!("agent {i} got no node: {log}")));
        assert!(
            log.contains(&format!(", {}): ranks", nodes.addresses[i])),
            "{log}"
        );
        assert!(log.contains("every worker finished"), "{log}");
    }
    numbers.sort_unstable();
    assert_eq!(numbers, [0, 1]);
    let trained = losses(&two.join("metrics.jsonl"));
    assert_eq!(trained.len(), reference.len());
    for (a, b) in trained.iter().zip(&reference) {
        assert_eq!(a.0, b.0);
        assert!(
            (a.1 - b.1).abs() <= 1e-5 * b.1.abs(),
            "{trained:?} vs {reference:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&single);
    let _ = std::fs::remove_dir_all(&two);
}

/// The last loss reported for each step (a restart reports the steps since its checkpoint
/// again).
fn last_per_step(losses: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for &(step, loss) in losses {
        by_step.insert(step, loss);
    }
    by_step.into_iter().collect()
}

/// A 12-step job that checkpoints every 3 steps and may restart once: `fault` strikes node 1
/// after the first checkpoint, `recover` brings a replacement agent up there, and the run must
/// end with the losses of an uninterrupted run on one node, bit for bit.
fn run_recovers(
    tag: &str,
    extra: &[&str],
    fault: impl FnOnce(&Nodes, &mut [Child; 2]),
    recover: impl FnOnce(&Nodes, &mut [Child; 2]),
    done: &str,
) {
    let Some(nodes) = Nodes::new(tag) else { return };
    let mut sets = vec![
        "checkpoint.every=3",
        "restart.max=1",
        "watchdog.heartbeat=0.5",
        "watchdog.heartbeat_timeout=3",
        "watchdog.collective_timeout=5",
    ];
    let single = scratch(&format!("{tag}-single"));
    let reference = one_node_losses(&single, 12, &sets);
    sets.extend(extra);

    let dir = scratch(&format!("{tag}-two"));
    let (mut head, mut agents) = start(&nodes, &dir, 12, &sets);
    let (lines, reader) = watch_stdout(&mut head);
    let metrics = dir.join("metrics.jsonl");
    let checkpoint = dir.join("ckpt").join("step-00000003").join("manifest.json");
    let start = Instant::now();
    while !(checkpoint.exists() && losses(&metrics).last().is_some_and(|&(s, _)| s >= 4)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint was written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fault(&nodes, &mut agents);
    let start = Instant::now();
    while when(&lines, "restart 1 of 1: from ").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run never restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    recover(&nodes, &mut agents);
    let out = wait_with_limit(head, Duration::from_secs(120));
    reader.join().unwrap();
    let stdout: Vec<String> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect();
    let stdout = stdout.join("\n");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(done), "{stdout}");
    let trained = last_per_step(&losses(&metrics));
    if extra.is_empty() {
        // The same layout after the restart: the same bits.
        assert_eq!(trained, reference);
    } else {
        // Fewer data-parallel replicas: the same batches, summed in another order.
        assert_eq!(trained.len(), reference.len());
        for (a, b) in trained.iter().zip(&reference) {
            assert!(
                (a.1 - b.1).abs() <= 1e-5 * b.1.abs(),
                "{trained:?} vs {reference:?}"
            );
        }
    }
    for agent in agents {
        let _ = wait_with_limit(agent, Duration::from_secs(30));
    }
    let _ = std::fs::remove_dir_all(&single);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_agent_is_replaced_and_the_run_resumes_from_its_last_checkpoint() {
    run_recovers(
        "r",
        &[],
        |_, agents| agents[1].kill().unwrap(),
        |nodes, agents| {
            let _ = agents[1].wait();
            agents[1] = nodes.agent(1, port());
        },
        "done: 12 steps on 4 ranks after 1 restart",
    );
}

#[test]
fn with_restart_min_nodes_the_run_goes_on_without_a_dead_node() {
    run_recovers(
        "s",
        &["restart.min_nodes=1"],
        |_, agents| agents[1].kill().unwrap(),
        |_, _| {},
        "done: 12 steps on 2 ranks after 1 restart",
    );
}

#[test]
fn after_a_cut_link_is_mended_a_new_agent_resumes_the_run_from_its_last_checkpoint() {
    run_recovers(
        "m",
        &[],
        |nodes, _| nodes.cut(1),
        |nodes, agents| {
            // The cut-off agent stops its workers and exits once it misses the coordinator.
            let start = Instant::now();
            let status = loop {
                if let Some(status) = agents[1].try_wait().unwrap() {
                    break status;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the cut-off agent stayed"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(status.code(), Some(1));
            nodes.reconnect(1);
            agents[1] = nodes.agent(1, port());
        },
        "done: 12 steps on 4 ranks after 1 restart",
    );
}

#[test]
fn a_hostfile_makes_the_head_start_an_agent_on_every_host() {
    hostfile_run("h", false);
}

#[test]
fn a_hostfile_run_over_tls_gives_the_agents_it_starts_the_heads_certificate() {
    hostfile_run("f", true);
}

/// The head starts both agents over (a stand-in for) ssh, with `tls` on or off.
fn hostfile_run(tag: &str, tls: bool) {
    let Some(nodes) = Nodes::new(tag) else { return };
    let dir = scratch(&format!("hostfile-{tag}"));
    let certs = tls.then(|| make_certs(&nodes, &dir));
    // An `ssh HOST COMMAND` that enters HOST's namespace instead of logging in to it.
    let ssh = dir.join("fake-ssh");
    let cases: String = (0..2)
        .map(|i| format!("  {}) ns={} ;;\n", nodes.addresses[i], nodes.names[i]))
        .collect();
    std::fs::write(
        &ssh,
        format!(
            "#!/bin/sh\nwhile [ \"$1\" = -o ]; do shift 2; done\nhost=$1; shift\n\
             case $host in\n{cases}  *) echo \"unknown host $host\" >&2; exit 255 ;;\nesac\n\
             exec ip netns exec \"$ns\" sh -c \"$*\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "# two nodes\n{} slots=2\n{} slots=2\n",
            nodes.addresses[0], nodes.addresses[1]
        ),
    )
    .unwrap();

    let mut sets = vec![format!("cluster.hostfile={}", hosts.display())];
    if let Some(certs) = &certs {
        sets.extend(tls_sets(certs, &nodes.addresses[0]));
    }
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut args = job_args(&dir, 2, 4, &sets);
    args.extend([
        "--listen".into(),
        format!("{}:{}", nodes.addresses[0], port()),
    ]);
    let out = wait_with_limit(
        nodes
            .launch(0, &args)
            .env("TESSERA_SSH", &ssh)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("starting the agents of 2 hosts over ssh"),
        "{stdout}"
    );
    assert!(!stderr.contains("refused a connection"), "{stderr}");
    for address in &nodes.addresses {
        assert!(
            stdout.contains(&format!(", {address}): ranks")),
            "an agent at {address}: {stdout}"
        );
    }
    assert!(stdout.contains("done: 4 steps on 4 ranks"), "{stdout}");
    assert_eq!(
        leftovers(&nodes),
        Vec::<u32>::new(),
        "processes left running"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cuda_run_refuses_agents_without_gpus_before_any_worker_starts() {
    if tessera_worker::tensor::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver, so its agents would be accepted");
        return;
    }
    // On loopback: the agents are refused before any worker would need an address.
    let dir = scratch("no-gpus");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let token = format!("no-gpus-test-{}", std::process::id());
    let mut args = job_args(&dir, 2, 4, &["cluster.device=cuda", "cluster.backend=tcp"]);
    args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    let launch = |args: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_launch"))
            .args(args)
            .current_dir(repo())
            .env("TESSERA_TOKEN", &token)
            .env_remove("TESSERA_COORDINATOR")
            .env_remove("TESSERA_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let head = launch(&args);
    let coordinator = format!("127.0.0.1:{port}");
    let agent_args: Vec<String> = ["agent", "--coordinator", &coordinator, "--wait", "10"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let agents = [launch(&agent_args), launch(&agent_args)];
    let started = Instant::now();
    let out = wait_with_limit(head, Duration::from_secs(60));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused at registration, not after the rendezvous timeout"
    );
    assert!(
        stderr.contains("the coordinator refused a node agent: ")
            && stderr.contains(
                "has no GPU that the CUDA driver can see (or no driver), but \
                 cluster.device is cuda and 2 ranks run there"
            ),
        "{stdout}\n{stderr}"
    );
    // The first agent refused ends the run; the other is refused too, or finds the head gone.
    let agents: Vec<Output> = agents
        .into_iter()
        .map(|agent| wait_with_limit(agent, Duration::from_secs(30)))
        .collect();
    let told: Vec<String> = agents.iter().map(|out| text(&out.stderr)).collect();
    assert!(agents.iter().all(|out| !out.status.success()), "{told:?}");
    assert!(
        told.iter()
            .any(|stderr| stderr.contains("refused this node") && stderr.contains("has no GPU")),
        "{told:?}"
    );
    assert!(
        !dir.join("metrics.jsonl").exists() || losses(&dir.join("metrics.jsonl")).is_empty(),
        "no step was trained"
    );
}
