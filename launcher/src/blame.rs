//! Which rank stopped a run. When one rank dies, the others fail within milliseconds on the
//! collectives it no longer answers, and the launcher often sees several exits at once: the
//! run's cause is the rank whose own failure it was, not the lowest rank nor the first exit
//! polled. [`Blame`] collects how each rank ended (its exit, and the error its last beat
//! reported) and ranks them: killed from outside (or its node lost), crashed, an error of its
//! own, unknown, and last a collective that failed because a peer had (a consequence); ties go
//! to the earliest seen. The consequences are reported after the cause.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::coordinator::describe_ranks;
use crate::fleet::{End, Failed};

/// How long after the first failure seen the launcher waits for a better-placed cause when
/// that failure is only a consequence (a survivor's exit can be polled before the dead rank's)
/// or says nothing of its cause yet (its last beat may still be on the way).
pub const SETTLE: Duration = Duration::from_millis(500);

/// How likely a failed rank is the run's cause, most likely first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Killed by a signal from outside the run (the OOM killer, an operator), or its node lost.
    Killed,
    /// Killed by its own fault: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT.
    Crashed,
    /// Exited after an error of its own (bad data, a disk full), as its last beat said.
    OwnError,
    /// Exited with a failure status and no word on why (it never beat, or the beat is late).
    Unknown,
    /// Exited because a collective failed: a peer had died or hung.
    Consequence,
    /// Stopped by the launcher itself, after the run had already failed.
    Stopped,
}

/// A rank's end as the launcher saw it.
#[derive(Debug, Clone)]
struct Ended {
    how: String,
    end: End,
    at: Instant,
    /// The launcher had signalled the rank before it ended.
    signalled: bool,
}

/// A rank's last word, from its final beat.
#[derive(Debug, Clone)]
struct Report {
    error: String,
    caused_by_peer: bool,
}

/// How every rank of one attempt ended so far.
pub struct Blame {
    ended: Vec<Option<Ended>>,
    reports: Vec<Option<Report>>,
    first: Option<Instant>,
}

impl Blame {
    pub fn new(ranks: usize) -> Blame {
        Blame {
            ended: vec![None; ranks],
            reports: vec![None; ranks],
            first: None,
        }
    }

    /// `failed` ended now; `signalled` says the launcher had already signalled it.
    pub fn ended(&mut self, failed: &Failed, signalled: bool) {
        let now = Instant::now();
        if let Some(slot) = self.ended.get_mut(failed.rank)
            && slot.is_none()
        {
            *slot = Some(Ended {
                how: failed.how.clone(),
                end: failed.end,
                at: now,
                signalled,
            });
            self.first.get_or_insert(now);
        }
    }

    /// Rank `rank`'s last beat said it stops with `error`.
    pub fn reported(&mut self, rank: usize, error: &str, caused_by_peer: bool) {
        if let Some(slot) = self.reports.get_mut(rank) {
            *slot = Some(Report {
                error: error.to_string(),
                caused_by_peer,
            });
        }
    }

    fn class(&self, rank: usize) -> Option<Class> {
        let ended = self.ended[rank].as_ref()?;
        Some(match ended.end {
            End::Lost => Class::Killed,
            End::Signal(signal) if crash(signal) => Class::Crashed,
            End::Signal(_) if ended.signalled => Class::Stopped,
            End::Signal(_) => Class::Killed,
            End::Status(_) => match &self.reports[rank] {
                Some(report) if report.caused_by_peer => Class::Consequence,
                Some(_) => Class::OwnError,
                None => Class::Unknown,
            },
        })
    }

    /// The failed rank most likely to be the cause, once that is as clear as it will get: at
    /// once for a rank killed, crashed or failed on its own, else [`SETTLE`] after the first
    /// failure, or when nothing more can come (`over`: every rank has ended).
    pub fn cause(&self, over: bool) -> Option<usize> {
        let best = (0..self.ended.len())
            .filter_map(|rank| Some((self.class(rank)?, self.ended[rank].as_ref()?.at, rank)))
            .min()?;
        let settled = over || self.first.is_some_and(|t| t.elapsed() >= SETTLE);
        (best.0 <= Class::OwnError || settled).then_some(best.2)
    }

    /// The exit status the cause ended with, if it exited by itself.
    pub fn status(&self, rank: usize) -> Option<i32> {
        match self.ended[rank].as_ref()?.end {
            End::Status(code) => Some(code),
            _ => None,
        }
    }

    /// How `rank` ended: "exited with status 2", "was killed by SIGKILL".
    pub fn how(&self, rank: usize) -> String {
        self.ended[rank]
            .as_ref()
            .map_or(String::new(), |e| e.how.clone())
    }

    /// The first line of the error `rank` reported, when it exited by itself after one.
    pub fn error(&self, rank: usize) -> Option<String> {
        match (&self.reports[rank], self.ended[rank].as_ref()?.end) {
            (Some(report), End::Status(_)) => Some(first_line(&report.error)),
            _ => None,
        }
    }

