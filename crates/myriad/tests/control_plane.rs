//! The control plane at reduced scale: `myriad bench control-plane` runs the real controller as
//! a child process under 100 simulated agents speaking the real protocol. Asserts behaviour, not
//! speed: every heartbeat answered, every node of the job holding its rendezvous table, a silent
//! node found lost only after its timeout and the job relaunched with the spare in its place.
//! A test binary of its own, so it never shares the machine with the training tests in `cli.rs`.

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
