//! TLS on the control plane: `launch certs`, a coordinator with `cluster.tls` against clients
//! with and without the right certificates, a run on this machine over TLS, and the messages
//! for files that are missing or do not belong together. (Two nodes over TLS: cluster.rs.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use tessera_launcher::certs;
use tessera_launcher::coordinator::{Coordinator, Event, JobSpec};
use tessera_plan::config::{Backend, Device};
use tessera_plan::mesh::Mesh;
use tessera_proto::tls::{Setting, Tls, TlsFiles};
use tessera_proto::v1::{WorkerAssignment, WorkerHello};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const TOKEN: &str = "tls-test-token-0123456789";

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tessera-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

/// A CA in `dir` and a certificate for each of `hosts`.
fn make(dir: &Path, hosts: &[&str]) -> certs::Written {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    certs::make(dir, &hosts, 1, false).unwrap()
}

/// Host `index`'s files of `written`.
fn files(written: &certs::Written, index: usize) -> TlsFiles {
    let (_, cert, key) = &written.hosts[index];
    TlsFiles {
        ca: written.ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
        setting: Setting::Config,
    }
}

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A coordinator of a one-rank job over `tls` on 127.0.0.1, its runtime and its events.
fn start(tls: Tls) -> (tokio::runtime::Runtime, Coordinator, mpsc::Receiver<Event>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spec = JobSpec {
        config_name: "test.yaml".into(),
        config_yaml: "model: {}".into(),
        config_sets: Vec::new(),
        mesh: Mesh::new(1, 1, 1, 1).unwrap(),
        device: Device::Cpu,
        backend: Backend::Tcp,
        planned: vec![tessera_launcher::capacity::RankBytes {
            device: 1000,
            host_memory: 1000,
        }],
        collective_timeout: Duration::from_secs(5),
        rendezvous_timeout: Duration::from_secs(20),
        heartbeat: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(10),
        worker_args: Vec::new(),
        run_id: "run".into(),
        token: TOKEN.into(),
        tls: Some(tls),
    };
    let (events, received) = mpsc::channel();
    let localhost = "127.0.0.1:0".parse().unwrap();
    let coordinator = Coordinator::start(&runtime, localhost, spec, events).unwrap();
    (runtime, coordinator, received)
}

/// Registers rank 0 through `endpoint`; the error as the client saw it otherwise.
fn register(
    runtime: &tokio::runtime::Runtime,
    endpoint: Endpoint,
) -> Result<WorkerAssignment, String> {
    runtime.block_on(async move {
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| tessera_proto::error_chain(&e))?;
        let mut client = tessera_proto::client(channel, TOKEN).unwrap();
        let hello = WorkerHello {
            rank: 0,
            comm_address: "127.0.0.1:9000".into(),
            hostname: "here".into(),
            pid: 1,
        };
        client
            .register_worker(hello)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{}: {}", status.message(), status.code()))
    })
}

/// An https endpoint of `address` that trusts `ca` and presents `identity` (cert, key).
fn custom(address: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Endpoint {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(ca)));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(pem(cert), pem(key)));
    }
    Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(config)
        .unwrap()
}

/// Events until none came for a moment.
fn settled(received: &mpsc::Receiver<Event>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(event) = received.recv_timeout(Duration::from_millis(500)) {
        events.push(event);
    }
    events
}

fn refused(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Refused { peer: Some(p) } if p.ip().is_loopback()))
}

fn registered(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Registered { .. }))
}

