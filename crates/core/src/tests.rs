//! The core on an injected clock, with in-process fake agents that carry out commands the way the
//! real agent does (idempotently, acknowledging by sequence number).

use super::*;
use proto::api::{CheckpointReport, GpuFinding, HangReport, Tier};
use proto::node::{NodeState, Todo};

/// A fake agent: the ranks it runs and the ports it reserved (the protocol's own node state),
/// what it was asked to launch, and what its ranks report.
#[derive(Default)]
struct FakeAgent {
    node: NodeState<RankState>,
    launched_env: BTreeMap<(JobId, u32, u32), Vec<(String, String)>>,
    launched: Vec<LaunchSpec>,
    hangs: BTreeMap<(JobId, u32, u32), HangReport>,
    compute_ms: BTreeMap<(JobId, u32, u32), f64>,
    checkpoints: Vec<CheckpointReport>,
    bad: Vec<CheckpointReport>,
    gpu_findings: Vec<GpuFinding>,
    /// Step and loss its ranks report (default: step 7, loss 2.5), with one step time ending now.
    progress: Option<(u64, f64)>,
}

struct World {
    core: Core,
    now_ms: u64,
    agents: BTreeMap<String, FakeAgent>,
}

impl World {
    /// The names of the nodes of job `id`'s current attempt, in group order.
    fn nodes_of(&self, id: JobId) -> Vec<String> {
        self.core.names(&self.core.job(id).unwrap().attempt.as_ref().unwrap().nodes)
    }

    fn new(nodes: &[(&str, u32, bool)]) -> World {
        let mut w =
            World { core: Core::new(CoreConfig::default()), now_ms: 1_000_000, agents: BTreeMap::new() };
        for &(name, slots, spare) in nodes {
            let req = RegisterRequest {
                name: name.into(),
                slots,
                cores: 8,
                addr: format!("10.0.0.{}", w.agents.len() + 1),
                http_port: 7000,
                spare,
                gpus: Vec::new(),
                driver: None,
            };
            w.core.register(req, w.now_ms).unwrap();
            w.agents.insert(name.into(), FakeAgent::default());
        }
        w
    }

