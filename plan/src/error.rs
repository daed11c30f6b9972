//! The one error type of `tessera-plan`.

use crate::config::Issue;

/// Everything the planner can refuse. Each message says what was wrong, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- config -------------------------------------------------------------------------
    /// The config did not parse or did not validate. Every problem found is listed, each with
    /// the place it came from (`file:line:col`, a `--set` argument, or a default).
    #[error("{}", Issue::render_all(issues))]
    InvalidConfig { issues: Vec<Issue> },

    // --- sizes --------------------------------------------------------------------------
    /// A byte size such as `80GiB` that could not be read.
    #[error(
        "`{input}` is not a size: {reason}; write a number of bytes (85899345920) or a number \
         with a unit (80GiB, 40GB, 512MiB)"
    )]
    InvalidSize { input: String, reason: &'static str },

    // --- mesh ---------------------------------------------------------------------------
    /// A mesh that cannot be laid out on the cluster (checked again when a mesh is built
    /// outside config validation, e.g. by the search).
    #[error("mesh data {data} x tensor {tensor} x pipeline {pipeline}: {reason}")]
    InvalidMesh {
        data: usize,
        tensor: usize,
        pipeline: usize,
        reason: String,
    },
    /// A rank number outside the world.
    #[error("rank {rank} does not exist: the world has {world} ranks (0..{world})")]
    RankOutOfRange { rank: usize, world: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
