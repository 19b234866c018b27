//! Read-only views of the state for the API, the dashboard and the metrics.

use crate::*;

impl Core {
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.node_id(name).map(|id| &self.nodes[id.index()])
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.ids.get(name).copied()
    }

    /// Node `id`, which the core gave out: panics for one it did not.
    pub fn node_by_id(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// The names of `nodes` (an attempt's, a placement), in their order.
    pub fn names(&self, nodes: &[NodeId]) -> Vec<String> {
        nodes.iter().map(|n| self.nodes[n.index()].name.clone()).collect()
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
            nodes: a.map(|a| self.names(&a.nodes)).unwrap_or_default(),
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
        self.nodes_by_name()
            .map(|n| NodeView {
                name: n.name.clone(),
                health: match n.health {
                    Health::Healthy if n.quarantined => "quarantined".into(),
                    Health::Healthy if n.gpu_failed() => "gpu_failed".into(),
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
                gpus: n.gpus.clone(),
                gpu_findings: n.gpu_findings.clone(),
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
        let node = &self.nodes[placement[group].index()];
        Ok((node, number, rank % job.spec.ranks_per_node))
    }
}
