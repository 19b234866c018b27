//! Reliability simulator: a long training job on a cluster of 10,000–100,000 GPUs, on a simulated
//! clock, with faults drawn from a seed. The controller's real decisions come from
//! [`myriad_core::Core`], the same code the HTTP server runs; the simulator stands in for the
//! agents (heartbeats, rank exits, launches) and for the training itself (steps, checkpoint
//! stalls), and measures what the policy makes of each fault.
//!
//! Each node runs one rank standing for its GPUs: the controller's decisions (restart in place,
//! swap in a spare, wait for repairs, quarantine) are about nodes, and one report per node keeps a
//! 12,500-node cluster's restarts cheap enough to simulate a month in seconds.

mod engine;
pub mod rates;
mod rng;

use myriad_core::CoreConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

pub use rates::{FaultClass, FaultKind};

/// A rejected configuration: the parameter at fault and why.
#[derive(Clone, Debug, PartialEq)]
pub struct SimError {
    pub field: String,
    pub message: String,
}

impl SimError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SimError {
        SimError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SimError {}

/// A cluster, a job spanning all its regular nodes, fault rates and what each recovery step
/// costs. Times are seconds unless the name says otherwise.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// GPUs the job trains on (regular nodes × GPUs per node).
    pub gpus: u64,
    pub gpus_per_node: u32,
    /// Hot spare nodes, idle until a regular node is lost.
    pub spare_nodes: u32,
    pub days: f64,
    pub seed: u64,
    pub classes: Vec<FaultClass>,
    /// Multiplies every class's rate (sweeps, sensitivity).
    pub rate_scale: f64,
    /// One training step.
    pub step_s: f64,
    /// In-memory checkpoint every this many steps (0: no in-memory tier), and the training stall
    /// each one costs.
    pub memory_every_steps: u64,
    pub memory_stall_s: f64,
    /// Persisted checkpoint every this many steps (0: none), and its stall.
    pub persist_every_steps: u64,
    pub persist_stall_s: f64,
    /// Agent heartbeat interval; a node is lost after three silent ones.
    pub heartbeat_s: f64,
    /// The controller's fencing lease in heartbeat intervals (`CoreConfig::fence_lease_heartbeats`;
    /// 0: none, as in a replay of a run whose stack had no such lease).
    pub fence_lease_heartbeats: u32,
    /// From a rank's crash to its agent's report.
    pub crash_detect_s: f64,
    /// A rank is hung after max(floor, factor × step time) without progress.
    pub hang_floor_s: f64,
    pub hang_factor: f64,
    /// Stopping the surviving ranks of a failed attempt.
    pub stop_s: f64,
    /// From the launch command to every rank running (process start, rendezvous).
    pub launch_s: f64,
    /// From running to the first step: loading the restore point from a peer's memory, or from
    /// the persisted tier.
    pub restore_memory_s: f64,
    pub restore_persisted_s: f64,
    /// A node taken out by a hardware fault (or quarantined) comes back after this long.
    pub repair_h: f64,
    /// A person resubmits a job that failed for good.
    pub person_h: f64,
    pub max_restarts: u32,
    /// Runs the core's invariant checks after every decision it makes (slow; for tests). The
    /// report is the same either way: the checks only read.
    #[serde(skip)]
    pub checked: bool,
}

impl Default for Config {
    /// Myriad's ladder at 10,000 GPUs with Llama 3's fault rates. Detection figures are the ones
    /// the resilience soak measures (crash at once, hang after 4 s or 4 steps, node after three
    /// 1 s heartbeats); restart costs are stated assumptions for a 10,000-GPU job (see README).
    fn default() -> Self {
        Config {
            gpus: 10_000,
            gpus_per_node: 8,
            // 2.5% of the nodes: with Llama 3's rates and 72 h repairs about 12 nodes are in
            // repair at any time; `--sweep spares=16,24,32,48` over 182 days shows 16 running out.
            spare_nodes: 32,
            days: 7.0,
            seed: 1,
            classes: rates::llama3(),
            rate_scale: 1.0,
            step_s: 10.0,
            memory_every_steps: 1,
            memory_stall_s: 0.05,
            persist_every_steps: 100,
            persist_stall_s: 0.5,
            heartbeat_s: 1.0,
            fence_lease_heartbeats: CoreConfig::default().fence_lease_heartbeats,
            crash_detect_s: 0.1,
            hang_floor_s: 4.0,
            hang_factor: 4.0,
            stop_s: 2.0,
            launch_s: 20.0,
            restore_memory_s: 5.0,
            restore_persisted_s: 60.0,
            repair_h: 72.0,
            person_h: 4.0,
            max_restarts: 10_000,
            checked: false,
        }
    }
}

