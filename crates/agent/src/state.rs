//! What the agent holds: each rank's process, progress and hang report; the node's protocol state
//! (`proto::node::NodeState`: ranks, reserved ports, acknowledgements); the listeners that keep
//! reserved ports taken; and the jobs whose rank 0 runs here. One mutex guards it, held only for
//! short, non-blocking sections.

use proto::api::{CheckpointReport, HangReport, JobId, RankReport, RankState, StepTime};
use proto::node::{NodeState, RankEntry, RankKey};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

/// Step times kept (and reported) per rank.
pub(crate) const STEPS_KEPT: usize = 32;
/// Steps whose compute times make up the median a straggler is judged on.
pub(crate) const COMPUTE_WINDOW: usize = 10;

pub(crate) struct Rank {
    pub state: RankState,
    pub pid: Option<u32>,
    pub step: Option<u64>,
    pub loss: Option<f64>,
    pub stopping: bool,
    /// Killed by the fencing lease ([`crate::fence`]).
    pub fenced: bool,
    pub exited_at_ms: Option<u64>,
    /// Last progress message (or the launch): the hang detector's clock.
    pub last_progress: Instant,
    /// Whether the rank speaks the progress protocol at all; silent programs are never "hung".
    pub speaks: bool,
    pub phase: Option<String>,
    pub steps: VecDeque<StepTime>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub hang: Option<HangReport>,
    /// Compute time of the recent steps (newest last).
    pub compute_ms: VecDeque<f64>,
    /// The GPU the rank is bound to (its NVML index), on a GPU node.
    pub gpu: Option<u32>,
}

impl Rank {
    pub fn new(state: RankState, pid: Option<u32>, now: Instant) -> Rank {
        Rank {
            state,
            pid,
            step: None,
            loss: None,
            stopping: false,
            fenced: false,
            exited_at_ms: None,
            last_progress: now,
            speaks: false,
            phase: None,
            steps: VecDeque::new(),
            tokens_per_s: None,
            mfu: None,
            hang: None,
            compute_ms: VecDeque::new(),
            gpu: None,
        }
    }

    /// Median compute time over the last [`COMPUTE_WINDOW`] steps, once the window is full.
    pub fn median_compute_ms(&self) -> Option<f64> {
        median(self.compute_ms.iter().copied(), COMPUTE_WINDOW)
    }

    /// Median of the recent step times, once there are a few.
    pub fn median_step_ms(&self) -> Option<f64> {
        median(self.steps.iter().map(|s| s.ms), 3)
    }
}

impl RankEntry for Rank {
    fn state(&self) -> RankState {
        self.state
    }

    fn report(&self, key: RankKey) -> RankReport {
        RankReport {
            step: self.step,
            loss: self.loss,
            exited_at_ms: self.exited_at_ms,
            hang: self.hang.clone(),
            steps: self.steps.iter().copied().collect(),
            tokens_per_s: self.tokens_per_s,
            mfu: self.mfu,
            compute_ms: self.median_compute_ms(),
            ..RankReport::new(key, self.state)
        }
    }
}

/// The (upper) median of `values`, when there are at least `at_least` of them.
fn median(values: impl Iterator<Item = f64>, at_least: usize) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.len() < at_least.max(1) {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

#[derive(Default)]
pub(crate) struct Node {
    /// Ranks, reserved ports, acknowledged commands: the protocol's own node state.
    pub state: NodeState<Rank>,
    /// Each reservation keeps its listener open until the attempt's ranks are launched, so no
    /// other process can take the port in between.
    pub listeners: BTreeMap<(JobId, u32), std::net::TcpListener>,
    /// Jobs whose rank 0 runs here: this agent replicates and persists their checkpoints.
    pub leading: BTreeMap<JobId, Leader>,
    /// Checkpoints that failed to verify, reported until the job is purged.
    pub bad: Vec<CheckpointReport>,
}

pub(crate) struct Leader {
    /// The attempt whose rank 0 this node runs: checkpoints of any other are not copied.
    pub attempt: u32,
    pub buddy: Option<String>,
    pub persist_dir: PathBuf,
    pub checkpoint_every: u64,
    pub persist_every: u64,
    /// A copy is under way; `pending` is the newest step that arrived meanwhile.
    pub busy: bool,
    pub pending: Option<u64>,
}

impl Node {
    /// The newest attempt of `job_id` this node has launched ranks of.
    pub fn newest_attempt(&self, job_id: JobId) -> Option<u32> {
        self.state.ranks.keys().filter(|k| k.0 == job_id).map(|k| k.1).max()
    }

    /// Pids of the running ranks matching `which`.
    pub fn running_pids(&self, which: impl Fn(&RankKey) -> bool) -> Vec<u32> {
        self.state
            .ranks
            .iter()
            .filter(|(k, r)| which(k) && r.state.is_running())
            .filter_map(|(_, r)| r.pid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_reports_its_figures_and_a_median_only_once_it_has_enough() {
        let mut r = Rank::new(RankState::Running { pid: 42 }, Some(42), Instant::now());
        r.step = Some(3);
        r.loss = Some(2.0);
        for (step, ms) in [(1, 100.0), (2, 300.0)] {
            r.steps.push_back(StepTime { step, ms, end_ms: step * 1000 });
        }
        assert_eq!(r.median_step_ms(), None, "two steps are not a median yet");
        r.steps.push_back(StepTime { step: 3, ms: 200.0, end_ms: 3000 });
        assert_eq!(r.median_step_ms(), Some(200.0));
        r.compute_ms.extend((0..COMPUTE_WINDOW - 1).map(|i| i as f64));
        let report = r.report((5, 1, 2));
        assert_eq!((report.job_id, report.attempt, report.local_rank), (5, 1, 2));
        assert_eq!((report.step, report.loss, report.steps.len()), (Some(3), Some(2.0), 3));
        assert_eq!(report.compute_ms, None, "the straggler window is not full");
        r.compute_ms.push_back(100.0);
        assert_eq!(r.report((5, 1, 2)).compute_ms, Some(5.0));
    }

    #[test]
    fn running_pids_lists_only_matching_ranks_that_still_run() {
        let now = Instant::now();
        let mut node = Node::default();
        node.state.insert((1, 0, 0), Rank::new(RankState::Running { pid: 10 }, Some(10), now));
        node.state
            .insert((1, 0, 1), Rank::new(RankState::Exited { code: Some(0), signal: None }, Some(11), now));
        node.state.insert((1, 1, 0), Rank::new(RankState::Running { pid: 12 }, Some(12), now));
        assert_eq!(node.running_pids(|k| k.0 == 1 && k.1 == 0), vec![10]);
        assert_eq!(node.running_pids(|k| k.1 < 2), vec![10, 12]);
    }
}
