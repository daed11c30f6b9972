//! tessera-worker: one training rank.
//!
//! The worker owns the numerics of one rank: a [`tensor::Backend`] (CPU now, CUDA later) runs
//! the kernels; [`arena`] lays every buffer out from `tessera_plan::memory` in one allocation
//! per device; [`model`] is GPT-2 with explicit forward and backward written once against the
//! backend; [`optim`] is AdamW with fp32 master weights; [`data`] reads token shards, text or
//! synthetic tokens; [`checkpoint`] saves and restores a rank atomically; [`train`] runs the
//! step loop and writes metrics. [`comm`] runs collectives between ranks and [`parallel`]
//! uses them for data parallelism with ZeRO, tensor and pipeline parallelism; [`trace`]
//! records a Chrome/Perfetto trace of a rank; [`control`] talks to the launcher's coordinator
//! and [`cli`] is the `tessera-worker` command ([`config_file`] reads its config, and
//! `launch`'s). The model never reads the mesh: it computes at
//! its rank's widths and calls `parallel::tensor` where the math crosses ranks.

pub mod arena;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod config_file;
pub mod control;
pub mod data;
pub mod error;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod sample;
pub mod tensor;
pub mod throttle;
pub mod trace;
pub mod train;
pub mod units;

pub use error::{Error, Result};
