//! `myriad bench control-plane`: the real controller, started as a child process, under the load
//! of a whole cluster of simulated agents in this process (`agent::loadgen`). Each simulated agent is an async task
//! that speaks the agent protocol over loopback with the cluster token: it registers, heartbeats
//! the state of its ranks, answers the controller's doorbell on its own HTTP listener, carries out
//! commands (reserve a port, launch, stop, forget) and fetches its attempt's rendezvous table.
//! Only the ranks are imaginary. Measured: registration, steady heartbeat latency and the
//! controller's CPU and memory with a job on every node, API latency, the time from submitting a
//! job until every node holds its rendezvous table, and the time to find a silent node and
//! relaunch the job with a spare in its place.

use agent::loadgen::{self, Load, Report, Target};
use clap::Args;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct ControlPlaneArgs {
    /// Regular nodes; the job spans all of them.
    #[arg(long, default_value_t = 1250)]
    pub nodes: u32,
    /// Accelerator slots per node; the job runs one rank per slot.
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Hot spares besides the regular nodes (at least one: the silent node's ranks move there).
    #[arg(long, default_value_t = 1)]
    pub spares: u32,
    /// Heartbeat interval the controller hands to agents.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Seconds of steady heartbeats measured while the job runs.
    #[arg(long, default_value_t = 20)]
    pub steady_s: u64,
    /// Worker threads of the load generator (the controller keeps its own two).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ControlPlaneArgs) -> Result<(), String> {
    if args.nodes == 0 || args.slots == 0 || args.spares == 0 {
        return Err("--nodes, --slots and --spares must each be at least 1".into());
    }
    if args.heartbeat_ms < 10 || args.steady_s == 0 {
        return Err("--heartbeat-ms must be at least 10 and --steady-s at least 1".into());
    }
    if args.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    raise_open_file_limit(args.nodes + args.spares);
    // The load generator reads every node's 150 KB peer table at 12,500 nodes: with glibc's
    // default thresholds each body is mapped, zeroed and unmapped again (30% of its CPU, on
    // cores the controller needs). The controller is a child process and keeps the defaults.
    train::memory::tune_allocator();
    let dir = net::auth::private_temp_dir(&std::env::temp_dir(), "myriad-bench-cp")?;
    let controller = ControllerProcess::start(&dir, args.heartbeat_ms);
    let result = controller.and_then(|c| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the load generator's runtime: {e}"))?;
        let load = Load {
            nodes: args.nodes,
            slots: args.slots,
            spares: args.spares,
            heartbeat_ms: args.heartbeat_ms,
            steady_s: args.steady_s,
        };
        let target = Target { url: c.url.clone(), token: c.token.clone(), pid: c.pid() };
        let report = runtime.block_on(loadgen::measure(&load, &target));
        runtime.shutdown_timeout(Duration::from_secs(2));
        drop(c);
        report
    });
    // A failed bench says what the controller said last; its state is removed either way.
    let result = result.map_err(|e| match log_tail(&dir.join("controller.log"), 20) {
        Some(tail) if !tail.is_empty() => format!("{e}\nthe controller's log ends:\n{tail}"),
        _ => e,
    });
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("serialises"));
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "control plane: {} nodes + {} spare × {} slots = {} ranks, heartbeats every {} ms",
        r.nodes, r.spares, r.slots, r.ranks, r.heartbeat_ms
    );
    println!("  registration of every agent       {:>8.2} s", r.register_s);
    let s = &r.steady;
    println!("  steady window: {:.0} s, one job running on every node, another queued behind it", s.seconds);
    println!(
        "  heartbeats                        {:>8.0} /s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors",
        s.heartbeats_per_s, s.heartbeat_p50_ms, s.heartbeat_p99_ms, s.heartbeat_max_ms, s.heartbeat_errors
    );
    println!(
        "  controller CPU                    {:>8.1} % of a core (load generator {:.1} %)",
        s.controller_cpu_cores * 100.0,
        s.load_generator_cpu_cores * 100.0
    );
    for a in &s.api {
        println!("  {:<34}{:>8.1} ms p50, {:.1} ms p99 ({} calls)", a.route, a.p50_ms, a.p99_ms, a.calls);
    }
    let j = &r.job_start;
    println!(
        "  submit → every rendezvous table   {:>8.2} s (running after {:.2} s; table {} bytes)",
        j.submit_to_peer_tables_s, j.submit_to_running_s, j.peer_table_bytes
    );
    let n = &r.silent_node;
    println!(
        "  silent node {} found lost      {:>8} ms after its last heartbeat ({:.2} intervals)",
        n.node, n.detect_ms, n.detect_heartbeat_intervals
    );
    println!("  relaunched with {} in its place {:>8} ms after", n.spare_used, n.relaunch_ms);
    let m = &r.controller_memory;
    println!(
        "  controller memory                 {:>8.1} MB empty, {:.1} MB with the nodes, {:.1} MB with the job",
        m.rss_empty_mb, m.rss_nodes_mb, m.rss_job_mb
    );
    println!(
        "                                    {:>8.0} bytes per node; the job adds {:.0} per node ({:.0} per rank)",
        m.bytes_per_node, m.job_bytes_per_node, m.job_bytes_per_rank
    );
    println!(
        "  controller open files             {:>8} empty, {} with the nodes, {} with the job",
        m.open_files_empty, m.open_files_nodes, m.open_files_job
    );
}

/// Each simulated agent holds a listener and a connection: more than the default 1,024 files.
/// Every simulated agent holds a connection to the controller and a listener for its doorbell,
/// and the controller (a child: it inherits the limit) one connection per agent and one per
/// doorbell it rings: 12,500 nodes need more than the 20,000 descriptors a shell often gets. The
/// limit is raised to what the bench needs where this process may raise it (root may), and else
/// as far as its hard limit allows.
fn raise_open_file_limit(nodes: u32) {
    let want = (nodes as libc::rlim_t + 1_000) * 3;
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The last `lines` lines of a log file, or None if it cannot be read.
fn log_tail(path: &Path, lines: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let all: Vec<&str> = text.lines().collect();
    Some(all[all.len().saturating_sub(lines)..].join("\n"))
}

/// The controller as a child process of this binary; stopped (SIGTERM, then SIGKILL) on drop.
pub struct ControllerProcess {
    child: std::process::Child,
    pub url: String,
    pub token: String,
}

impl ControllerProcess {
    fn start(dir: &Path, heartbeat_ms: u64) -> Result<ControllerProcess, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
        let state = dir.join("controller");
        let log = std::fs::File::create(dir.join("controller.log")).map_err(|e| e.to_string())?;
        let mut command = std::process::Command::new(exe);
        command
            .args(["controller", "--listen", "127.0.0.1:0", "--heartbeat-ms", &heartbeat_ms.to_string()])
            .arg("--state")
            .arg(&state)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches only the child. The controller dies
        // with the bench, even one killed by a test's deadline.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| format!("cannot start the controller: {e}"))?;
        let mut process = ControllerProcess { child, url: String::new(), token: String::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = dir.join("controller.log");
        process.url = crate::local::wait_for_url(
            &mut process.child,
            &state.join(control::server::URL_FILE),
            deadline,
            &log,
        )?;
        // The controller writes its token before it listens.
        process.token = net::auth::read_token(&state.join(control::server::TOKEN_FILE))?;
        Ok(process)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
