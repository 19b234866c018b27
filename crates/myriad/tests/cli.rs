//! The `myriad` binary as a user meets it: bad input gets one clear line and a non-zero exit,
//! never a panic; good input trains, prints JSON per step, checkpoints and resumes.

mod cluster;
mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

fn myriad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(args)
        // A fixed peak keeps these runs from spending time measuring the machine.
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("myriad runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("myriad-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `args`, expects failure whose stderr contains every one of `needles` and no panic.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = myriad(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: stderr lacks {n:?}: {stderr}");
    }
}

const FAST: &[&str] = &["train", "--preset", "tiny", "--peak-gflops", "100", "--batch", "2", "--seq", "16"];

fn with(extra: &[&str]) -> Vec<String> {
    FAST.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_data_file_is_named() {
    fails_with(&strs(&with(&["--data", "/no/such/corpus.txt"])), &["corpus.txt", "does not exist"]);
}

#[test]
fn empty_data_file_is_named() {
    let dir = scratch("empty");
    let path = dir.join("empty.txt");
    std::fs::write(&path, "").unwrap();
    fails_with(&strs(&with(&["--data", path.to_str().unwrap()])), &["empty.txt", "is empty"]);
}

#[test]
fn shard_with_wrong_magic_is_named() {
    let dir = scratch("magic");
    let path = dir.join("tokens.bin");
    std::fs::write(&path, vec![7u8; 2048]).unwrap();
    fails_with(&strs(&with(&["--data", path.to_str().unwrap()])), &["tokens.bin", "wrong magic"]);
}

#[test]
fn heads_not_dividing_width_is_refused() {
    fails_with(&strs(&with(&["--heads", "3"])), &["n_head (3) must divide n_embd (128)"]);
}

#[test]
fn seq_longer_than_context_is_refused() {
    fails_with(
        &["train", "--preset", "tiny", "--seq", "300", "--peak-gflops", "100"],
        &["seq (300) is longer than the model's context (256)"],
    );
}

#[test]
fn nan_loss_ends_the_run_with_an_error() {
    fails_with(&strs(&with(&["--steps", "5", "--lr", "1e30"])), &["diverged", "NaN"]);
}

#[test]
fn unknown_preset_is_refused() {
    fails_with(&["train", "--preset", "gpt5"], &["unknown preset \"gpt5\""]);
}

#[test]
fn simulate_refuses_bad_configurations_naming_the_flag() {
    fails_with(&["simulate", "--gpus", "0"], &["--gpus"]);
    fails_with(&["simulate", "--gpus", "64", "--spares", "9"], &["--spares", "more spares than nodes"]);
    fails_with(&["simulate", "--rate-scale=-1"], &["--rate-scale"]);
    fails_with(&["simulate", "--preset", "nope"], &["--preset"]);
    fails_with(&["simulate", "--sweep", "spares"], &["--sweep"]);
    let dir = scratch("rates");
    let rates = dir.join("rates.csv");
    std::fs::write(&rates, "component,category,interruptions\nGPU,GPU,-3\n").unwrap();
    fails_with(&["simulate", "--rates", rates.to_str().unwrap()], &["--rates", "negative"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn simulate_prints_its_seed_and_replays_it() {
    let args =
        ["simulate", "--gpus", "256", "--spares", "8", "--days", "14", "--rate-scale", "10", "--seed", "5"];
    let json = |extra: &[&str]| {
        let out = myriad(&[&args[..], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_object_mut().unwrap().remove("elapsed_s");
        v
    };
    let (a, b) = (json(&["--json"]), json(&["--json"]));
    assert_eq!(a, b, "the same seed replays the same run");
    assert_eq!(a["seed"], 5);
    assert!(a["interruptions"].as_u64().unwrap() > 0, "{a:#}");
    let ettr = a["ettr"].as_f64().unwrap();
    assert!(ettr > 0.5 && ettr < 1.0, "{a:#}");
    let text = myriad(&args);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("seed 5") && text.contains("effective training time"), "{text}");
}

#[test]
fn json_steps_then_checkpoint_resume_matches_a_straight_run() {
    let dir = scratch("resume");
    let ckpt = dir.join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    let losses = |out: &Output| -> Vec<String> {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
                for key in ["step", "loss", "tokens_per_s", "mfu", "step_ms"] {
                    assert!(v.get(key).is_some(), "{key} missing from {l}");
                }
                v["loss"].to_string()
            })
            .collect()
    };
    let straight = losses(&myriad(&strs(&with(&["--steps", "6", "--json"]))));
    assert_eq!(straight.len(), 6);
    let first = losses(&myriad(&strs(&with(&[
        "--steps",
        "6",
        "--until-step",
        "3",
        "--json",
        "--checkpoint-dir",
        ckpt,
    ]))));
    assert!(PathBuf::from(ckpt).join("step_00000003/manifest.json").is_file());
    let second = losses(&myriad(&strs(&with(&[
        "--steps",
        "6",
        "--json",
        "--checkpoint-dir",
        ckpt,
        "--resume",
        "latest",
    ]))));
    assert_eq!([first, second].concat(), straight, "resumed run differs from the straight one");
}

/// Kills its processes when dropped, so a failing test leaves nothing running.
struct Ranks(Vec<std::process::Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `world` ranks of `myriad train` (tiny, effectively endless) with a `deadline_s`
/// collective deadline and returns once rank 0 has reported a few data-parallel steps.
fn training_ranks(world: usize, deadline_s: u64) -> Ranks {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut ranks = Ranks(
        (0..world)
            .map(|rank| {
                Command::new(env!("CARGO_BIN_EXE_myriad"))
                    .args(["train", "--preset", "tiny", "--batch", "3", "--seq", "16", "--steps", "1000000"])
                    .args(["--peak-gflops", "100", "--json"])
                    .env("WORLD_SIZE", world.to_string())
                    .env("RANK", rank.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .env("MYRIAD_COMM_TIMEOUT_S", deadline_s.to_string())
                    .env("OMP_NUM_THREADS", "1")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("rank starts")
            })
            .collect(),
    );
    // Wait (bounded) until rank 0 has finished a few steps.
    let stdout = ranks.0[0].stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let warmup_deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..5 {
        let left = warmup_deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).expect("rank 0 reports steps within 60 s");
    }
    ranks
}

/// Waits (bounded by `limit`) for each of `survivors` to exit; asserts each failed with a data
/// parallelism error and no panic; returns how long after `since` each exited.
fn survivors_fail(
    ranks: &mut Ranks,
    survivors: &[usize],
    since: std::time::Instant,
    limit: std::time::Duration,
) -> Vec<std::time::Duration> {
    survivors
        .iter()
        .map(|&rank| {
            let child = &mut ranks.0[rank];
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                assert!(
                    since.elapsed() < limit,
                    "rank {rank} still running {:?} after the fault",
                    since.elapsed()
                );
                std::thread::sleep(std::time::Duration::from_millis(20)); // polling a child's exit, not a sync
            };
            let took = since.elapsed();
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            assert!(!status.success(), "rank {rank} exited successfully after its peer failed");
            assert!(stderr.contains("data parallelism:"), "rank {rank} stderr: {stderr}");
            assert!(!stderr.contains("panicked"), "rank {rank} panicked: {stderr}");
            println!("rank {rank} failed {took:?} after the fault: {}", stderr.lines().last().unwrap_or(""));
            took
        })
        .collect()
}

#[test]
fn killing_one_rank_mid_training_fails_every_other_rank_within_the_deadline() {
    let deadline = std::time::Duration::from_secs(5);
    let mut ranks = training_ranks(3, deadline.as_secs());
    ranks.0[1].kill().unwrap(); // SIGKILL: no chance to say goodbye
    let killed_at = std::time::Instant::now();
    ranks.0[1].wait().unwrap();
    for took in survivors_fail(&mut ranks, &[0, 2], killed_at, deadline + std::time::Duration::from_secs(2)) {
        assert!(took <= deadline, "took {took:?} (deadline {deadline:?})");
    }
}

#[test]
fn stopping_one_rank_fails_every_other_rank_at_the_deadline_not_later() {
    let deadline = std::time::Duration::from_secs(5);
    let mut ranks = training_ranks(3, deadline.as_secs());
    let pid = ranks.0[1].id().to_string();
    // SIGSTOP: the process and its sockets stay up but it never answers again (a hang).
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped_at = std::time::Instant::now();
    // A collective already running when the rank stopped fails at its deadline; one started
    // just after waits at most one more (millisecond) step. Allow a second of scheduling slack.
    let limit = deadline + std::time::Duration::from_secs(1);
    for took in survivors_fail(&mut ranks, &[0, 2], stopped_at, limit + std::time::Duration::from_secs(1)) {
        assert!(took <= limit, "took {took:?} (deadline {deadline:?})");
    }
    // Ranks' Drop sends SIGKILL, which ends a stopped process too.
}

#[test]
fn plan_validate_prints_each_run_the_mae_and_the_skipped_rows() {
    let out = myriad(&["plan", "validate"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "mean absolute error, in-sample:",
        "mean absolute error, leave-one-source-out:",
        "LOSO",
        "calibration H100:",
        "GPT-3 175B",
        "skipped:",
        "no MFU or HFU published",
        "rules applied",
    ] {
        assert!(stdout.contains(needle), "stdout lacks {needle:?}:\n{stdout}");
    }
}

#[test]
fn plan_json_lists_fitting_layouts_best_first() {
    let out = myriad(&[
        "plan",
        "--model",
        "llama3-8b",
        "--gpu",
        "H100-SXM5-80GB",
        "--gpus",
        "64",
        "--top",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let layouts = v["layouts"].as_array().expect("layouts");
    assert_eq!(layouts.len(), 3);
    assert!(layouts.iter().all(|l| l["fits"] == true));
    assert!(layouts[0]["mfu"].as_f64() >= layouts[2]["mfu"].as_f64());
}

#[test]
fn plan_bad_input_names_what_is_wrong() {
    fails_with(
        &["plan", "--model", "gpt-9", "--gpu", "H100-SXM5-80GB", "--gpus", "8"],
        &["unknown model", "gpt-9"],
    );
    fails_with(
        &["plan", "--model", "llama3-405b", "--gpu", "H100-SXM5-80GB", "--gpus", "4"],
        &["memory per GPU"],
    );
    fails_with(&["plan", "--model", "llama3-8b", "--gpu", "Z9000", "--gpus", "8"], &["unknown GPU", "Z9000"]);
    let dir = scratch("plan-config");
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}"#,
    )
    .unwrap();
    fails_with(
        &["plan", "--hf-config", config.to_str().unwrap(), "--gpu", "H100-SXM5-80GB", "--gpus", "8"],
        &["config.json", "missing field `hidden_size`"],
    );
    fails_with(&["plan", "validate", "/no/such/runs.csv"], &["runs.csv"]);
}

#[test]
fn status_watch_refuses_json_and_a_bad_period() {
    fails_with(&["status", "--watch", "--json"], &["--watch", "--json"]);
    fails_with(&["status", "--watch", "0"], &["--watch 0", "between 0.1 and 3600"]);
    fails_with(&["status", "--watch", "NaN"], &["--watch NaN"]);
}