    fn spec(nodes: u32, ranks_per_node: u32, max_restarts: u32) -> JobSpec {
        JobSpec::from_json(
            format!(
                r#"{{"name":"t","argv":["train"],"nodes":{nodes},"ranks_per_node":{ranks_per_node},"max_restarts":{max_restarts}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    /// Nodes a and b running a job of one rank each that may use the spare s, with these
    /// restarts.
    fn running_with_a_spare(max_restarts: u32) -> (World, JobId) {
        let mut w = World::new(&[("a", 1, false), ("b", 1, false), ("s", 1, true)]);
        let mut spec = World::spec(2, 1, max_restarts);
        spec.spares = 1;
        let id = w.core.submit(spec, w.now_ms).unwrap();
        for _ in 0..3 {
            w.round();
        }
        assert_eq!(w.state(id), JobState::Running);
        (w, id)
    }

    /// One heartbeat from `name`, then it carries out the reply's commands.
    fn beat(&mut self, name: &str) {
        let agent = self.agents.get_mut(name).unwrap();
        let mut req = agent.node.report();
        for r in &mut req.ranks {
            let key = (r.job_id, r.attempt, r.local_rank);
            r.step = Some(agent.progress.map_or(7, |p| p.0));
            r.loss = Some(agent.progress.map_or(2.5, |p| p.1));
            r.hang = agent.hangs.get(&key).cloned();
            r.steps = agent
                .progress
                .map(|(step, _)| vec![StepTime { step, ms: 900.0, end_ms: self.now_ms }])
                .unwrap_or_default();
            r.tokens_per_s = agent.progress.map(|(step, _)| 1000.0 * step as f64);
            r.mfu = agent.progress.map(|_| 0.1);
            r.compute_ms = agent.compute_ms.get(&key).copied();
        }
        req.checkpoints = agent.checkpoints.clone();
        req.bad_checkpoints = agent.bad.clone();
        req.gpu_findings = agent.gpu_findings.clone();
        let reply = self.core.heartbeat(name, req, self.now_ms).unwrap();
        self.core.check_invariants();
        let agent = self.agents.get_mut(name).unwrap();
        assert_eq!(
            agent.node.pending(&reply.commands).count(),
            reply.commands.len(),
            "acknowledged commands are not resent"
        );
        for c in reply.commands {
            agent.node.ack(c.seq);
            match agent.node.apply(&c.command) {
                Todo::Nothing => {}
                Todo::ReservePort { job_id, attempt } => {
                    agent.node.reserve(job_id, attempt, 29_000 + attempt as u16)
                }
                Todo::Launch { spec: l, fresh } => {
                    let overlap = agent
                        .node
                        .ranks
                        .iter()
                        .any(|(k, st)| k.0 == l.job_id && k.1 != l.attempt && st.is_running());
                    assert!(
                        !overlap,
                        "attempt {} of job {} launched on {name} while an older one still runs",
                        l.attempt, l.job_id
                    );
                    agent.launched.push(l.clone());
                    for local in fresh {
                        agent.node.insert((l.job_id, l.attempt, local), RankState::Running { pid: 1 });
                        agent.launched_env.insert((l.job_id, l.attempt, local), l.rank_env(local));
                    }
                }
                Todo::Stop { ranks } => {
                    for k in ranks {
                        agent.node.ranks.insert(k, RankState::Exited { code: None, signal: Some(15) });
                    }
                }
                Todo::Purge { job_id } => agent.checkpoints.retain(|c| c.job_id != job_id),
            }
        }
    }

    fn round(&mut self) {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            self.beat(&n);
        }
        self.now_ms += 1000;
        self.core.tick(self.now_ms);
        self.core.check_invariants();
    }

    fn exit(&mut self, node: &str, job_id: JobId, attempt: u32, local_rank: u32, code: i32) {
        let s =
            self.agents.get_mut(node).unwrap().node.ranks.get_mut(&(job_id, attempt, local_rank)).unwrap();
        *s = RankState::Exited { code: Some(code), signal: None };
    }

    fn exit_all(&mut self, job_id: JobId, attempt: u32, code: i32) {
        for a in self.agents.values_mut() {
            for (k, s) in a.node.ranks.iter_mut() {
                if k.0 == job_id && k.1 == attempt {
                    *s = RankState::Exited { code: Some(code), signal: None };
                }
            }
        }
    }

    fn state(&self, id: JobId) -> JobState {
        self.core.job(id).unwrap().state
    }

    fn kinds(&mut self) -> Vec<String> {
        self.core.take_changes().events.into_iter().map(|e| e.kind).collect()
    }
}

#[test]
fn a_job_runs_on_all_its_nodes_at_once_and_succeeds() {
    let mut w = World::new(&[("a", 2, false), ("b", 2, false), ("c", 2, false)]);
    let id = w.core.submit(World::spec(2, 2, 0), w.now_ms).unwrap();
    assert_eq!(w.state(id), JobState::Starting);
    w.round(); // a reserves the port
    w.round(); // a and b launch
    w.round(); // they report running
    assert_eq!(w.state(id), JobState::Running);
    let view = w.core.job_view(id, w.now_ms).unwrap();
    assert_eq!((view.ranks_running, view.step, view.loss), (4, Some(7), Some(2.5)));
    assert!(w.agents["c"].node.ranks.is_empty(), "gang of two nodes uses exactly two");
    w.exit_all(id, 0, 0);
    w.round();
    assert_eq!(w.state(id), JobState::Succeeded);
    assert!(w.core.node_views(w.now_ms).iter().all(|n| n.slots_used == 0));
    w.round(); // Forget is carried out
    assert!(w.agents.values().all(|a| a.node.ranks.is_empty()));
    let kinds = w.kinds();
    for k in ["submitted", "scheduled", "launching", "running", "attempt_succeeded", "job_succeeded"] {
        assert!(kinds.contains(&k.to_string()), "{k} missing from {kinds:?}");
    }
}

#[test]
fn every_rank_gets_torchruns_environment() {
    let mut w = World::new(&[("a", 2, false), ("b", 2, false)]);
    let id = w.core.submit(World::spec(2, 2, 3), w.now_ms).unwrap();
    w.round();
    w.round();
    let mut ranks = BTreeSet::new();
    for (node, group) in [("a", 0), ("b", 1)] {
        for local in 0..2u32 {
            let env: BTreeMap<_, _> = w.agents[node].launched_env[&(id, 0, local)].iter().cloned().collect();
            let rank = group * 2 + local;
            ranks.insert(rank);
            let expect = [
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", local.to_string()),
                ("WORLD_SIZE", "4".into()),
                ("LOCAL_WORLD_SIZE", "2".into()),
                ("GROUP_RANK", group.to_string()),
                ("GROUP_WORLD_SIZE", "2".into()),
                ("ROLE_RANK", rank.to_string()),
                ("ROLE_NAME", "default".into()),
                ("ROLE_WORLD_SIZE", "4".into()),
                ("MASTER_ADDR", "10.0.0.1".into()),
                ("MASTER_PORT", "29000".into()),
                ("TORCHELASTIC_RESTART_COUNT", "0".into()),
                ("TORCHELASTIC_MAX_RESTARTS", "3".into()),
                ("TORCHELASTIC_RUN_ID", format!("myriad-{id}")),
                ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
                ("OMP_NUM_THREADS", "1".into()),
                ("MYRIAD_JOB_ID", id.to_string()),
                ("MYRIAD_ATTEMPT", "0".into()),
            ];
            for (k, v) in expect {
                assert_eq!(env.get(k), Some(&v), "{k} of rank {rank}");
            }
        }
    }
    assert_eq!(ranks.len(), 4);
}

#[test]
fn a_failed_rank_stops_the_rest_and_restarts_with_a_new_port_until_restarts_run_out() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 1), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Running);
    w.exit("b", id, 0, 0, 3);
    w.beat("b");
    assert_eq!(w.state(id), JobState::Stopping, "a's rank must be stopped before the restart");
    w.round(); // a is told to stop
    w.round(); // a reports its rank gone: slots released, job requeued and rescheduled
    let job = w.core.job(id).unwrap();
    assert_eq!((job.restarts, job.attempt.as_ref().unwrap().number), (1, 1));
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Running);
    let env: BTreeMap<_, _> = w.agents["a"].launched_env[&(id, 1, 0)].iter().cloned().collect();
    assert_eq!(env["MASTER_PORT"], "29001", "each attempt gets its own store port");
    assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "1");
    w.exit("a", id, 1, 0, 1);
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Failed);
    assert!(w.core.job(id).unwrap().reason.as_ref().unwrap().contains("rank 0 on node a exited with code 1"));
}

