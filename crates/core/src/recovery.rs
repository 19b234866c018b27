//! Failures and recovery: what each rank's exit means, ending an attempt, releasing its slots,
//! choosing the restore point (newest step held in memory or persisted, never a corrupt one), and
//! starting the next attempt or ending the job.

use crate::*;

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
    /// A GPU of a node failed a health check (an XID, uncorrectable ECC errors, off the bus).
    Gpu,
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
            FaultKind::Gpu => "gpu",
            FaultKind::None => "none",
        }
    }
}

impl Core {
    /// Records which checkpoints the node holds, which failed to verify, and purges the
    /// in-memory checkpoints of jobs that have ended.
    pub(crate) fn checkpoint_reports(&mut self, id: NodeId, req: &HeartbeatRequest, now_ms: u64) {
        // Most nodes hold no checkpoint and report none: nothing to record, purge or compare.
        if req.checkpoints.is_empty()
            && req.bad_checkpoints.is_empty()
            && self.nodes[id.index()].checkpoints.is_empty()
        {
            return;
        }
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
            self.push_once(id, Command::Purge { job_id });
        }
        let node = &mut self.nodes[id.index()];
        if node.checkpoints != memory {
            node.checkpoints = memory;
            self.dirty_node(id);
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
                self.node_event(now_ms, Some(bad.job_id), id, EventKind::CheckpointCorrupt, message);
            }
        }
    }

    /// The newest checkpoint every rank can start from: held in memory by a healthy node or
    /// persisted, and never seen corrupt.
    pub(crate) fn restore_point(&self, job: &Job) -> Option<RestoreSpec> {
        let in_memory = self
            .nodes
            .iter()
            .filter(|n| n.health == Health::Healthy)
            .filter_map(|n| n.checkpoints.get(&job.id))
            .flat_map(|steps| steps.iter().copied());
        let step =
            in_memory.chain(job.persisted.iter().copied()).filter(|s| !job.bad_steps.contains(s)).max()?;
        let sources = self
            .nodes_by_name()
            .filter(|n| n.health == Health::Healthy)
            .filter(|n| n.checkpoints.get(&job.id).is_some_and(|s| s.contains(&step)))
            .map(|n| format!("http://{}:{}", n.addr, n.http_port))
            .collect();
        Some(RestoreSpec { step, sources, persisted: job.persisted.contains(&step) })
    }

    pub(crate) fn rank_report(&mut self, id: NodeId, r: &RankReport, now_ms: u64) {
        let (job_id, attempt, local_rank, state) = (r.job_id, r.attempt, r.local_rank, r.state);
        let (step, loss) = (r.step, r.loss);
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let nproc = job.spec.ranks_per_node;
        let Some(a) = job.attempt.as_mut() else { return };
        if a.number != attempt || local_rank >= nproc {
            return;
        }
        let Some(group) = a.group_of(id) else { return };
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
            // ledger (and cost a write). After a fault, the new attempt's steps are new even where
            // their numbers are not: an attempt that restarted from an older step recomputes steps
            // the ledger still holds until its first report rolls them back.
            let recovering = job.account.pending.as_ref().is_some_and(|p| attempt > p.attempt);
            if recovering || r.steps.iter().any(|s| !job.account.recent.contains_key(&s.step)) {
                self.dirty_jobs.insert(job_id);
                if let Some((message, data)) = job.account.record_steps(&r.steps, attempt, submitted_ms) {
                    self.event(now_ms, Some(job_id), None, EventKind::Recovered, message);
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
        if newly_exited && !a.rank_exited {
            a.rank_exited = true;
            self.exit_fenced.push(job_id);
        }
        // The rank table is not stored (agents report it again to a restarted controller), so a
        // rank's new state costs the job's row a write only where it changes what is stored: at
        // 100,000 ranks a start or a stop otherwise rewrites that row with every group commit.
        let all_reported = a.reported as usize == a.ranks.len();
        let ending = a.outcome.is_some();
        // Every rank has been seen (a fast one may be seen only once it has already exited).
        if all_reported && job.state == JobState::Starting && !ending {
            job.state = JobState::Running;
            self.dirty_jobs.insert(job_id);
            self.event(
                now_ms,
                Some(job_id),
                None,
                EventKind::Running,
                format!("attempt {attempt}: all ranks started"),
            );
        }
        if !newly_exited {
            return;
        }
        let RankState::Exited { code, signal } = state else { unreachable!() };
        // Written only where it is said: every rank of a stopped attempt exits here.
        let how = || match (code, signal) {
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
            self.node_event(now_ms, Some(job_id), id, EventKind::RankHung, message);
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
                    p.cause = format!("rank {rank} on node {} {}", self.nodes[id.index()].name, how());
                    p.kind = FaultKind::RankExit.as_str().to_string();
                    p.fault_ms = exited_ms;
                    job.reason = Some(p.cause.clone());
                    self.dirty_jobs.insert(job_id);
                }
            }
            return;
        }
        self.node_event(now_ms, Some(job_id), id, EventKind::RankExited, format!("rank {rank} {}", how()));
        if !state.succeeded() {
            let node = self.name(id);
            let reason = match &r.hang {
                Some(h) => format!(
                    "rank {rank} on node {node} hung: no progress for {:.1} s{}",
                    h.stalled_ms as f64 / 1e3,
                    h.phase.as_deref().map(|p| format!(" (in {p})")).unwrap_or_default()
                ),
                None => format!("rank {rank} on node {node} {}", how()),
            };
            let exited_ms = r.exited_at_ms.unwrap_or(now_ms);
            let fault_ms = r.hang.as_ref().map_or(exited_ms, |h| exited_ms.saturating_sub(h.stalled_ms));
            // Hangs are unambiguous (the stopped or spinning rank is found first) and count
            // towards quarantine; a crash is not blamed, as its peers fail a moment later too.
            if r.hang.is_some() {
                self.blame(id, now_ms);
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
    pub(crate) fn end_attempt(
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
            Outcome::Succeed => EventKind::AttemptSucceeded,
            Outcome::Cancel => EventKind::Cancelling,
            Outcome::Restart | Outcome::Fail => EventKind::AttemptFailed,
        };
        self.event(now_ms, Some(job_id), None, event_kind, format!("attempt {attempt}: {reason}"));
        if matches!(outcome, Outcome::Restart | Outcome::Fail) {
            self.events.last_mut().expect("just pushed").data =
                Some(serde_json::json!({"cause": kind.as_str()}));
        }
        for &n in &nodes {
            let node = &self.nodes[n.index()];
            if !node.holds(job_id, attempt) {
                continue;
            }
            // A launch already sent may be carried out before its acknowledgement arrives: it stays
            // queued, the Stop follows it, and the slots wait for the ranks to be reported gone.
            if outcome != Outcome::Succeed && node.health == Health::Healthy {
                self.push_once(n, Command::Stop { job_id, attempt });
            }
            self.dirty_node(n);
            self.try_release(n, job_id, now_ms);
        }
        self.maybe_finish_attempt(job_id, now_ms);
    }

    /// Returns a node's slots for an ended attempt once none of its ranks can still be running:
    /// the node is lost, or its last report shows none running, its rank table shows none running,
    /// and no launch for the attempt waits undelivered.
    pub(crate) fn try_release(&mut self, id: NodeId, job_id: JobId, now_ms: u64) {
        // One attempt at a time, the allocations searched again after each (a node holds a job's
        // slots for an attempt or two): no list of them is made on this path of every heartbeat.
        while let Some(attempt) = self.releasable(id, job_id, now_ms) {
            let node = &mut self.nodes[id.index()];
            node.allocations.retain(|al| !(al.job_id == job_id && al.attempt == attempt));
            let healthy = node.health == Health::Healthy;
            self.dirty_node(id);
            if healthy {
                self.command(id, Queued::Command(Command::Forget { job_id, attempt }));
            }
            self.released(id, job_id, attempt);
            self.schedule_due = true;
        }
    }

    /// An attempt of `job_id` whose slots node `id` may give back now.
    fn releasable(&self, id: NodeId, job_id: JobId, now_ms: u64) -> Option<u32> {
        let job = self.jobs.get(&job_id);
        let current = job.and_then(|j| j.attempt.as_ref());
        let node = &self.nodes[id.index()];
        let fenced_after_ms = self.cfg.fenced_after_ms();
        node.allocations.iter().filter(|al| al.job_id == job_id).map(|al| al.attempt).find(|&attempt| {
            let active = current.is_some_and(|a| a.number == attempt && a.outcome.is_none());
            if active {
                return false;
            }
            // A lost node's ranks may still run, cut off from the controller alone: its slots
            // come back (and the job moves on) once they are fenced.
            if node.health == Health::Lost {
                return now_ms >= node.last_heartbeat_ms + fenced_after_ms
                    || current.is_some_and(|a| a.number == attempt && a.rank_exited);
            }
            let table_running = match (job, current) {
                (Some(job), Some(a)) if a.number == attempt => {
                    let nproc = job.spec.ranks_per_node as usize;
                    a.group_of(id).is_some_and(|g| {
                        let g = g as usize;
                        a.ranks[g * nproc..(g + 1) * nproc].iter().any(|r| r.is_some_and(|s| s.is_running()))
                    })
                }
                _ => false,
            };
            let reported = node.reported(job_id, attempt);
            !table_running && reported == 0 && !node.has_unacked_launch(job_id, attempt)
        })
    }

    /// Retries the release of `job_id`'s lost nodes (a rank elsewhere exited: they are fenced).
    /// Once per attempt, when its first rank exits: at 12,500 nodes a pass per report would be
    /// quadratic in a restart.
    pub(crate) fn release_lost_nodes_of(&mut self, job_id: JobId, now_ms: u64) {
        let Some(a) = self.jobs.get(&job_id).and_then(|j| j.attempt.as_ref()) else { return };
        let lost: Vec<NodeId> =
            a.nodes.iter().copied().filter(|n| self.nodes[n.index()].health == Health::Lost).collect();
        for n in lost {
            self.try_release(n, job_id, now_ms);
        }
    }

    /// Counts a node of `job_id`'s current attempt giving up its slots.
    pub(crate) fn released(&mut self, id: NodeId, job_id: JobId, attempt: u32) {
        let a = self.jobs.get_mut(&job_id).and_then(|j| j.attempt.as_mut());
        if let Some(a) = a.filter(|a| a.number == attempt && a.group_of(id).is_some()) {
            a.holders -= 1;
        }
    }

    /// Counts a node of `job_id`'s current attempt taking slots again (leftover ranks).
    pub(crate) fn acquired(&mut self, id: NodeId, job_id: JobId, attempt: u32) {
        let a = self.jobs.get_mut(&job_id).and_then(|j| j.attempt.as_mut());
        if let Some(a) = a.filter(|a| a.number == attempt && a.group_of(id).is_some()) {
            a.holders += 1;
        }
    }

    /// Once an ended attempt holds no slots anywhere, the job restarts, succeeds, fails or is
    /// cancelled.
    pub(crate) fn maybe_finish_attempt(&mut self, job_id: JobId, now_ms: u64) {
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
            Outcome::Succeed => (JobState::Succeeded, EventKind::JobSucceeded),
            Outcome::Fail => (JobState::Failed, EventKind::JobFailed),
            Outcome::Cancel => (JobState::Cancelled, EventKind::JobCancelled),
            Outcome::Restart => (JobState::Queued, EventKind::JobRestarting),
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
}
