use std::fmt;
use std::time::Duration;

/// Why a collective or rendezvous failed. Every variant names the peer or setting involved.
#[derive(Debug)]
pub enum CommError {
    /// A setting is invalid (rank ≥ world size, a missing or malformed variable, ...).
    Config(String),
    /// Rendezvous could not complete: master unreachable, world sizes disagree, duplicate rank.
    Rendezvous(String),
    /// A peer sent nothing (or accepted nothing) before the deadline: stopped, hung or partitioned.
    Timeout {
        op: &'static str,
        peer: usize,
        timeout: Duration,
    },
    /// A peer closed its connection: it exited, crashed or gave up on an earlier error.
    PeerClosed {
        op: &'static str,
        peer: usize,
    },
    /// Another thread called [`crate::AbortHandle::abort`].
    Aborted {
        op: &'static str,
    },
    /// An earlier collective failed; the group cannot be used again.
    Broken(String),
    Io {
        op: &'static str,
        peer: usize,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CommError>;

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommError::Config(m) => write!(f, "process group configuration: {m}"),
            CommError::Rendezvous(m) => write!(f, "rendezvous failed: {m}"),
            CommError::Timeout { op, peer, timeout } => write!(
                f,
                "{op}: no progress from rank {peer} within the {:.1} s deadline (stopped, hung or unreachable)",
                timeout.as_secs_f64()
            ),
            CommError::PeerClosed { op, peer } => {
                write!(f, "{op}: rank {peer} closed its connection (exited or failed)")
            }
            CommError::Aborted { op } => write!(f, "{op}: aborted"),
            CommError::Broken(first) => write!(f, "process group unusable after an earlier failure: {first}"),
            CommError::Io { op, peer, source } => write!(f, "{op}: connection to rank {peer}: {source}"),
        }
    }
}

impl std::error::Error for CommError {}
