//! Saving without stalling the step loop. A save copies the rank's state into its host
//! staging buffer (the plan's `checkpoint.staging` row: a device-to-host copy on a GPU, a
//! memory copy on CPU), and a background thread writes the rank's file from there, with its
//! checksums, and fsyncs it while training goes on. Committing (the manifest and the rename
//! of the partial directory) needs every rank's file: after each step the ranks agree over
//! `comms.world` whether all writes are done (one small all-gather while a save is in
//! flight), and once they are rank 0 commits and prunes. The next save, and the end of the
//! run, wait for the one in flight; a write that failed fails the run, naming its path, on
//! its rank, and the others say which rank failed. The staging buffer is reused only after
//! the write that reads it has finished, and a [`Saver`] joins its thread when dropped.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use tessera_plan::Config;

use super::write::{Entry, write_file};
use super::{
    Checksums, FORMAT, Kind, Manifest, PARTIAL, PREFIX, RunIdentity, commit, export, layout_files,
    prune, rank_file, read, remove_stale_partials, safetensors_dtype, sharded, state_tensors,
    step_dir,
};
use crate::arena::ArenaLayout;
use crate::comm::{CommunicatorExt as _, Memory, Owner};
use crate::error::{Error, Result};
use crate::optim::LossScale;
use crate::parallel::Comms;
use crate::parallel::data::gather_over_group;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;

/// What a rank tells the others about the save in flight (values of one all-gather).
const WRITING: f64 = -1.0;
const FAILED: f64 = -2.0;
/// Done, without a file of its own (a data-parallel replica without ZeRO).
const NO_FILE: f64 = -3.0;
// Done with a file: its header's crc32c (0..2^32, exact in an f64).

/// The staging bytes a writer thread reads, and a share of the arena they are in: the arena
/// outlives the write whatever is dropped first (the backend, the saver).
struct Staged {
    addr: usize,
    len: usize,
    _owner: Option<Owner>,
}

/// The save in flight.
struct Pending {
    step: u64,
    dir: PathBuf,
    partial: PathBuf,
    target: PathBuf,
    keep: usize,
    /// Rank 0's manifest, but for the files' header checksums.
    manifest: Option<Manifest>,
    writer: Option<JoinHandle<Result<u32>>>,
    /// The writer's result once joined; `None` for a rank that writes no file.
    written: Option<Result<u32>>,
}

/// A rank's checkpoint saves (at most one in flight).
pub struct Saver {
    /// The plan's staging row (`None` when the run saves no checkpoints).
    staging: Option<Tensor>,
    pending: Option<Pending>,
}

impl Saver {
    pub fn new(layout: &ArenaLayout) -> Result<Saver> {
        let staging = if layout.contains("checkpoint.staging") {
            Some(layout.region("checkpoint.staging")?.single())
        } else {
            None
        };
        Ok(Saver {
            staging,
            pending: None,
        })
    }

    /// Whether a save is in flight.
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts the checkpoint of `step` into `dir` (every rank calls it at the same step): waits
    /// for the save in flight, stages this rank's state and starts writing its file. Only the
    /// saver writes the staging row, and only once the write before has been joined.
    #[allow(clippy::too_many_arguments)]
    pub fn start<B: Backend>(
        &mut self,
        dir: &Path,
        step: u64,
        config: &Config,
        backend: &mut B,
        units: &[Unit],
        loss_scale: LossScale,
        comms: &mut Comms,
    ) -> Result<()> {
        self.finish(comms)?;
        let leader = comms.rank == 0;
        let partial = dir.join(format!("{PREFIX}{step:08}{PARTIAL}{}", comms.run_id));
        if leader {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
            remove_stale_partials(dir)?;
            std::fs::create_dir(&partial).map_err(Error::io(&partial))?;
        }
        comms.world.barrier()?;

        let first = comms.dp_rank() == 0;
        let writer = if first || sharded(units) {
            let tensors: Vec<_> = state_tensors(units)
                .into_iter()
                .filter(|t| t.3 == Kind::State || first)
                .collect();
            let path = partial.join(rank_file(comms.rank));
            let (staged, entries) = self.stage(&path, backend, units, &tensors)?;
            Some(std::thread::spawn(move || {
                // SAFETY: the staging region is `staged.len` bytes at `staged.addr`, kept alive
                // by `staged`'s owner, and unwritten until this thread is joined (`start`
                // joins the write before it stages again).
                let data =
                    unsafe { std::slice::from_raw_parts(staged.addr as *const u8, staged.len) };
                write_file(&path, &entries, data)
            }))
        } else {
            None
        };
        let manifest = leader.then(|| {
            let run = RunIdentity::of(config);
            Manifest {
                format: FORMAT,
                step,
                samples: step * config.training.global_batch as u64,
                loss_scale,
                files: layout_files(&run),
                run,
                tensors: export::tensor_maps(config),
                checksums: None,
            }
        });
        self.pending = Some(Pending {
            step,
            dir: dir.to_path_buf(),
            target: step_dir(dir, step),
            partial,
            keep: config.checkpoint.keep,
            manifest,
            writer,
            written: None,
        });
        Ok(())
    }

