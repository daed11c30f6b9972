//! Rank <-> (dp, pp, tp) coordinates, process groups per axis, and placement on nodes.
//!
//! The tensor axis is innermost, so a tensor group is consecutive ranks on one node: its
//! collectives run in every layer and need the node's fast links. The pipeline axis comes next
//! (point-to-point activations, once per microbatch), and the data axis is outermost (gradients,
//! once per step), so the traffic that crosses nodes is the least frequent.

use crate::config::Config;
use crate::error::{Error, Result};

/// The degrees of the three axes and how many ranks share a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mesh {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
    pub gpus_per_node: usize,
}

/// A rank's position on each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coord {
    pub dp_rank: usize,
    pub pp_rank: usize,
    pub tp_rank: usize,
}

/// A mesh axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    Data,
    Pipeline,
    Tensor,
}

impl Mesh {
    /// A mesh of `dp x tp x pp` ranks on nodes of `gpus_per_node`. A tensor group must fit in a
    /// node and the ranks must fill whole nodes.
    pub fn new(dp: usize, tp: usize, pp: usize, gpus_per_node: usize) -> Result<Mesh> {
        let invalid = |reason: String| Error::InvalidMesh {
            data: dp,
            tensor: tp,
            pipeline: pp,
            reason,
        };
        if dp == 0 || tp == 0 || pp == 0 || gpus_per_node == 0 {
            return Err(invalid(
                "every degree and gpus_per_node must be at least 1".into(),
            ));
        }
        if !gpus_per_node.is_multiple_of(tp) {
            return Err(invalid(format!(
                "a tensor group of {tp} does not fit whole into nodes of {gpus_per_node}; use a tensor degree that divides {gpus_per_node}"
            )));
        }
        let world = dp * tp * pp;
        if world > gpus_per_node && !world.is_multiple_of(gpus_per_node) {
            return Err(invalid(format!(
                "{world} ranks do not fill whole nodes of {gpus_per_node}; use a multiple of {gpus_per_node} ranks"
            )));
        }
        Ok(Mesh {
            dp,
            pp,
            tp,
            gpus_per_node,
        })
    }

    /// The mesh of a validated config.
    pub fn from_config(config: &Config) -> Mesh {
        let parallel = &config.parallel;
        Mesh::new(
            parallel.data,
            parallel.tensor,
            parallel.pipeline,
            config.cluster.gpus_per_node,
        )
        .expect("invariant: validation checked the mesh against the cluster")
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.pp * self.tp
    }

    pub fn nodes(&self) -> usize {
        self.world_size().div_ceil(self.gpus_per_node)
    }

    pub fn degree(&self, axis: Axis) -> usize {
        match axis {
            Axis::Data => self.dp,
            Axis::Pipeline => self.pp,
            Axis::Tensor => self.tp,
        }
    }

    pub fn coord(&self, rank: usize) -> Result<Coord> {
        if rank >= self.world_size() {
            return Err(Error::RankOutOfRange {
                rank,
                world: self.world_size(),
            });
        }
        Ok(Coord {
            tp_rank: rank % self.tp,
            pp_rank: (rank / self.tp) % self.pp,
            dp_rank: rank / (self.tp * self.pp),
        })
    }

    pub fn rank(&self, coord: Coord) -> usize {
        (coord.dp_rank * self.pp + coord.pp_rank) * self.tp + coord.tp_rank
    }

    pub fn node(&self, rank: usize) -> usize {
        rank / self.gpus_per_node
    }

    pub fn local_rank(&self, rank: usize) -> usize {
        rank % self.gpus_per_node
    }

    /// The ranks of `rank`'s group along `axis`, ordered by their coordinate on that axis.
    pub fn group(&self, rank: usize, axis: Axis) -> Result<Vec<usize>> {
        let base = self.coord(rank)?;
        Ok((0..self.degree(axis))
            .map(|i| {
                let mut coord = base;
                match axis {
                    Axis::Data => coord.dp_rank = i,
                    Axis::Pipeline => coord.pp_rank = i,
                    Axis::Tensor => coord.tp_rank = i,
                }
                self.rank(coord)
            })
            .collect())
    }

