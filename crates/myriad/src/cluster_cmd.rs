//! The cluster commands: `controller`, `agent`, `up`, `run`, `submit`, `status`, `logs`, `cancel`,
//! `nodes`. Wiring only: arguments in, calls to the controller's API, tables or JSON out.

use clap::Args;
use myriad_core::CoreConfig;
use net::client::Client;
use proto::api::{Event, JobView, NodeView, SubmitReply};
use proto::spec::JobSpec;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::local::{LocalCluster, LocalOptions};

/// Runs one future on a fresh single-threaded runtime (the CLI is otherwise synchronous).
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(f)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where the controller is and how to prove we may talk to it.
#[derive(Args, Clone)]
pub struct Conn {
    /// Controller URL, http://HOST:PORT (default: the one `myriad up` wrote into --cluster).
    #[arg(long, env = proto::env::MYRIAD_CONTROLLER)]
    controller: Option<String>,
    /// Directory of a cluster started by `myriad up`.
    #[arg(long, env = proto::env::MYRIAD_CLUSTER, default_value = ".myriad")]
    cluster: PathBuf,
    /// File holding the cluster token (default: the cluster's; MYRIAD_TOKEN may hold the token).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

const CLI_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The cluster token: from `file`, else the MYRIAD_TOKEN variable, else the `fallback` file.
pub fn token(file: Option<&Path>, fallback: Option<&Path>, who: &str) -> Result<String, String> {
    if let Some(file) = file {
        return net::auth::read_token(file);
    }
    if let Ok(token) = std::env::var(proto::env::MYRIAD_TOKEN) {
        if token.trim().len() < 32 {
            return Err(format!("{} is shorter than 32 characters", proto::env::MYRIAD_TOKEN));
        }
        return Ok(token.trim().to_string());
    }
    match fallback {
        Some(f) => {
            net::auth::read_token(f).map_err(|e| format!("{e} (pass --token-file or set MYRIAD_TOKEN)"))
        }
        None => Err(format!("{who} needs the cluster token: pass --token-file or set MYRIAD_TOKEN")),
    }
}

impl Conn {
    fn client(&self) -> Result<Client, String> {
        let state = self.cluster.join("controller");
        let url = match &self.controller {
            Some(url) => url.clone(),
            None => std::fs::read_to_string(state.join(control::server::URL_FILE))
                .map(|s| s.trim().to_string())
                .map_err(|_| {
                    format!(
                        "no controller named: pass --controller URL, set MYRIAD_CONTROLLER, or start one with `myriad up` \
                         (looked for {})",
                        state.join(control::server::URL_FILE).display()
                    )
                })?,
        };
        let token = token(
            self.token_file.as_deref(),
            Some(&state.join(control::server::TOKEN_FILE)),
            "this command",
        )?;
        Client::new(&url, &token, CLI_CALL_TIMEOUT)
    }
}

// ------------------------------------------------------------------ controller and agent

#[derive(Args)]
pub struct ControllerArgs {
    /// Address of the HTTP API (port 0 picks a free one; the URL is written to the state dir).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// State directory: the SQLite database, the cluster token, controller.url.
    #[arg(long)]
    state: PathBuf,
    /// Interval agents heartbeat at; a node is lost after 3 missed.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// An attempt whose ranks have not all started by then fails.
    #[arg(long, default_value_t = 120)]
    launch_timeout_s: u64,
    /// A rank straggling (50% above the job's median compute) at this many 5-second checks in a
    /// row has its node swapped for a free spare of the job; 0 only reports stragglers.
    #[arg(long, default_value_t = 3)]
    straggler_evict_checks: u32,
    /// Fencing: an agent out of reach of the controller for this many heartbeat intervals kills
    /// its ranks, and a lost node's work moves only once that lease ran out (or a rank of the
    /// same attempt elsewhere exited). Longer than three node timeouts, so that pauses and
    /// partitions the controller rides out kill nothing; 0 turns fencing off.
    #[arg(long, default_value_t = 15)]
    fence_lease_heartbeats: u32,
}

pub fn controller(a: ControllerArgs) -> Result<(), String> {
    if a.heartbeat_ms < 10 {
        return Err(format!("--heartbeat-ms {} must be at least 10", a.heartbeat_ms));
    }
    if a.fence_lease_heartbeats != 0 && a.fence_lease_heartbeats <= 9 {
        return Err(format!(
            "--fence-lease-heartbeats {} must be 0 (off) or more than 9: a lease within three node timeouts would kill ranks through a pause the controller rides out",
            a.fence_lease_heartbeats
        ));
    }
    let cfg = CoreConfig {
        heartbeat_interval_ms: a.heartbeat_ms,
        launch_timeout_ms: a.launch_timeout_s * 1000,
        tick_ms: (a.heartbeat_ms / 10).max(5),
        straggler_evict_checks: a.straggler_evict_checks,
        fence_lease_heartbeats: a.fence_lease_heartbeats,
        ..CoreConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(control::server::serve(&a.listen, &a.state, cfg))
}

#[derive(Args)]
pub struct AgentArgs {
    /// Controller URL, http://HOST:PORT.
    #[arg(long)]
    controller: String,
    /// Node name, unique in the cluster.
    #[arg(long)]
    name: String,
    /// Rank slots on this node (default: one per GPU found, else 1).
    #[arg(long)]
    slots: Option<u32>,
    /// Describe this node's GPUs with a JSON file instead of NVML (tests and demos; see
    /// `agent::gpu::FakeGpus`); it is read again at every check, so a fault can be injected.
    #[arg(long)]
    fake_gpus: Option<PathBuf>,
    /// Milliseconds between GPU health checks while ranks run (one runs before every launch too).
    #[arg(long, default_value_t = 2000)]
    gpu_check_ms: u64,
    /// Join as a hot spare.
    #[arg(long)]
    spare: bool,
    /// Address other nodes reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
    /// Where the agent's log endpoint listens.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: String,
    /// Rank logs and the progress socket (default .myriad/agents/NAME).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Root of jobs' checkpoint directories (default WORK_DIR/checkpoints).
    #[arg(long)]
    checkpoint_root: Option<PathBuf>,
    /// File holding the cluster token (or set MYRIAD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// In-memory checkpoints (default: a directory on /dev/shm, removed when the agent stops).
    #[arg(long)]
    memory_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(long, default_value_t = 10)]
    stop_grace_s: u64,
    /// A rank is hung after max(--hang-floor-s, --hang-factor × median step) without progress.
    #[arg(long, default_value_t = 4.0)]
    hang_floor_s: f64,
    #[arg(long, default_value_t = 4.0)]
    hang_factor: f64,
    /// Allowance before a rank's first step.
    #[arg(long, default_value_t = 120.0)]
    hang_startup_s: f64,
}

pub fn agent(a: AgentArgs) -> Result<(), String> {
    proto::spec::validate_name("--name", &a.name).map_err(|e| e.to_string())?;
    if a.slots == Some(0) {
        return Err("--slots must be at least 1".into());
    }
    if a.gpu_check_ms < 100 {
        return Err(format!("--gpu-check-ms {} must be at least 100", a.gpu_check_ms));
    }
    let token = token(a.token_file.as_deref(), None, "the agent")?;
    let work_dir = a.work_dir.unwrap_or_else(|| PathBuf::from(".myriad/agents").join(&a.name));
    let work_dir = absolute(&work_dir)?;
    let checkpoint_root = absolute(&a.checkpoint_root.unwrap_or_else(|| work_dir.join("checkpoints")))?;
    let memory_root = match a.memory_dir {
        Some(d) => absolute(&d)?,
        None => {
            remove_dead_agents_memory(Path::new(SHM), &a.name);
            default_memory_dir(&a.name, std::process::id(), &work_dir)
        }
    };
    agent::run(agent::AgentConfig {
        controller: a.controller,
        token,
        name: a.name,
        slots: a.slots,
        spare: a.spare,
        fake_gpus: a.fake_gpus.as_deref().map(absolute).transpose()?,
        gpu_check_every: Duration::from_millis(a.gpu_check_ms),
        addr: a.addr,
        listen: a.listen,
        work_dir,
        checkpoint_root,
        memory_root,
        stop_grace: Duration::from_secs(a.stop_grace_s),
        hang: agent::HangRule {
            floor: secs("--hang-floor-s", a.hang_floor_s)?,
            factor: a.hang_factor,
            startup: secs("--hang-startup-s", a.hang_startup_s)?,
        },
    })
}

fn secs(flag: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(format!("{flag} {s} must be a positive number of seconds"))
}

/// Where agents keep their memory tiers by default: tmpfs, shared by every process of the host.
const SHM: &str = "/dev/shm";

/// Memory, not disk: tmpfs when the machine has it. The pid keeps a restarted agent from finding
/// a memory it is not supposed to have (and the agent clears what a reused pid leaves it).
pub fn default_memory_dir(name: &str, pid: u32, work_dir: &Path) -> PathBuf {
    let shm = Path::new(SHM);
    if shm.is_dir() {
        shm.join(format!("myriad-agent-{name}-{pid}"))
    } else {
        work_dir.join(format!("memory-{pid}"))
    }
}

/// Removes the default memory directories under `shm` of earlier agents of this node's name whose
/// process is gone: a stopped agent removes its own, a killed one cannot, and its checkpoints would
/// hold the host's tmpfs until it restarts. Only this user's directories, never through a link;
/// those of agents still running (other clusters' nodes of the same name on a shared host) stay.
fn remove_dead_agents_memory(shm: &Path, name: &str) {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("myriad-agent-{name}-");
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    for entry in std::fs::read_dir(shm).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)?.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
        if !meta.is_dir() || meta.uid() != me || pid <= 0 {
            continue;
        }
        // SAFETY: signal 0 only asks whether the process exists; ESRCH means no process has the pid.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

// ------------------------------------------------------------------ up

#[derive(Args)]
pub struct UpArgs {
    /// Regular nodes.
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    /// Slots (accelerators) per node.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Hot spare nodes, used only when regular ones do not suffice.
    #[arg(long, default_value_t = 0)]
    spares: u32,
    /// Cluster directory: controller state, agents' work dirs, logs, checkpoints.
    #[arg(long, env = proto::env::MYRIAD_CLUSTER, default_value = ".myriad")]
    cluster: PathBuf,
    /// Controller address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// A directory of fake GPU files: node NAME's agent describes its GPUs with NAME.json there
    /// (and discovers its slots from them) where that file exists.
    #[arg(long)]
    fake_gpus: Option<PathBuf>,
    /// Print the cluster's URL and paths as one JSON object once it is up.
    #[arg(long)]
    json: bool,
}

pub fn up(a: UpArgs) -> Result<(), String> {
    let dir = absolute(&a.cluster)?;
    let opts = LocalOptions {
        nodes: a.nodes,
        slots: a.slots,
        spares: a.spares,
        listen: a.listen,
        heartbeat_ms: a.heartbeat_ms,
        startup_timeout: Duration::from_secs(30),
        fake_gpus: a.fake_gpus.as_deref().map(absolute).transpose()?,
    };
    let mut cluster = LocalCluster::start(&dir, &opts)?;
    let token_file = dir.join("controller").join(control::server::TOKEN_FILE);
    if a.json {
        let info = serde_json::json!({
            "url": cluster.url, "cluster": dir, "token_file": token_file,
            "nodes": a.nodes, "spares": a.spares, "slots": a.slots,
            "dashboard": crate::local::dashboard_link(&cluster.url, &cluster.token),
        });
        println!("{info}");
    } else {
        println!(
            "cluster up: {} nodes + {} spares × {} slots, controller {}",
            a.nodes, a.spares, a.slots, cluster.url
        );
        println!("state and logs in {}; token in {}", dir.display(), token_file.display());
        println!("dashboard: {}", crate::local::dashboard_link(&cluster.url, &cluster.token));
        println!(
            "try: myriad submit --nnodes {} --nproc-per-node {} -- myriad train --preset tiny",
            a.nodes, a.slots
        );
        println!("Ctrl-C stops the cluster and its jobs.");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let result = block_on(async {
        let mut reported = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = net::http::shutdown_signal() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    for name in cluster.supervise()? {
                        if reported.insert(name.clone()) {
                            eprintln!("agent {name} exited: that node is gone (logs in {})", dir.join("logs").display());
                        }
                    }
                }
            }
        }
    });
    eprintln!("stopping the cluster");
    cluster.stop();
    result
}

