//! `myriad bench`: machine and trainer measurements, each printable as JSON.

use clap::{Args, Subcommand};
use serde_json::json;
use train::data::DataSpec;
use train::{ModelConfig, TrainConfig, Trainer};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// This machine's FP32 FMA peak over all cores.
    Peak(PeakArgs),
    /// Trainer throughput and MFU for one model and batch shape.
    Train(TrainBenchArgs),
}

#[derive(Args)]
pub struct PeakArgs {
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "gpt2-124m")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: u64,
    #[arg(long)]
    threads: Option<usize>,
    /// FP32 peak in GFLOP/s; measured in the same run when absent.
    #[arg(long)]
    peak_gflops: Option<f64>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Peak(a) => {
            let threads = crate::init_threads(a.threads)?;
            let peak = train::peak::measure_peak(threads, 300);
            if a.json {
                println!("{}", serde_json::to_string(&peak).expect("serialises"));
            } else {
                println!(
                    "FP32 FMA peak: {:.1} GFLOP/s ({}, {} threads)",
                    peak.gflops, peak.isa, peak.threads
                );
                if let Some(g) = peak.gflops_avx2 {
                    println!("  256-bit AVX2 FMA only: {g:.1} GFLOP/s");
                }
            }
            Ok(())
        }
        BenchCommand::Train(a) => bench_train(a),
    }
}

fn bench_train(a: TrainBenchArgs) -> Result<(), String> {
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let threads = crate::init_threads(a.threads)?;
    let model = ModelConfig::preset(&a.preset).map_err(|e| e.to_string())?;
    let cfg = TrainConfig {
        batch: a.batch,
        seq_len: a.seq,
        steps: a.steps + 1,
        warmup_steps: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model.clone(), cfg, &DataSpec::Synthetic { vocab: 0, seed: 0 })
        .map_err(|e| e.to_string())?;
    let peak = match a.peak_gflops {
        Some(g) => g,
        None => train::peak::measure_peak(threads, 300).gflops,
    };
    eprintln!("warm-up step ...");
    trainer.train_step().map_err(|e| e.to_string())?;
    let mut times_ms = Vec::new();
    for i in 0..a.steps {
        let s = trainer.train_step().map_err(|e| e.to_string())?;
        eprintln!("step {}/{}: {:.1} ms, loss {:.4}", i + 1, a.steps, s.step_ms, s.loss);
        times_ms.push(s.step_ms);
    }
    times_ms.sort_by(f64::total_cmp);
    let median_ms = times_ms[times_ms.len() / 2];
    let tokens_per_s = (a.batch * a.seq) as f64 / (median_ms / 1e3);
    let flops_per_token = model.flops_per_token(a.seq);
    let model_gflops = tokens_per_s * flops_per_token / 1e9;
    let out = json!({
        "tokens_per_s": tokens_per_s,
        "model_gflops": model_gflops,
        "peak_gflops": peak,
        "mfu": model_gflops / peak,
        "step_ms_median": median_ms,
        "preset": a.preset, "batch": a.batch, "seq": a.seq, "threads": threads,
        "params": model.num_params(), "flops_per_token": flops_per_token,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{}: {:.0} tokens/s, {:.1} model GFLOP/s, MFU {:.1}% of {:.0} GFLOP/s (median step {:.0} ms)",
            a.preset,
            tokens_per_s,
            model_gflops,
            100.0 * model_gflops / peak,
            peak,
            median_ms
        );
    }
    Ok(())
}
