//! All-reduce bus bandwidth of tessera's TCP backend, the nccl-tests way: for a buffer of S
//! bytes on n ranks, busbw = S / time x 2(n-1)/n. Prints one JSON line per size from rank 0.
//!
//!   tessera-bench-comm WORLD BYTES...
//!
//! The process starts WORLD copies of itself (ranks), which exchange their endpoints through
//! stdin/stdout; each size runs one warm-up all-reduce, then as many as fit in MIN_SECONDS
//! (at least MIN_ITERS), timed between barriers.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_worker::comm::tcp::TcpEndpoint;
use tessera_worker::comm::{CommunicatorExt as _, Group, ReduceOp};

const MIN_SECONDS: f64 = 0.5;
const MIN_ITERS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(rank) = std::env::var("BENCH_RANK") {
        return rank_main(rank.parse().expect("BENCH_RANK"), &args[1..]);
    }
    let usage = "usage: tessera-bench-comm WORLD BYTES...";
    let world: usize = args.get(1).and_then(|w| w.parse().ok()).expect(usage);
    let mut children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().expect("own path"))
                .args(&args[1..])
                .env("BENCH_RANK", rank.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("a rank starts")
        })
        .collect();
    let mut readers: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("piped")))
        .collect();
    let mut addresses = Vec::new();
    for reader in &mut readers {
        let mut line = String::new();
        reader.read_line(&mut line).expect("an address");
        addresses.push(line.trim().to_string());
    }
    let peers = format!("{}\n", addresses.join(","));
    for child in &mut children {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(peers.as_bytes())
            .expect("peers sent");
    }
    for line in readers.remove(0).lines() {
        println!("{}", line.expect("rank 0's output"));
    }
    for mut child in children {
        assert!(
            child.wait().expect("a rank exits").success(),
            "a rank failed"
        );
    }
}

fn rank_main(rank: usize, args: &[String]) {
    let world: usize = args[0].parse().expect("WORLD");
    let sizes: Vec<usize> = args[1..]
        .iter()
        .map(|s| s.parse().expect("BYTES"))
        .collect();
    let endpoint = TcpEndpoint::bind("127.0.0.1", "bench").expect("listening");
    println!("{}", endpoint.address());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("peers");
    let peers: Vec<SocketAddr> = line
        .trim()
        .split(',')
        .map(|a| a.parse().expect("an address"))
        .collect();
    let group = Group {
        name: "bench".into(),
        ranks: (0..world).collect(),
        index: rank,
    };
    let mut comm = endpoint
        .communicator(group, &peers, Duration::from_secs(120))
        .expect("connected");
    for bytes in sizes {
        let mut buf = vec![1.0f32; bytes / 4];
        comm.all_reduce(&mut buf, ReduceOp::Sum).expect("warm-up");
        // Every rank runs the same number of iterations: rank 0 decides and broadcasts it.
        let mut iters = [0.0f32];
        if rank == 0 {
            let start = Instant::now();
            comm.all_reduce(&mut buf, ReduceOp::Sum).expect("probe");
            let once = start.elapsed().as_secs_f64();
            iters[0] = ((MIN_SECONDS / once).ceil() as usize).max(MIN_ITERS) as f32;
        } else {
            comm.all_reduce(&mut buf, ReduceOp::Sum).expect("probe");
        }
        comm.broadcast(&mut iters, 0).expect("iterations");
        comm.barrier().expect("barrier");
        let start = Instant::now();
        for _ in 0..iters[0] as usize {
            comm.all_reduce(&mut buf, ReduceOp::Sum)
                .expect("all_reduce");
        }
        comm.barrier().expect("barrier");
        let seconds = start.elapsed().as_secs_f64() / iters[0] as f64;
        if rank == 0 {
            let busbw = bytes as f64 / seconds * 2.0 * (world - 1) as f64 / world as f64;
            println!(
                "{{\"impl\": \"tessera\", \"world\": {world}, \"bytes\": {bytes}, \"seconds\": {seconds:.9}, \"busbw_gbps\": {:.6}}}",
                busbw / 1e9
            );
        }
    }
}
