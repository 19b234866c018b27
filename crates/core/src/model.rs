//! The state the core keeps: its configuration, nodes with their allocations and queued commands,
//! jobs and their attempts, and the derived indexes an attempt carries.

use crate::*;

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
    /// The circuit breaker on node losses: when more than this share of the healthy nodes (and
    /// at least `loss_breaker_min_nodes`) are silent at once, none is declared lost. So many
    /// nodes do not fail together; the controller's own network or host has (Kubernetes' node
    /// controller stops evicting in a zone the same way).
    pub loss_breaker_fraction: f64,
    pub loss_breaker_min_nodes: usize,
    /// The fencing lease, in heartbeat intervals: an agent that has not reached the controller
    /// for this long kills its ranks (it measures from the sending of its last answered
    /// heartbeat, so it acts no later than the controller's view of its silence). The controller
    /// relaunches a lost node's work only once that lease (and an interval's margin) has run
    /// out, or once a rank of the same attempt on a node it still hears from has exited (an
    /// attempt trains only with all of its ranks: one gone, the rest cannot finish a step).
    /// Longer than any pause or partition the controller rides out without a restart (three node
    /// timeouts); 0 turns fencing off.
    pub fence_lease_heartbeats: u32,
    /// The key each attempt's MYRIAD_COMM_SECRET is derived from: random, from the edge, for a
    /// real controller (the core has no randomness of its own).
    pub comm_secret_key: [u8; 32],
}

impl CoreConfig {
    /// The agents' fencing lease (0: none).
    pub fn lease_ms(&self) -> u64 {
        self.heartbeat_interval_ms * self.fence_lease_heartbeats as u64
    }

    /// How long after a lost node's last heartbeat its ranks are surely gone: the lease, and an
    /// interval and a tick for the kill and the clocks' drift. 0 when fencing is off.
    pub fn fenced_after_ms(&self) -> u64 {
        match self.lease_ms() {
            0 => 0,
            lease => lease + self.heartbeat_interval_ms + self.tick_ms,
        }
    }
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
            loss_breaker_fraction: 0.5,
            loss_breaker_min_nodes: 2,
            fence_lease_heartbeats: 15,
            comm_secret_key: [0; 32],
        }
    }
}

/// A node's place in the core's tables: given at its first registration, in order, and never
/// reused (nodes are not forgotten). Persisted with the node's row and in the jobs' rows, so a
/// restarted controller finds every node where it was. Inside the core every per-node lookup is an
/// index, not a string comparison: a restart of 12,500 nodes touches each node a few times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A command queued for a node. A launch is kept as its attempt's shared plan and the node's
/// place in it until a reply is written: the 20-odd variables of torchrun's environment are built
/// once per attempt, not once per node (at 12,500 nodes, 250,000 strings per restart).
#[derive(Clone, Debug, PartialEq)]
pub enum Queued {
    /// A command as the wire has it (every kind; a launch restored from a persisted row too).
    Command(Command),
    Launch {
        plan: Arc<LaunchPlan>,
        group: u32,
        cores: u32,
    },
}

/// A queued command and its sequence number. Persisted as the wire's [`SeqCommand`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "SeqCommand", from = "SeqCommand")]
pub struct QueuedCommand {
    pub seq: u64,
    pub command: Queued,
}

impl QueuedCommand {
    /// The command as an agent receives it.
    pub fn to_wire(&self) -> SeqCommand {
        let command = match &self.command {
            Queued::Command(c) => c.clone(),
            Queued::Launch { plan, group, cores } => Command::Launch(Box::new(plan.spec(*group, *cores))),
        };
        SeqCommand { seq: self.seq, command }
    }

    /// The job and attempt a launch is for.
    pub fn launch_of(&self) -> Option<(JobId, u32)> {
        match &self.command {
            Queued::Command(Command::Launch(l)) => Some((l.job_id, l.attempt)),
            Queued::Launch { plan, .. } => Some((plan.job_id, plan.attempt)),
            Queued::Command(_) => None,
        }
    }
}

impl From<QueuedCommand> for SeqCommand {
    fn from(c: QueuedCommand) -> SeqCommand {
        c.to_wire()
    }
}

