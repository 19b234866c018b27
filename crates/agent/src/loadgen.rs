//! The agent protocol at cluster scale, without ranks: a whole cluster of simulated agents in one
//! process, each an async task that speaks the real protocol over the network with the cluster
//! token. It registers, heartbeats the state of its ranks (`proto::node`, as the agent does) over
//! its own connection, answers the controller's doorbell and carries out commands (reserve a
//! port, launch, stop, forget); its launched ranks fetch their attempt's rendezvous table in a
//! task of their own. Only the ranks are imaginary.
//!
//! Where one host stands in for 12,500, the load generator shares what real nodes would each
//! have: one doorbell listener, which finds the agent by the node the doorbell names (a
//! listener each would be 12,500 more open files, past the 20,000 a process may hold here), and
//! 64 connections the ranks of all nodes fetch their tables over, in turn. Neither spares the
//! controller any work: it still rings every doorbell and serves every node its table. Only the
//! generator's own work is cut: a table byte-identical to one already parsed and checked is not
//! parsed again.
//!
//! [`measure`] drives a controller through registration, steady heartbeat latency and its CPU
//! and memory with a job on every node, API latency, the time from submitting a job until every
//! node holds its rendezvous table, and the time to find a silent node and relaunch the job with
//! a spare in its place (`myriad bench control-plane` starts the controller and prints the
//! report).

use hyper::body::Bytes;
use net::client::{Client, Method};
use proto::api::{
    Command, HeartbeatReply, HeartbeatRequest, JobId, JobView, RankReport, RankState, RegisterReply,
    RegisterRequest, StepTime, SubmitReply,
};
use proto::events::EventKind;
use proto::node::{NodeState, RankEntry, RankKey, Todo};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use crate::unix_ms;

/// The cluster to simulate.
#[derive(Clone, Debug)]
pub struct Load {
    /// Regular nodes; the job spans all of them.
    pub nodes: u32,
    /// Accelerator slots per node; the job runs one rank per slot.
    pub slots: u32,
    /// Hot spares besides the regular nodes (at least one: the silent node's ranks move there).
    pub spares: u32,
    /// Heartbeat interval the controller hands to agents.
    pub heartbeat_ms: u64,
    /// Seconds of steady heartbeats measured while the job runs.
    pub steady_s: u64,
}

/// The controller under test: where it listens, its token, its process (CPU, memory, files).
pub struct Target {
    pub url: String,
    pub token: String,
    pub pid: u32,
}

/// Deadline of every phase that waits on the controller; a broken controller fails the bench
/// instead of hanging it.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);
/// Deadline of one simulated agent's call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the simulated ranks fetch their tables over, shared by all nodes (a connection
/// per node's ranks would be 12,500 more files on each side, past this host's 20,000).
const TABLE_CONNECTIONS: usize = 64;
/// Simulated step time, and how many recent steps the leader repeats (as real agents do).
const STEP_MS: u64 = 1000;
const RECENT_STEPS: u64 = 4;

#[derive(Serialize)]
pub struct Report {
    pub nodes: u32,
    pub spares: u32,
    pub slots: u32,
    pub ranks: u32,
    pub heartbeat_ms: u64,
    /// Every agent registered (from the first registration call to the last answer).
    pub register_s: f64,
    pub job_start: JobStart,
    pub steady: Steady,
    pub silent_node: SilentNode,
    pub controller_memory: Memory,
}

#[derive(Serialize)]
pub struct JobStart {
    /// Submission until every node of the attempt held its rendezvous table.
    pub submit_to_peer_tables_s: f64,
    /// Submission until the controller reported the job running (every rank reported).
    pub submit_to_running_s: f64,
    pub peer_table_bytes: usize,
}

