//! A parallel layout and the job it runs, with the rules a layout must keep.

use crate::error::{PlanError, Result};
use crate::hardware::Hardware;
use crate::model::{FlopsConvention, Model, Recompute};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Precision {
    /// FP16 mixed precision (fp16 gradients all-reduced).
    Fp16,
    /// BF16 mixed precision (fp32 gradient accumulation and reduction, as Megatron forces for bf16).
    Bf16,
    /// FP8 GEMMs (peak from the FP8 column), bf16 elsewhere.
    Fp8,
}

impl Precision {
    /// Bytes per gradient element in the gradient buffer and its reduction.
    pub fn grad_bytes(self) -> f64 {
        match self {
            Precision::Fp16 => 2.0,
            _ => 4.0,
        }
    }
}

/// What is being trained: model, sequence, batch, precision, GPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub model: Model,
    pub seq: u64,
    /// Sequences per optimizer step (the search rounds it to a multiple of dp × micro-batch).
    pub global_batch_seqs: u64,
    pub gpus: u64,
    pub precision: Precision,
    pub convention: FlopsConvention,
}

/// The framework's abilities: they change which overlaps the step-time model credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Software {
    /// Tensor-parallel collectives overlapped with GEMMs (Megatron-Core `--tp-comm-overlap`).
    pub tp_comm_overlap: bool,
    /// Gradient reduction overlapped with the backward pass and parameter gathers with the
    /// forward (Megatron `--overlap-grad-reduce/--overlap-param-gather`, FSDP, DeepSpeed).
    pub dp_overlap: bool,
    /// Flash attention: the s×s score matrix is never stored.
    pub flash_attention: bool,
    /// Pipeline stages may hold unequal layer counts (the slowest sets the pace).
    pub uneven_pipeline: bool,
    /// Tensor (and context) parallelism may span nodes.
    pub tp_across_nodes: bool,
}

impl Default for Software {
    fn default() -> Self {
        Software {
            tp_comm_overlap: true,
            dp_overlap: true,
            flash_attention: true,
            uneven_pipeline: true,
            tp_across_nodes: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Hash)]
pub struct Layout {
    pub tp: u64,
    pub pp: u64,
    /// Virtual pipeline stages per GPU (interleaved 1F1B); 1 = plain 1F1B.
    pub vp: u64,
    pub dp: u64,
    pub cp: u64,
    /// Expert parallelism, carved out of the data-parallel ranks.
    pub ep: u64,
    pub micro_batch: u64,
    /// ZeRO stage: 0 none, 1 optimizer states (= Megatron's distributed optimizer), 2 + gradients,
    /// 3 + weights (= FSDP full shard).
    pub zero: u8,
    pub recompute: Recompute,
    /// Megatron sequence parallelism (norms and dropout split across the TP group).
    pub sp: bool,
}

impl Layout {
    pub fn gpus(&self) -> u64 {
        self.tp * self.pp * self.dp * self.cp
    }

    /// Micro-batches per pipeline per step for a target batch: rounded to the nearest whole
    /// number, at least one.
    pub fn microbatches(&self, global_batch_seqs: u64) -> u64 {
        let per = self.dp * self.micro_batch;
        ((global_batch_seqs + per / 2) / per).max(1)
    }

    /// Layers on the fullest pipeline stage: vp chunks of ceil(layers / (pp·vp)) each (uneven
    /// splits give the first or last stages fewer, as Megatron's first/last-stage layer counts do).
    pub fn layers_per_stage(&self, layers: u64) -> u64 {
        self.vp * layers.div_ceil(self.pp * self.vp)
    }

    /// Checks every divisibility and placement rule; the error names the first one broken.
    pub fn check(&self, job: &Job, hw: &Hardware, sw: &Software) -> Result<()> {
        let m = &job.model;
        let fail = |constraint: &str, detail: String| {
            Err(PlanError::Layout { constraint: constraint.into(), detail })
        };
        for (name, v) in [
            ("tp", self.tp),
            ("pp", self.pp),
            ("vp", self.vp),
            ("dp", self.dp),
            ("cp", self.cp),
            ("ep", self.ep),
            ("micro_batch", self.micro_batch),
        ] {
            if v == 0 {
                return fail(&format!("{name} >= 1"), format!("{name} is 0"));
            }
        }
        if self.gpus() != job.gpus {
            return fail(
                "tp * pp * dp * cp == gpus",
                format!(
                    "{}×{}×{}×{} = {} but the job has {} GPUs",
                    self.tp,
                    self.pp,
                    self.dp,
                    self.cp,
                    self.gpus(),
                    job.gpus
                ),
            );
        }
        if !m.heads.is_multiple_of(self.tp) {
            return fail("heads % tp == 0", format!("{} heads over tp {}", m.heads, self.tp));
        }
        if !(m.kv_heads.is_multiple_of(self.tp) || self.tp.is_multiple_of(m.kv_heads)) {
            return fail(
                "kv_heads % tp == 0 or tp % kv_heads == 0",
                format!("{} kv heads over tp {}", m.kv_heads, self.tp),
            );
        }
        if !m.ffn.is_multiple_of(self.tp) {
            return fail("ffn % tp == 0", format!("ffn {} over tp {}", m.ffn, self.tp));
        }
        let chunks = self.pp * self.vp;
        if chunks > m.layers {
            return fail(
                "pp * vp <= layers",
                format!("pp {} × vp {} but {} layers", self.pp, self.vp, m.layers),
            );
        }
        if !(m.layers.is_multiple_of(chunks) || sw.uneven_pipeline) {
            return fail(
                "layers % (pp * vp) == 0",
                format!("{} layers over pp {} × vp {}", m.layers, self.pp, self.vp),
            );
        }
        if self.vp > 1 {
            if self.pp == 1 {
                return fail("vp == 1 when pp == 1", format!("vp {} without pipeline", self.vp));
            }
            let mb = self.microbatches(job.global_batch_seqs);
            if !mb.is_multiple_of(self.pp) {
                return fail(
                    "microbatches % pp == 0 (interleaved schedule)",
                    format!("{mb} micro-batches over pp {}", self.pp),
                );
            }
        }
        if self.cp > 1 && !job.seq.is_multiple_of(2 * self.cp) {
            return fail("seq % (2 * cp) == 0", format!("seq {} over cp {}", job.seq, self.cp));
        }
        match &m.moe {
            None if self.ep > 1 => return fail("ep == 1 for a dense model", format!("ep {}", self.ep)),
            Some(moe) => {
                if !moe.experts.is_multiple_of(self.ep) {
                    return fail("experts % ep == 0", format!("{} experts over ep {}", moe.experts, self.ep));
                }
                if !(self.dp * self.cp).is_multiple_of(self.ep) {
                    return fail(
                        "(dp * cp) % ep == 0",
                        format!("ep {} over dp {} × cp {}", self.ep, self.dp, self.cp),
                    );
                }
            }
            None => {}
        }
        if self.zero > 3 {
            return fail("zero <= 3", format!("zero {}", self.zero));
        }
        if !sw.tp_across_nodes && self.tp > hw.scaleup_domain {
            return fail(
                "tp <= GPUs per scale-up domain",
                format!(
                    "tp {} but {} GPUs share a scale-up link (allow with tp_across_nodes)",
                    self.tp, hw.scaleup_domain
                ),
            );
        }
        Ok(())
    }
}
