//! The controller's decisions, with no IO: nodes, jobs, gang scheduling, the torchrun environment,
//! failure handling and timeouts. Time comes in as `now_ms` on every call; what changed comes out
//! through [`Core::take_changes`] for the edge to persist. The same core runs under the HTTP server
//! (`control`) and under the simulator's clock (`sim`): this crate depends on the contracts and
//! serde alone, so it cannot do IO even by accident.
//!
//! Life of a job: `queued` → (all its nodes free) `starting`: rank 0's node reserves a port for the
//! store → every node launches its ranks → `running` once every rank has reported → `succeeded`
//! when every rank exits 0. A rank exiting non-zero, a lost node or a launch that does not finish
//! in time ends the attempt: its ranks are stopped, their slots return only once every node has
//! confirmed them gone, then the job restarts (new attempt, new MASTER_PORT) if restarts are left,
//! else it fails. Cancelling follows the same path.

mod history;
mod ledger;
mod model;
mod nodes;
mod recovery;
mod schedule;
mod stragglers;
mod views;

pub use history::*;
pub use ledger::*;
pub use model::*;
pub use recovery::FaultKind;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use proto::api::{
    Command, Event, GpuFinding, GpuInfo, HeartbeatReply, HeartbeatRequest, JobId, JobSeries, JobView,
    LaunchSpec, NodeView, PeerTable, RankReport, RankState, RegisterReply, RegisterRequest, RestoreSpec,
    SeqCommand, SeriesPoint, StepTime, Tier, TimeAccount,
};
use proto::env::NodeEnv;
use proto::events::EventKind;
use proto::spec::{validate_name, JobSpec, SpecError};

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
    /// The nodes among `nodes` given new commands.
    pub commanded: Vec<NodeId>,
    pub events: Vec<Event>,
    pub next_job_id: u64,
    pub next_event_seq: u64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.nodes.is_empty() && self.events.is_empty()
    }
}