#[derive(Serialize)]
pub struct Steady {
    pub seconds: f64,
    pub heartbeats: usize,
    pub heartbeats_per_s: f64,
    pub heartbeat_errors: u64,
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_max_ms: f64,
    /// Controller CPU time over wall time (1.0 = one core busy).
    pub controller_cpu_cores: f64,
    /// The load generator's own CPU over the same window (it shares the machine).
    pub load_generator_cpu_cores: f64,
    pub api: Vec<ApiLatency>,
}

#[derive(Serialize)]
pub struct ApiLatency {
    pub route: String,
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Serialize)]
pub struct SilentNode {
    pub node: String,
    /// The node's last heartbeat until the controller declared it lost.
    pub detect_ms: u64,
    pub detect_heartbeat_intervals: f64,
    /// Declared lost until every node of the new attempt (the spare among them) held its table.
    pub relaunch_ms: u64,
    pub spare_used: String,
}

#[derive(Serialize)]
pub struct Memory {
    pub rss_empty_mb: f64,
    pub rss_nodes_mb: f64,
    pub rss_job_mb: f64,
    /// Resident growth per registered node (its agent's keep-alive connection, mostly).
    pub bytes_per_node: f64,
    /// Further growth per node of the running job, divided by the job's ranks. Almost all of it
    /// is per node, not per rank (larger heartbeats and answers grow each connection's buffers):
    /// compare runs with different `--slots`; the core's own state per rank is counted in
    /// `crates/core/tests/memory.rs`.
    pub job_bytes_per_node: f64,
    pub job_bytes_per_rank: f64,
    /// Open files (mostly agents' keep-alive connections) at the same three moments: resident
    /// memory grows with connections far more than with state.
    pub open_files_empty: usize,
    pub open_files_nodes: usize,
    pub open_files_job: usize,
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces: state is field 3, utime 14.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_s)
}

fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// What one simulated node holds: the protocol's own node state.
type SimState = NodeState<SimRank>;

#[derive(Clone, Copy)]
struct SimRank {
    state: RankState,
    launched_ms: u64,
    exited_ms: Option<u64>,
    /// Rank 0 of the job (its steps feed the controller's time ledger).
    leader: bool,
}

struct SimAgent {
    /// Its place in the cluster; picks the connection its ranks fetch tables over.
    index: usize,
    name: String,
    spare: bool,
    state: Mutex<SimState>,
    wake: Notify,
    /// Set to make the node go silent: no heartbeats, no answers, as a dead machine.
    silent: AtomicBool,
    last_heartbeat_ms: AtomicU64,
}

/// Per attempt: how many nodes hold the rendezvous table, when the latest got it, its size.
#[derive(Clone, Copy)]
struct Tables {
    nodes: u32,
    last_ms: u64,
    bytes: usize,
}

/// State shared by the load generator's tasks.
struct Hub {
    url: String,
    token: String,
    heartbeat_ms: u64,
    slots: u32,
    registered: AtomicUsize,
    recording: AtomicBool,
    heartbeat_latencies_ms: Mutex<Vec<f64>>,
    heartbeat_errors: AtomicU64,
    tables: Mutex<HashMap<(JobId, u32), Tables>>,
    /// Per attempt, the first table that parsed and checked: a later node's copy counts when its
    /// bytes are the same, so 12,500 copies cost a comparison each, not a parse.
    checked_tables: Mutex<HashMap<(JobId, u32), Bytes>>,
    /// What the simulated ranks fetch their tables over ([`TABLE_CONNECTIONS`]).
    table_clients: Vec<Client>,
    /// Rung when an agent registers or a node gets a table: what the phases wait on.
    progress: Notify,
}

impl RankEntry for SimRank {
    fn state(&self) -> RankState {
        self.state
    }
    fn report(&self, key: RankKey) -> RankReport {
        RankReport { exited_at_ms: self.exited_ms, ..RankReport::new(key, self.state) }
    }
}

