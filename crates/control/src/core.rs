//! The controller's decisions, with no IO: nodes, jobs, gang scheduling, the torchrun environment,
//! failure handling and timeouts. Time comes in as `now_ms` on every call; what changed comes out
//! through [`Core::take_changes`] for the edge to persist. The same core runs under the HTTP server
//! and, later, under the simulator's clock.
//!
//! Life of a job: `queued` → (all its nodes free) `starting`: rank 0's node reserves a port for the
//! store → every node launches its ranks → `running` once every rank has reported → `succeeded`
//! when every rank exits 0. A rank exiting non-zero, a lost node or a launch that does not finish
//! in time ends the attempt: its ranks are stopped, their slots return only once every node has
//! confirmed them gone, then the job restarts (new attempt, new MASTER_PORT) if restarts are left,
//! else it fails. Cancelling follows the same path.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

use crate::api::{
    Command, Event, HeartbeatReply, HeartbeatRequest, JobId, JobSeries, JobView, LaunchSpec, NodeView,
    PeerTable, RankReport, RankState, RegisterReply, RegisterRequest, RestoreSpec, SeqCommand, SeriesPoint,
    StepTime, Tier, TimeAccount,
};
use crate::spec::{validate_name, JobSpec, SpecError};

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub heartbeat_interval_ms: u64,
    /// A node is lost after this many heartbeat intervals of silence.
    pub node_timeout_heartbeats: u32,
    /// An attempt whose ranks have not all started by then fails.
    pub launch_timeout_ms: u64,
    /// The period the edge calls [`Core::tick`] at. A node is declared lost two ticks before its
    /// silence reaches the timeout: checked every tick, with a tick's slack for a late one,
    /// detection never takes longer than the timeout itself.
    pub tick_ms: u64,
    /// A node blamed for this many failures within `quarantine_window_ms` is taken out of
    /// scheduling until a person restarts its agent.
    pub quarantine_after: usize,
    pub quarantine_window_ms: u64,
    /// A rank whose median compute time per step is this fraction above the job's median is a
    /// straggler; checked every `straggler_check_ms`.
    pub straggler_margin: f64,
    pub straggler_check_ms: u64,
    /// A straggler still straggling after this many checks in a row has its node swapped for a
    /// free spare the job may use (a restart from the newest checkpoint); 0 never evicts.
    pub straggler_evict_checks: u32,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            heartbeat_interval_ms: 1000,
            node_timeout_heartbeats: 3,
            launch_timeout_ms: 120_000,
            tick_ms: 100,
            quarantine_after: 3,
            quarantine_window_ms: 3_600_000,
            // A rank stalled half of the time (or sharing its GPU with another job) is found;
            // the jitter of ranks sharing a busy host is not.
            straggler_margin: 0.5,
            straggler_check_ms: 5_000,
            // 15 s of a rank 50% slower costs the job more than a restart from an in-memory
            // checkpoint (seconds), and three checks in a row are not jitter.
            straggler_evict_checks: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Lost,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    pub job_id: JobId,
    pub attempt: u32,
    pub slots: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub slots: u32,
    pub cores: u32,
    pub addr: String,
    pub http_port: u16,
    pub spare: bool,
    pub health: Health,
    pub allocations: Vec<Allocation>,
    /// Commands not yet acknowledged, oldest first.
    pub commands: VecDeque<SeqCommand>,
    pub next_command_seq: u64,
    /// When failures were last blamed on this node (the newest few).
    #[serde(default)]
    pub failures_ms: Vec<u64>,
    /// Failed too often: no new work until its agent re-registers.
    #[serde(default)]
    pub quarantined: bool,
    /// Steps of each job's checkpoints this node holds in memory (its own and its buddy's).
    #[serde(default)]
    pub checkpoints: BTreeMap<JobId, BTreeSet<u64>>,
    /// Not persisted: a restarted controller gives every node a fresh grace period.
    #[serde(skip)]
    pub last_heartbeat_ms: u64,
    /// Ranks still running per (job, attempt) in the node's last heartbeat.
    #[serde(skip)]
    pub reported_running: BTreeMap<(JobId, u32), u32>,
}

impl Node {
    fn slots_used(&self) -> u32 {
        self.allocations.iter().map(|a| a.slots).sum()
    }

    /// Healthy, not quarantined, with `slots` free.
    fn has_room(&self, slots: u32) -> bool {
        self.health == Health::Healthy && !self.quarantined && self.slots - self.slots_used() >= slots
    }

    fn holds(&self, job_id: JobId, attempt: u32) -> bool {
        self.allocations.iter().any(|a| a.job_id == job_id && a.attempt == attempt)
    }

    fn push(&mut self, command: Command) {
        self.next_command_seq += 1;
        self.commands.push_back(SeqCommand { seq: self.next_command_seq, command });
    }

    fn has_unacked_launch(&self, job_id: JobId, attempt: u32) -> bool {
        self.commands
            .iter()
            .any(|c| matches!(&c.command, Command::Launch(l) if l.job_id == job_id && l.attempt == attempt))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Starting,
    Running,
    /// The attempt ended; its ranks are being stopped before the job restarts or ends.
    Stopping,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Stopping => "stopping",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What happens once an ending attempt's ranks are all gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeed,
    Restart,
    Fail,
    Cancel,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    /// Nodes in group-rank order: `nodes[0]` hosts global rank 0.
    pub nodes: Vec<String>,
    pub master_port: Option<u16>,
    pub started_ms: u64,
    /// Last reported state of every global rank; None until its node reports it.
    pub ranks: Vec<Option<RankState>>,
    /// Set when the attempt ends; the job moves on once every node released its slots.
    pub outcome: Option<Outcome>,
    /// Derived indexes (rebuilt on restore) that keep a heartbeat's work independent of the
    /// job's size: each node's group rank, how many ranks have reported, how many of `nodes`
    /// still hold slots for this attempt.
    #[serde(skip)]
    pub groups: HashMap<String, u32>,
    #[serde(skip)]
    pub reported: u32,
    #[serde(skip)]
    pub holders: u32,
    /// Each rank's median compute time per step as last reported (not persisted: agents report
    /// it again), and the ranks already found to straggle in this attempt.
    #[serde(skip)]
    pub compute_ms: Vec<Option<f64>>,
    #[serde(default)]
    pub stragglers: BTreeSet<u32>,
    #[serde(skip)]
    pub straggler_checked_ms: u64,
    /// Checks in a row each rank has been found straggling (not persisted: it starts again).
    #[serde(skip)]
    pub straggling_checks: BTreeMap<u32, u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    pub submitted_ms: u64,
    pub ended_ms: Option<u64>,
    pub restarts: u32,
    pub reason: Option<String>,
    pub attempt: Option<Attempt>,
    /// Nodes of the latest attempts (at most [`PLACEMENTS_KEPT`]), oldest first: logs of earlier
    /// attempts live there. A job restarted a thousand times on 1,250 nodes would otherwise carry
    /// every list in its row.
    pub placements: Vec<Vec<String>>,
    /// Attempt number of `placements[0]`.
    #[serde(default)]
    pub placements_from: u32,
    /// Rank 0's last reported step and loss.
    pub step: Option<u64>,
    pub loss: Option<f64>,
    /// Steps in the persisted tier, as the leader's agent last reported them.
    #[serde(default)]
    pub persisted: BTreeSet<u64>,
    /// Steps that failed verification somewhere: never restored from again.
    #[serde(default)]
    pub bad_steps: BTreeSet<u64>,
    #[serde(default)]
    pub tokens_per_s: Option<f64>,
    #[serde(default)]
    pub mfu: Option<f64>,
    /// Committed step time and lost time, for effective training time.
    #[serde(default)]
    pub account: Account,
    /// Rank 0's figures over time, for the dashboard's charts. Persisted with the row, which a
    /// new step rewrites anyway, so a restarted controller keeps the charts whole.
    #[serde(default)]
    pub history: History,
    /// Nodes evicted from this job for straggling: its later attempts avoid them.
    #[serde(default)]
    pub evicted: BTreeSet<String>,
}

/// Points of a job's history kept (48 bytes each in memory, about 50 in the job's row).
pub const SERIES_POINTS: usize = 360;
/// The first sampling period of a job's history.
const SERIES_FIRST_EVERY_MS: u64 = 1000;

/// Rank 0's figures over a whole run in bounded memory: a sample every `every_ms`; when
/// [`SERIES_POINTS`] are held, every other one goes and the period doubles. A week-long run keeps
/// its whole shape, at coarser resolution, in the same 17 KB as a minute-long one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub every_ms: u64,
    /// (time_ms, step, [loss, tokens/s, MFU, ETTR]); None where rank 0 reported nothing.
    points: Vec<(u64, u64, [Option<f32>; 4])>,
}

