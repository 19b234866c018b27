//! Myriad inside a real Slurm: each test starts its own Slurm cluster of Debian's daemons (a
//! munged with its own key, slurmctld on host `ctl`, one slurmd on each of hosts n1..n3, every
//! host a network namespace with an address and hostname of its own), submits the example batch
//! script from docs/slurm with `sbatch`, and removes everything afterwards. Needs root and the
//! slurmctld, slurmd, slurm-client and munge packages (CI installs them and sets
//! MYRIAD_REQUIRE_SLURM so the tests cannot skip there).

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::netns::Net;
use support::{cmdline, exe, final_state, pids_with_env, scratch, wait_for, Guard};

/// The example every test submits, as a user would.
const TRAIN_SBATCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/slurm/train.sbatch");
/// The PyTorch example, run as a user would from the repository.
const PYTORCH_SBATCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/slurm/pytorch.sbatch");
/// Nodes in each test's Slurm cluster: the example trains on two and keeps the third as a spare.
const NODES: usize = 3;

struct Slurm {
    /// Unique among the clusters tests run at once: job ids are not (each cluster counts from 1).
    cluster: String,
    dir: PathBuf,
    conf: PathBuf,
    // Declared before `net`: the daemons stop before their namespaces go.
    daemons: Vec<Guard>,
    net: Net,
}

impl Slurm {
    /// A Slurm cluster of NODES nodes, or None (with the reason printed) where this machine
    /// cannot run one.
    fn start(tag: &str, name: &str) -> Option<Slurm> {
        let missing: Vec<&str> = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "nsenter"]
            .into_iter()
            .filter(|p| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {p}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        if !missing.is_empty() {
            assert!(
                std::env::var_os("MYRIAD_REQUIRE_SLURM").is_none(),
                "MYRIAD_REQUIRE_SLURM is set, but {missing:?} are missing"
            );
            eprintln!("Slurm is not installed here ({missing:?} missing); skipping");
            return None;
        }
        let net = Net::new(tag, NODES + 1)?;
        let dir = scratch(name);
        let munge = dir.join("munge");
        std::fs::create_dir_all(&munge).unwrap();
        set_mode(&munge, 0o700);
        let mut key = vec![0u8; 1024];
        use std::io::Read;
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut key).unwrap();
        std::fs::write(munge.join("key"), &key).unwrap();
        set_mode(&munge.join("key"), 0o600);
        let socket = munge.join("socket");
        let mut daemons = vec![Guard(Some(
            Command::new("munged")
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", munge.join("key").display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", munge.join("pid").display()))
                .arg(format!("--log-file={}", munge.join("log").display()))
                .arg(format!("--seed-file={}", munge.join("seed").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ))];
        wait_for("munged's socket", Duration::from_secs(10), || socket.exists().then_some(()));

