//! A rank under a Myriad agent: what the trainer does with the environment the agent gives it
//! (`proto::env::RankEnv`). It starts from the newest state its group holds ([`start`]), tells
//! its agent of every step on the progress socket ([`AgentLink`]), and writes in-memory
//! checkpoints into the agent's memory tier from a writer thread ([`MemoryTier`]). Without an
//! agent every piece here does nothing, and the trainer runs as a plain process.
//!
//! The trainer still knows nothing of clusters: no sockets but the agent's local Unix socket, no
//! controller, no scheduling; the contracts it follows live in `proto`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use proto::checkpoint as layout;
use proto::env::RankEnv;
use proto::progress::{Progress, ProgressEvent};

use crate::data::DataSpec;
use crate::{ModelConfig, StateCopy, StepStats, TrainConfig, Trainer};

/// Under the agent's memory directory: the ranks' live state slots ([`crate::live`]).
pub const LIVE_DIR: &str = "live";
/// In-memory checkpoints kept by the rank (the agent's buddy keeps its own two).
const MEMORY_KEEP: usize = 2;
/// A rank never waits longer than this on its agent's socket.
const PROGRESS_WRITE_TIMEOUT: Duration = Duration::from_millis(50);

/// How a rank starts: the user's explicit `--resume` directory if any, else what its agent and
/// group hold, else from scratch.
pub struct Start<'a> {
    pub data: &'a DataSpec,
    pub group: Option<comm::ProcessGroup>,
    /// A checkpoint directory the user named; it wins over anything the agent offers.
    pub resume: Option<PathBuf>,
    /// The run's length, which a resumed checkpoint's config gives way to.
    pub steps: u64,
    pub zero1: bool,
}

/// Builds this rank's trainer. `fresh` gives the model and training config of a run that does not
/// come from a checkpoint.
///
/// Under an agent (and not ZeRO-1) the state lives in the agent's memory every step, and a restart
/// takes the newest step any rank of the group holds ([`Trainer::start_live`]); MYRIAD_LIVE_STATE=0
/// turns that off, and restarts then use the checkpoint directory the agent fetched
/// (MYRIAD_RESTORE_DIR).
pub fn start(
    env: &RankEnv,
    s: Start,
    fresh: impl FnOnce() -> Result<(ModelConfig, TrainConfig), String>,
) -> Result<Trainer, String> {
    let restore_dir = env.restore_dir.as_ref().map(PathBuf::from).filter(|_| s.resume.is_none());
    let live = env.memory_checkpoint_dir.is_some() && !s.zero1 && s.resume.is_none() && env.live_state;
    if live {
        let (model, cfg) = fresh()?;
        // One rank per node keeps the slots: in data parallelism every rank's state is the same.
        let slots_dir = (env.local_rank == 0)
            .then(|| PathBuf::from(env.memory_checkpoint_dir.as_ref().expect("checked")).join(LIVE_DIR));
        return Trainer::start_live(
            model,
            cfg,
            s.data,
            s.group,
            slots_dir.as_deref(),
            restore_dir.as_deref(),
            env.restore_step,
        )
        .map_err(|e| e.to_string());
    }
    match s.resume.or(restore_dir) {
        Some(dir) => {
            Trainer::resume_in(&dir, s.data, Some(s.steps), s.group, s.zero1).map_err(|e| e.to_string())
        }
        None => {
            let (model, cfg) = fresh()?;
            let mut trainer = Trainer::new(model, cfg, s.data).map_err(|e| e.to_string())?;
            if let Some(group) = s.group {
                trainer.attach_group(group, s.zero1).map_err(|e| e.to_string())?;
            }
            Ok(trainer)
        }
    }
}

/// The rank's side of the progress protocol: when an agent launched this process, one line per
/// finished step and per finished checkpoint goes to its Unix socket. Best effort by design: a
/// rank never blocks or fails because its agent is slow or gone.
pub struct AgentLink {
    stream: Option<UnixStream>,
    job_id: u64,
    attempt: u32,
    local_rank: u32,
}

