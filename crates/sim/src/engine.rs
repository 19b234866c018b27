//! The event loop: fake agents and a fake training job around the controller's real core.
//!
//! Agents only speak when they have news (a command carried out, a rank that exited): between
//! events every live agent is taken to have heartbeated with nothing new ([`Core::alive_all`]),
//! so the controller's clock and its node-loss detection stay exact without simulating billions
//! of idle heartbeats.

use std::collections::{BTreeMap, HashMap, VecDeque};

use myriad_core::{Core, CoreConfig, JobState, NodeId, Queued};
use proto::api::{
    CheckpointReport, Command, HangReport, HeartbeatRequest, JobId, RankReport, RankState, RegisterRequest,
    RestoreSpec, StepTime, Tier,
};
use proto::events::EventKind;
use proto::node::{NodeState, RankEntry, RankKey};
use proto::spec::JobSpec;

use crate::rng::Rng;
use crate::{ClassStats, Config, FaultKind, LostGpuHours, Report};

pub const LAUNCH_TIMEOUT_S: f64 = 600.0;
const TICK_MS: u64 = 100;
const WEEK_MS: u64 = 7 * 86_400_000;
/// In-memory checkpoints an agent keeps per job, and persisted ones the leader reports.
const KEEP: usize = 2;

fn ms(seconds: f64) -> u64 {
    (seconds * 1000.0).round() as u64
}

#[derive(Clone, Debug)]
enum Change {
    None,
    Port { job_id: JobId, attempt: u32 },
    Run { job_id: JobId, attempt: u32 },
    Exit { job_id: JobId, attempt: u32, code: Option<i32>, signal: Option<i32>, stalled_ms: Option<u64> },
}

#[derive(Debug)]
enum Ev {
    Fault,
    Beat(usize, Change),
    Tick,
    Repaired(usize),
    Week,
    Resubmit,
}

/// What is due, earliest first; ties in the order they were scheduled, so a seed replays exactly.
/// A list per millisecond rather than a heap of events: a restart schedules its 12,500 nodes'
/// answers for the same few moments, which are then one append and one pop each.
#[derive(Default)]
struct Queue {
    due: BTreeMap<u64, VecDeque<Ev>>,
}

impl Queue {
    fn push(&mut self, at_ms: u64, ev: Ev) {
        self.due.entry(at_ms).or_default().push_back(ev);
    }

    fn pop(&mut self) -> Option<(u64, Ev)> {
        let mut first = self.due.first_entry()?;
        let at_ms = *first.key();
        let ev = first.get_mut().pop_front().expect("no empty list is kept");
        if first.get().is_empty() {
            first.remove();
        }
        Some((at_ms, ev))
    }

    fn peek(&self) -> Option<(u64, &Ev)> {
        self.due.first_key_value().map(|(&at_ms, evs)| (at_ms, evs.front().expect("no empty list is kept")))
    }
}

/// Each node runs one rank (local rank 0) standing for its GPUs.
struct SimRank {
    state: RankState,
    exited_at_ms: Option<u64>,
    hang: Option<HangReport>,
}

impl RankEntry for SimRank {
    fn state(&self) -> RankState {
        self.state
    }
    fn report(&self, key: RankKey) -> RankReport {
        RankReport {
            exited_at_ms: self.exited_at_ms,
            hang: self.hang.clone(),
            ..RankReport::new(key, self.state)
        }
    }
}

/// A command of the controller as an agent carries it out.
enum Act {
    Port(JobId, u32),
    Launch { job_id: JobId, attempt: u32, leader: bool, restore: Option<(u64, bool)> },
    Stop(JobId, u32),
    Forget(JobId, u32),
    Purge(JobId),
}

struct Agent {
    name: String,
    /// The core's id for the node, from its first registration.
    id: NodeId,
    spare: bool,
    /// False while a hardware fault has the node out.
    up: bool,
    /// Quarantined by the controller: a person releases it after `repair_h`.
    quarantined: bool,
    /// Its ranks, ports and the newest command carried out (acknowledged on the next heartbeat).
    node: NodeState<SimRank>,
    /// In-memory checkpoints held: (job, step), newest last.
    memory: Vec<(JobId, u64)>,
}