        let conf = dir.join("slurm.conf");
        let cluster = format!("myriad{tag}");
        std::fs::write(&conf, slurm_conf(&cluster, &dir, &socket, &net)).unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let ctld = net
            .host_command(0, "ctl", "slurmctld")
            .args(["-D", "-i", "-f"])
            .arg(&conf)
            .stdout(log("slurmctld"))
            .stderr(log("slurmctld"))
            .spawn()
            .unwrap();
        daemons.push(Guard(Some(ctld)));
        for i in 1..=NODES {
            let node = format!("n{i}");
            std::fs::create_dir_all(dir.join("spool").join(&node)).unwrap();
            let slurmd = net
                .host_command(i, &node, "slurmd")
                .args(["-D", "-f"])
                .arg(&conf)
                .stdout(log(&node))
                .stderr(log(&node))
                .spawn()
                .unwrap();
            daemons.push(Guard(Some(slurmd)));
        }
        let slurm = Slurm { cluster, dir, conf, daemons, net };
        wait_for("every node to be idle", Duration::from_secs(60), || {
            let out = slurm.client("sinfo", &["--noheader", "--Node", "--format", "%N %T"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            (text.lines().filter(|l| l.trim().ends_with(" idle")).count() == NODES).then_some(())
        });
        Some(slurm)
    }

    /// A Slurm client command (sbatch, scontrol, …) run on the controller's host.
    fn client(&self, program: &str, args: &[&str]) -> Output {
        self.net.command(0, program).args(args).env("SLURM_CONF", &self.conf).output().unwrap()
    }

    /// Submits the example from `cwd` (a directory every node sees, as on a real cluster) with
    /// `myriad` on the PATH; returns the Slurm job id.
    fn sbatch(&self, cwd: &Path, script: &str, env: &[(&str, &str)]) -> String {
        let bin = Path::new(exe()).parent().unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = self.net.command(0, "sbatch");
        cmd.args(["--parsable", "--chdir"])
            .arg(cwd)
            .arg(script)
            .env("SLURM_CONF", &self.conf)
            .env("PATH", path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
    }

    /// The job's JobState and ExitCode, as scontrol shows them.
    fn job(&self, id: &str) -> (String, String) {
        let out = self.client("scontrol", &["--oneliner", "show", "job", id]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_string()
        };
        (field("JobState"), field("ExitCode"))
    }

    fn wait_done(&self, id: &str, within: Duration) -> (String, String) {
        wait_for(&format!("Slurm job {id} to end"), within, || {
            let (state, exit) = self.job(id);
            (!["PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""].contains(&state.as_str()))
                .then_some((state, exit))
        })
    }

    /// `myriad CMD --json` against the controller `myriad slurm` started for Slurm job `id`, run
    /// on the controller's host (Null until it answers).
    fn myriad(&self, cwd: &Path, id: &str, args: &[&str]) -> Value {
        let state = cwd.join(format!("myriad-slurm-{id}/controller"));
        let Ok(url) = std::fs::read_to_string(state.join("controller.url")) else { return Value::Null };
        let port = url.trim().rsplit(':').next().unwrap().to_string();
        // The controller listens on every address of the batch node, n1.
        let url = format!("http://{}:{port}", self.net.hosts[1].ip);
        let out = self
            .net
            .command(0, exe())
            .arg(args[0])
            .args(["--controller", &url])
            .arg("--token-file")
            .arg(state.join("token"))
            .args(&args[1..])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Pids of the processes of Slurm job `id` (every process a step starts inherits its
    /// SLURM_JOB_ID and SLURM_CLUSTER_NAME) whose environment also holds `vars`.
    fn job_pids(&self, id: &str, vars: &[&str]) -> Vec<u32> {
        let (job, cluster) = (format!("SLURM_JOB_ID={id}"), format!("SLURM_CLUSTER_NAME={}", self.cluster));
        let all: Vec<&str> =
            [job.as_str(), cluster.as_str()].into_iter().chain(vars.iter().copied()).collect();
        pids_with_env(&all)
    }

    /// Waits until Myriad's job 1 under Slurm job `id` has reported `step`. A Slurm job that
    /// ends first, or the deadline, fails the test with the job's state, output and agents' logs.
    fn wait_step(&self, cwd: &Path, id: &str, step: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.myriad(cwd, id, &["status", "1", "--json"])["job"]["step"]
                .as_u64()
                .is_some_and(|s| s >= step)
            {
                return;
            }
            let (state, exit) = self.job(id);
            let ended = !["PENDING", "RUNNING", "CONFIGURING", ""].contains(&state.as_str());
            if ended || Instant::now() > deadline {
                let show = self.client("scontrol", &["--oneliner", "show", "job", id]);
                let nodes = self.client("sinfo", &["--noheader", "--Node", "--format", "%N %T %E"]);
                let logs = self.agent_logs(cwd, id);
                panic!(
                    "Slurm job {id} ({state} {exit}) did not reach step {step}:\n{}\n{}\n{}\n{logs}",
                    String::from_utf8_lossy(&show.stdout),
                    String::from_utf8_lossy(&nodes.stdout),
                    self.output(cwd, id)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to `node`'s agent of Slurm job `id`: it dies at once (its ranks with it), and
    /// Slurm's step lives on on the other nodes.
    fn kill_agent(&self, id: &str, node: &str) {
        let agent = self
            .job_pids(id, &[&format!("SLURMD_NODENAME={node}")])
            .into_iter()
            .find(|&pid| myriad_command(&cmdline(pid)) == Some("slurm-agent"))
            .unwrap_or_else(|| panic!("{node}'s agent of Slurm job {id} is not running"));
        // SAFETY: signalling a pid just read from /proc; at worst it has exited.
        unsafe {
            libc::kill(agent as i32, libc::SIGKILL);
        }
    }

    /// Every agent's log of Slurm job `id` and every rank's stderr, each under its path.
    fn agent_logs(&self, cwd: &Path, id: &str) -> String {
        let mut files = Vec::new();
        let mut dirs = vec![cwd.join(format!("myriad-slurm-{id}/agents"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "log" || x == "stderr") {
                    files.push(path);
                }
            }
        }
        files.sort();
        let show =
            |p: &PathBuf| format!("{}:\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default());
        files.iter().map(show).collect::<Vec<_>>().join("\n")
    }

    /// The batch script's output (the examples name it `myriad-KIND-ID.out`).
    fn output(&self, cwd: &Path, id: &str) -> String {
        ["train", "pytorch"]
            .iter()
            .find_map(|kind| std::fs::read_to_string(cwd.join(format!("myriad-{kind}-{id}.out"))).ok())
            .unwrap_or_default()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Jobs first, so no slurmstepd outlives the cluster; then the daemons.
        let _ = self.client("scancel", &["--user", "root"]);
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            let out = self.client("squeue", &["--noheader"]);
            if out.status.success() && out.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for d in self.daemons.iter_mut().rev() {
            d.terminate(Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A minimal slurm.conf: root runs everything, munge on this cluster's own socket, no cgroups
/// (linuxproc tracks a step's processes by ancestry), one CPU per node declared so that a
/// smaller machine cannot drain a node.
fn slurm_conf(cluster: &str, dir: &Path, munge_socket: &Path, net: &Net) -> String {
    let d = dir.display();
    let mut conf = format!(
        "ClusterName={cluster}
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/linear
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
MinJobAge=600
KillWait=30
",
        ctl = net.hosts[0].ip,
        socket = munge_socket.display()
    );
    for i in 1..=NODES {
        conf += &format!("NodeName=n{i} NodeAddr={} CPUs=1 State=UNKNOWN\n", net.hosts[i].ip);
    }
    conf += &format!("PartitionName=main Nodes=n[1-{NODES}] Default=YES MaxTime=INFINITE State=UP\n");
    conf
}

/// The subcommand of a `myriad` command line (not of srun's, which holds one).
fn myriad_command(cmdline: &str) -> Option<&str> {
    let mut words = cmdline.split(' ');
    words.next().filter(|p| p.ends_with("/myriad") || *p == "myriad")?;
    words.next()
}

#[test]
fn an_sbatch_job_with_a_spare_swaps_in_the_spare_for_a_killed_agent_and_ends_bitwise_identical() {
    let Some(slurm) = Slurm::start("s", "slurm-spare") else { return };
    let cwd = slurm.dir.join("submit");
    std::fs::create_dir_all(&cwd).unwrap();
    // Long enough (about 20 s here) that the faulty run is seen mid-way on a loaded machine.
    let clean = slurm.sbatch(&cwd, TRAIN_SBATCH, &[("STEPS", "600")]);
    let (state, exit) = slurm.wait_done(&clean, Duration::from_secs(180));
    let output = slurm.output(&cwd, &clean);
    assert_eq!((state.as_str(), exit.as_str()), ("COMPLETED", "0:0"), "{output}");
    assert!(output.contains("2 train (n1,n2), 1 hot spare (n3)"), "{output}");

    let faulty = slurm.sbatch(&cwd, TRAIN_SBATCH, &[("STEPS", "600")]);
    // Myriad's job 1 on the controller `myriad slurm` started for this Slurm job.
    let job = || slurm.myriad(&cwd, &faulty, &["status", "1", "--json"]);
    slurm.wait_step(&cwd, &faulty, 20);
    let before = job();
    let logs = || slurm.agent_logs(&cwd, &faulty);
    assert_eq!(before["job"]["nodes"], serde_json::json!(["n1", "n2"]), "{before}\n{}", logs());
    // Any earlier restart (none is expected) is not the one this test is after.
    let attempt = before["job"]["attempt"].as_u64().expect("the job's attempt");
    let killed = Instant::now();
    slurm.kill_agent(&faulty, "n2");
    let moved = wait_for("the job to move to the spare", Duration::from_secs(60), || {
        let s = job();
        (s["job"]["attempt"].as_u64()? > attempt && s["job"]["state"] == "running").then_some(s)
    });
    eprintln!(
        "n2's agent killed: the job runs again on {} after {:?}",
        moved["job"]["nodes"],
        killed.elapsed()
    );
    if attempt > 0 {
        eprintln!("the job had already restarted before the kill:\n{before}\n{}", logs());
    }
    assert_eq!(moved["job"]["nodes"], serde_json::json!(["n1", "n3"]), "{moved}\n{}", logs());
    assert!(moved["job"]["reason"].as_str().unwrap_or("").contains("node n2 was lost"), "{moved}");
    let (state, exit) = slurm.wait_done(&faulty, Duration::from_secs(180));
    let output = slurm.output(&cwd, &faulty);
    assert_eq!((state.as_str(), exit.as_str()), ("COMPLETED", "0:0"), "{output}\n{}", logs());
    let ended = format!("job 1: succeeded (attempt {})", attempt + 1);
    assert!(output.contains(&ended), "{output}");
    assert_eq!(
        final_state(&cwd.join(format!("final-{clean}"))),
        final_state(&cwd.join(format!("final-{faulty}"))),
        "the final state differs"
    );
}

#[test]
fn scancel_stops_the_controller_agents_and_ranks_leaving_no_process_behind() {
    let Some(slurm) = Slurm::start("t", "slurm-scancel") else { return };
    let cwd = slurm.dir.join("submit");
    std::fs::create_dir_all(&cwd).unwrap();
    let id = slurm.sbatch(&cwd, TRAIN_SBATCH, &[("STEPS", "1000000")]);
    slurm.wait_step(&cwd, &id, 5);
    let pids = slurm.job_pids(&id, &[]);
    let commands: Vec<String> = pids.iter().map(|&p| cmdline(p)).collect();
    let count = |sub: &str| commands.iter().filter(|c| myriad_command(c) == Some(sub)).count();
    // Everything Myriad started for the job runs: the controller, three agents, four ranks.
    assert_eq!(count("controller"), 1, "{commands:#?}");
    assert_eq!(count("slurm-agent"), NODES, "{commands:#?}");
    assert_eq!(count("train"), 4, "{commands:#?}");
    let cancelled = Instant::now();
    let out = slurm.client("scancel", &[&id]);
    assert!(out.status.success(), "scancel: {}", String::from_utf8_lossy(&out.stderr));
    // Within Slurm's KillWait (30 s): each process stops on SIGTERM, none waits for the SIGKILL.
    let left = wait_for("every process of the job to end", Duration::from_secs(20), || {
        let left = slurm.job_pids(&id, &[]);
        left.is_empty().then_some(left)
    });
    assert!(left.is_empty());
    eprintln!("scancel: every process of the job gone {:?} later", cancelled.elapsed());
    assert_eq!(slurm.wait_done(&id, Duration::from_secs(60)).0, "CANCELLED");
}

#[test]
fn bad_input_inside_an_allocation_fails_the_slurm_job_with_the_reason() {
    let Some(slurm) = Slurm::start("u", "slurm-bad") else { return };
    let cwd = slurm.dir.join("submit");
    std::fs::create_dir_all(&cwd).unwrap();
    let script = cwd.join("too-many.sbatch");
    std::fs::write(
        &script,
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --output=myriad-train-%j.out\nexec myriad slurm --nnodes 3 -- myriad train --steps 1\n",
    )
    .unwrap();
    let id = slurm.sbatch(&cwd, script.to_str().unwrap(), &[]);
    let (state, exit) = slurm.wait_done(&id, Duration::from_secs(60));
    let output = slurm.output(&cwd, &id);
    assert_eq!((state.as_str(), exit.as_str()), ("FAILED", "1:0"), "{output}");
    assert!(output.contains("--nnodes 3 is more than the 2 nodes of allocation"), "{output}");

    // A job that fails makes the Slurm job fail, with the job's reason in its output.
    let script = cwd.join("failing.sbatch");
    std::fs::write(
        &script,
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --output=myriad-train-%j.out\nexec myriad slurm --nnodes 2 -- sh -c 'exit 3'\n",
    )
    .unwrap();
    let id = slurm.sbatch(&cwd, script.to_str().unwrap(), &[]);
    let (state, exit) = slurm.wait_done(&id, Duration::from_secs(60));
    let output = slurm.output(&cwd, &id);
    assert_eq!((state.as_str(), exit.as_str()), ("FAILED", "1:0"), "{output}");
    assert!(output.contains("job 1 failed"), "{output}");
    // Nothing is left running after either.
    assert!(slurm.job_pids(&id, &[]).is_empty());
}

#[test]
fn outside_an_allocation_myriad_slurm_says_so() {
    let out = Command::new(exe())
        .args(["slurm", "--", "true"])
        .env_remove("SLURM_JOB_ID")
        .env_remove("SLURM_JOB_NODELIST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not inside a Slurm allocation: SLURM_JOB_ID is not set"), "{err}");
    let out = Command::new(exe())
        .args(["slurm", "--", "true"])
        .env("SLURM_JOB_ID", "7")
        .env("SLURM_JOB_NODELIST", "gpu[01-")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SLURM_JOB_NODELIST=\"gpu[01-\": '[' without ']'"), "{err}");
}

#[test]
fn an_unmodified_pytorch_ddp_script_runs_across_slurm_nodes_and_survives_a_killed_agent_bitwise() {
    if Command::new("python3").args(["-c", "import torch"]).output().map_or(true, |o| !o.status.success()) {
        assert!(
            std::env::var_os("MYRIAD_REQUIRE_TORCH").is_none(),
            "MYRIAD_REQUIRE_TORCH is set, but torch is missing"
        );
        eprintln!("torch is not installed; skipping");
        return;
    }
    let Some(slurm) = Slurm::start("v", "slurm-pytorch") else { return };
    // The example names its script relative to the repository, where a user submits it from.
    let cwd = slurm.dir.join("submit");
    std::fs::create_dir_all(&cwd).unwrap();
    std::os::unix::fs::symlink(concat!(env!("CARGO_MANIFEST_DIR"), "/../../python"), cwd.join("python"))
        .unwrap();
    let id = slurm.sbatch(&cwd, PYTORCH_SBATCH, &[("STEPS", "40")]);
    let (state, exit) = slurm.wait_done(&id, Duration::from_secs(180));
    let output = slurm.output(&cwd, &id);
    assert_eq!((state.as_str(), exit.as_str()), ("COMPLETED", "0:0"), "{output}");
    // Four ranks on n1 and n2 trained together: rank 0 wrote the final weights' digest.
    assert!(output.contains("2 train (n1,n2), 1 hot spare (n3)"), "{output}");
    let clean =
        std::fs::read_to_string(cwd.join(format!("weights-{id}.json"))).expect("rank 0 wrote its weights");
    assert!(clean.contains("weights_sha256"), "{clean}");

    // The same job with slower steps (a sleep, the same arithmetic), and n2's agent killed.
    let script = cwd.join("fault.sbatch");
    std::fs::write(
        &script,
        "#!/bin/bash\n#SBATCH --nodes=3\n#SBATCH --output=myriad-pytorch-%j.out\n\
         exec myriad slurm --nnodes 2 --nproc-per-node 2 --max-restarts 3 -- \
         python/examples/ddp_checkpoint.py --steps 40 --step-ms 150 --out weights-$SLURM_JOB_ID.json\n",
    )
    .unwrap();
    let faulty = slurm.sbatch(&cwd, script.to_str().unwrap(), &[]);
    slurm.wait_step(&cwd, &faulty, 10);
    slurm.kill_agent(&faulty, "n2");
    let (state, exit) = slurm.wait_done(&faulty, Duration::from_secs(180));
    let output = slurm.output(&cwd, &faulty);
    assert_eq!((state.as_str(), exit.as_str()), ("COMPLETED", "0:0"), "{output}");
    assert!(output.contains("[rank0]: resumed at step"), "{output}");
    if !output.contains("job 1: succeeded (attempt 1)") {
        eprintln!("more than one restart:\n{output}\n{}", slurm.agent_logs(&cwd, &faulty));
    }
    let after = std::fs::read_to_string(cwd.join(format!("weights-{faulty}.json"))).unwrap();
    assert_eq!(clean, after, "the final weights differ");
}
