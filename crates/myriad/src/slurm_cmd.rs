//! `myriad slurm`: Myriad inside a Slurm allocation. Run once, from the batch script (which Slurm
//! runs on the allocation's first node): it starts the controller there, one agent on every node
//! of the allocation through a single `srun --ntasks-per-node=1` step (nodes past the job's
//! `--nnodes` join as hot spares), runs the job to its end with every rank's output, stops the
//! agents and the controller, and exits with the job's status. `scancel` and the allocation's end
//! stop everything through Slurm's own signals: each process stops what it started.
//!
//! The agents find the controller at `SLURM_LAUNCH_NODE_IPADDR` (the address of the node that ran
//! srun, as Slurm saw it), so node names need not resolve; each agent gives its peers the address
//! it reaches the controller from. The cluster token travels in srun's environment (Slurm carries
//! it to the tasks over its authenticated RPC), never on a command line.

use clap::{Args, FromArgMatches};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster_cmd::block_on;
use crate::run_cmd::JobArgs;

#[derive(Args)]
pub struct SlurmArgs {
    #[command(flatten)]
    job: JobArgs,
    /// The controller's state, the token and every agent's work directory and log (default
    /// ./myriad-slurm-$SLURM_JOB_ID, in the directory the batch script runs in).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The controller's port on the allocation's first node; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Interval agents heartbeat at; a node is lost after 3 missed.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// How long the controller and every agent get to start.
    #[arg(long, default_value_t = 120)]
    startup_timeout_s: u64,
}

/// `myriad slurm-agent`: one task of the agents' srun step (started by `myriad slurm`, not by
/// hand). It reads its node from Slurm's task environment and runs `myriad agent`.
#[derive(Args)]
pub struct SlurmAgentArgs {
    /// The controller's port on the node that ran srun.
    #[arg(long)]
    port: u16,
    /// Nodes 0..N of the allocation run the job; the rest join as hot spares.
    #[arg(long)]
    job_nodes: u32,
    #[arg(long)]
    slots: u32,
    /// `myriad slurm`'s state directory; this agent works in STATE/agents/NODE.
    #[arg(long)]
    state: PathBuf,
}

/// The step name the agents run under, which finds the step again to signal it.
const AGENT_STEP: &str = "myriad-agents";
/// An agent's grace for stopping its ranks, and a margin for its own exit.
const AGENT_STOP: Duration = Duration::from_secs(15);
/// At most this many nodes in one node list (a typo like `n[1-99999999]` is refused, not expanded).
const MAX_HOSTS: usize = 1_000_000;

/// The allocation, as Slurm describes it to a batch script or a task.
#[derive(Debug, PartialEq)]
struct Allocation {
    job_id: String,
    nodes: Vec<String>,
    /// This process's node: its index in `nodes`.
    node_id: usize,
}

impl Allocation {
    fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Allocation, String> {
        let job_id = var("SLURM_JOB_ID").filter(|v| !v.trim().is_empty()).ok_or(
            "not inside a Slurm allocation: SLURM_JOB_ID is not set (run `myriad slurm` from an sbatch script or in salloc)",
        )?;
        let list = var("SLURM_JOB_NODELIST")
            .or_else(|| var("SLURM_NODELIST"))
            .ok_or("SLURM_JOB_NODELIST is not set: Slurm did not say which nodes the allocation holds")?;
        let nodes = expand_hostlist(&list).map_err(|e| format!("SLURM_JOB_NODELIST={list:?}: {e}"))?;
        if let Some(count) = var("SLURM_JOB_NUM_NODES").or_else(|| var("SLURM_NNODES")) {
            let count: usize =
                count.trim().parse().map_err(|_| format!("SLURM_JOB_NUM_NODES={count:?} is not a number"))?;
            if count != nodes.len() {
                return Err(format!(
                    "SLURM_JOB_NODELIST={list:?} names {} nodes but SLURM_JOB_NUM_NODES is {count}",
                    nodes.len()
                ));
            }
        }
        let node_id = match var("SLURM_NODEID") {
            Some(v) => v.trim().parse().map_err(|_| format!("SLURM_NODEID={v:?} is not a number"))?,
            None => 0,
        };
        if node_id >= nodes.len() {
            return Err(format!("SLURM_NODEID={node_id} is outside the {} nodes of {list:?}", nodes.len()));
        }
        Ok(Allocation { job_id: job_id.trim().to_string(), nodes, node_id })
    }
}