impl Default for History {
    fn default() -> Self {
        History { every_ms: SERIES_FIRST_EVERY_MS, points: Vec::new() }
    }
}

impl History {
    /// Returns whether the sample was kept.
    fn record(&mut self, time_ms: u64, step: u64, figures: [Option<f64>; 4]) -> bool {
        if let Some(&(last_ms, last_step, _)) = self.points.last() {
            if step == last_step || time_ms < last_ms + self.every_ms {
                return false;
            }
        }
        if self.points.len() == SERIES_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.every_ms *= 2;
        }
        self.points.push((time_ms, step, figures.map(|f| f.map(|v| v as f32))));
        true
    }

    pub fn points(&self) -> impl Iterator<Item = SeriesPoint> + '_ {
        let wide = |v: Option<f32>| v.map(f64::from);
        self.points.iter().map(move |&(time_ms, step, [loss, tokens, mfu, ettr])| SeriesPoint {
            time_ms,
            step,
            loss: wide(loss),
            tokens_per_s: wide(tokens),
            mfu: wide(mfu),
            ettr: wide(ettr),
        })
    }
}

/// Placements kept per job (the newest attempts').
pub const PLACEMENTS_KEPT: usize = 16;

/// Steps kept one by one for rollback; older ones are folded into a sum.
const STEP_WINDOW: usize = 256;

/// The time ledger of a job (DESIGN.md's effective training time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Total duration of committed steps older than the window.
    pub committed_base_ms: f64,
    /// Rank 0's recent steps: duration and end, by step.
    pub recent: BTreeMap<u64, StepTime>,
    pub startup_ms: Option<f64>,
    pub detection_ms: f64,
    pub restart_ms: f64,
    pub recompute_ms: f64,
    pub faults: u32,
    /// A fault detected whose recovery is not complete (the next attempt has not stepped yet).
    pub pending: Option<PendingFault>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingFault {
    /// The attempt the fault ended; only a later attempt's steps complete the recovery.
    #[serde(default)]
    pub attempt: u32,
    pub cause: String,
    /// The class of the cause ([`FaultKind::as_str`]), for metrics by cause.
    #[serde(default)]
    pub kind: String,
    pub fault_ms: u64,
    pub detected_ms: u64,
    pub recompute_ms: f64,
    pub lost_steps: u64,
    pub restore_step: u64,
}

impl Account {
    pub fn committed_ms(&self) -> f64 {
        self.committed_base_ms + self.recent.values().map(|s| s.ms).sum::<f64>()
    }

    /// A new attempt starts from `restore_step`: every later step will be computed again.
    fn roll_back(&mut self, restore_step: u64) {
        let lost: Vec<u64> = self.recent.range(restore_step + 1..).map(|(&s, _)| s).collect();
        let lost_ms: f64 = lost.iter().map(|s| self.recent[s].ms).sum();
        for s in &lost {
            self.recent.remove(s);
        }
        if let Some(p) = self.pending.as_mut() {
            p.recompute_ms += lost_ms;
            p.lost_steps += lost.len() as u64;
            p.restore_step = restore_step;
        }
    }

    /// Records rank 0's step times. Returns the recovery event (message, figures) when these are
    /// the first steps after a fault.
    fn record_steps(
        &mut self,
        steps: &[StepTime],
        attempt: u32,
        submitted_ms: u64,
    ) -> Option<(String, serde_json::Value)> {
        // The first report of a new attempt says which step it restored: the one before its
        // first. That can be newer than the restore point the controller named (ranks that keep
        // their state live agree on the newest step any of them holds), so the steps after it
        // are rolled back only now.
        if self.pending.as_ref().is_some_and(|p| attempt > p.attempt) {
            if let Some(first) = steps.iter().map(|s| s.step).min() {
                self.roll_back(first.saturating_sub(1));
            }
        }
        let first =
            steps.iter().filter(|s| !self.recent.contains_key(&s.step)).min_by_key(|s| s.step).copied();
        for s in steps {
            self.recent.insert(s.step, *s);
        }
        while self.recent.len() > STEP_WINDOW {
            let (_, oldest) = self.recent.pop_first().expect("non-empty");
            self.committed_base_ms += oldest.ms;
        }
        let first = first?;
        let began_ms = first.end_ms as f64 - first.ms;
        if attempt == 0 && self.startup_ms.is_none() {
            self.startup_ms = Some((began_ms - submitted_ms as f64).max(0.0));
        }
        if self.pending.as_ref().is_none_or(|p| attempt <= p.attempt) {
            return None;
        }
        let p = self.pending.take()?;
        let detection_ms = p.detected_ms.saturating_sub(p.fault_ms) as f64;
        let restart_ms = (began_ms - p.detected_ms as f64).max(0.0);
        self.detection_ms += detection_ms;
        self.restart_ms += restart_ms;
        self.recompute_ms += p.recompute_ms;
        let message = format!(
            "recovered from step {} after: {}; detection {:.2} s, restart {:.2} s, recomputation {:.2} s ({} steps)",
            p.restore_step,
            p.cause,
            detection_ms / 1e3,
            restart_ms / 1e3,
            p.recompute_ms / 1e3,
            p.lost_steps
        );
        let data = serde_json::json!({
            "cause": p.cause, "kind": p.kind, "restore_step": p.restore_step, "detection_s": detection_ms / 1e3,
            "restart_s": restart_ms / 1e3, "recompute_s": p.recompute_ms / 1e3, "lost_steps": p.lost_steps,
        });
        Some((message, data))
    }
}

/// What ended an attempt, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A rank exited non-zero or was killed.
    RankExit,
    /// The agent found a rank making no progress and killed it.
    Hang,
    /// A node stopped heartbeating.
    NodeLost,
    /// An agent re-registered: it restarted and lost its ranks.
    AgentRestart,
    /// The ranks did not all start in time.
    LaunchTimeout,
    /// A node kept straggling and was swapped for a spare.
    Straggler,
    /// Not a fault: success or cancellation.
    None,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::RankExit => "rank_exit",
            FaultKind::Hang => "hang",
            FaultKind::NodeLost => "node_lost",
            FaultKind::AgentRestart => "agent_restart",
            FaultKind::LaunchTimeout => "launch_timeout",
            FaultKind::Straggler => "straggler",
            FaultKind::None => "none",
        }
    }
}