#[test]
fn a_silent_node_is_lost_after_three_heartbeats_and_the_job_moves_to_a_spare() {
    let (mut w, id) = World::running_with_a_spare(2);
    assert_eq!(w.nodes_of(id), ["a", "b"]);
    // b goes silent: its agent stops heartbeating (and its ranks die with it).
    let dead = w.agents.remove("b").unwrap();
    let mut lost_after_ms = None;
    for i in 1..=5 {
        w.round();
        if w.core.node("b").unwrap().health == Health::Lost {
            lost_after_ms = Some(i * 1000);
            break;
        }
    }
    assert!(lost_after_ms.unwrap() <= 3 * 1000 + 1000, "lost after {lost_after_ms:?} ms");
    for _ in 0..4 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(w.core.names(&job.attempt.as_ref().unwrap().nodes), ["a", "s"]);
    // b comes back still reporting its old rank as running: it is told to stop it.
    w.agents.insert("b".into(), dead);
    w.beat("b");
    assert!(w.agents["b"].node.ranks.values().all(|s| !s.is_running()));
}

#[test]
fn a_lost_nodes_single_node_job_moves_only_once_the_nodes_lease_has_fenced_its_ranks() {
    let mut w = World::new(&[("a", 1, false), ("s", 1, true)]);
    let mut spec = World::spec(1, 1, 2);
    spec.spares = 1;
    let id = w.core.submit(spec, w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.nodes_of(id), ["a"]);
    // a is cut off from the controller: its rank may train on, alone, with nobody to stop it.
    let last_heartbeat_ms = w.core.node("a").unwrap().last_heartbeat_ms;
    let cut = w.agents.remove("a").unwrap();
    let fenced_ms = last_heartbeat_ms + w.core.config().fenced_after_ms();
    assert!(w.core.config().lease_ms() > 3 * 3 * 1000, "the lease outlasts three node timeouts");
    let mut moved_ms = None;
    for _ in 0..30 {
        w.round();
        let job = w.core.job(id).unwrap();
        if w.core.names(&job.attempt.as_ref().unwrap().nodes) == ["s"] {
            moved_ms.get_or_insert(w.now_ms);
        }
        if moved_ms.is_none() {
            assert!(w.now_ms < fenced_ms + 1000, "the job waits no longer than the lease");
        }
    }
    let moved_ms = moved_ms.expect("the job moved to the spare");
    assert!(moved_ms >= fenced_ms, "moved at {moved_ms}, before a's lease ran out at {fenced_ms}");
    assert_eq!(w.core.job(id).unwrap().state, JobState::Running);
    drop(cut);
}

#[test]
fn a_lost_nodes_share_of_a_multi_node_job_is_fenced_by_its_peers_exit_without_waiting_the_lease() {
    let (mut w, id) = World::running_with_a_spare(2);
    let last_heartbeat_ms = w.core.node("b").unwrap().last_heartbeat_ms;
    let _cut = w.agents.remove("b").unwrap();
    for _ in 0..8 {
        w.round();
    }
    // a's rank was stopped and reported gone: b's rank cannot finish a step without it.
    let job = w.core.job(id).unwrap();
    assert_eq!(w.core.names(&job.attempt.as_ref().unwrap().nodes), ["a", "s"]);
    assert!(w.now_ms < last_heartbeat_ms + w.core.config().lease_ms(), "moved before the lease ran out");
}

#[test]
fn a_failed_gpu_fails_the_nodes_attempt_and_keeps_it_out_until_its_checks_pass() {
    let mut w = World::new(&[("a", 2, false), ("b", 2, false), ("s", 2, true)]);
    let mut spec = World::spec(2, 2, 3);
    spec.spares = 1;
    let id = w.core.submit(spec, w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.core.job(id).unwrap().state, JobState::Running);
    let finding = |fatal: bool, reason: &str| GpuFinding {
        index: 1,
        uuid: "GPU-b1".into(),
        fatal,
        reason: reason.into(),
    };
    // A warning is an event and nothing more.
    w.agents.get_mut("b").unwrap().gpu_findings = vec![finding(false, "throttled (thermal)")];
    w.round();
    assert!(w.kinds().contains(&"gpu_warning".to_string()));
    assert_eq!(w.core.job(id).unwrap().attempt.as_ref().unwrap().number, 0);
    // XID 79 on b: the attempt fails at once, naming the GPU, and the spare takes b's place.
    w.agents.get_mut("b").unwrap().gpu_findings = vec![finding(true, "XID 79 (GPU has fallen off the bus)")];
    w.beat("b");
    let job = w.core.job(id).unwrap();
    assert!(job.reason.as_deref().unwrap().contains("GPU 1 (GPU-b1) on node b: XID 79"), "{:?}", job.reason);
    assert_eq!(job.account.pending.as_ref().map(|p| p.kind.as_str()), Some("gpu"));
    for _ in 0..4 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(
        (job.state, w.core.names(&job.attempt.as_ref().unwrap().nodes)),
        (JobState::Running, vec!["a".into(), "s".into()])
    );
    let b = w.core.node_views(w.now_ms).into_iter().find(|n| n.name == "b").unwrap();
    assert_eq!((b.health.as_str(), b.gpu_findings.len()), ("gpu_failed", 1));
    let kinds = w.kinds();
    assert!(kinds.contains(&"gpu_failed".to_string()), "{kinds:?}");
    // b's checks pass again: it is scheduled again (here: a second job lands on it).
    w.agents.get_mut("b").unwrap().gpu_findings.clear();
    w.round();
    assert!(w.kinds().contains(&"gpu_recovered".to_string()));
    let other = w.core.submit(World::spec(1, 2, 0), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.nodes_of(other), ["b"]);
}

