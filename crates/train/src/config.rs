//! Model shapes (presets), training hyper-parameters, and the FLOP count that MFU is built on.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Shape of a GPT-2-style decoder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Real vocabulary: tokens the data may contain and the softmax ranges over.
    pub vocab_size: usize,
    /// Rows of the embedding matrix; padded up so the LM-head GEMM has friendly sizes.
    pub padded_vocab_size: usize,
    /// Longest sequence the position embedding covers.
    pub context_len: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

pub const PRESETS: &[&str] = &["tiny", "small", "gpt2-124m"];

impl ModelConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            // About 1M parameters: unit and learning tests.
            "tiny" => ModelConfig {
                vocab_size: 256,
                padded_vocab_size: 256,
                context_len: 256,
                n_layer: 5,
                n_head: 4,
                n_embd: 128,
            },
            // About 11M parameters: the demo.
            "small" => ModelConfig {
                vocab_size: 256,
                padded_vocab_size: 256,
                context_len: 512,
                n_layer: 6,
                n_head: 6,
                n_embd: 384,
            },
            // GPT-2 small's exact shape; vocabulary padded to a multiple of 128 as in llm.c/nanoGPT.
            "gpt2-124m" => ModelConfig {
                vocab_size: 50257,
                padded_vocab_size: 50304,
                context_len: 1024,
                n_layer: 12,
                n_head: 12,
                n_embd: 768,
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown preset {other:?} (known: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 {
            return bad(format!(
                "n_layer ({}), n_head ({}) and n_embd ({}) must all be positive",
                self.n_layer, self.n_head, self.n_embd
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!("n_head ({}) must divide n_embd ({})", self.n_head, self.n_embd));
        }
        if self.vocab_size == 0 || self.padded_vocab_size < self.vocab_size {
            return bad(format!(
                "padded_vocab_size ({}) must be at least vocab_size ({}) and vocab_size positive",
                self.padded_vocab_size, self.vocab_size
            ));
        }
        if self.context_len == 0 {
            return bad("context_len must be positive".into());
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameter count, counting the tied embedding once and the padded vocabulary in full.
    pub fn num_params(&self) -> usize {
        crate::params::param_specs(self).iter().map(|s| s.numel()).sum()
    }

    /// Model FLOPs per token as DESIGN.md defines them (PaLM / nanoGPT rule): 6 × (parameters −
    /// position embeddings) + 12 × layers × width × seq, forward and backward, no causal halving.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let non_pos = (self.num_params() - self.context_len * self.n_embd) as f64;
        6.0 * non_pos + 12.0 * (self.n_layer * self.n_embd * seq_len) as f64
    }
}

/// Hyper-parameters of one training run. Everything that changes the numbers is here, so a
/// checkpoint that records it can be resumed exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps of the run (the cosine schedule ends here).
    pub steps: u64,
    pub lr: f32,
    /// The cosine decay ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch: 8,
            seq_len: 64,
            grad_accum: 1,
            steps: 100,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.batch == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad(format!(
                "batch ({}), seq ({}) and grad_accum ({}) must all be positive",
                self.batch, self.seq_len, self.grad_accum
            ));
        }
        if self.seq_len > model.context_len {
            return bad(format!(
                "seq ({}) is longer than the model's context ({})",
                self.seq_len, model.context_len
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr ({}) must be a positive number", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!("min_lr_ratio ({}) must be in [0, 1]", self.min_lr_ratio));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("beta1 ({}) and beta2 ({}) must be in [0, 1)", self.beta1, self.beta2));
        }
        if !(self.grad_clip >= 0.0 && self.weight_decay >= 0.0 && self.eps > 0.0) {
            return bad("grad_clip and weight_decay must be >= 0 and eps > 0".into());
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine decay to
    /// `lr * min_lr_ratio` at `steps`.
    pub fn lr_at(&self, step: u64) -> f32 {
        let min_lr = self.lr * self.min_lr_ratio;
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        if step >= self.steps {
            return min_lr;
        }
        let span = (self.steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        min_lr + (cosine as f32) * (self.lr - min_lr)
    }

    /// Tokens consumed per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.seq_len * self.grad_accum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_promised_sizes() {
        let tiny = ModelConfig::preset("tiny").unwrap().num_params();
        assert!((800_000..1_300_000).contains(&tiny), "tiny has {tiny}");
        let small = ModelConfig::preset("small").unwrap().num_params();
        assert!((8_000_000..13_000_000).contains(&small), "small has {small}");
        // GPT-2 small: 124,439,808 parameters with the 50257 vocabulary; padding adds 47 × 768.
        let gpt2 = ModelConfig::preset("gpt2-124m").unwrap().num_params();
        assert_eq!(gpt2, 124_439_808 + 47 * 768);
    }

    #[test]
    fn heads_must_divide_width() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.n_head = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("n_head (3) must divide n_embd (128)"), "{err}");
    }

    #[test]
    fn seq_longer_than_context_is_refused() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let train = TrainConfig { seq_len: 257, ..TrainConfig::default() };
        let err = train.validate(&cfg).unwrap_err().to_string();
        assert!(err.contains("seq (257) is longer than the model's context (256)"), "{err}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let t =
            TrainConfig { lr: 1.0, warmup_steps: 10, steps: 110, min_lr_ratio: 0.1, ..Default::default() };
        assert!((t.lr_at(0) - 0.1).abs() < 1e-6);
        assert!((t.lr_at(9) - 1.0).abs() < 1e-6);
        assert!((t.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((t.lr_at(60) - 0.55).abs() < 1e-6);
        assert!((t.lr_at(110) - 0.1).abs() < 1e-6);
        assert!(t.lr_at(30) > t.lr_at(31));
    }
}