#[test]
fn a_tls_coordinator_refuses_clients_without_a_certificate_of_its_ca() {
    let dir = Scratch::new("refuse");
    let ours = make(&dir.path("ours"), &["localhost"]);
    let theirs = make(&dir.path("theirs"), &["localhost"]);
    let (runtime, coordinator, received) =
        start(Tls::load(&files(&ours, 0)).expect("the files belong together"));
    let address = coordinator.address.to_string();
    let (_, their_cert, their_key) = &theirs.hosts[0];

    let clients = [
        (
            "plain text",
            tessera_proto::tls::endpoint(&address, None).unwrap(),
        ),
        ("no certificate", custom(&address, &ours.ca, None)),
        (
            "a certificate of another CA",
            custom(&address, &ours.ca, Some((their_cert, their_key))),
        ),
    ];
    for (what, endpoint) in clients {
        let outcome = register(&runtime, endpoint);
        assert!(outcome.is_err(), "a client with {what} was served");
        let events = settled(&received);
        assert!(refused(&events), "{what}: {events:?}");
        assert!(!registered(&events), "{what}: {events:?}");
    }

    // A node certificate of the CA is served.
    let tls = Tls::load(&files(&ours, 0)).unwrap();
    let endpoint = tessera_proto::tls::endpoint(&address, Some(&tls)).unwrap();
    let assignment = register(&runtime, endpoint).expect("a client of the CA is served");
    assert_eq!((assignment.rank, assignment.world_size), (0, 1));
    let events = settled(&received);
    assert!(registered(&events) && !refused(&events), "{events:?}");
    coordinator.stop(&runtime);
}

#[test]
fn clients_refuse_a_coordinator_they_cannot_verify() {
    let dir = Scratch::new("verify");
    let ours = make(&dir.path("ours"), &["localhost", "node-a"]);
    let theirs = make(&dir.path("theirs"), &["localhost"]);
    let (local_cert, local_key) = (&ours.hosts[0].1, &ours.hosts[0].2);

    // Without the CA: the client trusts another one.
    let (runtime, coordinator, _events) = start(Tls::load(&files(&ours, 0)).unwrap());
    let address = coordinator.address.to_string();
    let error = register(
        &runtime,
        custom(&address, &theirs.ca, Some((local_cert, local_key))),
    )
    .unwrap_err();
    assert!(error.contains("UnknownIssuer"), "{error}");
    coordinator.stop(&runtime);

    // The right CA, but the coordinator's certificate is for another host than it is dialled at.
    let (runtime, coordinator, _events) = start(Tls::load(&files(&ours, 1)).unwrap());
    let address = coordinator.address.to_string();
    let client = Tls::load(&files(&ours, 0)).unwrap();
    let endpoint = tessera_proto::tls::endpoint(&address, Some(&client)).unwrap();
    let error = register(&runtime, endpoint).unwrap_err();
    assert!(error.contains("not valid for name"), "{error}");
    coordinator.stop(&runtime);
}

/// `launch ARGS` from the repository root, without a token or TLS files in its environment.
fn launch(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_launch"));
    command
        .args(args)
        .current_dir(repo())
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_COORDINATOR")
        .env_remove("TESSERA_TOKEN")
        .env_remove("TESSERA_TLS_CA")
        .env_remove("TESSERA_TLS_CERT")
        .env_remove("TESSERA_TLS_KEY");
    command
}

fn output(mut command: Command) -> Output {
    command.output().expect("launch runs")
}

/// A two-rank run of the tiny job with `sets`, metrics in `dir`.
fn tiny_run(dir: &Scratch, sets: &[String]) -> Command {
    let metrics = dir.path("metrics.jsonl").display().to_string();
    let mut command = launch(&[
        "--config",
        "configs/tiny-cpu.yaml",
        "--fresh",
        "--threads",
        "1",
        "--metrics",
        &metrics,
    ]);
    for set in [
        "parallel.data=2".to_string(),
        "parallel.tensor=1".into(),
        "parallel.pipeline=1".into(),
        "training.steps=3".into(),
        "checkpoint.every=0".into(),
        format!("checkpoint.dir={}", dir.path("ckpt").display()),
    ]
    .iter()
    .chain(sets)
    {
        command.args(["--set", set]);
    }
    command
}

fn tls_sets(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    vec![
        format!("cluster.tls.ca={}", ca.display()),
        format!("cluster.tls.cert={}", cert.display()),
        format!("cluster.tls.key={}", key.display()),
    ]
}

