//! The wire types of the controller's HTTP API, shared by the controller, the agents and the CLI.
//!
//! Agents report *state* (every rank they hold, every port they reserved) on each heartbeat, never
//! deltas, so a report can be repeated or lost without harm. Commands to agents carry a sequence
//! number and stay queued until the agent acknowledges them, and every command is idempotent on the
//! agent, so a controller that dies between deciding and answering loses nothing.

use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

pub type JobId = u64;

/// Header carrying the cluster token on every request: `Authorization: Bearer <token>`.
pub const AUTH_HEADER: &str = "authorization";
/// Largest request body any route accepts.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Default and largest rank-log tail returned in one call (by the controller and by an agent).
pub const MAX_LOG_TAIL_BYTES: u64 = 8 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Node name, unique in the cluster.
    pub name: String,
    /// Accelerators (rank slots) on the node.
    pub slots: u32,
    /// CPU cores on the node (OMP_NUM_THREADS for one rank per node).
    pub cores: u32,
    /// Address other nodes reach this one at; rank 0's becomes MASTER_ADDR.
    pub addr: String,
    /// Port of the agent's own HTTP endpoint (logs).
    pub http_port: u16,
    /// A hot spare: scheduled only when regular nodes do not suffice.
    #[serde(default)]
    pub spare: bool,
    /// The node's GPUs, in NVML index order (none where no GPU backend was found).
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// The GPU driver's version, when there are GPUs.
    #[serde(default)]
    pub driver: Option<String>,
}

/// One GPU as its node's agent found it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuInfo {
    /// NVML's index (PCI bus order), which CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's too.
    pub index: u32,
    pub uuid: String,
    pub bus_id: String,
    pub model: String,
    pub memory_mib: u64,
}

