//! Rendezvous of a simulated cluster: the launcher's coordinator for a job of N ranks, and N
//! workers registering with it over real gRPC on 127.0.0.1, each on its own connection. Prints
//! one JSON line: the seconds from the first registration sent to the last assignment
//! received, and the coordinator process's peak resident memory.
//!
//!   tessera-bench-rendezvous [N]        (N defaults to 1024)
//!
//! The workers are lightweight clients in a second process (this binary again), so that the
//! coordinator's process holds the coordinator alone and its peak memory is the coordinator's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_launcher::coordinator::{Coordinator, JobSpec};
use tessera_plan::config::{Backend, Device};
use tessera_plan::mesh::Mesh;
use tessera_proto::v1::WorkerHello;

const TOKEN: &str = "bench";

fn main() {
    raise_open_files();
    let args: Vec<String> = std::env::args().collect();
    let ranks: usize = args
        .get(1)
        .map_or(1024, |n| n.parse().expect("N: a number of ranks"));
    if let Ok(address) = std::env::var("BENCH_COORDINATOR") {
        return clients(&address, ranks);
    }
    let runtime = runtime();
    let (events, received) = std::sync::mpsc::channel();
    let spec = JobSpec {
        config_name: "bench.yaml".into(),
        config_yaml: "model: {}".into(),
        config_sets: Vec::new(),
        mesh: Mesh::new(ranks, 1, 1, 8).expect("a valid mesh"),
        device: Device::Cpu,
        backend: Backend::Tcp,
        planned: vec![
            tessera_launcher::capacity::RankBytes {
                device: 0,
                host_memory: 0,
            };
            ranks
        ],
        collective_timeout: Duration::from_secs(60),
        rendezvous_timeout: Duration::from_secs(120),
        heartbeat: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(10),
        worker_args: Vec::new(),
        run_id: "bench".into(),
        token: TOKEN.into(),
        tls: None,
    };
    let localhost = "127.0.0.1:0".parse().expect("an address");
    let coordinator =
        Coordinator::start(&runtime, localhost, spec, events).expect("the coordinator starts");
    let idle_kib = memory_kib("VmRSS");
    let out = Command::new(std::env::current_exe().expect("own path"))
        .arg(ranks.to_string())
        .env("BENCH_COORDINATOR", coordinator.address.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("the clients run");
    assert!(out.status.success(), "the clients failed");
    let seconds: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the clients print their time");
    let peak_kib = memory_kib("VmHWM");
    drop(received);
    coordinator.stop(&runtime);
    println!(
        "{{\"ranks\": {ranks}, \"rendezvous_seconds\": {seconds:.3}, \"coordinator_idle_mib\": {:.1}, \"coordinator_peak_mib\": {:.1}}}",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Registers `ranks` workers at once, each on its own connection; prints the seconds until
/// the last assignment arrived.
fn clients(address: &str, ranks: usize) {
    let runtime = runtime();
    let seconds = runtime.block_on(async {
        let start = Instant::now();
        let calls: Vec<_> = (0..ranks as u32)
            .map(|rank| {
                let address = address.to_string();
                tokio::spawn(async move {
                    let channel =
                        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                            .expect("a URI")
                            .connect()
                            .await
                            .expect("connected");
                    let mut client = tessera_proto::client(channel, TOKEN).expect("an ASCII token");
                    let assignment = client
                        .register_worker(WorkerHello {
                            rank,
                            comm_address: format!("127.0.0.1:{}", 20000 + rank),
                            hostname: "bench".into(),
                            pid: 1,
                        })
                        .await
                        .expect("an assignment")
                        .into_inner();
                    assert_eq!(assignment.rank, rank);
                    assert_eq!(assignment.peer_addresses.len(), ranks);
                })
            })
            .collect();
        for call in calls {
            call.await.expect("a client task");
        }
        start.elapsed().as_secs_f64()
    });
    println!("{seconds}");
}

/// A kibibyte figure from /proc/self/status (`VmRSS`: now, `VmHWM`: peak).
fn memory_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a memory figure")
}

/// One connection per simulated worker needs more than the usual 1024 descriptors.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
