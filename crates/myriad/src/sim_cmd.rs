//! `myriad simulate`: a long job on a large cluster, through the controller's real policy, on a
//! simulated clock.

use clap::Args;
use sim::{Config, Report, SweepParam};
use std::time::Instant;

#[derive(Args)]
pub struct SimulateArgs {
    /// Costs and cluster to start from: `myriad` (this project's measured ladder, 10,000 GPUs,
    /// 7 days) or `llama3` (Llama 3's run with the costs of its time, 16,384 GPUs, 54 days).
    #[arg(long, default_value = "myriad")]
    preset: String,
    /// GPUs the job trains on.
    #[arg(long)]
    gpus: Option<u64>,
    #[arg(long)]
    gpus_per_node: Option<u32>,
    /// Hot spare nodes.
    #[arg(long)]
    spares: Option<u32>,
    #[arg(long)]
    days: Option<f64>,
    /// Seed of the fault draws; printed, so a run can be replayed. Default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Multiplies every fault rate.
    #[arg(long)]
    rate_scale: Option<f64>,
    /// Fault table (CSV with component, category, interruptions columns) ...
    #[arg(long)]
    rates: Option<std::path::PathBuf>,
    /// ... observed over this many GPU-hours (default: Llama 3's 16,384 GPUs × 54 days).
    #[arg(long, requires = "rates")]
    rates_gpu_hours: Option<f64>,
    /// Seconds per training step.
    #[arg(long)]
    step_s: Option<f64>,
    /// Steps between in-memory checkpoints (0: no in-memory tier) and the stall of each.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    checkpoint_stall_s: Option<f64>,
    /// Steps between persisted checkpoints (0: none) and the stall of each.
    #[arg(long)]
    persist_every: Option<u64>,
    #[arg(long)]
    persist_stall_s: Option<f64>,
    /// Hours until a node taken out by a hardware fault is back.
    #[arg(long)]
    repair_h: Option<f64>,
    /// Run once per value: `checkpoint-every=1,2,4,8` or `spares=0,8,16`.
    #[arg(long)]
    sweep: Option<String>,
    /// Check the controller core's invariants after every one of its decisions (slower: a pass
    /// over its tables each time).
    #[arg(long)]
    checked: bool,
    #[arg(long)]
    json: bool,
}

fn config(args: &SimulateArgs) -> Result<Config, String> {
    let mut cfg = match args.preset.as_str() {
        "myriad" => Config::default(),
        "llama3" => Config::llama3(),
        other => return Err(format!("--preset: unknown preset {other:?} (myriad, llama3)")),
    };
    if let Some(path) = &args.rates {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--rates {}: {e}", path.display()))?;
        let hours = args.rates_gpu_hours.unwrap_or(sim::rates::LLAMA3_GPUS * sim::rates::LLAMA3_HOURS);
        if !(hours.is_finite() && hours > 0.0) {
            return Err(format!("--rates-gpu-hours: must be positive, not {hours}"));
        }
        cfg.classes =
            sim::rates::from_csv(&text, hours).map_err(|e| format!("--rates {}: {e}", path.display()))?;
    }
    cfg.gpus = args.gpus.unwrap_or(cfg.gpus);
    cfg.gpus_per_node = args.gpus_per_node.unwrap_or(cfg.gpus_per_node);
    cfg.spare_nodes = args.spares.unwrap_or(cfg.spare_nodes);
    cfg.days = args.days.unwrap_or(cfg.days);
    cfg.seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    cfg.rate_scale = args.rate_scale.unwrap_or(cfg.rate_scale);
    cfg.step_s = args.step_s.unwrap_or(cfg.step_s);
    cfg.memory_every_steps = args.checkpoint_every.unwrap_or(cfg.memory_every_steps);
    cfg.memory_stall_s = args.checkpoint_stall_s.unwrap_or(cfg.memory_stall_s);
    cfg.persist_every_steps = args.persist_every.unwrap_or(cfg.persist_every_steps);
    cfg.persist_stall_s = args.persist_stall_s.unwrap_or(cfg.persist_stall_s);
    cfg.repair_h = args.repair_h.unwrap_or(cfg.repair_h);
    cfg.checked = args.checked;
    cfg.validate().map_err(|e| {
        let flag = match e.field.as_str() {
            "spare_nodes" => "spares",
            "memory_every_steps" => "checkpoint-every",
            "memory_stall_s" => "checkpoint-stall-s",
            "persist_every_steps" => "persist-every",
            other => other,
        };
        format!("--{}: {}", flag.replace('_', "-"), e.message)
    })?;
    Ok(cfg)
}

