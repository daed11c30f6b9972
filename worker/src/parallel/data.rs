//! Data parallelism: every rank of a data-parallel group runs the same stage on its own
//! share of the global batch, then the group combines the gradients.
//!
//! The loss gradient is already divided by the global batch's token count, so the group
//! *sums* the gradients. Without ZeRO each unit's gradients are all-reduced; with ZeRO 1
//! (optimizer states and fp32 master weights sharded) they are reduce-scattered in place, each
//! rank updates its shard, and the parameters are all-gathered in place afterwards. Each
//! unit's reduction starts as soon as the unit's last backward of the step is done (`reduce`),
//! so it overlaps the backward of the units below it; `finish` waits for all of them before
//! the optimizer reads the gradients.

use crate::comm::{Collective, CommBuf, Communicator, ReduceOp, Work};
use crate::error::Result;
use crate::model::Unit;
use crate::tensor::Backend;

/// The gradient and parameter traffic of one data-parallel group.
#[derive(Default)]
pub struct DataParallel {
    /// Reductions started this step, one per unit.
    pending: Vec<Work>,
}

impl DataParallel {
    pub fn new() -> DataParallel {
        DataParallel::default()
    }

    /// Starts combining `unit`'s gradients over the group. The unit's gradients must be final
    /// for this step and untouched until [`Self::finish`].
    pub fn reduce<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        unit: &Unit,
    ) -> Result<()> {
        if comm.group().size() == 1 {
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
                input: grads,
                output: grads.slice(unit.shard.start, unit.shard.len()),
                op: ReduceOp::Sum,
            }
        };
        // SAFETY: the gradients live in the backend's arena for the whole run, and no kernel
        // touches this unit's gradients until `finish` has waited: its backward is done for
        // the step and the optimizer runs after `finish`.
        let work = unsafe { comm.start(op) }?;
        self.pending.push(work);
        Ok(())
    }

    /// Waits for every reduction started this step.
    pub fn finish(&mut self) -> Result<()> {
        let mut first = Ok(());
        for work in self.pending.drain(..) {
            let result = work.wait();
            if first.is_ok() {
                first = result;
            }
        }
        Ok(first?)
    }

    /// Under ZeRO, gives every rank the parameters the other ranks updated.
    pub fn gather_params<B: Backend>(
        &mut self,
        comm: &mut dyn Communicator,
        backend: &B,
        units: &[Unit],
    ) -> Result<()> {
        if comm.group().size() == 1 {
            return Ok(());
        }
        for unit in units.iter().filter(|u| !u.is_whole()) {
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
        self.finish()
    }
}

/// The sum of every member's `value`, the same bits on every member: the members exchange
/// their f64 values bit for bit and each adds them in group order (an f32 all-reduce would
/// round them, and a ring adds in a different order on each rank).
pub fn sum_over_group(comm: &mut dyn Communicator, value: f64) -> Result<f64> {
    const MAX_GROUP: usize = 4096;
    let (size, index) = (comm.group().size(), comm.group().index);
    if size == 1 {
        return Ok(value);
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
    Ok(values[..size].iter().sum())
}
