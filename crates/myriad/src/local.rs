//! A local embedded cluster: one controller and N agents as child processes of this one, all on
//! this machine. `myriad up` keeps it in the foreground; `myriad run` starts one for a single job.

use net::client::Client;
use proto::api::NodeView;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalCluster {
    pub dir: PathBuf,
    pub url: String,
    pub token: String,
    controller: Option<Child>,
    agents: Vec<(String, Child)>,
    heartbeat_ms: u64,
    pub controller_restarts: u32,
}

pub struct LocalOptions {
    pub nodes: u32,
    pub slots: u32,
    pub spares: u32,
    pub listen: String,
    pub heartbeat_ms: u64,
    /// How long startup may take before giving up.
    pub startup_timeout: Duration,
    /// Fake GPU files: node NAME uses NAME.json here where it exists (slots then come from it).
    pub fake_gpus: Option<PathBuf>,
}

/// Seconds an agent gets to stop its ranks before it is killed.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

impl LocalCluster {
    pub fn start(dir: &Path, opts: &LocalOptions) -> Result<LocalCluster, String> {
        if opts.nodes == 0 || opts.slots == 0 {
            return Err("--nodes and --slots must be at least 1".into());
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the myriad executable: {e}"))?;
        let state = dir.join("controller");
        let url_file = state.join(control::server::URL_FILE);
        let _ = std::fs::remove_file(&url_file);
        let log = |name: &str| -> Result<Stdio, String> {
            let path = logs.join(name);
            std::fs::File::create(&path).map(Stdio::from).map_err(|e| format!("{}: {e}", path.display()))
        };
        let controller = spawn_controller(&exe, &opts.listen, opts.heartbeat_ms, &state, &logs)?;
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            url: String::new(),
            token: String::new(),
            controller: Some(controller),
            agents: Vec::new(),
            heartbeat_ms: opts.heartbeat_ms,
            controller_restarts: 0,
        };
        let deadline = Instant::now() + opts.startup_timeout;
        let controller_log = logs.join("controller.log");
        cluster.url = wait_for_url(
            cluster.controller.as_mut().expect("started"),
            &url_file,
            deadline,
            &controller_log,
        )?;
        cluster.token = net::auth::read_token(&state.join(control::server::TOKEN_FILE))?;
        for i in 0..opts.nodes + opts.spares {
            let spare = i >= opts.nodes;
            let name = if spare { format!("spare-{}", i - opts.nodes) } else { format!("node-{i}") };
            let mut cmd = die_with_parent(Command::new(&exe));
            cmd.args(["agent", "--controller", &cluster.url, "--name", &name]);
            match opts.fake_gpus.as_ref().map(|d| d.join(format!("{name}.json"))).filter(|f| f.is_file()) {
                Some(file) => cmd.arg("--fake-gpus").arg(file),
                None => cmd.args(["--slots", &opts.slots.to_string()]),
            };
            cmd.arg("--work-dir")
                .arg(dir.join("agents").join(&name))
                .arg("--checkpoint-root")
                .arg(dir.join("checkpoints"))
                .env(proto::env::MYRIAD_TOKEN, &cluster.token)
                .stdin(Stdio::null())
                .stdout(log(&format!("{name}.log"))?)
                .stderr(log(&format!("{name}.log"))?);
            if spare {
                cmd.arg("--spare");
            }
            let child = cmd.spawn().map_err(|e| format!("cannot start agent {name}: {e}"))?;
            cluster.agents.push((name, child));
        }
        let want = (opts.nodes + opts.spares) as usize;
        let client = cluster.client()?;
        loop {
            let nodes: Vec<NodeView> =
                crate::cluster_cmd::block_on(client.get_json("/v1/nodes")).unwrap_or_default();
            if nodes.iter().filter(|n| n.health == "healthy").count() >= want {
                break;
            }
            if let Some(name) = cluster.exited_child() {
                return Err(format!(
                    "{name} exited during startup; see {}",
                    logs.join(format!("{name}.log")).display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {want} agents registered within {:?}",
                    nodes.len(),
                    opts.startup_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(cluster)
    }

    pub fn client(&self) -> Result<Client, String> {
        Client::new(&self.url, &self.token, Duration::from_secs(10))
    }

    /// Keeps the cluster whole the way an init system would: a controller that died is started
    /// again on its state directory and address. Returns the names of agents that have exited
    /// (lost nodes stay lost; their jobs move to spares).
    pub fn supervise(&mut self) -> Result<Vec<String>, String> {
        if let Some(status) = self.controller.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let listen = self.url.trim_start_matches("http://").to_string();
            eprintln!("controller exited ({status}); restarting it on {listen}");
            let state = self.dir.join("controller");
            self.controller =
                Some(spawn_controller(&exe, &listen, self.heartbeat_ms, &state, &self.dir.join("logs"))?);
            self.controller_restarts += 1;
        }
        let gone: Vec<String> = self
            .agents
            .iter_mut()
            .filter_map(|(n, c)| c.try_wait().ok().flatten().map(|_| n.clone()))
            .collect();
        Ok(gone)
    }

    /// The controller's process id (for `myriad chaos kill-controller`).
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    /// The name of a child that has exited, if any (a local cluster is only whole with all).
    pub fn exited_child(&mut self) -> Option<String> {
        if self.controller.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
            return Some("controller".into());
        }
        self.agents.iter_mut().find_map(|(n, c)| c.try_wait().ok().flatten().map(|_| n.clone()))
    }

    /// Agents first (they stop their ranks), then the controller; each gets a grace period.
    pub fn stop(&mut self) {
        // Agents killed without a chance to clean up leave their memory tier behind.
        let memory: Vec<PathBuf> = self
            .agents
            .iter()
            .map(|(name, c)| crate::cluster_cmd::default_memory_dir(name, c.id(), &self.dir))
            .collect();
        let agents: Vec<Child> = self.agents.drain(..).map(|(_, c)| c).collect();
        terminate(agents, AGENT_STOP_GRACE + Duration::from_secs(2));
        terminate(self.controller.take().into_iter().collect(), Duration::from_secs(5));
        for dir in memory {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn spawn_controller(
    exe: &Path,
    listen: &str,
    heartbeat_ms: u64,
    state: &Path,
    logs: &Path,
) -> Result<Child, String> {
    let path = logs.join("controller.log");
    let log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map(Stdio::from)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    die_with_parent(Command::new(exe))
        .args(["controller", "--listen", listen, "--heartbeat-ms", &heartbeat_ms.to_string()])
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(log()?)
        .stderr(log()?)
        .spawn()
        .map_err(|e| format!("cannot start the controller: {e}"))
}

/// The URL a starting controller writes to `url_file`, once it listens; an error if it exits or
/// `deadline` passes first.
pub(crate) fn wait_for_url(
    controller: &mut Child,
    url_file: &Path,
    deadline: Instant,
    log: &Path,
) -> Result<String, String> {
    loop {
        if let Ok(url) = std::fs::read_to_string(url_file) {
            return Ok(url.trim().to_string());
        }
        if let Ok(Some(status)) = controller.try_wait() {
            return Err(format!("the controller exited ({status}); see {}", log.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("the controller did not start in time; see {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cluster's processes get SIGTERM when the process that started them dies, however it dies,
/// so a killed `myriad up` or `myriad run` leaves nothing behind (agents then stop their ranks).
pub(crate) fn die_with_parent(mut cmd: Command) -> Command {
    // Their own process group: a Ctrl-C at the terminal reaches only the launcher, which then
    // cancels jobs and stops the cluster in order.
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and affects only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

pub(crate) fn terminate(mut children: Vec<Child>, grace: Duration) {
    for c in &children {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && children.iter_mut().any(|c| c.try_wait().ok().flatten().is_none()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The dashboard's address with the cluster token in its fragment: the browser never sends a
/// fragment to a server, and the page moves the token into the tab's session storage.
pub fn dashboard_link(url: &str, token: &str) -> String {
    format!("{}/#token={token}", url.trim_end_matches('/'))
}
