//! Running ranks: the commands' effects (reserve a port, launch, stop, purge), spawning each rank
//! from argv in its own process group with PR_SET_PDEATHSIG, watching it exit, and stopping ranks
//! (SIGTERM, then SIGKILL after the grace period).

use proto::api::{CheckpointReport, Command, JobId, LaunchSpec, RankState, Tier};
use proto::env::AgentEnv;
use proto::node::{RankKey, Todo};
use proto::spec::validate_relative_path;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::{Leader, Rank};
use crate::{checkpoints, gpu, netif, python, unix_ms, Agent};

/// Under a job's memory directory: its ranks' live state slots (the trainer's `train::live`).
const LIVE_DIR: &str = "live";
/// Longest an ended job's memory is kept for a copy of its checkpoints to finish (the copy's own
/// deadline per file is two minutes).
const PURGE_WAIT: Duration = Duration::from_secs(600);
/// How long a launch waits for the previous attempt's ranks here to be gone.
const RETIRE_DEADLINE: Duration = Duration::from_secs(5);
/// Exit code reported for ranks that could not start because their checkpoint failed to verify.
pub const RESTORE_FAILED_EXIT: i32 = 75;
/// Exit code reported for ranks that could not start: a GPU failed its check, or too few are free.
pub const GPU_UNAVAILABLE_EXIT: i32 = 76;

impl Agent {
    /// A fresh registration: the controller forgot whatever this agent held.
    pub(crate) fn forget_all_exited(&self) {
        let mut node = self.node.lock().expect("agent state");
        node.state.forget_all_exited();
        node.listeners.clear();
    }

    /// Carries out one command (idempotently: the protocol's node state says what is left).
    pub(crate) async fn execute(self: &Arc<Self>, command: &Command) {
        let todo = {
            let mut node = self.node.lock().expect("agent state");
            let todo = node.state.apply(command);
            // A listener lives only as long as its reservation (Forget drops both).
            let node = &mut *node;
            node.listeners.retain(|k, _| node.state.ports.contains_key(k));
            todo
        };
        match todo {
            Todo::Nothing => {}
            Todo::ReservePort { job_id, attempt } => {
                // The OS picks a free port; rank 0 binds it moments later. Each attempt gets a
                // new one, so a restarted job never meets its predecessor's store.
                let listener = std::net::TcpListener::bind("0.0.0.0:0");
                match listener.and_then(|l| Ok((l.local_addr()?.port(), l))) {
                    Ok((port, listener)) => {
                        let mut node = self.node.lock().expect("agent state");
                        node.state.reserve(job_id, attempt, port);
                        node.listeners.insert((job_id, attempt), listener);
                    }
                    Err(e) => say!("agent {}: cannot reserve a port: {e}", self.cfg.name),
                }
            }
            Todo::Launch { spec, fresh } => self.launch(spec, fresh).await,
            // The job's last checkpoint may still be on its way to the buddy and the persisted
            // tier: its memory goes once the copies are done (off the executor, which carries
            // out other jobs' commands meanwhile).
            Todo::Purge { job_id } => {
                tokio::spawn(self.clone().purge_once_copied(job_id));
            }
            Todo::Stop { ranks } => self.stop(ranks),
        }
    }

