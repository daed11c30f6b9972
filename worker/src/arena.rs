//! One allocation per place (device, host), laid out from the memory plan.
//!
//! [`ArenaLayout`] walks the plan's regions in order and gives each instance of each region an
//! offset; the backend allocates exactly [`ArenaLayout::bytes`] per place, and the model asks
//! for [`Tensor`] handles by region name. Runtime rows (CUDA context, library workspaces) are
//! memory the runtime takes outside the arena, so they get no offset. Because the plan's
//! device total is the sum of the same rows, allocated bytes equal planned bytes by
//! construction, and startup checks it.

use tessera_plan::memory::{Category, Per, Place, Region, StagePlan};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Where every region of one rank lives.
#[derive(Debug, Clone)]
pub struct ArenaLayout {
    regions: Vec<Placed>,
    device_bytes: usize,
    host_bytes: usize,
}

#[derive(Debug, Clone)]
struct Placed {
    region: Region,
    offset: usize,
}

/// The instances of one region.
#[derive(Debug, Clone, Copy)]
pub struct Instances {
    first: Tensor,
    /// Bytes from one instance to the next.
    stride: usize,
    count: usize,
}

impl Instances {
    /// Instance `index` (a layer, a slot, a `slot * layers + layer`, or a copy).
    pub fn get(&self, index: usize) -> Tensor {
        assert!(
            index < self.count,
            "invariant: instance {index} of a region with {}",
            self.count
        );
        Tensor {
            offset: self.first.offset + index * self.stride,
            ..self.first
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The only instance of a `Per::Rank` region.
    pub fn single(&self) -> Tensor {
        self.get(0)
    }
}

impl ArenaLayout {
    pub fn new(plan: &StagePlan) -> ArenaLayout {
        let (mut device, mut host) = (0usize, 0usize);
        let regions = plan
            .regions
            .iter()
            .filter(|r| r.category != Category::Runtime)
            .map(|region| {
                let end = match region.place {
                    Place::Device => &mut device,
                    Place::Host => &mut host,
                };
                let offset = *end;
                *end += region.bytes() as usize;
                Placed {
                    region: region.clone(),
                    offset,
                }
            })
            .collect();
        ArenaLayout {
            regions,
            device_bytes: device,
            host_bytes: host,
        }
    }

    pub fn bytes(&self, place: Place) -> usize {
        match place {
            Place::Device => self.device_bytes,
            Place::Host => self.host_bytes,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.regions.iter().any(|p| p.region.name == name)
    }

    /// The instances of region `name`; an error when the plan has no such row (zero-sized
    /// rows are left out of the plan, so using one is a bug that must not read garbage).
    pub fn region(&self, name: &str) -> Result<Instances> {
        let placed = self
            .regions
            .iter()
            .find(|p| p.region.name == name)
            .ok_or_else(|| Error::MissingRegion { name: name.into() })?;
        let region = &placed.region;
        let count = match region.per {
            Per::Rank => 1,
            other => other.count() as usize,
        };
        Ok(Instances {
            first: Tensor {
                place: region.place,
                offset: placed.offset,
                len: region.elems as usize,
                dtype: region.dtype,
            },
            stride: region.bytes_each() as usize,
            count,
        })
    }

    /// Every region, in layout order, with its first instance's handle and instance count.
    pub fn iter(&self) -> impl Iterator<Item = (&Region, Instances)> + '_ {
        self.regions.iter().map(|p| {
            (
                &p.region,
                self.region(p.region.name)
                    .expect("invariant: the region is in the layout"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use tessera_plan::Config;
    use tessera_plan::config::{Choice as _, Precision, Recompute};

    use super::*;

    fn config(sets: &[&str]) -> Config {
        let text = include_str!("../../configs/tiny-cpu.yaml");
        let mut all = vec![
            "parallel.data=1".to_string(),
            "parallel.tensor=1".into(),
            "parallel.pipeline=1".into(),
            "cluster.gpus_per_node=1".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        Config::from_yaml("tiny-cpu.yaml", text, &all).expect("valid test config")
    }

    #[test]
    fn instances_are_disjoint_aligned_and_inside_the_arena() {
        let config = config(&["parallel.recompute=selective", "training.precision=bf16"]);
        let layout = ArenaLayout::new(&StagePlan::new(&config, 0));
        let mut spans: Vec<(bool, usize, usize)> = Vec::new();
        for (region, instances) in layout.iter() {
            for i in 0..instances.count() {
                let t = instances.get(i);
                assert_eq!(t.offset % 256, 0, "{}", region.name);
                assert!(t.offset + t.bytes() <= layout.bytes(t.place));
                spans.push((t.place == Place::Host, t.offset, t.offset + t.bytes()));
            }
        }
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 != pair[1].0 || pair[0].2 <= pair[1].1, "{pair:?}");
        }
    }

    #[test]
    fn a_region_the_plan_leaves_out_is_an_error() {
        let layout = ArenaLayout::new(&StagePlan::new(&config(&[]), 0));
        assert!(layout.contains("act.ln1"));
        let full = ArenaLayout::new(&StagePlan::new(&config(&["parallel.recompute=full"]), 0));
        let err = full.region("act.ln1").unwrap_err().to_string();
        assert!(err.contains("no region `act.ln1`"), "{err}");
    }

    #[test]
    fn arena_bytes_equal_the_planned_device_bytes() {
        for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
            for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
                let config = config(&[
                    &format!("parallel.recompute={}", recompute.name()),
                    &format!("training.precision={}", precision.name()),
                ]);
                let plan = StagePlan::new(&config, 0);
                let layout = ArenaLayout::new(&plan);
                assert_eq!(layout.bytes(Place::Device) as u64, plan.device_bytes());
                assert_eq!(layout.bytes(Place::Host) as u64, plan.host_bytes());
            }
        }
    }
}
