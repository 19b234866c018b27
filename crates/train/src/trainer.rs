//! One training run: model, optimizer, data and schedule, stepped one optimizer step at a time,
//! with checkpoint save and resume. Knows nothing of clusters or processes.

use crate::checkpoint::{self, Snapshot};
use crate::config::{ModelConfig, TrainConfig};
use crate::data::{DataSpec, TokenSource};
use crate::error::{Error, Result};
use crate::kernels;
use crate::live::{u64_to_words, words_to_u64, Buf, LiveSlots, StepHeader};
use crate::model::Gpt;
use crate::optim::AdamW;
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens: usize,
    pub step_ms: f64,
    /// The step's time less what this rank spent waiting on collectives after its own compute
    /// was done: in synchronous data parallelism every rank's step takes as long as the slowest
    /// one's, and only this tells the slow one apart.
    pub compute_ms: f64,
}

pub struct Trainer {
    pub model: Gpt,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    data: Box<dyn TokenSource>,
    rng: Rng,
    /// Optimizer steps completed.
    pub step: u64,
    window: Vec<u32>,
    /// Data-parallel peers; None for a single-process run.
    group: Option<comm::ProcessGroup>,
    /// The group's configured collective deadline: the ceiling of the adaptive one.
    comm_timeout_cap: std::time::Duration,
    /// Recent step times in ms, for the adaptive collective deadline (bounded ring).
    recent_step_ms: std::collections::VecDeque<f64>,
    /// The slot files the state lives in, when it is kept live ([`Trainer::keep_live`]).
    live: Option<LiveSlots>,
}

/// Collective deadlines adapt to the job: `STEP_MULTIPLE` × the median recent step, at least
/// `COMM_TIMEOUT_FLOOR`, at most the configured deadline (30 s by default). A peer that stalls
/// is then noticed in seconds on a fast job instead of always waiting the ceiling. The floor
/// stays well above a Myriad agent's hang detector (4 s by default), so a hung peer is found
/// and named by its agent before its neighbours give up on the collective, even on a loaded host.
const STEP_MULTIPLE: f64 = 10.0;
const COMM_TIMEOUT_FLOOR: std::time::Duration = std::time::Duration::from_secs(8);
const STEP_WINDOW: usize = 16;

impl Trainer {
    /// A fresh run from seeded initial weights.
    pub fn new(model_cfg: ModelConfig, cfg: TrainConfig, data: &DataSpec) -> Result<Self> {
        model_cfg.validate()?;
        cfg.validate(&model_cfg)?;
        let source = open_source(data, &model_cfg, &cfg)?;
        let model = Gpt::new(model_cfg, cfg.seed);
        let n = model.num_params();
        let rng = Rng::new(cfg.seed ^ 0x0074_7261_696e); // "train"
        Ok(Trainer::assemble(model, AdamW::new(n), rng, cfg, source, 0))
    }

    /// A single-process trainer at `step` from its parts.
    fn assemble(
        model: Gpt,
        opt: AdamW,
        rng: Rng,
        cfg: TrainConfig,
        data: Box<dyn TokenSource>,
        step: u64,
    ) -> Trainer {
        Trainer {
            model,
            opt,
            rng,
            window: vec![0; cfg.batch * cfg.seq_len + 1],
            cfg,
            data,
            step,
            group: None,
            comm_timeout_cap: comm::DEFAULT_TIMEOUT,
            recent_step_ms: Default::default(),
            live: None,
        }
    }

    /// Continues the run saved in checkpoint directory `dir`. `steps` may extend the run's length.
    pub fn resume(dir: &Path, data: &DataSpec, steps: Option<u64>) -> Result<Self> {
        Self::resume_in(dir, data, steps, None, false)
    }

