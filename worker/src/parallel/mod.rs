//! How one rank takes part in the mesh, kept apart from the model: the communicators of its
//! groups ([`Comms`]), data parallelism with ZeRO ([`data`]), the two collectives of tensor
//! parallelism ([`tensor`]) and the links and slots of pipeline parallelism ([`pipeline`]).
//! The model computes at local widths on whatever it is handed; these modules move and reduce
//! what it produced.

pub mod data;
pub mod executor;
pub mod pipeline;
pub mod tensor;

use tessera_plan::Config;
use tessera_plan::mesh::{Axis, Coord, Mesh};

use crate::comm::solo::Solo;
use crate::comm::{CommError, Communicator, Group};
use pipeline::{Boundary, PipelineLinks};
use tensor::TensorParallel;

/// The communicators of one rank.
pub struct Comms {
    /// This process's global rank.
    pub rank: usize,
    pub coord: Coord,
    /// Every rank of the run (checkpoint barriers, loss and norm sums).
    pub world: Box<dyn Communicator>,
    /// The ranks holding the same pipeline stage and tensor shard: gradients are reduced here.
    pub dp: Box<dyn Communicator>,
    /// The ranks splitting this rank's layers.
    pub tp: TensorParallel,
    /// Links to the neighbouring pipeline stages.
    pub pipeline: PipelineLinks,
    /// The first and the last pipeline stage of this (data, tensor) coordinate, which both hold
    /// the tied token embedding; `None` without pipeline parallelism, without tied embeddings
    /// or on a middle stage.
    pub embedding: Option<Box<dyn Communicator>>,
    /// Names this run's partial checkpoint directories; the same on every rank.
    pub run_id: String,
}

impl Comms {
    /// A run of one process.
    pub fn solo() -> Comms {
        Comms {
            rank: 0,
            coord: Coord {
                dp_rank: 0,
                pp_rank: 0,
                tp_rank: 0,
            },
            world: Box::new(Solo::new(Group::solo("world", 0))),
            dp: Box::new(Solo::new(Group::solo("dp 0", 0))),
            tp: TensorParallel::new(Box::new(Solo::new(Group::solo("tp 0", 0))), false),
            pipeline: PipelineLinks::none(),
            embedding: None,
            run_id: std::process::id().to_string(),
        }
    }

    /// The communicators of `rank` in `config`'s mesh, each made by `connect` (groups of one
    /// are solo). Every rank walks the run's groups in the same order and connects those it is
    /// in, so no two ranks wait for each other in opposite orders.
    pub fn connect(
        rank: usize,
        config: &Config,
        run_id: String,
        connect: &mut dyn FnMut(Group) -> Result<Box<dyn Communicator>, CommError>,
    ) -> Result<Comms, CommError> {
        let mesh = Mesh::from_config(config);
        let coord = mesh.coord(rank).map_err(|e| CommError::Setup {
            group: "world".into(),
            what: e.to_string(),
            help: "the launcher and the worker disagree on the mesh".into(),
        })?;
        let mut join =
            |name: String, ranks: Vec<usize>| -> Result<Option<Box<dyn Communicator>>, CommError> {
                let Some(index) = ranks.iter().position(|&r| r == rank) else {
                    return Ok(None);
                };
                let group = Group { name, ranks, index };
                if group.size() == 1 {
                    return Ok(Some(Box::new(Solo::new(group))));
                }
                connect(group).map(Some)
            };
        let mine = "invariant: a rank is in one group of each axis";
        let world = join("world".into(), (0..mesh.world_size()).collect())?.expect(mine);
        let mut dp = None;
        for (i, ranks) in mesh.groups(Axis::Data).into_iter().enumerate() {
            dp = dp.or(join(format!("dp {i}"), ranks)?);
        }
        let mut tp = None;
        for (i, ranks) in mesh.groups(Axis::Tensor).into_iter().enumerate() {
            tp = tp.or(join(format!("tp {i}"), ranks)?);
        }
        let (p, v) = (config.parallel.pipeline, config.parallel.virtual_stages);
        let mut input: Vec<Option<Boundary>> = (0..v).map(|_| None).collect();
        let mut output: Vec<Option<Boundary>> = (0..v).map(|_| None).collect();
        let mut embedding = None;
        for (i, ranks) in mesh.groups(Axis::Pipeline).into_iter().enumerate() {
            // Boundary b joins virtual stage b (rank b % p, chunk b / p) to b + 1.
            for b in 0..p * v - 1 {
                let (up, down) = (ranks[b % p], ranks[(b + 1) % p]);
                let activations = join(format!("pp {i} activations {b}"), vec![up, down])?;
                let gradients = join(format!("pp {i} gradients {b}"), vec![down, up])?;
                if let (Some(activations), Some(gradients)) = (activations, gradients) {
                    let boundary = Boundary {
                        activations,
                        gradients,
                    };
                    if rank == up {
                        output[b / p] = Some(boundary);
                    } else {
                        input[(b + 1) / p] = Some(boundary);
                    }
                }
            }
            if p > 1 && config.model.tie_embeddings {
                embedding = embedding.or(join(
                    format!("embedding {i}"),
                    vec![ranks[0], ranks[p - 1]],
                )?);
            }
        }
        Ok(Comms {
            rank,
            coord,
            world,
            dp: dp.expect(mine),
            tp: TensorParallel::new(tp.expect(mine), config.parallel.sequence_sharded()),
            pipeline: PipelineLinks::new(input, output),
            embedding,
            run_id,
        })
    }

    /// This rank's index in its data-parallel group.
    pub fn dp_rank(&self) -> usize {
        self.dp.group().index
    }
}
