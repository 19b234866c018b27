//! Step time of one layout: per-op compute with a roofline efficiency by GEMM size, collectives
//! on the scale-up link and the network (latency + bandwidth), the pipeline bubble and overlap.
//! Then MFU, HFU, tokens/day and days to train.

use crate::hardware::{Hardware, KERNEL_LAUNCH_S, NET_LATENCY_S, SCALEUP_LATENCY_S};
use crate::layout::{Job, Layout, Software};
use crate::memory::{memory, stage_params, Memory, GIB};
use crate::model::Recompute;
use serde::Serialize;

/// Fraction of an overlapped TP collective still exposed: the first and last chunks of a
/// pipelined GEMM+collective, and the SMs the communication kernels take (Megatron-Core's
/// userbuffers overlap hides most but not all).
pub const TP_OVERLAP_EXPOSED: f64 = 0.25;

/// HBM traffic of the loss per logit: the bf16 logits written and read, cast to fp32, max, exp,
/// sum, the softmax gradient written and read back, cast again: about ten 4-byte passes.
pub const LOSS_BYTES_PER_LOGIT: f64 = 40.0;

/// Where one step's time goes (seconds), and what it yields.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub layout: Layout,
    pub memory: Memory,
    pub memory_gib: f64,
    pub fits: bool,
    pub microbatches: u64,
    pub global_batch_seqs: u64,
    pub step_s: f64,
    /// Per micro-batch on the slowest stage: compute (GEMMs, attention, element-wise), exposed
    /// TP/CP/EP communication, pipeline point-to-point.
    pub stage_compute_s: f64,
    pub stage_comm_s: f64,
    pub bubble_s: f64,
    pub dp_exposed_s: f64,
    pub optimizer_s: f64,
    pub mfu: f64,
    pub hfu: f64,
    pub tokens_per_s: f64,
    pub tokens_per_day: f64,
}

/// Seconds for a GEMM (m×k)·(k×n): the slower of compute at the calibrated ceiling and moving its
/// operands through HBM, plus a launch. Small or skinny GEMMs fall below the ceiling this way.
fn gemm_s(hw: &Hardware, peak: f64, m: f64, k: f64, n: f64) -> f64 {
    let flops = 2.0 * m * k * n;
    let bytes = 2.0 * (m * k + k * n + m * n);
    (flops / (peak * hw.calibration.gemm_eff)).max(bytes / hw.hbm_bytes_s()) + KERNEL_LAUNCH_S
}

/// Link for a group of `size` ranks placed `stride` apart: bandwidth per GPU (bytes/s), latency
/// per step, and how many group members share a node.
struct Link {
    bw: f64,
    latency: f64,
}

fn link(hw: &Hardware, stride: u64, size: u64) -> Link {
    if stride * size <= hw.scaleup_domain {
        Link { bw: hw.scaleup_bytes_s(), latency: SCALEUP_LATENCY_S }
    } else {
        Link { bw: hw.nic_bytes_s(), latency: NET_LATENCY_S }
    }
}

/// Ring all-gather or reduce-scatter of a `bytes` buffer (the full, unsharded size) over `g` ranks
/// `stride` apart, issued as `pieces` collectives (buckets, layers): each pays the ring's latency.
/// Groups that span nodes are hierarchical: inside the node over the scale-up link, across nodes
/// through the NICs of the group's members in each node.
fn gather_s(hw: &Hardware, bytes: f64, g: u64, stride: u64, pieces: f64) -> f64 {
    if g <= 1 {
        return 0.0;
    }
    let gf = g as f64;
    if stride * g <= hw.scaleup_domain {
        let l = link(hw, stride, g);
        return (gf - 1.0) / gf * bytes / l.bw + pieces * (gf - 1.0) * l.latency;
    }
    let per_node = (hw.scaleup_domain / stride.min(hw.scaleup_domain)).clamp(1, g) as f64;
    let nodes = (gf / per_node).ceil();
    let intra = if per_node > 1.0 {
        (per_node - 1.0) / per_node * bytes / hw.scaleup_bytes_s()
            + pieces * (per_node - 1.0) * SCALEUP_LATENCY_S
    } else {
        0.0
    };
    let inter = (nodes - 1.0) / nodes * bytes / (per_node * hw.nic_bytes_s())
        + pieces * (nodes - 1.0) * NET_LATENCY_S;
    intra + inter
}