    /// Continues a run as one rank of `group` (see [`Trainer::attach_group`]); a ZeRO-1
    /// checkpoint must be resumed with `zero1` on the world size that wrote it.
    pub fn resume_in(
        dir: &Path,
        data: &DataSpec,
        steps: Option<u64>,
        group: Option<comm::ProcessGroup>,
        zero1: bool,
    ) -> Result<Self> {
        let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
        let loaded = checkpoint::load_for_rank(dir, rank, world)?;
        let m = loaded.manifest;
        let mut cfg = m.train.clone();
        if let Some(steps) = steps {
            cfg.steps = steps;
        }
        cfg.validate(&m.model)?;
        let mut source = open_source(data, &m.model, &cfg)?;
        source.restore(&m.data_cursor)?;
        let model = Gpt::with_params(m.model.clone(), loaded.params);
        let opt = AdamW {
            m: loaded.exp_avg.into(),
            v: loaded.exp_avg_sq.into(),
            t: m.adam_t,
            shard: loaded.moments_range,
        };
        let (rng, step) = (Rng::from_state(m.rng_state), m.step);
        let mut trainer = Trainer::assemble(model, opt, rng, cfg, source, step);
        match group {
            Some(group) => trainer.attach_group(group, zero1)?,
            None if trainer.opt.shard.len() != trainer.model.num_params() => {
                unreachable!("load_for_rank gives a 1-rank run the whole optimizer")
            }
            None => {}
        }
        Ok(trainer)
    }

    /// Makes this run one rank of a data-parallel group: every rank reads the same global
    /// batch and trains on its share of the rows. Without `zero1` gradients are all-reduced,
    /// bucket by bucket, while backward still runs, and every rank keeps the whole optimizer.
    /// With `zero1` gradients are reduce-scattered, each rank updates only its segment of the
    /// parameters with its shard of the optimizer state, and the weights are all-gathered.
    /// Rank 0's weights are broadcast first so all ranks start equal.
    pub fn attach_group(&mut self, group: comm::ProcessGroup, zero1: bool) -> Result<()> {
        self.join_group(group, zero1, true)
    }

    /// [`Trainer::attach_group`] for ranks that already hold the same state (`broadcast` false
    /// skips sending rank 0's weights).
    fn join_group(&mut self, group: comm::ProcessGroup, zero1: bool, broadcast: bool) -> Result<()> {
        let (rank, world) = (group.rank(), group.world_size());
        if !self.cfg.batch.is_multiple_of(world) {
            return Err(Error::Config(format!(
                "batch ({}) must split evenly over WORLD_SIZE ({world}) ranks",
                self.cfg.batch
            )));
        }
        let n = self.model.num_params();
        let whole = 0..n;
        let mine = comm::segment(n, world, rank);
        if zero1 && world > 1 && self.opt.shard == whole {
            let t = self.opt.t;
            let (m, v) = (self.opt.m[mine.clone()].to_vec(), self.opt.v[mine.clone()].to_vec());
            self.opt = AdamW { m: m.into(), v: v.into(), t, shard: mine };
        } else if self.opt.shard != whole && (!zero1 || self.opt.shard != mine) {
            return Err(Error::Config(format!(
                "the optimizer state is sharded ({:?} of {n} parameters) but this rank would own {:?}; \
                 resume a ZeRO-1 checkpoint with --zero1 on the WORLD_SIZE that wrote it",
                self.opt.shard,
                if zero1 { mine } else { whole }
            )));
        }
        if broadcast {
            group.broadcast(&mut self.model.params, 0)?;
        }
        self.comm_timeout_cap = group.timeout();
        self.group = Some(group);
        Ok(())
    }

