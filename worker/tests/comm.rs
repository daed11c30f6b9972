//! The TCP collectives between real processes on 127.0.0.1, against serial references.
//!
//! Each test starts this test binary again once per rank (running the ignored `child_process`
//! test, which acts on TESSERA_COMM_TEST). A child prints its endpoint's address, reads every
//! rank's address from stdin, runs a scenario and exits 0, or 3 with the `CommError` on
//! stderr.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use half::bf16;
use tessera_worker::comm::tcp::{TcpCommunicator, TcpEndpoint};
use tessera_worker::comm::{
    Collective, CommBuf, CommError, Communicator, CommunicatorExt as _, Group, ReduceOp,
};

const TOKEN: &str = "test-token";
/// Sizes every collective is checked at: empty, one, fewer than the ranks, odd, large.
const SIZES: [usize; 6] = [0, 1, 3, 64, 1001, 100_003];

// ---------------------------------------------------------------- the parent side

struct Rank {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// Starts `world` children running `scenario`; `env(rank)` adds variables per rank.
fn start(
    world: usize,
    scenario: &str,
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<Rank> {
    let mut ranks: Vec<Rank> = (0..world)
        .map(|rank| {
            let mut command = Command::new(std::env::current_exe().unwrap());
            command
                .args([
                    "--ignored",
                    "--exact",
                    "child_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TESSERA_COMM_TEST", scenario)
                .env("TEST_RANK", rank.to_string())
                .env("TEST_WORLD", world.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (key, value) in env(rank) {
                command.env(key, value);
            }
            let mut child = command.spawn().expect("the test binary starts");
            let stdout = BufReader::new(child.stdout.take().unwrap());
            Rank { child, stdout }
        })
        .collect();
    let mut addresses = Vec::new();
    for rank in &mut ranks {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                rank.stdout.read_line(&mut line).unwrap() > 0,
                "a child exited before listening"
            );
            // libtest may print "test child_process ... " on the same line first.
            if let Some((_, address)) = line.trim().split_once("ADDR ") {
                addresses.push(address.to_string());
                break;
            }
        }
    }
    let peers = format!("PEERS {}\n", addresses.join(","));
    for rank in &mut ranks {
        rank.child
            .stdin
            .take()
            .unwrap()
            .write_all(peers.as_bytes())
            .unwrap();
    }
    ranks
}

/// Waits for every child; returns (exit code, stdout, stderr) per rank.
fn finish(ranks: Vec<Rank>) -> Vec<(Option<i32>, String, String)> {
    ranks
        .into_iter()
        .map(|mut rank| {
            let mut stdout = String::new();
            rank.stdout.read_to_string(&mut stdout).unwrap();
            let mut stderr = String::new();
            rank.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            let status = rank.child.wait().unwrap();
            (status.code(), stdout, stderr)
        })
        .collect()
}

fn run_ok(world: usize, scenario: &str) {
    for (rank, (code, _, stderr)) in finish(start(world, scenario, |_| Vec::new()))
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            code,
            Some(0),
            "world {world}, rank {rank} of `{scenario}`: {stderr}"
        );
    }
}

/// Reads a child's stdout until a line equal to `marker`.
fn wait_for_line(rank: &mut Rank, marker: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            rank.stdout.read_line(&mut line).unwrap() > 0,
            "the child exited before `{marker}`"
        );
        if line.trim() == marker {
            return;
        }
    }
}

#[test]
fn every_collective_matches_a_serial_reference_for_world_sizes_1_to_8() {
    for world in 1..=8 {
        run_ok(world, "suite");
    }
}

#[test]
fn a_64_mib_all_reduce_is_exact_at_2_and_5_ranks() {
    run_ok(2, "big");
    run_ok(5, "big");
}

#[test]
fn a_killed_rank_fails_every_other_rank_quickly_naming_the_collective() {
    let mut ranks = start(4, "loop", |_| Vec::new());
    for rank in &mut ranks {
        wait_for_line(rank, "LOOPING");
    }
    let killed = Instant::now();
    ranks[2].child.kill().unwrap();
    let results = finish(ranks);
    let elapsed = killed.elapsed();
    for (rank, (code, _, stderr)) in results.iter().enumerate() {
        if rank == 2 {
            continue;
        }
        assert_eq!(*code, Some(3), "rank {rank}: {stderr}");
        assert!(stderr.contains("all_reduce #"), "rank {rank}: {stderr}");
        assert!(
            stderr.contains("in group test failed after"),
            "rank {rank}: {stderr}"
        );
        assert!(
            stderr.contains("not heard from rank"),
            "rank {rank}: {stderr}"
        );
    }
    // Rank 3 receives from rank 2 in the ring, so it sees the death first-hand; the others
    // may hear of it first from a neighbour that failed (and closed its connections).
    assert!(
        results[3].2.contains("not heard from rank 2"),
        "rank 3: {}",
        results[3].2
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "the timeout is 5 s; failing took {elapsed:?}"
    );
}

