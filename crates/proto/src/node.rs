//! The agent's side of the heartbeat protocol, as state: the ranks a node holds, the ports it
//! reserved and the newest command it carried out; what each command does to that state; and the
//! full-state report a heartbeat carries. The real agent, the core's tests, the simulator and the
//! control-plane bench keep their nodes in this one type, so none of them can drift from the
//! protocol: commands are carried out once, in order, idempotently, and acknowledged by sequence
//! number; reports are full state, never deltas.

use crate::api::{
    Command, HeartbeatRequest, JobId, LaunchSpec, PortReport, RankReport, RankState, SeqCommand,
};
use crate::vec_map::VecMap;

/// One rank on a node: job, attempt, local rank.
pub type RankKey = (JobId, u32, u32);

/// What a node keeps per rank, whatever else it keeps.
pub trait RankEntry {
    fn state(&self) -> RankState;
    /// The rank's report: [`RankReport::new`] and whatever figures the holder has.
    fn report(&self, key: RankKey) -> RankReport;
}

impl RankReport {
    /// A report of `state` and nothing else.
    pub fn new((job_id, attempt, local_rank): RankKey, state: RankState) -> RankReport {
        RankReport {
            job_id,
            attempt,
            local_rank,
            state,
            step: None,
            loss: None,
            exited_at_ms: None,
            hang: None,
            steps: Vec::new(),
            tokens_per_s: None,
            mfu: None,
            compute_ms: None,
        }
    }
}

/// What a command leaves for the holder to do once the state's own part is done.
#[derive(Debug, PartialEq)]
pub enum Todo<'a> {
    /// Already done, or nothing to do: the command was repeated, or its effect is all in the state.
    Nothing,
    /// Find a free port for this attempt's store and [`NodeState::reserve`] it.
    ReservePort { job_id: JobId, attempt: u32 },
    /// Start these local ranks of `spec` (the others already run) and [`NodeState::insert`] them.
    Launch { spec: &'a LaunchSpec, fresh: Vec<u32> },
    /// Stop these ranks (running when the command came).
    Stop { ranks: Vec<RankKey> },
    /// The job has ended: drop its in-memory checkpoints.
    Purge { job_id: JobId },
}

#[derive(Debug)]
pub struct NodeState<R> {
    pub ranks: VecMap<RankKey, R>,
    /// The store port reserved for each attempt.
    pub ports: VecMap<(JobId, u32), u16>,
    /// Every command up to this sequence number has been carried out.
    pub acked_command_seq: u64,
}

impl<R> Default for NodeState<R> {
    fn default() -> Self {
        NodeState { ranks: VecMap::default(), ports: VecMap::default(), acked_command_seq: 0 }
    }
}

impl<R: RankEntry> NodeState<R> {
    /// The commands of a reply (or a queue) not carried out yet, oldest first.
    pub fn pending<'a>(
        &self,
        commands: impl IntoIterator<Item = &'a SeqCommand>,
    ) -> impl Iterator<Item = &'a SeqCommand> {
        let acked = self.acked_command_seq;
        commands.into_iter().filter(move |c| c.seq > acked)
    }

    /// `seq` has been carried out (with everything before it).
    pub fn ack(&mut self, seq: u64) {
        self.acked_command_seq = self.acked_command_seq.max(seq);
    }

    /// Carries out the state's part of `command` and says what is left for the holder. Every
    /// command is idempotent: a second reservation or launch leaves [`Todo::Nothing`], a second
    /// Stop names only ranks still running (none), and a Purge or Forget again removes nothing.
    pub fn apply<'a>(&mut self, command: &'a Command) -> Todo<'a> {
        match command {
            &Command::ReservePort { job_id, attempt } => {
                if self.ports.contains_key(&(job_id, attempt)) {
                    Todo::Nothing
                } else {
                    Todo::ReservePort { job_id, attempt }
                }
            }
            Command::Launch(spec) => {
                let fresh: Vec<u32> = spec
                    .local_ranks()
                    .filter(|&l| !self.ranks.contains_key(&(spec.job_id, spec.attempt, l)))
                    .collect();
                if fresh.is_empty() {
                    Todo::Nothing
                } else {
                    Todo::Launch { spec, fresh }
                }
            }
            &Command::Stop { job_id, attempt } => Todo::Stop {
                ranks: self
                    .ranks_of(job_id, attempt)
                    .filter(|(_, r)| r.state().is_running())
                    .map(|(&k, _)| k)
                    .collect(),
            },
            &Command::Forget { job_id, attempt } => {
                self.forget(job_id, attempt);
                Todo::Nothing
            }
            &Command::Purge { job_id } => Todo::Purge { job_id },
        }
    }

    /// The ranks of one attempt.
    pub fn ranks_of(&self, job_id: JobId, attempt: u32) -> impl Iterator<Item = (&RankKey, &R)> {
        self.ranks.range((job_id, attempt, 0), (job_id, attempt, u32::MAX))
    }

    /// The controller has recorded how this attempt's ranks ended: drop them (a rank still
    /// running stays until it is gone) and the attempt's port.
    pub fn forget(&mut self, job_id: JobId, attempt: u32) {
        self.ranks.retain(|k, r| !(k.0 == job_id && k.1 == attempt && !r.state().is_running()));
        self.ports.remove(&(job_id, attempt));
    }

    /// A fresh registration: the controller forgot what this node held, so exited ranks, ports
    /// and acknowledgements start over (ranks still running are reported again).
    pub fn forget_all_exited(&mut self) {
        self.ranks.retain(|_, r| r.state().is_running());
        self.ports.clear();
        self.acked_command_seq = 0;
    }

    /// Records a reservation [`Todo::ReservePort`] asked for; a repeated one keeps the first port.
    pub fn reserve(&mut self, job_id: JobId, attempt: u32, port: u16) {
        self.ports.insert_if_absent((job_id, attempt), port);
    }

    /// Records a rank [`Todo::Launch`] asked for; a rank already held stays as it is.
    pub fn insert(&mut self, key: RankKey, rank: R) {
        self.ranks.insert_if_absent(key, rank);
    }

    /// The heartbeat's full state. Checkpoints are the holder's to add.
    pub fn report(&self) -> HeartbeatRequest {
        let mut req = HeartbeatRequest::default();
        self.report_into(&mut req);
        req
    }

    /// [`NodeState::report`] written over `req`, whose lists keep their room: the simulator
    /// stands in for 12,500 agents and reports for them from one request.
    pub fn report_into(&self, req: &mut HeartbeatRequest) {
        req.acked_command_seq = self.acked_command_seq;
        req.ranks.clear();
        req.ranks.extend(self.ranks.iter().map(|(&k, r)| r.report(k)));
        req.ports.clear();
        let ports = self.ports.iter().map(|(&(job_id, attempt), &port)| PortReport { job_id, attempt, port });
        req.ports.extend(ports);
        req.checkpoints.clear();
        req.bad_checkpoints.clear();
        req.gpu_findings.clear();
    }
}