pub struct Core {
    cfg: CoreConfig,
    /// Every node, by [`NodeId`].
    nodes: Vec<Node>,
    ids: HashMap<String, NodeId>,
    /// Every node in name order: scheduling, restore sources and views go through the nodes
    /// in this order, as they did when nodes were kept by name.
    by_name: Vec<NodeId>,
    jobs: BTreeMap<JobId, Job>,
    next_job_id: u64,
    next_event_seq: u64,
    dirty_jobs: BTreeSet<JobId>,
    /// Nodes changed since the last take, in the order they changed, and the same as a flag per
    /// node (so marking one is an index, not a set insert).
    dirty_nodes: Vec<NodeId>,
    node_dirty: Vec<bool>,
    /// Nodes given new commands since the last take (a subset of the changed ones): the edge
    /// rings their doorbells, the simulator's agents carry them out.
    commanded: Vec<NodeId>,
    node_commanded: Vec<bool>,
    events: Vec<Event>,
    /// Something happened that may let a queued job start (slots freed, a node back, a job
    /// requeued). Heartbeats schedule only then: with a job waiting, a scan of every node on
    /// every heartbeat is quadratic per round at 1,250 nodes. `tick` schedules regardless.
    schedule_due: bool,
    /// Jobs whose attempt just saw its first rank exit: their lost nodes are fenced now.
    exit_fenced: Vec<JobId>,
    /// A heartbeat's jobs to move on, kept between heartbeats for its room.
    touched: Vec<JobId>,
    /// Node losses are held back: too many nodes went silent at once.
    breaker_open: bool,
    /// Times the edge found the controller had not run (paused, stalled) and granted every node
    /// a fresh grace period.
    stalls: u64,
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
        let mut nodes = nodes;
        // Rows come in any order; a node's id is its place in the table.
        nodes.sort_by_key(|n| n.id);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.last_heartbeat_ms = now_ms;
            assert_eq!(n.id.index(), i, "node {} has id {} in a table of {} nodes", n.name, n.id.0, i);
        }
        let ids = nodes.iter().map(|n| (n.name.clone(), n.id)).collect();
        let mut by_name: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        by_name.sort_by(|a, b| nodes[a.index()].name.cmp(&nodes[b.index()].name));
        let (node_dirty, node_commanded) = (vec![false; nodes.len()], vec![false; nodes.len()]);
        let jobs = jobs
            .into_iter()
            .map(|mut j| {
                if let Some(a) = j.attempt.as_mut() {
                    index_attempt(a, j.id, j.spec.world_size(), &nodes);
                }
                (j.id, j)
            })
            .collect();
        Core {
            cfg,
            nodes,
            ids,
            by_name,
            jobs,
            next_job_id,
            next_event_seq,
            dirty_jobs: BTreeSet::new(),
            dirty_nodes: Vec::new(),
            node_dirty,
            commanded: Vec::new(),
            node_commanded,
            events: Vec::new(),
            schedule_due: false,
            exit_fenced: Vec::new(),
            touched: Vec::new(),
            breaker_open: false,
            stalls: 0,
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
        let nodes = self.take_dirty_nodes().into_iter().map(|n| self.nodes[n.index()].clone()).collect();
        Changes {
            jobs,
            nodes,
            commanded: self.take_commanded_nodes(),
            events: std::mem::take(&mut self.events),
            next_job_id: self.next_job_id,
            next_event_seq: self.next_event_seq,
        }
    }

    /// Records an event: the core's own decisions, and faults injected on purpose from outside.
    pub fn event(
        &mut self,
        now_ms: u64,
        job_id: Option<JobId>,
        node: Option<&str>,
        kind: EventKind,
        message: String,
    ) {
        self.events.push(Event {
            seq: self.next_event_seq,
            time_ms: now_ms,
            job_id,
            node: node.map(str::to_string),
            kind: kind.as_str().to_string(),
            message,
            data: None,
        });
        self.next_event_seq += 1;
    }

    /// For a caller that keeps no copy of the state (the simulator): which nodes were given new
    /// commands since the last call, and the events, without cloning any row.
    pub fn take_commanded(&mut self) -> (Vec<NodeId>, Vec<Event>) {
        self.dirty_jobs.clear();
        self.take_dirty_nodes();
        (self.take_commanded_nodes(), std::mem::take(&mut self.events))
    }

    fn take_dirty_nodes(&mut self) -> Vec<NodeId> {
        for n in &self.dirty_nodes {
            self.node_dirty[n.index()] = false;
        }
        std::mem::take(&mut self.dirty_nodes)
    }

    fn take_commanded_nodes(&mut self) -> Vec<NodeId> {
        for n in &self.commanded {
            self.node_commanded[n.index()] = false;
        }
        std::mem::take(&mut self.commanded)
    }

    /// Panics unless the derived indexes agree with the state they summarise. The tests and the
    /// simulator's checked mode call it after every step; it is too slow for every call of a
    /// large cluster's controller.
    pub fn check_invariants(&self) {
        // The node tables: each node at its id, found by its name, once in name order.
        assert_eq!(
            (self.ids.len(), self.by_name.len(), self.node_dirty.len()),
            (self.nodes.len(), self.nodes.len(), self.nodes.len()),
            "node tables' sizes"
        );
        for (i, n) in self.nodes.iter().enumerate() {
            assert_eq!(n.id.index(), i, "node {} at index {i}", n.name);
            assert_eq!(self.ids.get(&n.name), Some(&n.id), "id of node {}", n.name);
        }
        let in_order = self.by_name.windows(2).all(|w| self.name(w[0]) < self.name(w[1]));
        assert!(in_order, "nodes in name order");
        let mut flagged: Vec<NodeId> =
            (0..self.nodes.len() as u32).map(NodeId).filter(|n| self.node_dirty[n.index()]).collect();
        let mut listed = self.dirty_nodes.clone();
        listed.sort_unstable();
        flagged.sort_unstable();
        assert_eq!(listed, flagged, "changed nodes: the list and the flags");
        let mut flagged: Vec<NodeId> =
            (0..self.nodes.len() as u32).map(NodeId).filter(|n| self.node_commanded[n.index()]).collect();
        let mut listed = self.commanded.clone();
        listed.sort_unstable();
        flagged.sort_unstable();
        assert_eq!(listed, flagged, "commanded nodes: the list and the flags");
        assert!(listed.iter().all(|n| self.node_dirty[n.index()]), "a commanded node's row changed too");
        for job in self.jobs.values() {
            let Some(a) = job.attempt.as_ref() else { continue };
            let mut fresh = a.clone();
            index_attempt(&mut fresh, job.id, job.spec.world_size(), &self.nodes);
            assert_eq!(
                (&fresh.groups, fresh.reported, fresh.holders),
                (&a.groups, a.reported, a.holders),
                "indexes of job {} attempt {}",
                job.id,
                a.number
            );
            let mut distinct = a.nodes.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                a.nodes.len(),
                "job {} attempt {} names a node twice",
                job.id,
                a.number
            );
            assert!(a.nodes.iter().all(|n| n.index() < self.nodes.len()), "job {}: an unknown node", job.id);
        }
    }

    /// Marks a node's row as changed.
    pub(crate) fn dirty_node(&mut self, id: NodeId) {
        let flag = &mut self.node_dirty[id.index()];
        if !*flag {
            *flag = true;
            self.dirty_nodes.push(id);
        }
    }

    pub(crate) fn push_once(&mut self, id: NodeId, command: Command) {
        let command = Queued::Command(command);
        if !self.nodes[id.index()].commands.iter().any(|c| c.command == command) {
            self.command(id, command);
        }
    }

    /// Queues a command for node `id`: its row changed, and it has news to be told of.
    pub(crate) fn command(&mut self, id: NodeId, command: Queued) {
        self.nodes[id.index()].push(command);
        self.dirty_node(id);
        let flag = &mut self.node_commanded[id.index()];
        if !*flag {
            *flag = true;
            self.commanded.push(id);
        }
    }

    /// An event about node `id`.
    pub(crate) fn node_event(
        &mut self,
        now_ms: u64,
        job_id: Option<JobId>,
        id: NodeId,
        kind: EventKind,
        message: String,
    ) {
        let name = self.nodes[id.index()].name.clone();
        self.event(now_ms, job_id, Some(&name), kind, message);
    }

    /// The node's name (for messages).
    pub(crate) fn name(&self, id: NodeId) -> &str {
        &self.nodes[id.index()].name
    }

    /// Every node in name order.
    pub(crate) fn nodes_by_name(&self) -> impl Iterator<Item = &Node> {
        self.by_name.iter().map(|id| &self.nodes[id.index()])
    }
}

#[cfg(test)]
mod tests;
