//! Tensor parallelism (Megatron-style) as the two collectives the model calls at the edges of
//! its split regions, so the model stays one piece of code for every degree.
//!
//! Attention and MLP are split column-parallel then row-parallel: a rank's matmuls see the
//! whole input and produce a partial sum of the output. [`TensorParallel::gather`] makes a
//! region's input whole before its first matmul, [`TensorParallel::reduce`] sums the partial
//! output after its last. Without sequence parallelism every rank holds all `N` tokens of the
//! residual stream, so `gather` is nothing and `reduce` an all-reduce; with it each rank holds
//! `N / t` of them, `gather` is an all-gather and `reduce` a reduce-scatter (the same bytes as
//! the all-reduce, in two halves). Backward uses the same pair: the gradient flowing into a
//! row-parallel matmul is gathered, the one flowing out of a column-parallel matmul reduced.
//!
//! Under sequence parallelism each rank's norms see only its tokens, so the gradients of the
//! parameters the table marks `GradSync::SequencePartial` are partial sums that
//! [`TensorParallel::reduce_partial_grads`] adds up once per step. Every other replicated
//! parameter gets its gradient from whole inputs and stays equal on every rank.

use tessera_plan::model::GradSync;

use crate::comm::{Collective, Communicator, CommunicatorExt as _, ReduceOp};
use crate::error::Result;
use crate::model::Regions;
use crate::tensor::{Backend, Tensor};
use crate::units::Unit;

/// One rank's tensor-parallel group.
pub struct TensorParallel {
    comm: Box<dyn Communicator>,
    /// Sequence parallelism: the residual stream is split over the group by tokens.
    sequence: bool,
}

impl TensorParallel {
    pub fn new(comm: Box<dyn Communicator>, sequence: bool) -> TensorParallel {
        let sequence = sequence && comm.group().size() > 1;
        TensorParallel { comm, sequence }
    }

    /// The group's size, `t`.
    pub fn size(&self) -> usize {
        self.comm.group().size()
    }

    /// This rank's index in the group: which shard of every split parameter it holds.
    pub fn index(&self) -> usize {
        self.comm.group().index
    }

    /// Whether this rank adds the replicated terms that must count once in a partial sum
    /// (the bias of a row-parallel matmul, the position embedding).
    pub fn adds_replicated(&self) -> bool {
        self.index() == 0
    }

    /// Makes `held` (this rank's rows of the residual stream) whole: all-gathered into `full`
    /// under sequence parallelism, else `held` itself.
    pub fn gather<B: Backend>(
        &mut self,
        backend: &B,
        held: Tensor,
        full: Tensor,
    ) -> Result<Tensor> {
        if !self.sequence {
            return Ok(held);
        }
        let (input, output) = (backend.comm_buf(held), backend.comm_buf(full));
        // SAFETY: both are arena ranges that no kernel touches during this blocking call.
        unsafe { self.comm.run(Collective::AllGather { input, output }) }?;
        Ok(full)
    }

    /// Sums the partial outputs `partial` (all `N` rows) over the group, in place; returns
    /// this rank's rows of the sum (all of them without sequence parallelism).
    pub fn reduce<B: Backend>(&mut self, backend: &B, partial: Tensor) -> Result<Tensor> {
        let size = self.size();
        if size == 1 {
            return Ok(partial);
        }
        let buf = backend.comm_buf(partial);
        if !self.sequence {
            // SAFETY: as in `gather`.
            unsafe {
                self.comm.run(Collective::AllReduce {
                    buf,
                    op: ReduceOp::Sum,
                })
            }?;
            return Ok(partial);
        }
        let chunk = partial.len / size;
        let own = partial.slice(self.index() * chunk, chunk);
        let output = buf.slice(self.index() * chunk, chunk);
        // SAFETY: as in `gather`.
        unsafe {
            self.comm.run(Collective::ReduceScatter {
                input: buf,
                output,
                op: ReduceOp::Sum,
            })
        }?;
        Ok(own)
    }

    /// `t` combined over the group with `op`, in place (a no-op for a group of one).
    pub fn all_reduce<B: Backend>(&mut self, backend: &B, t: Tensor, op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let buf = backend.comm_buf(t);
        // SAFETY: as in `gather`.
        unsafe { self.comm.run(Collective::AllReduce { buf, op }) }?;
        Ok(())
    }

    /// Under sequence parallelism, sums `unit`'s norm gradients in `grads` (laid out like the
    /// unit) over the group: each rank's covered its own tokens. Call on each
    /// gradient once it is final for the step, or for the bucket (ZeRO 2 and 3).
    pub fn reduce_partial_grads<B: Backend>(
        &mut self,
        backend: &B,
        unit: &Unit,
        grads: Tensor,
    ) -> Result<()> {
        if !self.sequence {
            return Ok(());
        }
        for placed in unit
            .layout
            .params
            .iter()
            .filter(|p| p.spec.sync == GradSync::SequencePartial)
        {
            self.all_reduce(backend, unit.view(grads, placed.spec.name), ReduceOp::Sum)?;
        }
        Ok(())
    }
}

impl<B: Backend> Regions<B> for TensorParallel {
    fn size(&self) -> usize {
        TensorParallel::size(self)
    }

    fn adds_replicated(&self) -> bool {
        TensorParallel::adds_replicated(self)
    }

    fn gather(&mut self, backend: &B, held: Tensor, full: Tensor) -> Result<Tensor> {
        TensorParallel::gather(self, backend, held, full)
    }

    fn reduce(&mut self, backend: &B, partial: Tensor) -> Result<Tensor> {
        TensorParallel::reduce(self, backend, partial)
    }

    fn all_reduce(&mut self, backend: &B, t: Tensor, op: ReduceOp) -> Result<()> {
        TensorParallel::all_reduce(self, backend, t, op)
    }
}
