//! The communicator of a group of one: a single-process run, or a mesh axis of degree 1.
//! Reductions over one member are the identity, so collectives only copy where the output is
//! not the input.

use super::{Collective, CommError, Communicator, Group, Memory, Work, copy_host};

pub struct Solo {
    group: Group,
}

impl Solo {
    pub fn new(group: Group) -> Solo {
        assert_eq!(group.size(), 1, "invariant: a solo group has one member");
        Solo { group }
    }
}

impl Communicator for Solo {
    fn group(&self) -> &Group {
        &self.group
    }

    unsafe fn start(&mut self, op: Collective) -> Result<Work, CommError> {
        // Whatever memory the buffers are in, as long as they agree: most ops touch nothing.
        // Sends and receives are refused: a group of one has no other member.
        let memory = op.buffers().first().map_or(Memory::Host, |b| b.memory);
        op.validate(&self.group, "solo", memory)?;
        if let Collective::ReduceScatter { input, output, .. }
        | Collective::AllGather { input, output } = &op
            && input.addr != output.addr
        {
            if memory != Memory::Host {
                return Err(CommError::Invalid {
                    group: self.group.name.clone(),
                    op: op.name(),
                    what: "copying device memory needs a device backend".into(),
                });
            }
            // SAFETY: both are valid ranges of the op, unused by others (start's contract),
            // validated to be of one length and dtype.
            unsafe { copy_host(input, output) };
        }
        Ok(Work::done(Ok(())))
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
