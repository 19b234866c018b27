//! The node agent: registers its node with the controller, heartbeats the state of every rank it
//! holds, carries out the controller's commands (reserve a port, launch, stop, forget), writes each
//! rank's output to files it serves over HTTP, and listens on a Unix socket for the ranks' progress.
//!
//! Ranks are spawned directly from argv (never through a shell), each in its own process group so
//! a stop reaches everything the rank started, and with PR_SET_PDEATHSIG so they die with the agent
//! rather than run on unsupervised. The agent therefore runs on a single-threaded runtime: the
//! death signal follows the *thread* that spawned the child, and the main thread lives as long as
//! the agent does.
//!
//! Every command is idempotent and acknowledged by sequence number on the next heartbeat; reports
//! are full state, so a controller that restarts or misses a heartbeat loses nothing. While the
//! controller is unreachable the ranks run on and the agent keeps trying.

pub mod checkpoints;
pub mod metrics;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Router};
use hyper::body::Bytes;
use net::client::{Client, ClientError};
use net::http::{require_token, ApiError};
use proto::api::MAX_LOG_TAIL_BYTES;
use proto::api::{
    CheckpointReport, Command, HangReport, HeartbeatReply, HeartbeatRequest, JobId, LaunchSpec, PortReport,
    RankReport, RankState, RegisterReply, RegisterRequest, StepTime,
};
use proto::checkpoint as layout;
use proto::env::AgentEnv;
use proto::progress::{Progress, ProgressEvent, MAX_LINE_BYTES};
use proto::spec::validate_relative_path;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::Notify;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub controller: String,
    pub token: String,
    pub name: String,
    pub slots: u32,
    pub spare: bool,
    /// Address other nodes use to reach this one (MASTER_ADDR when it hosts rank 0).
    pub addr: String,
    /// Where the agent's own HTTP endpoint listens (`HOST:PORT`, port 0 for any).
    pub listen: String,
    /// Rank logs and the progress socket live here.
    pub work_dir: PathBuf,
    /// Jobs' checkpoint directories are created under this root.
    pub checkpoint_root: PathBuf,
    /// In-memory checkpoints (best on tmpfs) live under this root, a directory per job.
    pub memory_root: PathBuf,
    /// Time between SIGTERM and SIGKILL when stopping a rank.
    pub stop_grace: Duration,
    /// A rank that speaks the progress protocol is hung after max(floor, factor × its median
    /// step time) without progress while not waiting in a collective.
    pub hang_floor: Duration,
    pub hang_factor: f64,
    /// The allowance before a rank's first step (model build, restore, rendezvous).
    pub hang_startup: Duration,
}

/// Key of one rank on this node: job, attempt, local rank.
type RankKey = (JobId, u32, u32);

struct Rank {
    state: RankState,
    pid: Option<u32>,
    step: Option<u64>,
    loss: Option<f64>,
    stopping: bool,
    exited_at_ms: Option<u64>,
    /// Last progress message (or the launch): the hang detector's clock.
    last_progress: Instant,
    /// Whether the rank speaks the progress protocol at all; silent programs are never "hung".
    speaks: bool,
    phase: Option<String>,
    steps: std::collections::VecDeque<StepTime>,
    tokens_per_s: Option<f64>,
    mfu: Option<f64>,
    hang: Option<HangReport>,
    /// Compute time of the recent steps (newest last).
    compute_ms: std::collections::VecDeque<f64>,
}

impl Rank {
    fn new(state: RankState, pid: Option<u32>) -> Rank {
        Rank {
            state,
            pid,
            step: None,
            loss: None,
            stopping: false,
            exited_at_ms: None,
            last_progress: Instant::now(),
            speaks: false,
            phase: None,
            steps: Default::default(),
            tokens_per_s: None,
            mfu: None,
            hang: None,
            compute_ms: Default::default(),
        }
    }

    /// Median compute time over the last [`COMPUTE_WINDOW`] steps, once the window is full.
    fn median_compute_ms(&self) -> Option<f64> {
        median(self.compute_ms.iter().copied(), COMPUTE_WINDOW)
    }

