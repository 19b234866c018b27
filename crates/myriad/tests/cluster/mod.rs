//! The control plane end to end, with real processes: `myriad up`, a controller and agents started
//! by hand, jobs submitted through the CLI. Every wait polls a condition under a deadline; every
//! process is stopped when its guard drops, even when an assertion fails.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn up_runs_a_two_node_training_job_to_completion_with_logs_and_progress() {
    let dir = scratch("e2e");
    let mut cluster = up(&dir, &["--nodes", "3", "--slots", "2"]);
    let nodes = cli_json(&dir, &["nodes", "--json"]);
    assert_eq!(nodes.as_array().unwrap().len(), 3);
    let steps = "40";
    let id = submit(
        &dir,
        &[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--",
            exe(),
            "train",
            "--preset",
            "tiny",
            "--steps",
            steps,
            "--batch",
            "8",
            "--seq",
            "32",
            "--peak-gflops",
            "100",
        ],
    );
    let done = wait_job_state(&dir, id, &["succeeded", "failed", "cancelled"], Duration::from_secs(120));
    let job = &done["job"];
    assert_eq!(job["state"], "succeeded", "{done:#}");
    assert_eq!(job["nodes"].as_array().unwrap().len(), 2);
    // Status shows the progress rank 0 reported to its agent.
    assert_eq!(job["step"].as_u64(), Some(40), "{job:#}");
    let loss = job["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 5.6, "loss {loss}");
    // Every rank's logs can be fetched; rank 0 reports the run's end.
    for rank in 0..4 {
        for stream in [&[][..], &["--stderr"][..]] {
            let mut args = vec!["logs", "1", "--rank"];
            let r = rank.to_string();
            args.push(&r);
            args.extend_from_slice(stream);
            let out = cli(&dir, &args);
            assert!(
                out.status.success(),
                "logs of rank {rank} {stream:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let rank0 = cli(&dir, &["logs", "1", "--rank", "0", "--stderr"]);
    let text = String::from_utf8_lossy(&rank0.stdout);
    assert!(text.contains("done: step 40"), "rank 0's stderr: {text}");
    assert!(text.contains("data parallel: 4 ranks"), "rank 0's stderr: {text}");
    let table = String::from_utf8_lossy(&cli(&dir, &["status"]).stdout).into_owned();
    assert!(table.contains("succeeded") && table.contains("40"), "{table}");
    // A rank that does not exist, and a job that does not exist, are named.
    let missing = cli(&dir, &["logs", "1", "--rank", "9"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("rank 9 does not exist"));
    // Over the wire too, the controller and each agent refuse a request without the token.
    let url = std::fs::read_to_string(dir.join(".myriad/controller/controller.url")).unwrap();
    let controller_addr = url.trim().trim_start_matches("http://").to_string();
    assert_eq!(raw_get_status(&controller_addr, "/v1/jobs"), 401);
    for n in cli_json(&dir, &["nodes", "--json"]).as_array().unwrap() {
        let agent_addr = format!("{}:{}", n["addr"].as_str().unwrap(), n["http_port"]);
        assert_eq!(raw_get_status(&agent_addr, "/v1/logs/1/0/0/stdout"), 401, "agent {}", n["name"]);
    }
    let status = cluster.terminate(Duration::from_secs(30)).expect("`myriad up` stops on SIGTERM");
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Status code of a plain GET without credentials, over a real socket.
fn raw_get_status(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn every_rank_gets_torchruns_environment_and_a_restart_gets_a_new_port() {
    let dir = scratch("env");
    let _cluster = up(&dir, &["--nodes", "2", "--slots", "2"]);
    let dump = dir.join("dump");
    std::fs::create_dir_all(&dump).unwrap();
    // Every rank dumps its environment. In the first attempt the ranks wait until all four have,
    // then fail; the second attempt succeeds.
    // Written under a hidden name and renamed: a rank stopped mid-write leaves no partial dump.
    let script = "env > \"$DUMP/.env.$RANK\" && mv \"$DUMP/.env.$RANK\" \"$DUMP/env.$RANK.$TORCHELASTIC_RESTART_COUNT\"; \
        [ \"$TORCHELASTIC_RESTART_COUNT\" -ge 1 ] && exit 0; \
        while [ \"$(ls \"$DUMP\" | grep -c '[.]0$')\" -lt 4 ]; do sleep 0.05; done; exit 1";
    let dump_env = format!("DUMP={}", dump.display());
    let id = submit(
        &dir,
        &[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "2",
            "--env",
            &dump_env,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let done = wait_job_state(&dir, id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(done["job"]["state"], "succeeded", "{done:#}");
    assert_eq!(done["job"]["restarts"], 1);
    let nodes = cli_json(&dir, &["nodes", "--json"]);
    let addr = nodes[0]["addr"].as_str().unwrap().to_string();
    let mut ports = Vec::new();
    let mut attempt_secrets = Vec::new();
    for attempt in 0..2 {
        let mut port = None;
        let mut secrets: Option<String> = None;
        for rank in 0..4u32 {
            let env = read_env(&dump.join(format!("env.{rank}.{attempt}")));
            let (group, local) = (rank / 2, rank % 2);
            let expect = [
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", local.to_string()),
                ("WORLD_SIZE", "4".into()),
                ("LOCAL_WORLD_SIZE", "2".into()),
                ("GROUP_RANK", group.to_string()),
                ("GROUP_WORLD_SIZE", "2".into()),
                ("ROLE_RANK", rank.to_string()),
                ("ROLE_NAME", "default".into()),
                ("ROLE_WORLD_SIZE", "4".into()),
                ("MASTER_ADDR", addr.clone()),
                ("TORCHELASTIC_RESTART_COUNT", attempt.to_string()),
                ("TORCHELASTIC_MAX_RESTARTS", "2".into()),
                ("TORCHELASTIC_RUN_ID", format!("myriad-{id}")),
                ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
                ("OMP_NUM_THREADS", "1".into()),
                ("MYRIAD_JOB_ID", id.to_string()),
                ("MYRIAD_ATTEMPT", attempt.to_string()),
            ];
            for (k, v) in expect {
                assert_eq!(env.get(k), Some(&v), "{k} of rank {rank}, attempt {attempt}");
            }
            let p: u16 = env["MASTER_PORT"].parse().expect("MASTER_PORT is a port");
            assert!(p > 0);
            assert_eq!(*port.get_or_insert(p), p, "every rank of an attempt shares MASTER_PORT");
            let socket = Path::new(&env["MYRIAD_AGENT_SOCKET"]);
            assert!(socket.is_absolute() && socket.ends_with("agent.sock"), "{socket:?}");
            let ckpt = Path::new(&env["MYRIAD_CHECKPOINT_DIR"]);
            assert!(ckpt.is_dir() && ckpt.ends_with(format!("job-{id}")), "{ckpt:?}");
            assert_eq!(env["DUMP"], dump.display().to_string(), "the job's own variables arrive too");
            let secret = &env["MYRIAD_COMM_SECRET"];
            assert_eq!(secret.len(), 64, "{secret}");
            assert_eq!(
                secrets.get_or_insert_with(|| secret.clone()).as_str(),
                secret,
                "one secret per attempt"
            );
            assert!(!env.contains_key("MYRIAD_TOKEN"), "a rank holds no cluster token");
        }
        ports.push(port.unwrap());
        attempt_secrets.push(secrets.take().unwrap());
    }
    assert_ne!(ports[0], ports[1], "a restart never meets the previous attempt's store");
    assert_ne!(attempt_secrets[0], attempt_secrets[1], "nor its secret");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn start_controller(state: &Path, listen: &str) -> Guard {
    let child = Command::new(exe())
        .args(["controller", "--listen", listen, "--heartbeat-ms", "200", "--state"])
        .arg(state)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Guard(Some(child))
}

fn events(dir: &Path, id: u64) -> Vec<Value> {
    job_state(dir, id)["events"].as_array().unwrap().clone()
}

#[test]
fn a_controller_killed_mid_job_restarts_on_its_state_and_the_job_completes_with_every_event() {
    let dir = scratch("restart");
    let state = dir.join(".myriad/controller");
    let url_file = state.join("controller.url");
    let mut controller = start_controller(&state, "127.0.0.1:0");
    let url = wait_for("controller.url", Duration::from_secs(20), || std::fs::read_to_string(&url_file).ok());
    let listen = url.trim().trim_start_matches("http://").to_string();
    let token = std::fs::read_to_string(state.join("token")).unwrap();
    let _agents: Vec<Guard> = (0..2)
        .map(|i| {
            let name = format!("n{i}");
            Guard(Some(
                Command::new(exe())
                    .args([
                        "agent",
                        "--controller",
                        url.trim(),
                        "--name",
                        &name,
                        "--slots",
                        "2",
                        "--work-dir",
                    ])
                    .arg(dir.join("agents").join(&name))
                    .env("MYRIAD_TOKEN", &token)
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    wait_for("two agents", Duration::from_secs(20), || {
        (cli_json(&dir, &["nodes", "--json"]).as_array().unwrap().len() == 2).then_some(())
    });
    // Ranks wait for a file, so the job is running for as long as the test needs.
    let go = dir.join("go");
    let script =
        format!("while [ ! -e {} ]; do sleep 0.05; done; touch {}/done.$RANK", go.display(), dir.display());
    let id = submit(&dir, &["--nnodes", "2", "--nproc-per-node", "2", "--", "sh", "-c", &script]);
    wait_job_state(&dir, id, &["running"], Duration::from_secs(30));
    let before = events(&dir, id);

    controller.kill9();
    // While the controller is down the ranks finish: the agents must report it afterwards.
    std::fs::write(&go, "").unwrap();
    wait_for("every rank to finish", Duration::from_secs(20), || {
        (0..4).all(|r| dir.join(format!("done.{r}")).exists()).then_some(())
    });
    let _controller = start_controller(&state, &listen);
    let after_restart = wait_for("the restarted controller", Duration::from_secs(20), || {
        let out = cli(&dir, &["status", &id.to_string(), "--json"]);
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    let state_now = after_restart["job"]["state"].as_str().unwrap().to_string();
    assert!(
        ["running", "stopping", "succeeded"].contains(&state_now.as_str()),
        "job after restart: {after_restart:#}"
    );
    let done = wait_job_state(&dir, id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(done["job"]["state"], "succeeded", "{done:#}");
    let all = events(&dir, id);
    assert_eq!(&all[..before.len()], &before[..], "events recorded before the kill are all still there");
    let exits = all.iter().filter(|e| e["kind"] == "rank_exited").count();
    assert_eq!(exits, 4, "every rank's exit was recorded: {all:#?}");
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "event sequence numbers only grow: {seqs:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_is_a_drop_in_for_torchrun_and_reports_failure_in_its_exit_status() {
    let dir = scratch("run");
    let out = Command::new(exe())
        .args([
            "run",
            "--nnodes=2",
            "--nproc_per_node",
            "2",
            "--no-python",
            "sh",
            "-c",
            "echo rank $RANK of $WORLD_SIZE",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for r in 0..4 {
        assert!(stdout.contains(&format!("[rank{r}]: rank {r} of 4")), "{stdout}");
    }
    let out =
        Command::new(exe()).args(["run", "--", "sh", "-c", "exit 3"]).current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with code 3"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_job_file_is_refused_naming_the_field() {
    let dir = scratch("badjob");
    let _cluster = up(&dir, &["--nodes", "1", "--slots", "1"]);
    // Malformed specs are 400s; one larger than the cluster is well-formed but a 409 conflict.
    for (text, field, status) in [
        ("name = \"x\"\nargv = [\"true\"]\nranks_per_node = 0\n", "ranks_per_node", "HTTP 400"),
        ("name = \"x\"\nargv = [\"true\"]\nnodes = 5\n", "nodes", "HTTP 409"),
        ("name = \"x\"\nargv = [\"true\"]\ncheckpoint_dir = \"../up\"\n", "checkpoint_dir", "HTTP 400"),
        ("name = \"x\"\nargv = [\"true\"]\ncolour = 1\n", "colour", "HTTP 400"),
        ("name = \"x\"\nargv = [\"true\"\n", "argv", "HTTP 400"),
    ] {
        let file = dir.join("job.toml");
        std::fs::write(&file, text).unwrap();
        let out = cli(&dir, &["submit", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(stderr.contains(status) && stderr.contains(field), "{text}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `myriad demo` with the given extra arguments; returns its JSON summary.
fn demo(dir: &Path, extra: &[&str]) -> Value {
    demo_with(dir, extra, true)
}

/// [`demo`]; without `live`, ranks keep no live state (MYRIAD_LIVE_STATE=0) and every restart
/// goes through the checkpoint directories: fetched, verified, a corrupt one refused.
fn demo_with(dir: &Path, extra: &[&str], live: bool) -> Value {
    let out = Command::new(exe())
        .args(["demo", "--json", "--preset", "tiny", "--nodes", "2", "--spares", "1", "--steps", "160"])
        .args(["--batch", "16", "--seq", "128", "--checkpoint-every", "1", "--heartbeat-ms", "300"])
        .args(extra)
        .env("MYRIAD_LIVE_STATE", if live { "1" } else { "0" })
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo {extra:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("demo printed no JSON ({e}): {stderr}"))
}

/// SHA-256 of every file of a checkpoint, from its manifest.
fn checkpoint_hashes(root: &Path) -> Vec<(String, String)> {
    let step = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("step_"));
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(step.expect("a final checkpoint").path().join("manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["manifest"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string()))
        .collect()
}

fn event_time(events: &[Value], kind: &str, contains: &str) -> Option<u64> {
    events
        .iter()
        .find(|e| e["kind"] == kind && e["message"].as_str().unwrap_or("").contains(contains))
        .and_then(|e| e["time_ms"].as_u64())
}

#[test]
fn a_job_hit_by_every_kind_of_fault_ends_bitwise_identical_to_one_that_never_failed() {
    let dir = scratch("soak");
    let clean_ckpt = dir.join("clean");
    let faulted_ckpt = dir.join("faulted");
    let clean = demo(&dir, &["--no-faults", "--final-checkpoint", clean_ckpt.to_str().unwrap()]);
    // The slow-down comes last: it changes no numbers, only how long steps take.
    let faults =
        "kill-rank@25,hang-rank@50,corrupt-checkpoint@75,kill-agent@90,kill-controller@115,slow-rank@130";
    let faulted = demo(&dir, &["--faults", faults, "--final-checkpoint", faulted_ckpt.to_str().unwrap()]);
    // The same faults, restarting from checkpoint directories instead of live state.
    let dirs_ckpt = dir.join("dirs");
    let from_dirs =
        demo_with(&dir, &["--faults", faults, "--final-checkpoint", dirs_ckpt.to_str().unwrap()], false);

    assert_eq!(clean["faults"], 0);
    for run in [&faulted, &from_dirs] {
        assert!(run["faults"].as_u64().unwrap() >= 3, "{run:#}");
        assert_eq!(run["steps"], 160);
    }
    // The same weights and optimizer state, bit for bit, and the same loss at every step.
    assert_eq!(checkpoint_hashes(&clean_ckpt), checkpoint_hashes(&faulted_ckpt));
    assert_eq!(checkpoint_hashes(&clean_ckpt), checkpoint_hashes(&dirs_ckpt));
    let a = clean["losses"].as_array().unwrap();
    assert_eq!(a.len(), 160);
    assert_eq!(a, faulted["losses"].as_array().unwrap(), "committed losses differ");
    assert_eq!(
        a,
        from_dirs["losses"].as_array().unwrap(),
        "committed losses differ (checkpoint directories)"
    );
    // With live state a fault costs at most the step in flight: no committed step is redone.
    for r in faulted["recoveries"].as_array().unwrap() {
        assert!(r["lost_steps"].as_u64().unwrap() <= 1, "more than a step lost: {r}");
    }

    // Detection bounds, from the recovery records and the event timeline.
    let recoveries = faulted["recoveries"].as_array().unwrap();
    let detection = |cause: &str| {
        recoveries
            .iter()
            .find(|r| r["cause"].as_str().unwrap().contains(cause))
            .unwrap_or_else(|| panic!("no recovery from {cause:?}: {recoveries:#?}"))["detection_s"]
            .as_f64()
            .unwrap()
    };
    assert!(detection("killed by signal 9") <= 1.0, "crash detection");
    // Steps are far shorter than a second here, so the bound is the 5 s floor.
    assert!(detection("hung") <= 5.0, "hang detection");
    let events = faulted["events"].as_array().unwrap();
    // The slowed rank is named, on the node it runs on by then, once.
    let slowed =
        events.iter().find(|e| e["kind"] == "chaos" && e["message"].as_str().unwrap().contains("SlowRank"));
    let slowed = slowed.expect("slow-rank injected");
    let stragglers: Vec<&Value> = events.iter().filter(|e| e["kind"] == "straggler").collect();
    assert_eq!(stragglers.len(), 1, "one straggler report: {events:#?}");
    assert_eq!(stragglers[0]["node"], slowed["node"], "{:#}", stragglers[0]);
    assert_eq!(stragglers[0]["data"]["rank"], 1, "the demo slows rank 1: {:#}", stragglers[0]);
    eprintln!(
        "straggler reported {} ms after the slow-down began: {}",
        stragglers[0]["time_ms"].as_u64().unwrap() - slowed["time_ms"].as_u64().unwrap(),
        stragglers[0]["message"]
    );
    let killed = event_time(events, "chaos", "KillAgent").expect("agent killed");
    let lost = event_time(events, "node_lost", "").expect("node loss detected");
    // The node died after its last heartbeat: the silence at detection bounds the delay.
    let message = events.iter().find(|e| e["kind"] == "node_lost").unwrap()["message"].as_str().unwrap();
    let silence_ms: u64 =
        message.split("no heartbeat for ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    eprintln!(
        "node loss: {silence_ms} ms of silence at detection, {} ms after the kill was requested",
        lost - killed
    );
    assert!(silence_ms <= 3 * 300, "node loss detected after {silence_ms} ms without heartbeats");
    assert!(lost - killed <= 3 * 300);
    for r in recoveries {
        for figure in ["detection_s", "restart_s", "recompute_s"] {
            assert!(r[figure].as_f64().is_some(), "recovery without {figure}: {r}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_jobs_sharing_a_checkpoint_directory_never_restore_each_others_step() {
    let dir = scratch("shared-checkpoints");
    let _cluster = up(&dir, &["--nodes", "1", "--slots", "1"]);
    // Both jobs persist every checkpoint (every 5 steps) into the same directory, and restart
    // from checkpoint directories only.
    let job = |steps: &str, restarts: &str| {
        let args = [
            "--max-restarts",
            restarts,
            "--checkpoint-dir",
            "shared",
            "--checkpoint-every",
            "5",
            "--persist-every",
            "1",
            "--env",
            "MYRIAD_LIVE_STATE=0",
            "--",
            exe(),
            "train",
            "--preset",
            "tiny",
            "--steps",
            steps,
            "--batch",
            "4",
            "--seq",
            "32",
            "--peak-gflops",
            "100",
        ];
        submit(&dir, &args)
    };
    let first = job("60", "0");
    let done = wait_job_state(&dir, first, &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(done["job"]["state"], "succeeded", "{done:#}");
    // The agent persists job 1's last checkpoint after its ranks are gone.
    let shared = dir.join(".myriad/checkpoints/shared");
    wait_for("job 1's step 60 to be persisted", Duration::from_secs(30), || {
        shared.join("step_00000060/manifest.json").is_file().then_some(())
    });
    // The second job is killed early: job 1's step 60 is the newest in the directory, its own
    // newest is far older.
    let second = job("1000000", "1");
    wait_for("job 2 to pass step 12", Duration::from_secs(60), || {
        (job_state(&dir, second)["job"]["step"].as_u64()? >= 12).then_some(())
    });
    let killed = cli(&dir, &["chaos", "kill-rank", "--job", &second.to_string()]);
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    let killed_at = job_state(&dir, second)["job"]["step"].as_u64().unwrap();
    let recovered = wait_for("job 2 to recover", Duration::from_secs(60), || {
        events(&dir, second).into_iter().find(|e| e["kind"] == "recovered")
    });
    let restored = recovered["data"]["restore_step"].as_u64().unwrap();
    assert!(restored <= killed_at + 5, "job 2 restored step {restored} (it was at {killed_at}): {recovered}");
    assert!(shared.join("step_00000060/manifest.json").is_file(), "job 1's step 60 is still there");
    assert!(cli(&dir, &["cancel", &second.to_string()]).status.success());
    wait_job_state(&dir, second, &["cancelled", "failed", "succeeded"], Duration::from_secs(60));
    std::fs::remove_dir_all(&dir).unwrap();
}
