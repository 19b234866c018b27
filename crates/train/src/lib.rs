//! Myriad's reference GPT trainer on CPU: a GPT-2-style decoder with an explicit forward and
//! backward for every layer, AdamW, three data sources and verified checkpoints.
//!
//! Layers, bottom up: `params` (the tensor table) → `kernels` (fast kernels and their naive
//! references) → `model` (forward/backward over flat buffers) → `optim`, `data`, `checkpoint` →
//! `trainer` (one run) → `rank` (a rank under an agent: start, progress, in-memory checkpoints).
//! This crate knows nothing of clusters: a launcher runs it as a process, and the contracts it
//! follows with its agent (environment, progress message, checkpoint layout) live in `proto`.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod kernels;
pub mod live;
pub mod memory;
pub mod model;
pub mod optim;
pub mod params;
pub mod peak;
pub mod rank;
pub mod rng;
pub mod safetensors;
pub mod trainer;

pub use config::{ModelConfig, TrainConfig};
pub use data::DataSpec;
pub use error::{Error, Result};
pub use model::Gpt;
pub use trainer::{StateCopy, StepStats, Trainer};