    /// Copies the buffers that hold `tensors` into the staging region, each whole at the next
    /// 256-byte offset; returns the region and where each tensor's bytes are in it (for the
    /// file at `path`).
    fn stage<B: Backend>(
        &self,
        path: &Path,
        backend: &mut B,
        units: &[Unit],
        tensors: &[(String, Tensor, Vec<usize>, Kind)],
    ) -> Result<(Staged, Vec<Entry>)> {
        let staging = self.staging.ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            what: "the plan has no checkpoint staging row, but a save started".into(),
            help: "this is a bug in tessera; please report it".into(),
        })?;
        let buffers: Vec<Tensor> = units
            .iter()
            .flat_map(|u| {
                [
                    Some(u.flat_params),
                    u.master,
                    Some(u.adam_m),
                    Some(u.adam_v),
                ]
            })
            .flatten()
            .collect();
        let holder = |t: &Tensor| {
            buffers
                .iter()
                .position(|b| {
                    b.place == t.place
                        && b.offset <= t.offset
                        && t.offset + t.bytes() <= b.offset + b.bytes()
                })
                .expect("invariant: every state tensor is a view of a unit buffer")
        };
        // Where each buffer that holds a tensor goes in the staging region.
        let mut at: Vec<Option<usize>> = vec![None; buffers.len()];
        let mut end = 0;
        for tensor in tensors {
            let index = holder(&tensor.1);
            if at[index].is_none() {
                let buffer = buffers[index];
                assert!(
                    end + buffer.bytes() <= staging.bytes(),
                    "invariant: the plan's staging row holds every state buffer"
                );
                let view = Tensor {
                    offset: staging.offset + end,
                    len: buffer.len,
                    dtype: buffer.dtype,
                    ..staging
                };
                backend.copy(view, buffer)?;
                at[index] = Some(end);
                end += buffer.bytes().next_multiple_of(256);
            }
        }
        let entries = tensors
            .iter()
            .map(|(name, tensor, shape, _)| {
                let index = holder(tensor);
                Entry {
                    name: name.clone(),
                    dtype: safetensors_dtype(tensor.dtype),
                    shape: shape.clone(),
                    offset: at[index].expect("invariant: staged above")
                        + (tensor.offset - buffers[index].offset),
                    bytes: tensor.bytes(),
                }
            })
            .collect();
        let buf = backend.comm_buf(staging);
        assert!(
            buf.memory == Memory::Host,
            "invariant: the staging row is host memory"
        );
        Ok((
            Staged {
                addr: buf.addr,
                len: staging.bytes(),
                _owner: buf.owner,
            },
            entries,
        ))
    }

    /// After a step: if every rank's write of the save in flight is done, commits it.
    pub fn poll(&mut self, comms: &mut Comms) -> Result<()> {
        let Some(pending) = &mut self.pending else {
            return Ok(());
        };
        if pending.writer.as_ref().is_some_and(JoinHandle::is_finished) {
            pending.join();
        }
        self.agree(comms)
    }

    /// Waits for the save in flight (if any) and commits it: before the next save and at the
    /// end of the run.
    pub fn finish(&mut self, comms: &mut Comms) -> Result<()> {
        let Some(pending) = &mut self.pending else {
            return Ok(());
        };
        pending.join();
        self.agree(comms)
    }

    /// Agrees with the other ranks on the save in flight: commits it once every write is done,
    /// fails when one failed.
    fn agree(&mut self, comms: &mut Comms) -> Result<()> {
        let pending = self
            .pending
            .as_mut()
            .expect("invariant: called with a save");
        let status = match (&pending.writer, &pending.written) {
            (Some(_), _) => WRITING,
            (None, None) => NO_FILE,
            (None, Some(Ok(crc))) => f64::from(*crc),
            (None, Some(Err(_))) => FAILED,
        };
        let all = gather_over_group(comms.world.as_mut(), status)?;
        if all.contains(&WRITING) && !all.contains(&FAILED) {
            return Ok(());
        }
        let mut pending = self.pending.take().expect("invariant: checked above");
        // Another rank failed while this one may still be writing: the write must end before
        // the staging memory can go.
        pending.join();
        if let Some(Err(e)) = pending.written {
            return Err(e);
        }
        let failed: Vec<usize> = (0..all.len()).filter(|&r| all[r] == FAILED).collect();
        if !failed.is_empty() {
            return Err(Error::Checkpoint {
                path: pending.partial,
                what: format!(
                    "rank {} could not write its file of step {} (its message says why)",
                    super::ranks_list(&failed),
                    pending.step
                ),
                help: "the previous checkpoint is intact; fix what that rank reports and resume"
                    .into(),
            });
        }
        if let Some(mut manifest) = pending.manifest {
            let headers = all
                .iter()
                .enumerate()
                .filter(|(_, crc)| **crc >= 0.0)
                .map(|(rank, crc)| (rank_file(rank), *crc as u32))
                .collect();
            manifest.checksums = Some(Checksums {
                algorithm: "crc32c".into(),
                chunk_bytes: read::CHUNK_BYTES as u64,
                headers,
            });
            commit(&pending.dir, &pending.partial, &pending.target, &manifest)?;
            prune(&pending.dir, pending.keep)?;
        }
        Ok(())
    }
}

impl Pending {
    /// Waits for this rank's writer, keeping its result.
    fn join(&mut self) {
        if let Some(writer) = self.writer.take() {
            self.written = Some(writer.join().unwrap_or_else(|_| {
                Err(Error::Checkpoint {
                    path: self.partial.clone(),
                    what: "the thread writing this rank's file panicked".into(),
                    help: "this is a bug in tessera; please report it".into(),
                })
            }));
        }
    }
}

impl Drop for Saver {
    /// Waits for a write in flight (it holds its own share of the staging memory); its result
    /// is dropped: a failed run does not commit.
    fn drop(&mut self) {
        if let Some(pending) = &mut self.pending {
            pending.join();
        }
    }
}