    /// Removes an ended job's memory tier and leadership once no copy of its checkpoints is under
    /// way (or after [`PURGE_WAIT`], should one never end).
    async fn purge_once_copied(self: Arc<Self>, job_id: JobId) {
        let deadline = Instant::now() + PURGE_WAIT;
        loop {
            let copying = self.node.lock().expect("agent state").leading.get(&job_id).is_some_and(|l| l.busy);
            if !copying || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_dir_all(self.job_memory(job_id));
        let mut node = self.node.lock().expect("agent state");
        node.leading.remove(&job_id);
        node.bad.retain(|b| b.job_id != job_id);
    }

    async fn launch(self: &Arc<Self>, spec: &LaunchSpec, fresh: Vec<u32>) {
        let dir = self
            .cfg
            .work_dir
            .join("jobs")
            .join(spec.job_id.to_string())
            .join(format!("attempt-{}", spec.attempt));
        let checkpoint_dir = match validate_relative_path("checkpoint_dir", &spec.checkpoint_dir) {
            Ok(()) => self.cfg.checkpoint_root.join(&spec.checkpoint_dir),
            Err(e) => {
                say!("agent {}: refusing job {}: {e}", self.cfg.name, spec.job_id);
                self.cfg.checkpoint_root.join(format!("job-{}", spec.job_id))
            }
        };
        let memory_dir = self.job_memory(spec.job_id);
        if spec.leader {
            self.node.lock().expect("agent state").leading.insert(
                spec.job_id,
                Leader {
                    attempt: spec.attempt,
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
        self.node.lock().expect("agent state").listeners.remove(&(spec.job_id, spec.attempt));
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
                say!("agent {}: job {}: cannot restore {message}", self.cfg.name, spec.job_id);
                let mut node = self.node.lock().expect("agent state");
                node.bad.push(CheckpointReport { job_id: spec.job_id, step, tier: Tier::Memory });
                for &l in &fresh {
                    let failed = RankState::Exited { code: Some(RESTORE_FAILED_EXIT), signal: None };
                    node.state
                        .insert((spec.job_id, spec.attempt, l), Rank::new(failed, None, Instant::now()));
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
        // GPUs are checked before every launch, then bound one per local rank.
        let bound = match self.bind_gpus(spec) {
            Ok(bound) => bound,
            Err(message) => {
                say!("agent {}: job {}: {message}", self.cfg.name, spec.job_id);
                let _ = std::fs::create_dir_all(&dir);
                let mut node = self.node.lock().expect("agent state");
                for &l in &fresh {
                    write_log(&dir.join(format!("rank-{l}.stderr")), &format!("myriad agent: {message}\n"));
                    let failed = RankState::Exited { code: Some(GPU_UNAVAILABLE_EXIT), signal: None };
                    node.state
                        .insert((spec.job_id, spec.attempt, l), Rank::new(failed, None, Instant::now()));
                }
                return;
            }
        };
        for &local_rank in &fresh {
            let key = (spec.job_id, spec.attempt, local_rank);
            let mut env = spec.rank_env(local_rank);
            env.extend(extra_env.iter().cloned());
            if let Some(bound) = &bound {
                env.extend(gpu::rank_env(bound, local_rank, &spec.env));
            }
            let stack_file = dir.join(format!("rank-{local_rank}.pystack"));
            let inherited = std::env::var(proto::env::PYTHONPATH).ok();
            env.extend(python::rank_env(&self.python, &spec.env, inherited, &stack_file));
            let node_has_it = std::env::var_os(proto::env::GLOO_SOCKET_IFNAME).is_some();
            env.extend(netif::rank_env(self.interface.as_deref(), &spec.env, node_has_it));
            let outcome = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::create_dir_all(&checkpoint_dir))
                .map_err(|e| format!("cannot create {} or {}: {e}", dir.display(), checkpoint_dir.display()))
                .and_then(|_| self.spawn_rank(spec, &env, &dir, local_rank));
            let rank = match outcome {
                Ok(child) => {
                    let pid = child.id();
                    tokio::spawn(watch(self.clone(), key, child));
                    let mut rank =
                        Rank::new(RankState::Running { pid: pid.unwrap_or(0) }, pid, Instant::now());
                    rank.gpu = bound.as_ref().map(|b| b[local_rank as usize].index);
                    rank
                }
                Err(message) => {
                    // Reported as a failed rank: the job fails or restarts like after any crash.
                    say!("agent {}: job {} rank {}: {message}", self.cfg.name, spec.job_id, local_rank);
                    write_log(
                        &dir.join(format!("rank-{local_rank}.stderr")),
                        &format!("myriad agent: {message}\n"),
                    );
                    Rank::new(RankState::Exited { code: Some(127), signal: None }, None, Instant::now())
                }
            };
            self.node.lock().expect("agent state").state.insert(key, rank);
        }
    }

    /// Checks the GPUs and picks the launch's: None on a node without GPUs; Err naming the GPU
    /// and its finding when one failed, or how many are free when too few are.
    fn bind_gpus(&self, spec: &LaunchSpec) -> Result<Option<Vec<proto::api::GpuInfo>>, String> {
        let mut monitor = self.gpus.lock().expect("gpu state");
        if monitor.gpus.is_empty() {
            return Ok(None);
        }
        if let Err(e) = monitor.check() {
            say!("agent {}: GPU check before launch: {e}", self.cfg.name);
        }
        if let Some(f) = monitor.health.findings().into_iter().find(|f| f.fatal) {
            return Err(format!("GPU {} ({}) failed its health check: {}", f.index, f.uuid, f.reason));
        }
        let busy: std::collections::BTreeSet<u32> = {
            let node = self.node.lock().expect("agent state");
            node.state
                .ranks
                .iter()
                .filter(|(k, r)| (k.0, k.1) != (spec.job_id, spec.attempt) && r.state.is_running())
                .filter_map(|(_, r)| r.gpu)
                .collect()
        };
        gpu::bind(&monitor.gpus, &busy, spec.ranks_per_node).map(Some).ok_or_else(|| {
            format!(
                "{} local ranks need a GPU each, and {} of the node's {} GPUs are free",
                spec.ranks_per_node,
                monitor.gpus.len() - busy.len(),
                monitor.gpus.len()
            )
        })
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
            open_log(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let mut cmd = std::process::Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            // The agent's own credential is the cluster's admin token: never a rank's.
            .env_remove(proto::env::MYRIAD_TOKEN)
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

    /// SIGTERM to each rank's process group now, SIGKILL after the grace period to those still
    /// running.
    fn stop(self: &Arc<Self>, ranks: Vec<RankKey>) {
        let mut pids = Vec::new();
        {
            let mut node = self.node.lock().expect("agent state");
            for key in &ranks {
                let Some(r) = node.state.ranks.get_mut(key) else { continue };
                if r.state.is_running() && !r.stopping {
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
            let still = agent.node.lock().expect("agent state").running_pids(|k| ranks.contains(k));
            signal_groups(&still, libc::SIGKILL);
        });
    }

    pub(crate) async fn stop_everything(&self) {
        let pids = self.node.lock().expect("agent state").running_pids(|_| true);
        if pids.is_empty() {
            return;
        }
        say!("agent {}: stopping {} ranks", self.cfg.name, pids.len());
        signal_groups(&pids, libc::SIGTERM);
        let deadline = Instant::now() + self.cfg.stop_grace;
        while Instant::now() < deadline {
            let running = !self.node.lock().expect("agent state").running_pids(|_| true).is_empty();
            if !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal_groups(&pids, libc::SIGKILL);
    }

    /// Kills this node's ranks of earlier attempts of `job_id` (they were told to stop; a new
    /// attempt is starting) and waits, up to [`RETIRE_DEADLINE`], until they have exited.
    async fn retire_older_ranks(&self, job_id: JobId, attempt: u32) {
        let deadline = Instant::now() + RETIRE_DEADLINE;
        loop {
            let pids = self
                .node
                .lock()
                .expect("agent state")
                .running_pids(|&(job, a, _)| job == job_id && a < attempt);
            if pids.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                say!(
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

/// A rank's log file: the job's output is its owner's (0600), and never written through a planted
/// symlink.
fn open_log(path: &FsPath) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Writes why a rank never started into its stderr file (best effort: it is also reported).
fn write_log(path: &FsPath, text: &str) {
    use std::io::Write;
    let _ = open_log(path).and_then(|mut f| f.write_all(text.as_bytes()));
}

pub(crate) fn signal_groups(pids: &[u32], signal: libc::c_int) {
    for &pid in pids {
        // SAFETY: kill(2) on a process group we created; a group that is gone yields ESRCH.
        unsafe {
            libc::kill(-(pid as libc::pid_t), signal);
        }
    }
}

/// Waits for a rank to exit, records how, and wakes the heartbeat so the controller hears now.
pub(crate) async fn watch(agent: Arc<Agent>, key: RankKey, mut child: tokio::process::Child) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id();
    let state = match child.wait().await {
        Ok(status) => RankState::Exited { code: status.code(), signal: status.signal() },
        Err(_) => RankState::Exited { code: None, signal: None },
    };
    // Whatever the rank left behind in its process group goes with it.
    signal_groups(&pid.into_iter().collect::<Vec<_>>(), libc::SIGKILL);
    if let Some(r) = agent.node.lock().expect("agent state").state.ranks.get_mut(&key) {
        r.state = state;
        r.exited_at_ms = Some(unix_ms());
    }
    agent.wake.notify_one();
}

/// Checks the GPUs every `gpu_check_every`. A fatal finding fails every rank on the node at once
/// (SIGKILL), naming the GPU and the reason, and wakes the heartbeat: the controller hears of it
/// now, fails the attempt and restarts it elsewhere.
pub(crate) async fn watch_gpus(agent: Arc<Agent>) {
    if agent.gpus.lock().expect("gpu state").gpus.is_empty() {
        return;
    }
    let mut complained = false;
    loop {
        tokio::time::sleep(agent.cfg.gpu_check_every).await;
        let checked = agent.gpus.lock().expect("gpu state").check();
        let new_fatal = match checked {
            Ok(found) => {
                complained = false;
                found
            }
            Err(e) => {
                if !complained {
                    say!("agent {}: GPU check: {e}", agent.cfg.name);
                    complained = true;
                }
                continue;
            }
        };
        let Some(f) = new_fatal.first() else { continue };
        let pids = agent.node.lock().expect("agent state").running_pids(|_| true);
        say!(
            "agent {}: GPU {} ({}) failed its health check: {}; failing {} ranks",
            agent.cfg.name,
            f.index,
            f.uuid,
            f.reason,
            pids.len()
        );
        signal_groups(&pids, libc::SIGKILL);
        agent.wake.notify_one();
    }
}
