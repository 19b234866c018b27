fn main() {
    let r = plan::validate::validate("published_runs.csv", plan::validate::PUBLISHED_RUNS_CSV, std::env::args().any(|a| a == "--search")).unwrap();
    for v in &r.runs {
        let p = &v.prediction;
        let l = &p.layout;
        println!(
            "{:>3} {:<28} {:>5} {:>4} pub {:>5.1} pred {:>5.1} err {:>+5.1} | t{} p{} v{} d{} mb{} z{} {:?} m{} step {:.2} comp {:.3} comm {:.3} bub {:.2} dp {:.3} mem {:.1} fits {} best {:.1} pubmfu {:.1}",
            v.row, v.model, v.gpus, v.metric, v.published_pct, v.predicted_pct, v.error_pts,
            l.tp, l.pp, l.vp, l.dp, l.micro_batch, l.zero, l.recompute, p.microbatches, p.step_s,
            p.stage_compute_s, p.stage_comm_s, p.bubble_s, p.dp_exposed_s, p.memory_gib, p.fits, v.best_mfu_pct, v.published_layout_mfu_pct
        );
    }
    println!("MAE {:.2} over {}", r.mae_pts, r.runs.len());
    for s in &r.skipped {
        println!("skip {} {}: {}", s.row, s.model, s.reason);
    }
}