    /// Median of the recent step times, once there are a few.
    fn median_step_ms(&self) -> Option<f64> {
        median(self.steps.iter().map(|s| s.ms), 3)
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

/// Step times kept (and reported) per rank.
const STEPS_KEPT: usize = 32;
/// Steps whose compute times make up the median a straggler is judged on.
const COMPUTE_WINDOW: usize = 10;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct Node {
    ranks: BTreeMap<RankKey, Rank>,
    /// Each reservation keeps its listener open until the attempt's ranks are launched, so no
    /// other process can take the port in between.
    ports: BTreeMap<(JobId, u32), (u16, Option<std::net::TcpListener>)>,
    acked_command_seq: u64,
    /// Jobs whose rank 0 runs here: this agent replicates and persists their checkpoints.
    leading: BTreeMap<JobId, Leader>,
    /// Checkpoints that failed to verify, reported until the job is purged.
    bad: Vec<CheckpointReport>,
}

struct Leader {
    buddy: Option<String>,
    persist_dir: PathBuf,
    checkpoint_every: u64,
    persist_every: u64,
    /// A copy is under way; `pending` is the newest step that arrived meanwhile.
    busy: bool,
    pending: Option<u64>,
}

struct Agent {
    cfg: AgentConfig,
    node: Mutex<Node>,
    /// Wakes the heartbeat loop early: a rank exited, so the controller should hear now.
    wake: Notify,
    /// Chaos: no heartbeats until then (a network partition).
    silent_until: Mutex<Option<Instant>>,
    socket_path: PathBuf,
    metrics: metrics::AgentMetrics,
}

/// Largest checkpoint file one PUT may carry.
const MAX_CHECKPOINT_FILE_BYTES: usize = 16 << 30;
/// Deadline of every call to the controller.
const CONTROLLER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until SIGINT/SIGTERM; then stops every rank it holds.
pub fn run(cfg: AgentConfig) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the agent's runtime: {e}"))?;
    runtime.block_on(run_async(cfg))
}

async fn run_async(cfg: AgentConfig) -> Result<(), String> {
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| format!("work directory {}: {e}", cfg.work_dir.display()))?;
    std::fs::create_dir_all(&cfg.checkpoint_root)
        .map_err(|e| format!("checkpoint root {}: {e}", cfg.checkpoint_root.display()))?;
    let client = Client::new(&cfg.controller, &cfg.token, CONTROLLER_CALL_TIMEOUT)?;
    let socket_path = cfg.work_dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket_path);
    let progress = tokio::net::UnixListener::bind(&socket_path)
        .map_err(|e| format!("progress socket {}: {e}", socket_path.display()))?;
    // Only this user's processes (the ranks) may report progress.
    std::fs::set_permissions(&socket_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("progress socket {}: {e}", socket_path.display()))?;
    let http = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let http_port = http.local_addr().map_err(|e| e.to_string())?.port();
    std::fs::create_dir_all(&cfg.memory_root)
        .map_err(|e| format!("memory root {}: {e}", cfg.memory_root.display()))?;
    let agent = Arc::new(Agent {
        cfg,
        node: Mutex::new(Node::default()),
        wake: Notify::new(),
        silent_until: Mutex::new(None),
        socket_path,
        metrics: metrics::AgentMetrics::default(),
    });

    let token: Arc<str> = agent.cfg.token.clone().into();
    let app = Router::new()
        .route("/v1/logs/{job}/{attempt}/{rank}/{stream}", get(serve_log))
        .route("/v1/wake", axum::routing::post(wake))
        .route("/metrics", get(serve_metrics))
        .route("/v1/chaos", axum::routing::post(chaos))
        .route(
            "/v1/checkpoints/{job}/{step}/{file}",
            get(serve_checkpoint_file)
                .put(receive_checkpoint_file)
                .layer(DefaultBodyLimit::max(MAX_CHECKPOINT_FILE_BYTES)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(token, require_token))
        .with_state(agent.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, app).await {
            eprintln!("agent: log server stopped: {e}");
        }
    });
    tokio::spawn(accept_progress(agent.clone(), progress));
    tokio::spawn(detect_hangs(agent.clone()));

    let result = tokio::select! {
        r = heartbeat_loop(agent.clone(), client, http_port) => r,
        _ = net::http::shutdown_signal() => Ok(()),
    };
    agent.stop_everything().await;
    let _ = std::fs::remove_file(&agent.socket_path);
    // A node that goes away takes its memory with it.
    let _ = std::fs::remove_dir_all(&agent.cfg.memory_root);
    result
}

