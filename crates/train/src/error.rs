//! Typed errors of the trainer. Every variant names the thing that was wrong (a file, a field, a
//! step) so the CLI can print one clear line and exit non-zero; panics are for programmer errors.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// A model or training setting is invalid (heads not dividing width, seq > context, ...).
    Config(String),
    /// A data file is missing, empty, malformed or incompatible with the model.
    Data { path: PathBuf, reason: String },
    /// A checkpoint file is missing, corrupt or does not match the run.
    Checkpoint { path: PathBuf, reason: String },
    /// An operating-system IO error on a named path.
    Io { path: PathBuf, source: std::io::Error },
    /// Training diverged: the loss became NaN or infinite.
    NonFiniteLoss { step: u64, loss: f32 },
    /// A collective with the other ranks failed (a peer died, hung or disagreed).
    Comm(comm::CommError),
}

impl From<comm::CommError> for Error {
    fn from(e: comm::CommError) -> Self {
        Error::Comm(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Data { path: path.into(), reason: reason.into() }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Data { path, reason } => write!(f, "data file {}: {reason}", path.display()),
            Error::Checkpoint { path, reason } => {
                write!(f, "checkpoint file {}: {reason}", path.display())
            }
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::NonFiniteLoss { step, loss } => write!(
                f,
                "training diverged: loss is {loss} at step {step} (try a lower --lr or stronger clipping)"
            ),
            Error::Comm(e) => write!(f, "data parallelism: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
