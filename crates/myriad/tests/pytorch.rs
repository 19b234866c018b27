//! Unmodified PyTorch jobs get what Myriad's own trainer gets: hang detection with the Python
//! stack, steps in status and /metrics, loss, tokens/s and MFU through `myriad.report`, in-memory
//! checkpoints that survive a killed rank, a hung rank and a lost node bitwise, and live output.
//! The scripts are the package's examples (`python/examples`). These tests need PyTorch (CPU):
//! without it they skip, except in CI, where MYRIAD_REQUIRE_TORCH=1 makes them fail.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{cli, cli_json, controller, exe, get, job_state, scratch, submit, up, wait_for, Guard};

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether `import torch` works; a test without it skips, unless CI requires it.
fn torch() -> bool {
    let ok = Command::new(python()).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("MYRIAD_REQUIRE_TORCH").as_deref() != Ok("1"), "PyTorch is required here");
        eprintln!("skipping: PyTorch is not installed");
    }
    ok
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn example(name: &str) -> String {
    repo().join("python/examples").join(name).display().to_string()
}

fn step(dir: &Path, id: u64) -> u64 {
    job_state(dir, id)["job"]["step"].as_u64().unwrap_or(0)
}

fn wait_step(dir: &Path, id: u64, at_least: u64, within: Duration) {
    wait_for(&format!("job {id} at step {at_least}"), within, || (step(dir, id) >= at_least).then_some(()));
}

fn events_of(dir: &Path, id: u64, kind: &str) -> Vec<Value> {
    let s = job_state(dir, id);
    s["events"].as_array().unwrap().iter().filter(|e| e["kind"] == kind).cloned().collect()
}

fn wait_ended(dir: &Path, id: u64, within: Duration) -> Value {
    support::wait_job_state(dir, id, &["succeeded", "failed", "cancelled"], within)
}

#[test]
fn the_python_package_passes_its_own_tests() {
    if !torch() {
        return;
    }
    let out = Command::new(python())
        .args(["-m", "unittest", "discover", "-s", "python/tests", "-v"])
        .current_dir(repo())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python unittest failed:\n{text}");
    assert!(!text.contains("skipped"), "no Python test may skip where torch is installed:\n{text}");
}

