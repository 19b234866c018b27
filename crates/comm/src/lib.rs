//! Myriad's process group: rendezvous from torchrun's variables through a store on rank 0, and
//! ring collectives (all-reduce, reduce-scatter, all-gather, broadcast, barrier) over TCP on f32
//! buffers. Every collective has a deadline and can be aborted from another thread; a dead,
//! stopped or partitioned peer becomes an error on every surviving rank, never a hang.
//!
//! This crate knows nothing of models or training; `train` uses it for data parallelism.

pub mod error;
pub mod group;
#[cfg(target_os = "linux")]
mod shm;
pub use shm::SharedMap;
pub mod store;

pub use error::{CommError, Result};
pub use group::{segment, AbortHandle, GroupConfig, ProcessGroup, DEFAULT_TIMEOUT};

/// Compares secrets in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
