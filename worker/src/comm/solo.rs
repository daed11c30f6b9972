//! The communicator of a group of one: a single-process run, or a mesh axis of degree 1.
//! Reductions over one member are the identity, so collectives only copy where the output is
//! not the input.

use super::{Collective, CommBuf, CommError, Communicator, Group, Memory, Work, copy_host};

pub struct Solo {
    group: Group,
}

impl Solo {
    pub fn new(group: Group) -> Solo {
        assert_eq!(group.size(), 1, "invariant: a solo group has one member");
        Solo { group }
    }

    fn invalid(&self, op: &'static str, what: String) -> CommError {
        CommError::Invalid {
            group: self.group.name.clone(),
            op,
            what,
        }
    }

    /// Copies `from` into `to` (same length and dtype) unless they are the same memory.
    ///
    /// # Safety
    /// As [`Communicator::start`]: both ranges are valid and not otherwise in use.
    unsafe fn copy(&self, op: &'static str, from: CommBuf, to: CommBuf) -> Result<(), CommError> {
        if from.len != to.len || from.dtype != to.dtype {
            return Err(self.invalid(
                op,
                format!("input has {} elements, output {}", from.len, to.len),
            ));
        }
        if from.memory != Memory::Host || to.memory != Memory::Host {
            return Err(self.invalid(op, "device memory needs a device backend".into()));
        }
        // SAFETY: the caller's contract.
        unsafe { copy_host(from, to) };
        Ok(())
    }
}

impl Communicator for Solo {
    fn group(&self) -> &Group {
        &self.group
    }

    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
        let result = match op {
            Collective::AllReduce { .. }
            | Collective::Barrier
            | Collective::Broadcast { root: 0, .. } => Ok(()),
            // SAFETY: the caller's contract of `start`.
            Collective::ReduceScatter { input, output, .. } => unsafe {
                self.copy(op.name(), input, output)
            },
            // SAFETY: the caller's contract of `start`.
            Collective::AllGather { input, output } => unsafe {
                self.copy(op.name(), input, output)
            },
            Collective::Broadcast { root, .. } => {
                Err(self.invalid(op.name(), format!("root {root} is outside a group of one")))
            }
            Collective::Send { .. } | Collective::Recv { .. } => Err(self.invalid(
                op.name(),
                "a group of one has no peer to exchange with".into(),
            )),
        };
        result.map(|()| Work::done(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CommunicatorExt as _, ReduceOp};

    #[test]
    fn a_group_of_one_reduces_to_itself_and_gathers_by_copying() {
        let mut solo = Solo::new(Group::solo("dp 0", 3));
        let mut values = vec![1.0f32, 2.0, 3.0];
        solo.all_reduce(&mut values, ReduceOp::Avg).unwrap();
        assert_eq!(values, [1.0, 2.0, 3.0]);
        let mut gathered = vec![0.0f32; 3];
        solo.all_gather(&values, &mut gathered).unwrap();
        assert_eq!(gathered, values);
        solo.all_gather_in_place(&mut gathered).unwrap();
        solo.reduce_scatter_in_place(&mut gathered, ReduceOp::Sum)
            .unwrap();
        assert_eq!(gathered, values);
        let error = solo.send(&values, 0).unwrap_err().to_string();
        assert!(error.contains("send in group dp 0"), "{error}");
        let mut short = vec![0.0f32; 2];
        assert!(solo.all_gather(&values, &mut short).is_err());
    }
}