impl From<SeqCommand> for QueuedCommand {
    fn from(c: SeqCommand) -> QueuedCommand {
        QueuedCommand { seq: c.seq, command: Queued::Command(c.command) }
    }
}

/// What every node of an attempt is launched with: all of [`LaunchSpec`] but the node's group
/// rank and, when the job leaves it to torchrun's rule, its OMP_NUM_THREADS.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchPlan {
    pub job_id: JobId,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub workdir: Option<String>,
    pub checkpoint_dir: String,
    pub ranks_per_node: u32,
    /// The job's own variables (OMP_NUM_THREADS aside), before Myriad's.
    pub job_env: Vec<(String, String)>,
    /// Myriad's variables; `group_rank` and `omp_num_threads` are each node's.
    pub node_env: NodeEnv,
    /// OMP_NUM_THREADS for every node, when the job sets it or a node runs several ranks; else
    /// each node's core count.
    pub omp_num_threads: Option<String>,
    pub restore: Option<RestoreSpec>,
    /// The agent keeping a copy of the leader's (group 0's) in-memory checkpoints.
    pub buddy: Option<String>,
    pub checkpoint_every: u64,
    pub persist_every: u64,
}

impl LaunchPlan {
    /// The launch of group `group`, on a node with `cores` cores.
    pub fn spec(&self, group: u32, cores: u32) -> LaunchSpec {
        let mut node_env = self.node_env.clone();
        node_env.group_rank = group;
        node_env.omp_num_threads = self.omp_num_threads.clone().unwrap_or_else(|| cores.to_string());
        let mut env = self.job_env.clone();
        env.extend(node_env.vars());
        LaunchSpec {
            job_id: self.job_id,
            attempt: self.attempt,
            argv: self.argv.clone(),
            workdir: self.workdir.clone(),
            checkpoint_dir: self.checkpoint_dir.clone(),
            group_rank: group,
            ranks_per_node: self.ranks_per_node,
            env,
            restore: self.restore.clone(),
            leader: group == 0,
            buddy: if group == 0 { self.buddy.clone() } else { None },
            checkpoint_every: self.checkpoint_every,
            persist_every: self.persist_every,
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
    pub id: NodeId,
    pub name: String,
    pub slots: u32,
    pub cores: u32,
    pub addr: String,
    pub http_port: u16,
    pub spare: bool,
    pub health: Health,
    pub allocations: Vec<Allocation>,
    /// Commands not yet acknowledged, oldest first.
    pub commands: VecDeque<QueuedCommand>,
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
    /// The node's GPUs and driver, as its agent registered them.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    #[serde(default)]
    pub driver: Option<String>,
    /// What the GPU health checks found in the node's last report. A fatal finding keeps the
    /// node out of scheduling (persisted: a restarted controller keeps it out too).
    #[serde(default)]
    pub gpu_findings: Vec<GpuFinding>,
    /// Not persisted: a restarted controller gives every node a fresh grace period.
    #[serde(skip)]
    pub last_heartbeat_ms: u64,
    /// Ranks still running per (job, attempt) in the node's last heartbeat (a list of a few:
    /// refilled in place on every heartbeat).
    #[serde(skip)]
    pub reported_running: Vec<((JobId, u32), u32)>,
}

impl Node {
    pub(crate) fn slots_used(&self) -> u32 {
        self.allocations.iter().map(|a| a.slots).sum()
    }

    /// Healthy, not quarantined, every GPU passing its checks, with `slots` free.
    pub(crate) fn has_room(&self, slots: u32) -> bool {
        self.health == Health::Healthy
            && !self.quarantined
            && !self.gpu_failed()
            && self.slots.saturating_sub(self.slots_used()) >= slots
    }

    /// A GPU of the node failed a health check.
    pub fn gpu_failed(&self) -> bool {
        self.gpu_findings.iter().any(|f| f.fatal)
    }

    pub(crate) fn holds(&self, job_id: JobId, attempt: u32) -> bool {
        self.allocations.iter().any(|a| a.job_id == job_id && a.attempt == attempt)
    }

    /// Queues a command; [`Core::command`] is the one caller, so the core knows who has news.
    pub(crate) fn push(&mut self, command: Queued) {
        self.next_command_seq += 1;
        self.commands.push_back(QueuedCommand { seq: self.next_command_seq, command });
    }

    pub(crate) fn has_unacked_launch(&self, job_id: JobId, attempt: u32) -> bool {
        self.commands.iter().any(|c| c.launch_of() == Some((job_id, attempt)))
    }

    /// Ranks still running of an attempt in the node's last heartbeat.
    pub(crate) fn reported(&self, job_id: JobId, attempt: u32) -> u32 {
        self.reported_running.iter().find(|(k, _)| *k == (job_id, attempt)).map_or(0, |&(_, n)| n)
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
    pub nodes: Vec<NodeId>,
    pub master_port: Option<u16>,
    pub started_ms: u64,
    /// Last reported state of every global rank; None until its node reports it. Not persisted:
    /// every agent reports all of its ranks again to a restarted controller, and at 100,000
    /// ranks the table was 2.4 MB of JSON in the job's row, rewritten with every step rank 0
    /// reported.
    #[serde(skip_serializing, default)]
    pub ranks: Vec<Option<RankState>>,
    /// Set when the attempt ends; the job moves on once every node released its slots.
    pub outcome: Option<Outcome>,
    /// Derived indexes (rebuilt on restore) that keep a heartbeat's work independent of the
    /// job's size: each node's group rank by [`NodeId`] ([`NOT_IN_ATTEMPT`] for the others, and
    /// shorter than the node table when nodes joined later), how many ranks have reported, how
    /// many of `nodes` still hold slots for this attempt.
    #[serde(skip)]
    pub groups: Vec<u32>,
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
    /// A rank of the attempt was reported exited (by a node heartbeating, so a node still heard
    /// from): its ranks on lost nodes can finish no step, they are fenced. Not persisted: a
    /// restarted controller waits out the leases instead.
    #[serde(skip)]
    pub rank_exited: bool,
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
    pub placements: Vec<Vec<NodeId>>,
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
    pub evicted: BTreeSet<NodeId>,
}

impl Attempt {
    /// The group rank of `node` in this attempt.
    pub fn group_of(&self, node: NodeId) -> Option<u32> {
        self.groups.get(node.index()).copied().filter(|&g| g != NOT_IN_ATTEMPT)
    }
}

/// [`Attempt::groups`] of a node the attempt does not run on.
pub const NOT_IN_ATTEMPT: u32 = u32::MAX;

/// Placements kept per job (the newest attempts').
pub const PLACEMENTS_KEPT: usize = 16;

/// Rebuilds an attempt's derived indexes from its node list, rank table and the nodes' slots.
pub(crate) fn index_attempt(a: &mut Attempt, job_id: JobId, world_size: u32, nodes: &[Node]) {
    a.ranks.resize(world_size as usize, None);
    a.groups = group_index(&a.nodes);
    a.reported = a.ranks.iter().filter(|r| r.is_some()).count() as u32;
    a.holders = a
        .nodes
        .iter()
        .filter(|n| nodes.get(n.index()).is_some_and(|node| node.holds(job_id, a.number)))
        .count() as u32;
}

/// Names for an event: all of a small job's nodes; the first few of a large one and a count (its
/// full placement is in the job's view), so one event is not 15 KB at 1,250 nodes.
pub(crate) fn node_list(table: &[Node], nodes: &[NodeId]) -> String {
    const SHOWN: usize = 8;
    let names =
        |ids: &[NodeId]| ids.iter().map(|n| table[n.index()].name.as_str()).collect::<Vec<_>>().join(", ");
    if nodes.len() <= SHOWN {
        return names(nodes);
    }
    format!("{}, … and {} more ({} nodes)", names(&nodes[..SHOWN]), nodes.len() - SHOWN, nodes.len())
}

/// Each node's group rank, by [`NodeId`]: its position in the attempt's node list.
pub(crate) fn group_index(nodes: &[NodeId]) -> Vec<u32> {
    let len = nodes.iter().map(|n| n.index() + 1).max().unwrap_or(0);
    let mut groups = vec![NOT_IN_ATTEMPT; len];
    for (g, n) in nodes.iter().enumerate() {
        groups[n.index()] = g as u32;
    }
    groups
}