impl SimAgent {
    /// The node's full state; a running rank has made a step every [`STEP_MS`] since its launch,
    /// and rank 0 reports its recent step times (the controller's time ledger).
    fn report(&self, now_ms: u64) -> HeartbeatRequest {
        let state = self.state.lock().expect("sim state");
        let mut req = state.report();
        for report in &mut req.ranks {
            let r = &state.ranks[&(report.job_id, report.attempt, report.local_rank)];
            let step = r.state.is_running().then(|| now_ms.saturating_sub(r.launched_ms) / STEP_MS);
            if let (Some(step), true) = (step, r.leader) {
                report.steps = (step.saturating_sub(RECENT_STEPS - 1).max(1)..=step)
                    .map(|s| StepTime { step: s, ms: STEP_MS as f64, end_ms: r.launched_ms + s * STEP_MS })
                    .collect();
            }
            report.step = step;
            report.loss = step.map(|s| 10.0 / (1.0 + s as f64));
            report.compute_ms = step.map(|_| 0.9 * STEP_MS as f64);
        }
        req
    }

    /// Carries out one command; true when the controller should hear about it at once. A new
    /// launch also returns the attempt whose rendezvous table to fetch.
    fn execute(&self, command: &Command, now_ms: u64) -> (bool, Option<(JobId, u32, u32)>) {
        let mut state = self.state.lock().expect("sim state");
        match state.apply(command) {
            Todo::ReservePort { job_id, attempt } => {
                // Nothing binds it: the ranks are imaginary.
                state.reserve(job_id, attempt, 20_000 + (attempt % 10_000) as u16);
                (true, None)
            }
            Todo::Launch { spec, fresh } => {
                for local in fresh {
                    let rank0 = spec.group_rank == 0 && local == 0;
                    let rank = SimRank {
                        state: RankState::Running { pid: 1 },
                        launched_ms: now_ms,
                        exited_ms: None,
                        leader: rank0,
                    };
                    state.insert((spec.job_id, spec.attempt, local), rank);
                }
                (true, Some((spec.job_id, spec.attempt, spec.ranks_per_node)))
            }
            Todo::Stop { ranks } => {
                for key in ranks {
                    let r = state.ranks.get_mut(&key).expect("listed by apply");
                    r.state = RankState::Exited { code: None, signal: Some(libc::SIGTERM) };
                    r.exited_ms = Some(now_ms);
                }
                (true, None)
            }
            // A repeated command: the controller still hears what it already did.
            Todo::Nothing => (
                matches!(command, Command::ReservePort { .. } | Command::Launch(_) | Command::Stop { .. }),
                None,
            ),
            Todo::Purge { .. } => (false, None),
        }
    }
}

/// The parts of a [`proto::api::PeerTable`] the simulated ranks check.
#[derive(serde::Deserialize)]
struct TableView<'a> {
    ranks_per_node: u32,
    #[serde(borrow)]
    hosts: Vec<&'a str>,
}

