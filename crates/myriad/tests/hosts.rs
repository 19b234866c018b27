//! Myriad across real hosts: the controller and each agent in a network namespace of its own
//! (a veth to a bridge in a switch namespace, an address each), made and removed by the test
//! itself. A host is cut off from the controller alone by a blackhole route to the controller's
//! address: it still reaches its peers. Needs root (CI runs as root, and sets
//! MYRIAD_REQUIRE_NETNS so the tests cannot skip there); elsewhere they say why they skip.
//! A test binary of its own: its hosts never share the machine with `cli.rs`'s clusters.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::netns::Net;
use support::{exe, final_state, pids_with_env, scratch, wait_for, Guard};

/// A controller on host 0 and agents on hosts 1.. (the last `spares` of them hot spares), with
/// 1 s heartbeats, as a real cluster has them: a node is lost after 2.8 s of silence (3 heartbeats
/// less two 100 ms ticks).
struct Cluster {
    dir: PathBuf,
    url: String,
    token_file: PathBuf,
    // Declared before `net`: processes stop before their namespaces go.
    _processes: Vec<Guard>,
    net: Net,
}

impl Cluster {
    fn start(dir: &Path, net: Net, spares: usize) -> Cluster {
        let state = dir.join("controller");
        let port = 17_000 + std::process::id() % 1000;
        let url = format!("http://{}:{port}", net.hosts[0].ip);
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let controller = net
            .command(0, exe())
            .args([
                "controller",
                "--listen",
                &format!("{}:{port}", net.hosts[0].ip),
                "--heartbeat-ms",
                "1000",
            ])
            .arg("--state")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(log("controller"))
            .spawn()
            .unwrap();
        let mut processes = vec![Guard(Some(controller))];
        let token_file = state.join("token");
        wait_for("the controller to start", Duration::from_secs(20), || {
            state.join("controller.url").is_file().then_some(())
        });
        let agents = net.hosts.len() - 1;
        for i in 1..=agents {
            let name = format!("host-{i}");
            let mut agent = net.command(i, exe());
            agent
                .args(["agent", "--controller", &url, "--name", &name, "--slots", "2"])
                .args(["--addr", &net.hosts[i].ip, "--listen", &format!("{}:0", net.hosts[i].ip)])
                .arg("--token-file")
                .arg(&token_file)
                .arg("--work-dir")
                .arg(dir.join("agents").join(&name))
                .stdout(Stdio::null())
                .stderr(log(&name));
            if i > agents - spares {
                agent.arg("--spare");
            }
            processes.push(Guard(Some(agent.spawn().unwrap())));
        }
        let c = Cluster { dir: dir.to_path_buf(), url, token_file, _processes: processes, net };
        wait_for("every agent to register", Duration::from_secs(20), || {
            let nodes = c.cli_json(&["nodes", "--json"]);
            (nodes.as_array()?.iter().filter(|n| n["health"] == "healthy").count() == agents).then_some(())
        });
        c
    }

