use super::*;

/// Runs every seed, spread over the machine's cores.
fn runs(cfg: &Config, seeds: std::ops::Range<u64>) -> Vec<Report> {
    let seeds: Vec<u64> = seeds.collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len());
    let mut reports: Vec<(u64, Report)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<u64> = seeds.iter().copied().skip(t).step_by(threads).collect();
                s.spawn(move || {
                    mine.into_iter()
                        .map(|seed| (seed, run(&Config { seed, ..cfg.clone() }).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    reports.sort_by_key(|(seed, _)| *seed);
    reports.into_iter().map(|(_, r)| r).collect()
}

#[test]
fn llama3_replay_matches_its_interruptions_and_effective_training_time() {
    let reports = runs(&Config::llama3(), 1..21);
    let interruptions = median(reports.iter().map(|r| r.interruptions as f64).collect()).unwrap();
    let ettr = median(reports.iter().map(|r| r.ettr).collect()).unwrap();
    eprintln!(
        "Llama 3 replay, 20 seeds: median interruptions {interruptions} (published 419), median ETTR {:.2}% \
         (range {:.2}-{:.2}%)",
        ettr * 100.0,
        reports.iter().map(|r| r.ettr).fold(f64::MAX, f64::min) * 100.0,
        reports.iter().map(|r| r.ettr).fold(0.0, f64::max) * 100.0
    );
    assert!((interruptions - 419.0).abs() <= 41.9, "median interruptions {interruptions}, published 419");
    assert!((0.90..=0.95).contains(&ettr), "median effective training time {ettr}");
}

#[test]
fn effective_training_time_falls_as_faults_become_more_frequent() {
    let base = Config { gpus: 1024, spare_nodes: 16, days: 28.0, repair_h: 24.0, ..Config::default() };
    let mut previous = 1.0;
    for scale in [1.0, 4.0, 16.0, 64.0] {
        let reports = runs(&Config { rate_scale: scale, ..base.clone() }, 1..5);
        let ettr = reports.iter().map(|r| r.ettr).sum::<f64>() / reports.len() as f64;
        let interruptions: u64 = reports.iter().map(|r| r.interruptions).sum();
        eprintln!("rate × {scale}: mean ETTR {ettr:.5}, {interruptions} interruptions over 4 seeds");
        assert!(ettr < previous, "rate × {scale}: ETTR {ettr} did not fall below {previous}");
        previous = ettr;
    }
}

#[test]
fn without_faults_effective_training_time_is_one_minus_the_checkpoint_overhead() {
    // 10 steps of 10 s, each followed by a 0.5 s in-memory checkpoint, the tenth also by a 2 s
    // persisted one: 107 s per 10 steps, and the run ends on a period's boundary.
    let cfg = Config {
        gpus: 64,
        spare_nodes: 0,
        days: 107.0 * 800.0 / 86_400.0,
        rate_scale: 0.0,
        step_s: 10.0,
        memory_every_steps: 1,
        memory_stall_s: 0.5,
        persist_every_steps: 10,
        persist_stall_s: 2.0,
        launch_s: 0.0,
        restore_memory_s: 0.0,
        ..Config::default()
    };
    let r = run(&cfg).unwrap();
    let overhead = (8000.0 * 0.5 + 800.0 * 2.0) / (107.0 * 800.0);
    assert_eq!(r.steps, 8000);
    assert_eq!(r.interruptions, 0);
    assert!((r.ettr - (1.0 - overhead)).abs() < 1e-12, "ETTR {} vs {}", r.ettr, 1.0 - overhead);
    assert!(r.lost_gpu_hours.other.abs() < 1e-6, "{:?}", r.lost_gpu_hours);
}

#[test]
fn the_cores_invariants_hold_through_every_decision_of_a_faulty_run() {
    // Ten times Llama 3's rates on 1,024 GPUs: hundreds of restarts, lost nodes and spares.
    let cfg = Config { gpus: 1024, days: 14.0, rate_scale: 10.0, ..Config::default() };
    let checked = run(&Config { checked: true, ..cfg.clone() }).unwrap();
    assert!(checked.interruptions > 50, "{} interruptions", checked.interruptions);
    let json = |r: &Report| serde_json::to_string(r).unwrap();
    assert_eq!(json(&checked), json(&run(&cfg).unwrap()), "the checks only read");
}

#[test]
fn the_same_seed_gives_the_same_result_and_another_seed_does_not() {
    let cfg = Config { gpus: 2048, days: 14.0, rate_scale: 5.0, ..Config::default() };
    let json = |seed| serde_json::to_string(&run(&Config { seed, ..cfg.clone() }).unwrap()).unwrap();
    assert_eq!(json(9), json(9));
    assert_ne!(json(9), json(10));
}

#[test]
fn spares_decide_whether_a_lost_node_needs_a_person() {
    let hardware: Vec<FaultClass> =
        rates::llama3().into_iter().filter(|c| c.kind == FaultKind::Node).collect();
    let base = Config { gpus: 512, days: 14.0, rate_scale: 10.0, classes: hardware, ..Config::default() };
    // No spare: every lost node leaves the job waiting for its repair.
    let none = run(&Config { spare_nodes: 0, ..base.clone() }).unwrap();
    assert!(none.interruptions > 0);
    assert!(none.manual_interventions > 0, "{none:?}");
    assert!(none.intervention_log.iter().all(|(_, why)| why.contains("waits for repairs")));
    // Spares enough for every node in repair at once: the controller swaps them in by itself.
    let plenty = run(&Config { spare_nodes: 32, repair_h: 24.0, ..base }).unwrap();
    assert!(plenty.interruptions > 0);
    assert_eq!(plenty.manual_interventions, 0, "{plenty:?}");
    assert!(plenty.ettr > none.ettr);
}

#[test]
fn bad_configurations_name_the_parameter() {
    let field = |cfg: Config| run(&cfg).unwrap_err().field;
    let mut negative = Config::default();
    negative.classes[0].rate_per_gpu_hour = -1.0;
    assert_eq!(field(negative), "rates");
    assert_eq!(field(Config { gpus: 16, spare_nodes: 3, ..Config::default() }), "spare_nodes");
    assert_eq!(field(Config { gpus: 0, ..Config::default() }), "gpus");
    assert_eq!(field(Config { gpus: 12, ..Config::default() }), "gpus");
    assert_eq!(field(Config { days: 0.0, ..Config::default() }), "days");
    assert_eq!(field(Config { rate_scale: f64::NAN, ..Config::default() }), "rate_scale");
    assert_eq!(field(Config { step_s: -1.0, ..Config::default() }), "step_s");
    assert!(sweep(&Config::default(), SweepParam::SpareNodes, &[]).is_err());
}

#[test]
fn young_daly_is_the_square_root_of_twice_cost_times_mtbf() {
    let cfg = Config {
        classes: vec![FaultClass { name: "x".into(), kind: FaultKind::Crash, rate_per_gpu_hour: 1e-4 }],
        gpus: 1000,
        step_s: 1.0,
        ..Config::default()
    };
    // One fault every 10 h = 36,000 s; a 2 s checkpoint: sqrt(2 · 2 · 36,000) = 379.47 s.
    let steps = cfg.young_daly_steps(2.0).unwrap();
    assert!((steps - (2.0f64 * 2.0 * 36_000.0).sqrt()).abs() < 1e-9, "{steps}");
}