// ------------------------------------------------------------------ submit

#[derive(Args)]
pub struct SubmitArgs {
    /// A TOML job file; or describe the job with the flags and `-- CMD ARGS…`.
    file: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, alias = "nodes", default_value_t = 1)]
    nnodes: u32,
    #[arg(long, alias = "nproc_per_node", default_value_t = 1)]
    nproc_per_node: u32,
    #[arg(long, alias = "max_restarts", default_value_t = 0)]
    max_restarts: u32,
    /// Spare nodes the job may use.
    #[arg(long, default_value_t = 0)]
    spares: u32,
    /// KEY=VALUE for every rank (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Relative to each agent's checkpoint root.
    #[arg(long)]
    checkpoint_dir: Option<String>,
    /// Steps between checkpoint directories handed to the agent (for ranks that take them, like
    /// `myriad train`, which also keeps its state live in the agent's memory every step).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Persist every this many checkpoint directories.
    #[arg(long, default_value_t = 10)]
    persist_every: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
    /// The program every rank runs, with its arguments.
    #[arg(last = true)]
    cmd: Vec<String>,
}

pub fn submit(a: SubmitArgs) -> Result<(), String> {
    let client = a.conn.client()?;
    let (body, content_type) = match (&a.file, a.cmd.is_empty()) {
        (Some(file), true) => {
            let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            (text, "application/toml")
        }
        (Some(_), false) => return Err("give either a job file or `-- CMD ARGS…`, not both".into()),
        (None, true) => return Err("nothing to run: give a job file or `-- CMD ARGS…`".into()),
        (None, false) => {
            let env = parse_env(&a.env)?;
            let spec = JobSpec {
                name: a.name.clone().unwrap_or_else(|| job_name_from(&a.cmd)),
                argv: a.cmd.clone(),
                env,
                nodes: a.nnodes,
                ranks_per_node: a.nproc_per_node,
                spares: a.spares,
                max_restarts: a.max_restarts,
                checkpoint_dir: a.checkpoint_dir.clone(),
                workdir: Some(current_dir()?),
                run_id: None,
                checkpoint_every: a.checkpoint_every,
                persist_every: a.persist_every,
            };
            (serde_json::to_vec(&spec).expect("spec serialises"), "application/json")
        }
    };
    let reply: SubmitReply = block_on(async {
        let bytes = client.call(net::client::Method::POST, "/v1/jobs", Some((body, content_type))).await?;
        serde_json::from_slice(&bytes).map_err(|e| net::client::ClientError::BadBody(e.to_string()))
    })
    .map_err(|e| format!("submit: {e}"))?;
    if a.json {
        println!("{}", serde_json::json!({ "id": reply.id }));
    } else {
        println!("submitted job {}", reply.id);
    }
    Ok(())
}

fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("--env {p:?} must be KEY=VALUE")),
        })
        .collect()
}

fn current_dir() -> Result<String, String> {
    let dir = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    dir.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("current directory {} is not UTF-8", dir.display()))
}

/// A job name from the program: its file name, reduced to the characters names allow.
pub fn job_name_from(cmd: &[String]) -> String {
    let prog = cmd.iter().find(|a| !a.starts_with('-') && !a.starts_with("python")).unwrap_or(&cmd[0]);
    let base = Path::new(prog).file_name().and_then(|s| s.to_str()).unwrap_or("job");
    let clean: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(64)
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        "job".into()
    } else {
        clean
    }
}

// ------------------------------------------------------------------ status, nodes, logs, cancel

#[derive(Args)]
pub struct StatusArgs {
    /// One job in detail, with its events; without it, every job and node.
    job: Option<u64>,
    #[arg(long)]
    json: bool,
    /// Redraw in place every SECONDS (default 2) until Ctrl-C.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    #[command(flatten)]
    conn: Conn,
}

pub fn status(a: StatusArgs) -> Result<(), String> {
    if let Some(every_s) = a.watch {
        if a.json {
            return Err("--watch redraws tables; for JSON, call `myriad status --json` in a loop".into());
        }
        if !(0.1..=3600.0).contains(&every_s) {
            return Err(format!(
                "--watch {every_s}: the refresh period must be between 0.1 and 3600 seconds"
            ));
        }
    }
    let client = a.conn.client()?;
    let Some(every_s) = a.watch else {
        return block_on(status_frame(&client, a.job, a.json, usize::MAX)).map(|frame| print!("{frame}"));
    };
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    block_on(async {
        loop {
            // A controller that stops answering is shown, not fatal: it may be restarting.
            // The newest events only: a frame taller than the terminal cannot be redrawn in place.
            let frame = status_frame(&client, a.job, false, WATCH_EVENTS)
                .await
                .unwrap_or_else(|e| format!("{e}\n(retrying every {every_s} s)\n"));
            let clock = utc_clock(now_ms());
            let header = format!("myriad status · every {every_s} s · {clock} · Ctrl-C stops\n\n");
            let mut out = std::io::stdout().lock();
            if terminal {
                // Home, each line overwritten and cleared to its end, then the rest of the screen
                // cleared: no flicker, and nothing left of a longer previous frame.
                let body: String =
                    format!("{header}{frame}").lines().map(|l| format!("{l}\x1b[K\n")).collect();
                let _ = write!(out, "\x1b[H{body}\x1b[J");
            } else {
                let _ = writeln!(out, "{header}{frame}");
            }
            let _ = out.flush();
            drop(out);
            tokio::select! {
                _ = net::http::shutdown_signal() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs_f64(every_s)) => {}
            }
        }
    })
}

