//! `--trace DIR`: one Chrome/Perfetto trace per rank (`DIR/rank-NNNNN.json`, the JSON format
//! `chrome://tracing` and ui.perfetto.dev open), with a track for the rank's compute (each
//! pipeline forward and backward, the optimizer, whole steps) and one per process group (each
//! collective, from when it was started to when the rank had waited for it; for the
//! non-blocking ones that is longer than the transfer itself).
//!
//! Spans are kept in memory and written when the run ends; a run records at most
//! [`MAX_SPANS`] of them (the later ones are counted and dropped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_plan::bytes::format_size;

use crate::comm::{Collective, CommError, Communicator, Group, Work};
use crate::error::{Error, Result};

/// Spans kept per rank: enough for thousands of steps of the small configs a trace is for.
pub const MAX_SPANS: usize = 1 << 20;

/// A handle to one rank's trace; clones record into the same trace.
#[derive(Clone)]
pub struct Trace {
    inner: Arc<Mutex<Spans>>,
    origin: Instant,
    rank: usize,
}

struct Spans {
    spans: Vec<Span>,
    dropped: u64,
    /// Track names in order of first use; a span's track is its index here.
    tracks: Vec<String>,
    track_ids: HashMap<String, usize>,
}

struct Span {
    name: String,
    category: &'static str,
    track: usize,
    /// Microseconds since the trace began.
    start: f64,
    duration: f64,
}

/// The track of the rank's own work.
pub const COMPUTE: &str = "compute";

impl Trace {
    pub fn new(rank: usize) -> Trace {
        let mut spans = Spans {
            spans: Vec::new(),
            dropped: 0,
            tracks: Vec::new(),
            track_ids: HashMap::new(),
        };
        spans.track(COMPUTE);
        Trace {
            inner: Arc::new(Mutex::new(spans)),
            origin: Instant::now(),
            rank,
        }
    }

    /// Records `name` on `track` from `start` until now.
    pub fn record(&self, name: String, category: &'static str, track: &str, start: Instant) {
        let end = Instant::now();
        let micros = |t: Instant| t.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        let mut spans = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if spans.spans.len() >= MAX_SPANS {
            spans.dropped += 1;
            return;
        }
        let track = spans.track(track);
        spans.spans.push(Span {
            name,
            category,
            track,
            start: micros(start),
            duration: micros(end) - micros(start),
        });
    }

    /// The trace file of this rank in `dir`.
    pub fn path(dir: &Path, rank: usize) -> PathBuf {
        dir.join(format!("rank-{rank:05}.json"))
    }

    /// Writes the trace to `dir/rank-NNNNN.json` (creating `dir`).
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let spans = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let pid = self.rank;
        let mut events = Vec::with_capacity(spans.spans.len() + spans.tracks.len() + 1);
        events.push(serde_json::json!({
            "name": "process_name", "ph": "M", "pid": pid, "tid": 0,
            "args": {"name": format!("rank {pid}")},
        }));
        for (tid, track) in spans.tracks.iter().enumerate() {
            events.push(serde_json::json!({
                "name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                "args": {"name": track},
            }));
        }
        for span in &spans.spans {
            events.push(serde_json::json!({
                "name": span.name, "cat": span.category, "ph": "X", "pid": pid,
                "tid": span.track, "ts": span.start, "dur": span.duration,
            }));
        }
        let trace = serde_json::json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"rank": pid, "dropped_spans": spans.dropped},
        });
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let path = Trace::path(dir, self.rank);
        let text = serde_json::to_vec(&trace).expect("invariant: a trace serialises");
        std::fs::write(&path, text).map_err(Error::io(&path))?;
        Ok(path)
    }
}

impl Spans {
    fn track(&mut self, name: &str) -> usize {
        if let Some(&id) = self.track_ids.get(name) {
            return id;
        }
        let id = self.tracks.len();
        self.tracks.push(name.to_string());
        self.track_ids.insert(name.to_string(), id);
        id
    }
}

/// The last collective a rank started, as heartbeats report it: "all_reduce #12 in group dp
/// 0". Shared by every communicator of the rank.
#[derive(Debug, Clone, Default)]
pub struct LastCollective(Arc<Mutex<String>>);

impl LastCollective {
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, op: &str, seq: u64, group: &str) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.clear();
        use std::fmt::Write as _;
        let _ = write!(last, "{op} #{seq} in group {group}");
    }
}

/// A communicator that notes each collective it starts as the rank's last, and records it in
/// a trace (on a track named after its group) when there is one.
pub struct Observed {
    inner: Box<dyn Communicator>,
    last: LastCollective,
    trace: Option<Trace>,
    /// Collectives started so far: the next one's sequence number, as the backend counts.
    started: u64,
}

impl Observed {
    pub fn new(
        inner: Box<dyn Communicator>,
        last: LastCollective,
        trace: Option<Trace>,
    ) -> Observed {
        Observed {
            inner,
            last,
            trace,
            started: 0,
        }
    }
}

impl Communicator for Observed {
    fn group(&self) -> &Group {
        self.inner.group()
    }

    unsafe fn start(&mut self, op: Collective) -> std::result::Result<Work, CommError> {
        let start = Instant::now();
        self.last
            .set(op.name(), self.started, &self.inner.group().name);
        self.started += 1;
        let (name, bytes) = (
            op.name(),
            op.buffers().first().map_or(0, |b| b.bytes() as u64),
        );
        // SAFETY: the caller's contract, passed on unchanged.
        let work = unsafe { self.inner.start(op) }?;
        let Some(trace) = self.trace.clone() else {
            return Ok(work);
        };
        let track = self.inner.group().name.clone();
        let name = format!("{name} {}", format_size(bytes));
        Ok(work.on_complete(move || trace.record(name, "collective", &track, start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CommunicatorExt as _;
    use crate::comm::solo::Solo;

    #[test]
    fn collectives_are_numbered_named_and_traced() {
        let last = LastCollective::default();
        let trace = Trace::new(3);
        let solo = Box::new(Solo::new(Group::solo("dp 1", 3)));
        let mut comm = Observed::new(solo, last.clone(), Some(trace.clone()));
        comm.barrier().unwrap();
        assert_eq!(last.get(), "barrier #0 in group dp 1");
        let mut values = [1.0f32; 4];
        comm.all_reduce(&mut values, crate::comm::ReduceOp::Sum)
            .unwrap();
        assert_eq!(last.get(), "all_reduce #1 in group dp 1");

        let dir = std::env::temp_dir().join(format!("tessera-trace-{}", std::process::id()));
        let path = trace.write(&dir).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let names: Vec<&str> = written["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["cat"] == "collective")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["barrier 0 B", "all_reduce 16 B"]);
        assert!(path.ends_with("rank-00003.json"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
