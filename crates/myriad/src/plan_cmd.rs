//! `myriad plan`: the best parallel layouts for a model on a GPU count, and `myriad plan validate`:
//! the performance model against published runs. Reads the files; the `plan` crate does the rest.

use clap::{Args, Subcommand, ValueEnum};
use plan::{FlopsConvention, Job, Precision, Software};
use std::path::{Path, PathBuf};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    cmd: Option<PlanCommand>,
    #[command(flatten)]
    search: SearchArgs,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Predict each published run (a CSV in published_runs.csv's format; the built-in one when
    /// no file is given) for its published layout and print the error.
    Validate(ValidateArgs),
}

#[derive(Args)]
struct ValidateArgs {
    /// CSV file; the embedded published_runs.csv when absent.
    file: Option<PathBuf>,
    /// Skip the layout search per run (faster).
    #[arg(long)]
    no_search: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Bf16,
    Fp16,
    Fp8,
}

#[derive(Args)]
struct SearchArgs {
    /// Built-in model (llama3-8b, llama3-70b, llama3-405b, mixtral-8x7b, deepseek-v3, gpt3-175b, ...).
    #[arg(long)]
    model: Option<String>,
    /// A Hugging Face config.json instead of --model.
    #[arg(long, conflicts_with = "model")]
    hf_config: Option<PathBuf>,
    /// A TOML model spec instead of --model.
    #[arg(long, conflicts_with_all = ["model", "hf_config"])]
    model_toml: Option<PathBuf>,
    /// Accelerator from the built-in table (A100-SXM4-80GB, H100-SXM5-80GB, H200-SXM-141GB, B200, ...).
    #[arg(long)]
    gpu: Option<String>,
    /// A TOML file overriding (or defining) the accelerator's figures and calibration.
    #[arg(long)]
    hardware_toml: Option<PathBuf>,
    /// GPUs to use, all of them.
    #[arg(long)]
    gpus: Option<u64>,
    /// Sequence length in tokens.
    #[arg(long, default_value_t = 8192)]
    seq: u64,
    /// Tokens per optimizer step (rounded to whole micro-batches per data-parallel rank).
    #[arg(long, default_value_t = 16 << 20)]
    global_batch_tokens: u64,
    /// Tokens to train, for the days column.
    #[arg(long, default_value_t = 15e12)]
    tokens: f64,
    #[arg(long, value_enum, default_value = "bf16")]
    precision: PrecisionArg,
    /// Layouts to print.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Let tensor parallelism span nodes.
    #[arg(long)]
    tp_across_nodes: bool,
    /// The framework cannot overlap tensor-parallel communication with GEMMs.
    #[arg(long)]
    no_tp_overlap: bool,
    #[arg(long)]
    json: bool,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn name(path: &Path) -> String {
    path.display().to_string()
}

pub fn run(a: PlanArgs) -> Result<(), String> {
    match a.cmd {
        Some(PlanCommand::Validate(v)) => validate(v),
        None => search(a.search),
    }
}

fn search(a: SearchArgs) -> Result<(), String> {
    let model = match (&a.model, &a.hf_config, &a.model_toml) {
        (Some(m), _, _) => plan::model::preset(m),
        (_, Some(p), _) => plan::model::from_hf_config(&name(p), &read(p)?),
        (_, _, Some(p)) => plan::model::from_toml(&name(p), &read(p)?),
        _ => return Err("give the model: --model NAME, --hf-config FILE or --model-toml FILE".into()),
    }
    .map_err(|e| e.to_string())?;
    let hw = match (&a.hardware_toml, &a.gpu) {
        (Some(p), _) => plan::hardware::from_toml(&name(p), &read(p)?),
        (None, Some(g)) => plan::hardware::lookup(g),
        (None, None) => return Err("give the accelerator: --gpu NAME or --hardware-toml FILE".into()),
    }
    .map_err(|e| e.to_string())?;
    let gpus = a.gpus.ok_or("give the GPU count: --gpus N")?;
    if a.seq == 0 {
        return Err("--seq must be at least 1".into());
    }
    if a.global_batch_tokens < a.seq {
        return Err(format!(
            "--global-batch-tokens {} is less than one sequence ({})",
            a.global_batch_tokens, a.seq
        ));
    }
    if a.tokens.is_nan() || a.tokens <= 0.0 {
        return Err("--tokens must be positive".into());
    }
    let precision = match a.precision {
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::Fp16 => Precision::Fp16,
        PrecisionArg::Fp8 => Precision::Fp8,
    };
    let job = Job {
        model,
        seq: a.seq,
        global_batch_seqs: a.global_batch_tokens / a.seq,
        gpus,
        precision,
        convention: FlopsConvention::SixN,
    };
    let sw = Software {
        tp_comm_overlap: !a.no_tp_overlap,
        tp_across_nodes: a.tp_across_nodes,
        ..Software::default()
    };
    let best = plan::search(&job, &hw, &sw, a.top).map_err(|e| e.to_string())?;
    if a.json {
        let rows: Vec<_> = best
            .iter()
            .map(|p| {
                serde_json::json!({
                    "layout": p.layout,
                    "memory_gib": p.memory_gib,
                    "memory": p.memory,
                    "fits": p.fits,
                    "global_batch_seqs": p.global_batch_seqs,
                    "microbatches": p.microbatches,
                    "step_s": p.step_s,
                    "mfu": p.mfu,
                    "hfu": p.hfu,
                    "tokens_per_day": p.tokens_per_day,
                    "days_to_train": a.tokens / p.tokens_per_day,
                })
            })
            .collect();
        let out = serde_json::json!({
            "model": job.model,
            "params": job.model.params(),
            "active_params": job.model.active_params(),
            "hardware": hw,
            "gpus": gpus,
            "seq": job.seq,
            "tokens": a.tokens,
            "layouts": rows,
        });
        println!("{}", serde_json::to_string(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{}: {:.1}B parameters ({:.1}B active), {} × {} ({:.0} TFLOP/s {} dense), seq {}, batch ≈ {} tokens",
        job.model.name,
        job.model.params() as f64 / 1e9,
        job.model.active_params() as f64 / 1e9,
        gpus,
        hw.name,
        hw.peak_tflops(precision),
        format!("{precision:?}").to_lowercase(),
        job.seq,
        a.global_batch_tokens
    );
    println!(
        "{:>3} {:>3} {:>3} {:>6} {:>3} {:>3} {:>3} {:>4} {:>9} {:>8} {:>7} {:>6} {:>6} {:>11} {:>7}",
        "tp",
        "pp",
        "vp",
        "dp",
        "cp",
        "ep",
        "mb",
        "zero",
        "recompute",
        "mem GiB",
        "step s",
        "MFU %",
        "HFU %",
        "tokens/day",
        "days"
    );
    for p in &best {
        let l = &p.layout;
        println!(
            "{:>3} {:>3} {:>3} {:>6} {:>3} {:>3} {:>3} {:>4} {:>9} {:>8.1} {:>7.2} {:>6.1} {:>6.1} {:>11.3e} {:>7.1}",
            l.tp,
            l.pp,
            l.vp,
            l.dp,
            l.cp,
            l.ep,
            l.micro_batch,
            l.zero,
            format!("{:?}", l.recompute).to_lowercase(),
            p.memory_gib,
            p.step_s,
            100.0 * p.mfu,
            100.0 * p.hfu,
            p.tokens_per_day,
            a.tokens / p.tokens_per_day
        );
    }
    println!(
        "MFU = 6 × (active parameters) + 12 × layers × width × seq FLOPs per token over {:.0} TFLOP/s per GPU; days to train {:.3e} tokens",
        hw.peak_tflops(precision),
        a.tokens
    );
    Ok(())
}

fn validate(v: ValidateArgs) -> Result<(), String> {
    let (source, text) = match &v.file {
        Some(p) => (name(p), read(p)?),
        None => ("published_runs.csv (embedded)".to_string(), plan::validate::PUBLISHED_RUNS_CSV.to_string()),
    };
    let report = plan::validate::validate(&source, &text, !v.no_search).map_err(|e| e.to_string())?;
    if v.json {
        println!("{}", serde_json::to_string(&report).expect("serialises"));
        return Ok(());
    }
    println!(
        "{:>4} {:<28} {:<15} {:>5} {:>6} {:>6} {:>6} {:>6} {:>6}  {:<34} {:>6} {:>6}",
        "row",
        "model",
        "gpu",
        "gpus",
        "metric",
        "publ.",
        "pred.",
        "error",
        "LOSO",
        "layout (tp pp vp dp mb zero recompute)",
        "best",
        "fits"
    );
    for r in &report.runs {
        let l = &r.prediction.layout;
        let layout = format!(
            "{} {} {} {} {} z{} {}",
            l.tp,
            l.pp,
            l.vp,
            l.dp,
            l.micro_batch,
            l.zero,
            format!("{:?}", l.recompute).to_lowercase()
        );
        let best = if r.best_mfu_pct.is_nan() { "-".to_string() } else { format!("{:.1}", r.best_mfu_pct) };
        println!(
            "{:>4} {:<28} {:<15} {:>5} {:>6} {:>6.1} {:>6.1} {:>+6.1} {:>+6.1}  {:<34} {:>6} {:>6}",
            r.row,
            truncate(&r.model, 28),
            truncate(&r.gpu, 15),
            r.gpus,
            r.metric,
            r.published_pct,
            r.predicted_pct,
            r.error_pts,
            r.held_out_error_pts,
            layout,
            best,
            r.prediction.fits
        );
    }
    println!(
        "mean absolute error, in-sample: {:.2} points over {} runs (calibration fitted on all of them)",
        report.mae_pts,
        report.runs.len()
    );
    println!(
        "mean absolute error, leave-one-source-out: {:.2} points (LOSO column: each of the {} sources' runs predicted with the calibration fitted on the other sources alone)",
        report.held_out_mae_pts, report.sources
    );
    for f in &report.calibration {
        println!(
            "calibration {}: gemm_eff {:.2}, attn_eff {:.2} (fitted on {} runs, MAE {:.2})",
            f.generation, f.gemm_eff, f.attn_eff, f.runs, f.mae_pts
        );
    }
    if !v.no_search {
        let ok = report.runs.iter().filter(|r| r.best_mfu_pct >= r.published_layout_mfu_pct - 1e-9).count();
        println!(
            "search: best layout's MFU >= the published layout's predicted MFU in {ok} of {} runs (best column: MFU %)",
            report.runs.len()
        );
    }
    if !report.skipped.is_empty() {
        println!("skipped:");
        for s in &report.skipped {
            println!("  row {:>3} {:<28} {}", s.row, truncate(&s.model, 28), s.reason);
        }
    }
    println!("rules applied to every row:");
    for r in &report.rules {
        println!("  - {r}");
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}