/// Events of one job that `status JOB --watch` shows.
const WATCH_EVENTS: usize = 20;

/// HH:MM:SS (UTC) of a Unix time in ms.
fn utc_clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02} UTC", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// What `myriad status` prints once: one job with its newest `events_shown` events, or every job
/// and a node summary.
async fn status_frame(
    client: &Client,
    job: Option<u64>,
    json: bool,
    events_shown: usize,
) -> Result<String, String> {
    use std::fmt::Write;
    let mut out = String::new();
    match job {
        Some(id) => {
            let job: JobView =
                client.get_json(&format!("/v1/jobs/{id}")).await.map_err(|e| format!("status: {e}"))?;
            let events: Vec<Event> = client
                .get_json(&format!("/v1/jobs/{id}/events"))
                .await
                .map_err(|e| format!("status: {e}"))?;
            if json {
                return Ok(format!("{}\n", serde_json::json!({ "job": job, "events": events })));
            }
            out += &jobs_table(std::slice::from_ref(&job));
            let t = &job.time;
            let _ = writeln!(
                out,
                "\ntime: {:.1} s wall, {:.1} s committed; lost: start-up {:.1} s, detection {:.1} s, \
                 restart {:.1} s, recomputation {:.1} s",
                t.wall_ms as f64 / 1e3,
                t.committed_ms / 1e3,
                t.startup_ms / 1e3,
                t.detection_ms / 1e3,
                t.restart_ms / 1e3,
                t.recompute_ms / 1e3,
            );
            if let Some(reason) = &job.reason {
                let _ = writeln!(out, "reason: {reason}");
            }
            let _ = writeln!(out, "\nevents:");
            let hidden = events.len().saturating_sub(events_shown);
            if hidden > 0 {
                let _ = writeln!(out, "  ({hidden} earlier; `myriad status {id}` lists them all)");
            }
            for e in &events[hidden..] {
                let t = (e.time_ms.saturating_sub(job.submitted_ms)) as f64 / 1e3;
                let node = e.node.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default();
                let _ = writeln!(out, "  +{t:>8.1}s  {:<18} {}{node}", e.kind, e.message);
            }
        }
        None => {
            let jobs: Vec<JobView> = client.get_json("/v1/jobs").await.map_err(|e| format!("status: {e}"))?;
            let nodes: Vec<NodeView> =
                client.get_json("/v1/nodes").await.map_err(|e| format!("status: {e}"))?;
            if json {
                return Ok(format!("{}\n", serde_json::json!({ "jobs": jobs, "nodes": nodes })));
            }
            if jobs.is_empty() {
                out += "no jobs\n";
            } else {
                out += &jobs_table(&jobs);
            }
            let healthy = nodes.iter().filter(|n| n.health == "healthy").count();
            let slots: u32 = nodes.iter().filter(|n| n.health == "healthy").map(|n| n.slots).sum();
            let used: u32 = nodes.iter().map(|n| n.slots_used).sum();
            let _ = write!(out, "\nnodes: {healthy} healthy of {}, slots {used}/{slots} in use", nodes.len());
            for (health, label) in [("lost", "lost"), ("quarantined", "quarantined")] {
                let names: Vec<&str> =
                    nodes.iter().filter(|n| n.health == health).map(|n| n.name.as_str()).collect();
                if !names.is_empty() {
                    let shown = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
                    let more = names.len().saturating_sub(8);
                    let _ = write!(out, "; {} {label}: {shown}", names.len());
                    if more > 0 {
                        let _ = write!(out, " and {more} more");
                    }
                }
            }
            out.push('\n');
        }
    }
    Ok(out)
}