    /// Every group along `axis`; together they hold each rank exactly once.
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        (0..self.world_size())
            .filter(|&rank| {
                let coord = self.coord(rank).expect("invariant: rank < world");
                match axis {
                    Axis::Data => coord.dp_rank == 0,
                    Axis::Pipeline => coord.pp_rank == 0,
                    Axis::Tensor => coord.tp_rank == 0,
                }
            })
            .map(|first| self.group(first, axis).expect("invariant: rank < world"))
            .collect()
    }

    /// How many nodes a group along `axis` spans (1 when it stays inside a node).
    pub fn nodes_spanned(&self, axis: Axis) -> usize {
        let group = self.group(0, axis).expect("invariant: rank 0 exists");
        let first = self.node(group[0]);
        let last = self.node(*group.last().expect("invariant: groups are non-empty"));
        last - first + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt3() -> Mesh {
        Mesh::new(8, 8, 16, 8).unwrap()
    }

    #[test]
    fn coordinates_round_trip_with_tensor_innermost() {
        let mesh = gpt3();
        for rank in 0..mesh.world_size() {
            assert_eq!(mesh.rank(mesh.coord(rank).unwrap()), rank);
        }
        assert_eq!(
            mesh.coord(0).unwrap(),
            Coord {
                dp_rank: 0,
                pp_rank: 0,
                tp_rank: 0
            }
        );
        assert_eq!(
            mesh.coord(9).unwrap(),
            Coord {
                dp_rank: 0,
                pp_rank: 1,
                tp_rank: 1
            }
        );
        assert_eq!(
            mesh.coord(128).unwrap(),
            Coord {
                dp_rank: 1,
                pp_rank: 0,
                tp_rank: 0
            }
        );
        assert!(matches!(
            mesh.coord(1024),
            Err(Error::RankOutOfRange {
                rank: 1024,
                world: 1024
            })
        ));
    }

    #[test]
    fn groups_along_each_axis_partition_the_world() {
        let mesh = Mesh::new(3, 2, 5, 2).unwrap();
        for axis in [Axis::Data, Axis::Pipeline, Axis::Tensor] {
            let groups = mesh.groups(axis);
            assert_eq!(groups.len(), mesh.world_size() / mesh.degree(axis));
            let mut all: Vec<usize> = groups.concat();
            all.sort();
            assert_eq!(all, (0..mesh.world_size()).collect::<Vec<_>>(), "{axis:?}");
        }
    }

    #[test]
    fn tensor_groups_stay_in_a_node_and_data_groups_cross_nodes() {
        let mesh = gpt3();
        assert_eq!(
            mesh.group(9, Axis::Tensor).unwrap(),
            (8..16).collect::<Vec<_>>()
        );
        assert_eq!(
            mesh.group(0, Axis::Pipeline).unwrap(),
            (0..16).map(|i| i * 8).collect::<Vec<_>>()
        );
        assert_eq!(
            mesh.group(0, Axis::Data).unwrap(),
            (0..8).map(|i| i * 128).collect::<Vec<_>>()
        );
        for group in mesh.groups(Axis::Tensor) {
            assert!(group.iter().all(|&r| mesh.node(r) == mesh.node(group[0])));
        }
        assert_eq!(mesh.nodes_spanned(Axis::Tensor), 1);
        assert_eq!(mesh.nodes_spanned(Axis::Pipeline), 16);
        assert_eq!(mesh.nodes(), 128);
        assert_eq!((mesh.node(1023), mesh.local_rank(1023)), (127, 7));
    }

    #[test]
    fn meshes_that_cannot_be_placed_are_refused_with_the_fix() {
        let error = Mesh::new(1, 16, 1, 8).unwrap_err().to_string();
        assert!(
            error.contains("tensor group of 16 does not fit whole into nodes of 8"),
            "{error}"
        );
        let error = Mesh::new(3, 1, 1, 2).unwrap_err().to_string();
        assert!(
            error.contains("3 ranks do not fill whole nodes of 2"),
            "{error}"
        );
        assert!(Mesh::new(0, 1, 1, 8).is_err());
        // Fewer ranks than one node holds is fine (a partial node).
        assert_eq!(Mesh::new(1, 2, 1, 8).unwrap().nodes(), 1);
    }
}
