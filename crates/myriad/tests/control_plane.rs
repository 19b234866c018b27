//! The control plane at reduced scale: `myriad bench control-plane` runs the real controller as
//! a child process under 100 simulated agents speaking the real protocol. Asserts behaviour, not
//! speed: every heartbeat answered, every node of the job holding its rendezvous table, a silent
//! node found lost only after its timeout and the job relaunched with the spare in its place.
//! A test binary of its own, so it never shares the machine with the training tests in `cli.rs`.

mod support;

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{controller, get, scratch, up};

/// Runs the bench and returns its JSON; kills it if it outlives `within`.
fn bench(args: &[&str], within: Duration) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["bench", "control-plane", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("myriad runs");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench control-plane {args:?} ran past {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "bench control-plane {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn a_hundred_simulated_nodes_start_a_job_and_survive_a_silent_node() {
    let r = bench(
        &["--nodes", "100", "--slots", "8", "--spares", "1", "--steady-s", "3"],
        Duration::from_secs(180),
    );
    assert_eq!(r["ranks"], 800);

    // Steady: every simulated node heartbeats about once a second and none is refused.
    let steady = &r["steady"];
    assert_eq!(steady["heartbeat_errors"], 0, "{steady}");
    let per_s = steady["heartbeats_per_s"].as_f64().unwrap();
    assert!(per_s > 50.0, "100 nodes at 1 Hz, yet {per_s} heartbeats/s were answered");
    for api in steady["api"].as_array().unwrap() {
        assert!(api["calls"].as_u64().unwrap() > 0, "{api}");
    }

    // Start: the bench returns only once all 100 nodes hold the table; it lists every host.
    let start = &r["job_start"];
    assert!(start["submit_to_peer_tables_s"].as_f64().unwrap() > 0.0, "{start}");
    assert!(start["peer_table_bytes"].as_u64().unwrap() > 100 * "127.0.0.1".len() as u64, "{start}");

    // Loss: not declared before the controller's timeout (3 intervals less two 100 ms ticks),
    // and the new attempt runs on the spare, not on the silent node.
    let silent = &r["silent_node"];
    let intervals = silent["detect_heartbeat_intervals"].as_f64().unwrap();
    assert!(intervals >= 2.5, "node declared lost after only {intervals} heartbeat intervals: {silent}");
    assert!(silent["spare_used"].as_str().unwrap().starts_with("spare-"), "{silent}");
    assert_ne!(silent["spare_used"], silent["node"]);

    let memory = &r["controller_memory"];
    assert!(memory["rss_job_mb"].as_f64().unwrap() > 0.0, "{memory}");
}

#[test]
fn bad_bench_arguments_name_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["bench", "control-plane", "--spares", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--spares"), "{stderr}");
}

/// `promtool check metrics` on `text`; None when promtool is not installed (and not required).
fn promtool(text: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("MYRIAD_REQUIRE_PROMTOOL").is_none(),
                "promtool is required (MYRIAD_REQUIRE_PROMTOOL) but cannot run: {e}"
            );
            eprintln!("promtool not installed: skipping the check (apt-get install prometheus)");
            return None;
        }
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success() && said.trim().is_empty(), said))
}

#[test]
fn the_controllers_and_an_agents_metrics_pass_promtool() {
    let dir = scratch("metrics");
    let cluster = dir.join(".myriad");
    // node-0 describes one GPU (running hot) with the agent's fake backend: its GPU series too.
    let gpus = dir.join("gpus");
    std::fs::create_dir_all(&gpus).unwrap();
    let gpu = r#"{"uuid":"GPU-0","bus_id":"00000000:18:00.0","model":"NVIDIA H200","memory_mib":143771,
        "utilization_pct":97.0,"memory_used_mib":70000,"power_w":650.0,"temperature_c":81.0,"throttle":["thermal"]}"#;
    std::fs::write(gpus.join("node-0.json"), format!(r#"{{"driver":"550.54.15","gpus":[{gpu}]}}"#)).unwrap();
    let _up = up(&dir, &["--nodes", "1", "--fake-gpus", gpus.to_str().unwrap()]);
    let (controller, token) = controller(&dir);

    let exe = env!("CARGO_BIN_EXE_myriad");
    let train = [exe, "train", "--preset", "tiny", "--peak-gflops", "100", "--batch", "2", "--seq", "16"];
    let submitted = Command::new(exe)
        .arg("submit")
        .args(["--nnodes", "1", "--nproc-per-node", "1", "--"])
        .args(train)
        .args(["--steps", "100000"])
        .env("MYRIAD_CLUSTER", &cluster)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));

    // The job's series appear once rank 0 has reported steps.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = get(&controller, "/metrics", &token);
        if text.contains("myriad_job_step{") && text.contains("myriad_job_loss{") {
            break text;
        }
        assert!(Instant::now() < deadline, "no job series in the controller's metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let nodes: Value = serde_json::from_str(&get(&controller, "/v1/nodes", &token)).unwrap();
    let agent = format!("{}:{}", nodes[0]["addr"].as_str().unwrap(), nodes[0]["http_port"]);
    let agent_text = get(&agent, "/metrics", &token);
    assert!(agent_text.contains("myriad_agent_ranks{state=\"running\"} 1"), "{agent_text}");
    assert!(agent_text.contains("myriad_agent_heartbeat_duration_seconds_count"), "{agent_text}");
    for series in [
        "utilization_ratio",
        "memory_used_bytes",
        "power_watts",
        "temperature_celsius",
        "healthy",
        "warnings",
    ] {
        assert!(
            agent_text.contains(&format!("myriad_agent_gpu_{series}{{gpu=\"0\"")),
            "gpu_{series}: {agent_text}"
        );
    }
    // Series that appear only once something happened (a fault, a recovery, a checkpoint copy, a
    // hang), from the same code the servers run, fed what those events carry.
    let observed = control::metrics::Metrics::default();
    let event = |kind: &str, data: Value| proto::api::Event {
        seq: 1,
        time_ms: 0,
        job_id: Some(1),
        node: None,
        kind: kind.into(),
        message: String::new(),
        data: Some(data),
    };
    observed.observe_events(&[
        event("attempt_failed", serde_json::json!({"cause": "node_lost"})),
        event("recovered", serde_json::json!({"detection_s": 2.9, "restart_s": 1.2, "recompute_s": 0.4})),
    ]);
    let happened = observed.render(&myriad_core::Core::new(Default::default()), 0);
    let agent_observed = agent::metrics::AgentMetrics::default();
    agent_observed.checkpoint_copied("buddy", 0.2, 1 << 20);
    agent_observed.hang_killed();
    let agent_happened = agent_observed.render(0, 1, &agent::gpu::Monitor::default());
    let exposed = [&text, &agent_text, &happened, &agent_happened];

    // Every series the Grafana dashboard queries is one that Myriad exposes.
    let dashboard = include_str!("../../../docs/grafana/myriad.json");
    let mut names: Vec<&str> = dashboard
        .match_indices("myriad_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        let typed = format!("# TYPE {family} ");
        assert!(
            exposed.iter().any(|t| t.contains(&typed)),
            "the dashboard queries {name}, which no /metrics declares"
        );
    }
    for (who, text) in [
        ("controller", &text),
        ("agent", &agent_text),
        ("controller (after a fault)", &happened),
        ("agent (after copies and a hang)", &agent_happened),
    ] {
        if let Some((ok, said)) = promtool(text) {
            assert!(ok, "promtool check metrics on the {who}'s /metrics:\n{said}\n---\n{text}");
        }
    }
    drop(_up);
    let _ = std::fs::remove_dir_all(&dir);
}