#[test]
fn a_controller_that_did_not_run_blames_no_node_for_its_own_silence() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false), ("s", 1, true)]);
    let id = w.core.submit(World::spec(2, 1, 3), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.core.job(id).unwrap().state, JobState::Running);
    // Three pauses of 3 × the node timeout (9 s), each found by the edge as a gap between ticks.
    for _ in 0..3 {
        w.now_ms += 9_000;
        w.core.controller_stalled(w.now_ms, 9_000);
        w.core.tick(w.now_ms);
        w.round();
    }
    // The clock stepped back ten minutes: a heartbeat from "the future" is not silence either.
    w.now_ms -= 600_000;
    w.core.tick(w.now_ms);
    w.round();
    let job = w.core.job(id).unwrap();
    assert_eq!((job.state, job.restarts, job.attempt.as_ref().unwrap().number), (JobState::Running, 0, 0));
    let kinds = w.kinds();
    assert_eq!(kinds.iter().filter(|k| *k == "controller_stalled").count(), 3, "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "node_lost" || k == "node_quarantined"), "{kinds:?}");
    assert!(w.core.node_views(w.now_ms).iter().all(|n| n.health == "healthy"));
    assert_eq!(w.core.liveness(), (false, 3));
    // Without the edge's word, the same silence is a loss (so the test above tests something).
    w.now_ms += 9_000;
    w.beat("a");
    w.beat("s");
    w.core.tick(w.now_ms);
    assert_eq!(w.core.node("b").unwrap().health, Health::Lost);
}

#[test]
fn many_nodes_silent_at_once_are_not_declared_lost_and_one_is() {
    let nodes: Vec<(String, u32, bool)> = (0..4).map(|i| (format!("n{i}"), 1, false)).collect();
    let refs: Vec<(&str, u32, bool)> = nodes.iter().map(|(n, s, p)| (n.as_str(), *s, *p)).collect();
    let mut w = World::new(&refs);
    let id = w.core.submit(World::spec(4, 1, 3), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    // Three of four nodes fall silent together: the breaker holds the losses back.
    for _ in 0..5 {
        w.beat("n0");
        w.now_ms += 1000;
        w.core.tick(w.now_ms);
    }
    assert!(w.core.node_views(w.now_ms).iter().all(|n| n.health == "healthy"));
    assert_eq!((w.core.job(id).unwrap().restarts, w.core.liveness().0), (0, true));
    assert!(w.kinds().contains(&"loss_breaker_open".to_string()));
    // They return; then one alone goes silent and is lost as usual.
    w.round();
    assert!(!w.core.liveness().0);
    assert!(w.kinds().contains(&"loss_breaker_closed".to_string()));
    for _ in 0..5 {
        for n in ["n0", "n1", "n2"] {
            w.beat(n);
        }
        w.now_ms += 1000;
        w.core.tick(w.now_ms);
    }
    assert_eq!(w.core.node("n3").unwrap().health, Health::Lost);
    assert_eq!(w.core.job(id).unwrap().restarts, 1);
}

#[test]
fn the_oldest_queued_job_is_not_starved_by_smaller_ones() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let small = w.core.submit(World::spec(1, 1, 0), w.now_ms).unwrap();
    let big = w.core.submit(World::spec(2, 1, 0), w.now_ms).unwrap();
    let small2 = w.core.submit(World::spec(1, 1, 0), w.now_ms).unwrap();
    assert_eq!(w.state(small), JobState::Starting);
    assert_eq!(w.state(big), JobState::Queued);
    assert_eq!(w.state(small2), JobState::Queued, "b is free, but the big job came first");
    for _ in 0..3 {
        w.round();
    }
    w.exit_all(small, 0, 0);
    w.round();
    w.round();
    assert_eq!(w.state(big), JobState::Starting);
}

#[test]
fn cancel_stops_the_ranks_then_frees_the_slots() {
    let mut w = World::new(&[("a", 2, false)]);
    let id = w.core.submit(World::spec(1, 2, 5), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    w.core.cancel(id, w.now_ms).unwrap();
    assert_eq!(w.state(id), JobState::Stopping);
    w.round();
    w.round();
    assert_eq!(w.state(id), JobState::Cancelled, "cancel never turns into a restart");
    assert!(matches!(w.core.cancel(id, w.now_ms), Err(CoreError::Conflict(_))));
    let queued = w.core.submit(World::spec(1, 1, 0), w.now_ms).unwrap();
    w.core.submit(World::spec(1, 2, 0), w.now_ms).unwrap();
    w.core.cancel(queued, w.now_ms).unwrap();
    assert_eq!(w.state(queued), JobState::Cancelled);
}

#[test]
fn jobs_the_cluster_can_never_hold_are_refused_naming_the_field() {
    let w = &mut World::new(&[("a", 2, false), ("s", 2, true)]);
    // A conflict with the cluster (409), not a malformed spec; the message starts with the field.
    let field = |e: CoreError| match e {
        CoreError::Conflict(m) => m.split(':').next().unwrap().to_string(),
        other => panic!("{other}"),
    };
    assert_eq!(field(w.core.submit(World::spec(1, 3, 0), 0).unwrap_err()), "ranks_per_node");
    assert_eq!(
        field(w.core.submit(World::spec(2, 1, 0), 0).unwrap_err()),
        "nodes",
        "spares only when allowed"
    );
    let mut spec = World::spec(2, 1, 0);
    spec.spares = 1;
    assert!(w.core.submit(spec, 0).is_ok());
}

#[test]
fn a_launch_that_never_completes_times_out() {
    let mut w = World::new(&[("a", 1, false)]);
    let id = w.core.submit(World::spec(1, 1, 0), w.now_ms).unwrap();
    // The agent heartbeats but never carries out the reservation.
    for _ in 0..130 {
        w.core.heartbeat("a", HeartbeatRequest::default(), w.now_ms).unwrap();
        w.now_ms += 1000;
        w.core.tick(w.now_ms);
    }
    assert_eq!(w.state(id), JobState::Failed);
    assert!(w.core.job(id).unwrap().reason.as_ref().unwrap().contains("did not all start"));
}

#[test]
fn a_restored_core_carries_on_where_the_old_one_stopped() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 0), w.now_ms).unwrap();
    w.round();
    // Persist everything the way the edge does, as JSON rows, and rebuild.
    let mut jobs = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let c = w.core.take_changes();
    for j in c.jobs {
        jobs.insert(j.id, serde_json::to_string(&j).unwrap());
    }
    for n in c.nodes {
        nodes.insert(n.name.clone(), serde_json::to_string(&n).unwrap());
    }
    let jobs = jobs.values().map(|s| serde_json::from_str(s).unwrap()).collect();
    let nodes = nodes.values().map(|s| serde_json::from_str(s).unwrap()).collect();
    w.now_ms += 60_000; // the controller was down for a minute
    w.core = Core::restore(CoreConfig::default(), nodes, jobs, c.next_job_id, c.next_event_seq, w.now_ms);
    w.core.tick(w.now_ms);
    assert!(w.core.node_views(w.now_ms).iter().all(|n| n.health == "healthy"), "grace period after restart");
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Running);
    w.exit_all(id, 0, 0);
    w.round();
    assert_eq!(w.state(id), JobState::Succeeded);
    assert!(
        w.core.take_changes().events.iter().all(|e| e.seq >= c.next_event_seq),
        "sequence numbers continue"
    );
}