/// The job's training as the ranks of one attempt carry it out.
struct Training {
    job_id: JobId,
    attempt: u32,
    leader: usize,
    buddy: Option<usize>,
    /// Steps are being made (every rank up, no fault since the attempt began).
    live: bool,
    next_step: u64,
    next_begin_ms: u64,
    /// A checkpoint whose stall ends at `ready_ms`: (step, ready_ms, memory tier, persisted tier).
    pending_checkpoint: Option<(u64, u64, bool, bool)>,
    /// Steps done and not yet reported to the controller.
    unreported: Vec<StepTime>,
    last_step: u64,
    persisted: Vec<u64>,
}

pub struct Engine<'a> {
    cfg: &'a Config,
    core: Core,
    rng: Rng,
    agents: Vec<Agent>,
    index: HashMap<String, usize>,
    /// The agent of each of the core's node ids.
    agent_of: Vec<usize>,
    /// Agents whose node is down (they do not heartbeat), by agent.
    silent: Vec<bool>,
    queue: Queue,
    /// [`Engine::carry_out`]'s list of what to do, kept for its room.
    acts: Vec<Act>,
    /// [`Engine::report`]'s heartbeat, written over for each node's report, kept for its room.
    req: HeartbeatRequest,
    spec: JobSpec,
    jobs: Vec<JobId>,
    training: Option<Training>,
    waiting: bool,
    /// Fault class whose recovery is open (attributed when the controller reports it recovered).
    open_class: Option<usize>,
    class_stats: Vec<ClassStats>,
    interventions: Vec<(f64, String)>,
    quarantined: u64,
    stall_ms: u64,
    controller_events: u64,
    week_committed_ms: Vec<f64>,
    horizon_ms: u64,
    timeout_ms: u64,
}

