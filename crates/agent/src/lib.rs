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

/// A line on stderr. Unlike `eprintln!`, a write that fails (a closed pipe, a full disk under a
/// redirect) is dropped, not a panic: the agent, and the ranks that die with it, outlive its log.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod chaos;
pub mod checkpoints;
mod fence;
pub mod gpu;
mod hang;
mod heartbeat;
pub mod loadgen;
pub mod metrics;
mod netif;
mod progress;
mod python;
mod routes;
mod state;
mod supervisor;

pub use hang::HangRule;
pub use supervisor::RESTORE_FAILED_EXIT;

use net::client::Client;
use proto::api::JobId;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub controller: String,
    pub token: String,
    pub name: String,
    /// Rank slots; None: one per GPU found (one where there are none).
    pub slots: Option<u32>,
    pub spare: bool,
    /// GPUs described by a file instead of NVML (tests, demos).
    pub fake_gpus: Option<PathBuf>,
    /// How often the GPUs are checked while the agent runs (and before every launch).
    pub gpu_check_every: Duration,
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
    /// step time) without progress.
    pub hang: HangRule,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) node: Mutex<state::Node>,
    /// Wakes the heartbeat loop early: a rank exited, so the controller should hear now.
    pub(crate) wake: Notify,
    /// Chaos: no heartbeats until then (a network partition).
    pub(crate) silent_until: Mutex<Option<Instant>>,
    pub(crate) socket_path: PathBuf,
    /// The agent's Python package, first on every Python rank's path ([`python`]).
    pub(crate) python: PathBuf,
    /// The interface holding `--addr`, for Gloo ([`netif`]).
    pub(crate) interface: Option<String>,
    pub(crate) metrics: metrics::AgentMetrics,
    /// Rank slots this node offers (discovered or given).
    pub(crate) slots: u32,
    pub(crate) gpus: Mutex<gpu::Monitor>,
    /// When the controller last answered, and the lease it gave ([`fence`]).
    pub(crate) contact: Mutex<fence::Contact>,
    /// Bumped at every registration: commands queued before it are not acknowledged after it.
    pub(crate) registration: std::sync::atomic::AtomicU64,
}

impl Agent {
    /// The job's in-memory tier on this node (tmpfs): checkpoint directories and live state.
    pub(crate) fn job_memory(&self, job_id: JobId) -> PathBuf {
        self.cfg.memory_root.join(format!("job-{job_id}"))
    }
}

/// The job whose memory tier an entry of the memory root is ([`Agent::job_memory`]'s names).
pub(crate) fn memory_job(entry: &std::ffi::OsStr) -> Option<JobId> {
    entry.to_str()?.strip_prefix("job-")?.parse().ok()
}

/// Removes every job's memory tier under `root`: the only entries the agent makes there, and the
/// only ones it removes (the directory may be one the user named and shares).
fn clear_memory(root: &std::path::Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if memory_job(&entry.file_name()).is_some() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

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

/// Creates `dir` (and its parents) and makes it this user's alone: rank logs, the progress socket
/// and in-memory checkpoints are nobody else's to read.
fn private_dir(what: &str, dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // In a shared directory (/dev/shm, /tmp) someone else may have put a link or a directory of
    // their own at the name: never follow or adopt it.
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        // SAFETY: geteuid(2) has no preconditions.
        let me = unsafe { libc::geteuid() };
        if m.file_type().is_symlink() || !m.is_dir() || m.uid() != me {
            return Err(format!(
                "{what} {} exists and is not a directory of this user's (a link, a file or another user's)",
                dir.display()
            ));
        }
    }
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("{what} {}: {e}", dir.display()))
}

