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
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: stderr lacks {n:?}: {stderr}");
    }
}

const FAST: &[&str] = &[
    "train",
    "--preset",
    "tiny",
    "--peak-gflops",
    "100",
    "--batch",
    "2",
    "--seq",
    "16",
];

fn with(extra: &[&str]) -> Vec<String> {
    FAST.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_data_file_is_named() {
    fails_with(
        &strs(&with(&["--data", "/no/such/corpus.txt"])),
        &["corpus.txt", "does not exist"],
    );
}

#[test]
fn empty_data_file_is_named() {
    let dir = scratch("empty");
    let path = dir.join("empty.txt");
    std::fs::write(&path, "").unwrap();
    fails_with(
        &strs(&with(&["--data", path.to_str().unwrap()])),
        &["empty.txt", "is empty"],
    );
}

#[test]
fn shard_with_wrong_magic_is_named() {
    let dir = scratch("magic");
    let path = dir.join("tokens.bin");
    std::fs::write(&path, vec![7u8; 2048]).unwrap();
    fails_with(
        &strs(&with(&["--data", path.to_str().unwrap()])),
        &["tokens.bin", "wrong magic"],
    );
}

#[test]
fn heads_not_dividing_width_is_refused() {
    fails_with(
        &strs(&with(&["--heads", "3"])),
        &["n_head (3) must divide n_embd (128)"],
    );
}

#[test]
fn seq_longer_than_context_is_refused() {
    fails_with(
        &[
            "train",
            "--preset",
            "tiny",
            "--seq",
            "300",
            "--peak-gflops",
            "100",
        ],
        &["seq (300) is longer than the model's context (256)"],
    );
}

#[test]
fn nan_loss_ends_the_run_with_an_error() {
    fails_with(
        &strs(&with(&["--steps", "5", "--lr", "1e30"])),
        &["diverged", "NaN"],
    );
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).expect("one JSON object per line");
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
    assert!(PathBuf::from(ckpt)
        .join("step_00000003/manifest.json")
        .is_file());
    let second = losses(&myriad(&strs(&with(&[
        "--steps",
        "6",
        "--json",
        "--checkpoint-dir",
        ckpt,
        "--resume",
        "latest",
    ]))));
    assert_eq!(
        [first, second].concat(),
        straight,
        "resumed run differs from the straight one"
    );
}