/// Errors the API turns into 4xx responses.
#[derive(Clone, Debug, PartialEq)]
pub enum CoreError {
    Spec(SpecError),
    UnknownNode(String),
    UnknownJob(JobId),
    Conflict(String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Spec(e) => write!(f, "{e}"),
            CoreError::UnknownNode(n) => write!(f, "node {n:?} is not registered"),
            CoreError::UnknownJob(id) => write!(f, "job {id} does not exist"),
            CoreError::Conflict(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for CoreError {}

/// Everything that changed since the last call, for the edge to persist in one transaction.
#[derive(Debug, Default)]
pub struct Changes {
    pub jobs: Vec<Job>,
    pub nodes: Vec<Node>,
    pub events: Vec<Event>,
    pub next_job_id: u64,
    pub next_event_seq: u64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.nodes.is_empty() && self.events.is_empty()
    }
}

/// Rebuilds an attempt's derived indexes from its node list, rank table and the nodes' slots.
fn index_attempt(a: &mut Attempt, job_id: JobId, nodes: &BTreeMap<String, Node>) {
    a.groups = group_index(&a.nodes);
    a.reported = a.ranks.iter().filter(|r| r.is_some()).count() as u32;
    a.holders =
        a.nodes.iter().filter(|n| nodes.get(*n).is_some_and(|node| node.holds(job_id, a.number))).count()
            as u32;
}

/// Names for an event: all of a small job's nodes; the first few of a large one and a count (its
/// full placement is in the job's view), so one event is not 15 KB at 1,250 nodes.
fn node_list(nodes: &[String]) -> String {
    const SHOWN: usize = 8;
    if nodes.len() <= SHOWN {
        return nodes.join(", ");
    }
    format!("{}, … and {} more ({} nodes)", nodes[..SHOWN].join(", "), nodes.len() - SHOWN, nodes.len())
}

/// Effective training time: committed step time over wall time since submission.
fn ettr(job: &Job, now_ms: u64) -> Option<f64> {
    let wall_ms = job.ended_ms.unwrap_or(now_ms).saturating_sub(job.submitted_ms);
    (wall_ms > 0 && !job.account.recent.is_empty()).then(|| job.account.committed_ms() / wall_ms as f64)
}

/// Each node's group rank: its position in the attempt's node list.
fn group_index(nodes: &[String]) -> HashMap<String, u32> {
    nodes.iter().enumerate().map(|(g, n)| (n.clone(), g as u32)).collect()
}

pub struct Core {
    cfg: CoreConfig,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<JobId, Job>,
    next_job_id: u64,
    next_event_seq: u64,
    dirty_jobs: BTreeSet<JobId>,
    dirty_nodes: BTreeSet<String>,
    events: Vec<Event>,
    /// Something happened that may let a queued job start (slots freed, a node back, a job
    /// requeued). Heartbeats schedule only then: with a job waiting, a scan of every node on
    /// every heartbeat is quadratic per round at 1,250 nodes. `tick` schedules regardless.
    schedule_due: bool,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Core {
        Core::restore(cfg, Vec::new(), Vec::new(), 1, 1, 0)
    }

    /// Rebuilds the core from persisted rows. Every node starts a fresh heartbeat grace period at
    /// `now_ms`: agents kept running while the controller was down and will report in.
    pub fn restore(
        cfg: CoreConfig,
        nodes: Vec<Node>,
        jobs: Vec<Job>,
        next_job_id: u64,
        next_event_seq: u64,
        now_ms: u64,
    ) -> Core {
        let nodes: BTreeMap<String, Node> = nodes
            .into_iter()
            .map(|mut n| {
                n.last_heartbeat_ms = now_ms;
                (n.name.clone(), n)
            })
            .collect();
        let jobs = jobs
            .into_iter()
            .map(|mut j| {
                if let Some(a) = j.attempt.as_mut() {
                    index_attempt(a, j.id, &nodes);
                }
                (j.id, j)
            })
            .collect();
        Core {
            cfg,
            nodes,
            jobs,
            next_job_id,
            next_event_seq,
            dirty_jobs: BTreeSet::new(),
            dirty_nodes: BTreeSet::new(),
            events: Vec::new(),
            schedule_due: false,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Whether anything changed since the last [`Core::take_changes`].
    pub fn has_changes(&self) -> bool {
        !(self.dirty_jobs.is_empty() && self.dirty_nodes.is_empty() && self.events.is_empty())
    }

    pub fn take_changes(&mut self) -> Changes {
        let jobs =
            std::mem::take(&mut self.dirty_jobs).into_iter().map(|id| self.jobs[&id].clone()).collect();
        let nodes =
            std::mem::take(&mut self.dirty_nodes).into_iter().map(|n| self.nodes[&n].clone()).collect();
        Changes {
            jobs,
            nodes,
            events: std::mem::take(&mut self.events),
            next_job_id: self.next_job_id,
            next_event_seq: self.next_event_seq,
        }
    }

    fn event(&mut self, now_ms: u64, job_id: Option<JobId>, node: Option<&str>, kind: &str, message: String) {
        self.events.push(Event {
            seq: self.next_event_seq,
            time_ms: now_ms,
            job_id,
            node: node.map(str::to_string),
            kind: kind.to_string(),
            message,
            data: None,
        });
        self.next_event_seq += 1;
    }

    /// A failure is this node's fault; too many in the window and it is quarantined.
    fn blame(&mut self, name: &str, now_ms: u64) {
        let (after, window_ms) = (self.cfg.quarantine_after, self.cfg.quarantine_window_ms);
        let Some(node) = self.nodes.get_mut(name) else { return };
        node.failures_ms.retain(|&t| now_ms.saturating_sub(t) < window_ms);
        node.failures_ms.push(now_ms);
        self.dirty_nodes.insert(name.to_string());
        if node.failures_ms.len() >= after && !node.quarantined {
            node.quarantined = true;
            let message = format!(
                "node {name} quarantined after {} failures within {} s: it needs a person (restart its agent to release it)",
                node.failures_ms.len(),
                window_ms / 1000
            );
            self.event(now_ms, None, Some(name), "node_quarantined", message);
        }
    }

    /// Records an event decided outside the core (a fault injected on purpose).
    pub fn record(
        &mut self,
        now_ms: u64,
        job_id: Option<JobId>,
        node: Option<&str>,
        kind: &str,
        message: String,
    ) {
        self.event(now_ms, job_id, node, kind, message);
    }

    // ---------------------------------------------------------------- nodes

    /// A node's agent (re)starts. An agent that restarts has lost its ranks: any attempt still
    /// counting on them fails.
    pub fn register(&mut self, req: RegisterRequest, now_ms: u64) -> Result<RegisterReply, CoreError> {
        validate_name("name", &req.name).map_err(CoreError::Spec)?;
        if req.slots == 0 {
            return Err(CoreError::Spec(SpecError {
                field: "slots".into(),
                message: "must be at least 1".into(),
            }));
        }
        let name = req.name.clone();
        match self.nodes.get_mut(&name) {
            Some(node) => {
                node.slots = req.slots;
                node.cores = req.cores.max(1);
                node.addr = req.addr;
                node.http_port = req.http_port;
                node.spare = req.spare;
                node.health = Health::Healthy;
                node.last_heartbeat_ms = now_ms;
                node.commands.clear();
                // A person restarted the agent: the node gets another chance.
                node.quarantined = false;
                node.failures_ms.clear();
                let held: Vec<(JobId, u32)> =
                    node.allocations.iter().map(|a| (a.job_id, a.attempt)).collect();
                node.allocations.clear();
                self.dirty_nodes.insert(name.clone());
                self.event(
                    now_ms,
                    None,
                    Some(&name),
                    "node_registered",
                    format!("node {name} re-registered"),
                );
                for (job_id, attempt) in held {
                    self.released(&name, job_id, attempt);
                    let reason = format!("the agent on node {name} restarted and lost its ranks");
                    let kind = FaultKind::AgentRestart;
                    self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), now_ms, now_ms);
                    self.maybe_finish_attempt(job_id, now_ms);
                }
            }
            None => {
                let node = Node {
                    name: name.clone(),
                    slots: req.slots,
                    cores: req.cores.max(1),
                    addr: req.addr,
                    http_port: req.http_port,
                    spare: req.spare,
                    health: Health::Healthy,
                    allocations: Vec::new(),
                    commands: VecDeque::new(),
                    next_command_seq: 0,
                    failures_ms: Vec::new(),
                    quarantined: false,
                    checkpoints: BTreeMap::new(),
                    last_heartbeat_ms: now_ms,
                    reported_running: BTreeMap::new(),
                };
                let what = if node.spare { "spare node" } else { "node" };
                let message = format!("{what} {name} joined with {} slots", node.slots);
                self.nodes.insert(name.clone(), node);
                self.dirty_nodes.insert(name.clone());
                self.event(now_ms, None, Some(&name), "node_registered", message);
            }
        }
        self.schedule(now_ms);
        Ok(RegisterReply { heartbeat_interval_ms: self.cfg.heartbeat_interval_ms })
    }

    pub fn heartbeat(
        &mut self,
        name: &str,
        req: HeartbeatRequest,
        now_ms: u64,
    ) -> Result<HeartbeatReply, CoreError> {
        self.report(name, req, now_ms)?;
        Ok(HeartbeatReply { commands: self.nodes[name].commands.iter().cloned().collect() })
    }

    /// A heartbeat without the reply: the caller reads the node's queued commands itself
    /// ([`Core::node`]), as the simulator does for thousands of nodes.
    pub fn report(&mut self, name: &str, req: HeartbeatRequest, now_ms: u64) -> Result<(), CoreError> {
        let node = self.nodes.get_mut(name).ok_or_else(|| CoreError::UnknownNode(name.to_string()))?;
        node.last_heartbeat_ms = now_ms;
        let before = node.commands.len();
        node.commands.retain(|c| c.seq > req.acked_command_seq);
        if node.commands.is_empty() {
            // An emptied queue keeps room for the launch specs it held: 1 KB per idle node.
            node.commands.shrink_to_fit();
        }
        let mut dirty = node.commands.len() != before;
        let returned = node.health == Health::Lost;
        if returned {
            node.health = Health::Healthy;
            dirty = true;
            self.schedule_due = true;
        }
        if dirty {
            self.dirty_node(name);
        }
        if returned {
            self.event(
                now_ms,
                None,
                Some(name),
                "node_returned",
                format!("node {name} is heartbeating again"),
            );
        }

        self.checkpoint_reports(name, &req, now_ms);
        for port in &req.ports {
            self.port_reserved(name, port.job_id, port.attempt, port.port, now_ms);
        }

        // Ranks still running per attempt, as this node sees them.
        let mut reported: BTreeMap<(JobId, u32), u32> = BTreeMap::new();
        for r in &req.ranks {
            *reported.entry((r.job_id, r.attempt)).or_default() += r.state.is_running() as u32;
            self.rank_report(name, r, now_ms);
        }
        for (&(job_id, attempt), &running) in &reported {
            if self.nodes[name].holds(job_id, attempt) {
                continue;
            }
            // Ranks of an attempt this node holds no slots for: a leftover of an attempt that
            // ended while the node was cut off, or of a job this controller never saw. Running
            // ones keep their slots occupied until they are gone.
            let node = self.nodes.get_mut(name).expect("checked above");
            if running > 0 {
                node.allocations.push(Allocation { job_id, attempt, slots: running });
                node.push(Command::Stop { job_id, attempt });
                self.dirty_node(name);
                self.acquired(name, job_id, attempt);
                let message = format!("stopping {running} leftover ranks of job {job_id} attempt {attempt}");
                self.event(now_ms, Some(job_id), Some(name), "leftover_ranks", message);
            } else {
                self.push_once(name, Command::Forget { job_id, attempt });
            }
        }
        self.nodes.get_mut(name).expect("checked above").reported_running = reported.clone();
        let mut touched: BTreeSet<JobId> = self.nodes[name].allocations.iter().map(|a| a.job_id).collect();
        touched.extend(reported.keys().map(|&(job_id, _)| job_id));
        for job_id in touched {
            self.try_release(name, job_id, now_ms);
            self.maybe_finish_attempt(job_id, now_ms);
        }
        if self.schedule_due {
            self.schedule(now_ms);
        }
        Ok(())
    }

    /// Every healthy node not in `silent` heartbeats at `now_ms` with nothing new to say. For
    /// the simulator, which stands in for thousands of agents whose reports have not changed.
    pub fn alive_all(&mut self, now_ms: u64, silent: &HashSet<String>) {
        for node in self.nodes.values_mut() {
            if node.health == Health::Healthy && !silent.contains(&node.name) {
                node.last_heartbeat_ms = node.last_heartbeat_ms.max(now_ms);
            }
        }
    }

    /// For a caller that keeps no copy of the state (the simulator): which nodes changed since
    /// the last call (new commands among them), and the events, without cloning any row.
    pub fn take_dirty(&mut self) -> (BTreeSet<String>, Vec<Event>) {
        self.dirty_jobs.clear();
        (std::mem::take(&mut self.dirty_nodes), std::mem::take(&mut self.events))
    }

    /// The derived indexes agree with the state they summarise (checked by the tests after
    /// every step; too slow to check on every call of a large cluster).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) {
        for job in self.jobs.values() {
            let Some(a) = job.attempt.as_ref() else { continue };
            let mut fresh = a.clone();
            index_attempt(&mut fresh, job.id, &self.nodes);
            assert_eq!(
                (&fresh.groups, fresh.reported, fresh.holders),
                (&a.groups, a.reported, a.holders),
                "indexes of job {} attempt {}",
                job.id,
                a.number
            );
        }
    }

    /// Records which checkpoints the node holds, which failed to verify, and purges the
    /// in-memory checkpoints of jobs that have ended.
    fn checkpoint_reports(&mut self, name: &str, req: &HeartbeatRequest, now_ms: u64) {
        let mut memory: BTreeMap<JobId, BTreeSet<u64>> = BTreeMap::new();
        let mut persisted: BTreeMap<JobId, BTreeSet<u64>> = BTreeMap::new();
        for c in &req.checkpoints {
            let into = if c.tier == Tier::Memory { &mut memory } else { &mut persisted };
            into.entry(c.job_id).or_default().insert(c.step);
        }
        let ended: Vec<JobId> = memory
            .keys()
            .copied()
            .filter(|id| self.jobs.get(id).is_none_or(|j| j.state.is_final()))
            .collect();
        for job_id in ended {
            self.push_once(name, Command::Purge { job_id });
        }
        let node = self.nodes.get_mut(name).expect("caller checked the node");
        if node.checkpoints != memory {
            node.checkpoints = memory;
            self.dirty_node(name);
        }
        for (job_id, steps) in persisted {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                if job.persisted != steps {
                    job.persisted = steps;
                    self.dirty_jobs.insert(job_id);
                }
            }
        }
        for bad in &req.bad_checkpoints {
            let Some(job) = self.jobs.get_mut(&bad.job_id) else { continue };
            if job.bad_steps.insert(bad.step) {
                self.dirty_jobs.insert(bad.job_id);
                let message = format!(
                    "checkpoint of step {} failed verification; falling back to an older one",
                    bad.step
                );
                self.event(now_ms, Some(bad.job_id), Some(name), "checkpoint_corrupt", message);
            }
        }
    }

