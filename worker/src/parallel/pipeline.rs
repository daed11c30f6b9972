//! Pipeline parallelism: the point-to-point traffic between virtual stages and the activation
//! slots of the microbatches a stage holds.
//!
//! Each boundary between virtual stage `b` and `b + 1` has two one-way links, one for
//! activations going forward and one for their gradients coming back. One way each, a link
//! carries its messages in microbatch order on both ends, whatever order the schedule
//! interleaves the chunks in, so no message can overtake another. Receives block (the next op
//! needs them); sends return at once and are waited for only before their buffer is written
//! again (the next forward writes the chunk output, the next backward the residual gradient),
//! which is what keeps 1F1B from deadlocking when two neighbours send to each other.

use std::collections::HashMap;

use crate::comm::{Collective, Communicator, Work};
use crate::error::Result;
use crate::tensor::{Backend, Tensor};

/// The two one-way links at one end of a boundary. Each is a group of two whose member 0
/// sends and member 1 receives.
pub struct Boundary {
    /// Activations: this rank sends (upstream end) or receives (downstream end).
    pub activations: Box<dyn Communicator>,
    /// Gradients of those activations, the other way.
    pub gradients: Box<dyn Communicator>,
}

/// One rank's pipeline links, per model chunk.
pub struct PipelineLinks {
    /// `input[c]`: the boundary before chunk `c` (none for the model's first virtual stage).
    pub input: Vec<Option<Boundary>>,
    /// `output[c]`: the boundary after chunk `c` (none for the model's last virtual stage).
    pub output: Vec<Option<Boundary>>,
    /// The last activation send, not yet waited for (it reads the chunk output buffer).
    activation_sent: Option<Work>,
    /// The last gradient send (it reads the residual gradient buffer).
    gradient_sent: Option<Work>,
}

impl PipelineLinks {
    /// Links for `chunks` model chunks; `Boundary`s are `None` where there is no neighbour.
    pub fn new(input: Vec<Option<Boundary>>, output: Vec<Option<Boundary>>) -> PipelineLinks {
        assert_eq!(input.len(), output.len(), "invariant: one entry per chunk");
        PipelineLinks {
            input,
            output,
            activation_sent: None,
            gradient_sent: None,
        }
    }

    /// No pipeline: one chunk, no neighbours.
    pub fn none() -> PipelineLinks {
        PipelineLinks::new(vec![None], vec![None])
    }

    /// Before a forward of `chunk`: waits for the previous activation send (the forward will
    /// overwrite its buffer), then receives the chunk's input into `input` if it comes from
    /// another stage.
    pub fn receive_input<B: Backend>(
        &mut self,
        backend: &B,
        chunk: usize,
        input: Tensor,
    ) -> Result<()> {
        if let Some(sent) = self.activation_sent.take() {
            sent.wait()?;
        }
        if let Some(link) = &mut self.input[chunk] {
            let buf = backend.comm_buf(input);
            // SAFETY: the slot's input lives in the arena and nothing runs until it arrives.
            unsafe { link.activations.start(Collective::Recv { buf, peer: 0 }) }?.wait()?;
        }
        Ok(())
    }

    /// After a forward of `chunk`: starts sending its output on to the next virtual stage.
    pub fn send_output<B: Backend>(
        &mut self,
        backend: &B,
        chunk: usize,
        output: Tensor,
    ) -> Result<()> {
        if let Some(link) = &mut self.output[chunk] {
            let buf = backend.comm_buf(output);
            // SAFETY: the chunk output is not written again before `receive_input` has waited
            // for this send.
            let work = unsafe { link.activations.start(Collective::Send { buf, peer: 1 }) }?;
            self.activation_sent = Some(work);
        }
        Ok(())
    }

    /// Before a backward of `chunk`: waits for the previous gradient send, then receives the
    /// gradient of the chunk's output into `dresid` if the next virtual stage has it.
    pub fn receive_gradient<B: Backend>(
        &mut self,
        backend: &B,
        chunk: usize,
        dresid: Tensor,
    ) -> Result<()> {
        if let Some(sent) = self.gradient_sent.take() {
            sent.wait()?;
        }
        if let Some(link) = &mut self.output[chunk] {
            let buf = backend.comm_buf(dresid);
            // SAFETY: as in `receive_input`.
            unsafe { link.gradients.start(Collective::Recv { buf, peer: 0 }) }?.wait()?;
        }
        Ok(())
    }

    /// After a backward of `chunk`: starts sending the gradient of its input back.
    pub fn send_gradient<B: Backend>(
        &mut self,
        backend: &B,
        chunk: usize,
        dresid: Tensor,
    ) -> Result<()> {
        if let Some(link) = &mut self.input[chunk] {
            let buf = backend.comm_buf(dresid);
            // SAFETY: `dresid` is not written again before `receive_gradient` (or `finish`)
            // has waited for this send.
            let work = unsafe { link.gradients.start(Collective::Send { buf, peer: 1 }) }?;
            self.gradient_sent = Some(work);
        }
        Ok(())
    }

    /// Waits for every send of the step.
    pub fn finish(&mut self) -> Result<()> {
        for sent in [self.activation_sent.take(), self.gradient_sent.take()]
            .into_iter()
            .flatten()
        {
            sent.wait()?;
        }
        Ok(())
    }
}

/// Which activation slot and which per-chunk buffer (token ids on the first virtual stage,
/// the head's gradient on the last) each microbatch in flight uses. Slots are taken at a
/// microbatch's forward and given back at its backward; the memory plan counted the peak of
/// the same schedule, so a slot is always free.
pub struct Slots {
    free: Vec<usize>,
    free_io: Vec<Vec<usize>>,
    taken: HashMap<(usize, usize), (usize, usize)>,
}

impl Slots {
    /// `total` activation slots and `per_chunk[c]` buffers for chunk `c`.
    pub fn new(total: usize, per_chunk: &[usize]) -> Slots {
        Slots {
            free: (0..total).rev().collect(),
            free_io: per_chunk.iter().map(|&n| (0..n).rev().collect()).collect(),
            taken: HashMap::with_capacity(total),
        }
    }

    /// `(slot, io)` for the forward of `microbatch` through `chunk`.
    pub fn take(&mut self, microbatch: usize, chunk: usize) -> (usize, usize) {
        let slot = self
            .free
            .pop()
            .expect("invariant: the plan counted the schedule's peak of microbatches in flight");
        let io = self.free_io[chunk]
            .pop()
            .expect("invariant: the plan counted each chunk's peak");
        self.taken.insert((microbatch, chunk), (slot, io));
        (slot, io)
    }

    /// The `(slot, io)` of `microbatch` in `chunk`, given back for its backward.
    pub fn give_back(&mut self, microbatch: usize, chunk: usize) -> (usize, usize) {
        let (slot, io) = self
            .taken
            .remove(&(microbatch, chunk))
            .expect("invariant: a backward follows its forward");
        self.free.push(slot);
        self.free_io[chunk].push(io);
        (slot, io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_after_backward_and_never_shared() {
        let mut slots = Slots::new(2, &[2]);
        let a = slots.take(0, 0);
        let b = slots.take(1, 0);
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
        assert_eq!(slots.give_back(0, 0), a);
        let c = slots.take(2, 0);
        assert_eq!(c, a, "the freed slot is taken again");
        assert_eq!(slots.give_back(1, 0), b);
    }
}
