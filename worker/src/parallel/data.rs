//! Data parallelism: every rank of a data-parallel group runs the same stage on its own
//! share of the global batch, then the group combines the gradients.
//!
//! The loss gradient is already divided by the global batch's token count, so the group
//! *sums* the gradients. By ZeRO stage:
//!
//! - 0: each unit's gradients are all-reduced in place once final for the step.
//! - 1 (optimizer states and fp32 master weights sharded): they are reduce-scattered in place
//!   instead, each rank updates its shard, and the parameters are all-gathered in place after
//!   the step ([`DataParallel::gather_params`]).
//! - 2 (gradients sharded too): a unit's gradients of one microbatch accumulate in a bucket
//!   (`zero.grad_bucket`, two of them), which is reduce-scattered and added into the rank's
//!   gradient shard while the model goes on in the other bucket.
//! - 3 (parameters sharded too): each unit's parameters are all-gathered into a gather buffer
//!   (`zero.param_gather`, two) just before each use ([`DataParallel::params_for`]); nothing is
//!   gathered after the step.
//!
//! Reductions start as soon as their gradients are ready, so they overlap the backward of the
//! units below; [`DataParallel::finish`] waits for all of them before the optimizer.

use crate::arena::ArenaLayout;
use crate::comm::{Collective, CommBuf, Communicator, CommunicatorExt as _, ReduceOp, Work};
use crate::error::Result;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;

/// The gradient and parameter traffic of one data-parallel group.
pub struct DataParallel {
    /// In-place reductions and gathers started this step (ZeRO 0 and 1).
    pending: Vec<Work>,
    /// ZeRO 2 and 3: the gradient buckets, used in turn, and what each one's reduce-scatter in
    /// flight must be added into.
    buckets: Vec<Tensor>,
    in_flight: Vec<Option<Accumulation>>,
    next_bucket: usize,
    /// ZeRO 3: the parameter gather buffers, used in turn.
    gathers: Vec<Tensor>,
    next_gather: usize,
    /// ZeRO 3: a gather started ahead of use: (unit's flat parameters, buffer, transfer).
    prefetched: Option<(Tensor, Tensor, Work)>,
    /// The data-parallel degree: a sharded unit's whole flat buffer is `dp` shards.
    dp: usize,
}

/// A bucket's reduce-scatter in flight: when done, `reduced` (the rank's chunk of the bucket)
/// is added into `shard` (the unit's gradient shard).
struct Accumulation {
    work: Work,
    reduced: Tensor,
    shard: Tensor,
}

impl DataParallel {
    /// Takes ZeRO's buffers from the arena when the plan has them; `dp` is the group's size.
    pub fn new(layout: &ArenaLayout, dp: usize) -> Result<DataParallel> {
        let copies = |name: &str| -> Result<Vec<Tensor>> {
            if !layout.contains(name) {
                return Ok(Vec::new());
            }
            let region = layout.region(name)?;
            Ok((0..region.count()).map(|i| region.get(i)).collect())
        };
        let buckets = copies("zero.grad_bucket")?;
        Ok(DataParallel {
            pending: Vec::new(),
            in_flight: buckets.iter().map(|_| None).collect(),
            buckets,
            next_bucket: 0,
            gathers: copies("zero.param_gather")?,
            next_gather: 0,
            prefetched: None,
            dp,
        })
    }

    /// Where the model accumulates `unit`'s next gradients: the unit's own (ZeRO 0 and 1),
    /// or the unit's extent of the next bucket, zeroed (ZeRO 2 and 3; a bucket still in flight
    /// is settled first).
    pub fn grads_for<B: Backend>(&mut self, backend: &mut B, unit: &Unit) -> Result<Tensor> {
        if let Some(grads) = unit.grads() {
            return Ok(grads);
        }
        let k = self.next_bucket;
        self.next_bucket = (k + 1) % self.buckets.len();
        self.settle(backend, k)?;
        // The unit's whole flat buffer: what the model writes and the reduce-scatter reads.
        let bucket = self.buckets[k].slice(0, unit.flat_grads.len * self.dp);
        backend.fill(bucket, 0.0)?;
        Ok(bucket)
    }