    /// A CLI command run on the controller's host.
    fn cli_json(&self, args: &[&str]) -> Value {
        // The connection flags go right after the subcommand: a job's command follows `--`.
        let out = self
            .net
            .command(0, exe())
            .arg(args[0])
            .args(["--controller", &self.url])
            .arg("--token-file")
            .arg(&self.token_file)
            .args(&args[1..])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("myriad {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A 2 × 2 training job that saves its final state under `final_dir`; returns its id.
    fn train(&self, final_dir: &Path, steps: u32) -> u64 {
        let steps = steps.to_string();
        let args = [
            "submit",
            "--json",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--spares",
            "1",
            "--max-restarts",
            "3",
            "--",
            exe(),
            "train",
            "--preset",
            "tiny",
            "--batch",
            "8",
            "--seq",
            "64",
            "--steps",
            &steps,
            "--peak-gflops",
            "100",
            "--checkpoint-dir",
            final_dir.to_str().unwrap(),
        ];
        self.cli_json(&args)["id"].as_u64().expect("submitted")
    }

    /// Every event, read from the controller's host.
    fn events(&self) -> Vec<Value> {
        let token = std::fs::read_to_string(&self.token_file).unwrap();
        let out = self
            .net
            .command(0, "curl")
            .args(["-s", "--max-time", "10", "-H", &format!("authorization: Bearer {}", token.trim())])
            .arg(format!("{}/v1/events", self.url))
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    fn job(&self, id: u64) -> Value {
        self.cli_json(&["status", &id.to_string(), "--json"])
    }

    fn wait_state(&self, id: u64, states: &[&str], within: Duration) -> Value {
        wait_for(&format!("job {id} to be {states:?}"), within, || {
            let s = self.job(id);
            states.contains(&s["job"]["state"].as_str()?).then_some(s)
        })
    }

    /// Waits until the job's rank 0 has reported at least `step`.
    fn wait_step(&self, id: u64, step: u64) {
        wait_for(&format!("job {id} to reach step {step}"), Duration::from_secs(60), || {
            (self.job(id)["job"]["step"].as_u64()? >= step).then_some(())
        });
    }
}

const STEPS: u32 = 300;

#[test]
fn a_2x2_job_across_hosts_survives_a_host_cut_off_from_the_controller_bitwise() {
    let Some(net) = Net::new("a", 4) else { return };
    let dir = scratch("hosts-cut-one");
    let cluster = Cluster::start(&dir, net, 1);
    // Fault-free, across hosts 1 and 2.
    let clean = cluster.train(&dir.join("clean"), STEPS);
    let done = cluster.wait_state(clean, &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(done["job"]["state"], "succeeded", "{done}");
    assert_eq!(done["job"]["nodes"], serde_json::json!(["host-1", "host-2"]));

    // Again; mid-run host 2 loses the controller (it still reaches host 1).
    let cut = cluster.train(&dir.join("cut"), STEPS);
    cluster.wait_step(cut, 20);
    let started = Instant::now();
    cluster.net.cut(2, 0);
    let moved = wait_for("the job to move to the spare", Duration::from_secs(30), || {
        let s = cluster.job(cut);
        (s["job"]["attempt"].as_u64()? >= 1 && s["job"]["state"] == "running").then_some(s)
    });
    eprintln!(
        "host 2 cut off: the job runs again on {} after {:?}",
        moved["job"]["nodes"],
        started.elapsed()
    );
    assert_eq!(moved["job"]["nodes"], serde_json::json!(["host-1", "host-3"]), "{moved}");
    let done = cluster.wait_state(cut, &["succeeded", "failed"], Duration::from_secs(120));
    cluster.net.heal(2, 0);
    assert_eq!(done["job"]["state"], "succeeded", "{done}");
    let kinds: Vec<&str> =
        done["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"recovered"), "{kinds:?}");
    let failed = done["events"].as_array().unwrap().iter().find(|e| e["kind"] == "attempt_failed").cloned();
    let message = failed.as_ref().and_then(|e| e["message"].as_str()).unwrap_or("");
    assert!(message.contains("node host-2 was lost"), "{done}");
    // The old attempt's ranks on host 2 could not train on alone: their ring peers on host 1 were
    // stopped, so their collectives failed and they exited with an error.
    for local in 0..2 {
        let log = dir
            .join("agents/host-2/jobs")
            .join(cut.to_string())
            .join(format!("attempt-0/rank-{local}.stderr"));
        let text = wait_for("host 2's old ranks to fail", Duration::from_secs(30), || {
            std::fs::read_to_string(&log).ok().filter(|t| t.contains("error:"))
        });
        eprintln!("host 2, attempt 0, local rank {local}: {}", text.trim());
    }
    assert_eq!(final_state(&dir.join("clean")), final_state(&dir.join("cut")), "the final state differs");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_whose_hosts_all_lose_the_controller_trains_on_and_is_not_restarted() {
    let Some(net) = Net::new("b", 4) else { return };
    let dir = scratch("hosts-cut-all");
    let cluster = Cluster::start(&dir, net, 1);
    let clean = cluster.train(&dir.join("clean"), STEPS);
    assert_eq!(
        cluster.wait_state(clean, &["succeeded", "failed"], Duration::from_secs(120))["job"]["state"],
        "succeeded"
    );

    let cut = cluster.train(&dir.join("cut"), STEPS);
    cluster.wait_step(cut, 20);
    // Both of the job's hosts lose the controller for 9 s (three node timeouts); the spare does
    // not. Two of three nodes silent at once: the controller holds the losses back.
    cluster.net.cut(1, 0);
    cluster.net.cut(2, 0);
    std::thread::sleep(Duration::from_secs(9));
    cluster.net.heal(1, 0);
    cluster.net.heal(2, 0);
    let done = cluster.wait_state(cut, &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(done["job"]["state"], "succeeded", "{done}");
    assert_eq!(
        (done["job"]["attempt"].as_u64(), done["job"]["restarts"].as_u64()),
        (Some(0), Some(0)),
        "{done}"
    );
    let kinds: Vec<String> =
        cluster.events().iter().filter_map(|e| e["kind"].as_str().map(String::from)).collect();
    assert!(kinds.iter().any(|k| k == "loss_breaker_open"), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "node_lost"), "{kinds:?}");
    assert_eq!(final_state(&dir.join("clean")), final_state(&dir.join("cut")), "the final state differs");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unix time in ms, the clock the controller's events carry.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Pids of the running ranks of `job`'s attempt `attempt` on this machine (every namespace's
/// processes are visible here), by their environment.
fn rank_pids(job: u64, attempt: u32) -> Vec<u32> {
    pids_with_env(&[&format!("MYRIAD_JOB_ID={job}"), &format!("MYRIAD_ATTEMPT={attempt}")])
}

#[test]
fn a_single_node_job_cut_off_from_the_controller_is_fenced_before_its_work_moves() {
    let Some(net) = Net::new("c", 3) else { return };
    let dir = scratch("hosts-fence");
    // host-1 runs the job; host-2 is its spare.
    let cluster = Cluster::start(&dir, net, 1);
    let args = [
        "submit",
        "--json",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--spares",
        "1",
        "--max-restarts",
        "3",
        "--",
        exe(),
        "train",
        "--preset",
        "tiny",
        "--batch",
        "8",
        "--seq",
        "64",
        "--steps",
        "1000000",
        "--peak-gflops",
        "100",
    ];
    let id = cluster.cli_json(&args)["id"].as_u64().expect("submitted");
    cluster.wait_step(id, 20);
    assert_eq!(cluster.job(id)["job"]["nodes"], serde_json::json!(["host-1"]));
    assert_eq!(rank_pids(id, 0).len(), 2, "both ranks of attempt 0 run");
    // host-1 loses the controller, nothing else: alone, its ranks could train on for ever.
    let cut_ms = unix_ms();
    cluster.net.cut(1, 0);
    let gone_ms = wait_for("the cut-off ranks to be fenced", Duration::from_secs(40), || {
        rank_pids(id, 0).is_empty().then(unix_ms)
    });
    let moved = wait_for("the job to move to the spare", Duration::from_secs(40), || {
        let s = cluster.job(id);
        (s["job"]["attempt"].as_u64()? >= 1 && s["job"]["state"] == "running").then_some(s)
    });
    assert_eq!(moved["job"]["nodes"], serde_json::json!(["host-2"]), "{moved}");
    let launched_ms = moved["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "launching" && e["message"].as_str().unwrap_or("").starts_with("attempt 1"))
        .and_then(|e| e["time_ms"].as_u64())
        .expect("attempt 1 launched");
    eprintln!(
        "fenced {} ms after the cut; attempt 1 launched {} ms after the cut",
        gone_ms - cut_ms,
        launched_ms - cut_ms
    );
    // The 15 s lease (1 s heartbeats) ran out before the controller let the work move: at no
    // moment did two attempts of the job run.
    assert!(gone_ms <= launched_ms, "attempt 1 launched at {launched_ms}, attempt 0 gone only at {gone_ms}");
    assert!(gone_ms - cut_ms >= 13_000, "fenced after {} ms: before the lease ran out", gone_ms - cut_ms);
    let log = std::fs::read_to_string(dir.join("host-1.log")).unwrap();
    assert!(log.contains("out of reach for the 15.0 s lease: killing 2 ranks"), "{log}");
    cluster.net.heal(1, 0);
    cluster.cli_json(&["cancel", &id.to_string(), "--json"]);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
