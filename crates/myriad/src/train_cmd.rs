//! `myriad train`: one training run of the reference trainer, with progress, JSON per step,
//! periodic checkpoints and resume. Under an agent the rank runtime (`train::rank`) does the rest.

use crate::progress::Progress;
use clap::Args;
use proto::env::RankEnv;
use serde_json::json;
use std::path::PathBuf;
use train::data::DataSpec;
use train::rank::{self, AgentLink, MemoryTier};
use train::{ModelConfig, TrainConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// Model shape: tiny (~1M parameters), small (~11M) or gpt2-124m.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Training data: a UTF-8 text file (byte-level tokens) or an llm.c/nanoGPT `.bin` token shard.
    /// Without it, the built-in synthetic Markov chain is used.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed of the synthetic Markov chain.
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Override the model's number of heads (must divide its width).
    #[arg(long)]
    heads: Option<usize>,
    /// Optimizer steps of the run (the learning-rate schedule ends here).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Stop after this step even if the run is longer (the schedule still follows --steps).
    #[arg(long)]
    until_step: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Worker threads (default: OMP_NUM_THREADS, else every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Directory for checkpoints (one `step_N` directory per save).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Save every this many steps (and at the end) when --checkpoint-dir is given.
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Resume from a checkpoint directory, or `latest` for the newest under --checkpoint-dir.
    #[arg(long)]
    resume: Option<String>,
    /// FP32 peak for MFU in GFLOP/s; measured on this machine when absent.
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// One JSON object per step on stdout.
    #[arg(long)]
    json: bool,
    /// Under data parallelism, shard the optimizer state over the ranks (ZeRO-1).
    #[arg(long)]
    zero1: bool,
}

pub fn run(a: TrainArgs) -> Result<(), String> {
    let threads = crate::init_threads(a.threads)?;
    let data = match &a.data {
        Some(path) => DataSpec::File(path.clone()),
        None => DataSpec::Synthetic { vocab: 0, seed: a.data_seed },
    };
    // torchrun's variables make this process one rank of a data-parallel group.
    let group = match comm::GroupConfig::from_env().map_err(|e| e.to_string())? {
        Some(group_cfg) if group_cfg.world_size > 1 => {
            Some(comm::ProcessGroup::connect(&group_cfg).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let env = RankEnv::from_process()?;
    let resume = match a.resume.as_deref() {
        Some("latest") => {
            let root = a.checkpoint_dir.as_ref().ok_or("--resume latest needs --checkpoint-dir")?;
            let dir = train::checkpoint::latest(root).map_err(|e| e.to_string())?;
            Some(dir.ok_or_else(|| format!("no checkpoint under {}", root.display()))?)
        }
        Some(dir) => Some(PathBuf::from(dir)),
        None => None,
    };
    let fresh_config = || -> Result<(ModelConfig, TrainConfig), String> {
        let mut model = ModelConfig::preset(&a.preset).map_err(|e| e.to_string())?;
        if let Some(h) = a.heads {
            model.n_head = h;
        }
        let cfg = TrainConfig {
            batch: a.batch,
            seq_len: a.seq,
            grad_accum: a.grad_accum,
            steps: a.steps,
            lr: a.lr,
            min_lr_ratio: a.min_lr_ratio,
            warmup_steps: a.warmup,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            seed: a.seed,
            ..TrainConfig::default()
        };
        Ok((model, cfg))
    };
    let start = rank::Start { data: &data, group, resume, steps: a.steps, zero1: a.zero1 };
    let mut trainer = rank::start(&env, start, fresh_config)?;
    let mut memory = MemoryTier::from_env(&env);
    // Rank 0 speaks for the group; the others report only errors.
    let leader = trainer.rank() == 0;
    let peak = match a.peak_gflops {
        Some(g) if g > 0.0 && g.is_finite() => g,
        Some(g) => return Err(format!("--peak-gflops {g} must be a positive number")),
        // Each rank measures its own share of the machine; the group's peak is their sum.
        None => train::peak::measure_peak(threads, 100).gflops * trainer.world_size() as f64,
    };
    let cfg = trainer.cfg.clone();
    let model_cfg = trainer.model.cfg.clone();
    let flops_per_token = model_cfg.flops_per_token(cfg.seq_len);
    let last_step = a.until_step.unwrap_or(cfg.steps).min(cfg.steps);
    if leader {
        eprintln!(
            "myriad train: {} parameters ({} layers, {} heads, width {}), batch {}x{} x{} accum",
            trainer.model.num_params(),
            model_cfg.n_layer,
            model_cfg.n_head,
            model_cfg.n_embd,
            cfg.batch,
            cfg.seq_len,
            cfg.grad_accum,
        );
        eprintln!("threads: {threads} per rank, FP32 peak {peak:.0} GFLOP/s (MFU is measured against it)");
        eprintln!("data: {}", trainer.data_description());
        if trainer.world_size() > 1 {
            eprintln!(
                "data parallel: {} ranks, {} sequences each{}",
                trainer.world_size(),
                cfg.batch / trainer.world_size(),
                if trainer.is_zero1() { ", optimizer sharded (ZeRO-1)" } else { "" }
            );
        }
        if trainer.step > 0 {
            eprintln!("resumed at step {}", trainer.step);
        }
    }

    let mut progress = Progress::new(last_step);
    let mut agent = AgentLink::connect(&env);
    let start_step = trainer.step;
    let run_start = std::time::Instant::now();
    let mut last_loss = f32::NAN;
    while trainer.step < last_step {
        let s = match trainer.train_step() {
            Ok(s) => s,
            Err(e) => {
                progress.finish();
                return Err(e.to_string());
            }
        };
        last_loss = s.loss;

        let tokens_per_s = s.tokens as f64 / (s.step_ms / 1e3);
        let mfu = tokens_per_s * flops_per_token / (peak * 1e9);
        if let Some(agent) = agent.as_mut() {
            agent.step_end(&s, mfu);
        }
        if a.json && leader {
            println!(
                "{}",
                json!({"step": s.step, "loss": s.loss, "tokens_per_s": tokens_per_s, "mfu": mfu,
                       "step_ms": s.step_ms, "lr": s.lr, "grad_norm": s.grad_norm})
            );
        }
        let done = s.step - start_step;
        let eta_s = run_start.elapsed().as_secs_f64() / done as f64 * (last_step - s.step) as f64;
        if leader {
            progress.update(
                s.step,
                &format!("loss {:.4} | {:.0} tok/s | MFU {:.1}%", s.loss, tokens_per_s, 100.0 * mfu),
                eta_s,
            );
        }
        // Only a reported step becomes restorable (train::live): its loss is never lost. Rank 0
        // writes the run's record, so only rank 0 commits now; another rank's step is committed
        // by its next update, which follows a collective rank 0 joins only once it has reported
        // the step. (A rank 1 that committed at once could leave a step restorable that rank 0,
        // stopped between its update and its line, never reported.)
        if leader {
            trainer.commit_live();
        }
        if let Some(tier) = memory.as_mut() {
            tier.maybe_save(&trainer, agent.as_mut())?;
        }
        if let Some(root) = &a.checkpoint_dir {
            let due = a.checkpoint_every > 0 && s.step % a.checkpoint_every == 0;
            if due || s.step == last_step {
                trainer.save(root).map_err(|e| e.to_string())?;
            }
        }
    }
    // The last write is reported before the run exits.
    if let Some(tier) = memory.as_mut() {
        tier.collect(agent.as_mut(), true)?;
    }
    let floor = trainer.entropy_floor().map(|f| format!(", entropy floor {f:.4}")).unwrap_or_default();
    if leader {
        eprintln!(
            "done: step {}, loss {:.4}{floor}, {:.1}s",
            trainer.step,
            last_loss,
            run_start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