    /// Whether the optimizer holds only this rank's ZeRO-1 shard.
    pub fn is_zero1(&self) -> bool {
        self.opt.shard.len() != self.model.num_params()
    }

    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    pub fn world_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world_size())
    }

    pub fn data_description(&self) -> String {
        self.data.describe()
    }

    pub fn entropy_floor(&self) -> Option<f64> {
        self.data.entropy_floor()
    }

    /// One optimizer step: `grad_accum` micro-batches of forward and backward, gradient clipping,
    /// AdamW. A non-finite loss stops the run before the weights are touched.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        let (b, t, accum) = (self.cfg.batch, self.cfg.seq_len, self.cfg.grad_accum);
        let (rank, world) = (self.rank(), self.world_size());
        // Every rank reads the whole global batch and keeps its rows, so the data order is the
        // same at every world size.
        let rows = b / world;
        let first = rank * rows * t;
        self.model.zero_grad();
        let mut loss_sum = 0.0f64;
        let mut waited = std::time::Duration::ZERO;
        for micro in 0..accum {
            self.data.next_window(&mut self.window);
            let inputs = &self.window[first..first + rows * t];
            let targets = &self.window[first + 1..first + rows * t + 1];
            let loss = self.model.forward(inputs, targets, rows, t, 1.0 / (accum * world) as f32);
            if !loss.is_finite() {
                return Err(Error::NonFiniteLoss { step: self.step + 1, loss });
            }
            match &self.group {
                Some(group) if micro + 1 == accum && !self.is_zero1() => {
                    waited += backward_all_reduce(&mut self.model, group)?
                }
                _ => self.model.backward(),
            }
            loss_sum += loss as f64;
        }
        if let Some(group) = &self.group {
            let mut total = [loss_sum as f32];
            let at = Instant::now();
            group.all_reduce_sum(&mut total)?;
            waited += at.elapsed();
            loss_sum = total[0] as f64 / world as f64;
        }
        let zero1 = self.is_zero1();
        let shard = self.opt.shard.clone();
        let sum_squares = match &self.group {
            Some(group) if zero1 => {
                // Each rank ends with the summed gradients of its own segment.
                let at = Instant::now();
                group.reduce_scatter_sum(&mut self.model.grads)?;
                waited += at.elapsed();
                let mut local = [kernels::sum_squares(&self.model.grads[shard]) as f32];
                let at = Instant::now();
                group.all_reduce_sum(&mut local)?;
                waited += at.elapsed();
                local[0] as f64
            }
            _ => kernels::sum_squares(&self.model.grads),
        };
        let grad_norm = sum_squares.sqrt() as f32;
        if !grad_norm.is_finite() {
            return Err(Error::NonFiniteLoss { step: self.step + 1, loss: grad_norm });
        }
        let clip = self.cfg.grad_clip;
        let scale = if clip > 0.0 && grad_norm > clip { clip / grad_norm } else { 1.0 };
        let lr = self.cfg.lr_at(self.step);
        match self.live.as_mut() {
            // Out of place into the other slot, so the current one stays whole until this step is.
            Some(live) => {
                let out = live.begin_write();
                let model = &mut self.model;
                self.opt.update_into(
                    &mut model.params,
                    &model.grads,
                    &model.specs,
                    &self.cfg,
                    (lr, scale),
                    out,
                );
            }
            None => {
                let model = &mut self.model;
                self.opt.update(&mut model.params, &model.grads, &model.specs, &self.cfg, lr, scale)
            }
        }
        if let (Some(group), true) = (&self.group, zero1) {
            let at = Instant::now();
            group.all_gather(&mut self.model.params)?;
            waited += at.elapsed();
        }
        self.step += 1;
        let header = self.live.is_some().then(|| self.header());
        if let (Some(live), Some(header)) = (&mut self.live, header) {
            live.finish_write(&mut self.opt.m, &mut self.opt.v, header);
        }
        let step_ms = start.elapsed().as_secs_f64() * 1e3;
        self.adapt_comm_timeout(step_ms);
        Ok(StepStats {
            step: self.step,
            loss: (loss_sum / accum as f64) as f32,
            lr,
            grad_norm,
            tokens: self.cfg.tokens_per_step(),
            step_ms,
            compute_ms: (step_ms - waited.as_secs_f64() * 1e3).max(0.0),
        })
    }

    /// Sets the group's collective deadline from the observed step time (see `STEP_MULTIPLE`).
    fn adapt_comm_timeout(&mut self, step_ms: f64) {
        let Some(group) = &mut self.group else { return };
        if self.recent_step_ms.len() == STEP_WINDOW {
            self.recent_step_ms.pop_front();
        }
        self.recent_step_ms.push_back(step_ms);
        if self.recent_step_ms.len() < 3 {
            return; // the first steps include warm-up; keep the configured deadline
        }
        let mut sorted: Vec<f64> = self.recent_step_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let median_s = sorted[sorted.len() / 2] / 1e3;
        let adaptive = std::time::Duration::from_secs_f64(STEP_MULTIPLE * median_s);
        let cap = self.comm_timeout_cap;
        group.set_timeout(adaptive.max(COMM_TIMEOUT_FLOOR.min(cap)).min(cap));
    }

    /// The deadline collectives currently run under (None for a single process).
    pub fn comm_timeout(&self) -> Option<std::time::Duration> {
        self.group.as_ref().map(|g| g.timeout())
    }

    /// With live state: makes the last step restorable. Call it once the step has been
    /// reported (the next step does it anyway, first thing).
    pub fn commit_live(&mut self) {
        if let Some(live) = self.live.as_mut() {
            live.commit_pending();
        }
    }

    fn header(&self) -> StepHeader {
        StepHeader {
            step: self.step,
            adam_t: self.opt.t,
            rng_state: self.rng.state(),
            data_cursor: self.data.cursor(),
        }
    }

    /// From now on the state lives in `slots` and every step leaves it there whole
    /// ([`crate::live`]). `adopted`: the slot whose moments this trainer's already are (its
    /// weights a copy of that slot's); otherwise the state is copied into slot 0 once.
    pub fn keep_live(&mut self, mut slots: LiveSlots, adopted: Option<usize>) -> Result<()> {
        if self.is_zero1() {
            return Err(Error::Config(
                "live state slots need the whole optimizer state, not a ZeRO-1 shard".into(),
            ));
        }
        let current = match adopted {
            Some(k) => k,
            None => {
                slots.discard();
                let [mut weights, mut m, mut v] = slots.take_views(0);
                weights.copy_from_slice(&self.model.params);
                m.copy_from_slice(&self.opt.m);
                v.copy_from_slice(&self.opt.v);
                (self.opt.m, self.opt.v) = (m, v);
                slots.commit(0, &self.header());
                0
            }
        };
        slots.start(current);
        self.live = Some(slots);
        Ok(())
    }

    /// Starts a rank the way an agent's job needs: from the newest state any rank of the group
    /// holds (a live slot of its own, or the checkpoint directory its agent fetched), else from
    /// scratch. Ranks agree on the step over the group; those that lack it receive it from the
    /// lowest rank that has it. `slots_dir` keeps this rank's state live there from now on.
    /// `expected`: the step the controller restores, if any: with nothing at all to restore
    /// from, this rank refuses to start over from scratch.
    pub fn start_live(
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        data: &DataSpec,
        group: Option<comm::ProcessGroup>,
        slots_dir: Option<&Path>,
        restore_dir: Option<&Path>,
        expected: Option<u64>,
    ) -> Result<Self> {
        model_cfg.validate()?;
        cfg.validate(&model_cfg)?;
        let n: usize = crate::params::param_specs(&model_cfg).iter().map(|s| s.numel()).sum();
        let slots = match slots_dir {
            Some(d) => Some(LiveSlots::open(d, n, crate::live::fingerprint(&model_cfg, &cfg))?),
            None => None,
        };
        let newest_slot = slots.as_ref().and_then(|s| s.newest());
        let dir_step = match restore_dir {
            Some(d) => Some(checkpoint::read_manifest(d)?.step),
            None => None,
        };
        let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
        // Every rank's offer: its newest slot's step and its directory's step (u64::MAX: none).
        let mut table = vec![0f32; 4 * world];
        let offer = [newest_slot.as_ref().map(|(_, h)| h.step), dir_step].map(|s| s.unwrap_or(u64::MAX));
        for (i, step) in offer.into_iter().enumerate() {
            table[4 * rank + 2 * i..4 * rank + 2 * i + 2].copy_from_slice(&u64_to_words(step));
        }
        if let Some(g) = &group {
            g.all_gather(&mut table)?;
        }
        let offers: Vec<[Option<u64>; 2]> = table
            .chunks_exact(4)
            .map(|w| [words_to_u64(&w[..2]), words_to_u64(&w[2..])].map(|s| (s != u64::MAX).then_some(s)))
            .collect();
        let Some(best) = offers.iter().flatten().flatten().copied().max() else {
            if let Some(step) = expected.filter(|&s| s > 0) {
                if let Some(d) = slots_dir {
                    // Let the next attempt's agent fetch a checkpoint instead of trusting these.
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(Error::Config(format!(
                    "restart from step {step}: no rank holds live state or a checkpoint to restore"
                )));
            }
            let mut trainer = Trainer::new(model_cfg, cfg, data)?;
            if let Some(group) = group {
                trainer.attach_group(group, false)?;
            }
            if let Some(slots) = slots {
                trainer.keep_live(slots, None)?;
            }
            return Ok(trainer);
        };
        let holds = |o: &[Option<u64>; 2]| o.contains(&Some(best));
        let source = (0..world)
            .find(|&r| offers[r][0] == Some(best))
            .or_else(|| (0..world).find(|&r| offers[r][1] == Some(best)))
            .expect("someone offered the best step");
        let mut adopted = None;
        let (mut header, mut bufs): (Option<StepHeader>, [Buf; 3]) = match (&newest_slot, &offers[rank]) {
            (Some((k, h)), [Some(s), _]) if *s == best => {
                adopted = Some(*k);
                let [weights, m, v] = slots.as_ref().expect("a slot was offered").take_views(*k);
                // The weights go to the trainer's own (huge-page) memory; see LiveSlots.
                let mut params: Buf = crate::memory::zeroed(n).into();
                params.copy_from_slice(&weights);
                (Some(h.clone()), [params, m, v])
            }
            (_, [_, Some(s)]) if *s == best => {
                let dir = restore_dir.expect("a directory was offered");
                let loaded = checkpoint::load_for_rank(dir, rank, world)?;
                let m = &loaded.manifest;
                let same_train = TrainConfig { steps: cfg.steps, ..m.train.clone() } == cfg;
                if m.model != model_cfg || !same_train {
                    return Err(Error::checkpoint(
                        dir,
                        "was written by a different model or training configuration",
                    ));
                }
                let header = StepHeader {
                    step: m.step,
                    adam_t: m.adam_t,
                    rng_state: m.rng_state,
                    data_cursor: m.data_cursor.clone(),
                };
                (Some(header), [loaded.params.into(), loaded.exp_avg.into(), loaded.exp_avg_sq.into()])
            }
            _ => (None, [0, 1, 2].map(|_| crate::memory::zeroed(n).into())),
        };
        if !offers.iter().all(holds) {
            let group = group.as_ref().expect("one rank holds everything in a group of one");
            let mut words = header.as_ref().map_or([0f32; crate::live::HEADER_WORDS], StepHeader::to_words);
            group.broadcast(&mut words, source)?;
            header = Some(StepHeader::from_words(&words)?);
            for buf in bufs.iter_mut() {
                group.broadcast(buf, source)?;
            }
        }
        let header = header.expect("held or received");
        let mut source_data = open_source(data, &model_cfg, &cfg)?;
        source_data.restore(&header.data_cursor)?;
        let [params, m, v] = bufs;
        let mut trainer = Trainer::assemble(
            Gpt::with_params(model_cfg, params),
            AdamW { m, v, t: header.adam_t, shard: 0..n },
            Rng::from_state(header.rng_state),
            cfg,
            source_data,
            header.step,
        );
        if let Some(group) = group {
            trainer.join_group(group, false, false)?;
        }
        if let Some(slots) = slots {
            trainer.keep_live(slots, adopted)?;
        }
        Ok(trainer)
    }

    /// Copies the run's whole state, reusing the buffers of `into`, so that a checkpoint can be
    /// written by another thread while this one trains on. Not for ZeRO-1 runs, whose optimizer
    /// state is spread over the ranks (None then).
    pub fn copy_state(&self, into: Option<StateCopy>) -> Option<StateCopy> {
        if self.is_zero1() {
            return None;
        }
        let (mut params, mut exp_avg, mut exp_avg_sq) =
            into.map_or_else(Default::default, |c| (c.params, c.exp_avg, c.exp_avg_sq));
        for (buf, from) in
            [(&mut params, &self.model.params), (&mut exp_avg, &self.opt.m), (&mut exp_avg_sq, &self.opt.v)]
        {
            buf.clear();
            buf.extend_from_slice(from);
        }
        Some(StateCopy {
            step: self.step,
            data_cursor: self.data.cursor(),
            rng_state: self.rng.state(),
            adam_t: self.opt.t,
            model: self.model.cfg.clone(),
            train: self.cfg.clone(),
            params,
            exp_avg,
            exp_avg_sq,
            world_size: self.world_size(),
            job_id: None,
        })
    }

    /// Saves the run under `root/step_N`; returns that directory. Without ZeRO-1 every rank
    /// holds the same state, so rank 0 alone writes it. With ZeRO-1 every rank must call this:
    /// each writes its optimizer shard, and rank 0 writes the weights and the manifest listing
    /// every rank's file (the directory must be one all ranks see).
    pub fn save(&self, root: &Path) -> Result<PathBuf> {
        let (rank, world) = (self.rank(), self.world_size());
        let shard = self.is_zero1().then(|| checkpoint::Shard { rank, world, range: self.opt.shard.clone() });
        let snap = Snapshot {
            step: self.step,
            data_cursor: self.data.cursor(),
            rng_state: self.rng.state(),
            adam_t: self.opt.t,
            model: &self.model.cfg,
            train: &self.cfg,
            params: &self.model.params,
            exp_avg: &self.opt.m,
            exp_avg_sq: &self.opt.v,
            world_size: world,
            shard,
            job_id: None,
        };
        let final_dir = root.join(checkpoint::step_dir_name(self.step));
        let group = match &self.group {
            Some(group) if snap.shard.is_some() => group,
            _ if rank == 0 => return checkpoint::save(root, &snap),
            _ => return Ok(final_dir),
        };
        if rank == 0 {
            checkpoint::prepare(root, self.step)?;
        }
        group.barrier()?;
        let tmp = checkpoint::temp_dir(root, self.step);
        let mut files = checkpoint::write_parts(&tmp, &snap, rank == 0)?;
        // Every rank's shard entry (size and SHA-256, as raw bits) reaches rank 0.
        let mut table = vec![0f32; ENTRY_WORDS * world];
        table[rank * ENTRY_WORDS..(rank + 1) * ENTRY_WORDS]
            .copy_from_slice(&encode_entry(files.last().expect("a shard file")));
        group.all_gather(&mut table)?;
        if rank == 0 {
            files.truncate(1); // the weights; shard entries follow in rank order
            for (r, words) in table.chunks_exact(ENTRY_WORDS).enumerate() {
                files.push(decode_entry(checkpoint::shard_file_name(r), words));
            }
            checkpoint::commit(root, &tmp, &snap, files)?;
        }
        // Nobody moves on (or reports the checkpoint) before it is committed.
        group.barrier()?;
        Ok(final_dir)
    }
}