fn jobs_table(jobs: &[JobView]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:<16} {:<10} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>8}  NODES",
        "ID", "NAME", "STATE", "LAYOUT", "ATTEMPT", "STEP", "LOSS", "TOK/S", "MFU", "ETTR", "FAULTS", "AGE"
    );
    let now = now_ms();
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
    for j in jobs {
        let layout = format!("{}x{}", j.spec.nodes, j.spec.ranks_per_node);
        let step = j.step.map_or("-".into(), |s| s.to_string());
        let loss = j.loss.map_or("-".into(), |l| format!("{l:.4}"));
        let tokens = j.tokens_per_s.map_or("-".into(), |t| {
            if t >= 1e4 {
                format!("{:.1}k", t / 1e3)
            } else {
                format!("{t:.0}")
            }
        });
        let age = format_age_s((j.ended_ms.unwrap_or(now).saturating_sub(j.submitted_ms)) as f64 / 1e3);
        // 1,250 node names do not fit a line: the first few and a count.
        let nodes = if j.nodes.len() > 4 {
            format!("{},… ({} nodes)", j.nodes[..3].join(","), j.nodes.len())
        } else {
            j.nodes.join(",")
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:<10} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>8}  {}",
            j.id,
            truncate(&j.name, 16),
            j.state,
            layout,
            j.attempt,
            step,
            loss,
            tokens,
            pct(j.mfu),
            pct(j.ettr),
            j.faults,
            age,
            nodes
        );
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn format_age_s(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0}s")
    } else if s < 3600.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

