use plan::validate::{validate_with, PUBLISHED_RUNS_CSV};
fn main() {
    for fam in ["A100", "H100"] {
        let mut res = vec![];
        for g in (50..=90).step_by(2) {
            for a in (10..=80).step_by(5) {
                let (ge, ae) = (g as f64 / 100.0, a as f64 / 100.0);
                let r = validate_with("x", PUBLISHED_RUNS_CSV, false, &|hw| {
                    if hw.name.contains(fam) {
                        hw.calibration.gemm_eff = ge;
                        hw.calibration.attn_eff = ae;
                    }
                })
                .unwrap();
                let errs: Vec<f64> = r.runs.iter().filter(|v| v.gpu.contains(fam)).map(|v| v.error_pts).collect();
                let mae = errs.iter().map(|e| e.abs()).sum::<f64>() / errs.len() as f64;
                let bias = errs.iter().sum::<f64>() / errs.len() as f64;
                res.push((mae, bias, ge, ae));
            }
        }
        res.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        for r in res.iter().take(5) {
            println!("{fam} mae {:.2} bias {:+.2} gemm {:.2} attn {:.2}", r.0, r.1, r.2, r.3);
        }
    }
}