#[test]
fn a_restart_starts_from_the_newest_good_checkpoint_on_its_old_nodes_with_a_spare_for_the_lost_one() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false), ("c", 1, false), ("s", 1, true)]);
    let mut spec = World::spec(3, 1, 5);
    spec.spares = 1;
    let id = w.core.submit(spec, w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert!(w.agents["a"].launched[0].restore.is_none(), "a fresh job restores nothing");
    assert!(w.agents["a"].launched[0].leader && !w.agents["b"].launched[0].leader);
    assert_eq!(w.agents["a"].launched[0].buddy.as_deref(), Some("http://10.0.0.2:7000"), "b is a's buddy");
    // Rank 0's node holds steps 4 and 5 in memory, its buddy b holds 5, step 3 is persisted.
    let mem = |step| CheckpointReport { job_id: id, step, tier: Tier::Memory };
    w.agents.get_mut("a").unwrap().checkpoints = vec![mem(4), mem(5)];
    w.agents.get_mut("b").unwrap().checkpoints =
        vec![mem(5), CheckpointReport { job_id: id, step: 3, tier: Tier::Persisted }];
    w.round();
    // b dies; a's copy of step 5 survives, the job moves b's place to the spare, keeping order.
    w.agents.remove("b");
    for _ in 0..10 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(
        w.core.names(&job.attempt.as_ref().unwrap().nodes),
        ["a", "s", "c"],
        "same nodes, same group order"
    );
    let restore = w.agents["s"].launched[0].restore.clone().unwrap();
    assert_eq!(restore.step, 5);
    assert_eq!(restore.sources, ["http://10.0.0.1:7000"], "only healthy holders are sources");
    // The spare finds step 5 corrupt everywhere: the next attempt falls back to step 4.
    w.agents.get_mut("s").unwrap().bad = vec![mem(5)];
    w.exit("s", id, 1, 0, 75);
    for _ in 0..6 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(job.attempt.as_ref().unwrap().number, 2);
    assert!(job.bad_steps.contains(&5));
    assert_eq!(w.agents["c"].launched.last().unwrap().restore.as_ref().unwrap().step, 4);
    // When the job ends, every node drops its in-memory checkpoints.
    w.exit_all(id, 2, 0);
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Succeeded);
    assert!(w.agents["a"].checkpoints.is_empty(), "purged");
}

#[test]
fn a_node_cut_off_during_a_job_has_its_leftover_ranks_stopped_when_it_returns() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 0), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    // b is partitioned: silent, but its rank keeps running.
    let cut_off = w.agents.remove("b").unwrap();
    for _ in 0..6 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Failed);
    w.agents.insert("b".into(), cut_off);
    w.beat("b");
    assert!(w.agents["b"].node.ranks.values().all(|s| !s.is_running()), "the leftover rank is stopped");
    let b = w.core.node_views(w.now_ms).into_iter().find(|n| n.name == "b").unwrap();
    assert_eq!(b.slots_used, 1, "its slot stays taken until the rank is reported gone");
    w.round();
    w.round();
    let b = w.core.node_views(w.now_ms).into_iter().find(|n| n.name == "b").unwrap();
    assert_eq!(b.slots_used, 0);
    assert!(w.agents["b"].node.ranks.is_empty(), "and then forgotten");
}

#[test]
fn a_node_lost_as_its_attempt_ends_and_back_before_its_slots_are_released_is_told_to_stop() {
    // Found at 12,500 nodes: a few agents, busy, missed their heartbeats for three intervals,
    // ending the attempt, and were back within a second. The node whose loss ended it was sent
    // no stop (it was lost), held its slots on return, and its ranks ran on: the job stayed
    // stopping for good.
    let (mut w, id) = World::running_with_a_spare(2);
    let busy = w.agents.remove("b").unwrap();
    while w.core.node("b").unwrap().health != Health::Lost {
        assert!(w.now_ms < 1_000_000 + 20_000, "b is never declared lost");
        w.round();
    }
    assert_eq!(w.state(id), JobState::Stopping);
    // b is back before any rank of the attempt was reported gone, its rank still running.
    w.agents.insert("b".into(), busy);
    w.beat("b");
    assert!(w.agents["b"].node.ranks.values().all(|s| !s.is_running()), "b's rank is stopped");
    for _ in 0..6 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!((job.state, job.attempt.as_ref().unwrap().number), (JobState::Running, 1));
}

