//! AdamW with decoupled weight decay (PyTorch's ordering: decay, then the Adam update), applied
//! in one fused pass per tensor, with the gradient-norm clip folded in as a scale.

use crate::config::TrainConfig;
use crate::live::Buf;
use crate::params::TensorSpec;
use rayon::prelude::*;
use std::ops::Range;

pub struct AdamW {
    /// First moment (exp_avg) of the parameters in `shard`, indexed from `shard.start`.
    pub m: Buf,
    /// Second moment (exp_avg_sq), laid out like `m`.
    pub v: Buf,
    /// Updates applied so far; bias correction uses it.
    pub t: u64,
    /// The range of the flat parameter buffer this optimizer owns: all of it, or one rank's
    /// segment under ZeRO-1.
    pub shard: Range<usize>,
}

const ELEMS_PER_TASK: usize = 1 << 14;

/// Where one update reads and writes: in place (outputs = inputs) or into other buffers.
/// Parameters and gradients are indexed globally, moments from the shard's start.
#[derive(Clone, Copy)]
struct Lanes {
    p_in: *const f32,
    p_out: *mut f32,
    /// A second destination for the new weights, or null.
    p_copy: *mut f32,
    g: *const f32,
    m_in: *const f32,
    m_out: *mut f32,
    v_in: *const f32,
    v_out: *mut f32,
}

// SAFETY: tasks touch disjoint index ranges of these buffers, which outlive the parallel loop.
unsafe impl Send for Lanes {}
unsafe impl Sync for Lanes {}

impl AdamW {
    /// An optimizer over all `n` parameters.
    pub fn new(n: usize) -> Self {
        Self::for_shard(0..n)
    }

    /// An optimizer that owns only `shard` of the parameters (ZeRO-1).
    pub fn for_shard(shard: Range<usize>) -> Self {
        let n = shard.len();
        AdamW { m: crate::memory::zeroed(n).into(), v: crate::memory::zeroed(n).into(), t: 0, shard }
    }

    /// One update of the owned shard, in place. `params` and `grads` are the full flat buffers;
    /// `grad_scale` multiplies every gradient first (the clip factor).
    pub fn update(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        specs: &[TensorSpec],
        cfg: &TrainConfig,
        lr: f32,
        grad_scale: f32,
    ) {
        assert_eq!(params.len(), grads.len());
        assert!(self.shard.end <= params.len());
        assert_eq!(self.m.len(), self.shard.len());
        let (p, m, v) = (params.as_mut_ptr(), self.m.as_mut_ptr(), self.v.as_mut_ptr());
        let lanes = Lanes {
            p_in: p,
            p_out: p,
            p_copy: std::ptr::null_mut(),
            g: grads.as_ptr(),
            m_in: m,
            m_out: m,
            v_in: v,
            v_out: v,
        };
        self.apply(lanes, specs, cfg, lr, grad_scale);
    }

    /// One update of all parameters (no shard) for a live state ([`crate::live`]): the weights
    /// are updated in place and copied into `out`, the moments are read from this optimizer
    /// and written into `out`, leaving these as they were. The same arithmetic, so the same
    /// bits, as [`AdamW::update`]; the caller then swaps `out`'s moments in.
    pub fn update_into(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        specs: &[TensorSpec],
        cfg: &TrainConfig,
        (lr, grad_scale): (f32, f32),
        out: crate::live::SlotOutputs,
    ) {
        let n = params.len();
        assert!(grads.len() == n && self.shard == (0..n), "update_into takes the whole, unsharded state");
        assert!([out.weights.len(), out.exp_avg.len(), out.exp_avg_sq.len(), self.m.len(), self.v.len()]
            .iter()
            .all(|&len| len == n));
        let p = params.as_mut_ptr();
        let lanes = Lanes {
            p_in: p,
            p_out: p,
            p_copy: out.weights.as_mut_ptr(),
            g: grads.as_ptr(),
            m_in: self.m.as_ptr(),
            m_out: out.exp_avg.as_mut_ptr(),
            v_in: self.v.as_ptr(),
            v_out: out.exp_avg_sq.as_mut_ptr(),
        };
        self.apply(lanes, specs, cfg, lr, grad_scale);
    }

    fn apply(&mut self, lanes: Lanes, specs: &[TensorSpec], cfg: &TrainConfig, lr: f32, grad_scale: f32) {
        self.t += 1;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let base = self.shard.start;
        for spec in specs {
            // The part of this tensor inside the shard, if any.
            let r = spec.range().start.max(self.shard.start)..spec.range().end.min(self.shard.end);
            if r.is_empty() {
                continue;
            }
            let decay = if spec.decay { 1.0 - lr * cfg.weight_decay } else { 1.0 };
            let tasks = r.len().div_ceil(ELEMS_PER_TASK);
            (0..tasks).into_par_iter().for_each(|task| {
                let start = r.start + task * ELEMS_PER_TASK;
                let end = (start + ELEMS_PER_TASK).min(r.end);
                let l = lanes;
                let copy = !l.p_copy.is_null();
                for i in start..end {
                    let j = i - base;
                    // SAFETY: i < params' length and j < the moments' (asserted by the callers);
                    // each index is read, then written, by this task alone, so outputs that
                    // alias the inputs are fine.
                    unsafe {
                        let gi = *l.g.add(i) * grad_scale;
                        let m = b1 * *l.m_in.add(j) + (1.0 - b1) * gi;
                        let v = b2 * *l.v_in.add(j) + (1.0 - b2) * gi * gi;
                        *l.m_out.add(j) = m;
                        *l.v_out.add(j) = v;
                        let mhat = m / bc1;
                        let vhat = v / bc2;
                        let p = *l.p_in.add(i) * decay - lr * mhat / (vhat.sqrt() + eps);
                        *l.p_out.add(i) = p;
                        if copy {
                            *l.p_copy.add(i) = p;
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_scalar_adamw_reference() {
        let specs = vec![
            TensorSpec { name: "w".into(), shape: vec![3], offset: 0, decay: true },
            TensorSpec { name: "b".into(), shape: vec![2], offset: 3, decay: false },
        ];
        let cfg = TrainConfig { weight_decay: 0.1, ..Default::default() };
        let mut p = vec![0.5f32, -1.0, 2.0, 0.3, -0.3];
        let g = [0.1f32, 0.2, -0.3, 0.4, -0.5];
        let mut want: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0f64; 5], vec![0f64; 5]);
        let mut opt = AdamW::new(5);
        for step in 1..=3 {
            opt.update(&mut p, &g, &specs, &cfg, 0.01, 0.5);
            for i in 0..5 {
                let gi = g[i] as f64 * 0.5;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let mhat = m[i] / (1.0 - 0.9f64.powi(step));
                let vhat = v[i] / (1.0 - 0.95f64.powi(step));
                let decay = if i < 3 { 1.0 - 0.01 * 0.1 } else { 1.0 };
                want[i] = want[i] * decay - 0.01 * mhat / (vhat.sqrt() + 1e-8);
            }
        }
        for (a, b) in p.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }

        // Two shards that split a tensor update exactly what the whole optimizer does.
        let mut q = vec![0.5f32, -1.0, 2.0, 0.3, -0.3];
        let (mut lo, mut hi) = (AdamW::for_shard(0..2), AdamW::for_shard(2..5));
        for _ in 0..3 {
            lo.update(&mut q, &g, &specs, &cfg, 0.01, 0.5);
            hi.update(&mut q, &g, &specs, &cfg, 0.01, 0.5);
        }
        assert_eq!(q, p, "sharded updates differ from the whole optimizer");
    }
}