    /// How the other failed ranks ended, grouped, after the cause: "\n  then: ranks 0, 1
    /// exited with status 1 (a collective failed without the cause); rank 5 was killed by
    /// SIGSEGV". Empty when no other rank failed.
    pub fn consequences(&self, cause: usize) -> String {
        let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
        for rank in (0..self.ended.len()).filter(|&r| r != cause) {
            let (Some(class), Some(ended)) = (self.class(rank), &self.ended[rank]) else {
                continue;
            };
            let what = match class {
                Class::Consequence => format!("{} (their collectives failed with it)", ended.how),
                Class::Stopped => format!("{} (stopped by the launcher)", ended.how),
                Class::OwnError => {
                    format!("{}: {}", ended.how, self.error(rank).unwrap_or_default())
                }
                Class::Killed | Class::Crashed | Class::Unknown => ended.how.clone(),
            };
            match groups.iter_mut().find(|(w, _)| *w == what) {
                Some((_, ranks)) => ranks.push(rank as u32),
                None => groups.push((what, vec![rank as u32])),
            }
        }
        if groups.is_empty() {
            return String::new();
        }
        let listed: Vec<String> = groups
            .iter()
            .map(|(what, ranks)| match what.strip_prefix("was ") {
                Some(rest) if ranks.len() > 1 => format!("{} were {rest}", describe_ranks(ranks)),
                _ => format!("{} {what}", describe_ranks(ranks)),
            })
            .collect();
        format!("\n  then: {}", listed.join("; "))
    }
}

/// Signals a process gets for its own fault.
fn crash(signal: i32) -> bool {
    [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGILL,
        Signal::SIGFPE,
        Signal::SIGABRT,
        Signal::SIGSYS,
    ]
    .iter()
    .any(|s| *s as i32 == signal)
}

/// An error's first line, at most 300 characters (the rest is in the rank's own log).
fn first_line(error: &str) -> String {
    let line = error.lines().next().unwrap_or_default();
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(rank: usize, end: End) -> Failed {
        let how = match end {
            End::Status(code) => format!("exited with status {code}"),
            End::Signal(signal) => format!(
                "was killed by {}",
                Signal::try_from(signal).map_or("?".into(), |s| s.to_string())
            ),
            End::Lost => "was lost with its node".into(),
        };
        Failed { rank, how, end }
    }

    #[test]
    fn a_killed_rank_is_the_cause_even_when_its_peers_exits_are_seen_first() {
        let mut blame = Blame::new(4);
        blame.reported(
            0,
            "all_gather #3 failed: the peer closed the connection",
            true,
        );
        blame.ended(&failed(0, End::Status(1)), false);
        assert_eq!(
            blame.cause(false),
            None,
            "a consequence alone waits for its cause"
        );
        blame.ended(&failed(2, End::Signal(Signal::SIGKILL as i32)), false);
        blame.reported(3, "recv #9 failed", true);
        blame.ended(&failed(3, End::Status(1)), false);
        assert_eq!(blame.cause(false), Some(2));
        assert_eq!(blame.how(2), "was killed by SIGKILL");
        assert_eq!(
            blame.consequences(2),
            "\n  then: ranks 0, 3 exited with status 1 (their collectives failed with it)"
        );
    }

    #[test]
    fn a_ranks_own_error_is_the_cause_and_crashes_are_listed_after_it() {
        let mut blame = Blame::new(4);
        blame.reported(1, "barrier #7 failed: the peer closed the connection", true);
        blame.ended(&failed(1, End::Status(1)), false);
        blame.reported(
            0,
            "checkpoint /ro/step-50: cannot create it: Read-only file system\n  help: ...",
            false,
        );
        blame.ended(&failed(0, End::Status(1)), false);
        blame.ended(&failed(3, End::Signal(Signal::SIGSEGV as i32)), false);
        blame.ended(&failed(2, End::Signal(Signal::SIGKILL as i32)), true);
        // A crash outranks an error of its own; here the crash came last, after the cause.
        assert_eq!(blame.cause(false), Some(3));
        let mut own = Blame::new(2);
        own.reported(1, "barrier #7 failed", true);
        own.ended(&failed(1, End::Status(1)), false);
        own.reported(
            0,
            "checkpoint /ro/step-50: cannot create it\n  help: ...",
            false,
        );
        own.ended(&failed(0, End::Status(2)), false);
        assert_eq!(own.cause(false), Some(0));
        assert_eq!(own.status(0), Some(2));
        assert_eq!(own.how(0), "exited with status 2");
        assert_eq!(
            own.error(0).as_deref(),
            Some("checkpoint /ro/step-50: cannot create it")
        );
        assert_eq!(own.error(1).as_deref(), Some("barrier #7 failed"));
        assert_eq!(
            blame.consequences(3),
            "\n  then: rank 0 exited with status 1: checkpoint /ro/step-50: cannot create it: \
             Read-only file system; rank 1 exited with status 1 (their collectives failed with \
             it); rank 2 was killed by SIGKILL (stopped by the launcher)"
        );
    }

    #[test]
    fn without_a_word_on_the_cause_the_first_failure_is_named_after_a_while() {
        let mut blame = Blame::new(2);
        blame.ended(&failed(1, End::Status(1)), false);
        assert_eq!(blame.cause(false), None);
        assert_eq!(
            blame.cause(true),
            Some(1),
            "every rank ended: nothing more will come"
        );
        std::thread::sleep(SETTLE);
        assert_eq!(blame.cause(false), Some(1));
        assert_eq!(blame.consequences(1), "");
    }

    #[test]
    fn long_errors_are_cut_to_their_first_line() {
        let long = "x".repeat(1000);
        assert_eq!(first_line(&long).len(), 303);
        assert_eq!(first_line("one\ntwo"), "one");
    }
}
