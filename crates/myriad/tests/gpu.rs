//! GPU nodes on a local cluster whose agents describe their GPUs with fake files (the fake backend
//! of `agent::gpu`, re-read at every check, so a test injects a fault by rewriting a file):
//! discovery sets the slots, each rank gets its own GPU, an XID 79 fails the node's ranks within
//! 5 s and the spare takes the node's place, a throttled GPU is a warning event and a metric, and a
//! node without a GPU backend runs on `--slots`. A test binary of its own: its clusters never share
//! the machine with the training tests in `cli.rs`.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{cli_json, controller, get, scratch, submit, up, wait_for, wait_job_state};

/// One fake GPU of node `node`; `health` adds or overrides sample fields (xids, throttle, ...).
fn gpu(node: &str, i: usize, health: Value) -> Value {
    let mut g = json!({
        "uuid": format!("GPU-{node}-{i}"), "bus_id": format!("00000000:{:02X}:00.0", 0x18 + i),
        "model": "NVIDIA H200", "memory_mib": 143_771, "utilization_pct": 97.0,
        "memory_used_mib": 70_000, "power_w": 650.0, "temperature_c": 61.0,
    });
    for (k, v) in health.as_object().unwrap() {
        g[k] = v.clone();
    }
    g
}

/// Writes node `node`'s fake GPU file under `dir/gpus` (atomically: an agent may be reading it).
fn fake_gpus(dir: &Path, node: &str, gpus: Vec<Value>) {
    let gpus_dir = dir.join("gpus");
    std::fs::create_dir_all(&gpus_dir).unwrap();
    let tmp = gpus_dir.join(format!(".{node}.json"));
    std::fs::write(&tmp, json!({"driver": "550.54.15", "gpus": gpus}).to_string()).unwrap();
    std::fs::rename(&tmp, gpus_dir.join(format!("{node}.json"))).unwrap();
}

fn healthy(node: &str, n: usize) -> Vec<Value> {
    (0..n).map(|i| gpu(node, i, json!({}))).collect()
}

fn nodes(dir: &Path) -> Vec<Value> {
    cli_json(dir, &["nodes", "--json"]).as_array().unwrap().clone()
}

fn node<'a>(nodes: &'a [Value], name: &str) -> &'a Value {
    nodes.iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
}

