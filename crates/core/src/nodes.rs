//! Nodes: registration, heartbeats (full state, commands acknowledged by sequence number), the
//! time-driven decisions (lost nodes, launch timeouts) and quarantine of nodes that keep failing.

use crate::*;

/// Commands an emptied queue keeps room for.
const QUEUE_ROOM_KEPT: usize = 4;

impl Core {
    /// A failure is this node's fault; too many in the window and it is quarantined.
    pub(crate) fn blame(&mut self, id: NodeId, now_ms: u64) {
        let (after, window_ms) = (self.cfg.quarantine_after, self.cfg.quarantine_window_ms);
        let node = &mut self.nodes[id.index()];
        node.failures_ms.retain(|&t| now_ms.saturating_sub(t) < window_ms);
        node.failures_ms.push(now_ms);
        if node.failures_ms.len() >= after && !node.quarantined {
            node.quarantined = true;
            let message = format!(
                "node {} quarantined after {} failures within {} s: it needs a person (restart its agent to release it)",
                node.name,
                node.failures_ms.len(),
                window_ms / 1000
            );
            self.node_event(now_ms, None, id, EventKind::NodeQuarantined, message);
        }
        self.dirty_node(id);
    }

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
        match self.ids.get(&name).copied() {
            Some(id) => {
                let node = &mut self.nodes[id.index()];
                node.slots = req.slots;
                node.cores = req.cores.max(1);
                node.addr = req.addr;
                node.http_port = req.http_port;
                node.spare = req.spare;
                node.gpus = req.gpus;
                node.driver = req.driver;
                node.health = Health::Healthy;
                node.last_heartbeat_ms = now_ms;
                node.commands.clear();
                // A person restarted the agent: the node gets another chance.
                node.quarantined = false;
                node.failures_ms.clear();
                let held: Vec<(JobId, u32)> =
                    node.allocations.iter().map(|a| (a.job_id, a.attempt)).collect();
                node.allocations.clear();
                self.dirty_node(id);
                self.event(
                    now_ms,
                    None,
                    Some(&name),
                    EventKind::NodeRegistered,
                    format!("node {name} re-registered"),
                );
                for (job_id, attempt) in held {
                    self.released(id, job_id, attempt);
                    let reason = format!("the agent on node {name} restarted and lost its ranks");
                    let kind = FaultKind::AgentRestart;
                    self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), now_ms, now_ms);
                    self.maybe_finish_attempt(job_id, now_ms);
                }
            }
            None => {
                let id = NodeId(self.nodes.len() as u32);
                let node = Node {
                    id,
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
                    gpus: req.gpus,
                    driver: req.driver,
                    gpu_findings: Vec::new(),
                    last_heartbeat_ms: now_ms,
                    reported_running: Vec::new(),
                };
                let what = if node.spare { "spare node" } else { "node" };
                let gpus = match (node.gpus.first(), node.gpus.len()) {
                    (Some(g), n) => {
                        format!(" ({n} × {}, driver {})", g.model, node.driver.as_deref().unwrap_or("?"))
                    }
                    (None, _) => String::new(),
                };
                let message = format!("{what} {name} joined with {} slots{gpus}", node.slots);
                self.nodes.push(node);
                self.node_dirty.push(false);
                self.node_commanded.push(false);
                let at = self.by_name.partition_point(|n| self.nodes[n.index()].name < name);
                self.by_name.insert(at, id);
                self.ids.insert(name.clone(), id);
                self.dirty_node(id);
                self.event(now_ms, None, Some(&name), EventKind::NodeRegistered, message);
            }
        }
        self.schedule(now_ms);
        Ok(RegisterReply {
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            lease_ms: self.cfg.lease_ms(),
        })
    }

    pub fn heartbeat(
        &mut self,
        name: &str,
        req: HeartbeatRequest,
        now_ms: u64,
    ) -> Result<HeartbeatReply, CoreError> {
        let id = self.node_id(name).ok_or_else(|| CoreError::UnknownNode(name.to_string()))?;
        self.report(id, &req, now_ms);
        Ok(HeartbeatReply {
            commands: self.nodes[id.index()].commands.iter().map(QueuedCommand::to_wire).collect(),
        })
    }

    /// A heartbeat without the reply: the caller reads the node's queued commands itself
    /// ([`Core::node_by_id`]), as the simulator does for thousands of nodes.
    pub fn report(&mut self, id: NodeId, req: &HeartbeatRequest, now_ms: u64) {
        let node = &mut self.nodes[id.index()];
        node.last_heartbeat_ms = now_ms;
        let before = node.commands.len();
        node.commands.retain(|c| c.seq > req.acked_command_seq);
        if node.commands.is_empty() && node.commands.capacity() > QUEUE_ROOM_KEPT {
            // An emptied queue keeps room for the few commands of a restart (a stop, a forget, a
            // launch), not for a backlog: a queue refilled every restart is not reallocated.
            node.commands.shrink_to(QUEUE_ROOM_KEPT);
        }
        let mut dirty = node.commands.len() != before;
        let returned = node.health == Health::Lost;
        if returned {
            node.health = Health::Healthy;
            dirty = true;
            self.schedule_due = true;
        }
        if dirty {
            self.dirty_node(id);
        }
        if returned {
            let message = format!("node {} is heartbeating again", self.name(id));
            self.node_event(now_ms, None, id, EventKind::NodeReturned, message);
            self.stop_ended_attempts(id);
        }

        // A failed GPU takes the node out before anything it reports can restart a job onto it.
        self.gpu_reports(id, &req.gpu_findings, now_ms);
        self.checkpoint_reports(id, req, now_ms);
        for port in &req.ports {
            self.port_reserved(id, port.job_id, port.attempt, port.port, now_ms);
        }

        // Ranks still running per attempt, as this node sees them: refilled in the node's own
        // list, which keeps its room from the last heartbeat (a node runs one attempt or two).
        let mut reported = std::mem::take(&mut self.nodes[id.index()].reported_running);
        reported.clear();
        for r in &req.ranks {
            let key = (r.job_id, r.attempt);
            let running = r.state.is_running() as u32;
            match reported.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += running,
                None => reported.push((key, running)),
            }
            self.rank_report(id, r, now_ms);
        }
        for &((job_id, attempt), running) in &reported {
            if self.nodes[id.index()].holds(job_id, attempt) {
                continue;
            }
            // Ranks of an attempt this node holds no slots for: a leftover of an attempt that
            // ended while the node was cut off, or of a job this controller never saw. Running
            // ones keep their slots occupied until they are gone.
            let node = &mut self.nodes[id.index()];
            if running > 0 {
                node.allocations.push(Allocation { job_id, attempt, slots: running });
                self.command(id, Queued::Command(Command::Stop { job_id, attempt }));
                self.acquired(id, job_id, attempt);
                let message = format!("stopping {running} leftover ranks of job {job_id} attempt {attempt}");
                self.node_event(now_ms, Some(job_id), id, EventKind::LeftoverRanks, message);
            } else {
                self.push_once(id, Command::Forget { job_id, attempt });
            }
        }
        // The jobs this report may move on: those the node holds slots for or reported ranks of,
        // and those whose attempt's first rank to exit fences its ranks on lost nodes. A few at
        // most, so a list (kept by the core between reports) rather than a set.
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        let node = &self.nodes[id.index()];
        touched.extend(node.allocations.iter().map(|a| a.job_id));
        touched.extend(reported.iter().map(|&((job_id, _), _)| job_id));
        self.nodes[id.index()].reported_running = reported;
        for job_id in std::mem::take(&mut self.exit_fenced) {
            self.release_lost_nodes_of(job_id, now_ms);
            touched.push(job_id);
        }
        touched.sort_unstable();
        touched.dedup();
        for &job_id in &touched {
            self.try_release(id, job_id, now_ms);
            self.maybe_finish_attempt(job_id, now_ms);
        }
        self.touched = touched;
        if self.schedule_due {
            self.schedule(now_ms);
        }
    }

    /// A node back from being lost still holds the slots of attempts that ended while it was
    /// silent: those that ended as it was lost told it nothing (a lost node is sent no stop), so
    /// its ranks would run on and the attempt would never finish. It is told to stop them now.
    fn stop_ended_attempts(&mut self, id: NodeId) {
        let ended: Vec<(JobId, u32)> = self.nodes[id.index()]
            .allocations
            .iter()
            .map(|al| (al.job_id, al.attempt))
            .filter(|&(job_id, attempt)| {
                let current = self.jobs.get(&job_id).and_then(|j| j.attempt.as_ref());
                !current.is_some_and(|a| a.number == attempt && a.outcome.is_none())
            })
            .collect();
        for (job_id, attempt) in ended {
            self.push_once(id, Command::Stop { job_id, attempt });
        }
    }

    /// Every healthy node for which `silent` is false heartbeats at `now_ms` with nothing new to
    /// say. For the simulator, which stands in for thousands of agents whose reports have not
    /// changed.
    pub fn alive_all(&mut self, now_ms: u64, silent: impl Fn(NodeId) -> bool) {
        for node in &mut self.nodes {
            if node.health == Health::Healthy && !silent(node.id) {
                node.last_heartbeat_ms = node.last_heartbeat_ms.max(now_ms);
            }
        }
    }

    /// The node's GPU health as its agent now finds it. A new fatal finding fails every attempt
    /// the node holds (a restart finds a spare: the node has no room while a GPU fails) and is
    /// blamed on the node; a new warning is an event; all checks passing again returns the node.
    pub(crate) fn gpu_reports(&mut self, id: NodeId, findings: &[GpuFinding], now_ms: u64) {
        let node = &self.nodes[id.index()];
        if node.gpu_findings == findings {
            return;
        }
        let was_failed = node.gpu_failed();
        let new: Vec<GpuFinding> =
            findings.iter().filter(|f| !node.gpu_findings.contains(f)).cloned().collect();
        let held: Vec<(JobId, u32)> = node.allocations.iter().map(|a| (a.job_id, a.attempt)).collect();
        let node = &mut self.nodes[id.index()];
        node.gpu_findings = findings.to_vec();
        let failed = node.gpu_failed();
        let name = node.name.clone();
        self.dirty_node(id);
        for f in new.iter().filter(|f| !f.fatal) {
            let message = format!("GPU {} ({}) on node {name}: {}", f.index, f.uuid, f.reason);
            self.node_event(now_ms, None, id, EventKind::GpuWarning, message);
        }
        let fatal: Vec<&GpuFinding> = new.iter().filter(|f| f.fatal).collect();
        if let Some(first) = fatal.first() {
            let what = format!("GPU {} ({}) on node {name}: {}", first.index, first.uuid, first.reason);
            let more = if fatal.len() > 1 {
                format!(" (and {} more findings)", fatal.len() - 1)
            } else {
                String::new()
            };
            let message =
                format!("{what}{more}; the node is out of scheduling until its GPUs pass their checks");
            self.node_event(now_ms, None, id, EventKind::GpuFailed, message);
            self.blame(id, now_ms);
            for (job_id, attempt) in held {
                let reason = format!("{what}{more}");
                self.end_attempt(job_id, attempt, Outcome::Restart, (FaultKind::Gpu, reason), now_ms, now_ms);
                self.maybe_finish_attempt(job_id, now_ms);
            }
        }
        if was_failed && !failed {
            self.schedule_due = true;
            let message = format!("every GPU of node {name} passes its checks again: it is scheduled again");
            self.node_event(now_ms, None, id, EventKind::GpuRecovered, message);
        }
    }

    /// The edge found that the controller itself did not run for `stalled_ms` (a pause, a VM
    /// migration, a busy host): the nodes' silence over that time is the controller's, not theirs,
    /// and is taken off every healthy node's. (Only that time: a controller that is merely slow,
    /// stalling a little every tick, still finds dead nodes, later.)
    pub fn controller_stalled(&mut self, now_ms: u64, stalled_ms: u64) {
        for node in self.nodes.iter_mut().filter(|n| n.health == Health::Healthy) {
            node.last_heartbeat_ms =
                (node.last_heartbeat_ms + stalled_ms).min(now_ms.max(node.last_heartbeat_ms));
        }
        self.stalls += 1;
        // An event for a stall that would have lost nodes; the metric counts every one.
        if stalled_ms >= self.cfg.heartbeat_interval_ms * self.cfg.node_timeout_heartbeats as u64 / 2 {
            let message = format!(
                "the controller did not run for {:.1} s: no node is blamed for that silence",
                stalled_ms as f64 / 1e3
            );
            self.event(now_ms, None, None, EventKind::ControllerStalled, message);
        }
    }

    /// Whether node losses are held back (too many nodes silent at once), and how often the
    /// controller found it had stalled.
    pub fn liveness(&self) -> (bool, u64) {
        (self.breaker_open, self.stalls)
    }

    /// Time-driven decisions: lost nodes, launches that take too long, then scheduling.
    pub fn tick(&mut self, now_ms: u64) {
        let timeout_ms = (self.cfg.heartbeat_interval_ms * self.cfg.node_timeout_heartbeats as u64)
            .saturating_sub(2 * self.cfg.tick_ms);
        // Nodes cut off together had their last heartbeats spread over an interval, so they cross
        // the timeout an interval apart: the breaker counts every node within one interval (and a
        // tick's jitter either side) of it. A heartbeating node is never that silent, unless the
        // interval is so short (under about 0.5 s) that the window would reach into its own
        // heartbeats: there it is cut to 1.5 intervals, and nodes cut off together may be
        // declared lost one by one.
        let hb = self.cfg.heartbeat_interval_ms;
        let approaching_ms =
            timeout_ms.saturating_sub(hb + 2 * self.cfg.tick_ms).max(hb + hb / 2).min(timeout_ms);
        // One pass over the nodes every tick: at 12,500 of them this is the controller's hot path.
        let (mut healthy, mut approaching, mut silent) = (0usize, 0usize, Vec::new());
        // Lost nodes still holding an ended attempt's slots whose lease has just run out.
        let fenced_after_ms = self.cfg.fenced_after_ms();
        let mut fenced: Vec<(NodeId, JobId)> = Vec::new();
        // In name order, as events and restarts have always come.
        for n in self.nodes_by_name() {
            if n.health != Health::Healthy {
                if n.health == Health::Lost
                    && !n.allocations.is_empty()
                    && now_ms >= n.last_heartbeat_ms + fenced_after_ms
                {
                    fenced.extend(n.allocations.iter().map(|a| (n.id, a.job_id)));
                }
                continue;
            }
            healthy += 1;
            let age_ms = now_ms.saturating_sub(n.last_heartbeat_ms);
            approaching += (age_ms > approaching_ms) as usize;
            if age_ms > timeout_ms {
                silent.push(n.id);
            }
        }
        let mass = !silent.is_empty()
            && approaching >= self.cfg.loss_breaker_min_nodes
            && approaching as f64 > self.cfg.loss_breaker_fraction * healthy as f64;
        let was_open = self.breaker_open;
        if mass != self.breaker_open {
            self.breaker_open = mass;
            let (kind, message) = if mass {
                let message = format!(
                    "{approaching} of {healthy} healthy nodes are falling silent at once: no node is declared lost while so many are (the controller's own network or host, most likely)"
                );
                (EventKind::LossBreakerOpen, message)
            } else {
                // The nodes still silent were silent under the breaker: their timeout starts now,
                // or the last of them to heartbeat again would be declared lost for the
                // partition's whole length.
                for node in self.nodes.iter_mut().filter(|n| n.health == Health::Healthy) {
                    node.last_heartbeat_ms = node.last_heartbeat_ms.max(now_ms);
                }
                let message =
                    "nodes heartbeat again: silent nodes are declared lost again, each after a fresh timeout";
                (EventKind::LossBreakerClosed, message.to_string())
            };
            self.event(now_ms, None, None, kind, message);
        }
        let silent = if mass || was_open { Vec::new() } else { silent };
        for id in silent {
            let node = &mut self.nodes[id.index()];
            node.health = Health::Lost;
            let age_ms = now_ms - node.last_heartbeat_ms;
            let held: Vec<(JobId, u32)> = node.allocations.iter().map(|a| (a.job_id, a.attempt)).collect();
            let name = node.name.clone();
            self.dirty_node(id);
            self.event(
                now_ms,
                None,
                Some(&name),
                EventKind::NodeLost,
                format!("node {name}: no heartbeat for {age_ms} ms"),
            );
            self.blame(id, now_ms);
            for (job_id, attempt) in held {
                let reason = format!("node {name} was lost (no heartbeat for {age_ms} ms)");
                let kind = FaultKind::NodeLost;
                self.end_attempt(job_id, attempt, Outcome::Restart, (kind, reason), now_ms - age_ms, now_ms);
                self.try_release(id, job_id, now_ms);
                self.maybe_finish_attempt(job_id, now_ms);
            }
        }
        for (id, job_id) in fenced {
            self.try_release(id, job_id, now_ms);
            self.maybe_finish_attempt(job_id, now_ms);
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
}