    /// The newest checkpoint every rank can start from: held in memory by a healthy node or
    /// persisted, and never seen corrupt.
    fn restore_point(&self, job: &Job) -> Option<RestoreSpec> {
        let in_memory = self
            .nodes
            .values()
            .filter(|n| n.health == Health::Healthy)
            .filter_map(|n| n.checkpoints.get(&job.id))
            .flat_map(|steps| steps.iter().copied());
        let step =
            in_memory.chain(job.persisted.iter().copied()).filter(|s| !job.bad_steps.contains(s)).max()?;
        let sources = self
            .nodes
            .values()
            .filter(|n| n.health == Health::Healthy)
            .filter(|n| n.checkpoints.get(&job.id).is_some_and(|s| s.contains(&step)))
            .map(|n| format!("http://{}:{}", n.addr, n.http_port))
            .collect();
        Some(RestoreSpec { step, sources, persisted: job.persisted.contains(&step) })
    }

    /// Marks a node's row as changed (without allocating when it already is).
    fn dirty_node(&mut self, name: &str) {
        if !self.dirty_nodes.contains(name) {
            self.dirty_nodes.insert(name.to_string());
        }
    }

    fn push_once(&mut self, name: &str, command: Command) {
        let node = self.nodes.get_mut(name).expect("caller checked the node");
        if !node.commands.iter().any(|c| c.command == command) {
            node.push(command);
            self.dirty_node(name);
        }
    }

