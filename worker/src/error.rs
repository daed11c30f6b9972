//! The worker library's one error type.

use std::path::PathBuf;

use tessera_plan::memory::Dtype;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- config ---
    #[error(transparent)]
    Plan(#[from] tessera_plan::Error),

    #[error("{what}\n  help: {help}")]
    Unsupported { what: String, help: String },

    /// The CUDA backend could not start or a CUDA call failed: the driver or a library is
    /// missing, a kernel did not compile, or the device reported an error.
    #[error("{what}\n  help: {help}")]
    Cuda { what: String, help: String },

    // --- arena and ops ---
    #[error(
        "the memory plan has no region `{name}` (it is zero-sized or not used by this stage); \
         this is a bug in tessera: please report it with your config"
    )]
    MissingRegion { name: String },

    #[error(
        "{op}: `{tensor}` has {got} elements of {dtype}, expected {expected}; this is a bug in \
         tessera: please report it with your config",
        dtype = dtype.name()
    )]
    Shape {
        op: &'static str,
        tensor: &'static str,
        expected: usize,
        got: usize,
        dtype: Dtype,
    },

    #[error("{op}: `{tensor}` is {got}, expected {expected}; this is a bug in tessera", got = got.name(), expected = expected.name())]
    Dtype {
        op: &'static str,
        tensor: &'static str,
        expected: Dtype,
        got: Dtype,
    },

    #[error("{op}: output `{output}` overlaps `{other}`; this is a bug in tessera")]
    Overlap {
        op: &'static str,
        output: &'static str,
        other: &'static str,
    },

    #[error(
        "cannot allocate the {place} arena of {bytes} bytes: {reason}\n  help: lower \
         training.micro_batch or model size (see `launch --config F --dry-run`)"
    )]
    Allocation {
        place: &'static str,
        bytes: u64,
        reason: String,
    },

    // --- data ---
    #[error("{}: {source}\n  help: check data.path in the config", path.display())]
    DataIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("data.path `{pattern}` matches no file\n  help: {help}")]
    DataNoFiles { pattern: String, help: String },

    #[error("{}{}: {what}\n  help: {help}", path.display(), offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    DataFormat {
        path: PathBuf,
        /// Byte offset in the file where the problem is, when there is one.
        offset: Option<u64>,
        what: String,
        help: String,
    },

    // --- training ---
    #[error(
        "step {step}: the loss is {loss} (not finite)\n  help: lower training.optimizer.lr, \
         enable grad_clip, or use precision fp32 to find where it diverges"
    )]
    Diverged { step: u64, loss: f32 },

    // --- collectives ---
    #[error(transparent)]
    Comm(Box<crate::comm::CommError>),

    // --- checkpoints ---
    #[error("checkpoint {}: {what}\n  help: {help}", path.display())]
    Checkpoint {
        path: PathBuf,
        what: String,
        help: String,
    },

    /// What is in a checkpoint is not what its writer stored (a file, tensor or manifest that
    /// fails its checks): the run falls back to an older checkpoint.
    #[error("checkpoint {} is damaged: {what}\n  help: {help}", path.display())]
    CheckpointDamaged {
        path: PathBuf,
        what: String,
        help: String,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

impl From<crate::comm::CommError> for Error {
    fn from(error: crate::comm::CommError) -> Error {
        Error::Comm(Box::new(error))
    }
}