/// What a GPU health check found. A fatal finding takes the node out of scheduling (its ranks are
/// failed at once) until a check passes or an operator restarts the agent; a warning is reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GpuFinding {
    pub index: u32,
    pub uuid: String,
    pub fatal: bool,
    /// What was found, e.g. "XID 79 (GPU has fallen off the bus)".
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegisterReply {
    pub heartbeat_interval_ms: u64,
    /// The fencing lease: an agent that has not reached the controller for this long kills its
    /// ranks, for the controller may have moved their work (0 or absent: no fencing).
    #[serde(default)]
    pub lease_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RankState {
    Running {
        pid: u32,
    },
    /// `code` is the exit status; `signal` the signal that killed the process, if one did.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl RankState {
    pub fn is_running(&self) -> bool {
        matches!(self, RankState::Running { .. })
    }
    pub fn succeeded(&self) -> bool {
        matches!(self, RankState::Exited { code: Some(0), .. })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RankReport {
    pub job_id: JobId,
    pub attempt: u32,
    pub local_rank: u32,
    #[serde(flatten)]
    pub state: RankState,
    /// Last step the rank reported ending on its progress socket, and that step's loss.
    #[serde(default)]
    pub step: Option<u64>,
    #[serde(default)]
    pub loss: Option<f64>,
    /// When the rank exited, on the agent's clock (ms since the Unix epoch).
    #[serde(default)]
    pub exited_at_ms: Option<u64>,
    /// Set when the agent found the rank hung and killed it.
    #[serde(default)]
    pub hang: Option<HangReport>,
    /// The rank's most recent step times (bounded; the controller keeps rank 0's).
    #[serde(default)]
    pub steps: Vec<StepTime>,
    #[serde(default)]
    pub tokens_per_s: Option<f64>,
    #[serde(default)]
    pub mfu: Option<f64>,
    /// Median over the rank's recent steps of its compute time per step (the step less its
    /// waits on collectives): what tells a straggler apart in synchronous training.
    #[serde(default)]
    pub compute_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HangReport {
    /// How long the rank had made no progress when it was declared hung.
    pub stalled_ms: u64,
    pub threshold_ms: u64,
    /// The rank's last reported phase (forward, backward, allreduce, checkpoint).
    pub phase: Option<String>,
    /// Every thread's state, wait channel and kernel stack, from /proc, before the kill.
    pub stack: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepTime {
    pub step: u64,
    pub ms: f64,
    /// When the step ended, on the agent's clock (ms since the Unix epoch).
    pub end_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PortReport {
    pub job_id: JobId,
    pub attempt: u32,
    pub port: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatRequest {
    /// Every command with a sequence number up to this one has been carried out.
    pub acked_command_seq: u64,
    pub ranks: Vec<RankReport>,
    pub ports: Vec<PortReport>,
    /// Complete checkpoints this node holds in memory, and persisted ones it can see.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointReport>,
    /// Checkpoints that failed verification when this node tried to restore them.
    #[serde(default)]
    pub bad_checkpoints: Vec<CheckpointReport>,
    /// What the GPU health checks currently find (full state, like everything else).
    #[serde(default)]
    pub gpu_findings: Vec<GpuFinding>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// In the agent's memory (tmpfs): survives a rank crash; a buddy node holds a copy.
    Memory,
    /// In the job's checkpoint directory: survives anything, slower to write.
    Persisted,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckpointReport {
    pub job_id: JobId,
    pub step: u64,
    pub tier: Tier,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatReply {
    pub commands: Vec<SeqCommand>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SeqCommand {
    pub seq: u64,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Find a free TCP port for rank 0's store and report it (MASTER_PORT of this attempt).
    ReservePort { job_id: JobId, attempt: u32 },
    /// Start these local ranks (skipped for ranks already started).
    Launch(Box<LaunchSpec>),
    /// Stop every rank of this attempt (SIGTERM, then SIGKILL after a grace period).
    Stop { job_id: JobId, attempt: u32 },
    /// The job has ended: drop its in-memory checkpoints.
    Purge { job_id: JobId },
    /// The controller has recorded how this attempt's ranks ended; drop them from reports.
    Forget { job_id: JobId, attempt: u32 },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LaunchSpec {
    pub job_id: JobId,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub workdir: Option<String>,
    /// Relative to the agent's checkpoint root (validated: no absolute path, no `..`).
    pub checkpoint_dir: String,
    /// This node's place in the job: it runs global ranks `group_rank * ranks_per_node ..` one
    /// per local rank `0..ranks_per_node`.
    pub group_rank: u32,
    pub ranks_per_node: u32,
    /// torchrun's variables shared by every rank of this node, and the job's own; each rank's
    /// own three come from [`LaunchSpec::rank_env`]. Sent once per node, not once per rank: at
    /// 10,000 ranks a launch would otherwise carry 200,000 variables.
    pub env: Vec<(String, String)>,
    /// The checkpoint every rank starts from, when the job has one.
    #[serde(default)]
    pub restore: Option<RestoreSpec>,
    /// This node hosts rank 0: it copies each in-memory checkpoint to `buddy` and persists every
    /// `persist_every`-th one into the checkpoint directory.
    #[serde(default)]
    pub leader: bool,
    /// Base URL (`http://HOST:PORT`) of the agent that keeps a copy of this node's checkpoints.
    #[serde(default)]
    pub buddy: Option<String>,
    #[serde(default)]
    pub checkpoint_every: u64,
    #[serde(default)]
    pub persist_every: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestoreSpec {
    pub step: u64,
    /// Agents holding the step in memory (base URLs), nearest first.
    pub sources: Vec<String>,
    /// Whether the step is also in the persisted tier.
    pub persisted: bool,
}

impl LaunchSpec {
    pub fn local_ranks(&self) -> std::ops::Range<u32> {
        0..self.ranks_per_node
    }

    /// The whole environment of one local rank: the node's variables, then RANK, LOCAL_RANK
    /// and ROLE_RANK. The agent adds MYRIAD_AGENT_SOCKET and MYRIAD_CHECKPOINT_DIR, which only
    /// it knows.
    pub fn rank_env(&self, local_rank: u32) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(crate::env::rank_vars(self.group_rank, self.ranks_per_node, local_rank));
        env
    }
}

/// The outcome of an attempt's rendezvous, served by the controller to every node of the
/// attempt: no rank-0 store has to answer 10,000 ranks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerTable {
    pub job_id: JobId,
    pub attempt: u32,
    pub world_size: u32,
    pub ranks_per_node: u32,
    pub master_addr: String,
    pub master_port: u16,
    /// Address of each node in group-rank order: global rank `r` runs on
    /// `hosts[r / ranks_per_node]` as local rank `r % ranks_per_node`.
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubmitReply {
    pub id: JobId,
}

/// A job as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobView {
    pub id: JobId,
    pub name: String,
    pub state: String,
    pub spec: JobSpec,
    pub attempt: u32,
    pub restarts: u32,
    pub nodes: Vec<String>,
    pub world_size: u32,
    pub ranks_running: u32,
    pub ranks_exited: u32,
    pub step: Option<u64>,
    pub loss: Option<f64>,
    pub master_port: Option<u16>,
    pub submitted_ms: u64,
    pub ended_ms: Option<u64>,
    /// Why the job ended or the last attempt failed.
    pub reason: Option<String>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    /// Effective training time (DESIGN.md): committed step time over wall time since submission.
    pub ettr: Option<f64>,
    pub time: TimeAccount,
    /// Faults the job recovered from, or is recovering from.
    pub faults: u32,
}

/// A job's recent history for charts: at most 360 points (the core's `SERIES_POINTS`) covering the
/// whole run, sampled every `every_ms` (doubled, and every other point dropped, whenever full).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobSeries {
    pub job_id: JobId,
    pub every_ms: u64,
    pub points: Vec<SeriesPoint>,
}

/// Rank 0's figures when it reported `step`; absent ones were not reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SeriesPoint {
    pub time_ms: u64,
    pub step: u64,
    pub loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub ettr: Option<f64>,
}

/// Where a job's wall-clock time went, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TimeAccount {
    pub wall_ms: u64,
    /// Sum of the durations of committed steps (never rolled back).
    pub committed_ms: f64,
    /// Submission until the first step began.
    pub startup_ms: f64,
    /// Faults until the controller noticed them.
    pub detection_ms: f64,
    /// Detection until the next attempt began its first step (stop, relaunch, restore, rendezvous).
    pub restart_ms: f64,
    /// Steps computed again after a rollback to an older checkpoint.
    pub recompute_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub health: String,
    pub spare: bool,
    pub slots: u32,
    pub slots_used: u32,
    pub addr: String,
    /// Port of the agent's HTTP endpoint (rank logs).
    pub http_port: u16,
    pub heartbeat_age_ms: Option<u64>,
    pub jobs: Vec<JobId>,
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    #[serde(default)]
    pub gpu_findings: Vec<GpuFinding>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub job_id: Option<JobId>,
    pub node: Option<String>,
    pub kind: String,
    pub message: String,
    /// Figures of the event (a recovery's detection, restart and recomputation seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// Parses JSON into `T`, reading a number written with a zero fraction (`8.0`) as the integer it
/// is, as JSON Schema does: a client that serialises every number as a float still speaks the
/// API. The strict parse runs first, so well-typed bodies pay nothing extra.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let strict = serde_json::from_slice(bytes);
    let Err(e) = strict else { return strict };
    if !e.is_data() {
        return Err(e);
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    integral_floats_to_integers(&mut value);
    serde_json::from_value(value).map_err(|_| e)
}

fn integral_floats_to_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().expect("is_f64");
            if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 {
                *value = Value::from(f as u64);
            } else if f.fract() == 0.0 && f < 0.0 && f >= i64::MIN as f64 {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// A fault to inject (`myriad chaos`), as sent to the controller and forwarded to an agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChaosRequest {
    pub action: ChaosAction,
    #[serde(default)]
    pub job_id: Option<JobId>,
    /// Global rank at the controller; the agent receives the local rank.
    #[serde(default)]
    pub rank: Option<u32>,
    #[serde(default)]
    pub node: Option<String>,
    /// How long a partition or a slowdown lasts.
    #[serde(default)]
    pub seconds: Option<f64>,
    /// Slowdown factor (2 = half speed).
    #[serde(default)]
    pub factor: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChaosAction {
    /// SIGKILL a rank.
    KillRank,
    /// SIGSTOP a rank: it hangs.
    HangRank,
    /// Stop and continue a rank in turns: a straggler.
    SlowRank,
    /// The agent exits at once, its ranks with it: a lost node.
    KillAgent,
    /// The agent stops heartbeating for a while; its ranks run on.
    Partition,
    /// Flip a byte in the newest persisted checkpoint of a job.
    CorruptCheckpoint,
}