/// A node's ranks read their attempt's rendezvous table from the controller once they are
/// launched, while their agent goes on heartbeating (ranks and agent are separate processes).
/// Waiting for the table in the agent's own loop silenced hundreds of agents for more than the
/// three intervals that make a node lost, as 12,500 nodes' tables shared one host's links.
async fn fetch_table(hub: Arc<Hub>, index: usize, key: (JobId, u32), ranks_per_node: u32) {
    let client = &hub.table_clients[index % hub.table_clients.len()];
    let path = format!("/v1/jobs/{}/attempts/{}/peers", key.0, key.1);
    let deadline = Instant::now() + PHASE_DEADLINE;
    while Instant::now() < deadline {
        match client.call(Method::GET, &path, None).await {
            Ok(bytes) => {
                // Read whole, as an agent does. A real agent parses its one table on its own
                // host; here 12,500 nodes' parses would take the cores the controller needs, so
                // a copy identical to one already checked is not parsed again.
                let same = hub.checked_tables.lock().expect("checked tables").get(&key) == Some(&bytes);
                if !same {
                    let Ok(table) = serde_json::from_slice::<TableView>(&bytes) else { return };
                    if table.ranks_per_node != ranks_per_node || table.hosts.is_empty() {
                        return;
                    }
                    hub.checked_tables.lock().expect("checked tables").insert(key, bytes.clone());
                }
                let mut tables = hub.tables.lock().expect("tables");
                let entry = tables.entry(key).or_insert(Tables { nodes: 0, last_ms: 0, bytes: bytes.len() });
                entry.nodes += 1;
                entry.last_ms = unix_ms();
                drop(tables);
                hub.progress.notify_waiters();
                return;
            }
            // The attempt was superseded: its table no longer matters.
            Err(net::client::ClientError::Status { status: 409, .. }) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[derive(serde::Deserialize)]
struct Wake {
    node: String,
}

/// Every simulated agent's doorbell on one listener: the controller names the node it rings.
/// Returns the listener's port.
async fn serve_doorbells(token: &str, agents: &[Arc<SimAgent>]) -> Result<u16, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let http_port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let by_name: Arc<HashMap<String, Arc<SimAgent>>> =
        Arc::new(agents.iter().map(|a| (a.name.clone(), a.clone())).collect());
    let token: Arc<str> = token.into();
    let doorbell = axum::Router::new()
        .route(
            "/v1/wake",
            axum::routing::post(move |axum::extract::Query(wake): axum::extract::Query<Wake>| {
                let agent = by_name.get(&wake.node).cloned();
                async move {
                    let Some(agent) = agent else { return axum::http::StatusCode::NOT_FOUND };
                    if !agent.silent.load(Ordering::Relaxed) {
                        agent.wake.notify_one();
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(token, net::http::require_token));
    tokio::spawn(async move { axum::serve(listener, doorbell).await });
    Ok(http_port)
}

async fn agent_loop(
    hub: Arc<Hub>,
    agent: Arc<SimAgent>,
    http_port: u16,
    offset_ms: u64,
) -> Result<(), String> {
    let client = Client::new(&hub.url, &hub.token, CALL_TIMEOUT)?;
    let register = RegisterRequest {
        name: agent.name.clone(),
        slots: hub.slots,
        cores: 8,
        addr: "127.0.0.1".into(),
        http_port,
        spare: agent.spare,
        gpus: Vec::new(),
        driver: None,
    };
    let reply: RegisterReply = client
        .post_json("/v1/agents/register", &register)
        .await
        .map_err(|e| format!("{} cannot register: {e}", agent.name))?;
    hub.registered.fetch_add(1, Ordering::Relaxed);
    hub.progress.notify_waiters();
    let interval = Duration::from_millis(reply.heartbeat_interval_ms);
    // Agents start at different moments in a real cluster: spread the heartbeats over the interval.
    tokio::time::sleep(Duration::from_millis(offset_ms)).await;
    let path = format!("/v1/agents/{}/heartbeat", agent.name);
    loop {
        if agent.silent.load(Ordering::Relaxed) {
            return Ok(());
        }
        let request = agent.report(unix_ms());
        let started = Instant::now();
        let mut news = false;
        match client.post_json::<_, HeartbeatReply>(&path, &request).await {
            Ok(reply) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                agent.last_heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
                if hub.recording.load(Ordering::Relaxed) {
                    hub.heartbeat_latencies_ms.lock().expect("latencies").push(ms);
                }
                let now_ms = unix_ms();
                for c in reply.commands {
                    let (tell, launched) = agent.execute(&c.command, now_ms);
                    news |= tell;
                    if let Some((job_id, attempt, ranks_per_node)) = launched {
                        let key = (job_id, attempt);
                        tokio::spawn(fetch_table(hub.clone(), agent.index, key, ranks_per_node));
                    }
                    agent.state.lock().expect("sim state").ack(c.seq);
                }
            }
            Err(_) => {
                hub.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if news {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.wake.notified() => {}
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn wait_until<T>(
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
    notify: &Notify,
) -> Result<T, String> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    loop {
        let notified = notify.notified();
        if let Some(v) = probe() {
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{what}: not within {} s", PHASE_DEADLINE.as_secs()));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), notified).await;
    }
}

/// Runs the whole bench against the controller at `ctl`: registration, a job on every node, the
/// steady window, a silent node and the relaunch.
pub async fn measure(args: &Load, ctl: &Target) -> Result<Report, String> {
    let pid = ctl.pid;
    let (rss_empty, files_empty) = (rss_bytes(pid).unwrap_or(f64::NAN), open_files(pid));
    let hub = Arc::new(Hub {
        url: ctl.url.clone(),
        token: ctl.token.clone(),
        heartbeat_ms: args.heartbeat_ms,
        slots: args.slots,
        registered: AtomicUsize::new(0),
        recording: AtomicBool::new(false),
        heartbeat_latencies_ms: Mutex::new(Vec::new()),
        heartbeat_errors: AtomicU64::new(0),
        tables: Mutex::new(HashMap::new()),
        checked_tables: Mutex::new(HashMap::new()),
        table_clients: (0..TABLE_CONNECTIONS)
            .map(|_| Client::new(&ctl.url, &ctl.token, CALL_TIMEOUT).map(Client::dedicated))
            .collect::<Result<_, _>>()?,
        progress: Notify::new(),
    });
    let total = (args.nodes + args.spares) as usize;
    let agents: Vec<Arc<SimAgent>> = (0..total)
        .map(|i| {
            let spare = i >= args.nodes as usize;
            let name =
                if spare { format!("spare-{:05}", i - args.nodes as usize) } else { format!("node-{i:05}") };
            Arc::new(SimAgent {
                index: i,
                name,
                spare,
                state: Mutex::new(SimState::default()),
                wake: Notify::new(),
                silent: AtomicBool::new(false),
                last_heartbeat_ms: AtomicU64::new(0),
            })
        })
        .collect();
    let http_port = serve_doorbells(&ctl.token, &agents).await?;
    let registering = Instant::now();
    let mut tasks = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let offset_ms = hub.heartbeat_ms * i as u64 / total as u64;
        let (hub, agent) = (hub.clone(), agent.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent_loop(hub, agent, http_port, offset_ms).await {
                say!("simulated agent: {e}");
            }
        }));
    }
    wait_until(
        "every agent registered",
        || (hub.registered.load(Ordering::Relaxed) == total).then_some(()),
        &hub.progress,
    )
    .await?;
    let register_s = registering.elapsed().as_secs_f64();
    // One full round of heartbeats before measuring memory.
    tokio::time::sleep(Duration::from_millis(2 * args.heartbeat_ms)).await;
    let (rss_nodes, files_nodes) = (rss_bytes(pid).unwrap_or(f64::NAN), open_files(pid));

    let client = Client::new(&ctl.url, &ctl.token, CALL_TIMEOUT)?;
    let spec = serde_json::json!({
        "name": "bench",
        "argv": ["train"],
        "nodes": args.nodes,
        "ranks_per_node": args.slots,
        "spares": args.spares,
        "max_restarts": 3,
    });
    let submitted_ms = unix_ms();
    let submitted = Instant::now();
    let SubmitReply { id } = client.post_json("/v1/jobs", &spec).await.map_err(|e| format!("submit: {e}"))?;
    let Tables { last_ms: tables_ms, bytes: table_bytes, .. } = wait_until(
        "every node holds the rendezvous table of attempt 0",
        || hub.tables.lock().expect("tables").get(&(id, 0)).copied().filter(|t| t.nodes == args.nodes),
        &hub.progress,
    )
    .await?;
    let mut running_s = None;
    let mut last_seen = String::new();
    while running_s.is_none() && submitted.elapsed() < PHASE_DEADLINE {
        let job: JobView = client.get_json(&format!("/v1/jobs/{id}")).await.map_err(|e| e.to_string())?;
        if job.state == "running" {
            running_s = Some(submitted.elapsed().as_secs_f64());
        } else {
            last_seen = format!(
                "{} in attempt {} with {} of {} ranks running, {} exited{}",
                job.state,
                job.attempt,
                job.ranks_running,
                job.world_size,
                job.ranks_exited,
                job.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let running_s = running_s.ok_or_else(|| {
        format!("the job did not reach running within {} s: it was {last_seen}", PHASE_DEADLINE.as_secs())
    })?;
    let job_start = JobStart {
        submit_to_peer_tables_s: (tables_ms - submitted_ms) as f64 / 1e3,
        submit_to_running_s: running_s,
        peer_table_bytes: table_bytes,
    };
    // Let the start-up burst settle before the steady window.
    tokio::time::sleep(Duration::from_millis(2 * args.heartbeat_ms)).await;

    // A second job as large waits in the queue through the window, as on a busy cluster: every
    // heartbeat then meets a non-empty queue.
    let queued = serde_json::json!({
        "name": "queued", "argv": ["train"], "nodes": args.nodes, "ranks_per_node": args.slots,
    });
    let SubmitReply { id: queued } =
        client.post_json("/v1/jobs", &queued).await.map_err(|e| format!("submit: {e}"))?;
    let steady = steady_window(args, &hub, &client, pid, id).await?;
    client
        .call(Method::POST, &format!("/v1/jobs/{queued}/cancel"), None)
        .await
        .map_err(|e| format!("cancel the queued job: {e}"))?;
    let (rss_job, files_job) = (rss_bytes(pid).unwrap_or(f64::NAN), open_files(pid));

    let silent_node = silence_one_node(args, &hub, &client, &agents, id).await?;
    for t in tasks {
        t.abort();
    }
    let ranks = args.nodes * args.slots;
    Ok(Report {
        nodes: args.nodes,
        spares: args.spares,
        slots: args.slots,
        ranks,
        heartbeat_ms: args.heartbeat_ms,
        register_s,
        job_start,
        steady,
        silent_node,
        controller_memory: Memory {
            rss_empty_mb: rss_empty / 1e6,
            rss_nodes_mb: rss_nodes / 1e6,
            rss_job_mb: rss_job / 1e6,
            bytes_per_node: (rss_nodes - rss_empty) / total as f64,
            job_bytes_per_node: (rss_job - rss_nodes) / args.nodes as f64,
            job_bytes_per_rank: (rss_job - rss_nodes) / ranks as f64,
            open_files_empty: files_empty,
            open_files_nodes: files_nodes,
            open_files_job: files_job,
        },
    })
}

/// Heartbeats and API calls while the job runs, with the controller's CPU over the window.
async fn steady_window(
    args: &Load,
    hub: &Arc<Hub>,
    client: &Client,
    pid: u32,
    job: JobId,
) -> Result<Steady, String> {
    hub.heartbeat_latencies_ms.lock().expect("latencies").clear();
    let errors_before = hub.heartbeat_errors.load(Ordering::Relaxed);
    let cpu_before = cpu_seconds(pid).ok_or("cannot read the controller's CPU time")?;
    let own_before = own_cpu_seconds();
    let started = Instant::now();
    hub.recording.store(true, Ordering::Relaxed);
    // What an operator's dashboard polls, a few times a second.
    let routes = [format!("/v1/jobs/{job}"), "/v1/jobs".to_string(), "/v1/nodes".to_string()];
    let mut api: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let window = Duration::from_secs(args.steady_s);
    let mut i = 0;
    while started.elapsed() < window {
        let route = i % routes.len();
        let t = Instant::now();
        client
            .call(Method::GET, &routes[route], None)
            .await
            .map_err(|e| format!("GET {}: {e}", routes[route]))?;
        api[route].push(t.elapsed().as_secs_f64() * 1e3);
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hub.recording.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).ok_or("cannot read the controller's CPU time")? - cpu_before;
    let own = own_cpu_seconds() - own_before;
    let mut lat = std::mem::take(&mut *hub.heartbeat_latencies_ms.lock().expect("latencies"));
    lat.sort_by(f64::total_cmp);
    let api = routes
        .iter()
        .zip(api.iter_mut())
        .map(|(route, samples)| {
            samples.sort_by(f64::total_cmp);
            ApiLatency {
                route: format!("GET {}", route.replace(&format!("/{job}"), "/{id}")),
                calls: samples.len(),
                p50_ms: percentile(samples, 0.5),
                p99_ms: percentile(samples, 0.99),
            }
        })
        .collect();
    Ok(Steady {
        seconds,
        heartbeats: lat.len(),
        heartbeats_per_s: lat.len() as f64 / seconds,
        heartbeat_errors: hub.heartbeat_errors.load(Ordering::Relaxed) - errors_before,
        heartbeat_p50_ms: percentile(&lat, 0.5),
        heartbeat_p99_ms: percentile(&lat, 0.99),
        heartbeat_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        controller_cpu_cores: cpu / seconds,
        load_generator_cpu_cores: own / seconds,
        api,
    })
}

/// One node of the job stops dead; the controller must find it and restart the job with the
/// spare in its place.
/// The first event that `wanted` picks, read page by page (12,500 nodes' registrations alone are
/// more than one page).
async fn find_event(
    client: &Client,
    wanted: impl Fn(&proto::api::Event) -> bool,
) -> Result<Option<proto::api::Event>, String> {
    let mut after = 0;
    loop {
        let page: Vec<proto::api::Event> =
            client.get_json(&format!("/v1/events?after={after}")).await.map_err(|e| e.to_string())?;
        let Some(last) = page.last().map(|e| e.seq) else { return Ok(None) };
        if let Some(e) = page.into_iter().find(&wanted) {
            return Ok(Some(e));
        }
        after = last;
    }
}

async fn silence_one_node(
    args: &Load,
    hub: &Arc<Hub>,
    client: &Client,
    agents: &[Arc<SimAgent>],
    job: JobId,
) -> Result<SilentNode, String> {
    let view: JobView = client.get_json(&format!("/v1/jobs/{job}")).await.map_err(|e| e.to_string())?;
    let victim_name = view.nodes[view.nodes.len() / 2].clone();
    let victim = agents.iter().find(|a| a.name == victim_name).ok_or("the job runs on an unknown node")?;
    victim.silent.store(true, Ordering::Relaxed);
    let attempt = view.attempt + 1;
    let Tables { last_ms: relaunched_ms, .. } = wait_until(
        "every node holds the rendezvous table of the relaunched attempt",
        || hub.tables.lock().expect("tables").get(&(job, attempt)).copied().filter(|t| t.nodes == args.nodes),
        &hub.progress,
    )
    .await?;
    // The heartbeat loop may have been mid-call when silenced: its last answered one counts.
    let last_ms = victim.last_heartbeat_ms.load(Ordering::Relaxed);
    let lost = find_event(client, |e| e.is(EventKind::NodeLost) && e.node.as_deref() == Some(&victim_name))
        .await?
        .ok_or_else(|| format!("no node_lost event for {victim_name}"))?;
    let view: JobView = client.get_json(&format!("/v1/jobs/{job}")).await.map_err(|e| e.to_string())?;
    let spare_used = view
        .nodes
        .iter()
        .find(|n| agents.iter().any(|a| a.spare && &a.name == *n))
        .cloned()
        .ok_or("the relaunched attempt uses no spare")?;
    if view.nodes.contains(&victim_name) {
        return Err(format!("the relaunched attempt still uses the silent node {victim_name}"));
    }
    let detect_ms = lost.time_ms.saturating_sub(last_ms);
    Ok(SilentNode {
        node: victim_name,
        detect_ms,
        detect_heartbeat_intervals: detect_ms as f64 / args.heartbeat_ms as f64,
        relaunch_ms: relaunched_ms.saturating_sub(lost.time_ms),
        spare_used,
    })
}
