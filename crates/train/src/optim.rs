//! AdamW with decoupled weight decay (PyTorch's ordering: decay, then the Adam update), applied
//! in one fused pass per tensor, with the gradient-norm clip folded in as a scale.

use crate::config::TrainConfig;
use crate::params::TensorSpec;
use rayon::prelude::*;

pub struct AdamW {
    /// First moment (exp_avg), laid out like the parameters.
    pub m: Vec<f32>,
    /// Second moment (exp_avg_sq).
    pub v: Vec<f32>,
    /// Updates applied so far; bias correction uses it.
    pub t: u64,
}

const ELEMS_PER_TASK: usize = 1 << 14;

impl AdamW {
    pub fn new(n: usize) -> Self {
        AdamW { m: crate::memory::zeroed(n), v: crate::memory::zeroed(n), t: 0 }
    }

    /// One update. `grad_scale` multiplies every gradient first (the clip factor).
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
        assert_eq!(params.len(), self.m.len());
        self.t += 1;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for spec in specs {
            let r = spec.range();
            let decay = if spec.decay { 1.0 - lr * cfg.weight_decay } else { 1.0 };
            params[r.clone()]
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(grads[r.clone()].par_chunks(ELEMS_PER_TASK))
                .zip(self.m[r.clone()].par_chunks_mut(ELEMS_PER_TASK))
                .zip(self.v[r].par_chunks_mut(ELEMS_PER_TASK))
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
    }
}