fn parse_sweep(text: &str) -> Result<(SweepParam, Vec<u64>), String> {
    let (name, values) =
        text.split_once('=').ok_or_else(|| format!("--sweep: expected NAME=V1,V2,..., got {text:?}"))?;
    let param = match name {
        "checkpoint-every" => SweepParam::CheckpointEvery,
        "spares" => SweepParam::SpareNodes,
        other => return Err(format!("--sweep: unknown parameter {other:?} (checkpoint-every, spares)")),
    };
    let values = values
        .split(',')
        .map(|v| v.trim().parse::<u64>().map_err(|_| format!("--sweep: {v:?} is not a whole number")))
        .collect::<Result<Vec<u64>, String>>()?;
    Ok((param, values))
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

pub fn run(args: SimulateArgs) -> Result<(), String> {
    let cfg = config(&args)?;
    let sweep = args.sweep.as_deref().map(parse_sweep).transpose()?;
    if !args.json {
        println!(
            "simulating {} GPUs ({} nodes of {} + {} spares) for {} days, seed {} ({} preset, {:.2} faults/day)",
            cfg.gpus,
            cfg.nodes(),
            cfg.gpus_per_node,
            cfg.spare_nodes,
            cfg.days,
            cfg.seed,
            args.preset,
            cfg.faults_per_hour() * 24.0
        );
    }
    let started = Instant::now();
    match sweep {
        None => {
            let report = sim::run(&cfg).map_err(|e| e.to_string())?;
            let elapsed_s = started.elapsed().as_secs_f64();
            if args.json {
                let mut value = serde_json::to_value(&report).expect("serialisable");
                value["elapsed_s"] = elapsed_s.into();
                value["config"] = serde_json::to_value(&cfg).expect("serialisable");
                println!("{}", serde_json::to_string_pretty(&value).expect("serialisable"));
            } else {
                print_report(&report);
                println!("simulated in {elapsed_s:.2} s ({} controller events)", report.controller_events);
            }
        }
        Some((param, values)) => {
            let results = sim::sweep(&cfg, param, &values).map_err(|e| e.to_string())?;
            let elapsed_s = started.elapsed().as_secs_f64();
            let best =
                results.iter().max_by(|a, b| a.1.ettr.total_cmp(&b.1.ettr)).expect("at least one value");
            let stall_s = if cfg.memory_every_steps > 0 { cfg.memory_stall_s } else { cfg.persist_stall_s };
            let young_daly =
                (param == SweepParam::CheckpointEvery).then(|| cfg.young_daly_steps(stall_s)).flatten();
            if args.json {
                let rows: Vec<_> =
                    results.iter().map(|(v, r)| serde_json::json!({"value": v, "report": r})).collect();
                let out = serde_json::json!({
                    "parameter": args.sweep.as_deref().and_then(|s| s.split_once('=')).map(|(n, _)| n),
                    "results": rows, "best_value": best.0, "young_daly_steps": young_daly, "elapsed_s": elapsed_s,
                });
                println!("{}", serde_json::to_string_pretty(&out).expect("serialisable"));
            } else {
                let name = if param == SweepParam::CheckpointEvery { "checkpoint every" } else { "spares" };
                println!("{name:>16}  {:>8}  {:>13}  {:>13}", "ETTR", "interruptions", "interventions");
                for (v, r) in &results {
                    println!(
                        "{v:>16}  {:>8}  {:>13}  {:>13}",
                        pct(r.ettr),
                        r.interruptions,
                        r.manual_interventions
                    );
                }
                println!("best: {name} {} (ETTR {})", best.0, pct(best.1.ettr));
                if let Some(steps) = young_daly {
                    println!(
                        "Young/Daly optimum: {steps:.1} steps (sqrt(2 × {stall_s} s checkpoint × {:.1} h MTBF))",
                        1.0 / cfg.job_faults_per_hour()
                    );
                }
                println!("simulated in {elapsed_s:.2} s");
            }
        }
    }
    Ok(())
}

fn print_report(r: &Report) {
    let weekly = match (r.weekly_ettr_min, r.weekly_ettr_median) {
        (Some(min), Some(median)) => {
            format!("weekly min {}, median {} over {} weeks", pct(min), pct(median), r.weekly_ettr.len())
        }
        _ => "shorter than a week".into(),
    };
    println!("effective training time  {}  ({weekly})", pct(r.ettr));
    let every =
        r.mean_hours_between_interruptions.map(|h| format!("one every {h:.1} h")).unwrap_or("none".into());
    println!("faults                   {}  ({} interrupted the job: {every})", r.faults, r.interruptions);
    let between = match r.mean_days_between_interventions {
        Some(d) => format!("one every {d:.1} days"),
        None => format!("none in {} days", r.days),
    };
    println!("manual interventions     {}  ({between})", r.manual_interventions);
    for (day, why) in r.intervention_log.iter().take(5) {
        println!("  day {day:6.2}: {why}");
    }
    if r.nodes_quarantined > 0 {
        println!("nodes quarantined        {}", r.nodes_quarantined);
    }
    let l = &r.lost_gpu_hours;
    println!(
        "lost GPU-hours           startup {:.0}, detection {:.0}, restart {:.0}, recomputation {:.0}, checkpointing {:.0}, other {:.0}",
        l.startup, l.detection, l.restart, l.recomputation, l.checkpointing, l.other
    );
    println!("{:<26} {:>7} {:>14} {:>12}", "fault class", "faults", "interruptions", "lost GPU-h");
    for (name, c) in r.by_class.iter().filter(|(_, c)| c.faults > 0) {
        println!("{name:<26} {:>7} {:>14} {:>12.0}", c.faults, c.interruptions, c.lost_gpu_hours);
    }
}
