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

/// Trains `STEPS` steps on `world` ranks; returns rank 0's weights and every rank's losses.
fn train_on(world: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (model, cfg, data) = setup();
    if world == 1 {
        let mut t = Trainer::new(model, cfg, &data).unwrap();
        let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        return (t.model.params.clone(), vec![losses]);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (model, cfg, data) = (model.clone(), cfg.clone(), data.clone());
                s.spawn(move || {
                    let group = comm::ProcessGroup::connect(&comm::GroupConfig {
                        rank,
                        world_size: world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(20),
                    })
                    .unwrap();
                    let mut t = Trainer::new(model, cfg, &data).unwrap();
                    t.attach_group(group).unwrap();
                    let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
                    (t.model.params.clone(), losses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
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
    let (single, single_losses) = train_on(1);
    for world in [2, 4] {
        let (weights, losses) = train_on(world);
        let rel = relative_difference(&weights, &single);
        println!("world {world}: relative difference of weights after {STEPS} steps {rel:.2e}");
        assert!(rel <= 1e-5, "world {world}: weights differ from one process by {rel:.2e} (relative)");
        for rank_losses in &losses {
            assert_eq!(rank_losses, &losses[0], "ranks report different losses");
            for (a, b) in rank_losses.iter().zip(&single_losses[0]) {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs single-process {b}");
            }
        }
        let (again, _) = train_on(world);
        assert!(
            weights.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()),
            "world {world} is not bitwise reproducible"
        );
    }
}

#[test]
fn batch_that_does_not_split_over_the_ranks_is_refused() {
    let (model, cfg, data) = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let (model, cfg, data) = (model.clone(), cfg.clone(), data.clone());
                s.spawn(move || {
                    let group = comm::ProcessGroup::connect(&comm::GroupConfig {
                        rank,
                        world_size: 3,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(20),
                    })
                    .unwrap();
                    let mut t = Trainer::new(model, cfg, &data).unwrap();
                    t.attach_group(group).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errs {
        assert!(e.contains("batch (8) must split evenly over WORLD_SIZE (3)"), "{e}");
    }
}