async fn run_async(cfg: AgentConfig) -> Result<(), String> {
    private_dir("work directory", &cfg.work_dir)?;
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
    let gpus = match gpu::open(cfg.fake_gpus.as_deref()) {
        Ok(backend) => gpu::Monitor::new(Some(backend)),
        // A fake file that cannot be read is a mistake in the command line, not a GPU-less node.
        Err(e) if cfg.fake_gpus.is_some() => return Err(e),
        Err(e) => {
            say!(
                "agent {}: no GPUs managed ({e}); running {} slots as --slots gives",
                cfg.name,
                cfg.slots.unwrap_or(1)
            );
            gpu::Monitor::new(None)
        }
    };
    let mut gpus = gpus;
    // The first check: the node's first report already says how its GPUs are.
    if let Err(e) = gpus.check() {
        say!("agent {}: GPU check: {e}", cfg.name);
    }
    let slots = match (cfg.slots, gpus.gpus.len()) {
        (Some(0), _) => return Err("--slots must be at least 1".into()),
        // Every rank gets a GPU of its own: more slots would be launches that cannot start.
        (Some(n), g) if g > 0 && n as usize > g => {
            return Err(format!("--slots {n} is more than this node's {g} GPUs (each rank gets one)"))
        }
        (Some(n), _) => n,
        (None, 0) => 1,
        (None, n) => n as u32,
    };
    if let Some(g) = gpus.gpus.first() {
        say!(
            "agent {}: {} GPUs ({}, {} MiB, driver {}): {slots} slots",
            cfg.name,
            gpus.gpus.len(),
            g.model,
            g.memory_mib,
            gpus.driver.as_deref().unwrap_or("?")
        );
    }
    private_dir("memory root", &cfg.memory_root)?;
    // An agent's memory never outlives it: whatever the root holds at start is a dead agent's (one
    // killed before it could remove it, under this name and pid, now reused). Its checkpoints
    // would be reported as this node's, and its live slots taken up by this node's first launch
    // of a job of the same number: a fresh job 1 resumed at the dead job's step (tests/trust.rs).
    clear_memory(&cfg.memory_root);
    let python = python::install(&cfg.work_dir)?;
    let interface = netif::interface_of(&cfg.addr);
    let agent = Arc::new(Agent {
        cfg,
        node: Mutex::new(state::Node::default()),
        wake: Notify::new(),
        silent_until: Mutex::new(None),
        socket_path,
        python,
        interface,
        metrics: metrics::AgentMetrics::default(),
        slots,
        gpus: Mutex::new(gpus),
        registration: std::sync::atomic::AtomicU64::new(0),
        contact: Mutex::new(fence::Contact::default()),
    });

    let app = routes::router(agent.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, app).await {
            say!("agent: log server stopped: {e}");
        }
    });
    tokio::spawn(progress::accept(agent.clone(), progress));
    tokio::spawn(hang::detect(agent.clone()));
    tokio::spawn(fence::watch(agent.clone()));
    tokio::spawn(supervisor::watch_gpus(agent.clone()));

    let result = tokio::select! {
        r = heartbeat::heartbeat_loop(agent.clone(), client, http_port) => r,
        _ = net::http::shutdown_signal() => Ok(()),
    };
    agent.stop_everything().await;
    let _ = std::fs::remove_file(&agent.socket_path);
    // A node that goes away takes its memory with it (the root itself only where it is empty).
    clear_memory(&agent.cfg.memory_root);
    let _ = std::fs::remove_dir(&agent.cfg.memory_root);
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_private_directory_is_never_a_link_or_a_file_someone_put_there() {
        let root = std::env::temp_dir().join(format!("myriad-agent-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let link = root.join("memory");
        std::os::unix::fs::symlink(root.join("elsewhere"), &link).unwrap();
        let e = super::private_dir("memory root", &link).unwrap_err();
        assert!(e.contains("is not a directory of this user's"), "{e}");
        std::fs::write(root.join("file"), b"").unwrap();
        assert!(super::private_dir("memory root", &root.join("file")).is_err());
        let fresh = root.join("fresh/memory");
        super::private_dir("memory root", &fresh).unwrap();
        // Its own directory again (an agent restarted with the same name) is fine.
        super::private_dir("memory root", &fresh).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn clearing_the_memory_root_removes_the_jobs_tiers_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("myriad-agent-clear-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // A dead agent's job, its live slots among it, beside what a user keeps in the directory.
        std::fs::create_dir_all(root.join("job-1/live")).unwrap();
        std::fs::write(root.join("job-1/live/slot-0.bin"), b"stale").unwrap();
        std::fs::create_dir_all(root.join("job-17/step_00000004")).unwrap();
        std::fs::create_dir_all(root.join("job-x")).unwrap();
        std::fs::write(root.join("notes.txt"), b"mine").unwrap();
        super::clear_memory(&root);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["job-x", "notes.txt"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