#[test]
fn a_hung_rank_is_named_after_the_timeout() {
    let mut ranks = start(3, "hang", |_| Vec::new());
    for rank in &mut ranks {
        wait_for_line(rank, "LOOPING");
    }
    let started = Instant::now();
    let mut hung = ranks.remove(1);
    let results = finish(ranks);
    let elapsed = started.elapsed();
    let _ = hung.child.kill();
    let _ = hung.child.wait();
    // Rank 2 receives from rank 1 in the ring.
    let (code, _, stderr) = &results[1];
    assert_eq!(*code, Some(3), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("not heard from rank 1"), "{stderr}");
    assert_eq!(results[0].0, Some(3), "rank 0 fails too: {}", results[0].2);
    assert!(
        elapsed < Duration::from_secs(8),
        "timeout 2 s; took {elapsed:?}"
    );
}

#[test]
fn a_peer_with_another_token_cannot_join() {
    let results = finish(start(2, "join", |rank| {
        if rank == 1 {
            vec![("TEST_TOKEN", "another".to_string())]
        } else {
            Vec::new()
        }
    }));
    for (rank, (code, _, stderr)) in results.iter().enumerate() {
        assert_eq!(*code, Some(3), "rank {rank}: {stderr}");
        assert!(
            stderr.contains("cannot set up group test"),
            "rank {rank}: {stderr}"
        );
    }
    // Each end proves it knows the token: the dialling rank 0 finds that its peer does not.
    assert!(
        results[0]
            .2
            .contains("the peer does not know this run's token"),
        "{}",
        results[0].2
    );
}

// ---------------------------------------------------------------- the child side

#[test]
#[ignore = "run by the other tests as a child process"]
fn child_process() {
    let Ok(scenario) = std::env::var("TESSERA_COMM_TEST") else {
        return;
    };
    let rank: usize = std::env::var("TEST_RANK").unwrap().parse().unwrap();
    let world: usize = std::env::var("TEST_WORLD").unwrap().parse().unwrap();
    let token = std::env::var("TEST_TOKEN").unwrap_or_else(|_| TOKEN.into());
    let endpoint = TcpEndpoint::bind("127.0.0.1", &token).unwrap();
    println!("ADDR {}", endpoint.address());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers: Vec<SocketAddr> = line
        .trim()
        .strip_prefix("PEERS ")
        .unwrap()
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let timeout = match scenario.as_str() {
        "hang" | "join" => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    };
    let group = Group {
        name: "test".into(),
        ranks: (0..world).collect(),
        index: rank,
    };
    let result = endpoint
        .communicator(group, &peers, timeout)
        .and_then(|mut comm| match scenario.as_str() {
            "suite" => suite(&mut comm, rank, world),
            "big" => big(&mut comm, rank, world),
            "loop" | "hang" => looping(&mut comm, rank, scenario == "hang"),
            "join" => comm.barrier(),
            other => panic!("unknown scenario {other}"),
        });
    if let Err(error) = result {
        eprintln!("COMMERR: {error}");
        std::process::exit(3);
    }
}

/// Small integers, so that f32 sums are exact in any order.
fn values(rank: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13 + salt * 5) % 17) as f32 - 8.0)
        .collect()
}

fn summed(world: usize, len: usize, salt: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; len];
    for r in 0..world {
        for (s, v) in sum.iter_mut().zip(values(r, len, salt)) {
            *s += v;
        }
    }
    sum
}