#[test]
fn a_restart_waits_for_ranks_launched_by_a_command_not_yet_acknowledged() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 1), w.now_ms).unwrap();
    w.beat("a"); // a reserves the port
    w.beat("a"); // a reports it: launches are queued for a and b; a starts its rank
    w.beat("b"); // b starts its rank; its acknowledgement is still to come
    w.exit("a", id, 0, 0, 1);
    w.beat("a"); // the attempt fails while b's launch is unacknowledged
    assert_eq!(w.state(id), JobState::Stopping, "b's rank may be running: no restart yet");
    // The fake agents assert that no node ever runs two attempts of the job at once.
    for _ in 0..6 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!((job.state, job.attempt.as_ref().unwrap().number), (JobState::Running, 1));
}

#[test]
fn a_rank_first_seen_after_it_already_exited_still_counts_as_started() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 0), w.now_ms).unwrap();
    w.beat("a");
    w.beat("a");
    w.beat("b"); // b launches, then its rank exits 0 before b reports it
    w.exit("b", id, 0, 0, 0);
    w.round();
    assert_eq!(w.state(id), JobState::Running);
    w.exit("a", id, 0, 0, 0);
    w.round();
    assert_eq!(w.state(id), JobState::Succeeded);
}

#[test]
fn the_time_ledger_books_detection_restart_and_recomputation_of_a_fault() {
    let step = |step: u64, end_ms: u64| StepTime { step, ms: 100.0, end_ms };
    let mut acc = Account::default();
    // Submitted at 0; the first step begins at 900 ms.
    assert!(acc.record_steps(&[step(1, 1000), step(2, 1100), step(3, 1200)], 0, 0).is_none());
    assert_eq!(acc.startup_ms, Some(900.0));
    assert_eq!(acc.committed_ms(), 300.0);
    // A rank dies at 1250 ms, noticed at 1300 ms; the restart resumes from step 1.
    acc.pending = Some(PendingFault {
        attempt: 0,
        cause: "rank 1 died".into(),
        kind: "rank_exit".into(),
        fault_ms: 1250,
        detected_ms: 1300,
        recompute_ms: 0.0,
        lost_steps: 0,
        restore_step: 0,
    });
    assert!(
        acc.record_steps(&[step(4, 1290)], 0, 0).is_none(),
        "the failed attempt's own steps recover nothing"
    );
    assert_eq!(acc.committed_ms(), 400.0, "nothing is rolled back before the new attempt reports");
    // The new attempt's first step (step 2 again) begins at 2000 ms: it resumed from step 1, and
    // steps 2 to 4 are no longer committed.
    let (message, data) = acc.record_steps(&[step(2, 2100)], 1, 0).expect("recovered");
    assert!(message.contains("recovered from step 1"), "{message}");
    assert_eq!(data["detection_s"], 0.05);
    assert_eq!(data["restart_s"], 0.7);
    assert_eq!(data["recompute_s"], 0.3);
    assert_eq!(data["lost_steps"], 3);
    assert_eq!((acc.detection_ms, acc.restart_ms, acc.recompute_ms), (50.0, 700.0, 300.0));
    assert_eq!(acc.committed_ms(), 200.0);
    assert!(acc.record_steps(&[step(2, 2100)], 1, 0).is_none(), "a repeated report changes nothing");
    assert_eq!(acc.committed_ms(), 200.0);
}

#[test]
fn a_restart_from_an_older_step_is_recovered_at_its_first_step_though_the_ledger_holds_that_number() {
    let mut w = World::new(&[("a", 1, false)]);
    let id = w.core.submit(World::spec(1, 1, 1), w.now_ms).unwrap();
    for step in 1..=5 {
        w.agents.get_mut("a").unwrap().progress = Some((step, 2.0));
        w.round();
    }
    let held = w.core.job(id).unwrap().account.recent.len() as u64;
    assert!(held >= 3, "the ledger holds the steps reported once the attempt ran");
    // The rank dies; with no checkpoint the next attempt starts over at step 1, a number the
    // ledger still holds from the failed attempt.
    w.exit("a", id, 0, 0, 1);
    w.agents.get_mut("a").unwrap().progress = None;
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.core.job(id).unwrap().attempt.as_ref().unwrap().number, 1);
    w.agents.get_mut("a").unwrap().progress = Some((1, 2.0));
    w.round();
    let recovered: Vec<&Event> = w.core.events.iter().filter(|e| e.is(EventKind::Recovered)).collect();
    assert_eq!(recovered.len(), 1, "recovered at the new attempt's first step");
    let data = recovered[0].data.as_ref().unwrap();
    assert_eq!((data["restore_step"].as_u64(), data["lost_steps"].as_u64()), (Some(0), Some(held)));
}

