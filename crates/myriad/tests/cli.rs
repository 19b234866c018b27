//! The `myriad` binary as a user meets it: bad input gets one clear line and a non-zero exit,
//! never a panic; good input trains, prints JSON per step, checkpoints and resumes.

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

#[test]
fn killing_one_rank_mid_training_fails_every_other_rank_within_the_deadline() {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let deadline_s = 5;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let world = 3;
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
    // Wait (bounded) until rank 0 has finished a few data-parallel steps.
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
    let mut steps = 0;
    while steps < 5 {
        let left = warmup_deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).expect("rank 0 reports steps within 60 s");
        steps += 1;
    }

    ranks.0[1].kill().unwrap(); // SIGKILL: no chance to say goodbye
    let killed_at = Instant::now();
    ranks.0[1].wait().unwrap();
    for rank in [0, 2] {
        let child = &mut ranks.0[rank];
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(deadline_s + 2),
                "rank {rank} still running {:?} after its peer was killed",
                killed_at.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20)); // polling a child's exit, not a sync
        };
        let took = killed_at.elapsed();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "rank {rank} exited successfully after its peer died");
        assert!(stderr.contains("data parallelism:"), "rank {rank} stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "rank {rank} panicked: {stderr}");
        assert!(
            took <= Duration::from_secs(deadline_s),
            "rank {rank} took {took:?} (deadline {deadline_s} s)"
        );
        println!(
            "rank {rank} failed {took:?} after rank 1 was killed: {}",
            stderr.lines().last().unwrap_or("")
        );
    }
}
