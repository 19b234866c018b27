//! The planner: a performance model of large-model training and a search over parallel layouts.
//!
//! Given a model (dense or mixture-of-experts), an accelerator and a GPU count, it predicts for a
//! layout (tensor, pipeline with virtual stages, data, context and expert parallelism; ZeRO
//! stage; micro-batch; recomputation; sequence parallelism) the memory per GPU and the step time,
//! hence MFU, HFU and tokens per day, and searches the layouts for the best that fits.
//!
//! - `model`: shapes, parameter and FLOPs counts; Hugging Face `config.json`, TOML, presets.
//! - `hardware`: the accelerator table and its per-kind calibration.
//! - `layout`: a layout, the job it runs and the rules it must keep.
//! - `memory`: weights, gradients, optimizer states, activations (Korthikanti et al. 2022).
//! - `perf`: the step-time model.
//! - `search`: the pruned layout search.
//! - `validate`: predictions against published runs (`data/published_runs.csv`).
//!
//! Pure: no files, sockets, threads or clocks. Callers pass file contents in as strings.

pub mod csv;
pub mod error;
pub mod hardware;
pub mod layout;
pub mod memory;
pub mod model;
pub mod perf;
pub mod search;
pub mod validate;

pub use error::{PlanError, Result};
pub use hardware::Hardware;
pub use layout::{Job, Layout, Precision, Software};
pub use model::{FlopsConvention, Model, Recompute};
pub use perf::{predict, Prediction};
pub use search::search;
