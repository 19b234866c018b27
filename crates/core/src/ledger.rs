//! The time ledger of a job: committed step time, time lost to start-up, detection, restart and
//! recomputation per fault, and effective training time (DESIGN.md).

use crate::*;

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
    pub(crate) fn roll_back(&mut self, restore_step: u64) {
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
    pub(crate) fn record_steps(
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

/// Effective training time: committed step time over wall time since submission.
pub(crate) fn ettr(job: &Job, now_ms: u64) -> Option<f64> {
    let wall_ms = job.ended_ms.unwrap_or(now_ms).saturating_sub(job.submitted_ms);
    (wall_ms > 0 && !job.account.recent.is_empty()).then(|| job.account.committed_ms() / wall_ms as f64)
}
