//! Fencing: an agent that has not reached the controller for the lease the controller gave it
//! (`RegisterReply::lease_ms`) kills every rank it holds, for by then the controller may have
//! given their work to other nodes, and two attempts of one job must never train at once. The
//! lease is measured from the *sending* of the last heartbeat the controller answered, which is
//! before the controller heard it: the agent acts no later than the controller's own count of
//! its silence, and the controller waits the lease and a heartbeat interval more before it
//! relaunches a lost node's work (`myriad_core::CoreConfig::fenced_after_ms`). The lease is
//! longer than any controller pause or partition the cluster rides out without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::supervisor::signal_groups;
use crate::Agent;

/// How often the lease is checked.
const CHECK_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct Contact {
    /// When the last answered call to the controller was sent (None before the first).
    pub(crate) last: Option<Instant>,
    /// Zero: the controller fences nothing (an older one, or fencing turned off).
    pub(crate) lease: Duration,
}

impl Default for Contact {
    fn default() -> Self {
        Contact { last: None, lease: Duration::ZERO }
    }
}

impl Contact {
    /// A registration sent at `sent` was answered with `lease_ms`.
    pub(crate) fn answered(&mut self, sent: Instant, lease_ms: u64) {
        self.lease = Duration::from_millis(lease_ms);
        self.heard(sent);
    }

    /// A heartbeat sent at `sent` was answered.
    pub(crate) fn heard(&mut self, sent: Instant) {
        self.last = Some(self.last.map_or(sent, |l| l.max(sent)));
    }

    /// Whether the lease has run out at `now`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        !self.lease.is_zero() && self.last.is_some_and(|l| now.duration_since(l) >= self.lease)
    }
}

pub(crate) async fn watch(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let (expired, lease) = {
            let c = agent.contact.lock().expect("agent state");
            (c.expired(Instant::now()), c.lease)
        };
        if !expired {
            continue;
        }
        // Every running rank not yet being killed: SIGKILL at once, no grace period (the
        // controller counts on them being gone within its margin).
        let pids: Vec<u32> = {
            let mut node = agent.node.lock().expect("agent state");
            node.state
                .ranks
                .values_mut()
                .filter(|r| r.state.is_running() && !r.fenced)
                .filter_map(|r| {
                    r.fenced = true;
                    r.stopping = true;
                    r.pid
                })
                .collect()
        };
        if pids.is_empty() {
            continue;
        }
        say!(
            "agent {}: the controller has been out of reach for the {:.1} s lease: killing {} ranks (their work may have moved)",
            agent.cfg.name,
            lease.as_secs_f64(),
            pids.len()
        );
        signal_groups(&pids, libc::SIGKILL);
        agent.metrics.fenced(pids.len());
        agent.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_runs_from_the_last_answered_call_and_only_when_one_was_given() {
        let t0 = Instant::now();
        let mut c = Contact::default();
        assert!(!c.expired(t0 + Duration::from_secs(3600)), "never registered: no lease");
        c.answered(t0, 0);
        assert!(!c.expired(t0 + Duration::from_secs(3600)), "a controller without fencing");
        c.answered(t0, 3000);
        assert!(!c.expired(t0 + Duration::from_millis(2999)));
        assert!(c.expired(t0 + Duration::from_millis(3000)));
        c.heard(t0 + Duration::from_secs(2));
        assert!(!c.expired(t0 + Duration::from_millis(4999)), "renewed by the heartbeat sent at 2 s");
        c.heard(t0 + Duration::from_secs(1));
        assert!(c.expired(t0 + Duration::from_secs(5)), "an older answer arriving late renews nothing");
    }
}