async fn register(agent: &Agent, client: &Client, http_port: u16) -> RegisterReply {
    let cfg = &agent.cfg;
    let req = RegisterRequest {
        name: cfg.name.clone(),
        slots: cfg.slots,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        addr: cfg.addr.clone(),
        http_port,
        spare: cfg.spare,
    };
    let mut complained = false;
    loop {
        match client.post_json::<_, RegisterReply>("/v1/agents/register", &req).await {
            Ok(reply) => {
                eprintln!("agent {}: registered with {} ({} slots)", cfg.name, client.base(), cfg.slots);
                // A fresh registration means the controller forgot whatever this agent held.
                agent.forget_all_exited();
                return reply;
            }
            Err(e) => {
                if !complained {
                    eprintln!("agent {}: cannot register yet ({e}); retrying every second", cfg.name);
                    complained = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn heartbeat_loop(agent: Arc<Agent>, client: Client, http_port: u16) -> Result<(), String> {
    let mut interval =
        Duration::from_millis(register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10));
    let path = format!("/v1/agents/{}/heartbeat", agent.cfg.name);
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let silent = agent.silent_until.lock().expect("agent state").is_some_and(|t| Instant::now() < t);
        if silent {
            tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
            continue;
        }
        let req = agent.report();
        let started = Instant::now();
        let answer = client.post_json::<_, HeartbeatReply>(&path, &req).await;
        agent.metrics.heartbeat(started.elapsed().as_secs_f64(), answer.is_ok());
        match answer {
            Ok(reply) => {
                if let Some(since) = unreachable_since.take() {
                    eprintln!(
                        "agent {}: controller reachable again after {:.1} s",
                        agent.cfg.name,
                        since.elapsed().as_secs_f64()
                    );
                }
                let mut news = false;
                for c in reply.commands {
                    news |= matches!(c.command, Command::ReservePort { .. } | Command::Launch(_));
                    agent.execute(c.command).await;
                    agent.node.lock().expect("agent state").acked_command_seq = c.seq;
                }
                if news {
                    // Tell the controller at once what the commands did (ports, launched ranks):
                    // a job's start waits on it.
                    continue;
                }
            }
            Err(ClientError::Status { status: 404, .. }) => {
                interval = Duration::from_millis(
                    register(&agent, &client, http_port).await.heartbeat_interval_ms.max(10),
                );
                continue;
            }
            Err(e) => {
                if unreachable_since.is_none() {
                    eprintln!(
                        "agent {}: heartbeat failed ({e}); ranks keep running, retrying",
                        agent.cfg.name
                    );
                    unreachable_since = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.wake.notified() => {}
        }
    }
}

impl Agent {
    fn job_memory(&self, job_id: JobId) -> PathBuf {
        self.cfg.memory_root.join(format!("job-{job_id}"))
    }

    fn report(&self) -> HeartbeatRequest {
        let node = self.node.lock().expect("agent state");
        let persisted: Vec<(JobId, PathBuf)> =
            node.leading.iter().map(|(&j, l)| (j, l.persist_dir.clone())).collect();
        HeartbeatRequest {
            checkpoints: checkpoints::report(&self.cfg.memory_root, &persisted),
            bad_checkpoints: node.bad.clone(),
            acked_command_seq: node.acked_command_seq,
            ranks: node
                .ranks
                .iter()
                .map(|(&(job_id, attempt, local_rank), r)| RankReport {
                    job_id,
                    attempt,
                    local_rank,
                    state: r.state,
                    step: r.step,
                    loss: r.loss,
                    exited_at_ms: r.exited_at_ms,
                    hang: r.hang.clone(),
                    steps: r.steps.iter().copied().collect(),
                    tokens_per_s: r.tokens_per_s,
                    mfu: r.mfu,
                    compute_ms: r.median_compute_ms(),
                })
                .collect(),
            ports: node
                .ports
                .iter()
                .map(|(&(job_id, attempt), &(port, _))| PortReport { job_id, attempt, port })
                .collect(),
        }
    }

    fn forget_all_exited(&self) {
        let mut node = self.node.lock().expect("agent state");
        node.ranks.retain(|_, r| r.state.is_running());
        node.ports.clear();
        node.acked_command_seq = 0;
    }

    async fn execute(self: &Arc<Self>, command: Command) {
        match command {
            Command::ReservePort { job_id, attempt } => {
                let mut node = self.node.lock().expect("agent state");
                if let std::collections::btree_map::Entry::Vacant(slot) = node.ports.entry((job_id, attempt))
                {
                    // The OS picks a free port; rank 0 binds it moments later. Each attempt gets a
                    // new one, so a restarted job never meets its predecessor's store.
                    let listener = std::net::TcpListener::bind("0.0.0.0:0");
                    match listener.and_then(|l| Ok((l.local_addr()?.port(), l))) {
                        Ok((port, listener)) => {
                            slot.insert((port, Some(listener)));
                        }
                        Err(e) => eprintln!("agent {}: cannot reserve a port: {e}", self.cfg.name),
                    }
                }
            }
            Command::Launch(spec) => self.launch(spec).await,
            Command::Purge { job_id } => {
                let _ = std::fs::remove_dir_all(self.job_memory(job_id));
                let mut node = self.node.lock().expect("agent state");
                node.leading.remove(&job_id);
                node.bad.retain(|b| b.job_id != job_id);
            }
            Command::Stop { job_id, attempt } => self.stop(job_id, attempt),
            Command::Forget { job_id, attempt } => {
                let mut node = self.node.lock().expect("agent state");
                node.ranks.retain(|k, r| !(k.0 == job_id && k.1 == attempt && !r.state.is_running()));
                node.ports.remove(&(job_id, attempt));
            }
        }
    }

    async fn launch(self: &Arc<Self>, spec: LaunchSpec) {
        let dir = self
            .cfg
            .work_dir
            .join("jobs")
            .join(spec.job_id.to_string())
            .join(format!("attempt-{}", spec.attempt));
        let checkpoint_dir = match validate_relative_path("checkpoint_dir", &spec.checkpoint_dir) {
            Ok(()) => self.cfg.checkpoint_root.join(&spec.checkpoint_dir),
            Err(e) => {
                eprintln!("agent {}: refusing job {}: {e}", self.cfg.name, spec.job_id);
                self.cfg.checkpoint_root.join(format!("job-{}", spec.job_id))
            }
        };
        let memory_dir = self.job_memory(spec.job_id);
        let fresh: Vec<u32> = {
            let node = self.node.lock().expect("agent state");
            spec.local_ranks()
                .filter(|&l| !node.ranks.contains_key(&(spec.job_id, spec.attempt, l)))
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        if spec.leader {
            self.node.lock().expect("agent state").leading.insert(
                spec.job_id,
                Leader {
                    buddy: spec.buddy.clone(),
                    persist_dir: checkpoint_dir.clone(),
                    checkpoint_every: spec.checkpoint_every.max(1),
                    persist_every: spec.persist_every.max(1),
                    busy: false,
                    pending: None,
                },
            );
        }
        let _ = std::fs::create_dir_all(&memory_dir);
        // Rank 0 binds the reserved port now: let it go.
        if let Some((_, listener)) =
            self.node.lock().expect("agent state").ports.get_mut(&(spec.job_id, spec.attempt))
        {
            listener.take();
        }
        // A node whose ranks keep their state live (slot files under the job's memory directory)
        // restarts from those: the ranks agree among themselves on the newest step anyone holds,
        // which is at least the controller's. No copy to fetch or verify here. A rank of the
        // previous attempt must not be writing those files any more when the new one maps them.
        let live = memory_dir.join(LIVE_DIR).is_dir();
        if live {
            self.retire_older_ranks(spec.job_id, spec.attempt).await;
        }
        // Every rank starts from the step the controller chose, verified, or not at all.
        let restore = match &spec.restore {
            None => Ok(None),
            Some(_) if live => Ok(None),
            Some(r) => {
                checkpoints::resolve_restore(&self.cfg.token, spec.job_id, r, &memory_dir, &checkpoint_dir)
                    .await
                    .map(Some)
                    .map_err(|e| (r.step, e))
            }
        };
        let restore_dir = match restore {
            Ok(dir) => dir,
            Err((step, message)) => {
                eprintln!("agent {}: job {}: cannot restore {message}", self.cfg.name, spec.job_id);
                let mut node = self.node.lock().expect("agent state");
                node.bad.push(CheckpointReport { job_id: spec.job_id, step, tier: proto::api::Tier::Memory });
                for &l in &fresh {
                    let failed = RankState::Exited { code: Some(RESTORE_FAILED_EXIT), signal: None };
                    node.ranks.insert((spec.job_id, spec.attempt, l), Rank::new(failed, None));
                }
                return;
            }
        };
        let extra_env = AgentEnv {
            agent_socket: self.socket_path.display().to_string(),
            checkpoint_dir: checkpoint_dir.display().to_string(),
            memory_checkpoint_dir: memory_dir.display().to_string(),
            checkpoint_every: spec.checkpoint_every.max(1),
            restore_dir: restore_dir.as_ref().map(|d| d.display().to_string()),
            restore_step: spec.restore.as_ref().map(|r| r.step),
        }
        .vars();
        for &local_rank in &fresh {
            let key = (spec.job_id, spec.attempt, local_rank);
            let mut env = spec.rank_env(local_rank);
            env.extend(extra_env.iter().cloned());
            let outcome = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::create_dir_all(&checkpoint_dir))
                .map_err(|e| format!("cannot create {} or {}: {e}", dir.display(), checkpoint_dir.display()))
                .and_then(|_| self.spawn_rank(&spec, &env, &dir, local_rank));
            let rank = match outcome {
                Ok(child) => {
                    let pid = child.id();
                    tokio::spawn(watch(self.clone(), key, child));
                    Rank::new(RankState::Running { pid: pid.unwrap_or(0) }, pid)
                }
                Err(message) => {
                    // Reported as a failed rank: the job fails or restarts like after any crash.
                    eprintln!("agent {}: job {} rank {}: {message}", self.cfg.name, spec.job_id, local_rank);
                    let _ = std::fs::write(
                        dir.join(format!("rank-{local_rank}.stderr")),
                        format!("myriad agent: {message}\n"),
                    );
                    Rank::new(RankState::Exited { code: Some(127), signal: None }, None)
                }
            };
            self.node.lock().expect("agent state").ranks.insert(key, rank);
        }
    }

    fn spawn_rank(
        &self,
        spec: &LaunchSpec,
        env: &[(String, String)],
        dir: &FsPath,
        local_rank: u32,
    ) -> Result<tokio::process::Child, String> {
        let open = |stream: &str| {
            let path = dir.join(format!("rank-{local_rank}.{stream}"));
            std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let mut cmd = std::process::Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(open("stdout")?)
            .stderr(open("stderr")?)
            .process_group(0);
        if let Some(w) = &spec.workdir {
            cmd.current_dir(w);
        }
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        cmd.spawn().map_err(|e| format!("cannot start {:?}: {e}", spec.argv[0]))
    }

    /// SIGTERM to each rank's process group now, SIGKILL after the grace period.
    fn stop(self: &Arc<Self>, job_id: JobId, attempt: u32) {
        let mut pids = Vec::new();
        {
            let mut node = self.node.lock().expect("agent state");
            for (k, r) in node.ranks.iter_mut() {
                if k.0 == job_id && k.1 == attempt && r.state.is_running() && !r.stopping {
                    r.stopping = true;
                    pids.extend(r.pid);
                }
            }
        }
        if pids.is_empty() {
            return;
        }
        signal_groups(&pids, libc::SIGTERM);
        let grace = self.cfg.stop_grace;
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let node = agent.node.lock().expect("agent state");
            let still: Vec<u32> = node
                .ranks
                .iter()
                .filter(|(k, r)| k.0 == job_id && k.1 == attempt && r.state.is_running())
                .filter_map(|(_, r)| r.pid)
                .collect();
            drop(node);
            signal_groups(&still, libc::SIGKILL);
        });
    }

    async fn stop_everything(&self) {
        let pids: Vec<u32> = {
            let node = self.node.lock().expect("agent state");
            node.ranks.values().filter(|r| r.state.is_running()).filter_map(|r| r.pid).collect()
        };
        if pids.is_empty() {
            return;
        }
        eprintln!("agent {}: stopping {} ranks", self.cfg.name, pids.len());
        signal_groups(&pids, libc::SIGTERM);
        let deadline = Instant::now() + self.cfg.stop_grace;
        while Instant::now() < deadline {
            let running = self.node.lock().expect("agent state").ranks.values().any(|r| r.state.is_running());
            if !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal_groups(&pids, libc::SIGKILL);
    }
}

fn signal_groups(pids: &[u32], signal: libc::c_int) {
    for &pid in pids {
        // SAFETY: kill(2) on a process group we created; a group that is gone yields ESRCH.
        unsafe {
            libc::kill(-(pid as libc::pid_t), signal);
        }
    }
}

/// Waits for a rank to exit, records how, and wakes the heartbeat so the controller hears now.
async fn watch(agent: Arc<Agent>, key: RankKey, mut child: tokio::process::Child) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id();
    let state = match child.wait().await {
        Ok(status) => RankState::Exited { code: status.code(), signal: status.signal() },
        Err(_) => RankState::Exited { code: None, signal: None },
    };
    // Whatever the rank left behind in its process group goes with it.
    signal_groups(&pid.into_iter().collect::<Vec<_>>(), libc::SIGKILL);
    if let Some(r) = agent.node.lock().expect("agent state").ranks.get_mut(&key) {
        r.state = state;
        r.exited_at_ms = Some(unix_ms());
    }
    agent.wake.notify_one();
}

/// Under a job's memory directory: its ranks' live state slots (the trainer's `train::live`).
const LIVE_DIR: &str = "live";
/// How long a launch waits for the previous attempt's ranks here to be gone.
const RETIRE_DEADLINE: Duration = Duration::from_secs(5);

impl Agent {
    /// Kills this node's ranks of earlier attempts of `job_id` (they were told to stop; a new
    /// attempt is starting) and waits, up to [`RETIRE_DEADLINE`], until they have exited.
    async fn retire_older_ranks(&self, job_id: JobId, attempt: u32) {
        let deadline = Instant::now() + RETIRE_DEADLINE;
        loop {
            let pids: Vec<u32> = {
                let node = self.node.lock().expect("agent state");
                node.ranks
                    .iter()
                    .filter(|((job, a, _), r)| *job == job_id && *a < attempt && r.state.is_running())
                    .filter_map(|(_, r)| r.pid)
                    .collect()
            };
            if pids.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "agent {}: job {job_id}: ranks {pids:?} of an earlier attempt outlived {RETIRE_DEADLINE:?}",
                    self.cfg.name
                );
                return;
            }
            signal_groups(&pids, libc::SIGKILL);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Exit code reported for ranks that could not start because their checkpoint failed to verify.
pub const RESTORE_FAILED_EXIT: i32 = 75;

impl Agent {
    /// Rank 0 finished an in-memory checkpoint: copy it to the buddy and maybe persist it, one
    /// copy at a time per job (a newer checkpoint that arrives meanwhile is copied next; older
    /// ones in between are skipped).
    fn checkpoint_taken(self: &Arc<Self>, job_id: JobId, step: u64) {
        {
            let mut node = self.node.lock().expect("agent state");
            let Some(leader) = node.leading.get_mut(&job_id) else { return };
            if leader.busy {
                leader.pending = Some(step);
                return;
            }
            leader.busy = true;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let mut step = step;
            loop {
                agent.replicate(job_id, step).await;
                let mut node = agent.node.lock().expect("agent state");
                let Some(leader) = node.leading.get_mut(&job_id) else { return };
                match leader.pending.take() {
                    Some(next) => step = next,
                    None => {
                        leader.busy = false;
                        return;
                    }
                }
            }
        });
    }

    async fn replicate(&self, job_id: JobId, step: u64) {
        let (buddy, persist_dir, persist) = {
            let node = self.node.lock().expect("agent state");
            let Some(l) = node.leading.get(&job_id) else { return };
            let nth = step / l.checkpoint_every;
            (l.buddy.clone(), l.persist_dir.clone(), nth.is_multiple_of(l.persist_every))
        };
        let dir = self.job_memory(job_id).join(layout::step_dir_name(step));
        let bytes = metrics::dir_bytes(&dir);
        if let Some(buddy) = buddy {
            let started = Instant::now();
            match checkpoints::push(&self.cfg.token, &buddy, job_id, step, &dir).await {
                Ok(()) => self.metrics.checkpoint_copied("buddy", started.elapsed().as_secs_f64(), bytes),
                Err(e) => {
                    eprintln!("agent {}: job {job_id}: buddy copy of step {step} failed: {e}", self.cfg.name)
                }
            }
        }
        if persist {
            let started = Instant::now();
            let copy = tokio::task::spawn_blocking(move || {
                let result = checkpoints::copy_dir(&dir, &persist_dir, step);
                layout::prune(&persist_dir, PERSISTED_KEEP);
                result
            });
            match copy.await {
                Ok(Ok(_)) => {
                    self.metrics.checkpoint_copied("persisted", started.elapsed().as_secs_f64(), bytes)
                }
                Ok(Err(e)) => {
                    eprintln!("agent {}: job {job_id}: persisting step {step} failed: {e}", self.cfg.name)
                }
                Err(_) => {}
            }
        }
    }
}

/// Persisted checkpoints kept per job.
const PERSISTED_KEEP: usize = 3;

async fn accept_progress(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin the agent's only thread.
                eprintln!("agent {}: progress socket: {e}", agent.cfg.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // A line longer than the limit ends the connection instead of growing the buffer.
                let limit = MAX_LINE_BYTES as u64 + 1;
                match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) if n as u64 >= limit => return,
                    Ok(_) => {}
                }
                // Unknown or malformed messages are ignored: the protocol is optional for ranks.
                let Some(p) = Progress::parse(&buf) else { continue };
                if p.event == Some(ProgressEvent::Checkpoint) {
                    if let Some(step) = p.step {
                        agent.checkpoint_taken(p.job_id, step);
                    }
                    continue;
                }
                let mut node = agent.node.lock().expect("agent state");
                let Some(r) = node.ranks.get_mut(&(p.job_id, p.attempt, p.local_rank)) else { continue };
                r.last_progress = Instant::now();
                r.speaks = true;
                if p.phase.is_some() {
                    r.phase = p.phase.clone();
                }
                if p.event == Some(ProgressEvent::StepEnd) {
                    r.phase = None;
                    r.step = p.step.or(r.step);
                    r.loss = p.loss.or(r.loss);
                    r.mfu = p.mfu.or(r.mfu);
                    if let (Some(step), Some(ms)) = (p.step, p.step_ms) {
                        if let Some(tokens) = p.tokens {
                            r.tokens_per_s = Some(tokens as f64 / (ms / 1e3));
                        }
                        r.steps.push_back(StepTime { step, ms, end_ms: unix_ms() });
                        if r.steps.len() > STEPS_KEPT {
                            r.steps.pop_front();
                        }
                    }
                    if let Some(ms) = p.compute_ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
                        r.compute_ms.push_back(ms);
                        if r.compute_ms.len() > COMPUTE_WINDOW {
                            r.compute_ms.pop_front();
                        }
                    }
                }
            }
        });
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    tail_bytes: Option<u64>,
}

