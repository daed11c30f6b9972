//! Pipeline schedules as per-stage lists of forward and backward ops.
//!
//! A stage's list is the order in which its worker runs microbatches through its model chunks;
//! sends and receives follow from it (a forward receives from the previous virtual stage and
//! sends to the next, a backward the reverse). The memory plan reads the peak number of
//! microbatches whose activations a stage holds at once from these lists, and the executor
//! (issue 6) interprets them, so both agree by construction.
//!
//! Virtual stages: with `v` model chunks per rank, chunk `c` of pipeline rank `s` is virtual
//! stage `c * p + s` and holds layers `[(c p + s) L/(p v), (c p + s + 1) L/(p v))`.

use crate::config::Schedule;

/// One unit of pipeline work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Forward { microbatch: usize, chunk: usize },
    Backward { microbatch: usize, chunk: usize },
}

/// The schedule of every pipeline stage for one optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineSchedule {
    pub kind: Schedule,
    pub stages: usize,
    /// Model chunks per stage (`virtual_stages`).
    pub chunks: usize,
    pub microbatches: usize,
    /// `ops[stage]` in execution order.
    pub ops: Vec<Vec<Op>>,
}

/// The most microbatches a stage holds activations for at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Peak of (microbatch, chunk) pairs held at once: the activation slots a stage needs.
    pub total: usize,
    /// Peak per chunk, each taken on its own (for buffers only one chunk has).
    pub per_chunk: Vec<usize>,
}

/// Timing of a schedule with given op costs (communication free).
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Time at which the last op of any stage ends.
    pub makespan: f64,
    /// Time each stage spends running ops.
    pub busy: Vec<f64>,
    /// `(start, end)` of each op, in each stage's order.
    pub spans: Vec<Vec<(f64, f64)>>,
}

impl Timeline {
    /// Fraction of the step a stage sits idle.
    pub fn idle_fraction(&self, stage: usize) -> f64 {
        1.0 - self.busy[stage] / self.makespan
    }
}

/// A schedule whose stages wait on each other forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlock {
    /// `(stage, op)` each stuck stage is waiting to run.
    pub waiting: Vec<(usize, Op)>,
}

impl PipelineSchedule {
    /// The op lists of `kind` for `stages` pipeline ranks, `chunks` model chunks per rank and
    /// `microbatches` per step. Interleaving requires `microbatches` to be a multiple of
    /// `stages` (config validation enforces it); GPipe and 1F1B use one chunk.
    pub fn new(
        kind: Schedule,
        stages: usize,
        chunks: usize,
        microbatches: usize,
    ) -> PipelineSchedule {
        let ops = (0..stages)
            .map(|stage| stage_ops(kind, stages, chunks, microbatches, stage).collect())
            .collect();
        PipelineSchedule {
            kind,
            stages,
            chunks,
            microbatches,
            ops,
        }
    }

