//! The kinds of event the controller records: what the timeline, the demo, the metrics and the
//! simulator read. On the wire and in the store an event's kind is its snake_case name.

use crate::api::Event;

macro_rules! event_kinds {
    ($($(#[$doc:meta])* $kind:ident = $name:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $($(#[$doc])* $kind,)*
        }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$kind,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$kind => $name,)*
                }
            }

            pub fn parse(name: &str) -> Option<EventKind> {
                match name {
                    $($name => Some(EventKind::$kind),)*
                    _ => None,
                }
            }
        }
    };
}

event_kinds! {
    Submitted = "submitted",
    /// The job's nodes are chosen: attempt N on them.
    Scheduled = "scheduled",
    /// The store port is known; every node launches its ranks.
    Launching = "launching",
    /// Every rank has reported running.
    Running = "running",
    RankExited = "rank_exited",
    /// An agent found a rank making no progress, captured its stacks and killed it.
    RankHung = "rank_hung",
    /// A rank computes well above the job's median.
    Straggler = "straggler",
    AttemptSucceeded = "attempt_succeeded",
    AttemptFailed = "attempt_failed",
    /// A cancelled attempt's ranks are being stopped.
    Cancelling = "cancelling",
    JobSucceeded = "job_succeeded",
    JobFailed = "job_failed",
    JobCancelled = "job_cancelled",
    JobRestarting = "job_restarting",
    /// A later attempt stepped after a fault; the event's data holds the recovery's breakdown.
    Recovered = "recovered",
    NodeRegistered = "node_registered",
    NodeReturned = "node_returned",
    NodeLost = "node_lost",
    NodeQuarantined = "node_quarantined",
    /// A node reported ranks of an attempt that has ended (back from a partition): stopped.
    LeftoverRanks = "leftover_ranks",
    /// A checkpoint failed verification somewhere: it is never restored from again.
    CheckpointCorrupt = "checkpoint_corrupt",
    /// A GPU failed a health check: the node's ranks are failed and it leaves scheduling.
    GpuFailed = "gpu_failed",
    /// A GPU health check warns (throttling, an application XID): reported, nothing stops.
    GpuWarning = "gpu_warning",
    /// Every GPU of a node that had failed passes its checks again: it is scheduled again.
    GpuRecovered = "gpu_recovered",
    /// The controller found it had not run for a while: every node got a fresh grace period.
    ControllerStalled = "controller_stalled",
    /// Too many nodes went silent at once: none is declared lost until they heartbeat again.
    LossBreakerOpen = "loss_breaker_open",
    LossBreakerClosed = "loss_breaker_closed",
    /// A fault injected on purpose (`myriad chaos`).
    Chaos = "chaos",
}

impl Event {
    /// Whether this event is of `kind`.
    pub fn is(&self, kind: EventKind) -> bool {
        self.kind == kind.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        for &kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("no_such_kind"), None);
    }
}