impl<'a> Engine<'a> {
    pub fn new(cfg: &'a Config) -> Engine<'a> {
        let heartbeat_interval_ms = ms(cfg.heartbeat_s).max(1);
        let core_cfg = CoreConfig {
            heartbeat_interval_ms,
            launch_timeout_ms: ms(LAUNCH_TIMEOUT_S),
            tick_ms: TICK_MS,
            fence_lease_heartbeats: cfg.fence_lease_heartbeats,
            ..CoreConfig::default()
        };
        let timeout_ms = (heartbeat_interval_ms * core_cfg.node_timeout_heartbeats as u64)
            .saturating_sub(2 * core_cfg.tick_ms);
        let regular = cfg.nodes() as usize;
        let agents: Vec<Agent> = (0..regular + cfg.spare_nodes as usize)
            .map(|i| Agent {
                name: if i < regular { format!("n{i:05}") } else { format!("s{:05}", i - regular) },
                spare: i >= regular,
                id: NodeId(u32::MAX),
                up: true,
                quarantined: false,
                node: NodeState::default(),
                memory: Vec::new(),
            })
            .collect();
        let index = agents.iter().enumerate().map(|(i, a)| (a.name.clone(), i)).collect();
        let spec = JobSpec {
            name: "simulated".into(),
            argv: vec!["train".into()],
            env: BTreeMap::new(),
            nodes: regular as u32,
            ranks_per_node: 1,
            spares: cfg.spare_nodes,
            max_restarts: cfg.max_restarts,
            checkpoint_dir: None,
            workdir: None,
            run_id: None,
            checkpoint_every: cfg.memory_every_steps.max(1),
            persist_every: cfg.persist_every_steps.max(1),
        };
        Engine {
            cfg,
            core: Core::new(core_cfg),
            rng: Rng::new(cfg.seed),
            silent: vec![false; agents.len()],
            agents,
            index,
            agent_of: Vec::new(),
            queue: Queue::default(),
            acts: Vec::new(),
            req: HeartbeatRequest::default(),
            spec,
            jobs: Vec::new(),
            training: None,
            waiting: false,
            open_class: None,
            class_stats: vec![ClassStats::default(); cfg.classes.len()],
            interventions: Vec::new(),
            quarantined: 0,
            stall_ms: 0,
            controller_events: 0,
            week_committed_ms: vec![0.0],
            horizon_ms: ms(cfg.days * 86_400.0),
            timeout_ms,
        }
    }

    fn at(&mut self, at_ms: u64, ev: Ev) {
        self.queue.push(at_ms, ev);
    }

    pub fn run(mut self) -> Report {
        for i in 0..self.agents.len() {
            self.register(i, 0);
        }
        let id = self.core.submit(self.spec.clone(), 0).expect("the simulated job fits its cluster");
        self.jobs.push(id);
        self.after(0);
        self.schedule_fault(0);
        let mut week = WEEK_MS;
        while week <= self.horizon_ms {
            self.at(week, Ev::Week);
            week += WEEK_MS;
        }
        while let Some((now, ev)) = self.queue.pop() {
            if now > self.horizon_ms {
                break;
            }
            match ev {
                Ev::Fault => self.fault(now),
                Ev::Beat(i, change) => {
                    // Heartbeats that arrive in the same millisecond (a whole job's nodes answering
                    // one stop) are carried out together.
                    self.report(i, change, now);
                    let more = self
                        .queue
                        .peek()
                        .is_some_and(|(at_ms, ev)| at_ms == now && matches!(ev, Ev::Beat(..)));
                    if !more {
                        self.after(now);
                    }
                }
                Ev::Tick => {
                    self.alive_all(now);
                    self.core.tick(now);
                    self.after(now);
                }
                Ev::Repaired(i) => self.repaired(i, now),
                Ev::Week => {
                    self.sync(now);
                    let committed = self.committed_ms();
                    self.week_committed_ms.push(committed);
                }
                Ev::Resubmit => {
                    let id = self.core.submit(self.spec.clone(), now).expect("the simulated job fits");
                    self.jobs.push(id);
                    self.after(now);
                }
            }
        }
        let end = self.horizon_ms;
        self.sync(end);
        self.finish()
    }

    fn register(&mut self, i: usize, now: u64) {
        let a = &self.agents[i];
        let req = RegisterRequest {
            name: a.name.clone(),
            slots: 1,
            cores: 1,
            addr: a.name.clone(),
            http_port: 1,
            spare: a.spare,
            gpus: Vec::new(),
            driver: None,
        };
        self.core.register(req, now).expect("simulated node names are valid");
        let id = self.core.node_id(&self.agents[i].name).expect("just registered");
        self.agents[i].id = id;
        if self.agent_of.len() <= id.index() {
            self.agent_of.resize(id.index() + 1, usize::MAX);
        }
        self.agent_of[id.index()] = i;
    }

    /// Every agent up heartbeats at `now` with nothing new.
    fn alive_all(&mut self, now: u64) {
        let (silent, agent_of) = (&self.silent, &self.agent_of);
        self.core.alive_all(now, |id| silent[agent_of[id.index()]]);
    }

    fn schedule_fault(&mut self, now: u64) {
        let per_hour = self.cfg.faults_per_hour();
        if per_hour <= 0.0 {
            return;
        }
        let gap_ms = self.rng.exponential(3_600_000.0 / per_hour);
        let at = now.saturating_add(gap_ms.ceil() as u64);
        self.at(at, Ev::Fault);
    }

    /// The class of the next fault, by rate.
    fn pick_class(&mut self) -> usize {
        let total: f64 = self.cfg.classes.iter().map(|c| c.rate_per_gpu_hour).sum();
        let mut x = self.rng.uniform() * total;
        for (i, c) in self.cfg.classes.iter().enumerate() {
            if x < c.rate_per_gpu_hour {
                return i;
            }
            x -= c.rate_per_gpu_hour;
        }
        self.cfg.classes.len() - 1
    }

    /// Whether node `i` runs a rank of the attempt that is making steps.
    fn runs_live_rank(&self, i: usize) -> bool {
        let Some(t) = self.training.as_ref().filter(|t| t.live) else { return false };
        self.agents[i].node.ranks_of(t.job_id, t.attempt).any(|(_, r)| r.state.is_running())
    }

    fn fault(&mut self, now: u64) {
        self.schedule_fault(now);
        let class = self.pick_class();
        let i = self.rng.below(self.agents.len() as u64) as usize;
        self.class_stats[class].faults += 1;
        let kind = self.cfg.classes[class].kind;
        if !self.agents[i].up {
            return;
        }
        let interrupts = self.runs_live_rank(i);
        if interrupts {
            // The job stops making progress the moment the fault hits; what it did until then
            // is reported first, as the agents' heartbeats would have.
            self.sync(now);
            self.training.as_mut().expect("live").live = false;
            self.class_stats[class].interruptions += 1;
            self.open_class.get_or_insert(class);
        }
        match kind {
            FaultKind::Node => {
                // The node's last heartbeat fell somewhere in the interval before the fault.
                let interval_ms = ms(self.cfg.heartbeat_s).max(1);
                let last_ms = now.saturating_sub(self.rng.below(interval_ms));
                self.alive_all(last_ms);
                let a = &mut self.agents[i];
                a.up = false;
                a.node.ranks.clear();
                a.node.ports.clear();
                a.memory.clear();
                self.silent[i] = true;
                // The controller checks every tick; the first after the silence passes its limit.
                // (Its last heartbeat may be the one that just reported its steps.)
                let last_ms = self.core.node_by_id(self.agents[i].id).last_heartbeat_ms;
                let detect_ms = ((last_ms + self.timeout_ms) / TICK_MS + 1) * TICK_MS;
                self.at(detect_ms, Ev::Tick);
                self.at(now + ms(self.cfg.repair_h * 3600.0), Ev::Repaired(i));
            }
            FaultKind::Crash | FaultKind::Hang if interrupts => {
                let t = self.training.as_ref().expect("interrupted");
                let (job_id, attempt) = (t.job_id, t.attempt);
                let (detect_ms, code, signal, stalled_ms) = if kind == FaultKind::Crash {
                    (ms(self.cfg.crash_detect_s), Some(1), None, None)
                } else {
                    let d = ms(self.cfg.hang_floor_s.max(self.cfg.hang_factor * self.cfg.step_s));
                    (d, None, Some(9), Some(d))
                };
                let change = Change::Exit { job_id, attempt, code, signal, stalled_ms };
                self.at(now + detect_ms, Ev::Beat(i, change));
            }
            // A software fault on a node with no running rank of the job changes nothing.
            FaultKind::Crash | FaultKind::Hang => {}
        }
    }

    fn repaired(&mut self, i: usize, now: u64) {
        let a = &self.agents[i];
        if a.up && !a.quarantined {
            return;
        }
        if a.up && !self.core.node_by_id(a.id).allocations.is_empty() {
            // A person restarts a quarantined agent only once its job has moved off it.
            self.at(now + 3_600_000, Ev::Repaired(i));
            return;
        }
        let a = &mut self.agents[i];
        a.up = true;
        a.quarantined = false;
        a.node = NodeState::default();
        a.memory.clear();
        self.silent[i] = false;
        self.register(i, now);
        self.after(now);
    }

    /// Carries the training forward to `now`: steps, checkpoint stalls, checkpoints held.
    fn advance(&mut self, now: u64) {
        let step_ms = ms(self.cfg.step_s);
        let (every_memory, every_persist) = (self.cfg.memory_every_steps, self.cfg.persist_every_steps);
        let (memory_stall_ms, persist_stall_ms) = (ms(self.cfg.memory_stall_s), ms(self.cfg.persist_stall_s));
        let Some(t) = self.training.as_mut().filter(|t| t.live) else { return };
        loop {
            if let Some((step, ready_ms, memory, persist)) = t.pending_checkpoint {
                if ready_ms > now {
                    break;
                }
                t.pending_checkpoint = None;
                if memory {
                    for holder in [Some(t.leader), t.buddy].into_iter().flatten() {
                        let held = &mut self.agents[holder].memory;
                        held.push((t.job_id, step));
                        let mine = held.iter().filter(|(j, _)| *j == t.job_id).count();
                        if mine > KEEP {
                            let oldest = held.iter().position(|(j, _)| *j == t.job_id).expect("counted");
                            held.remove(oldest);
                        }
                    }
                }
                if persist {
                    t.persisted.push(step);
                    if t.persisted.len() > KEEP {
                        t.persisted.remove(0);
                    }
                }
                continue;
            }
            let end_ms = t.next_begin_ms + step_ms;
            if end_ms > now {
                break;
            }
            let step = t.next_step;
            t.unreported.push(StepTime { step, ms: step_ms as f64, end_ms });
            t.last_step = step;
            t.next_step += 1;
            let memory = every_memory > 0 && step.is_multiple_of(every_memory);
            let persist = every_persist > 0 && step.is_multiple_of(every_persist);
            let stall_ms = memory as u64 * memory_stall_ms + persist as u64 * persist_stall_ms;
            self.stall_ms += stall_ms;
            t.next_begin_ms = end_ms + stall_ms;
            if memory || persist {
                t.pending_checkpoint = Some((step, end_ms + stall_ms, memory, persist));
            }
        }
    }

    /// Brings the controller up to date with the training: the leader's agent heartbeats.
    fn sync(&mut self, now: u64) {
        self.advance(now);
        if let Some(leader) = self.training.as_ref().filter(|t| t.live).map(|t| t.leader) {
            self.beat(leader, Change::None, now);
        }
    }

    fn beat(&mut self, i: usize, change: Change, now: u64) {
        self.report(i, change, now);
        self.after(now);
    }

    /// Node `i`'s agent applies `change` and heartbeats its full state.
    fn report(&mut self, i: usize, change: Change, now: u64) {
        if !self.agents[i].up {
            return;
        }
        let a = &mut self.agents[i];
        match change {
            Change::None => {}
            Change::Port { job_id, attempt } => a.node.reserve(job_id, attempt, 29_500),
            Change::Run { job_id, attempt } => {
                let rank = SimRank { state: RankState::Running { pid: 1 }, exited_at_ms: None, hang: None };
                a.node.insert((job_id, attempt, 0), rank);
            }
            Change::Exit { job_id, attempt, code, signal, stalled_ms } => {
                let rank = a.node.ranks.get_mut(&(job_id, attempt, 0));
                if let Some(r) = rank.filter(|r| r.state.is_running()) {
                    r.state = RankState::Exited { code, signal };
                    r.exited_at_ms = Some(now);
                    r.hang = stalled_ms.map(|stalled_ms| HangReport {
                        stalled_ms,
                        threshold_ms: stalled_ms,
                        phase: None,
                        stack: String::new(),
                    });
                }
            }
        }
        let leads = self.training.as_ref().filter(|t| t.leader == i).map(|t| (t.job_id, t.attempt));
        let a = &self.agents[i];
        let mut req = std::mem::take(&mut self.req);
        a.node.report_into(&mut req);
        if let Some(key) = leads {
            let t = self.training.as_mut().expect("leads");
            if let Some(report) = req.ranks.iter_mut().find(|r| (r.job_id, r.attempt) == key) {
                report.steps = std::mem::take(&mut t.unreported);
                report.step = (t.last_step > 0).then_some(t.last_step);
            }
        }
        let held =
            a.memory.iter().map(|&(job_id, step)| CheckpointReport { job_id, step, tier: Tier::Memory });
        req.checkpoints.extend(held);
        if let Some(t) = self.training.as_ref().filter(|t| t.leader == i) {
            let persisted = t.persisted.iter().map(|&step| CheckpointReport {
                job_id: t.job_id,
                step,
                tier: Tier::Persisted,
            });
            req.checkpoints.extend(persisted);
        }
        let id = a.id;
        self.core.report(id, &req, now);
        self.req = req;
    }

    /// Carries out what the controller decided: events, and the commands it queued for nodes.
    fn after(&mut self, now: u64) {
        if self.cfg.checked {
            self.core.check_invariants();
        }
        let (commanded, events) = self.core.take_commanded();
        self.controller_events += events.len() as u64;
        for e in events {
            match EventKind::parse(&e.kind) {
                Some(EventKind::Recovered) => {
                    let lost_s = e.data.as_ref().map_or(0.0, |d| {
                        ["detection_s", "restart_s", "recompute_s"]
                            .iter()
                            .map(|k| d[k].as_f64().unwrap_or(0.0))
                            .sum::<f64>()
                    });
                    if let Some(c) = self.open_class.take() {
                        self.class_stats[c].lost_gpu_hours += lost_s * self.cfg.gpus as f64 / 3600.0;
                    }
                }
                Some(EventKind::JobFailed) => {
                    self.intervention(now, format!("job failed for good: {}", e.message));
                    self.at(now + ms(self.cfg.person_h * 3600.0), Ev::Resubmit);
                }
                Some(EventKind::NodeQuarantined) => {
                    self.quarantined += 1;
                    if let Some(&i) = e.node.as_ref().and_then(|n| self.index.get(n)) {
                        self.agents[i].quarantined = true;
                        self.at(now + ms(self.cfg.repair_h * 3600.0), Ev::Repaired(i));
                    }
                }
                _ => {}
            }
        }
        for id in commanded {
            let i = self.agent_of[id.index()];
            if self.agents[i].up {
                self.carry_out(i, now);
            }
        }
        let queued =
            self.jobs.last().and_then(|&id| self.core.job(id)).is_some_and(|j| j.state == JobState::Queued);
        if queued && !self.waiting {
            self.intervention(
                now,
                "no healthy node left to replace a lost one: the job waits for repairs".into(),
            );
        }
        self.waiting = queued;
    }

    fn intervention(&mut self, now: u64, why: String) {
        self.interventions.push((now as f64 / 86_400_000.0, why));
    }

    fn carry_out(&mut self, i: usize, now: u64) {
        let node = self.core.node_by_id(self.agents[i].id);
        let acked = self.agents[i].node.acked_command_seq;
        let mut newest = acked;
        let restore = |r: &Option<RestoreSpec>| r.as_ref().map(|r| (r.step, !r.sources.is_empty()));
        // The list keeps its room from node to node (a restart carries out 12,500 nodes' stops).
        let mut acts = std::mem::take(&mut self.acts);
        acts.clear();
        let news = node.commands.iter().filter(|c| c.seq > acked).map(|c| {
            newest = newest.max(c.seq);
            match &c.command {
                Queued::Launch { plan, group, .. } => Act::Launch {
                    job_id: plan.job_id,
                    attempt: plan.attempt,
                    leader: *group == 0,
                    restore: restore(&plan.restore),
                },
                Queued::Command(Command::Launch(l)) => Act::Launch {
                    job_id: l.job_id,
                    attempt: l.attempt,
                    leader: l.leader,
                    restore: restore(&l.restore),
                },
                Queued::Command(Command::ReservePort { job_id, attempt }) => Act::Port(*job_id, *attempt),
                Queued::Command(Command::Stop { job_id, attempt }) => Act::Stop(*job_id, *attempt),
                Queued::Command(Command::Forget { job_id, attempt }) => Act::Forget(*job_id, *attempt),
                Queued::Command(Command::Purge { job_id }) => Act::Purge(*job_id),
            }
        });
        acts.extend(news);
        self.agents[i].node.ack(newest);
        for act in acts.drain(..) {
            match act {
                Act::Port(job_id, attempt) => self.at(now, Ev::Beat(i, Change::Port { job_id, attempt })),
                Act::Launch { job_id, attempt, leader, restore } => {
                    let running_ms = now + ms(self.cfg.launch_s);
                    self.at(running_ms, Ev::Beat(i, Change::Run { job_id, attempt }));
                    if leader {
                        self.begin_training(i, job_id, attempt, restore, running_ms);
                    }
                }
                Act::Stop(job_id, attempt) => {
                    if self
                        .training
                        .as_ref()
                        .is_some_and(|t| t.live && (t.job_id, t.attempt) == (job_id, attempt))
                    {
                        self.sync(now);
                        self.training.as_mut().expect("checked").live = false;
                    }
                    let change =
                        Change::Exit { job_id, attempt, code: None, signal: Some(15), stalled_ms: None };
                    self.at(now + ms(self.cfg.stop_s), Ev::Beat(i, change));
                }
                Act::Forget(job_id, attempt) => {
                    self.agents[i].node.forget(job_id, attempt);
                }
                Act::Purge(job_id) => self.agents[i].memory.retain(|&(j, _)| j != job_id),
            }
        }
        self.acts = acts;
    }

    /// The attempt's first step begins once its ranks run and have loaded the restore point; it
    /// makes no progress at all if one of its nodes is already down.
    fn begin_training(
        &mut self,
        leader: usize,
        job_id: JobId,
        attempt: u32,
        restore: Option<(u64, bool)>,
        running_ms: u64,
    ) {
        let nodes: Vec<usize> = self
            .core
            .job(job_id)
            .and_then(|j| j.attempt.as_ref())
            .map(|a| a.nodes.iter().map(|n| self.agent_of[n.index()]).collect())
            .unwrap_or_default();
        let live = nodes.iter().all(|&n| self.agents[n].up);
        let restore_ms = match restore {
            Some((_, true)) => ms(self.cfg.restore_memory_s),
            Some((_, false)) => ms(self.cfg.restore_persisted_s),
            None => 0,
        };
        let persisted = match &self.training {
            Some(t) if t.job_id == job_id => t.persisted.clone(),
            _ => Vec::new(),
        };
        let from = restore.map_or(0, |(step, _)| step);
        self.training = Some(Training {
            job_id,
            attempt,
            leader,
            buddy: nodes.get(1).copied(),
            live,
            next_step: from + 1,
            next_begin_ms: running_ms + restore_ms,
            pending_checkpoint: None,
            unreported: Vec::new(),
            last_step: from,
            persisted,
        });
    }

    fn committed_ms(&self) -> f64 {
        self.jobs.iter().filter_map(|&id| self.core.job(id)).map(|j| j.account.committed_ms()).sum()
    }

    fn finish(self) -> Report {
        let wall_ms = self.horizon_ms as f64;
        let committed = self.committed_ms();
        let gpu_hours = |ms: f64| ms * self.cfg.gpus as f64 / 3.6e6;
        let accounts: Vec<_> =
            self.jobs.iter().filter_map(|&id| self.core.job(id)).map(|j| &j.account).collect();
        let startup: f64 = accounts.iter().map(|a| a.startup_ms.unwrap_or(0.0)).sum();
        let detection: f64 = accounts.iter().map(|a| a.detection_ms).sum();
        let restart: f64 = accounts.iter().map(|a| a.restart_ms).sum();
        let recompute: f64 = accounts.iter().map(|a| a.recompute_ms).sum();
        let interruptions: u64 = accounts.iter().map(|a| a.faults as u64).sum();
        let stall = self.stall_ms as f64;
        let other = wall_ms - committed - startup - detection - restart - recompute - stall;
        let weekly_ettr: Vec<f64> =
            self.week_committed_ms.windows(2).map(|w| (w[1] - w[0]) / WEEK_MS as f64).collect();
        let hours = self.cfg.days * 24.0;
        let n_interventions = self.interventions.len() as u64;
        Report {
            seed: self.cfg.seed,
            gpus: self.cfg.gpus,
            nodes: self.cfg.nodes(),
            spare_nodes: self.cfg.spare_nodes,
            days: self.cfg.days,
            ettr: committed / wall_ms,
            weekly_ettr_min: weekly_ettr.iter().copied().reduce(f64::min),
            weekly_ettr_median: crate::median(weekly_ettr.clone()),
            weekly_ettr,
            faults: self.class_stats.iter().map(|c| c.faults).sum(),
            interruptions,
            mean_hours_between_interruptions: (interruptions > 0).then(|| hours / interruptions as f64),
            manual_interventions: n_interventions,
            mean_days_between_interventions: (n_interventions > 0)
                .then(|| self.cfg.days / n_interventions as f64),
            intervention_log: self.interventions,
            nodes_quarantined: self.quarantined,
            steps: self.training.as_ref().map_or(0, |t| t.last_step),
            lost_gpu_hours: LostGpuHours {
                startup: gpu_hours(startup),
                detection: gpu_hours(detection),
                restart: gpu_hours(restart),
                recomputation: gpu_hours(recompute),
                checkpointing: gpu_hours(stall),
                other: gpu_hours(other),
            },
            by_class: self
                .cfg
                .classes
                .iter()
                .zip(self.class_stats)
                .map(|(c, s)| (c.name.clone(), s))
                .collect(),
            controller_events: self.controller_events,
        }
    }
}
