//! Data parallelism: the same global batch and seed on 1, 2 and 4 ranks (threads of this test,
//! talking over loopback TCP) give the same weights as one process, bit for bit run to run.

use std::time::Duration;
use train::data::DataSpec;
use train::{ModelConfig, TrainConfig, Trainer};

const STEPS: u64 = 20;

fn setup() -> (ModelConfig, TrainConfig, DataSpec) {
    let model = ModelConfig {
        vocab_size: 64,
        padded_vocab_size: 64,
        context_len: 32,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
    };
    let cfg = TrainConfig {
        batch: 8,
        seq_len: 16,
        grad_accum: 2,
        steps: STEPS,
        lr: 3e-3,
        warmup_steps: 3,
        seed: 5,
        ..Default::default()
    };
    (model, cfg, DataSpec::Synthetic { vocab: 0, seed: 11 })
}

fn connect(rank: usize, world: usize, port: u16) -> comm::ProcessGroup {
    comm::ProcessGroup::connect(&comm::GroupConfig {
        rank,
        world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(20),
        shm: true,
        secret: None,
    })
    .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `f(rank, group)` on `world` ranks, one thread each; results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, comm::ProcessGroup) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn({
                    let f = &f;
                    move || f(rank, connect(rank, world, port))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Trains `STEPS` steps on `world` ranks; returns rank 0's weights and every rank's losses.
fn train_on(world: usize, zero1: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (model, cfg, data) = setup();
    if world == 1 {
        let mut t = Trainer::new(model, cfg, &data).unwrap();
        let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        return (t.model.params.to_vec(), vec![losses]);
    }
    let results = on_ranks(world, |_, group| {
        let mut t = Trainer::new(model.clone(), cfg.clone(), &data).unwrap();
        t.attach_group(group, zero1).unwrap();
        assert_eq!(t.is_zero1(), zero1);
        assert_eq!(
            t.comm_timeout(),
            Some(Duration::from_secs(20)),
            "the configured deadline applies at first"
        );
        let losses: Vec<f32> = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        // Steps take milliseconds here, so the adaptive deadline sits at its 8 s floor.
        assert_eq!(t.comm_timeout(), Some(Duration::from_secs(8)));
        (t.model.params.to_vec(), losses)
    });
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (rank, (w, _)) in results.iter().enumerate() {
        assert_eq!(bits(w), bits(&results[0].0), "rank {rank}'s weights differ from rank 0's");
    }
    (results[0].0.clone(), results.into_iter().map(|(_, l)| l).collect())
}

fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    diff / norm
}

#[test]
fn one_two_and_four_ranks_train_the_same_weights() {
    let (single, single_losses) = train_on(1, false);
    for world in [2, 4] {
        let (weights, losses) = train_on(world, false);
        let rel = relative_difference(&weights, &single);
        println!("world {world}: relative difference of weights after {STEPS} steps {rel:.2e}");
        assert!(rel <= 1e-5, "world {world}: weights differ from one process by {rel:.2e} (relative)");
        for rank_losses in &losses {
            assert_eq!(rank_losses, &losses[0], "ranks report different losses");
            for (a, b) in rank_losses.iter().zip(&single_losses[0]) {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs single-process {b}");
            }
        }
        let (again, _) = train_on(world, false);
        assert!(
            weights.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()),
            "world {world} is not bitwise reproducible"
        );
    }
}

#[test]
fn zero1_trains_the_same_weights_as_plain_data_parallelism() {
    for world in [2, 4] {
        let (plain, _) = train_on(world, false);
        let (sharded, _) = train_on(world, true);
        let rel = relative_difference(&sharded, &plain);
        println!("world {world}: ZeRO-1 vs plain data parallelism, relative difference {rel:.2e}");
        assert!(rel <= 1e-5, "world {world}: ZeRO-1 differs by {rel:.2e} (relative)");
        let (again, _) = train_on(world, true);
        assert!(
            sharded.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()),
            "ZeRO-1 not reproducible"
        );
    }
}

#[test]
fn sharded_checkpoint_resumes_exactly_on_the_same_world_size_only() {
    let dir = std::env::temp_dir().join(format!("myriad-zero1-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (model, cfg, data) = setup();
    let half = STEPS / 2;
    // Straight: STEPS steps on 2 ranks with ZeRO-1, saving halfway.
    let straight = on_ranks(2, |_, group| {
        let mut t = Trainer::new(model.clone(), cfg.clone(), &data).unwrap();
        t.attach_group(group, true).unwrap();
        for step in 0..STEPS {
            t.train_step().unwrap();
            if step + 1 == half {
                t.save(&dir).unwrap();
            }
        }
        (t.model.params.to_vec(), t.opt.m.to_vec())
    });
    let ckpt = dir.join(train::checkpoint::step_dir_name(half));
    let manifest = train::checkpoint::read_manifest(&ckpt).unwrap();
    assert_eq!((manifest.optimizer_shards, manifest.world_size), (2, 2));
    assert!(
        ckpt.join("optimizer.rank0.safetensors").is_file()
            && ckpt.join("optimizer.rank1.safetensors").is_file()
    );
    // Resumed: the second half from the checkpoint.
    let resumed = on_ranks(2, |_, group| {
        let mut t = Trainer::resume_in(&ckpt, &data, None, Some(group), true).unwrap();
        assert_eq!(t.step, half);
        for _ in half..STEPS {
            t.train_step().unwrap();
        }
        (t.model.params.to_vec(), t.opt.m.to_vec())
    });
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for r in 0..2 {
        assert_eq!(bits(&resumed[r].0), bits(&straight[r].0), "rank {r}: weights differ after resume");
        assert_eq!(
            bits(&resumed[r].1),
            bits(&straight[r].1),
            "rank {r}: optimizer shard differs after resume"
        );
    }
    // A different world size is refused by name.
    let err = Trainer::resume(&ckpt, &data, None).err().unwrap().to_string();
    assert!(err.contains("manifest.json") && err.contains("WORLD_SIZE=2"), "{err}");
    // A corrupted shard is refused by the rank that owns it, naming the file.
    let shard1 = ckpt.join("optimizer.rank1.safetensors");
    let mut bytes = std::fs::read(&shard1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&shard1, bytes).unwrap();
    let err = train::checkpoint::load_for_rank(&ckpt, 1, 2).err().unwrap().to_string();
    assert!(err.contains("optimizer.rank1.safetensors") && err.contains("corrupt"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batch_that_does_not_split_over_the_ranks_is_refused() {
    let (model, cfg, data) = setup();
    let errs = on_ranks(3, |_, group| {
        let mut t = Trainer::new(model.clone(), cfg.clone(), &data).unwrap();
        t.attach_group(group, false).unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("batch (8) must split evenly over WORLD_SIZE (3)"), "{e}");
    }
}
