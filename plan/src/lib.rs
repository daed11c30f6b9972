//! tessera-plan: the pure logic shared by the launcher and the workers.
//!
//! - [`config`] reads and validates the YAML config (with `--set` overrides).
//! - [`mesh`] maps ranks to (data, pipeline, tensor) coordinates, groups and nodes.
//! - [`model`] gives every parameter's shape and how tensor parallelism splits it.
//! - [`schedule`] generates pipeline schedules as per-stage op lists.
//! - [`memory`] lists every buffer a rank allocates: the dry-run prints it, the worker's arena
//!   allocates exactly it.
//! - [`search`] enumerates the layouts that fit and ranks them with an analytic cost model.
//!
//! No I/O, no async, no CUDA: everything here is a function of the config, so the launcher,
//! the workers and the tests all compute the same plan.

pub mod bytes;
pub mod config;
pub mod error;
pub mod memory;
pub mod mesh;
pub mod model;
pub mod schedule;
pub mod search;

pub use config::Config;
pub use error::{Error, Result};