impl AgentLink {
    /// None unless this process runs under an agent that is listening.
    pub fn connect(env: &RankEnv) -> Option<AgentLink> {
        let (socket, job_id, attempt) = (env.agent_socket.as_ref()?, env.job_id?, env.attempt?);
        let stream = UnixStream::connect(socket).ok()?;
        stream.set_write_timeout(Some(PROGRESS_WRITE_TIMEOUT)).ok()?;
        Some(AgentLink { stream: Some(stream), job_id, attempt, local_rank: env.local_rank })
    }

    pub fn step_end(&mut self, s: &StepStats, mfu: f64) {
        let mut p = self.message(ProgressEvent::StepEnd);
        p.step = Some(s.step);
        p.loss = Some(f64::from(s.loss));
        p.tokens = Some(s.tokens as u64);
        p.step_ms = Some(s.step_ms);
        p.compute_ms = Some(s.compute_ms);
        p.mfu = Some(mfu);
        self.send(&p);
    }

    /// A checkpoint of `step` is complete in the agent's memory directory.
    pub fn checkpoint(&mut self, step: u64) {
        let mut p = self.message(ProgressEvent::Checkpoint);
        p.step = Some(step);
        self.send(&p);
    }

    fn message(&self, event: ProgressEvent) -> Progress {
        Progress::new(self.job_id, self.attempt, self.local_rank, event)
    }

    /// One line; after a failed write the agent is considered gone and nothing more is sent.
    fn send(&mut self, p: &Progress) {
        let Some(stream) = self.stream.as_mut() else { return };
        if stream.write_all(p.to_line().as_bytes()).is_err() {
            self.stream = None;
        }
    }
}

/// The in-memory checkpoint tier an agent offers (MYRIAD_MEMORY_CHECKPOINT_DIR): every
/// MYRIAD_CHECKPOINT_EVERY steps rank 0 writes a checkpoint there and tells its agent, which
/// copies it to another node and persists some. Ranks of a plain data-parallel group all hold the
/// same state, so rank 0's copy is the whole checkpoint.
///
/// Only the memory copy of the state holds up training; a writer thread turns it into the
/// checkpoint directory (files, SHA-256s, manifest, rename) while the next steps run, and the
/// agent hears of it once it is complete. At most one write is in flight, into one reused buffer.
pub struct MemoryTier {
    root: PathBuf,
    every: u64,
    /// Stamped into every checkpoint: no other job restores it.
    job_id: Option<u64>,
    /// The buffers of the last copy, back from its writer.
    spare: Option<StateCopy>,
    writing: Option<std::thread::JoinHandle<(StateCopy, Result<u64, String>)>>,
}

impl MemoryTier {
    /// None unless the agent offers a memory tier.
    pub fn from_env(env: &RankEnv) -> Option<MemoryTier> {
        let root = PathBuf::from(env.memory_checkpoint_dir.as_ref()?);
        Some(MemoryTier { root, every: env.checkpoint_every, job_id: env.job_id, spare: None, writing: None })
    }

    /// After a step: reports a finished write, and starts the next one when it is due.
    pub fn maybe_save(&mut self, trainer: &Trainer, mut agent: Option<&mut AgentLink>) -> Result<(), String> {
        self.collect(agent.as_deref_mut(), false)?;
        // A ZeRO-1 checkpoint needs every rank's shard in one directory; node-local memory is not
        // one (persisted --checkpoint-dir checkpoints still work).
        if !trainer.step.is_multiple_of(self.every) || trainer.is_zero1() || trainer.rank() != 0 {
            return Ok(());
        }
        // The previous write must be done before its buffer is reused (it is, unless writing
        // takes longer than `every` steps).
        self.collect(agent, true)?;
        let Some(mut state) = trainer.copy_state(self.spare.take()) else { return Ok(()) };
        state.job_id = self.job_id;
        let root = self.root.clone();
        self.writing = Some(std::thread::spawn(move || {
            let written = state.save(&root).map(|_| state.step).map_err(|e| e.to_string());
            if written.is_ok() {
                layout::prune(&root, MEMORY_KEEP);
            }
            (state, written)
        }));
        Ok(())
    }

    /// Reports a finished write to the agent; with `wait`, waits for one in flight (the last
    /// write is reported before a run exits).
    pub fn collect(&mut self, agent: Option<&mut AgentLink>, wait: bool) -> Result<(), String> {
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