fn suite(comm: &mut TcpCommunicator, rank: usize, n: usize) -> Result<(), CommError> {
    for (salt, &len) in SIZES.iter().enumerate() {
        // all_reduce, sum and average.
        let mut buf = values(rank, len, salt);
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        assert_eq!(buf, summed(n, len, salt), "all_reduce sum of {len}");
        let mut buf = values(rank, len, salt);
        comm.all_reduce(&mut buf, ReduceOp::Avg)?;
        for (got, sum) in buf.iter().zip(summed(n, len, salt)) {
            assert!(
                (got - sum / n as f32).abs() <= 1e-6 * sum.abs().max(1.0),
                "avg of {len}"
            );
        }
        let mut buf = values(rank, len, salt);
        comm.all_reduce(&mut buf, ReduceOp::Max)?;
        let mut max = vec![f32::MIN; len];
        for r in 0..n {
            for (m, v) in max.iter_mut().zip(values(r, len, salt)) {
                *m = m.max(v);
            }
        }
        assert_eq!(buf, max, "all_reduce max of {len}");

        // reduce_scatter: out of place and in place, chunks of `len`.
        let whole = summed(n, len * n, salt);
        let own = &whole[rank * len..(rank + 1) * len];
        let mut input = values(rank, len * n, salt);
        let mut output = vec![0.0f32; len];
        comm.reduce_scatter(&mut input, &mut output, ReduceOp::Sum)?;
        assert_eq!(output, own, "reduce_scatter of {len} per rank");
        let mut buf = values(rank, len * n, salt);
        comm.reduce_scatter_in_place(&mut buf, ReduceOp::Sum)?;
        assert_eq!(
            &buf[rank * len..(rank + 1) * len],
            own,
            "in-place reduce_scatter"
        );

        // all_gather: out of place and in place.
        let expected: Vec<f32> = (0..n).flat_map(|r| values(r, len, salt)).collect();
        let mut output = vec![0.0f32; len * n];
        comm.all_gather(&values(rank, len, salt), &mut output)?;
        assert_eq!(output, expected, "all_gather of {len} per rank");
        let mut buf = vec![0.0f32; len * n];
        buf[rank * len..(rank + 1) * len].copy_from_slice(&values(rank, len, salt));
        comm.all_gather_in_place(&mut buf)?;
        assert_eq!(buf, expected, "in-place all_gather");

        // broadcast from each root.
        for root in 0..n {
            let mut buf = if rank == root {
                values(root, len, salt)
            } else {
                vec![0.0; len]
            };
            comm.broadcast(&mut buf, root)?;
            assert_eq!(
                buf,
                values(root, len, salt),
                "broadcast of {len} from {root}"
            );
        }

        // send/recv around the ring, forward then backward (a chain, so any size works
        // with blocking sends).
        if n > 1 {
            for step in [1, n - 1] {
                let (to, from) = ((rank + step) % n, (rank + n - step) % n);
                let mine = values(rank, len, salt);
                let mut got = vec![0.0f32; len];
                if rank == 0 {
                    comm.send(&mine, to)?;
                    comm.recv(&mut got, from)?;
                } else {
                    comm.recv(&mut got, from)?;
                    comm.send(&mine, to)?;
                }
                assert_eq!(got, values(from, len, salt), "recv of {len} from {from}");
            }
        }
        comm.barrier()?;

        // bf16: every rank ends with the same bits, close to the f32 sum.
        let mut buf: Vec<bf16> = values(rank, len, salt)
            .iter()
            .map(|&v| bf16::from_f32(v * 0.37))
            .collect();
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        let mut everyone = vec![bf16::ZERO; len * n];
        comm.all_gather(&buf, &mut everyone)?;
        for r in 0..n {
            assert_eq!(
                &everyone[r * len..(r + 1) * len],
                &buf[..],
                "bf16 bits of rank {r}"
            );
        }
        for (got, sum) in buf.iter().zip(summed(n, len, salt)) {
            let expected = sum * 0.37;
            assert!(
                (got.to_f32() - expected).abs() <= 0.05 * expected.abs().max(1.0),
                "bf16 sum"
            );
        }
    }

    // Non-blocking: several collectives in flight, then waited for.
    let mut buffers: Vec<Vec<f32>> = (0..4).map(|salt| values(rank, 5000, salt)).collect();
    let mut works = Vec::new();
    for buf in &mut buffers {
        let op = Collective::AllReduce {
            buf: CommBuf::host(buf),
            op: ReduceOp::Sum,
        };
        // SAFETY: each buffer stays alive and untouched until its work is waited for below.
        works.push(unsafe { comm.start(op) }?);
    }
    let start = Instant::now();
    while !works.iter_mut().all(|w| w.is_done()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "collectives finish"
        );
        std::thread::yield_now();
    }
    for work in works {
        work.wait()?;
    }
    for (salt, buf) in buffers.iter().enumerate() {
        assert_eq!(
            *buf,
            summed(n, 5000, salt),
            "non-blocking all_reduce {salt}"
        );
    }
    Ok(())
}

fn big(comm: &mut TcpCommunicator, rank: usize, n: usize) -> Result<(), CommError> {
    let len = 16 << 20; // 64 MiB of f32
    let mut buf = values(rank, len, 3);
    let start = Instant::now();
    comm.all_reduce(&mut buf, ReduceOp::Sum)?;
    let seconds = start.elapsed().as_secs_f64();
    assert!(buf == summed(n, len, 3), "64 MiB all_reduce");
    if rank == 0 {
        println!("64 MiB all_reduce on {n} ranks: {:.2} s", seconds);
    }
    Ok(())
}

/// All-reduces forever (a scenario for the failure tests); with `hang`, rank 1 stops after
/// the first round and sleeps.
fn looping(comm: &mut TcpCommunicator, rank: usize, hang: bool) -> Result<(), CommError> {
    let mut buf = vec![1.0f32; 1 << 18];
    comm.all_reduce(&mut buf, ReduceOp::Sum)?;
    println!("LOOPING");
    if hang && rank == 1 {
        std::thread::sleep(Duration::from_secs(60));
    }
    loop {
        comm.all_reduce(&mut buf, ReduceOp::Avg)?;
    }
}
