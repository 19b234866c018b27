//! Live state slots (train::live): a rank killed at any point restarts from the last finished
//! step, bit for bit, and never from a slot that was being written or belongs to another run.

use std::path::{Path, PathBuf};
use train::data::DataSpec;
use train::live::{fingerprint, LiveSlots};
use train::{ModelConfig, TrainConfig, Trainer};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("myriad-live-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn configs(seed: u64) -> (ModelConfig, TrainConfig) {
    let model = ModelConfig::preset("tiny").unwrap();
    let train =
        TrainConfig { batch: 2, seq_len: 16, steps: 12, warmup_steps: 2, seed, ..TrainConfig::default() };
    (model, train)
}

const DATA: DataSpec = DataSpec::Synthetic { vocab: 0, seed: 5 };

fn start(dir: &Path, seed: u64, expected: Option<u64>) -> train::Result<Trainer> {
    let (model, train) = configs(seed);
    Trainer::start_live(model, train, &DATA, None, Some(dir), None, expected)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Weights, moments and losses of an uninterrupted 8-step run without live state.
fn reference() -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (model, train) = configs(1);
    let mut t = Trainer::new(model, train, &DATA).unwrap();
    let losses: Vec<u32> = (0..8).map(|_| t.train_step().unwrap().loss.to_bits()).collect();
    (bits(&t.model.params), bits(&t.opt.v), losses)
}

#[test]
fn a_rank_restarted_from_its_live_slots_continues_bit_for_bit() {
    let (want_params, want_v, want_losses) = reference();
    let dir = scratch_dir("restart");
    let mut losses = Vec::new();
    let mut t = start(&dir, 1, None).unwrap();
    assert_eq!(t.step, 0);
    for _ in 0..5 {
        losses.push(t.train_step().unwrap().loss.to_bits());
        t.commit_live();
    }
    // Killed here: nothing is saved on the way out.
    drop(t);
    let mut t = start(&dir, 1, Some(3)).unwrap();
    assert_eq!(t.step, 5, "restarts at the last finished step, newer than the controller's 3");
    for _ in 0..3 {
        losses.push(t.train_step().unwrap().loss.to_bits());
    }
    assert_eq!(losses, want_losses);
    assert_eq!(bits(&t.model.params), want_params);
    assert_eq!(bits(&t.opt.v), want_v);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slot_being_written_when_the_rank_died_is_not_taken() {
    let (want_params, _, want_losses) = reference();
    let dir = scratch_dir("torn");
    let mut t = start(&dir, 1, None).unwrap();
    let mut losses: Vec<u32> = (0..5)
        .map(|_| {
            let loss = t.train_step().unwrap().loss.to_bits();
            t.commit_live();
            loss
        })
        .collect();
    let n = t.model.num_params();
    drop(t);
    // Step 6's update dies halfway: the slot it writes was marked invalid first and holds junk.
    let (model, train) = configs(1);
    let mut slots = LiveSlots::open(&dir, n, fingerprint(&model, &train)).unwrap();
    let (current, header) = slots.newest().unwrap();
    assert_eq!(header.step, 5);
    slots.start(current);
    let out = slots.begin_write();
    out.weights[..n / 2].fill(f32::NAN);
    out.exp_avg[..n / 2].fill(f32::NAN);
    drop(slots);
    let mut t = start(&dir, 1, None).unwrap();
    assert_eq!(t.step, 5);
    losses.extend((0..3).map(|_| t.train_step().unwrap().loss.to_bits()));
    assert_eq!(losses, want_losses);
    assert_eq!(bits(&t.model.params), want_params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_step_not_yet_reported_is_not_restorable() {
    let dir = scratch_dir("unreported");
    let mut t = start(&dir, 1, None).unwrap();
    for _ in 0..3 {
        t.train_step().unwrap();
        t.commit_live();
    }
    // Step 4 finished, but the rank died before reporting it (commit_live): it is redone.
    t.train_step().unwrap();
    drop(t);
    assert_eq!(start(&dir, 1, None).unwrap().step, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn slots_of_another_configuration_are_ignored_and_nothing_to_restore_is_an_error() {
    let dir = scratch_dir("foreign");
    let mut t = start(&dir, 1, None).unwrap();
    t.train_step().unwrap();
    drop(t);
    // Another seed is another run: its slots are not this run's state.
    let t = start(&dir, 2, None).unwrap();
    assert_eq!(t.step, 0);
    drop(t);
    // The controller restores step 4 but nothing here holds any step of this run: refused, and
    // the slot directory goes, so the next attempt's agent fetches a checkpoint instead.
    let err = start(&dir, 3, Some(4)).err().expect("refused").to_string();
    assert!(err.contains("step 4") && err.contains("no rank holds"), "{err}");
    assert!(!dir.exists());
}