#[test]
fn a_restart_from_live_state_newer_than_the_named_restore_point_loses_only_later_steps() {
    let step = |step: u64, end_ms: u64| StepTime { step, ms: 100.0, end_ms };
    let mut acc = Account::default();
    let first: Vec<StepTime> = (1..=6).map(|s| step(s, 1000 + 100 * s)).collect();
    acc.record_steps(&first, 0, 0);
    // The controller's newest checkpoint directory is step 2, but the ranks kept every step live
    // and agree on step 6: nothing is computed again.
    acc.pending = Some(PendingFault {
        attempt: 0,
        cause: "rank 0 died".into(),
        kind: "rank_exit".into(),
        fault_ms: 1650,
        detected_ms: 1650,
        recompute_ms: 0.0,
        lost_steps: 0,
        restore_step: 2,
    });
    let (message, data) = acc.record_steps(&[step(7, 1900)], 1, 0).expect("recovered");
    assert!(message.contains("recovered from step 6"), "{message}");
    assert_eq!((data["lost_steps"].as_u64(), data["recompute_s"].as_f64()), (Some(0), Some(0.0)));
    assert_eq!(acc.committed_ms(), 700.0, "steps 1 to 7 all count");
}

#[test]
fn a_node_that_keeps_failing_is_quarantined_and_the_job_moves_on_without_it() {
    let mut w = World::new(&[("a", 1, false), ("b", 1, false), ("c", 1, false)]);
    let id = w.core.submit(World::spec(2, 1, 10), w.now_ms).unwrap();
    for attempt in 0..3 {
        for _ in 0..3 {
            w.round();
        }
        let job = w.core.job(id).unwrap();
        assert_eq!(job.attempt.as_ref().unwrap().number, attempt);
        assert_eq!(
            w.core.names(&job.attempt.as_ref().unwrap().nodes),
            ["a", "b"],
            "restarts stay on their nodes"
        );
        // b's agent reports its rank hung (and killed).
        let hang = HangReport { stalled_ms: 5000, threshold_ms: 4000, phase: None, stack: String::new() };
        w.exit("b", id, attempt, 0, 137);
        w.agents.get_mut("b").unwrap().hangs.insert((id, attempt, 0), hang);
        for _ in 0..2 {
            w.round();
        }
    }
    let kinds = w.kinds();
    assert!(kinds.contains(&"node_quarantined".to_string()), "{kinds:?}");
    let b = w.core.node_views(w.now_ms).into_iter().find(|n| n.name == "b").unwrap();
    assert_eq!(b.health, "quarantined");
    for _ in 0..3 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(w.core.names(&job.attempt.as_ref().unwrap().nodes), ["a", "c"], "c takes b's place");
    // Restarting b's agent releases it.
    let req = RegisterRequest {
        name: "b".into(),
        slots: 1,
        cores: 8,
        addr: "10.0.0.2".into(),
        http_port: 7000,
        spare: false,
        gpus: Vec::new(),
        driver: None,
    };
    w.core.register(req, w.now_ms).unwrap();
    let b = w.core.node_views(w.now_ms).into_iter().find(|n| n.name == "b").unwrap();
    assert_eq!(b.health, "healthy");
}