#[test]
fn a_hung_rank_of_an_unmodified_ddp_script_is_found_with_its_python_stack_and_the_job_restarted() {
    if !torch() {
        return;
    }
    let dir = scratch("torch-hang");
    let _cluster = up(&dir, &["--nodes", "2", "--slots", "2"]);
    let script = example("ddp_plain.py");
    let args = ["--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "1", "--", &python(), &script];
    let id = submit(&dir, &[&args[..], &["--steps", "1000000", "--step-ms", "20"]].concat());
    // `logs --follow` prints rank 0's lines while the job runs.
    let mut follow = Command::new(exe())
        .args(["logs", &id.to_string(), "--rank", "0", "--follow"])
        .env("MYRIAD_CLUSTER", dir.join(".myriad"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut followed = BufReader::new(follow.stdout.take().unwrap());
    let _follow = Guard(Some(follow));
    let mut line = String::new();
    followed.read_line(&mut line).unwrap();
    assert!(line.starts_with("step 0 loss"), "followed {line:?}");

    // The script never imports myriad: the agent's sitecustomize reports every optimizer step.
    wait_step(&dir, id, 20, Duration::from_secs(90));
    let (addr, token) = controller(&dir);
    let metrics = get(&addr, "/metrics", &token);
    let reported: u64 = metrics
        .lines()
        .find(|l| l.starts_with(&format!("myriad_job_step{{job=\"{id}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no myriad_job_step for job {id}:\n{metrics}"));
    assert!(reported >= 20, "myriad_job_step {reported}");

    let hung_at = Instant::now();
    let out = cli(&dir, &["chaos", "hang-rank", "--job", &id.to_string(), "--rank", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hung = wait_for("the hang to be reported", Duration::from_secs(30), || {
        events_of(&dir, id, "rank_hung").into_iter().next()
    });
    let stack = hung["data"]["stack"].as_str().unwrap();
    assert!(stack.contains("Python stack (faulthandler)"), "{stack}");
    assert!(stack.contains("most recent call first") && stack.contains("ddp_plain.py"), "{stack}");
    let recovered = wait_for("the restarted attempt to step", Duration::from_secs(90), || {
        events_of(&dir, id, "recovered").into_iter().next()
    });
    let detection_s = recovered["data"]["detection_s"].as_f64().unwrap();
    // Steps take about 25 ms here: the bound is the 10 s floor of max(10 s, 5 × the median step).
    assert!(detection_s <= 10.0, "hang detected after {detection_s} s");
    eprintln!(
        "hang: detected after {detection_s:.2} s ({:.1} s after the SIGSTOP was requested); {}",
        hung_at.elapsed().as_secs_f64(),
        recovered["message"]
    );
    let job = job_state(&dir, id)["job"].clone();
    assert_eq!((job["attempt"].as_u64(), job["state"].as_str()), (Some(1), Some("running")), "{job:#}");
    assert!(cli(&dir, &["cancel", &id.to_string()]).status.success());
    wait_ended(&dir, id, Duration::from_secs(60));
    drop(_follow);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs ddp_checkpoint.py on 2 nodes × 2 ranks to the end; returns the job's final state.
fn checkpointed_run(dir: &Path, steps: u64, out: &Path, faults: &[(u64, &str, u32)]) -> Value {
    let script = example("ddp_checkpoint.py");
    let steps_arg = steps.to_string();
    let id = submit(
        dir,
        &[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "5",
            "--checkpoint-every",
            "1",
            "--env",
            "MYRIAD_PEAK_FLOPS=1e11",
            "--",
            &python(),
            &script,
            "--steps",
            &steps_arg,
            "--step-ms",
            "40",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    for &(at, action, rank) in faults {
        wait_step(dir, id, at, Duration::from_secs(120));
        let out = cli(dir, &["chaos", action, "--job", &id.to_string(), "--rank", &rank.to_string()]);
        assert!(out.status.success(), "{action}: {}", String::from_utf8_lossy(&out.stderr));
        // The next fault waits for the attempt this one starts.
        let before = job_state(dir, id)["job"]["attempt"].as_u64().unwrap();
        wait_for("the next attempt", Duration::from_secs(60), || {
            (job_state(dir, id)["job"]["attempt"].as_u64().unwrap() > before).then_some(())
        });
    }
    let done = wait_ended(dir, id, Duration::from_secs(240));
    assert_eq!(done["job"]["state"], "succeeded", "{done:#}");
    done
}

fn weights(out: &Path) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    v["weights_sha256"].as_str().unwrap().to_string()
}

#[test]
fn a_checkpointed_ddp_job_hit_by_a_kill_a_hang_and_a_node_loss_ends_bitwise_identical() {
    if !torch() {
        return;
    }
    let dir = scratch("torch-soak");
    // 2 nodes for the job and 1 spare.
    let _cluster = up(&dir, &["--nodes", "3", "--slots", "2"]);
    let steps = 130;
    let clean = checkpointed_run(&dir, steps, &dir.join("clean.json"), &[]);
    let faulted = checkpointed_run(
        &dir,
        steps,
        &dir.join("faulted.json"),
        &[(20, "kill-rank", 3), (50, "hang-rank", 1), (85, "kill-agent", 2)],
    );
    assert_eq!(weights(&dir.join("clean.json")), weights(&dir.join("faulted.json")), "final weights differ");
    // myriad.report's figures reach status.
    let job = &faulted["job"];
    assert_eq!(job["step"].as_u64(), Some(steps));
    let (loss, tps, mfu) = (job["loss"].as_f64().unwrap(), job["tokens_per_s"].as_f64(), job["mfu"].as_f64());
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(tps.is_some_and(|t| t > 0.0) && mfu.is_some_and(|m| m > 0.0 && m < 1.0), "{job:#}");
    let recoveries: Vec<Value> = faulted["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "recovered")
        .map(|e| e["data"].clone())
        .collect();
    assert_eq!(recoveries.len(), 3, "{recoveries:#?}");
    for (r, cause) in recoveries.iter().zip(["killed by signal 9", "hung", "was lost"]) {
        assert!(r["cause"].as_str().unwrap().contains(cause), "{r}");
        assert!(r["lost_steps"].as_u64().unwrap() <= 1, "more than a step lost: {r}");
        eprintln!(
            "recovery from {:?}: restore step {}, detection {:.2} s, restart {:.2} s, recomputation {:.2} s ({} steps)",
            r["cause"], r["restore_step"], r["detection_s"].as_f64().unwrap(), r["restart_s"].as_f64().unwrap(),
            r["recompute_s"].as_f64().unwrap(), r["lost_steps"]
        );
    }
    eprintln!(
        "ETTR: clean {:.3}, faulted {:.3}; faulted time {}",
        clean["job"]["ettr"].as_f64().unwrap(),
        job["ettr"].as_f64().unwrap(),
        job["time"]
    );
    let lost = cli_json(&dir, &["nodes", "--json"]);
    assert!(
        lost.as_array().unwrap().iter().any(|n| n["health"] == "lost"),
        "the killed agent's node is lost"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_prints_each_ranks_output_while_the_job_runs() {
    let dir = scratch("run-live");
    let gate = dir.join("gate");
    let script = dir.join("live.py");
    std::fs::write(
        &script,
        format!(
            "import os, sys, time\nprint('ready', flush=True)\ndeadline = time.time() + 120\n\
             while not os.path.exists({gate:?}) and time.time() < deadline:\n    time.sleep(0.05)\n\
             print('bye' if os.path.exists({gate:?}) else 'gave up', flush=True)\n",
            gate = gate.display().to_string()
        ),
    )
    .unwrap();
    let mut run = Command::new(exe())
        .args(["run", "--nnodes", "1", "--nproc-per-node", "2", script.to_str().unwrap()])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    let mut guard = Guard(Some(run));
    // Both ranks' first lines arrive while they wait for the gate: the job has not ended.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = lines.next().expect("run ended before its ranks spoke").unwrap();
        seen.push(line);
    }
    seen.sort();
    assert_eq!(seen, ["[rank0]: ready", "[rank1]: ready"]);
    std::fs::write(&gate, "").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(
        rest.contains(&"[rank0]: bye".to_string()) && rest.contains(&"[rank1]: bye".to_string()),
        "{rest:?}"
    );
    let status = guard.0.take().unwrap().wait().unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