/// The last `tail_bytes` of a rank's stdout or stderr. Every path segment is a parsed number or one
/// of two fixed names, so no request can reach outside the agent's job directory.
async fn serve_log(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u32, u32, String)>, PathRejection>,
    q: Result<Query<TailQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((job, attempt, rank, stream)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("stream {stream:?} must be stdout or stderr"),
        ));
    }
    let file = agent.cfg.work_dir.join(format!("jobs/{job}/attempt-{attempt}/rank-{rank}.{stream}"));
    let tail = q.tail_bytes.unwrap_or(MAX_LOG_TAIL_BYTES).min(MAX_LOG_TAIL_BYTES);
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&file)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(tail)))?;
        let mut bytes = Vec::new();
        f.take(tail).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => Ok(([("content-type", "text/plain; charset=utf-8")], bytes).into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no {stream} log for job {job} attempt {attempt} local rank {rank} on node {}",
                agent.cfg.name
            ),
        )),
        Err(e) => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading {}: {e}", file.display())))
        }
    }
}

fn checkpoint_path(agent: &Agent, job: JobId, step: u64, file: &str) -> Result<PathBuf, ApiError> {
    if !layout::valid_file_name(file) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{file:?} is not a checkpoint file name"),
        ));
    }
    Ok(agent.job_memory(job).join(layout::step_dir_name(step)).join(file))
}