#[test]
fn a_job_restarted_many_times_keeps_the_nodes_of_its_latest_attempts_only() {
    let mut w = World::new(&[("a", 1, false)]);
    let id = w.core.submit(World::spec(1, 1, 40), w.now_ms).unwrap();
    let attempts = PLACEMENTS_KEPT as u32 + 4;
    for attempt in 0..attempts {
        for _ in 0..3 {
            w.round();
        }
        assert_eq!(w.state(id), JobState::Running, "attempt {attempt}");
        w.exit("a", id, attempt, 0, 1);
        w.round();
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(job.placements.len(), PLACEMENTS_KEPT);
    assert_eq!(job.placements_from, attempts + 1 - PLACEMENTS_KEPT as u32);
    let (node, number, _) = w.core.locate_rank(id, 0, Some(attempts - 1)).unwrap();
    assert_eq!((node.name.as_str(), number), ("a", attempts - 1));
    let old = w.core.locate_rank(id, 0, Some(1)).unwrap_err().to_string();
    assert!(old.contains("too old") && old.contains(&PLACEMENTS_KEPT.to_string()), "{old}");
}

#[test]
fn a_rank_computing_well_above_the_jobs_median_is_reported_once_as_a_straggler() {
    let mut w = World::new(&[("a", 2, false), ("b", 2, false)]);
    let id = w.core.submit(World::spec(2, 2, 0), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Running);
    w.kinds();
    // Everyone computes about 100 ms per step: jitter is not straggling.
    for (node, local, ms) in [("a", 0, 100.0), ("a", 1, 104.0), ("b", 0, 97.0), ("b", 1, 130.0)] {
        w.agents.get_mut(node).unwrap().compute_ms.insert((id, 0, local), ms);
    }
    for _ in 0..10 {
        w.round();
    }
    assert!(!w.kinds().contains(&"straggler".to_string()));
    // Rank 3 is stopped half the time: twice the compute per step.
    w.agents.get_mut("b").unwrap().compute_ms.insert((id, 0, 1), 205.0);
    for _ in 0..10 {
        w.round();
    }
    let events: Vec<Event> = w.core.take_changes().events;
    let found: Vec<&Event> = events.iter().filter(|e| e.kind == "straggler").collect();
    assert_eq!(found.len(), 1, "reported once: {events:?}");
    assert_eq!(found[0].node.as_deref(), Some("b"));
    assert!(found[0].message.contains("rank 3 on node b"), "{}", found[0].message);
    assert_eq!(found[0].data.as_ref().unwrap()["rank"], 3);
    // Without a spare to move to, the job runs on with its straggler.
    for _ in 0..30 {
        w.round();
    }
    assert_eq!((w.state(id), w.core.job(id).unwrap().restarts), (JobState::Running, 0));
}

#[test]
fn a_node_that_keeps_straggling_is_swapped_for_a_spare() {
    let (mut w, id) = World::running_with_a_spare(3);
    w.agents.get_mut("a").unwrap().compute_ms.insert((id, 0, 0), 100.0);
    w.agents.get_mut("b").unwrap().compute_ms.insert((id, 0, 0), 250.0);
    // Reported at the first check; evicted at the third in a row (10 s later).
    let checks = CoreConfig::default().straggler_evict_checks as u64;
    let every_s = CoreConfig::default().straggler_check_ms / 1000;
    let mut events = Vec::new();
    for _ in 0..(checks * every_s + 2) {
        w.round();
        events.extend(w.core.take_changes().events);
        if events.iter().any(|e| e.kind == "attempt_failed") {
            break;
        }
    }
    let reported = events.iter().position(|e| e.kind == "straggler").expect("reported");
    let failed = events.iter().position(|e| e.kind == "attempt_failed").expect("evicted");
    assert!(reported < failed);
    let seconds = (events[failed].time_ms - events[reported].time_ms) / 1000;
    assert_eq!(seconds, (checks - 1) * every_s, "{events:?}");
    assert_eq!(events[failed].data.as_ref().unwrap()["cause"], "straggler");
    assert!(events[failed].message.contains("node b") && events[failed].message.contains("evicted"));
    for _ in 0..5 {
        w.round();
    }
    let job = w.core.job(id).unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(w.core.names(&job.attempt.as_ref().unwrap().nodes), ["a", "s"], "the spare takes b's place");
    assert_eq!((job.restarts, job.account.faults), (1, 1));
    // b stays out of this job's later attempts while anything else is free.
    w.exit("a", id, 1, 0, 1);
    for _ in 0..5 {
        w.round();
    }
    assert_eq!(w.nodes_of(id), ["a", "s"]);
}

#[test]
fn a_jobs_history_keeps_the_whole_run_in_bounded_points() {
    let mut h = History::default();
    // Four hours of a step every 100 ms, figures on every report.
    let hours_ms = 4 * 3_600_000u64;
    let mut step = 0;
    for t in (0..hours_ms).step_by(100) {
        step += 1;
        h.record(t, step, [Some(3.0), Some(1e5), Some(0.4), None]);
        assert!(h.points().count() <= SERIES_POINTS);
    }
    let points: Vec<_> = h.points().collect();
    assert!(points.len() > SERIES_POINTS / 2, "{} points", points.len());
    // The first sample is still there and the newest is at most one period old.
    assert_eq!(points[0].time_ms, 0);
    assert!(hours_ms - points.last().unwrap().time_ms <= h.every_ms + 100, "{}", h.every_ms);
    // Evenly spaced at the current period, and nothing reported is invented.
    for w in points.windows(2) {
        assert!(w[1].time_ms - w[0].time_ms >= h.every_ms / 2, "{:?}", w);
    }
    assert_eq!(points[1].loss, Some(3.0));
    assert_eq!(points[1].ettr, None);
    // The same step reported again adds nothing.
    let mut h = History::default();
    assert!(h.record(0, 7, [None; 4]));
    assert!(!h.record(5_000, 7, [None; 4]));
    assert_eq!(h.points().count(), 1);
}

#[test]
fn rank_zeros_reports_fill_the_jobs_series() {
    let mut w = World::new(&[("a", 1, false)]);
    let id = w.core.submit(World::spec(1, 1, 0), w.now_ms).unwrap();
    for _ in 0..3 {
        w.round();
    }
    assert_eq!(w.state(id), JobState::Running);
    for step in 1..=5u64 {
        w.agents.get_mut("a").unwrap().progress = Some((step, 5.0 - step as f64 / 2.0));
        w.round();
    }
    let series = w.core.job_series(id).unwrap();
    // The default step 7 of the rounds before, then steps 1 to 5 (a step number may go back: a
    // restart resumes from an older checkpoint).
    assert_eq!(series.points.iter().map(|p| p.step).collect::<Vec<_>>(), [7, 1, 2, 3, 4, 5]);
    let last = series.points.last().unwrap();
    // Kept as f32: charts need no more.
    assert_eq!((last.step, last.loss, last.tokens_per_s), (5, Some(2.5), Some(5000.0)));
    assert_eq!(last.mfu.map(|m| m as f32), Some(0.1));
    let ettr = last.ettr.unwrap();
    assert!(ettr > 0.0 && ettr < 1.0, "{last:?}");
    assert!(w.core.job_series(id + 1).is_none());
    // The history is part of the job's persisted row: a restarted controller keeps the charts.
    let changes = w.core.take_changes();
    let row = changes.jobs.iter().find(|j| j.id == id).expect("the job's row was written");
    let restored: Job = serde_json::from_str(&serde_json::to_string(row).unwrap()).unwrap();
    assert_eq!(restored.history, w.core.job(id).unwrap().history);
}

#[test]
fn events_name_a_small_jobs_nodes_and_count_a_large_ones() {
    let names: Vec<(String, u32, bool)> = (0..1250).map(|i| (format!("n{i}"), 1, false)).collect();
    let names: Vec<(&str, u32, bool)> = names.iter().map(|(n, s, b)| (n.as_str(), *s, *b)).collect();
    let w = World::new(&names);
    let ids = |n: u32| (0..n).map(NodeId).collect::<Vec<_>>();
    assert_eq!(node_list(&w.core.nodes, &ids(2)), "n0, n1");
    assert_eq!(
        node_list(&w.core.nodes, &ids(1250)),
        "n0, n1, n2, n3, n4, n5, n6, n7, … and 1242 more (1250 nodes)"
    );
}