    /// The model is done writing `unit`'s gradients into `grads` (from [`Self::grads_for`]);
    /// `last` says they are final for the step. ZeRO 2 and 3 start the bucket's
    /// reduce-scatter; ZeRO 0 and 1 start the unit's reduction once `last`.
    pub fn grads_done<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        unit: &Unit,
        grads: Tensor,
        last: bool,
    ) -> Result<()> {
        let (size, index) = (comm.group().size(), comm.group().index);
        if !unit.grads_sharded {
            if !last || size == 1 {
                return Ok(());
            }
            let grads = backend.comm_buf(unit.flat_grads);
            let op = if unit.is_whole() {
                Collective::AllReduce {
                    buf: grads,
                    op: ReduceOp::Sum,
                }
            } else {
                Collective::ReduceScatter {
                    output: grads.slice(unit.shard.start, unit.shard.len()),
                    input: grads,
                    op: ReduceOp::Sum,
                }
            };
            // SAFETY: the gradients are in the arena, which the op owns a share of, and no
            // kernel touches this unit's gradients until `finish` has waited: they are final for the step
            // and the optimizer runs after `finish`.
            let work = unsafe { comm.start(op) }?;
            self.pending.push(work);
            return Ok(());
        }
        let k = self
            .buckets
            .iter()
            .position(|b| b.offset == grads.offset)
            .expect("invariant: ZeRO 2/3 gradients are in a bucket from grads_for");
        let (chunk, whole) = (unit.flat_grads.len, grads);
        debug_assert_eq!(
            whole.len,
            chunk * size,
            "invariant: the unit's extent of a bucket"
        );
        let input = backend.comm_buf(whole);
        let output = input.slice(index * chunk, chunk);
        // SAFETY: the bucket is not handed out again (nor read) before `settle` has waited.
        let work = unsafe {
            comm.start(Collective::ReduceScatter {
                input,
                output,
                op: ReduceOp::Sum,
            })
        }?;
        self.in_flight[k] = Some(Accumulation {
            work,
            reduced: whole.slice(index * chunk, chunk),
            shard: unit.flat_grads,
        });
        Ok(())
    }

    /// Waits for bucket `k`'s reduce-scatter, if any, and adds its result into its shard.
    fn settle<B: Backend>(&mut self, backend: &mut B, k: usize) -> Result<()> {
        if let Some(done) = self.in_flight[k].take() {
            done.work.wait()?;
            backend.add(done.shard, done.reduced)?;
        }
        Ok(())
    }

    /// Waits for every reduction (and gather) started this step.
    pub fn finish<B: Backend>(&mut self, backend: &mut B) -> Result<()> {
        if let Some((_, _, work)) = self.prefetched.take() {
            work.wait()?;
        }
        let mut first = Ok(());
        for work in self.pending.drain(..) {
            let result = work.wait();
            if first.is_ok() {
                first = result;
            }
        }
        first?;
        for k in 0..self.buckets.len() {
            self.settle(backend, k)?;
        }
        Ok(())
    }

    /// Where the model reads `unit`'s parameters for its next use: the unit's own, or under
    /// ZeRO 3 a gather buffer holding them all-gathered from every rank's shard (by
    /// [`Self::prefetch`] ahead of time, or now).
    pub fn params_for<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        unit: &Unit,
    ) -> Result<Tensor> {
        if let Some(params) = unit.params() {
            return Ok(params);
        }
        if let Some((shard, gathered, work)) = self.prefetched.take() {
            work.wait()?;
            if shard == unit.flat_params {
                return Ok(gathered);
            }
        }
        let (gathered, work) = self.start_gather(comm, backend, unit)?;
        work.wait()?;
        Ok(gathered)
    }

    /// Under ZeRO 3, starts all-gathering `unit`'s parameters into the next gather buffer, so
    /// that they are there when [`Self::params_for`] asks next; the unit in use keeps its
    /// buffer (there are two).
    pub fn prefetch<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        unit: &Unit,
    ) -> Result<()> {
        if unit.params().is_some() || self.prefetched.is_some() {
            return Ok(());
        }
        let (gathered, work) = self.start_gather(comm, backend, unit)?;
        self.prefetched = Some((unit.flat_params, gathered, work));
        Ok(())
    }

    fn start_gather<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        unit: &Unit,
    ) -> Result<(Tensor, Work)> {
        let k = self.next_gather;
        self.next_gather = (k + 1) % self.gathers.len();
        let size = comm.group().size();
        let gathered = self.gathers[k].slice(0, unit.flat_params.len * size);
        let (input, output) = (
            backend.comm_buf(unit.flat_params),
            backend.comm_buf(gathered),
        );
        // SAFETY: both are arena ranges: the shard is not written before the optimizer, which
        // runs after `finish`, and the buffer is not read until `params_for` has waited.
        let work = unsafe { comm.start(Collective::AllGather { input, output }) }?;
        Ok((gathered, work))
    }

    /// ZeRO 2 and 3: the whole gradients of `unit`, gathered from every rank's shard into a
    /// bucket (to sum the tied embedding's two copies); [`Self::scatter_back`] returns them.
    pub fn gather_grads<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &mut B,
        unit: &Unit,
    ) -> Result<Tensor> {
        let whole = self.grads_for(backend, unit)?;
        let (input, output) = (backend.comm_buf(unit.flat_grads), backend.comm_buf(whole));
        // SAFETY: as in `params_for`.
        unsafe { comm.run(Collective::AllGather { input, output }) }?;
        Ok(whole)
    }

    /// Copies this rank's chunk of `whole` (from [`Self::gather_grads`]) back into the shard.
    pub fn scatter_back<B: Backend>(
        &mut self,
        comm: &dyn Communicator,
        backend: &mut B,
        unit: &Unit,
        whole: Tensor,
    ) -> Result<()> {
        let chunk = unit.flat_grads.len;
        backend.copy(
            unit.flat_grads,
            whole.slice(comm.group().index * chunk, chunk),
        )
    }

    /// Under ZeRO 1 and 2, gives every rank the parameters the other ranks updated.
    pub fn gather_params<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &mut B,
        units: &[Unit],
    ) -> Result<()> {
        if comm.group().size() == 1 {
            return Ok(());
        }
        for unit in units.iter().filter(|u| !u.is_whole() && !u.params_sharded) {
            let params = backend.comm_buf(unit.flat_params);
            let input = params.slice(unit.shard.start, unit.shard.len());
            // SAFETY: the parameters live in the arena for the whole run and no kernel runs
            // until every gather has been waited for below.
            let work = unsafe {
                comm.start(Collective::AllGather {
                    input,
                    output: params,
                })
            }?;
            self.pending.push(work);
        }
        self.finish(backend)
    }
}

