//! AdamW with decoupled weight decay (PyTorch's ordering: decay, then the Adam update), applied
//! in one fused pass per tensor, with the gradient-norm clip folded in as a scale.

use crate::config::TrainConfig;
use crate::params::TensorSpec;
use rayon::prelude::*;
use std::ops::Range;

pub struct AdamW {
    /// First moment (exp_avg) of the parameters in `shard`, indexed from `shard.start`.
    pub m: Vec<f32>,
    /// Second moment (exp_avg_sq), laid out like `m`.
    pub v: Vec<f32>,
    /// Updates applied so far; bias correction uses it.
    pub t: u64,
    /// The range of the flat parameter buffer this optimizer owns: all of it, or one rank's
    /// segment under ZeRO-1.
    pub shard: Range<usize>,
}

const ELEMS_PER_TASK: usize = 1 << 14;

impl AdamW {
    /// An optimizer over all `n` parameters.
    pub fn new(n: usize) -> Self {
        Self::for_shard(0..n)
    }

    /// An optimizer that owns only `shard` of the parameters (ZeRO-1).
    pub fn for_shard(shard: Range<usize>) -> Self {
        let n = shard.len();
        AdamW { m: crate::memory::zeroed(n), v: crate::memory::zeroed(n), t: 0, shard }
    }

    /// One update of the owned shard. `params` and `grads` are the full flat buffers;
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
            let local = r.start - base..r.end - base;
            let decay = if spec.decay { 1.0 - lr * cfg.weight_decay } else { 1.0 };
            params[r.clone()]
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(grads[r].par_chunks(ELEMS_PER_TASK))
                .zip(self.m[local.clone()].par_chunks_mut(ELEMS_PER_TASK))
                .zip(self.v[local].par_chunks_mut(ELEMS_PER_TASK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let gi = g[i] * grad_scale;
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let mhat = m[i] / bc1;
                        let vhat = v[i] / bc2;
                        p[i] = p[i] * decay - lr * mhat / (vhat.sqrt() + eps);
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