    /// Runs every stage's list in order, each op once its inputs exist (a forward needs the
    /// previous virtual stage's forward, a backward its own forward and the next virtual
    /// stage's backward), with forward and backward of a whole stage costing `forward` and
    /// `backward` (a chunk costs its share). Fails if some stage can never proceed.
    pub fn simulate(&self, forward: f64, backward: f64) -> Result<Timeline, Deadlock> {
        let (p, v, m) = (self.stages, self.chunks, self.microbatches);
        let last_virtual = p * v - 1;
        // done[forward?][virtual stage][microbatch] = finish time.
        let mut done = [
            vec![vec![None::<f64>; m]; p * v],
            vec![vec![None::<f64>; m]; p * v],
        ];
        let mut next = vec![0usize; p];
        let mut clock = vec![0.0f64; p];
        let mut busy = vec![0.0f64; p];
        let mut spans: Vec<Vec<(f64, f64)>> = vec![Vec::new(); p];
        loop {
            let mut progressed = false;
            for stage in 0..p {
                while let Some(&op) = self.ops[stage].get(next[stage]) {
                    let (is_forward, microbatch, chunk) = match op {
                        Op::Forward { microbatch, chunk } => (true, microbatch, chunk),
                        Op::Backward { microbatch, chunk } => (false, microbatch, chunk),
                    };
                    let virtual_stage = chunk * p + stage;
                    let inputs = if is_forward {
                        match virtual_stage {
                            0 => Some(0.0),
                            vs => done[0][vs - 1][microbatch],
                        }
                    } else {
                        let own = done[0][virtual_stage][microbatch];
                        let downstream = if virtual_stage == last_virtual {
                            Some(0.0)
                        } else {
                            done[1][virtual_stage + 1][microbatch]
                        };
                        own.zip(downstream).map(|(a, b)| a.max(b))
                    };
                    let Some(ready) = inputs else { break };
                    let cost = if is_forward { forward } else { backward } / v as f64;
                    let start = clock[stage].max(ready);
                    let end = start + cost;
                    clock[stage] = end;
                    busy[stage] += cost;
                    spans[stage].push((start, end));
                    done[usize::from(!is_forward)][virtual_stage][microbatch] = Some(end);
                    next[stage] += 1;
                    progressed = true;
                }
            }
            if (0..p).all(|s| next[s] == self.ops[s].len()) {
                let makespan = clock.iter().copied().fold(0.0, f64::max);
                return Ok(Timeline {
                    makespan,
                    busy,
                    spans,
                });
            }
            if !progressed {
                let waiting = (0..p)
                    .filter_map(|s| self.ops[s].get(next[s]).map(|&op| (s, op)))
                    .collect();
                return Err(Deadlock { waiting });
            }
        }
    }
}

/// Peak activations held by `stage`, in time independent of the number of microbatches:
/// GPipe holds all `m`, 1F1B `min(p - s, m)`, and for interleaving the op order is walked
/// only until its steady state has repeated once (see `walk_in_flight`).
pub fn in_flight(
    kind: Schedule,
    stages: usize,
    chunks: usize,
    microbatches: usize,
    stage: usize,
) -> InFlight {
    let held = |n: usize| InFlight {
        total: n,
        per_chunk: vec![n; chunks],
    };
    match kind {
        Schedule::Gpipe => held(microbatches),
        Schedule::OneFOneB => held((stages - stage).min(microbatches)),
        Schedule::Interleaved => {
            // Warmup forwards, then one forward and one backward per step. Which chunk a unit
            // of work belongs to repeats every p x v units, so the live count per chunk repeats
            // after p x v steady steps: the peak is reached within the warmup plus one period.
            let warmup = interleaved_warmup(stages, chunks, microbatches, stage);
            walk_in_flight(
                kind,
                stages,
                chunks,
                microbatches,
                stage,
                warmup + 2 * (stages * chunks + 1),
            )
        }
    }
}

/// Peak activations over the first `limit` ops of `stage` (all of them with `usize::MAX`).
fn walk_in_flight(
    kind: Schedule,
    stages: usize,
    chunks: usize,
    microbatches: usize,
    stage: usize,
    limit: usize,
) -> InFlight {
    let mut live = vec![0usize; chunks];
    let mut peak = InFlight {
        total: 0,
        per_chunk: vec![0; chunks],
    };
    let mut total = 0usize;
    for op in stage_ops(kind, stages, chunks, microbatches, stage).take(limit) {
        match op {
            Op::Forward { chunk, .. } => {
                live[chunk] += 1;
                total += 1;
                peak.per_chunk[chunk] = peak.per_chunk[chunk].max(live[chunk]);
                peak.total = peak.total.max(total);
            }
            Op::Backward { chunk, .. } => {
                live[chunk] -= 1;
                total -= 1;
            }
        }
    }
    peak
}

/// Forward units stage `stage` runs before its first backward under interleaved 1F1B.
fn interleaved_warmup(stages: usize, chunks: usize, microbatches: usize, stage: usize) -> usize {
    (2 * (stages - stage - 1) + (chunks - 1) * stages).min(microbatches * chunks)
}