/// The sum of every member's `value`, the same bits on every member: the members exchange
/// their f64 values bit for bit and each adds them in group order (an f32 all-reduce would
/// round them, and a ring adds in a different order on each rank).
pub fn sum_over_group(comm: &mut dyn Communicator, value: f64) -> Result<f64> {
    if comm.group().size() == 1 {
        return Ok(value);
    }
    Ok(gather_over_group(comm, value)?.iter().sum())
}

/// Every member's `value`, in group order, the same on every member (how ranks agree on a
/// choice each of them can only make for itself, such as which checkpoint is intact).
pub fn gather_over_group(comm: &mut dyn Communicator, value: f64) -> Result<Vec<f64>> {
    const MAX_GROUP: usize = 4096;
    let (size, index) = (comm.group().size(), comm.group().index);
    if size == 1 {
        return Ok(vec![value]);
    }
    assert!(
        size <= MAX_GROUP,
        "invariant: groups of at most {MAX_GROUP} ranks"
    );
    let mut values = [0.0f64; MAX_GROUP];
    values[index] = value;
    let words: &mut [f32] = bytemuck::cast_slice_mut(&mut values[..size]);
    let output = CommBuf::host(words);
    let input = output.slice(2 * index, 2);
    // SAFETY: `values` outlives the wait below and nothing else touches it meanwhile.
    unsafe { comm.start(Collective::AllGather { input, output }) }?.wait()?;
    Ok(values[..size].to_vec())
}
