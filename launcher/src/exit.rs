//! Exit statuses, as other tools rely on them: 0 success, 1 a run-time failure, 2 a bad config
//! or command line, 3 a plan that does not fit, 130 interrupted (Ctrl-C).

use std::fmt;
use std::process::ExitCode;

/// Why `launch` stops early, and with which status.
#[derive(Debug)]
pub enum Failure {
    /// The config or the command line is wrong (status 2).
    Usage(String),
    /// The plan does not fit the devices (status 3). The report was already printed.
    DoesNotFit(String),
    /// Anything else (status 1).
    Runtime(anyhow::Error),
    /// Ctrl-C or SIGTERM stopped the run (status 130, as shells report SIGINT).
    Interrupted,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::Usage(message.into())
    }

    pub fn code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Runtime(_) => 1,
            Failure::Usage(_) => 2,
            Failure::DoesNotFit(_) => 3,
            Failure::Interrupted => 130,
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(message) | Failure::DoesNotFit(message) => f.write_str(message),
            Failure::Runtime(error) => write!(f, "{error:#}"),
            Failure::Interrupted => f.write_str("interrupted; every worker was stopped"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure::Runtime(error)
    }
}