/// The ops of one stage in execution order.
fn stage_ops(
    kind: Schedule,
    stages: usize,
    chunks: usize,
    microbatches: usize,
    stage: usize,
) -> Box<dyn Iterator<Item = Op>> {
    let (p, m) = (stages, microbatches);
    let forward = |microbatch| Op::Forward {
        microbatch,
        chunk: 0,
    };
    let backward = |microbatch| Op::Backward {
        microbatch,
        chunk: 0,
    };
    match kind {
        Schedule::Gpipe => Box::new((0..m).map(forward).chain((0..m).map(backward))),
        Schedule::OneFOneB => {
            // Warm up with the forwards the downstream stages need before the first backward
            // reaches this stage, then alternate, then drain: stage s holds p - s microbatches.
            let warmup = (p - stage - 1).min(m);
            let steady = (0..m - warmup).flat_map(move |i| [forward(warmup + i), backward(i)]);
            Box::new(
                (0..warmup)
                    .map(forward)
                    .chain(steady)
                    .chain((m - warmup..m).map(backward)),
            )
        }
        Schedule::Interleaved => {
            // Megatron's interleaved 1F1B: microbatches go through the chunks in groups of p;
            // the warmup is 2(p - s - 1) + (v - 1) p units of (microbatch, chunk) work.
            let v = chunks;
            let total = m * v;
            let unit = move |k: usize, forward: bool| {
                let group = k / (p * v);
                let chunk_in_order = (k / p) % v;
                let microbatch = group * p + k % p;
                if forward {
                    Op::Forward {
                        microbatch,
                        chunk: chunk_in_order,
                    }
                } else {
                    Op::Backward {
                        microbatch,
                        chunk: v - 1 - chunk_in_order,
                    }
                }
            };
            let warmup = interleaved_warmup(p, v, m, stage);
            let steady =
                (0..total - warmup).flat_map(move |i| [unit(warmup + i, true), unit(i, false)]);
            Box::new(
                (0..warmup)
                    .map(move |k| unit(k, true))
                    .chain(steady)
                    .chain((total - warmup..total).map(move |k| unit(k, false))),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (p, v, m) that validation allows, in a range small enough to test exhaustively.
    fn allowed() -> impl Iterator<Item = (Schedule, usize, usize, usize)> {
        let plain = (1..=6).flat_map(|p| {
            (1..=12).flat_map(move |m| [(Schedule::Gpipe, p, 1, m), (Schedule::OneFOneB, p, 1, m)])
        });
        let interleaved = (2..=5).flat_map(|p| {
            (2..=4).flat_map(move |v| (1..=3).map(move |g| (Schedule::Interleaved, p, v, g * p)))
        });
        plain.chain(interleaved)
    }

    #[test]
    fn every_microbatch_runs_forward_then_backward_once_per_chunk() {
        for (kind, p, v, m) in allowed() {
            let schedule = PipelineSchedule::new(kind, p, v, m);
            for ops in &schedule.ops {
                assert_eq!(ops.len(), 2 * m * v);
                for microbatch in 0..m {
                    for chunk in 0..v {
                        let f = ops
                            .iter()
                            .position(|&o| o == Op::Forward { microbatch, chunk });
                        let b = ops
                            .iter()
                            .position(|&o| o == Op::Backward { microbatch, chunk });
                        assert!(f.unwrap() < b.unwrap(), "{kind:?} p{p} v{v} m{m}");
                    }
                }
            }
        }
    }

    #[test]
    fn no_allowed_schedule_deadlocks() {
        for (kind, p, v, m) in allowed() {
            let schedule = PipelineSchedule::new(kind, p, v, m);
            if let Err(deadlock) = schedule.simulate(1.0, 2.0) {
                panic!("{kind:?} p{p} v{v} m{m} deadlocks: {deadlock:?}");
            }
        }
    }

    #[test]
    fn in_flight_without_walking_equals_walking_every_op() {
        for (kind, p, v, m) in allowed() {
            for stage in 0..p {
                let every_op = walk_in_flight(kind, p, v, m, stage, usize::MAX);
                assert_eq!(
                    in_flight(kind, p, v, m, stage),
                    every_op,
                    "{kind:?} p{p} v{v} m{m} stage {stage}"
                );
            }
        }
    }

    #[test]
    fn in_flight_is_immediate_for_huge_microbatch_counts() {
        assert_eq!(in_flight(Schedule::Gpipe, 4, 1, 1 << 31, 0).total, 1 << 31);
        assert_eq!(in_flight(Schedule::OneFOneB, 4, 1, 1 << 31, 1).total, 3);
        let interleaved = in_flight(Schedule::Interleaved, 8, 4, 1 << 30, 0);
        assert_eq!(interleaved.total, 2 * 7 + 3 * 8 + 1);
    }

    #[test]
    fn one_f_one_b_stage_i_holds_p_minus_i_microbatches() {
        let (p, m) = (8, 32);
        for stage in 0..p {
            let held = in_flight(Schedule::OneFOneB, p, 1, m, stage);
            assert_eq!(held.total, p - stage);
        }
        // With fewer microbatches than stages, a stage never holds more than exist.
        assert_eq!(in_flight(Schedule::OneFOneB, 8, 1, 3, 0).total, 3);
        assert_eq!(in_flight(Schedule::Gpipe, 4, 1, 12, 3).total, 12);
    }

    #[test]
    fn interleaving_scales_stage_zero_by_one_plus_p_minus_1_over_pv() {
        for (p, v) in [(4, 2), (8, 3), (16, 2), (4, 4)] {
            let m = 4 * p;
            let interleaved = in_flight(Schedule::Interleaved, p, v, m, 0).total as f64 / v as f64;
            let plain = in_flight(Schedule::OneFOneB, p, 1, m, 0).total as f64;
            let expected = 1.0 + (p as f64 - 1.0) / (p * v) as f64;
            assert!(
                (interleaved / plain - expected).abs() < 1e-12,
                "p{p} v{v}: {} vs {expected}",
                interleaved / plain
            );
        }
    }

    #[test]
    fn one_f_one_b_idles_p_minus_1_over_m_plus_p_minus_1() {
        for (p, m) in [(4, 8), (8, 16), (2, 1), (6, 24)] {
            let timeline = PipelineSchedule::new(Schedule::OneFOneB, p, 1, m)
                .simulate(1.0, 2.0)
                .unwrap();
            assert!((timeline.makespan - 3.0 * (m + p - 1) as f64).abs() < 1e-9);
            for stage in 0..p {
                let expected = (p - 1) as f64 / (m + p - 1) as f64;
                assert!(
                    (timeline.idle_fraction(stage) - expected).abs() < 1e-9,
                    "p{p} m{m} stage {stage}"
                );
            }
        }
    }

    #[test]
    fn interleaving_shrinks_the_bubble() {
        let (p, m) = (4, 8);
        let plain = PipelineSchedule::new(Schedule::OneFOneB, p, 1, m)
            .simulate(1.0, 2.0)
            .unwrap();
        for v in [2, 4] {
            let interleaved = PipelineSchedule::new(Schedule::Interleaved, p, v, m)
                .simulate(1.0, 2.0)
                .unwrap();
            assert!(interleaved.makespan < plain.makespan, "v{v}");
            // The bubble approaches (p - 1) / (m v) of the ideal time.
            let ideal = 3.0 * m as f64;
            let bubble = interleaved.makespan / ideal - 1.0;
            assert!(
                bubble <= (p - 1) as f64 / (m * v) as f64 + 1e-9,
                "v{v}: bubble {bubble}"
            );
        }
    }

    #[test]
    fn a_broken_order_is_reported_as_a_deadlock() {
        let mut schedule = PipelineSchedule::new(Schedule::OneFOneB, 2, 1, 2);
        // Stage 1 insists on microbatch 1 first while stage 0 still needs its backward of 0.
        schedule.ops[0] = vec![
            Op::Forward {
                microbatch: 0,
                chunk: 0,
            },
            Op::Backward {
                microbatch: 0,
                chunk: 0,
            },
            Op::Forward {
                microbatch: 1,
                chunk: 0,
            },
            Op::Backward {
                microbatch: 1,
                chunk: 0,
            },
        ];
        schedule.ops[1].swap(0, 2);
        let deadlock = schedule.simulate(1.0, 2.0).unwrap_err();
        assert!(!deadlock.waiting.is_empty());
    }
}