fn events(dir: &Path) -> Vec<Value> {
    let (addr, token) = controller(dir);
    serde_json::from_str::<Value>(&get(&addr, "/v1/events", &token)).unwrap().as_array().unwrap().clone()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn an_agent_discovers_its_gpus_binds_one_per_rank_and_a_node_without_gpus_runs_on_its_slots() {
    let dir = scratch("gpu-bind");
    fake_gpus(&dir, "node-0", healthy("node-0", 4));
    // node-1 has no fake file and no NVML here: it runs on `--slots` (3).
    let gpus = dir.join("gpus");
    let _up = up(&dir, &["--nodes", "2", "--slots", "3", "--fake-gpus", gpus.to_str().unwrap()]);
    let all = nodes(&dir);
    let (n0, n1) = (node(&all, "node-0"), node(&all, "node-1"));
    assert_eq!(n0["slots"], 4, "discovery sets the slots: {n0}");
    assert_eq!(n0["gpus"].as_array().unwrap().len(), 4);
    assert_eq!(
        (n0["gpus"][2]["model"].as_str(), n0["gpus"][2]["uuid"].as_str()),
        (Some("NVIDIA H200"), Some("GPU-node-0-2"))
    );
    assert_eq!((n1["slots"].as_u64(), n1["gpus"].as_array().unwrap().len()), (Some(3), 0));
    let log = std::fs::read_to_string(dir.join(".myriad/logs/node-1.log")).unwrap();
    assert!(log.contains("no GPUs managed") && log.contains("running 3 slots"), "{log}");

    // Four ranks on node-0 (the only node with four slots), each writing what it was given.
    let out = dir.join("bindings");
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        "echo \"$MYRIAD_GPU_INDEX $MYRIAD_GPU_UUID $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER \
         $TORCH_NCCL_ASYNC_ERROR_HANDLING ${{MYRIAD_TOKEN:-none}}\" > {}/rank-$LOCAL_RANK",
        out.display()
    );
    let id = submit(&dir, &["--nnodes", "1", "--nproc-per-node", "4", "--", "sh", "-c", &script]);
    wait_job_state(&dir, id, &["succeeded"], Duration::from_secs(30));
    let mut uuids = BTreeSet::new();
    for local in 0..4 {
        let line = std::fs::read_to_string(out.join(format!("rank-{local}"))).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            f,
            [&local.to_string(), &format!("GPU-node-0-{local}"), "0,1,2,3", "PCI_BUS_ID", "1", "none"]
        );
        uuids.insert(f[1].to_string());
    }
    assert_eq!(uuids.len(), 4, "every rank has a GPU of its own");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_xid_79_fails_the_nodes_ranks_within_5_s_swaps_in_a_spare_and_keeps_the_node_out() {
    let dir = scratch("gpu-xid");
    for n in ["node-0", "node-1", "spare-0"] {
        fake_gpus(&dir, n, healthy(n, 2));
    }
    let gpus = dir.join("gpus");
    let _up = up(&dir, &["--nodes", "2", "--spares", "1", "--fake-gpus", gpus.to_str().unwrap()]);
    let id = submit(
        &dir,
        &[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--spares",
            "1",
            "--max-restarts",
            "2",
            "--",
            "sleep",
            "600",
        ],
    );
    wait_job_state(&dir, id, &["running"], Duration::from_secs(30));

    // A warning first: node-0's GPU 0 runs hot. An event and a metric; nothing stops.
    fake_gpus(
        &dir,
        "node-0",
        vec![gpu("node-0", 0, json!({"throttle": ["thermal"]})), gpu("node-0", 1, json!({}))],
    );
    wait_for("a gpu_warning event", Duration::from_secs(10), || {
        events(&dir).into_iter().find(|e| e["kind"] == "gpu_warning" && e["node"] == "node-0")
    });
    let all = nodes(&dir);
    let n0 = node(&all, "node-0");
    let (_, token) = controller(&dir);
    let agent_metrics =
        get(&format!("{}:{}", n0["addr"].as_str().unwrap(), n0["http_port"]), "/metrics", &token);
    assert!(
        agent_metrics
            .contains(r#"myriad_agent_gpu_warnings{gpu="0",uuid="GPU-node-0-0",model="NVIDIA H200"} 1"#)
            && agent_metrics
                .contains(r#"myriad_agent_gpu_healthy{gpu="0",uuid="GPU-node-0-0",model="NVIDIA H200"} 1"#)
            && agent_metrics.contains(
                r#"myriad_agent_gpu_power_watts{gpu="1",uuid="GPU-node-0-1",model="NVIDIA H200"} 650"#
            ),
        "{agent_metrics}"
    );
    assert_eq!(cli_json(&dir, &["status", &id.to_string(), "--json"])["job"]["attempt"], 0);

    // XID 79 on node-1's GPU 1.
    let injected_ms = unix_ms();
    let started = Instant::now();
    fake_gpus(&dir, "node-1", vec![gpu("node-1", 0, json!({})), gpu("node-1", 1, json!({"xids": [79]}))]);
    let failed = wait_for("the attempt to fail", Duration::from_secs(10), || {
        events(&dir).into_iter().find(|e| e["kind"] == "attempt_failed" && e["job_id"] == id)
    });
    let detect_ms = failed["time_ms"].as_u64().unwrap().saturating_sub(injected_ms);
    assert!(detect_ms <= 5_000, "attempt failed {detect_ms} ms after the XID");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains("GPU 1 (GPU-node-1-1) on node node-1: XID 79 (GPU has fallen off the bus)"),
        "{message}"
    );
    let gpu_failed =
        events(&dir).into_iter().find(|e| e["kind"] == "gpu_failed").expect("a gpu_failed event");
    assert_eq!(gpu_failed["node"], "node-1");
    eprintln!("XID 79 to a failed attempt: {detect_ms} ms (test clock {:?})", started.elapsed());

    // The next attempt runs on node-0 and the spare, in node-1's place.
    let view = wait_for("the job to run again", Duration::from_secs(30), || {
        let s = cli_json(&dir, &["status", &id.to_string(), "--json"]);
        (s["job"]["attempt"] == 1 && s["job"]["state"] == "running").then_some(s)
    });
    assert_eq!(view["job"]["nodes"], json!(["node-0", "spare-0"]));
    assert!(view["job"]["reason"].as_str().unwrap().contains("XID 79"), "{view}");
    // And node-1 stays out: failed, holding nothing, a few checks later still.
    std::thread::sleep(Duration::from_secs(3));
    let all = nodes(&dir);
    let n1 = node(&all, "node-1");
    assert_eq!(n1["health"], "gpu_failed");
    assert_eq!(n1["jobs"], json!([]));
    assert!(n1["gpu_findings"][0]["fatal"].as_bool().unwrap(), "{n1}");
    let _ = std::fs::remove_dir_all(&dir);
}
