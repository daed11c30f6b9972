//! How one rank takes part in the mesh, kept apart from the model: the communicators of its
//! groups ([`Comms`]) and data parallelism with ZeRO ([`data`]). The model computes at local
//! widths on whatever the sampler hands it; this module reduces what it produced.
//!
//! Tensor and pipeline parallelism (issue 6) join here.

pub mod data;

use crate::comm::solo::Solo;
use crate::comm::{Communicator, Group};

/// The communicators of one rank.
pub struct Comms {
    /// This process's global rank.
    pub rank: usize,
    /// Every rank of the run (checkpoint barriers).
    pub world: Box<dyn Communicator>,
    /// The ranks holding the same pipeline stage and tensor shard: gradients are reduced here.
    pub dp: Box<dyn Communicator>,
    /// Names this run's partial checkpoint directories; the same on every rank.
    pub run_id: String,
}

impl Comms {
    /// A run of one process.
    pub fn solo() -> Comms {
        Comms {
            rank: 0,
            world: Box::new(Solo::new(Group::solo("world", 0))),
            dp: Box::new(Solo::new(Group::solo("dp 0", 0))),
            run_id: std::process::id().to_string(),
        }
    }

    /// This rank's index in its data-parallel group.
    pub fn dp_rank(&self) -> usize {
        self.dp.group().index
    }
}