/// Expands a Slurm host list as `scontrol show hostnames` does: `gpu[01-03,7],login1` is gpu01,
/// gpu02, gpu03, gpu7, login1; several bracket groups in one name multiply
/// (`r[1-2]n[1-2]` is r1n1, r1n2, r2n1, r2n2); a range keeps its first bound's zero padding.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err("an empty host name (two commas, or a comma at an end)".into());
        }
        // Each name is literal text and bracket groups; expand left to right.
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            let (literal, after) = rest.split_at(rest.find('[').unwrap_or(rest.len()));
            if literal.contains(']') {
                return Err(format!("{item:?}: ']' without '['"));
            }
            names.iter_mut().for_each(|n| n.push_str(literal));
            if after.is_empty() {
                break;
            }
            let close = after.find(']').ok_or_else(|| format!("{item:?}: '[' without ']'"))?;
            let numbers = expand_ranges(&after[1..close]).map_err(|e| format!("{item:?}: {e}"))?;
            if names.len().saturating_mul(numbers.len()).saturating_add(hosts.len()) > MAX_HOSTS {
                return Err(format!("more than {MAX_HOSTS} hosts"));
            }
            names = names.iter().flat_map(|n| numbers.iter().map(move |x| format!("{n}{x}"))).collect();
            rest = &after[close + 1..];
        }
        hosts.extend(names);
    }
    if hosts.is_empty() {
        return Err("no hosts".into());
    }
    Ok(hosts)
}

/// Splits at the commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let (mut items, mut start, mut depth) = (Vec::new(), 0, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 1 => return Err("nested '['".into()),
            '[' => depth = 1,
            ']' if depth == 0 => return Err("']' without '['".into()),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".into());
    }
    items.push(list[start..].trim());
    Ok(items)
}