/// The whole state of an unsharded run at one step, owned: [`Trainer::copy_state`] fills it in a
/// memory copy, and [`StateCopy::save`] writes the same checkpoint `Trainer::save` would have, from
/// any thread.
#[derive(Clone, Debug)]
pub struct StateCopy {
    pub step: u64,
    data_cursor: crate::data::DataCursor,
    rng_state: u64,
    adam_t: u64,
    model: ModelConfig,
    train: TrainConfig,
    params: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    world_size: usize,
    /// The job the copy is for (its checkpoint carries it), when one is.
    pub job_id: Option<u64>,
}

impl StateCopy {
    /// Writes `root/step_N` (temporary name, then rename); returns that directory.
    pub fn save(&self, root: &Path) -> Result<PathBuf> {
        let snap = Snapshot {
            step: self.step,
            data_cursor: self.data_cursor.clone(),
            rng_state: self.rng_state,
            adam_t: self.adam_t,
            model: &self.model,
            train: &self.train,
            params: &self.params,
            exp_avg: &self.exp_avg,
            exp_avg_sq: &self.exp_avg_sq,
            world_size: self.world_size,
            shard: None,
            job_id: self.job_id,
        };
        checkpoint::save(root, &snap)
    }
}

/// A file entry as f32 words for a collective: 2 words of size, 8 of SHA-256 (bits, not values).
const ENTRY_WORDS: usize = 10;