/// A file of an in-memory checkpoint this node holds (a restarting node fetches it).
async fn serve_checkpoint_file(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u64, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((job, step, file)) = path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let path = checkpoint_path(&agent, job, step, &file)?;
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(([("content-type", "application/octet-stream")], bytes).into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node {} holds no {file} of job {job} step {step}", agent.cfg.name),
        )),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", path.display()))),
    }
}

/// A file of a buddy's checkpoint. Files arrive in a temporary directory; the manifest comes last
/// and commits the directory by renaming it, so a half-received checkpoint never counts.
async fn receive_checkpoint_file(
    State(agent): State<Arc<Agent>>,
    path: Result<Path<(JobId, u64, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((job, step, file)) = path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    checkpoint_path(&agent, job, step, &file)?;
    let root = agent.job_memory(job);
    let incoming = root.join(layout::hidden_dir_name(step, "incoming"));
    let io = |e: std::io::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", incoming.display()))
    };
    std::fs::create_dir_all(&incoming).map_err(io)?;
    std::fs::write(incoming.join(&file), &body).map_err(io)?;
    if file == layout::MANIFEST {
        let fin = root.join(layout::step_dir_name(step));
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&incoming, &fin).map_err(io)?;
        layout::prune(&root, checkpoints::KEEP_IN_MEMORY);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How often ranks are checked for hangs.
const HANG_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Finds ranks that stopped making progress, captures their stacks and kills them; the exit
/// wakes the heartbeat, and the controller ends the attempt. Nobody waits for a collective's
/// deadline, let alone a 600 s watchdog.
async fn detect_hangs(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(HANG_CHECK_EVERY).await;
        let now = Instant::now();
        let mut hung: Vec<(RankKey, u32, HangReport)> = Vec::new();
        {
            let node = agent.node.lock().expect("agent state");
            for (key, r) in node.ranks.iter() {
                let (Some(pid), true, false, true) = (r.pid, r.state.is_running(), r.stopping, r.speaks)
                else {
                    continue;
                };
                if r.hang.is_some() {
                    continue;
                }
                let threshold = match r.median_step_ms() {
                    Some(ms) => {
                        agent.cfg.hang_floor.max(Duration::from_secs_f64(agent.cfg.hang_factor * ms / 1e3))
                    }
                    None if r.step.is_none() => agent.cfg.hang_startup,
                    None => agent.cfg.hang_floor,
                };
                // A stopped (T) or spinning (R) rank is a culprit. A sleeping one is most likely
                // waiting on a culprit elsewhere: it gets half again as long, so the culprit's
                // report reaches the controller first and names the right rank.
                let state = process_state(pid);
                let culprit = matches!(state, Some('T' | 't' | 'R'));
                let threshold = if culprit { threshold } else { threshold.mul_f64(1.5) };
                let stalled = now.duration_since(r.last_progress);
                if stalled < threshold {
                    continue;
                }
                let report = HangReport {
                    stalled_ms: stalled.as_millis() as u64,
                    threshold_ms: threshold.as_millis() as u64,
                    phase: r.phase.clone(),
                    stack: String::new(),
                };
                hung.push((*key, pid, report));
            }
        }
        for (key, pid, mut report) in hung {
            report.stack = capture_stacks(pid);
            eprintln!(
                "agent {}: job {} rank {} hung ({} ms without progress); killing it",
                agent.cfg.name, key.0, key.2, report.stalled_ms
            );
            if let Some(r) = agent.node.lock().expect("agent state").ranks.get_mut(&key) {
                r.hang = Some(report);
            }
            signal_groups(&[pid], libc::SIGKILL);
            agent.metrics.hang_killed();
        }
    }
}

