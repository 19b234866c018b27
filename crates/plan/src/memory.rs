//! Memory per GPU: weights, gradients, optimizer states, activations (Korthikanti et al. 2022)
//! and buffers.

use crate::layout::{Job, Layout, Software};
use crate::model::{Model, Recompute};
use serde::Serialize;

pub const GIB: f64 = (1u64 << 30) as f64;

/// CUDA context, NCCL channels and communication buckets, allocator slack: a fixed reserve.
pub const RESERVED_BYTES: f64 = 3.0 * GIB;

/// Activation bytes of one transformer layer for one micro-batch of `b` sequences of `s` tokens
/// (16-bit activations), Korthikanti et al. 2022 §4 and Table 2, for a GPT layer
/// (MHA, 4h GELU MLP, with dropout):
/// - no parallelism: sbh(34 + 5as/h)
/// - tensor parallel t: sbh(10 + 24/t + 5as/(ht))
/// - tensor + sequence parallel: sbh(34/t + 5as/(ht))
/// - + selective recomputation: the 5as/(ht) term goes
/// - full recomputation: 2sbh (2sbh/t with sequence parallelism).
///
/// Generalised the same way for GQA (K and V are kv_dim wide), SwiGLU (three ffn-wide tensors)
/// and MoE (routed tokens × top-k through experts); without dropout its masks go. `flash` drops
/// the s×s tensors as selective recomputation does.
#[allow(clippy::too_many_arguments)]
pub fn layer_activation_bytes(
    m: &Model,
    moe_layer: bool,
    s: f64,
    b: f64,
    t: f64,
    sp: bool,
    r: Recompute,
    flash: bool,
) -> f64 {
    let h = m.hidden as f64;
    let sbh = s * b * h;
    let rep_div = if sp { t } else { 1.0 };
    if r == Recompute::Full {
        return 2.0 * sbh / rep_div;
    }
    // Replicated across the TP group unless sequence-parallel: two LayerNorm inputs (4sbh), the
    // inputs of QKV and of the MLP (2sbh each), two dropout masks (sbh each).
    // A parallel block has one norm, whose output feeds both branches: 4sbh fewer.
    let rep = (if m.dropout { 10.0 } else { 8.0 } - if m.parallel_block { 4.0 } else { 0.0 }) * sbh;
    // Split across TP: Q, K, V, the output projection's input, the MLP's intermediates.
    let (qd, kvd) = (m.q_dim() as f64, m.kv_dim() as f64);
    let attn = s * b * (2.0 * qd + 4.0 * kvd + 2.0 * qd);
    let per_ffn = |f: f64| if m.gated_mlp { 6.0 * s * b * f } else { 4.0 * s * b * f };
    let mlp = match (&m.moe, moe_layer) {
        (Some(moe), true) => {
            moe.top_k as f64 * per_ffn(moe.expert_ffn as f64)
                + moe.shared_experts as f64 * per_ffn(moe.shared_ffn as f64)
        }
        _ => per_ffn(m.ffn as f64),
    };
    // Softmax output (2as²b); with dropout also its mask (as²b) and output (2as²b).
    let per_score = if m.dropout { 5.0 } else { 2.0 };
    let scores = if r == Recompute::None && !flash { per_score * m.heads as f64 * s * s * b } else { 0.0 };
    rep / rep_div + (attn + mlp + scores) / t
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub buffers: f64,
}

impl Memory {
    pub fn total(&self) -> f64 {
        self.weights + self.grads + self.optimizer + self.activations + self.buffers
    }
}

/// Parameters on the GPU of the fullest pipeline stage (its share after TP and EP), as
/// (dense part, expert part).
pub fn stage_params(m: &Model, l: &Layout) -> (f64, f64) {
    let layers = l.layers_per_stage(m.layers) as f64;
    let t = l.tp as f64;
    let h = m.hidden as f64;
    let vector = 2.0 * h; // norms; small
    let moe_frac = m.moe_layers() as f64 / m.layers as f64;
    let dense_mlp = (1.0 - moe_frac) * m.dense_mlp_params() as f64;
    let mut dense = layers * ((m.attn_matmul_params() as f64 + dense_mlp) / t + vector);
    let mut expert = 0.0;
    if m.moe.is_some() {
        let (all, _) = m.moe_mlp_params();
        expert = layers * moe_frac * all as f64 / (t * l.ep as f64);
    }
    // Embedding on the first stage, output layer on the last; one GPU holds both when pp = 1
    // (a tied pair then once). Count the heavier end.
    let emb = (m.vocab * m.hidden) as f64 / t;
    let ends = if l.pp == 1 && m.tied_embeddings {
        emb
    } else if l.pp == 1 {
        2.0 * emb
    } else {
        emb
    };
    dense += ends;
    (dense, expert)
}