/// A holder whose ranks are their state alone (the core's tests).
impl RankEntry for RankState {
    fn state(&self) -> RankState {
        *self
    }
    fn report(&self, key: RankKey) -> RankReport {
        RankReport::new(key, *self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(job_id: JobId, attempt: u32, ranks_per_node: u32) -> Command {
        Command::Launch(Box::new(LaunchSpec {
            job_id,
            attempt,
            argv: vec!["train".into()],
            workdir: None,
            checkpoint_dir: "ckpt".into(),
            group_rank: 0,
            ranks_per_node,
            env: Vec::new(),
            restore: None,
            leader: true,
            buddy: None,
            checkpoint_every: 1,
            persist_every: 1,
        }))
    }

    #[test]
    fn every_command_is_idempotent_and_acknowledged_once() {
        let mut node: NodeState<RankState> = NodeState::default();
        let queue = vec![
            SeqCommand { seq: 1, command: Command::ReservePort { job_id: 1, attempt: 0 } },
            SeqCommand { seq: 2, command: launch(1, 0, 2) },
        ];
        let cmds: Vec<SeqCommand> = node.pending(&queue).cloned().collect();
        assert_eq!(cmds.len(), 2);
        assert_eq!(node.apply(&cmds[0].command), Todo::ReservePort { job_id: 1, attempt: 0 });
        node.reserve(1, 0, 29_500);
        assert_eq!(node.apply(&cmds[0].command), Todo::Nothing, "a repeated reservation keeps its port");
        let Todo::Launch { fresh, .. } = node.apply(&cmds[1].command) else { panic!("launch") };
        assert_eq!(fresh, vec![0, 1]);
        node.insert((1, 0, 0), RankState::Running { pid: 10 });
        let Todo::Launch { fresh, .. } = node.apply(&cmds[1].command) else { panic!("launch") };
        assert_eq!(fresh, vec![1], "only ranks not started yet start");
        node.insert((1, 0, 1), RankState::Running { pid: 11 });
        node.ack(2);
        node.ack(1);
        assert_eq!(node.pending(&queue).count(), 0, "acknowledged commands are never carried out again");

        let report = node.report();
        assert_eq!((report.acked_command_seq, report.ranks.len(), report.ports[0].port), (2, 2, 29_500));

        let stop = Command::Stop { job_id: 1, attempt: 0 };
        assert_eq!(node.apply(&stop), Todo::Stop { ranks: vec![(1, 0, 0), (1, 0, 1)] });
        node.ranks.insert((1, 0, 0), RankState::Exited { code: None, signal: Some(15) });
        assert_eq!(
            node.apply(&stop),
            Todo::Stop { ranks: vec![(1, 0, 1)] },
            "only running ranks are stopped"
        );
        node.apply(&Command::Forget { job_id: 1, attempt: 0 });
        assert_eq!(node.ranks.keys().copied().collect::<Vec<_>>(), vec![(1, 0, 1)], "a running rank is kept");
        assert!(node.ports.is_empty());
        node.forget_all_exited();
        assert_eq!((node.ranks.len(), node.acked_command_seq), (1, 0));
    }
}