/// All-reduce: reduce-scatter then all-gather in bandwidth; NCCL's trees keep the latency
/// logarithmic at scale, so the ring's latency is capped at 2·log2(g) steps per piece.
fn allreduce_s(hw: &Hardware, bytes: f64, g: u64, stride: u64, pieces: f64) -> f64 {
    if g <= 1 {
        return 0.0;
    }
    let bw_only = 2.0 * gather_s(hw, bytes, g, stride, 0.0);
    let lat = if stride * g <= hw.scaleup_domain { SCALEUP_LATENCY_S } else { NET_LATENCY_S };
    bw_only + pieces * 2.0 * (g as f64).log2().ceil() * lat
}

pub fn predict(job: &Job, hw: &Hardware, l: &Layout, sw: &Software) -> Prediction {
    let m = &job.model;
    let peak = hw.peak_tflops(job.precision) * 1e12;
    let mem = memory(job, l, sw);
    let mem_total = mem.total();
    let fits = mem_total <= hw.hbm_gib * GIB;

    let t = l.tp as f64;
    let cp = l.cp as f64;
    let b = l.micro_batch as f64;
    let s = job.seq as f64;
    let n = b * s / cp; // tokens per GPU per micro-batch
    let h = m.hidden as f64;
    let (qd, kvd) = (m.q_dim() as f64, m.kv_dim() as f64);
    // K/V heads are replicated when tp exceeds them.
    let kvd_local = (kvd / t).max(m.head_dim as f64);
    let hbm = hw.hbm_bytes_s();
    let mlp_in = if m.gated_mlp { 2.0 } else { 1.0 };

    // ---- one layer, forward, per micro-batch ----
    let attn_gemms = gemm_s(hw, peak, n, h, qd / t + 2.0 * kvd_local) + gemm_s(hw, peak, n, qd / t, h);
    let dense_mlp =
        gemm_s(hw, peak, n, h, mlp_in * m.ffn as f64 / t) + gemm_s(hw, peak, n, m.ffn as f64 / t, h);
    let attn_core_flops = 4.0 * b * (s / cp) * s * qd / t;
    let attn_core = attn_core_flops / (peak * hw.calibration.attn_eff) + 2.0 * KERNEL_LAUNCH_S;
    // Element-wise traffic (bytes per token): two norms and two residual adds of h (replicated
    // unless sequence-parallel); the activation function over the MLP width; without flash
    // attention, writing and reading the s×s scores, softmax and dropout.
    let rep_div = if l.sp { t } else { 1.0 };
    let act_bytes = |f: f64| if m.gated_mlp { 6.0 * f } else { 4.0 * f };
    let scores_bytes = if sw.flash_attention { 0.0 } else { 10.0 * m.heads as f64 * s };
    // Two norms (4h bytes a token each) and two residual adds (6h); a parallel block has one
    // norm and one three-way add (8h).
    let norm_residual_bytes = if m.parallel_block { 12.0 * h } else { 20.0 * h };
    let elem_dense = n * (norm_residual_bytes / rep_div + (act_bytes(m.ffn as f64) + scores_bytes) / t) / hbm
        + 6.0 * KERNEL_LAUNCH_S;

    // MoE MLP: local experts each take their share of the routed tokens of the EP group.
    let (moe_mlp, elem_moe, a2a) = match &m.moe {
        None => (0.0, 0.0, 0.0),
        Some(moe) => {
            let ep = l.ep as f64;
            let local = moe.experts as f64 / ep;
            let tok_per_expert = n * moe.top_k as f64 * ep / moe.experts as f64;
            let f = moe.expert_ffn as f64 / t;
            let experts = local
                * (gemm_s(hw, peak, tok_per_expert, h, mlp_in * f) + gemm_s(hw, peak, tok_per_expert, f, h));
            let shared = if moe.shared_experts > 0 {
                let fs = moe.shared_experts as f64 * moe.shared_ffn as f64 / t;
                gemm_s(hw, peak, n, h, mlp_in * fs) + gemm_s(hw, peak, n, fs, h)
            } else {
                0.0
            };
            let router = gemm_s(hw, peak, n, h, moe.experts as f64);
            let elem = n
                * (norm_residual_bytes / rep_div
                    + (moe.top_k as f64 * act_bytes(moe.expert_ffn as f64)
                        + moe.shared_experts as f64 * act_bytes(moe.shared_ffn as f64)
                        + scores_bytes)
                        / t)
                / hbm;
            // Dispatch and combine: each token's hidden state to top-k experts and back.
            let bytes = n * moe.top_k as f64 * h * 2.0 * (ep - 1.0) / ep;
            let lk = link(hw, l.tp * l.cp, l.ep);
            let a2a = if l.ep > 1 { 2.0 * (bytes / lk.bw + (ep - 1.0).min(8.0) * lk.latency) } else { 0.0 };
            (experts + shared + router, elem, a2a)
        }
    };
    let moe_frac = m.moe_layers() as f64 / m.layers as f64;
    let mlp_fwd = (1.0 - moe_frac) * dense_mlp + moe_frac * moe_mlp;
    let elem_fwd = (1.0 - moe_frac) * elem_dense + moe_frac * elem_moe;
    let gemm_fwd = attn_gemms + mlp_fwd;
    let a2a_fwd = moe_frac * a2a;

    // Tensor parallelism: two all-reduces (or all-gather + reduce-scatter pairs with SP) of the
    // layer's activations forward, two backward; one each with a parallel block.
    let act_msg = n * h * 2.0;
    let tp_reductions = if m.parallel_block { 1.0 } else { 2.0 };
    let tp_coll = if l.tp > 1 { tp_reductions * allreduce_s(hw, act_msg, l.tp, 1, 1.0) } else { 0.0 };
    let tp_exposed = |gemm: f64| {
        if sw.tp_comm_overlap && l.sp {
            (tp_coll - gemm).max(0.0) + TP_OVERLAP_EXPOSED * tp_coll.min(gemm)
        } else {
            tp_coll
        }
    };
    // Context parallelism: ring attention passes K and V around the CP group (dK, dV back),
    // overlapped with the attention core.
    let cp_fwd = if l.cp > 1 {
        let bytes = (cp - 1.0) * n * 2.0 * kvd_local * 2.0;
        let lk = link(hw, l.tp, l.cp);
        (bytes / lk.bw + (cp - 1.0) * lk.latency - attn_core).max(0.0)
    } else {
        0.0
    };

    let fwd_compute = gemm_fwd + attn_core + elem_fwd;
    let fwd_comm = tp_exposed(gemm_fwd) + cp_fwd + a2a_fwd;
    // Backward: two GEMMs per forward GEMM (input and weight gradients), the attention core twice
    // over, element-wise twice.
    let bwd_compute = 2.0 * gemm_fwd + 2.0 * attn_core + 2.0 * elem_fwd;
    let bwd_comm = tp_exposed(2.0 * gemm_fwd) + 2.0 * cp_fwd + a2a_fwd;
    let (re_compute, re_comm) = match l.recompute {
        Recompute::None => (0.0, 0.0),
        Recompute::Selective => (attn_core + n * scores_bytes / t / hbm, 0.0),
        Recompute::Full => (fwd_compute, fwd_comm),
    };
    let layer_compute = fwd_compute + bwd_compute + re_compute;
    let layer_comm = fwd_comm + bwd_comm + re_comm;

    // ---- one micro-batch on the fullest stage ----
    let stage_layers = l.layers_per_stage(m.layers) as f64;
    let vocab = m.vocab as f64;
    // Output layer and loss on the last stage (fp32 logits read and written a few times).
    let head = 3.0 * gemm_s(hw, peak, n, h, vocab / t) + n * vocab / t * LOSS_BYTES_PER_LOGIT / hbm;
    let head_comm = if l.tp > 1 { 3.0 * allreduce_s(hw, n * 4.0, l.tp, 1, 1.0) } else { 0.0 };
    // The last stage holds the output layer on top of its layers; with pp = 1 it is all one GPU.
    let stage_compute = stage_layers * layer_compute + head;
    let mut stage_comm = stage_layers * layer_comm + head_comm;
    if l.pp > 1 {
        // Activations to the next stage forward, gradients back, at each of vp chunk boundaries;
        // stages sit on different nodes.
        let msg = act_msg / if l.sp { t } else { 1.0 };
        let lk = link(hw, l.tp * l.cp * l.dp, 2);
        stage_comm += 2.0 * l.vp as f64 * (msg / lk.bw + lk.latency);
    }
    let per_mb = stage_compute + stage_comm;

    let mbs = l.microbatches(job.global_batch_seqs);
    let mbs_f = mbs as f64;
    let bubble = (l.pp as f64 - 1.0) / l.vp as f64 * per_mb;
    let pipe = mbs_f * per_mb + bubble;

    // ---- data parallelism and the optimizer ----
    let (dense_p, expert_p) = stage_params(m, l);
    let shard = l.dp * l.cp;
    let grad_b = job.precision.grad_bytes();
    // FSDP gathers and reduces layer by layer, each collective paying its latency; the others
    // stream gradient buckets back to back, so their latencies overlap and count once.
    let pieces = |_bytes: f64| if l.zero >= 3 { stage_layers.max(1.0) } else { 1.0 };
    let reduce = |per_param: f64, all: bool| {
        // reduce-scatter (all = false) or all-reduce of gradients over dp·cp (experts: dp·cp/ep)
        let f = if all { allreduce_s } else { gather_s };
        let (d, e) = (dense_p * per_param, expert_p * per_param);
        f(hw, d, shard, l.tp, pieces(d)) + f(hw, e, shard / l.ep, l.tp * l.ep, pieces(e))
    };
    let (dw, ew) = (dense_p * 2.0, expert_p * 2.0);
    let gather_params =
        gather_s(hw, dw, shard, l.tp, pieces(dw)) + gather_s(hw, ew, shard / l.ep, l.tp * l.ep, pieces(ew));
    let fwd_window = stage_layers * (fwd_compute + fwd_comm);
    let bwd_window = stage_layers * (bwd_compute + bwd_comm + re_compute + re_comm);
    let dp_exposed = if shard <= 1 {
        0.0
    } else if l.zero >= 3 {
        // FSDP: gather weights for the forward and again for the backward, reduce-scatter
        // gradients, every micro-batch; prefetching hides them behind that micro-batch's compute.
        let per_mb_comm = 2.0 * gather_params + reduce(grad_b, false);
        if sw.dp_overlap {
            mbs_f * (per_mb_comm - per_mb).max(0.0) + gather_params / stage_layers.max(1.0)
        } else {
            mbs_f * per_mb_comm
        }
    } else {
        // After the last micro-batch: all-reduce (ZeRO-0) or reduce-scatter then all-gather of the
        // updated weights (ZeRO-1/2, distributed optimizer).
        let (grad_comm, param_comm) =
            if l.zero == 0 { (reduce(grad_b, true), 0.0) } else { (reduce(grad_b, false), gather_params) };
        if sw.dp_overlap {
            (grad_comm - bwd_window).max(grad_comm / stage_layers.max(1.0))
                + (param_comm - fwd_window).max(param_comm / stage_layers.max(1.0))
        } else {
            grad_comm + param_comm
        }
    };
    // Adam over the local (sharded) parameters: fp32 master, two moments, gradient in; master,
    // moments and the 16-bit copy out.
    let opt_params =
        if l.zero >= 1 { (dense_p + expert_p * l.ep as f64) / shard as f64 } else { dense_p + expert_p };
    let optimizer = opt_params * 36.0 / hbm;

    let step = pipe + dp_exposed + optimizer;
    let seqs = mbs * l.micro_batch * l.dp;
    let tokens = (seqs * job.seq) as f64;
    let model_flops = m.model_flops_per_token(job.seq, job.convention) * tokens;
    let hw_flops = model_flops + m.recompute_flops_per_token(job.seq, l.recompute) * tokens;
    let total_peak = peak * job.gpus as f64;
    let tokens_per_s = tokens / step;
    Prediction {
        layout: *l,
        memory: mem,
        memory_gib: mem_total / GIB,
        fits,
        microbatches: mbs,
        global_batch_seqs: seqs,
        step_s: step,
        stage_compute_s: stage_compute,
        stage_comm_s: stage_comm,
        bubble_s: bubble,
        dp_exposed_s: dp_exposed,
        optimizer_s: optimizer,
        mfu: model_flops / (step * total_peak),
        hfu: hw_flops / (step * total_peak),
        tokens_per_s,
        tokens_per_day: tokens_per_s * 86400.0,
    }
}