/// Layers per pipeline stage: `layers` over pp·vp chunks of ceil(layers/(pp·vp)); an uneven
/// split takes the missing layers from the first and last stages (Megatron's
/// `--decoder-first/last-pipeline-num-layers`, Llama 3's "one layer fewer on the first and the
/// last stages").
pub fn stage_layers(layers: u64, pp: u64, vp: u64) -> Vec<u64> {
    let per_stage = vp * layers.div_ceil(pp * vp);
    let mut stages = vec![per_stage; pp as usize];
    let mut missing = per_stage * pp - layers.min(per_stage * pp);
    // First, last, second, second to last, ...: each stage once, keeping at least one layer
    // (a layout with fewer layers than stages is refused by `Layout::check` before this).
    for i in 0..pp as usize {
        let at = if i % 2 == 0 { i / 2 } else { pp as usize - 1 - i / 2 };
        let take = missing.min(stages[at] - 1);
        stages[at] -= take;
        missing -= take;
    }
    stages
}

/// The most layer-activations (layers × micro-batches held) any one stage keeps in flight under
/// 1F1B: stage i holds min(mbs, pp − i) micro-batches; interleaved (vp > 1), it holds
/// 2(pp − i − 1) + (vp − 1)·pp + 1 chunks of a micro-batch (Megatron's warm-up count, plus one),
/// each chunk a vp-th of its layers. The first stage holds the most micro-batches, so an uneven
/// split that thins it moves the peak to the second.
pub fn peak_stage_layers_in_flight(layers: u64, l: &Layout, mbs: u64) -> f64 {
    if l.pp == 1 {
        return layers as f64;
    }
    let (pp, vp) = (l.pp, l.vp);
    stage_layers(layers, pp, vp)
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let i = i as u64;
            let chunks =
                if vp == 1 { mbs.min(pp - i) } else { (mbs * vp).min(2 * (pp - i - 1) + (vp - 1) * pp + 1) };
            chunks as f64 * n as f64 / vp as f64
        })
        .fold(0.0, f64::max)
}

pub fn memory(job: &Job, l: &Layout, sw: &Software) -> Memory {
    let m = &job.model;
    let (dense, expert) = stage_params(m, l);
    let params = dense + expert;
    let shard = (l.dp * l.cp) as f64;
    // Experts are replicated over fewer ranks: dp·cp/ep.
    let expert_shard = shard / l.ep as f64;
    let sharded = |per: f64, on: bool| {
        if on {
            per * (dense / shard + expert / expert_shard)
        } else {
            per * params
        }
    };
    let grad_b = job.precision.grad_bytes();
    let mut weights = sharded(2.0, l.zero >= 3);
    if l.zero >= 3 {
        // Gathered working copies: the layer being computed and the one prefetched.
        let per_layer = params / l.layers_per_stage(m.layers).max(1) as f64;
        weights += 2.0 * 2.0 * per_layer;
    }
    let grads = sharded(grad_b, l.zero >= 2);
    // fp32 master weights and Adam's two moments.
    let optimizer = sharded(12.0, l.zero >= 1);

    let s = job.seq as f64 / l.cp as f64;
    let b = l.micro_batch as f64;
    let t = l.tp as f64;
    let moe_frac = m.moe_layers() as f64 / m.layers as f64;
    let per_layer = |r| {
        (1.0 - moe_frac) * layer_activation_bytes(m, false, s, b, t, l.sp, r, sw.flash_attention)
            + moe_frac * layer_activation_bytes(m, true, s, b, t, l.sp, r, sw.flash_attention)
    };
    let mbs = l.microbatches(job.global_batch_seqs);
    let mut activations = peak_stage_layers_in_flight(m.layers, l, mbs) * per_layer(l.recompute);
    if l.recompute == Recompute::Full {
        // The layer being recomputed holds its full activations for the backward pass.
        activations += per_layer(Recompute::None);
    }
    // Output layer: fp32 logits and their gradient for one micro-batch, split over TP, on the last
    // stage, which holds one micro-batch in flight: beside the peak stage's only without a pipeline.
    let logits = 2.0 * 4.0 * s * b * m.vocab as f64 / t;
    if l.pp == 1 {
        activations += logits;
    } else {
        let last = *stage_layers(m.layers, l.pp, l.vp).last().expect("pp >= 1") as f64;
        activations = activations.max(last * per_layer(l.recompute) + logits);
    }
    Memory { weights, grads, optimizer, activations, buffers: RESERVED_BYTES }
}
