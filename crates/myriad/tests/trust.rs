//! The control plane can be trusted: a controller that is paused harms no job, and a rank holds no
//! credential to the cluster. Local clusters with 200 ms heartbeats (a node is lost after 600 ms
//! of silence). A test binary of its own: its clusters never share the machine with `cli.rs`'s.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{cli_json, controller, exe, get, get_status, scratch, submit, up, wait_for, wait_job_state};

fn events(dir: &Path) -> Vec<Value> {
    let (addr, token) = controller(dir);
    serde_json::from_str::<Value>(&get(&addr, "/v1/events", &token)).unwrap().as_array().unwrap().clone()
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on the controller this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn a_controller_paused_three_times_for_three_node_timeouts_loses_no_node_and_restarts_nothing() {
    let dir = scratch("trust-pause");
    let _up = up(&dir, &["--nodes", "2", "--slots", "1"]);
    let train = [exe(), "train", "--preset", "tiny", "--peak-gflops", "100", "--batch", "2", "--seq", "16"];
    let mut args = vec!["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "3", "--"];
    args.extend(train);
    args.extend(["--steps", "1000000"]);
    let id = submit(&dir, &args);
    wait_job_state(&dir, id, &["running"], Duration::from_secs(60));
    let pid: i32 = std::fs::read_to_string(dir.join(".myriad/controller/controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // 3 × the node timeout (3 heartbeats of 200 ms), three times: a GC pause, a VM migration, a
    // busy host.
    for _ in 0..3 {
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1800));
        signal(pid, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let s = wait_job_state(&dir, id, &["running"], Duration::from_secs(10));
    assert_eq!((s["job"]["attempt"].as_u64(), s["job"]["restarts"].as_u64()), (Some(0), Some(0)), "{s}");
    let all = events(&dir);
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        !kinds.iter().any(|k| ["node_lost", "node_quarantined", "attempt_failed"].contains(k)),
        "{kinds:?}"
    );
    assert!(kinds.iter().filter(|k| **k == "controller_stalled").count() >= 3, "{kinds:?}");
    // The grace comes first: the breaker (the other guard, for nodes that really fall silent
    // together) never had to open.
    assert!(!kinds.contains(&"loss_breaker_open"), "{kinds:?}");
    let nodes = cli_json(&dir, &["nodes", "--json"]);
    assert!(nodes.as_array().unwrap().iter().all(|n| n["health"] == "healthy"), "{nodes}");
    let (addr, token) = controller(&dir);
    let metrics = get(&addr, "/metrics", &token);
    assert!(metrics.contains("myriad_node_loss_breaker_open 0"), "{metrics}");
    let stalls: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("myriad_controller_stalls_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no myriad_controller_stalls_total in:\n{metrics}"));
    assert!(stalls >= 3, "{stalls} stalls counted");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_ranks_environment_holds_no_cluster_token() {
    let dir = scratch("trust-token");
    let _up = up(&dir, &["--nodes", "1", "--slots", "1"]);
    let dump = dir.join("rank-env");
    let id = submit(&dir, &["--", "sh", "-c", &format!("env > {}", dump.display())]);
    wait_job_state(&dir, id, &["succeeded"], Duration::from_secs(30));
    let (addr, token) = controller(&dir);
    let env =
        wait_for("the rank's environment", Duration::from_secs(5), || std::fs::read_to_string(&dump).ok());
    assert!(env.contains("MYRIAD_JOB_ID=") && env.contains("RANK=0"), "{env}");
    assert!(!env.contains(&token), "a rank can read the cluster token:\n{env}");
    assert!(!env.contains("MYRIAD_TOKEN"), "{env}");
    // What the agent keeps of the job is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let agent_dir = dir.join(".myriad/agents/node-0");
    assert_eq!(mode(&agent_dir), 0o700, "{}", agent_dir.display());
    let log = agent_dir.join(format!("jobs/{id}/attempt-0/rank-0.stderr"));
    assert_eq!(mode(&log), 0o600, "{}", log.display());
    // Without it, the API refuses the rank: what it can send is no token, or a guess.
    for guess in ["", "0123456789abcdef0123456789abcdef"] {
        let (status, body) = get_status(&addr, "/v1/jobs", guess);
        assert_eq!(status, 401, "{body}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_controller_whose_state_directory_is_full_exits_naming_it() {
    let dir = scratch("trust-full");
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    // A 64 KiB filesystem of its own, filled: needs root (CI has it; MYRIAD_REQUIRE_NETNS says so).
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&full)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        assert!(std::env::var_os("MYRIAD_REQUIRE_NETNS").is_none(), "root is required here to mount a tmpfs");
        eprintln!("cannot mount a tmpfs (not root): skipping");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
    let _unmount = Unmount(full.clone());
    let _ = std::fs::write(full.join("filler"), vec![0u8; 64 << 10]);
    let mut child = Command::new(exe())
        .args(["controller", "--listen", "127.0.0.1:0", "--state"])
        .arg(full.join("state"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the controller to give up", Duration::from_secs(20), || child.try_wait().unwrap());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&full.join("state").display().to_string()) && stderr.contains("No space left"),
        "{stderr}"
    );
}

/// A controller (fresh state under `dir/.myriad`, where the CLI finds it) and one agent of two
/// slots keeping its in-memory tier in `memory`.
fn controller_and_agent(dir: &Path, memory: &Path) -> (support::Guard, support::Guard) {
    let state = dir.join(".myriad/controller");
    let _ = std::fs::remove_dir_all(&state);
    let controller = support::Guard(Some(
        Command::new(exe())
            .args(["controller", "--listen", "127.0.0.1:0", "--heartbeat-ms", "200", "--state"])
            .arg(&state)
            .spawn()
            .unwrap(),
    ));
    let url = wait_for("the controller's URL", Duration::from_secs(20), || {
        std::fs::read_to_string(state.join("controller.url")).ok()
    });
    let agent = support::Guard(Some(
        Command::new(exe())
            .args(["agent", "--controller", url.trim(), "--name", "a1", "--slots", "2", "--token-file"])
            .arg(state.join("token"))
            .arg("--memory-dir")
            .arg(memory)
            .arg("--work-dir")
            .arg(dir.join(format!("agent-{}", std::process::id())))
            .spawn()
            .unwrap(),
    ));
    wait_for("the agent to join", Duration::from_secs(20), || {
        (cli_json(dir, &["nodes", "--json"]).as_array()?.len() == 1).then_some(())
    });
    (controller, agent)
}

#[test]
fn a_fresh_job_never_starts_from_what_a_killed_agent_left_in_memory() {
    // A killed agent cannot remove its memory tier. The next agent given that directory (a pid
    // reused in the default /dev/shm/myriad-agent-NAME-PID, or the same --memory-dir) found the
    // dead job's live slots, and a new cluster's job 1 of the same configuration resumed at the
    // dead one's step 200 instead of starting at step 1.
    let dir = scratch("trust-stale-memory");
    let memory = dir.join("memory");
    // The same job both times: live slots are taken up only by the configuration that wrote them.
    let mut job = vec!["--nnodes", "1", "--nproc-per-node", "2", "--", exe(), "train", "--preset", "tiny"];
    job.extend(["--batch", "8", "--seq", "64", "--peak-gflops", "100", "--steps", "100000"]);
    let reached = |id: u64, step: u64| {
        wait_for(&format!("job {id}'s step {step}"), Duration::from_secs(60), || {
            (support::job_state(&dir, id)["job"]["step"].as_u64()? >= step).then_some(())
        })
    };
    {
        let (_controller, mut agent) = controller_and_agent(&dir, &memory);
        let id = submit(&dir, &job);
        reached(id, 60);
        agent.kill9();
    }
    let live = memory.join("job-1/live");
    assert!(live.join("slot-0.bin").is_file(), "the killed agent left its job's live slots");
    // Its memory checkpoints would be reported and purged by the new controller: the slots alone
    // are what a new job could take up.
    for entry in std::fs::read_dir(memory.join("job-1")).unwrap() {
        let path = entry.unwrap().path();
        if path != live {
            std::fs::remove_dir_all(path).unwrap();
        }
    }

    let (_controller, _agent) = controller_and_agent(&dir, &memory);
    let id = submit(&dir, &job);
    assert_eq!(id, 1, "a new cluster's first job has the dead one's number");
    reached(id, 10);
    let out = support::cli(&dir, &["logs", "1", "--rank", "0", "--stderr"]);
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("resumed at step"), "{log}");
    assert!(log.contains("step 1/100000"), "{log}");
}