/// The one-letter state of a process (R, S, D, T, t, Z, …) from /proc/PID/stat.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Every thread of `pid`: name, state, wait channel and kernel stack (when readable), bounded.
fn capture_stacks(pid: u32) -> String {
    const MAX_BYTES: usize = 16 * 1024;
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("/proc/{pid}/task is not readable");
    };
    let mut tids: Vec<u32> = tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    for tid in tids {
        let base = format!("/proc/{pid}/task/{tid}");
        let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).unwrap_or_default();
        let comm = read("comm");
        let stat = read("stat");
        let state =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()).unwrap_or('?');
        out += &format!("thread {tid} {:?} state {state} wchan {}\n", comm.trim(), read("wchan").trim());
        for line in read("stack").lines().take(12) {
            out += &format!("    {line}\n");
        }
        if out.len() > MAX_BYTES {
            out.truncate(MAX_BYTES);
            out += "\n[truncated]\n";
            break;
        }
    }
    out
}

async fn serve_metrics(State(agent): State<Arc<Agent>>) -> Response {
    let (running, exited) = {
        let node = agent.node.lock().expect("agent state");
        let running = node.ranks.values().filter(|r| r.state.is_running()).count();
        (running, node.ranks.len() - running)
    };
    ([("content-type", net::http::METRICS_CONTENT_TYPE)], agent.metrics.render(running, exited))
        .into_response()
}

