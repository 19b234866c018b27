//! Stragglers: ranks whose compute time per step stays above the job's median are reported, and
//! evicted for a spare when they keep straggling.

use crate::*;

impl Core {
    /// Running jobs whose check is due: a rank computing `straggler_margin` above the job's
    /// median is reported once per attempt. All ranks of a synchronous job take equally long per
    /// step (the fast ones wait for the slow one), so it is compute time that tells them apart.
    /// One still straggling after `straggler_evict_checks` checks in a row has its node swapped
    /// for a spare, when the job may use one, one is free and a restart is left.
    pub(crate) fn find_stragglers(&mut self, now_ms: u64) {
        let (margin, every_ms) = (self.cfg.straggler_margin, self.cfg.straggler_check_ms);
        let evict_after = self.cfg.straggler_evict_checks;
        let mut found: Vec<(JobId, u32, NodeId, f64, f64)> = Vec::new();
        let mut persistent: Vec<(JobId, u32, u32, NodeId, f64, f64)> = Vec::new();
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
                let node = a.nodes[rank as usize / nproc];
                let n = a.straggling_checks.get(&rank).map_or(1, |n| n + 1);
                checks.insert(rank, n);
                if a.stragglers.insert(rank) {
                    found.push((job.id, rank, node, ms, median));
                }
                if evict_after > 0 && n >= evict_after {
                    persistent.push((job.id, a.number, rank, node, ms, median));
                }
            }
            // A rank back within the margin starts counting afresh.
            a.straggling_checks = checks;
        }
        for (job_id, rank, id, ms, median) in found {
            self.dirty_jobs.insert(job_id);
            let message = format!(
                "rank {rank} on node {} straggles: {ms:.0} ms of compute per step against the job's median {median:.0} ms (+{:.0}%)",
                self.name(id),
                (ms / median - 1.0) * 100.0
            );
            self.node_event(now_ms, Some(job_id), id, EventKind::Straggler, message);
            let data = serde_json::json!({"rank": rank, "compute_ms": ms, "median_ms": median});
            self.events.last_mut().expect("just pushed").data = Some(data);
        }
        for (job_id, attempt, rank, id, ms, median) in persistent {
            if !self.spare_for(job_id) {
                continue;
            }
            let job = self.jobs.get_mut(&job_id).expect("found above");
            if job.attempt.as_ref().is_none_or(|a| a.outcome.is_some() || a.number != attempt) {
                continue; // one eviction per attempt
            }
            job.evicted.insert(id);
            let reason = format!(
                "rank {rank} on node {} straggled at {evict_after} checks in a row, {} s apart ({ms:.0} ms of \
                 compute per step against {median:.0} ms): node evicted for a spare",
                self.nodes[id.index()].name,
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
}
