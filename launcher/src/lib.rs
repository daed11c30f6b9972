//! The `launch` command's library: plans, starts and supervises tessera training jobs. The
//! binary (`src/main.rs`) is its command line; benchmarks (bench/rendezvous) drive the
//! coordinator directly.
//!
//! `--dry-run` prints every rank's exact memory plan (table, JSON or SVG) and `search` ranks
//! the layouts that fit; the logic lives in `tessera-plan`. Without `--dry-run`, `run` starts
//! the gRPC `coordinator`, spawns and watches the workers (`agent`) and shows `progress`;
//! `certs` makes the CA and node certificates of TLS on the control plane (`cluster.tls`).
//! The workers are this same binary (`launch worker`, the code of `tessera_worker::cli`), so
//! one executable is all a machine needs. `exit.rs` maps outcomes to exit statuses.

pub mod agent;
pub mod blame;
pub mod capacity;
pub mod certs;
pub mod cli;
pub mod config_file;
pub mod coordinator;
pub mod dryrun;
pub mod exit;
pub mod fleet;
pub mod hostfile;
pub mod node;
pub mod progress;
pub mod run;
pub mod search;
pub mod svg;