impl Config {
    /// Llama 3's run as the paper describes it: 16,384 GPUs for 54 days, with costs we assume
    /// for a PyTorch job of its time (the paper gives none of them):
    /// - 6 s steps (405B, 16M-token batches at about 400 TFLOP/s per GPU);
    /// - no in-memory tier; a persisted checkpoint every 50 steps (5 minutes) stalling 10 s;
    /// - a crash noticed after 60 s (peers block in a collective until it errors), a hang after
    ///   NCCL's 600 s watchdog, a lost node after three missed 60 s scheduler heartbeats;
    /// - 30 s to stop the survivors, 180 s to reschedule, start and rendezvous 16,384 processes,
    ///   120 s to load the checkpoint from storage;
    /// - 32 spare nodes, 72 h to repair a node.
    pub fn llama3() -> Config {
        Config {
            gpus: 16_384,
            spare_nodes: 32,
            days: 54.0,
            step_s: 6.0,
            memory_every_steps: 0,
            memory_stall_s: 0.0,
            persist_every_steps: 50,
            persist_stall_s: 10.0,
            heartbeat_s: 60.0,
            // Llama 3's stack found lost nodes through its collectives' timeouts; nothing
            // waited a lease before moving their work.
            fence_lease_heartbeats: 0,
            crash_detect_s: 60.0,
            hang_floor_s: 600.0,
            hang_factor: 0.0,
            stop_s: 30.0,
            launch_s: 180.0,
            restore_memory_s: 120.0,
            restore_persisted_s: 120.0,
            ..Config::default()
        }
    }

    pub fn nodes(&self) -> u64 {
        self.gpus / self.gpus_per_node.max(1) as u64
    }

    pub fn validate(&self) -> Result<(), SimError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SimError::new(field, format!("must be a positive number of seconds or days, not {v}")))
            }
        };
        let non_negative = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(SimError::new(field, format!("must be zero or more, not {v}")))
            }
        };
        if self.gpus == 0 {
            return Err(SimError::new("gpus", "must be at least one node's worth of GPUs, not 0"));
        }
        if self.gpus_per_node == 0 {
            return Err(SimError::new("gpus_per_node", "must be at least 1"));
        }
        if !self.gpus.is_multiple_of(self.gpus_per_node as u64) {
            return Err(SimError::new(
                "gpus",
                format!("{} GPUs do not fill whole nodes of {}", self.gpus, self.gpus_per_node),
            ));
        }
        if self.nodes() > proto::spec::MAX_NODES as u64 {
            return Err(SimError::new(
                "gpus",
                format!("{} nodes exceed the controller's limit of {}", self.nodes(), proto::spec::MAX_NODES),
            ));
        }
        if self.spare_nodes as u64 > self.nodes() {
            return Err(SimError::new(
                "spare_nodes",
                format!("{} spares for {} nodes: more spares than nodes", self.spare_nodes, self.nodes()),
            ));
        }
        positive("days", self.days)?;
        positive("step_s", self.step_s)?;
        positive("heartbeat_s", self.heartbeat_s)?;
        non_negative("rate_scale", self.rate_scale)?;
        for c in &self.classes {
            if !(c.rate_per_gpu_hour.is_finite() && c.rate_per_gpu_hour >= 0.0) {
                return Err(SimError::new(
                    "rates",
                    format!(
                        "class {:?}: rate {} per GPU-hour is negative or not a number",
                        c.name, c.rate_per_gpu_hour
                    ),
                ));
            }
        }
        for (field, v) in [
            ("memory_stall_s", self.memory_stall_s),
            ("persist_stall_s", self.persist_stall_s),
            ("crash_detect_s", self.crash_detect_s),
            ("hang_floor_s", self.hang_floor_s),
            ("hang_factor", self.hang_factor),
            ("stop_s", self.stop_s),
            ("launch_s", self.launch_s),
            ("restore_memory_s", self.restore_memory_s),
            ("restore_persisted_s", self.restore_persisted_s),
            ("repair_h", self.repair_h),
            ("person_h", self.person_h),
        ] {
            non_negative(field, v)?;
        }
        if self.launch_s >= engine::LAUNCH_TIMEOUT_S {
            return Err(SimError::new(
                "launch_s",
                format!("must be under the controller's launch timeout of {} s", engine::LAUNCH_TIMEOUT_S),
            ));
        }
        Ok(())
    }

    /// Faults per GPU-hour, all classes together, scaled.
    fn rate_per_gpu_hour(&self) -> f64 {
        self.classes.iter().map(|c| c.rate_per_gpu_hour).sum::<f64>() * self.rate_scale
    }

    /// Faults per hour over the whole cluster, spares included.
    pub fn faults_per_hour(&self) -> f64 {
        let gpus = (self.nodes() + self.spare_nodes as u64) * self.gpus_per_node as u64;
        self.rate_per_gpu_hour() * gpus as f64
    }

    /// Young/Daly's optimal checkpoint interval in steps for a checkpoint costing `stall_s`:
    /// sqrt(2 · cost · MTBF), with the MTBF of the job's own GPUs.
    pub fn young_daly_steps(&self, stall_s: f64) -> Option<f64> {
        let per_hour = self.job_faults_per_hour();
        (per_hour > 0.0 && stall_s > 0.0).then(|| (2.0 * stall_s * 3600.0 / per_hour).sqrt() / self.step_s)
    }

    /// Faults per hour on the job's own GPUs.
    pub fn job_faults_per_hour(&self) -> f64 {
        self.rate_per_gpu_hour() * self.gpus as f64
    }
}