/// `01-03,7` → ["01", "02", "03", "7"].
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let number = |s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{range:?} is not a number or a range N-M"));
            }
            s.parse().map_err(|_| format!("{s:?} is too large"))
        };
        let (from, to) = (number(lo)?, number(hi)?);
        if from > to {
            return Err(format!("the range {range:?} runs backwards"));
        }
        if (to - from) as usize >= MAX_HOSTS {
            return Err(format!("the range {range:?} holds more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        out.extend((from..=to).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

pub fn run(a: SlurmArgs) -> Result<(), String> {
    let alloc = Allocation::from_env(|k| std::env::var(k).ok())?;
    if alloc.node_id != 0 {
        return Err(format!(
            "run `myriad slurm` once, from the batch script (this is node {} of the allocation: under srun?); it starts the agents itself",
            alloc.node_id
        ));
    }
    if a.heartbeat_ms < 10 {
        return Err(format!("--heartbeat-ms {} must be at least 10", a.heartbeat_ms));
    }
    let total = alloc.nodes.len() as u32;
    let nodes = a.job.nodes(total)?;
    if nodes > total {
        return Err(format!(
            "--nnodes {nodes} is more than the {total} nodes of allocation {} ({})",
            alloc.job_id,
            alloc.nodes.join(",")
        ));
    }
    let spec = a.job.spec(total, total - nodes)?;
    let state = crate::cluster_cmd::absolute(
        &a.state.clone().unwrap_or_else(|| PathBuf::from(format!("myriad-slurm-{}", alloc.job_id))),
    )?;
    make_private_dir(&state)?;
    let (train, spare) = alloc.nodes.split_at(nodes as usize);
    eprintln!(
        "myriad slurm: allocation {}: {} train ({}), {} hot spare{} ({}); controller on {}; state in {}",
        alloc.job_id,
        train.len(),
        train.join(","),
        spare.len(),
        if spare.len() == 1 { "" } else { "s" },
        spare.join(","),
        alloc.nodes[0],
        state.display()
    );
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the myriad executable: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(a.startup_timeout_s);
    let controller_state = state.join("controller");
    let _ = std::fs::remove_file(controller_state.join(control::server::URL_FILE));
    let mut controller = crate::local::spawn_controller(
        &exe,
        &format!("0.0.0.0:{}", a.port),
        a.heartbeat_ms,
        &controller_state,
        &state,
    )?;
    let log = state.join("controller.log");
    let url = crate::local::wait_for_url(
        &mut controller,
        &controller_state.join(control::server::URL_FILE),
        deadline,
        &log,
    );
    let started = url.and_then(|url| {
        let port = url.rsplit(':').next().unwrap_or_default().to_string();
        let token = net::auth::read_token(&controller_state.join(control::server::TOKEN_FILE))?;
        let client =
            net::client::Client::new(&format!("http://127.0.0.1:{port}"), &token, Duration::from_secs(15))?;
        let agents = start_agents(&exe, &state, &port, &token, nodes, a.job.nproc_per_node, total)?;
        Ok((client, agents))
    });
    let (client, mut agents) = match started {
        Ok(s) => s,
        Err(e) => {
            crate::local::terminate(vec![controller], Duration::from_secs(5));
            return Err(e);
        }
    };
    let result = wait_for_agents(&client, &mut agents, total as usize, deadline, &state)
        .and_then(|()| block_on(crate::run_cmd::follow(&client, &spec, a.job.json, "myriad slurm")));
    stop_agents(&alloc.job_id, agents);
    crate::local::terminate(vec![controller], Duration::from_secs(10));
    result
}

/// The state directory, made only this user's where it is new (the token in it is 0600 anyway;
/// an existing directory named with --state keeps its permissions).
fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// One srun step: an agent on every node of the allocation, each logging to STATE/agents/NODE.log.
fn start_agents(
    exe: &Path,
    state: &Path,
    port: &str,
    token: &str,
    job_nodes: u32,
    slots: u32,
    total: u32,
) -> Result<Child, String> {
    let logs = state.join("agents");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut srun = crate::local::die_with_parent(Command::new("srun"));
    srun.args(["--job-name", AGENT_STEP, "--nodes", &total.to_string(), "--ntasks", &total.to_string()])
        .args(["--ntasks-per-node", "1", "--kill-on-bad-exit=0"])
        .arg("--output")
        .arg(logs.join("%N.log"));
    // The step gets the node's CPUs, not one: ranks and their data loaders run inside it.
    if let Ok(cpus) = std::env::var("SLURM_CPUS_ON_NODE") {
        srun.args(["--cpus-per-task", cpus.trim()]);
    }
    srun.arg(exe)
        .args([
            "slurm-agent",
            "--port",
            port,
            "--job-nodes",
            &job_nodes.to_string(),
            "--slots",
            &slots.to_string(),
        ])
        .arg("--state")
        .arg(state)
        .env(proto::env::MYRIAD_TOKEN, token)
        .stdin(Stdio::null());
    srun.spawn().map_err(|e| format!("cannot run srun (is Slurm's client installed?): {e}"))
}

fn wait_for_agents(
    client: &net::client::Client,
    srun: &mut Child,
    want: usize,
    deadline: Instant,
    state: &Path,
) -> Result<(), String> {
    loop {
        let nodes: Vec<proto::api::NodeView> = block_on(client.get_json("/v1/nodes")).unwrap_or_default();
        let healthy = nodes.iter().filter(|n| n.health == "healthy").count();
        if healthy >= want {
            return Ok(());
        }
        if let Ok(Some(status)) = srun.try_wait() {
            return Err(format!(
                "the agents' srun step ended ({status}) before they all registered; see {}",
                state.join("agents").display()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {healthy} of {want} agents registered in time; see {}",
                state.join("agents").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every agent through Slurm (each stops its ranks and finishes its checkpoint copies),
/// then, past the grace, srun's own forced end of the step.
fn stop_agents(job_id: &str, mut srun: Child) {
    if let Ok(Some(_)) = srun.try_wait() {
        return;
    }
    match agent_step(job_id) {
        Some(step) => {
            let _ = Command::new("scancel").args(["--signal", "TERM", &step]).status();
        }
        // SAFETY: signalling our own child by pid. srun ends the step at once on SIGTERM.
        None => unsafe {
            libc::kill(srun.id() as libc::pid_t, libc::SIGTERM);
        },
    }
    let deadline = Instant::now() + AGENT_STOP;
    while Instant::now() < deadline && matches!(srun.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    crate::local::terminate(vec![srun], Duration::from_secs(10));
}

/// The agents' step id (`JOB.STEP`), asked of Slurm.
fn agent_step(job_id: &str) -> Option<String> {
    let out = Command::new("squeue")
        .args(["--steps", "--jobs", job_id, "--noheader", "--format", "%i %j"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
        let (id, name) = line.trim().split_once(' ')?;
        (name.trim() == AGENT_STEP).then(|| id.to_string())
    })
}

pub fn agent(a: SlurmAgentArgs) -> Result<(), String> {
    let var = |k: &str| {
        std::env::var(k).map_err(|_| {
            format!(
                "{k} is not set: `myriad slurm-agent` runs as a task of the srun step `myriad slurm` starts"
            )
        })
    };
    let name = var("SLURMD_NODENAME")?;
    let node_id: u32 = var("SLURM_NODEID")?.trim().parse().map_err(|_| "SLURM_NODEID is not a number")?;
    let controller_ip = var("SLURM_LAUNCH_NODE_IPADDR")?;
    let addr = local_addr_towards(&controller_ip, a.port)?;
    let work_dir = a.state.join("agents").join(&name);
    let mut argv: Vec<String> = ["agent", "--controller", &format!("http://{controller_ip}:{}", a.port)]
        .into_iter()
        .map(String::from)
        .collect();
    argv.extend([
        "--name".into(),
        name,
        "--addr".into(),
        addr.clone(),
        "--listen".into(),
        format!("{addr}:0"),
    ]);
    argv.extend(["--slots".into(), a.slots.to_string()]);
    argv.extend([
        "--work-dir".into(),
        work_dir.to_str().ok_or("the state directory is not UTF-8")?.to_string(),
    ]);
    if node_id >= a.job_nodes {
        argv.push("--spare".into());
    }
    let command = <crate::cluster_cmd::AgentArgs as Args>::augment_args(clap::Command::new("agent"));
    let matches = command.try_get_matches_from(&argv).map_err(|e| e.to_string())?;
    let args = crate::cluster_cmd::AgentArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    crate::cluster_cmd::agent(args)
}

/// The address this host reaches `ip:port` from (the kernel's route choice; a UDP connect sends
/// nothing).
fn local_addr_towards(ip: &str, port: u16) -> Result<String, String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("UDP socket: {e}"))?;
    socket.connect((ip, port)).map_err(|e| format!("no route to the controller at {ip}:{port}: {e}"))?;
    Ok(socket.local_addr().map_err(|e| format!("local address: {e}"))?.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap()
    }

    #[test]
    fn host_lists_expand_as_scontrol_show_hostnames_does() {
        assert_eq!(hosts("n1"), ["n1"]);
        assert_eq!(hosts("n[1-3]"), ["n1", "n2", "n3"]);
        assert_eq!(hosts("gpu[08-10,7],login1"), ["gpu08", "gpu09", "gpu10", "gpu7", "login1"]);
        assert_eq!(hosts("r[1-2]n[01-02]"), ["r1n01", "r1n02", "r2n01", "r2n02"]);
        assert_eq!(hosts("a[1-2]-ib,b"), ["a1-ib", "a2-ib", "b"]);
        assert_eq!(hosts("node[0001-0002]"), ["node0001", "node0002"]);
    }

    #[test]
    fn a_malformed_host_list_is_refused_with_the_reason() {
        for (list, why) in [
            ("n[1-3", "'[' without ']'"),
            ("n1-3]", "']' without '['"),
            ("n[1-[2]]", "nested"),
            ("n[3-1]", "runs backwards"),
            ("n[a-b]", "not a number"),
            ("n[1-]", "not a number"),
            ("n[]", "not a number"),
            ("n1,,n2", "empty host name"),
            ("", "empty host name"),
            ("n[1-99999999]", "more than"),
        ] {
            let e = expand_hostlist(list).unwrap_err();
            assert!(e.contains(why), "{list:?}: {e}");
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_allocation_is_read_from_slurms_environment() {
        let alloc = Allocation::from_env(env(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "gpu[1-3]"),
            ("SLURM_JOB_NUM_NODES", "3"),
            ("SLURM_NODEID", "0"),
        ]))
        .unwrap();
        assert_eq!(alloc, Allocation { job_id: "42".into(), nodes: hosts("gpu[1-3]"), node_id: 0 });
    }

    #[test]
    fn outside_an_allocation_or_with_an_inconsistent_one_the_error_names_the_variable() {
        let e = Allocation::from_env(env(&[])).unwrap_err();
        assert!(e.contains("not inside a Slurm allocation") && e.contains("SLURM_JOB_ID"), "{e}");
        let e = Allocation::from_env(env(&[("SLURM_JOB_ID", "1")])).unwrap_err();
        assert!(e.contains("SLURM_JOB_NODELIST is not set"), "{e}");
        let e =
            Allocation::from_env(env(&[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "n[1-")])).unwrap_err();
        assert!(e.contains("SLURM_JOB_NODELIST=\"n[1-\"") && e.contains("without ']'"), "{e}");
        let e = Allocation::from_env(env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_JOB_NUM_NODES", "3"),
        ]))
        .unwrap_err();
        assert!(e.contains("names 2 nodes but SLURM_JOB_NUM_NODES is 3"), "{e}");
        let e = Allocation::from_env(env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_NODEID", "2"),
        ]))
        .unwrap_err();
        assert!(e.contains("SLURM_NODEID=2 is outside"), "{e}");
    }
}