#[derive(Args)]
pub struct NodesArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

pub fn nodes(a: NodesArgs) -> Result<(), String> {
    let client = a.conn.client()?;
    let nodes: Vec<NodeView> = block_on(client.get_json("/v1/nodes")).map_err(|e| format!("nodes: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&nodes).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:<16} {:<8} {:>5} {:>5} {:<6} {:>10}  JOBS",
        "NAME", "HEALTH", "SLOTS", "USED", "SPARE", "HEARTBEAT"
    );
    for n in &nodes {
        let age = n.heartbeat_age_ms.map_or("-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1e3));
        let jobs: Vec<String> = n.jobs.iter().map(|j| j.to_string()).collect();
        println!(
            "{:<16} {:<8} {:>5} {:>5} {:<6} {:>10}  {}",
            n.name,
            n.health,
            n.slots,
            n.slots_used,
            if n.spare { "yes" } else { "no" },
            age,
            jobs.join(",")
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct LogsArgs {
    job: u64,
    /// Global rank.
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Attempt (default: the latest).
    #[arg(long)]
    attempt: Option<u32>,
    /// Show stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// Only the last this many bytes.
    #[arg(long)]
    tail_bytes: Option<u64>,
    /// Keep printing the rank's output as it grows, across restarts, until the job ends.
    #[arg(long, short = 'f')]
    follow: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// How often `logs --follow` asks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

pub fn logs(a: LogsArgs) -> Result<(), String> {
    let client = a.conn.client()?;
    if a.follow {
        if a.json || a.tail_bytes.is_some() || a.attempt.is_some() {
            return Err("--follow prints the latest attempt's output as it grows: drop --json, --tail-bytes and --attempt".into());
        }
        return block_on(follow_log(&client, a.job, a.rank, a.stderr));
    }
    let stream = if a.stderr { "stderr" } else { "stdout" };
    let text = block_on(fetch_log(&client, a.job, a.rank, a.attempt, stream, a.tail_bytes))?;
    if a.json {
        let out = serde_json::json!({"job": a.job, "rank": a.rank, "attempt": a.attempt, "stream": stream, "text": text});
        println!("{out}");
    } else {
        print!("{text}");
    }
    Ok(())
}

async fn follow_log(client: &Client, job: u64, rank: u32, stderr: bool) -> Result<(), String> {
    use crate::follow::{Follower, Stream};
    let stream = if stderr { Stream::Stderr } else { Stream::Stdout };
    let mut follower = Follower::new(job, vec![rank], vec![stream], false);
    loop {
        let view: JobView =
            client.get_json(&format!("/v1/jobs/{job}")).await.map_err(|e| format!("logs: {e}"))?;
        if rank >= view.world_size {
            return Err(format!("job {job} has {} ranks: rank {rank} does not exist", view.world_size));
        }
        let ended = matches!(view.state.as_str(), "succeeded" | "failed" | "cancelled");
        follower.poll(client, view.attempt, ended).await;
        if ended {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

async fn fetch_log(
    client: &Client,
    job: u64,
    rank: u32,
    attempt: Option<u32>,
    stream: &str,
    tail: Option<u64>,
) -> Result<String, String> {
    let mut path = format!("/v1/jobs/{job}/logs?rank={rank}&stream={stream}");
    if let Some(a) = attempt {
        path += &format!("&attempt={a}");
    }
    if let Some(t) = tail {
        path += &format!("&tail_bytes={t}");
    }
    let bytes = client.call(net::client::Method::GET, &path, None).await.map_err(|e| format!("logs: {e}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Args)]
pub struct CancelArgs {
    job: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

pub fn cancel(a: CancelArgs) -> Result<(), String> {
    let client = a.conn.client()?;
    let job: JobView = block_on(async {
        let bytes =
            client.call(net::client::Method::POST, &format!("/v1/jobs/{}/cancel", a.job), None).await?;
        serde_json::from_slice(&bytes).map_err(|e| net::client::ClientError::BadBody(e.to_string()))
    })
    .map_err(|e| format!("cancel: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&job).expect("serialises"));
    } else {
        println!("job {} is {}", job.id, job.state);
    }
    Ok(())
}

// ------------------------------------------------------------------ chaos

#[derive(Args)]
pub struct ChaosArgs {
    /// kill-rank, hang-rank, slow-rank, kill-agent, partition, corrupt-checkpoint, kill-controller.
    action: String,
    #[arg(long)]
    job: Option<u64>,
    /// Global rank (default 0).
    #[arg(long)]
    rank: Option<u32>,
    /// A node by name (kill-agent, partition).
    #[arg(long)]
    node: Option<String>,
    /// Length of a partition or a slowdown.
    #[arg(long)]
    seconds: Option<f64>,
    /// Slowdown factor (slow-rank).
    #[arg(long)]
    factor: Option<f64>,
    #[command(flatten)]
    conn: Conn,
}

pub fn chaos(a: ChaosArgs) -> Result<(), String> {
    use proto::api::{ChaosAction, ChaosRequest};
    if a.action == "kill-controller" {
        let pid_file = a.conn.cluster.join("controller").join(control::server::PID_FILE);
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| {
                format!(
                    "{}: {e} (kill-controller works on a cluster started by `myriad up`)",
                    pid_file.display()
                )
            })?
            .trim()
            .parse()
            .map_err(|_| format!("{} does not hold a process id", pid_file.display()))?;
        // SAFETY: kill(2) on the pid the controller wrote about itself.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(format!(
                "cannot kill the controller (pid {pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        println!("killed the controller (pid {pid})");
        return Ok(());
    }
    let action = match a.action.as_str() {
        "kill-rank" => ChaosAction::KillRank,
        "hang-rank" => ChaosAction::HangRank,
        "slow-rank" => ChaosAction::SlowRank,
        "kill-agent" => ChaosAction::KillAgent,
        "partition" => ChaosAction::Partition,
        "corrupt-checkpoint" => ChaosAction::CorruptCheckpoint,
        other => return Err(format!("unknown chaos action {other:?}: kill-rank, hang-rank, slow-rank, kill-agent, partition, corrupt-checkpoint, kill-controller")),
    };
    let req = ChaosRequest {
        action,
        job_id: a.job,
        rank: a.rank,
        node: a.node,
        seconds: a.seconds,
        factor: a.factor,
    };
    let client = a.conn.client()?;
    let json = serde_json::to_vec(&req).expect("serialises");
    block_on(client.call(net::client::Method::POST, "/v1/chaos", Some((json, "application/json"))))
        .map_err(|e| format!("chaos: {e}"))?;
    println!("injected {}", a.action);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_agents_memory_is_removed_and_a_running_ones_kept() {
        let shm = std::env::temp_dir().join(format!("myriad-shm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&shm);
        // Above any pid_max Linux allows (2^22): no process has it.
        let dead = 4_194_305;
        // SAFETY: getppid(2) has no preconditions; the test runner is alive while the test runs.
        let running = unsafe { libc::getppid() };
        let dirs = [
            format!("myriad-agent-n2-{dead}"),
            format!("myriad-agent-n2-{running}"),
            // This process's own: the agent clears what an earlier process of its pid left there.
            format!("myriad-agent-n2-{}", std::process::id()),
            // Another node's name, one that merely starts with this one's, and no pid at all.
            format!("myriad-agent-n3-{dead}"),
            format!("myriad-agent-n2-x-{dead}"),
            "myriad-agent-n2-".to_string(),
        ];
        for d in &dirs {
            std::fs::create_dir_all(shm.join(d).join("job-1")).unwrap();
        }
        // A link named like a dead agent's is not followed, nor removed.
        std::fs::create_dir_all(shm.join("target")).unwrap();
        std::os::unix::fs::symlink(shm.join("target"), shm.join("myriad-agent-n2-4194306")).unwrap();
        remove_dead_agents_memory(&shm, "n2");
        let gone: Vec<&String> = dirs.iter().filter(|d| !shm.join(d).exists()).collect();
        assert_eq!(gone, [&dirs[0]]);
        assert!(shm.join("target").is_dir() && shm.join("myriad-agent-n2-4194306").exists());
        std::fs::remove_dir_all(&shm).unwrap();
    }
}