/// GPU-hours lost, by where the time went.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LostGpuHours {
    pub startup: f64,
    pub detection: f64,
    /// From detection to the first step of the next attempt: stopping, waiting for nodes,
    /// launching, restoring.
    pub restart: f64,
    pub recomputation: f64,
    pub checkpointing: f64,
    /// The rest: the step in flight when a fault hit, recoveries still open at the end, time with
    /// no job (a failed job waiting for a person).
    pub other: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClassStats {
    pub faults: u64,
    /// Faults that interrupted the running job (others hit idle nodes or an already-stopped job).
    pub interruptions: u64,
    /// Detection, restart and recomputation of the recoveries it caused.
    pub lost_gpu_hours: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub gpus: u64,
    pub nodes: u64,
    pub spare_nodes: u32,
    pub days: f64,
    /// Effective training time: committed step time over wall time.
    pub ettr: f64,
    /// Per whole week of the run.
    pub weekly_ettr: Vec<f64>,
    pub weekly_ettr_min: Option<f64>,
    pub weekly_ettr_median: Option<f64>,
    pub faults: u64,
    /// Job interruptions: faults that ended a running attempt (the controller's count; a fault
    /// during a recovery extends it rather than adding one).
    pub interruptions: u64,
    pub mean_hours_between_interruptions: Option<f64>,
    pub manual_interventions: u64,
    pub mean_days_between_interventions: Option<f64>,
    /// Why each intervention was needed, with the day it happened.
    pub intervention_log: Vec<(f64, String)>,
    pub nodes_quarantined: u64,
    pub steps: u64,
    pub lost_gpu_hours: LostGpuHours,
    pub by_class: BTreeMap<String, ClassStats>,
    /// Controller events processed (a measure of the work simulated).
    pub controller_events: u64,
}

/// Runs one simulation.
pub fn run(cfg: &Config) -> Result<Report, SimError> {
    cfg.validate()?;
    Ok(engine::Engine::new(cfg).run())
}

/// What `--sweep` varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepParam {
    /// In-memory checkpoint interval in steps (the persisted tier when the memory tier is off).
    CheckpointEvery,
    SpareNodes,
}

/// Runs `cfg` once per value of `param`, same seed each time.
pub fn sweep(cfg: &Config, param: SweepParam, values: &[u64]) -> Result<Vec<(u64, Report)>, SimError> {
    if values.is_empty() {
        return Err(SimError::new("sweep", "needs at least one value"));
    }
    values
        .iter()
        .map(|&v| {
            if param == SweepParam::CheckpointEvery && v == 0 {
                return Err(SimError::new("sweep", "a checkpoint interval must be at least 1 step"));
            }
            let mut c = cfg.clone();
            match param {
                SweepParam::CheckpointEvery if c.memory_every_steps > 0 => c.memory_every_steps = v,
                SweepParam::CheckpointEvery => c.persist_every_steps = v,
                SweepParam::SpareNodes => c.spare_nodes = v as u32,
            }
            run(&c).map(|r| (v, r))
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count); None when empty.
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests;
