//! The trainer's acceptance tests: gradients against finite differences, learning to the entropy
//! floor, bitwise determinism, exact resume, and refusal of corrupt checkpoints.

use std::path::PathBuf;
use train::data::DataSpec;
use train::params::param_specs;
use train::{Gpt, ModelConfig, TrainConfig, Trainer};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("myriad-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model small enough for finite differences over every parameter, with a padded vocabulary.
fn micro_config() -> ModelConfig {
    ModelConfig { vocab_size: 11, padded_vocab_size: 16, context_len: 8, n_layer: 2, n_head: 2, n_embd: 8 }
}

#[test]
fn every_layer_backward_matches_finite_differences() {
    let cfg = micro_config();
    let mut model = Gpt::new(cfg.clone(), 3);
    // Non-trivial norms and biases, so their gradients are exercised away from the init point.
    let mut r = train::rng::Rng::new(11);
    for x in model.params.iter_mut() {
        *x += 0.05 * r.normal() as f32;
    }
    let (b, t) = (2, 5);
    let inputs: Vec<u32> = (0..b * t).map(|i| (i * 7 % 11) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 11 + 1) as u32 % 11).collect();
    model.zero_grad();
    model.forward(&inputs, &targets, b, t, 1.0);
    model.backward();
    let analytic = model.grads.clone();

    // Fourth-order central differences. Norm parameters have the smallest gradients and act
    // smoothly, so they take a larger step to keep f32 rounding of the loss far below the signal;
    // everything else feeds a LayerNorm or softmax closely and needs a small step.
    let mut worst = 0f64;
    for spec in param_specs(&cfg) {
        let h = if spec.name.contains("ln_") { 5e-2f32 } else { 1e-2 };
        let (mut diff2, mut fd2, mut an2) = (0f64, 0f64, 0f64);
        for i in spec.range() {
            let orig = model.params[i];
            let mut loss_at = |delta: f32| {
                model.params[i] = orig + delta;
                model.forward(&inputs, &targets, b, t, 1.0) as f64
            };
            let (p1, m1, p2, m2) = (loss_at(h), loss_at(-h), loss_at(2.0 * h), loss_at(-2.0 * h));
            model.params[i] = orig;
            let fd = (8.0 * (p1 - m1) - (p2 - m2)) / (12.0 * h as f64);
            let an = analytic[i] as f64;
            diff2 += (fd - an) * (fd - an);
            fd2 += fd * fd;
            an2 += an * an;
        }
        let scale = fd2.sqrt().max(an2.sqrt());
        if scale < 1e-7 {
            continue; // padded vocabulary rows: both zero
        }
        let rel = diff2.sqrt() / scale;
        println!("{:28} |grad| {:.3e}  relative error {:.2e}", spec.name, an2.sqrt(), rel);
        assert!(rel <= 1e-2, "{}: relative error {rel:.2e} against finite differences", spec.name);
        worst = worst.max(rel);
    }
    println!("worst relative error {worst:.2e}");
}

fn tiny_run(steps: u64) -> (ModelConfig, TrainConfig, DataSpec) {
    let model = ModelConfig::preset("tiny").unwrap();
    let cfg = TrainConfig { batch: 4, seq_len: 32, steps, warmup_steps: 3, seed: 42, ..Default::default() };
    (model, cfg, DataSpec::Synthetic { vocab: 0, seed: 7 })
}

