//! `myriad train`: one training run of the reference trainer, with progress, JSON per step,
//! periodic checkpoints and resume.

use crate::progress::Progress;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use train::data::DataSpec;
use train::{ModelConfig, TrainConfig, Trainer};

/// Under the agent's memory directory: this rank's live state slots (train::live).
const LIVE_DIR: &str = "live";

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
    // Launched by an agent after a failure: start from the checkpoint it verified for us.
    let restore_dir = std::env::var_os("MYRIAD_RESTORE_DIR").filter(|_| a.resume.is_none());
    let resume = a.resume.clone().or_else(|| restore_dir.map(|d| d.to_string_lossy().into_owned()));
    let mut memory = MemoryTier::from_env()?;
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
    let mut trainer = match (&memory, &resume) {
        // Under an agent (and not ZeRO-1): the state lives in the agent's memory every step, and
        // a restart takes the newest step any rank holds (see train::live). MYRIAD_LIVE_STATE=0
        // turns that off (restarts then use the checkpoint directories alone).
        (Some(tier), _) if !a.zero1 && a.resume.is_none() && live_state_enabled() => {
            let (model, cfg) = fresh_config()?;
            // One rank per node keeps the slots: in data parallelism every rank's state is the same.
            let keeper = std::env::var("LOCAL_RANK").ok().is_none_or(|l| l.trim() == "0");
            let slots_dir = keeper.then(|| tier.root.join(LIVE_DIR));
            let expected = match std::env::var("MYRIAD_RESTORE_STEP") {
                Ok(v) => {
                    Some(v.parse::<u64>().map_err(|_| format!("MYRIAD_RESTORE_STEP={v:?} is not a step"))?)
                }
                Err(_) => None,
            };
            let restore_dir = resume.as_ref().map(PathBuf::from);
            Trainer::start_live(
                model,
                cfg,
                &data,
                group,
                slots_dir.as_deref(),
                restore_dir.as_deref(),
                expected,
            )
            .map_err(|e| e.to_string())?
        }
        (_, Some(which)) => {
            let dir = if which == "latest" {
                let root = a.checkpoint_dir.as_ref().ok_or("--resume latest needs --checkpoint-dir")?;
                train::checkpoint::latest(root)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no checkpoint under {}", root.display()))?
            } else {
                PathBuf::from(which)
            };
            Trainer::resume_in(&dir, &data, Some(a.steps), group, a.zero1).map_err(|e| e.to_string())?
        }
        (_, None) => {
            let (model, cfg) = fresh_config()?;
            let mut trainer = Trainer::new(model, cfg, &data).map_err(|e| e.to_string())?;
            if let Some(group) = group {
                trainer.attach_group(group, a.zero1).map_err(|e| e.to_string())?;
            }
            trainer
        }
    };
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
    let mut agent = crate::agent_progress::AgentProgress::from_env();
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
        // Only a reported step becomes restorable (train::live): its loss is never lost.
        trainer.commit_live();
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

/// The in-memory checkpoint tier a Myriad agent offers (MYRIAD_MEMORY_CHECKPOINT_DIR): every
/// MYRIAD_CHECKPOINT_EVERY steps rank 0 writes a checkpoint there and tells its agent, which
/// copies it to another node and persists some. Ranks of a plain data-parallel group all hold the
/// same state, so rank 0's copy is the whole checkpoint.
///
/// Only the memory copy of the state holds up training; a writer thread turns it into the
/// checkpoint directory (files, SHA-256s, manifest, rename) while the next steps run, and the
/// agent hears of it once it is complete. At most one write is in flight, into one reused buffer.
struct MemoryTier {
    root: PathBuf,
    every: u64,
    /// The buffers of the last copy, back from its writer.
    spare: Option<train::StateCopy>,
    writing: Option<std::thread::JoinHandle<(train::StateCopy, Result<u64, String>)>>,
}

/// In-memory checkpoints kept by the rank (the agent's buddy keeps its own two).
const MEMORY_KEEP: usize = 2;

type Agent<'a> = Option<&'a mut crate::agent_progress::AgentProgress>;

impl MemoryTier {
    fn from_env() -> Result<Option<MemoryTier>, String> {
        let Some(root) = std::env::var_os("MYRIAD_MEMORY_CHECKPOINT_DIR") else { return Ok(None) };
        let every = match std::env::var("MYRIAD_CHECKPOINT_EVERY") {
            Ok(v) => v
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("MYRIAD_CHECKPOINT_EVERY={v:?} is not a positive integer"))?,
            Err(_) => 1,
        };
        Ok(Some(MemoryTier { root: PathBuf::from(root), every, spare: None, writing: None }))
    }

    fn maybe_save(&mut self, trainer: &Trainer, mut agent: Agent) -> Result<(), String> {
        self.collect(agent.as_deref_mut(), false)?;
        // A ZeRO-1 checkpoint needs every rank's shard in one directory; node-local memory is not
        // one (persisted --checkpoint-dir checkpoints still work).
        if !trainer.step.is_multiple_of(self.every) || trainer.is_zero1() || trainer.rank() != 0 {
            return Ok(());
        }
        // The previous write must be done before its buffer is reused (it is, unless writing
        // takes longer than `every` steps).
        self.collect(agent, true)?;
        let Some(state) = trainer.copy_state(self.spare.take()) else { return Ok(()) };
        let root = self.root.clone();
        self.writing = Some(std::thread::spawn(move || {
            let written = state.save(&root).map(|_| state.step).map_err(|e| e.to_string());
            if written.is_ok() {
                prune_checkpoints(&root, MEMORY_KEEP);
            }
            (state, written)
        }));
        Ok(())
    }

    /// Reports a finished write to the agent; with `wait`, waits for one in flight.
    fn collect(&mut self, agent: Agent, wait: bool) -> Result<(), String> {
        if self.writing.as_ref().is_none_or(|w| !wait && !w.is_finished()) {
            return Ok(());
        }
        let writer = self.writing.take().expect("checked above");
        let (state, written) = writer.join().map_err(|_| "in-memory checkpoint: the writer panicked")?;
        self.spare = Some(state);
        let step = written.map_err(|e| format!("in-memory checkpoint: {e}"))?;
        if let Some(agent) = agent {
            agent.checkpoint(step);
        }
        Ok(())
    }
}

fn live_state_enabled() -> bool {
    std::env::var("MYRIAD_LIVE_STATE").map_or(true, |v| v.trim() != "0")
}

/// Keeps the newest `keep` complete `step_N` directories under `root`.
fn prune_checkpoints(root: &std::path::Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix("step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort_unstable_by_key(|(s, _)| std::cmp::Reverse(*s));
    for (_, dir) in steps.into_iter().skip(keep) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
