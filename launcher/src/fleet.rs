//! The ranks a supervisor watches, wherever their processes run: this machine's worker
//! processes ([`LocalFleet`]), or those the node agents of a cluster run ([`RemoteFleet`]),
//! known from the coordinator's events. `run::supervise` is written once against [`Fleet`].

use nix::sys::signal::Signal;

use crate::agent::{Worker, describe_status};
use crate::coordinator::{Coordinator, Event, NodeInfo};

/// A rank that exited with a failure: its number, how it ended, in words and as a value
/// (which [`crate::blame::Blame`] ranks to find the run's cause).
#[derive(Debug, Clone)]
pub struct Failed {
    pub rank: usize,
    pub how: String,
    pub end: End,
}

/// How a rank's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It exited with this status.
    Status(i32),
    /// A signal killed it.
    Signal(i32),
    /// Its node was lost (agent dead or unreachable); nobody knows how it ended.
    Lost,
}

pub trait Fleet {
    /// How many ranks (the world size).
    fn ranks(&self) -> usize;
    /// Takes note of a coordinator event (a remote fleet learns of exits this way).
    fn observe(&mut self, event: &Event);
    /// The ranks that failed since the last call.
    fn newly_failed(&mut self) -> Vec<Failed>;
    fn exited(&self, rank: usize) -> bool;
    fn all_exited(&self) -> bool {
        (0..self.ranks()).all(|rank| self.exited(rank))
    }
    /// Whether a rank may still be running: started and not known to have exited.
    fn any_running(&self) -> bool {
        !self.all_exited()
    }
    /// "rank 2 (pid 4711)", with the node for a remote rank.
    fn describe(&self, rank: usize) -> String;
    /// Asks every rank to stop (SIGTERM), or makes it (SIGKILL) when `now`.
    fn stop(&self, coordinator: &Coordinator, now: bool);
    /// Kills one rank that no longer answers, if this fleet can reach it.
    fn kill(&self, rank: usize);
}

/// This machine's worker processes, one per rank, in rank order.
pub struct LocalFleet<'a> {
    pub workers: &'a mut [Worker],
}

impl Fleet for LocalFleet<'_> {
    fn ranks(&self) -> usize {
        self.workers.len()
    }

    fn observe(&mut self, _: &Event) {}

    fn newly_failed(&mut self) -> Vec<Failed> {
        let mut failed = Vec::new();
        for worker in self.workers.iter_mut() {
            let already = worker.status.is_some();
            if let Some(status) = worker.poll()
                && !already
                && !status.success()
            {
                use std::os::unix::process::ExitStatusExt as _;
                let end = match (status.code(), status.signal()) {
                    (Some(code), _) => End::Status(code),
                    (None, Some(signal)) => End::Signal(signal),
                    (None, None) => End::Lost,
                };
                failed.push(Failed {
                    rank: worker.rank,
                    how: describe_status(status),
                    end,
                });
            }
        }
        failed
    }

    fn exited(&self, rank: usize) -> bool {
        self.workers[rank].status.is_some()
    }

    fn describe(&self, rank: usize) -> String {
        format!("rank {rank} (pid {})", self.workers[rank].pid())
    }

    fn stop(&self, _: &Coordinator, now: bool) {
        let signal = if now {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        for worker in self.workers.iter() {
            worker.signal(signal);
        }
    }

    fn kill(&self, rank: usize) {
        self.workers[rank].signal(Signal::SIGKILL);
    }
}

/// Where a remote rank runs and how it ended.
#[derive(Debug, Clone, Default)]
struct RemoteRank {
    node: Option<u32>,
    /// "hostname, address" of its node.
    host: String,
    pid: Option<u32>,
    /// How it ended, and whether that was a success; `None` while running.
    ended: Option<(String, End, bool)>,
    reported: bool,
}

/// The ranks of a cluster's node agents in one attempt of the run.
pub struct RemoteFleet {
    ranks: Vec<RemoteRank>,
    attempt: u32,
}

impl RemoteFleet {
    /// `world` ranks, placed on the `nodes` registered so far (the others say where they run
    /// when their agent registers).
    pub fn new(world: usize, attempt: u32, nodes: &[NodeInfo]) -> RemoteFleet {
        let mut fleet = RemoteFleet {
            ranks: vec![RemoteRank::default(); world],
            attempt,
        };
        for node in nodes.iter().filter(|n| !n.lost) {
            fleet.place(node.node, &node.hostname, &node.address, &node.ranks);
        }
        fleet
    }

    fn place(&mut self, node: u32, hostname: &str, address: &str, ranks: &[u32]) {
        for &rank in ranks {
            if let Some(slot) = self.ranks.get_mut(rank as usize) {
                slot.node = Some(node);
                slot.host = format!("{hostname}, {address}");
            }
        }
    }

    /// Nodes with a rank whose end nobody reported: unreachable ones.
    pub fn silent_nodes(&self) -> Vec<u32> {
        let mut nodes: Vec<u32> = self
            .ranks
            .iter()
            .filter(|r| r.ended.is_none())
            .filter_map(|r| r.node)
            .collect();
        nodes.dedup();
        nodes
    }
}

impl Fleet for RemoteFleet {
    fn ranks(&self) -> usize {
        self.ranks.len()
    }