#[test]
fn same_seed_gives_bitwise_identical_runs() {
    let (m, c, d) = tiny_run(8);
    let mut a = Trainer::new(m.clone(), c.clone(), &d).unwrap();
    let mut b = Trainer::new(m, c, &d).unwrap();
    for _ in 0..8 {
        let (sa, sb) = (a.train_step().unwrap(), b.train_step().unwrap());
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits(), "losses differ at step {}", sa.step);
    }
    assert!(a.model.params.iter().zip(b.model.params.iter()).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn resume_continues_bitwise_identically() {
    let (m, c, d) = tiny_run(30);
    let mut straight = Trainer::new(m.clone(), c.clone(), &d).unwrap();
    let mut straight_losses = Vec::new();
    for _ in 0..30 {
        straight_losses.push(straight.train_step().unwrap().loss);
    }

    let dir = scratch_dir("resume");
    let mut first = Trainer::new(m, c, &d).unwrap();
    let mut losses = Vec::new();
    for _ in 0..15 {
        losses.push(first.train_step().unwrap().loss);
    }
    let saved = first.save(&dir).unwrap();
    drop(first);
    assert_eq!(train::checkpoint::latest(&dir).unwrap().as_deref(), Some(saved.as_path()));
    let mut second = Trainer::resume(&saved, &d, None).unwrap();
    assert_eq!(second.step, 15);
    for _ in 0..15 {
        losses.push(second.train_step().unwrap().loss);
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&straight_losses));
    assert_eq!(bits(&second.model.params), bits(&straight.model.params), "weights differ after resume");
    assert_eq!(bits(&second.opt.m), bits(&straight.opt.m));
    assert_eq!(bits(&second.opt.v), bits(&straight.opt.v));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_copy_written_from_another_thread_is_the_same_checkpoint_byte_for_byte() {
    let (m, c, d) = tiny_run(6);
    let mut t = Trainer::new(m, c, &d).unwrap();
    let (direct, copied) = (scratch_dir("copy-direct"), scratch_dir("copy-thread"));
    let mut copy = None;
    for _ in 0..2 {
        // Twice over the same buffers: a reused copy carries nothing stale.
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        let saved = t.save(&direct).unwrap();
        let state = t.copy_state(copy.take()).expect("an unsharded run copies");
        let dir = copied.clone();
        let (state, written) = std::thread::spawn(move || {
            let written = state.save(&dir).unwrap();
            (state, written)
        })
        .join()
        .unwrap();
        copy = Some(state);
        for file in ["model.safetensors", "optimizer.safetensors", "manifest.json"] {
            let (a, b) =
                (std::fs::read(saved.join(file)).unwrap(), std::fs::read(written.join(file)).unwrap());
            assert!(a == b, "{file} of step {} differs", t.step);
        }
    }
    std::fs::remove_dir_all(&direct).unwrap();
    std::fs::remove_dir_all(&copied).unwrap();
}

#[test]
fn a_flipped_byte_anywhere_is_refused_naming_the_file() {
    let (m, c, d) = tiny_run(2);
    let mut t = Trainer::new(m, c, &d).unwrap();
    t.train_step().unwrap();
    let dir = scratch_dir("corrupt");
    let saved = t.save(&dir).unwrap();
    train::checkpoint::load(&saved).expect("an intact checkpoint loads");
    for file in ["model.safetensors", "optimizer.safetensors", "manifest.json"] {
        let path = saved.join(file);
        let original = std::fs::read(&path).unwrap();
        // The header, the middle and the last byte of every file.
        for pos in [10, original.len() / 2, original.len() - 2] {
            let mut bytes = original.clone();
            bytes[pos] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();
            let err = train::checkpoint::load(&saved)
                .err()
                .unwrap_or_else(|| panic!("{file} byte {pos} flipped but loaded"))
                .to_string();
            assert!(err.contains(file), "error for {file} byte {pos} does not name it: {err}");
        }
        // Truncation.
        std::fs::write(&path, &original[..original.len() - 100]).unwrap();
        let err = train::checkpoint::load(&saved).err().unwrap().to_string();
        assert!(err.contains(file), "{err}");
        std::fs::write(&path, &original).unwrap();
    }
    train::checkpoint::load(&saved).expect("restored checkpoint loads again");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_learns_the_markov_chain_to_its_entropy_floor() {
    let model = ModelConfig::preset("tiny").unwrap();
    let steps = 800;
    let cfg = TrainConfig {
        batch: 8,
        seq_len: 64,
        steps,
        lr: 1e-2,
        warmup_steps: 20,
        weight_decay: 0.0,
        seed: 1,
        ..Default::default()
    };
    let mut t = Trainer::new(model, cfg, &DataSpec::Synthetic { vocab: 0, seed: 3 }).unwrap();
    let floor = t.entropy_floor().unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(t.train_step().unwrap().loss as f64);
    }
    let tail = &losses[losses.len() - 30..];
    let final_loss = tail.iter().sum::<f64>() / tail.len() as f64;
    println!("initial loss {:.4}, final loss {final_loss:.4}, entropy floor {floor:.4}", losses[0]);
    assert!(
        final_loss - floor <= 0.15,
        "final loss {final_loss:.4} is {:.4} nats above the floor {floor:.4}",
        final_loss - floor
    );
    assert!(
        final_loss >= floor - 0.05,
        "loss {final_loss:.4} below the entropy floor {floor:.4}: the data leaks"
    );
}

#[test]
fn nan_loss_stops_the_run_with_an_error() {
    let (m, c, d) = tiny_run(5);
    let mut t = Trainer::new(m, c, &d).unwrap();
    t.model.params[0..128 * 256].fill(f32::NAN);
    let err = t.train_step().err().unwrap().to_string();
    assert!(err.contains("diverged") && err.contains("step 1"), "{err}");
}
