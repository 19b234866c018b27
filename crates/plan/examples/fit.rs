//! The calibration fit: for each fitted GPU generation, a grid over (gemm_eff, attn_eff) that
//! minimises the mean absolute MFU/HFU error over that generation's published runs. Prints the
//! five best points. `cargo run --release -p myriad-plan --example fit`
use plan::validate::{validate_with, PUBLISHED_RUNS_CSV};

fn main() {
    for family in ["A100", "H100"] {
        let mut points = vec![];
        for g in (50..=90).step_by(2) {
            for a in (10..=80).step_by(5) {
                let (gemm_eff, attn_eff) = (g as f64 / 100.0, a as f64 / 100.0);
                let report = validate_with("published_runs.csv", PUBLISHED_RUNS_CSV, false, &|hw| {
                    if hw.name.contains(family) {
                        hw.calibration.gemm_eff = gemm_eff;
                        hw.calibration.attn_eff = attn_eff;
                    }
                })
                .expect("embedded CSV validates");
                let errs: Vec<f64> =
                    report.runs.iter().filter(|v| v.gpu.contains(family)).map(|v| v.error_pts).collect();
                let mae = errs.iter().map(|e| e.abs()).sum::<f64>() / errs.len() as f64;
                let bias = errs.iter().sum::<f64>() / errs.len() as f64;
                points.push((mae, bias, gemm_eff, attn_eff, errs.len()));
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (mae, bias, g, a, n) in points.iter().take(5) {
            println!("{family} ({n} runs): MAE {mae:.2} bias {bias:+.2} at gemm_eff {g:.2} attn_eff {a:.2}");
        }
    }
}