/// The controller has commands for this node: heartbeat now.
async fn wake(State(agent): State<Arc<Agent>>) -> StatusCode {
    agent.wake.notify_one();
    StatusCode::NO_CONTENT
}

/// Injects a fault on this node (`myriad chaos`, through the controller).
async fn chaos(
    State(agent): State<Arc<Agent>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    use proto::api::{ChaosAction, ChaosRequest};
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let req: ChaosRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("chaos: {e}")))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let rank_pid = || -> Result<u32, ApiError> {
        let (job, local) = (req.job_id.ok_or(bad("job_id missing".into()))?, req.rank.unwrap_or(0));
        let node = agent.node.lock().expect("agent state");
        node.ranks
            .iter()
            .filter(|(k, r)| k.0 == job && k.2 == local && r.state.is_running())
            .max_by_key(|(k, _)| k.1)
            .and_then(|(_, r)| r.pid)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!("no running local rank {local} of job {job} here"),
                )
            })
    };
    let seconds = req.seconds.unwrap_or(10.0);
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(bad(format!("seconds {seconds} must be in (0, 3600]")));
    }
    match req.action {
        ChaosAction::KillRank => signal_pid(rank_pid()?, libc::SIGKILL),
        ChaosAction::HangRank => signal_pid(rank_pid()?, libc::SIGSTOP),
        ChaosAction::SlowRank => {
            let pid = rank_pid()?;
            let factor = req.factor.unwrap_or(2.0);
            if !(factor.is_finite() && factor > 1.0 && factor <= 100.0) {
                return Err(bad(format!("factor {factor} must be in (1, 100]")));
            }
            // Runs 1/factor of each 100 ms period, stopped the rest.
            tokio::spawn(async move {
                let period = Duration::from_millis(100);
                let run = period.div_f64(factor);
                let end = Instant::now() + Duration::from_secs_f64(seconds);
                while Instant::now() < end {
                    tokio::time::sleep(run).await;
                    signal_pid(pid, libc::SIGSTOP);
                    tokio::time::sleep(period - run).await;
                    signal_pid(pid, libc::SIGCONT);
                }
            });
        }
        ChaosAction::KillAgent => {
            eprintln!("agent {}: chaos: exiting at once (node loss)", agent.cfg.name);
            // Answer first, then vanish without cleanup, the way a node dies.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::process::exit(137);
            });
        }
        ChaosAction::Partition => {
            *agent.silent_until.lock().expect("agent state") =
                Some(Instant::now() + Duration::from_secs_f64(seconds));
        }
        ChaosAction::CorruptCheckpoint => {
            let job = req.job_id.ok_or(bad("job_id missing".into()))?;
            let dir =
                agent.node.lock().expect("agent state").leading.get(&job).map(|l| l.persist_dir.clone());
            let dir = dir.ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("this node does not lead job {job}"))
            })?;
            let step = layout::complete_steps(&dir).unwrap_or_default().into_iter().max();
            let step = step.ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("job {job} has no persisted checkpoint yet"))
            })?;
            let file = dir.join(layout::step_dir_name(step)).join("model.safetensors");
            flip_middle_byte(&file).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", file.display()))
            })?;
            eprintln!("agent {}: chaos: corrupted {}", agent.cfg.name, file.display());
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on one of our ranks.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn flip_middle_byte(path: &FsPath) -> std::io::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let mid = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(mid) {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes)
}
