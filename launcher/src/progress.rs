//! What the user watches during a run: a progress bar with step, loss, tokens/s and ETA on a
//! terminal, or one plain line per step when stdout is a file or a pipe (CI logs, `| tee`).
//! Workers' output goes through here too, so that it never tears the bar.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Cheap to clone: every clone draws the same bar.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Serialises plain lines from the relay threads.
    lock: Arc<Mutex<()>>,
    steps: u64,
    /// The last held-out loss, shown on the bar until the next evaluation.
    last_val: Arc<Mutex<Option<f64>>>,
}

/// One optimizer step, as rank 0 reported it.
#[derive(Debug, Clone, Copy)]
pub struct StepLine {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// The held-out loss, on the steps that evaluate.
    pub val_loss: Option<f64>,
}

impl Progress {
    /// A bar when stdout is a terminal, plain lines otherwise.
    pub fn new(steps: u64) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {msg} | {elapsed} elapsed, ETA {eta}",
                )
                .expect("invariant: the template is valid")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar.set_message("starting workers");
            bar
        });
        Progress {
            bar,
            lock: Arc::new(Mutex::new(())),
            steps,
            last_val: Arc::new(Mutex::new(None)),
        }
    }

    /// Plain lines only, never a bar (a node agent's output, collected by Slurm or a pod log).
    pub fn plain() -> Progress {
        Progress {
            bar: None,
            lock: Arc::new(Mutex::new(())),
            steps: 0,
            last_val: Arc::new(Mutex::new(None)),
        }
    }

    /// Prints a line above the bar (or plainly), to stderr if `stderr`.
    pub fn println(&self, line: &str, stderr: bool) {
        match &self.bar {
            Some(bar) if !stderr => bar.println(line),
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => {
                let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                if stderr {
                    let _ = writeln!(std::io::stderr(), "{line}");
                } else {
                    let _ = writeln!(std::io::stdout(), "{line}");
                }
            }
        }
    }

    /// A status message (rendezvous, stopping ...).
    pub fn status(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => self.println(message, false),
        }
    }

    pub fn step(&self, line: StepLine) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(line.step);
                // The bar keeps the last held-out loss between evaluations.
                let mut last = self.last_val.lock().unwrap_or_else(|e| e.into_inner());
                *last = line.val_loss.or(*last);
                let val = last.map_or(String::new(), |v| format!(" | val {v:.4}"));
                bar.set_message(format!(
                    "loss {:.4}{val} | {:.0} tok/s",
                    line.loss, line.tokens_per_s
                ));
            }
            None => {
                let val = line
                    .val_loss
                    .map_or(String::new(), |v| format!(" | val loss {v:.6}"));
                self.println(
                    &format!(
                        "step {:>6}/{} | loss {:.6}{val} | lr {:.3e} | grad norm {:.4} | {:.0} tok/s",
                        line.step,
                        self.steps,
                        line.loss,
                        line.lr,
                        line.grad_norm,
                        line.tokens_per_s
                    ),
                    false,
                )
            }
        }
    }

    /// Removes the bar (the final summary is printed plainly after it).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