fn encode_entry(entry: &checkpoint::FileEntry) -> [f32; ENTRY_WORDS] {
    let mut words = [0f32; ENTRY_WORDS];
    words[..2].copy_from_slice(&u64_to_words(entry.bytes));
    for (i, w) in words[2..].iter_mut().enumerate() {
        let hex = &entry.sha256[8 * i..8 * i + 8];
        *w = f32::from_bits(u32::from_str_radix(hex, 16).expect("sha256 is hex"));
    }
    words
}

fn decode_entry(name: String, words: &[f32]) -> checkpoint::FileEntry {
    let bytes = words_to_u64(words);
    let sha256 = words[2..].iter().map(|w| format!("{:08x}", w.to_bits())).collect();
    checkpoint::FileEntry { name, bytes, sha256 }
}

/// Backward with each gradient bucket all-reduced on a second thread as soon as it is final,
/// so communication overlaps the rest of the backward pass.
/// Backward with each gradient bucket all-reduced as soon as it is ready; returns how long the
/// rank then waited for the reductions still in flight.
fn backward_all_reduce(model: &mut Gpt, group: &comm::ProcessGroup) -> Result<std::time::Duration> {
    std::thread::scope(|scope| {
        // Bounded: one slot per bucket is all a step produces.
        let (tx, rx) = std::sync::mpsc::sync_channel::<&mut [f32]>(model.cfg.n_layer + 2);
        let comm = scope.spawn(move || -> Result<()> {
            for bucket in rx {
                group.all_reduce_sum(bucket)?;
            }
            Ok(())
        });
        // If the reducer failed it dropped its receiver; backward finishes and the error surfaces.
        model.backward_with(&mut |bucket| {
            let _ = tx.send(bucket);
        });
        drop(tx);
        let at = Instant::now();
        comm.join().expect("gradient all-reduce thread panicked")?;
        Ok(at.elapsed())
    })
}

fn open_source(data: &DataSpec, model: &ModelConfig, cfg: &TrainConfig) -> Result<Box<dyn TokenSource>> {
    let spec = match data {
        // The chain covers the model's real vocabulary unless told otherwise.
        DataSpec::Synthetic { vocab: 0, seed } => {
            DataSpec::Synthetic { vocab: model.vocab_size, seed: *seed }
        }
        other => other.clone(),
    };
    let source = spec.open(cfg.batch * cfg.seq_len + 1)?;
    if source.vocab_bound() > model.vocab_size {
        let reason = format!(
            "holds token ids up to {} but the model's vocabulary is {} (use a preset with a larger vocabulary)",
            source.vocab_bound() - 1,
            model.vocab_size
        );
        return Err(match &spec {
            DataSpec::File(path) => Error::data(path, reason),
            DataSpec::Synthetic { .. } => Error::Config(format!("synthetic data {reason}")),
        });
    }
    Ok(source)
}