    fn observe(&mut self, event: &Event) {
        match event {
            Event::AgentRegistered {
                node,
                hostname,
                address,
                ranks,
            } => self.place(*node, hostname, address, ranks),
            Event::Registered { rank, pid, .. } => {
                if let Some(slot) = self.ranks.get_mut(*rank as usize) {
                    slot.pid = Some(*pid);
                }
            }
            Event::Exit(exit) if exit.attempt == self.attempt => {
                if let Some(slot) = self.ranks.get_mut(exit.rank as usize)
                    && slot.ended.is_none()
                {
                    slot.pid = Some(exit.pid);
                    let (how, end, ok) = match (exit.code, exit.signal) {
                        (Some(0), _) => ("exited with status 0".into(), End::Status(0), true),
                        (Some(code), _) => (
                            format!("exited with status {code}"),
                            End::Status(code),
                            false,
                        ),
                        (None, Some(number)) => (
                            match Signal::try_from(number) {
                                Ok(signal) => format!("was killed by {signal}"),
                                Err(_) => format!("was killed by signal {number}"),
                            },
                            End::Signal(number),
                            false,
                        ),
                        (None, None) => ("ended in an unknown way".into(), End::Lost, false),
                    };
                    slot.ended = Some((how, end, ok));
                }
            }
            Event::NodeLost { node } => {
                for slot in &mut self.ranks {
                    if slot.node == Some(*node) && slot.ended.is_none() {
                        let how = format!(
                            "was lost with node {node} ({}): its agent died or the node left the network",
                            slot.host
                        );
                        slot.ended = Some((how, End::Lost, false));
                    }
                }
            }
            _ => {}
        }
    }

    fn newly_failed(&mut self) -> Vec<Failed> {
        let mut failed = Vec::new();
        for (rank, slot) in self.ranks.iter_mut().enumerate() {
            if let Some((how, end, ok)) = &slot.ended
                && !slot.reported
            {
                slot.reported = true;
                if !ok {
                    failed.push(Failed {
                        rank,
                        how: how.clone(),
                        end: *end,
                    });
                }
            }
        }
        failed
    }

    fn exited(&self, rank: usize) -> bool {
        self.ranks[rank].ended.is_some()
    }

    fn any_running(&self) -> bool {
        // A rank is placed when its node's agent registers, and starts right after.
        self.ranks
            .iter()
            .any(|slot| slot.node.is_some() && slot.ended.is_none())
    }

    fn describe(&self, rank: usize) -> String {
        let slot = &self.ranks[rank];
        let pid = slot
            .pid
            .map_or("pid unknown".into(), |p| format!("pid {p}"));
        match slot.node {
            Some(node) => format!("rank {rank} ({pid} on node {node}: {})", slot.host),
            None => format!("rank {rank} ({pid})"),
        }
    }

    fn stop(&self, coordinator: &Coordinator, _now: bool) {
        // Each agent stops its own workers, escalating to SIGKILL itself.
        coordinator.abort("the launcher is stopping the run");
    }

    fn kill(&self, _rank: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::v1::WorkerExit;

    fn registered(fleet: &mut RemoteFleet) {
        for (node, ranks) in [(0, vec![0, 1]), (1, vec![2, 3])] {
            fleet.observe(&Event::AgentRegistered {
                node,
                hostname: format!("host{node}"),
                address: format!("10.0.0.{node}"),
                ranks,
            });
        }
        for rank in 0..4 {
            fleet.observe(&Event::Registered {
                rank,
                hostname: String::new(),
                pid: 100 + rank,
            });
        }
    }

    #[test]
    fn a_lost_node_fails_its_running_ranks_as_the_root_cause() {
        let mut fleet = RemoteFleet::new(4, 0, &[]);
        registered(&mut fleet);
        fleet.observe(&Event::Exit(WorkerExit {
            rank: 3,
            code: Some(0),
            node: 1,
            pid: 103,
            ..WorkerExit::default()
        }));
        fleet.observe(&Event::NodeLost { node: 1 });
        let failed = fleet.newly_failed();
        assert_eq!(failed.len(), 1, "rank 3 had finished cleanly before");
        assert_eq!(failed[0].rank, 2);
        assert_eq!(failed[0].end, End::Lost);
        assert_eq!(
            format!("{} {}", fleet.describe(2), failed[0].how),
            "rank 2 (pid 102 on node 1: host1, 10.0.0.1) was lost with node 1 (host1, 10.0.0.1): \
             its agent died or the node left the network"
        );
        assert!(
            fleet.newly_failed().is_empty(),
            "each failure is reported once"
        );
        assert!(!fleet.all_exited());
        assert!(fleet.exited(2) && fleet.exited(3) && !fleet.exited(0));
    }

    #[test]
    fn reported_exits_say_how_each_rank_ended() {
        let mut fleet = RemoteFleet::new(4, 0, &[]);
        registered(&mut fleet);
        for (rank, code, signal) in [(0, Some(1), None), (1, None, Some(9)), (2, Some(0), None)] {
            fleet.observe(&Event::Exit(WorkerExit {
                rank,
                code,
                signal,
                node: rank / 2,
                pid: 100 + rank,
                attempt: 0,
            }));
        }
        let failed: Vec<(usize, String, End)> = fleet
            .newly_failed()
            .into_iter()
            .map(|f| (f.rank, f.how, f.end))
            .collect();
        assert_eq!(
            failed,
            [
                (0, "exited with status 1".to_string(), End::Status(1)),
                (1, "was killed by SIGKILL".to_string(), End::Signal(9))
            ]
        );
    }
}