#[test]
fn launch_certs_writes_a_ca_and_host_certificates_a_run_on_one_machine_trains_with() {
    let dir = Scratch::new("run");
    let certs = dir.path("certs");
    let certs_arg = certs.display().to_string();
    let made = output(launch(&[
        "certs",
        "--out",
        &certs_arg,
        "--hosts",
        "localhost,10.0.0.2",
    ]));
    let stdout = text(&made.stdout);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(
        stdout.contains("cluster: {tls: {ca: ") && stdout.contains("--tls-cert "),
        "{stdout}"
    );
    for file in [
        "ca.pem",
        "ca-key.pem",
        "localhost.pem",
        "localhost-key.pem",
        "10.0.0.2.pem",
        "10.0.0.2-key.pem",
    ] {
        assert!(certs.join(file).is_file(), "{file}: {stdout}");
    }
    let again = output(launch(&[
        "certs",
        "--out",
        &certs_arg,
        "--hosts",
        "localhost",
    ]));
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("is not empty"));

    let sets = tls_sets(
        &certs.join("ca.pem"),
        &certs.join("localhost.pem"),
        &certs.join("localhost-key.pem"),
    );
    let out = output(tiny_run(&dir, &sets));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("done: 3 steps on 2 ranks"), "{stdout}");
    assert!(!stderr.contains("refused"), "{stderr}");
    let steps = std::fs::read_to_string(dir.path("metrics.jsonl")).unwrap();
    assert_eq!(steps.lines().count(), 3, "{steps}");
}

#[test]
fn tls_files_that_are_missing_or_do_not_belong_together_exit_2_before_anything_starts() {
    let dir = Scratch::new("bad");
    let ours = make(&dir.path("ours"), &["localhost", "node-a"]);
    let theirs = make(&dir.path("theirs"), &["localhost"]);
    let (local, local_key) = (&ours.hosts[0].1, &ours.hosts[0].2);
    let (node_a, node_a_key) = (&ours.hosts[1].1, &ours.hosts[1].2);
    let not_pem = dir.path("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = dir.path("missing.pem");
    let cases: [(Vec<String>, String); 5] = [
        (
            tls_sets(&ours.ca, local, &missing),
            format!(
                "cannot read cluster.tls.key {}: No such file",
                missing.display()
            ),
        ),
        (
            tls_sets(&not_pem, local, local_key),
            "cluster.tls.ca".to_string()
                + &format!(" {} holds no usable certificate", not_pem.display()),
        ),
        (
            tls_sets(&ours.ca, local, node_a_key),
            format!(
                "cluster.tls.key {} is not the private key of",
                node_a_key.display()
            ),
        ),
        (
            tls_sets(&theirs.ca, local, local_key),
            "is not a node certificate of the CA in cluster.tls.ca".into(),
        ),
        (
            tls_sets(&ours.ca, node_a, node_a_key),
            "is not valid for 127.0.0.1, the address this machine's workers reach".into(),
        ),
    ];
    for (sets, expected) in cases {
        let out = output(tiny_run(&dir, &sets));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{expected}: {stderr}");
        assert!(stderr.contains(&expected), "`{expected}` in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path("metrics.jsonl").exists(), "nothing trained");
    }
}

#[test]
fn an_agent_needs_all_three_tls_files_and_checks_them_before_it_dials() {
    let dir = Scratch::new("agent");
    let ours = make(&dir.path("ours"), &["localhost"]);
    let ca = ours.ca.display().to_string();
    let missing = dir.path("missing.pem").display().to_string();
    let agent = |extra: &[&str]| {
        let mut command = launch(&["agent", "--coordinator", "127.0.0.1:1", "--wait", "1"]);
        command.args(extra).env("TESSERA_TOKEN", TOKEN);
        output(command)
    };
    let out = agent(&["--tls-ca", &ca]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--tls-key"),
        "{stderr}"
    );
    let key = ours.hosts[0].2.display().to_string();
    let out = agent(&["--tls-ca", &ca, "--tls-cert", &missing, "--tls-key", &key]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read --tls-cert {missing}")),
        "{stderr}"
    );
}
