//! Warnings about what others do to this process (a refused call, a connection that is not a
//! peer's), at most a few per interval: a scanner or a misconfigured client can make thousands
//! a second, and a log that grows at that rate hides everything else and costs the run.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Prints at most `burst` warnings per `every` to stderr, then one line counting the rest.
pub struct Throttle {
    burst: u32,
    every: Duration,
    state: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    shown: u32,
    hidden: u64,
}

impl Throttle {
    pub const fn new(burst: u32, every: Duration) -> Throttle {
        Throttle {
            burst,
            every,
            state: Mutex::new(Window {
                start: None,
                shown: 0,
                hidden: 0,
            }),
        }
    }

    /// Prints `line()` unless this interval's warnings are used up; says how many were not
    /// shown once a new interval starts.
    pub fn warn(&self, line: impl FnOnce() -> String) {
        if let Some(text) = self.admit(Instant::now(), line) {
            eprintln!("{text}");
        }
    }

    /// What `warn` prints at `now`, if anything (the summary of the last interval first).
    fn admit(&self, now: Instant, line: impl FnOnce() -> String) -> Option<String> {
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut summary = None;
        if window
            .start
            .is_none_or(|start| now.duration_since(start) >= self.every)
        {
            if window.hidden > 0 {
                summary = Some(format!(
                    "warning: {} more such warnings in the last {:.0?} were not shown",
                    window.hidden, self.every
                ));
            }
            *window = Window {
                start: Some(now),
                shown: 0,
                hidden: 0,
            };
        }
        if window.shown >= self.burst {
            window.hidden += 1;
            return summary;
        }
        window.shown += 1;
        let line = line();
        Some(match summary {
            Some(summary) => format!("{summary}\n{line}"),
            None => line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_prints_a_few_lines_and_then_a_count() {
        let throttle = Throttle::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let printed: Vec<String> = (0..3000)
            .filter_map(|i| throttle.admit(start, || format!("refused call {i}")))
            .collect();
        assert_eq!(
            printed,
            ["refused call 0", "refused call 1", "refused call 2"]
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(
            throttle
                .admit(later, || "refused call 3000".into())
                .unwrap(),
            "warning: 2997 more such warnings in the last 10s were not shown\nrefused call 3000"
        );
    }
}