    fn port_reserved(&mut self, node: &str, job_id: JobId, attempt: u32, port: u16, now_ms: u64) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(a) = job.attempt.as_mut() else { return };
        if a.number != attempt || a.outcome.is_some() || a.master_port.is_some() || a.nodes[0] != node {
            return;
        }
        a.master_port = Some(port);
        self.dirty_jobs.insert(job_id);
        let restore = self.restore_point(&self.jobs[&job_id]);
        let restore_step = restore.as_ref().map_or(0, |r| r.step);
        let job = self.jobs.get_mut(&job_id).expect("checked above");
        if let Some(p) = job.account.pending.as_mut() {
            p.restore_step = restore_step;
        }
        job.step = Some(restore_step);
        let job = &self.jobs[&job_id];
        let a = job.attempt.as_ref().expect("checked above");
        let launches: Vec<(String, LaunchSpec)> = a
            .nodes
            .iter()
            .enumerate()
            .map(|(group, n)| (n.clone(), self.launch_spec(job, a, group as u32, restore.clone())))
            .collect();
        for (n, spec) in launches {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.push(Command::Launch(spec));
                self.dirty_nodes.insert(n);
            }
        }
        self.event(
            now_ms,
            Some(job_id),
            Some(node),
            "launching",
            format!("attempt {attempt}: MASTER_PORT {port}, launching ranks"),
        );
    }

    /// torchrun's environment for every rank of group (node) `group`, plus Myriad's own.
    fn launch_spec(&self, job: &Job, a: &Attempt, group: u32, restore: Option<RestoreSpec>) -> LaunchSpec {
        let spec = &job.spec;
        let nproc = spec.ranks_per_node;
        let world = spec.world_size();
        let master = &self.nodes[&a.nodes[0]];
        let here = &self.nodes[&a.nodes[group as usize]];
        let omp = match spec.env.get("OMP_NUM_THREADS") {
            Some(v) => v.clone(),
            // torchrun's rule: one thread per rank when a node runs several; else the node's cores.
            None if nproc > 1 => "1".into(),
            None => here.cores.to_string(),
        };
        let run_id = spec.run_id.clone().unwrap_or_else(|| format!("myriad-{}", job.id));
        // RANK, LOCAL_RANK and ROLE_RANK, the only per-rank ones, come from LaunchSpec::rank_env.
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .filter(|(k, _)| *k != "OMP_NUM_THREADS")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut set = |k: &str, v: String| env.push((k.to_string(), v));
        set("WORLD_SIZE", world.to_string());
        set("LOCAL_WORLD_SIZE", nproc.to_string());
        set("GROUP_RANK", group.to_string());
        set("GROUP_WORLD_SIZE", spec.nodes.to_string());
        set("ROLE_NAME", "default".into());
        set("ROLE_WORLD_SIZE", world.to_string());
        set("MASTER_ADDR", master.addr.clone());
        set("MASTER_PORT", a.master_port.expect("launch follows the port").to_string());
        set("TORCHELASTIC_RESTART_COUNT", job.restarts.to_string());
        set("TORCHELASTIC_MAX_RESTARTS", spec.max_restarts.to_string());
        set("TORCHELASTIC_RUN_ID", run_id);
        // Rank 0 hosts the store itself on MASTER_PORT; the agent does not speak its protocol.
        set("TORCHELASTIC_USE_AGENT_STORE", "False".into());
        set("OMP_NUM_THREADS", omp);
        set("MYRIAD_JOB_ID", job.id.to_string());
        set("MYRIAD_ATTEMPT", a.number.to_string());
        // The buddy keeps a copy of the leader's in-memory checkpoints on another node: the next
        // node of the job, or for a one-node job any other healthy node.
        let buddy = if group == 0 {
            let other = a.nodes.get(1).and_then(|n| self.nodes.get(n)).or_else(|| {
                self.nodes.values().find(|n| n.health == Health::Healthy && n.name != a.nodes[0])
            });
            other.map(|n| format!("http://{}:{}", n.addr, n.http_port))
        } else {
            None
        };
        LaunchSpec {
            job_id: job.id,
            attempt: a.number,
            argv: spec.argv.clone(),
            workdir: spec.workdir.clone(),
            checkpoint_dir: spec.checkpoint_dir.clone().unwrap_or_else(|| format!("job-{}", job.id)),
            group_rank: group,
            ranks_per_node: nproc,
            env,
            restore,
            leader: group == 0,
            buddy,
            checkpoint_every: spec.checkpoint_every,
            persist_every: spec.persist_every,
        }
    }

    fn rank_report(&mut self, node: &str, r: &RankReport, now_ms: u64) {
        let (job_id, attempt, local_rank, state) = (r.job_id, r.attempt, r.local_rank, r.state);
        let (step, loss) = (r.step, r.loss);
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let nproc = job.spec.ranks_per_node;
        let Some(a) = job.attempt.as_mut() else { return };
        if a.number != attempt || local_rank >= nproc {
            return;
        }
        let Some(&group) = a.groups.get(node) else { return };
        let rank = group * nproc + local_rank;
        if rank == 0 && (step.is_some() && step != job.step || loss.is_some() && loss != job.loss) {
            job.step = step.or(job.step);
            job.loss = loss.or(job.loss);
            self.dirty_jobs.insert(job_id);
        }
        if rank == 0 {
            job.tokens_per_s = r.tokens_per_s.or(job.tokens_per_s);
            job.mfu = r.mfu.or(job.mfu);
            let submitted_ms = job.submitted_ms;
            // Agents repeat a rank's recent steps on every heartbeat: only new ones change the
            // ledger (and cost a write).
            if r.steps.iter().any(|s| !job.account.recent.contains_key(&s.step)) {
                self.dirty_jobs.insert(job_id);
                if let Some((message, data)) = job.account.record_steps(&r.steps, attempt, submitted_ms) {
                    self.event(now_ms, Some(job_id), None, "recovered", message);
                    self.events.last_mut().expect("just pushed").data = Some(data);
                }
            }
            let job = self.jobs.get_mut(&job_id).expect("looked up above");
            if let Some(step) = job.step {
                let ettr = ettr(job, now_ms);
                if job.history.record(now_ms, step, [job.loss, job.tokens_per_s, job.mfu, ettr]) {
                    self.dirty_jobs.insert(job_id);
                }
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(a) = job.attempt.as_mut() else { return };
        if let Some(ms) = r.compute_ms.filter(|ms| ms.is_finite() && *ms >= 0.0 && state.is_running()) {
            if a.compute_ms.len() != a.ranks.len() {
                a.compute_ms = vec![None; a.ranks.len()];
            }
            a.compute_ms[rank as usize] = Some(ms);
        }
        let slot = &mut a.ranks[rank as usize];
        if *slot == Some(state) {
            return;
        }
        let newly_exited =
            matches!(state, RankState::Exited { .. }) && !matches!(slot, Some(RankState::Exited { .. }));
        a.reported += slot.is_none() as u32;
        *slot = Some(state);
        self.dirty_jobs.insert(job_id);
        let all_reported = a.reported as usize == a.ranks.len();
        let ending = a.outcome.is_some();
        // Every rank has been seen (a fast one may be seen only once it has already exited).
        if all_reported && job.state == JobState::Starting && !ending {
            job.state = JobState::Running;
            self.event(
                now_ms,
                Some(job_id),
                None,
                "running",
                format!("attempt {attempt}: all ranks started"),
            );
        }
        if !newly_exited {
            return;
        }
        let RankState::Exited { code, signal } = state else { unreachable!() };
        let how = match (code, signal) {
            (_, Some(sig)) => format!("was killed by signal {sig}"),
            (Some(c), None) => format!("exited with code {c}"),
            (None, None) => "exited".to_string(),
        };
        if let Some(h) = &r.hang {
            let message = format!(
                "rank {rank} hung: no progress for {:.1} s (threshold {:.1} s); stack captured, killed",
                h.stalled_ms as f64 / 1e3,
                h.threshold_ms as f64 / 1e3
            );
            self.event(now_ms, Some(job_id), Some(node), "rank_hung", message);
            let data = serde_json::json!({"stalled_ms": h.stalled_ms, "phase": h.phase, "stack": h.stack});
            self.events.last_mut().expect("just pushed").data = Some(data);
        }
        if ending {
            // A rank exiting while its attempt is being stopped is expected (the stop itself, or a
            // peer failing a moment after the fault): no event per rank, which at 10,000 ranks
            // would be 10,000 rows per restart.
            // Peers of a dead rank fail a moment after it; whichever exit happened first (on the
            // agents' clocks) is the fault, whichever report arrived first.
            let exited_ms = r.exited_at_ms.unwrap_or(now_ms);
            let job = self.jobs.get_mut(&job_id).expect("checked above");
            if let Some(p) = job.account.pending.as_mut().filter(|p| p.attempt == attempt) {
                if exited_ms < p.fault_ms && !state.succeeded() {
                    p.cause = format!("rank {rank} on node {node} {how}");
                    p.kind = FaultKind::RankExit.as_str().to_string();
                    p.fault_ms = exited_ms;
                    job.reason = Some(p.cause.clone());
                }
            }
            return;
        }
        self.event(now_ms, Some(job_id), Some(node), "rank_exited", format!("rank {rank} {how}"));
        if !state.succeeded() {
            let reason = match &r.hang {
                Some(h) => format!(
                    "rank {rank} on node {node} hung: no progress for {:.1} s{}",
                    h.stalled_ms as f64 / 1e3,
                    h.phase.as_deref().map(|p| format!(" (in {p})")).unwrap_or_default()
                ),
                None => format!("rank {rank} on node {node} {how}"),
            };
            let exited_ms = r.exited_at_ms.unwrap_or(now_ms);
            let fault_ms = r.hang.as_ref().map_or(exited_ms, |h| exited_ms.saturating_sub(h.stalled_ms));
            // Hangs are unambiguous (the stopped or spinning rank is found first) and count
            // towards quarantine; a crash is not blamed, as its peers fail a moment later too.
            if r.hang.is_some() {
                self.blame(node, now_ms);
            }
            let kind = if r.hang.is_some() { FaultKind::Hang } else { FaultKind::RankExit };
            self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), fault_ms, now_ms);
            return;
        }
        let job = &self.jobs[&job_id];
        let a = job.attempt.as_ref().expect("checked above");
        if a.ranks.iter().all(|r| r.is_some_and(|s| s.succeeded())) {
            let reason = "every rank exited 0".to_string();
            self.end_attempt(job_id, attempt, Outcome::Succeed, (FaultKind::None, reason), now_ms, now_ms);
        }
    }

    /// Ends an attempt: records why, tells every node still running its ranks to stop. The job
    /// moves on in [`Core::maybe_finish_attempt`] once all its slots are released.
    /// `fault_ms` is when the fault happened as far as anyone can tell (a rank's exit, a node's
    /// last heartbeat, a hung rank's last progress); the gap to `now_ms` is detection time.
    fn end_attempt(
        &mut self,
        job_id: JobId,
        attempt: u32,
        outcome: Outcome,
        (kind, reason): (FaultKind, String),
        fault_ms: u64,
        now_ms: u64,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(a) = job.attempt.as_mut() else { return };
        if a.number != attempt {
            return;
        }
        // A fault found while the attempt is already ending (a lost node whose ranks' peers
        // failed first) is the cause if it happened earlier.
        if a.outcome.is_some() && matches!(outcome, Outcome::Restart | Outcome::Fail) {
            if let Some(p) =
                job.account.pending.as_mut().filter(|p| p.attempt == attempt && fault_ms < p.fault_ms)
            {
                p.cause = reason.clone();
                p.kind = kind.as_str().to_string();
                p.fault_ms = fault_ms;
                job.reason = Some(reason.clone());
                self.dirty_jobs.insert(job_id);
            }
        }
        let outcome = match (a.outcome, outcome) {
            (Some(_), Outcome::Cancel) => Outcome::Cancel,
            (Some(_), _) => return,
            (None, Outcome::Restart) if job.restarts >= job.spec.max_restarts => Outcome::Fail,
            (None, o) => o,
        };
        a.outcome = Some(outcome);
        // A failure while recovering from an earlier one (a restore that fails, a second fault)
        // extends that recovery: the original fault and its detection stand.
        if matches!(outcome, Outcome::Restart | Outcome::Fail) && job.account.pending.is_none() {
            job.account.faults += 1;
            job.account.pending = Some(PendingFault {
                attempt,
                cause: reason.clone(),
                kind: kind.as_str().to_string(),
                fault_ms: fault_ms.min(now_ms),
                detected_ms: now_ms,
                recompute_ms: 0.0,
                lost_steps: 0,
                restore_step: 0,
            });
        }
        if job.state != JobState::Queued {
            job.state = JobState::Stopping;
        }
        job.reason = Some(reason.clone());
        self.dirty_jobs.insert(job_id);
        let nodes = a.nodes.clone();
        let event_kind = match outcome {
            Outcome::Succeed => "attempt_succeeded",
            Outcome::Cancel => "cancelling",
            Outcome::Restart | Outcome::Fail => "attempt_failed",
        };
        self.event(now_ms, Some(job_id), None, event_kind, format!("attempt {attempt}: {reason}"));
        if matches!(outcome, Outcome::Restart | Outcome::Fail) {
            self.events.last_mut().expect("just pushed").data =
                Some(serde_json::json!({"cause": kind.as_str()}));
        }
        for n in nodes {
            let Some(node) = self.nodes.get_mut(&n) else { continue };
            if !node.holds(job_id, attempt) {
                continue;
            }
            // A launch already sent may be carried out before its acknowledgement arrives: it stays
            // queued, the Stop follows it, and the slots wait for the ranks to be reported gone.
            if outcome != Outcome::Succeed && node.health == Health::Healthy {
                self.push_once(&n, Command::Stop { job_id, attempt });
            }
            self.dirty_node(&n);
            self.try_release(&n, job_id, now_ms);
        }
        self.maybe_finish_attempt(job_id, now_ms);
    }

    /// Returns a node's slots for an ended attempt once none of its ranks can still be running:
    /// the node is lost, or its last report shows none running, its rank table shows none running,
    /// and no launch for the attempt waits undelivered.
    fn try_release(&mut self, name: &str, job_id: JobId, _now_ms: u64) {
        let job = self.jobs.get(&job_id);
        let current = job.and_then(|j| j.attempt.as_ref());
        let node = &self.nodes[name];
        let releasable: Vec<u32> = node
            .allocations
            .iter()
            .filter(|al| al.job_id == job_id)
            .map(|al| al.attempt)
            .filter(|&attempt| {
                let active = current.is_some_and(|a| a.number == attempt && a.outcome.is_none());
                if active {
                    return false;
                }
                if node.health == Health::Lost {
                    return true;
                }
                let table_running = match (job, current) {
                    (Some(job), Some(a)) if a.number == attempt => {
                        let nproc = job.spec.ranks_per_node as usize;
                        a.groups.get(name).is_some_and(|&g| {
                            let g = g as usize;
                            a.ranks[g * nproc..(g + 1) * nproc]
                                .iter()
                                .any(|r| r.is_some_and(|s| s.is_running()))
                        })
                    }
                    _ => false,
                };
                let reported = node.reported_running.get(&(job_id, attempt)).copied().unwrap_or(0);
                !table_running && reported == 0 && !node.has_unacked_launch(job_id, attempt)
            })
            .collect();
        for attempt in releasable {
            let node = self.nodes.get_mut(name).expect("exists");
            node.allocations.retain(|al| !(al.job_id == job_id && al.attempt == attempt));
            if node.health == Health::Healthy {
                node.push(Command::Forget { job_id, attempt });
            }
            self.dirty_node(name);
            self.released(name, job_id, attempt);
            self.schedule_due = true;
        }
    }

    /// Counts a node of `job_id`'s current attempt giving up its slots.
    fn released(&mut self, name: &str, job_id: JobId, attempt: u32) {
        let a = self.jobs.get_mut(&job_id).and_then(|j| j.attempt.as_mut());
        if let Some(a) = a.filter(|a| a.number == attempt && a.groups.contains_key(name)) {
            a.holders -= 1;
        }
    }

    /// Counts a node of `job_id`'s current attempt taking slots again (leftover ranks).
    fn acquired(&mut self, name: &str, job_id: JobId, attempt: u32) {
        let a = self.jobs.get_mut(&job_id).and_then(|j| j.attempt.as_mut());
        if let Some(a) = a.filter(|a| a.number == attempt && a.groups.contains_key(name)) {
            a.holders += 1;
        }
    }

    /// Once an ended attempt holds no slots anywhere, the job restarts, succeeds, fails or is
    /// cancelled.
    fn maybe_finish_attempt(&mut self, job_id: JobId, now_ms: u64) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        let Some(a) = job.attempt.as_ref() else { return };
        let Some(outcome) = a.outcome else { return };
        if job.state.is_final() || job.state == JobState::Queued {
            return;
        }
        if a.holders > 0 {
            return;
        }
        let job = self.jobs.get_mut(&job_id).expect("exists");
        let (state, kind) = match outcome {
            Outcome::Succeed => (JobState::Succeeded, "job_succeeded"),
            Outcome::Fail => (JobState::Failed, "job_failed"),
            Outcome::Cancel => (JobState::Cancelled, "job_cancelled"),
            Outcome::Restart => (JobState::Queued, "job_restarting"),
        };
        self.schedule_due = true;
        job.state = state;
        let message = match outcome {
            Outcome::Restart => {
                job.restarts += 1;
                format!(
                    "restart {} of {}: {}",
                    job.restarts,
                    job.spec.max_restarts,
                    job.reason.clone().unwrap_or_default()
                )
            }
            Outcome::Fail if job.spec.max_restarts > 0 => {
                format!(
                    "no restarts left ({} used): {}",
                    job.restarts,
                    job.reason.clone().unwrap_or_default()
                )
            }
            _ => job.reason.clone().unwrap_or_default(),
        };
        if state.is_final() {
            job.ended_ms = Some(now_ms);
        }
        self.dirty_jobs.insert(job_id);
        self.event(now_ms, Some(job_id), None, kind, message);
    }

    // ---------------------------------------------------------------- jobs

    /// Queues a job. Refuses one that no cluster of the registered nodes could ever hold.
    pub fn submit(&mut self, spec: JobSpec, now_ms: u64) -> Result<JobId, CoreError> {
        spec.validate().map_err(CoreError::Spec)?;
        let fits = |n: &&Node| n.slots >= spec.ranks_per_node;
        let regular = self.nodes.values().filter(|n| !n.spare).filter(fits).count() as u64;
        let spares = self.nodes.values().filter(|n| n.spare).filter(fits).count() as u64;
        let max_slots = self.nodes.values().map(|n| n.slots).max().unwrap_or(0);
        if spec.ranks_per_node > max_slots {
            let message =
                format!("{} ranks per node, but the largest node has {max_slots} slots", spec.ranks_per_node);
            // Well-formed, but this cluster cannot hold it: a conflict with its state (409).
            return Err(CoreError::Conflict(format!("ranks_per_node: {message}")));
        }
        let usable = regular + spares.min(spec.spares as u64);
        if spec.nodes as u64 > usable {
            let message = format!(
                "{} nodes of {} slots needed, but the cluster has {regular} such nodes and the job may use {} of its {spares} spares",
                spec.nodes,
                spec.ranks_per_node,
                spares.min(spec.spares as u64)
            );
            return Err(CoreError::Conflict(format!("nodes: {message}")));
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        let message =
            format!("{} submitted: {} nodes × {} ranks", spec.name, spec.nodes, spec.ranks_per_node);
        self.jobs.insert(
            id,
            Job {
                id,
                spec,
                state: JobState::Queued,
                submitted_ms: now_ms,
                ended_ms: None,
                restarts: 0,
                reason: None,
                attempt: None,
                placements: Vec::new(),
                placements_from: 0,
                step: None,
                loss: None,
                persisted: BTreeSet::new(),
                bad_steps: BTreeSet::new(),
                tokens_per_s: None,
                mfu: None,
                account: Account::default(),
                history: History::default(),
                evicted: BTreeSet::new(),
            },
        );
        self.dirty_jobs.insert(id);
        self.event(now_ms, Some(id), None, "submitted", message);
        self.schedule(now_ms);
        Ok(id)
    }

    pub fn cancel(&mut self, id: JobId, now_ms: u64) -> Result<(), CoreError> {
        let job = self.jobs.get_mut(&id).ok_or(CoreError::UnknownJob(id))?;
        if job.state.is_final() {
            return Err(CoreError::Conflict(format!("job {id} already ended ({})", job.state.as_str())));
        }
        if job.state == JobState::Queued {
            job.state = JobState::Cancelled;
            job.ended_ms = Some(now_ms);
            job.reason = Some("cancelled while queued".into());
            self.dirty_jobs.insert(id);
            self.event(now_ms, Some(id), None, "job_cancelled", "cancelled while queued".into());
            self.schedule(now_ms);
            return Ok(());
        }
        let attempt = job.attempt.as_ref().expect("a started job has an attempt").number;
        let reason = "cancelled by request".to_string();
        self.end_attempt(id, attempt, Outcome::Cancel, (FaultKind::None, reason), now_ms, now_ms);
        self.maybe_finish_attempt(id, now_ms);
        Ok(())
    }

    /// Time-driven decisions: lost nodes, launches that take too long, then scheduling.
    pub fn tick(&mut self, now_ms: u64) {
        let timeout_ms = (self.cfg.heartbeat_interval_ms * self.cfg.node_timeout_heartbeats as u64)
            .saturating_sub(2 * self.cfg.tick_ms);
        let silent: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                n.health == Health::Healthy && now_ms.saturating_sub(n.last_heartbeat_ms) > timeout_ms
            })
            .map(|n| n.name.clone())
            .collect();
        for name in silent {
            let node = self.nodes.get_mut(&name).expect("listed above");
            node.health = Health::Lost;
            let age_ms = now_ms - node.last_heartbeat_ms;
            let held: Vec<(JobId, u32)> = node.allocations.iter().map(|a| (a.job_id, a.attempt)).collect();
            self.dirty_nodes.insert(name.clone());
            self.event(
                now_ms,
                None,
                Some(&name),
                "node_lost",
                format!("node {name}: no heartbeat for {age_ms} ms"),
            );
            self.blame(&name, now_ms);
            for (job_id, attempt) in held {
                let reason = format!("node {name} was lost (no heartbeat for {age_ms} ms)");
                let kind = FaultKind::NodeLost;
                self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), now_ms - age_ms, now_ms);
                self.try_release(&name, job_id, now_ms);
                self.maybe_finish_attempt(job_id, now_ms);
            }
        }
        let late: Vec<(JobId, u32)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Starting)
            .filter_map(|j| j.attempt.as_ref().map(|a| (j.id, a)))
            .filter(|(_, a)| {
                a.outcome.is_none() && now_ms.saturating_sub(a.started_ms) > self.cfg.launch_timeout_ms
            })
            .map(|(id, a)| (id, a.number))
            .collect();
        for (job_id, attempt) in late {
            let reason = format!("ranks did not all start within {} ms", self.cfg.launch_timeout_ms);
            let kind = FaultKind::LaunchTimeout;
            self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), now_ms, now_ms);
            self.maybe_finish_attempt(job_id, now_ms);
        }
        self.find_stragglers(now_ms);
        self.schedule(now_ms);
    }

    /// Running jobs whose check is due: a rank computing `straggler_margin` above the job's
    /// median is reported once per attempt. All ranks of a synchronous job take equally long per
    /// step (the fast ones wait for the slow one), so it is compute time that tells them apart.
    /// One still straggling after `straggler_evict_checks` checks in a row has its node swapped
    /// for a spare, when the job may use one, one is free and a restart is left.
    fn find_stragglers(&mut self, now_ms: u64) {
        let (margin, every_ms) = (self.cfg.straggler_margin, self.cfg.straggler_check_ms);
        let evict_after = self.cfg.straggler_evict_checks;
        let mut found: Vec<(JobId, u32, String, f64, f64)> = Vec::new();
        let mut persistent: Vec<(JobId, u32, u32, String, f64, f64)> = Vec::new();
        for job in self.jobs.values_mut().filter(|j| j.state == JobState::Running) {
            let Some(a) = job.attempt.as_mut() else { continue };
            if now_ms.saturating_sub(a.straggler_checked_ms) < every_ms {
                continue;
            }
            a.straggler_checked_ms = now_ms;
            let mut known: Vec<f64> = a.compute_ms.iter().flatten().copied().collect();
            // Half the ranks at least, so the median is the job's and not the straggler's.
            if known.len() < 2 || known.len() * 2 < a.ranks.len() {
                continue;
            }
            known.sort_by(f64::total_cmp);
            // The lower median: of two ranks, the faster one is the yardstick.
            let median = known[(known.len() - 1) / 2];
            let nproc = job.spec.ranks_per_node as usize;
            let mut checks = BTreeMap::new();
            for (rank, ms) in a.compute_ms.iter().enumerate() {
                let Some(ms) = *ms else { continue };
                if ms <= median * (1.0 + margin) {
                    continue;
                }
                let rank = rank as u32;
                let node = a.nodes[rank as usize / nproc].clone();
                let n = a.straggling_checks.get(&rank).map_or(1, |n| n + 1);
                checks.insert(rank, n);
                if a.stragglers.insert(rank) {
                    found.push((job.id, rank, node.clone(), ms, median));
                }
                if evict_after > 0 && n >= evict_after {
                    persistent.push((job.id, a.number, rank, node, ms, median));
                }
            }
            // A rank back within the margin starts counting afresh.
            a.straggling_checks = checks;
        }
        for (job_id, rank, node, ms, median) in found {
            self.dirty_jobs.insert(job_id);
            let message = format!(
                "rank {rank} on node {node} straggles: {ms:.0} ms of compute per step against the job's median {median:.0} ms (+{:.0}%)",
                (ms / median - 1.0) * 100.0
            );
            self.event(now_ms, Some(job_id), Some(&node), "straggler", message);
            let data = serde_json::json!({"rank": rank, "compute_ms": ms, "median_ms": median});
            self.events.last_mut().expect("just pushed").data = Some(data);
        }
        for (job_id, attempt, rank, node, ms, median) in persistent {
            if !self.spare_for(job_id) {
                continue;
            }
            let job = self.jobs.get_mut(&job_id).expect("found above");
            if job.attempt.as_ref().is_none_or(|a| a.outcome.is_some() || a.number != attempt) {
                continue; // one eviction per attempt
            }
            job.evicted.insert(node.clone());
            let reason = format!(
                "rank {rank} on node {node} straggled at {evict_after} checks in a row, {} s apart ({ms:.0} ms of \
                 compute per step against {median:.0} ms): node evicted for a spare",
                every_ms / 1000
            );
            self.end_attempt(
                job_id,
                attempt,
                Outcome::Restart,
                (FaultKind::Straggler, reason),
                now_ms,
                now_ms,
            );
            self.maybe_finish_attempt(job_id, now_ms);
        }
    }

    /// Whether evicting a node of `job_id` leaves it somewhere to go: a restart left, a spare
    /// it may still use, and a spare free for it.
    fn spare_for(&self, job_id: JobId) -> bool {
        let Some(job) = self.jobs.get(&job_id) else { return false };
        let Some(a) = job.attempt.as_ref() else { return false };
        let spares_used = a.nodes.iter().filter(|n| self.nodes.get(*n).is_some_and(|n| n.spare)).count();
        job.restarts < job.spec.max_restarts
            && spares_used < job.spec.spares as usize
            && self
                .nodes
                .values()
                .any(|n| n.spare && n.has_room(job.spec.ranks_per_node) && !job.evicted.contains(&n.name))
    }

    /// Gang scheduling, first come first served: the oldest queued job starts when enough healthy
    /// nodes have the free slots for all its ranks at once; younger jobs wait behind it so a large
    /// job is never starved by small ones.
    fn schedule(&mut self, now_ms: u64) {
        self.schedule_due = false;
        let queued: Vec<JobId> =
            self.jobs.values().filter(|j| j.state == JobState::Queued).map(|j| j.id).collect();
        for job_id in queued {
            let job = &self.jobs[&job_id];
            let (need, per_node) = (job.spec.nodes as usize, job.spec.ranks_per_node);
            let mut spares_left = job.spec.spares as usize;
            let free = |n: &Node| n.has_room(per_node);
            // A restart goes back to the nodes it ran on (their memory holds its checkpoints), each
            // in its old group rank; only the missing ones are replaced, regular nodes first.
            let mut slots: Vec<Option<String>> = vec![None; need];
            if let Some(previous) = job.placements.last() {
                for (slot, name) in slots.iter_mut().zip(previous) {
                    let back =
                        |n: &&Node| free(n) && (!n.spare || spares_left > 0) && !job.evicted.contains(name);
                    if let Some(n) = self.nodes.get(name).filter(back) {
                        spares_left -= n.spare as usize;
                        *slot = Some(n.name.clone());
                    }
                }
            }
            let mut taken: HashSet<String> = slots.iter().flatten().cloned().collect();
            let mut holes = (0..need).filter(|&i| slots[i].is_none()).collect::<Vec<usize>>().into_iter();
            let mut hole = holes.next();
            // Regular nodes, then spares; nodes evicted from this job for straggling only when
            // nothing else is free (slow beats stuck in the queue).
            for (spare, evicted) in [(false, false), (true, false), (false, true), (true, true)] {
                let candidate =
                    |n: &&Node| n.spare == spare && free(n) && job.evicted.contains(&n.name) == evicted;
                for n in self.nodes.values().filter(candidate) {
                    let Some(i) = hole else { break };
                    if !taken.contains(&n.name) && (!spare || spares_left > 0) {
                        spares_left -= spare as usize;
                        taken.insert(n.name.clone());
                        slots[i] = Some(n.name.clone());
                        hole = holes.next();
                    }
                }
            }
            let Some(chosen) = slots.into_iter().collect::<Option<Vec<String>>>() else { return };
            self.start_attempt(job_id, chosen, now_ms);
        }
    }

    fn start_attempt(&mut self, job_id: JobId, nodes: Vec<String>, now_ms: u64) {
        let job = self.jobs.get_mut(&job_id).expect("queued job exists");
        let number = job.restarts;
        let per_node = job.spec.ranks_per_node;
        job.state = JobState::Starting;
        job.attempt = Some(Attempt {
            number,
            nodes: nodes.clone(),
            master_port: None,
            started_ms: now_ms,
            ranks: vec![None; job.spec.world_size() as usize],
            outcome: None,
            groups: group_index(&nodes),
            reported: 0,
            // Every node is given its slots just below.
            holders: nodes.len() as u32,
            compute_ms: Vec::new(),
            stragglers: BTreeSet::new(),
            straggler_checked_ms: now_ms,
            straggling_checks: BTreeMap::new(),
        });
        job.placements.push(nodes.clone());
        if job.placements.len() > PLACEMENTS_KEPT {
            job.placements.remove(0);
            job.placements_from += 1;
        }
        self.dirty_jobs.insert(job_id);
        for n in &nodes {
            let node = self.nodes.get_mut(n).expect("chosen from the map");
            node.allocations.push(Allocation { job_id, attempt: number, slots: per_node });
            self.dirty_node(n);
        }
        self.nodes.get_mut(&nodes[0]).expect("chosen").push(Command::ReservePort { job_id, attempt: number });
        self.event(
            now_ms,
            Some(job_id),
            None,
            "scheduled",
            format!("attempt {number} on {}", node_list(&nodes)),
        );
    }

    // ---------------------------------------------------------------- views

    /// Where every rank of a launched attempt runs. Only the current attempt has one, and only
    /// once its MASTER_PORT is known.
    pub fn peer_table(&self, job_id: JobId, attempt: u32) -> Result<PeerTable, CoreError> {
        let job = self.jobs.get(&job_id).ok_or(CoreError::UnknownJob(job_id))?;
        let current = job.attempt.as_ref().filter(|a| a.number == attempt);
        let Some(a) = current else {
            let latest = job.attempt.as_ref().map_or("none".to_string(), |a| a.number.to_string());
            return Err(CoreError::Conflict(format!(
                "job {job_id} has no attempt {attempt} in progress (current attempt: {latest})"
            )));
        };
        let Some(master_port) = a.master_port else {
            return Err(CoreError::Conflict(format!(
                "attempt {attempt} of job {job_id} is not launched yet (no MASTER_PORT)"
            )));
        };
        let hosts: Vec<String> =
            a.nodes.iter().map(|n| self.nodes.get(n).map_or_else(String::new, |n| n.addr.clone())).collect();
        Ok(PeerTable {
            job_id,
            attempt,
            world_size: job.spec.world_size(),
            ranks_per_node: job.spec.ranks_per_node,
            master_addr: hosts[0].clone(),
            master_port,
            hosts,
        })
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn job_series(&self, id: JobId) -> Option<JobSeries> {
        let job = self.jobs.get(&id)?;
        Some(JobSeries { job_id: id, every_ms: job.history.every_ms, points: job.history.points().collect() })
    }

    pub fn job_view(&self, id: JobId, now_ms: u64) -> Option<JobView> {
        let job = self.jobs.get(&id)?;
        let a = job.attempt.as_ref();
        let count = |f: fn(&RankState) -> bool| {
            a.map_or(0, |a| a.ranks.iter().flatten().filter(|s| f(s)).count() as u32)
        };
        Some(JobView {
            id,
            name: job.spec.name.clone(),
            state: job.state.as_str().to_string(),
            spec: job.spec.clone(),
            attempt: a.map_or(0, |a| a.number),
            restarts: job.restarts,
            nodes: a.map(|a| a.nodes.clone()).unwrap_or_default(),
            world_size: job.spec.world_size(),
            ranks_running: count(RankState::is_running),
            ranks_exited: count(|s| !s.is_running()),
            step: job.step,
            loss: job.loss,
            master_port: a.and_then(|a| a.master_port),
            submitted_ms: job.submitted_ms,
            ended_ms: job.ended_ms,
            reason: job.reason.clone(),
            tokens_per_s: job.tokens_per_s,
            mfu: job.mfu,
            ettr: ettr(job, now_ms),
            time: TimeAccount {
                wall_ms: job.ended_ms.unwrap_or(now_ms).saturating_sub(job.submitted_ms),
                committed_ms: job.account.committed_ms(),
                startup_ms: job.account.startup_ms.unwrap_or(0.0),
                detection_ms: job.account.detection_ms,
                restart_ms: job.account.restart_ms,
                recompute_ms: job.account.recompute_ms,
            },
            faults: job.account.faults,
        })
    }

    pub fn node_views(&self, now_ms: u64) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| NodeView {
                name: n.name.clone(),
                health: match n.health {
                    Health::Healthy if n.quarantined => "quarantined".into(),
                    Health::Healthy => "healthy".into(),
                    Health::Lost => "lost".into(),
                },
                spare: n.spare,
                slots: n.slots,
                slots_used: n.slots_used(),
                addr: n.addr.clone(),
                http_port: n.http_port,
                heartbeat_age_ms: Some(now_ms.saturating_sub(n.last_heartbeat_ms)),
                jobs: n.allocations.iter().map(|a| a.job_id).collect(),
            })
            .collect()
    }

    /// Where a rank's logs live: its node and local rank in the given (default: current) attempt.
    pub fn locate_rank(
        &self,
        id: JobId,
        rank: u32,
        attempt: Option<u32>,
    ) -> Result<(&Node, u32, u32), CoreError> {
        let job = self.jobs.get(&id).ok_or(CoreError::UnknownJob(id))?;
        let a = job
            .attempt
            .as_ref()
            .ok_or_else(|| CoreError::Conflict(format!("job {id} has not started yet")))?;
        let number = attempt.unwrap_or(a.number);
        if number > a.number {
            return Err(CoreError::Conflict(format!(
                "job {id} has no attempt {number} (latest is {})",
                a.number
            )));
        }
        if rank >= job.spec.world_size() {
            return Err(CoreError::Conflict(format!(
                "job {id} has {} ranks; rank {rank} does not exist",
                job.spec.world_size()
            )));
        }
        let group = (rank / job.spec.ranks_per_node) as usize;
        let Some(placement) =
            number.checked_sub(job.placements_from).and_then(|i| job.placements.get(i as usize))
        else {
            return Err(CoreError::Conflict(format!(
                "job {id}: attempt {number} is too old; the controller keeps the nodes of the last {PLACEMENTS_KEPT} attempts"
            )));
        };
        let name = &placement[group];
        let node = self.nodes.get(name).ok_or_else(|| CoreError::UnknownNode(name.clone()))?;
        Ok((node, number, rank % job.spec.ranks_per_node))
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
