//! The parameter table: every tensor's Hugging Face GPT-2 name, shape and place in one flat buffer.
//! Parameters, gradients and both Adam moments are flat `Vec<f32>`s carved by this one table
//! (as in llm.c), so the optimizer, clipping and checkpoints are loops over a single slice.
//!
//! Linear weights use Hugging Face's `Conv1D` orientation, `(in, out)`, so a checkpoint's tensors
//! have exactly the shapes of `gpt2`'s `model.safetensors` (bar the padded vocabulary).

use crate::config::ModelConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in elements within the flat buffer.
    pub offset: usize,
    /// Whether AdamW's decoupled weight decay applies (matrices and embeddings, not biases/norms).
    pub decay: bool,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Tensors of one transformer block, in buffer order.
pub const LN1_W: usize = 0;
pub const LN1_B: usize = 1;
pub const QKV_W: usize = 2;
pub const QKV_B: usize = 3;
pub const ATTPROJ_W: usize = 4;
pub const ATTPROJ_B: usize = 5;
pub const LN2_W: usize = 6;
pub const LN2_B: usize = 7;
pub const FC_W: usize = 8;
pub const FC_B: usize = 9;
pub const FCPROJ_W: usize = 10;
pub const FCPROJ_B: usize = 11;
pub const PER_LAYER: usize = 12;

/// Index of the token embedding, position embedding, first block tensor and final norm.
pub const WTE: usize = 0;
pub const WPE: usize = 1;
pub fn layer_base(layer: usize) -> usize {
    2 + layer * PER_LAYER
}
pub fn lnf_w(cfg: &ModelConfig) -> usize {
    2 + cfg.n_layer * PER_LAYER
}

pub fn param_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let c = cfg.n_embd;
    let mut specs = Vec::with_capacity(4 + cfg.n_layer * PER_LAYER);
    let mut offset = 0;
    let mut push = |name: String, shape: Vec<usize>, decay: bool| {
        let spec = TensorSpec { name, shape, offset, decay };
        offset += spec.numel();
        specs.push(spec);
    };
    push("wte.weight".into(), vec![cfg.padded_vocab_size, c], true);
    push("wpe.weight".into(), vec![cfg.context_len, c], true);
    for l in 0..cfg.n_layer {
        let p = |s: &str| format!("h.{l}.{s}");
        push(p("ln_1.weight"), vec![c], false);
        push(p("ln_1.bias"), vec![c], false);
        push(p("attn.c_attn.weight"), vec![c, 3 * c], true);
        push(p("attn.c_attn.bias"), vec![3 * c], false);
        push(p("attn.c_proj.weight"), vec![c, c], true);
        push(p("attn.c_proj.bias"), vec![c], false);
        push(p("ln_2.weight"), vec![c], false);
        push(p("ln_2.bias"), vec![c], false);
        push(p("mlp.c_fc.weight"), vec![c, 4 * c], true);
        push(p("mlp.c_fc.bias"), vec![4 * c], false);
        push(p("mlp.c_proj.weight"), vec![4 * c, c], true);
        push(p("mlp.c_proj.bias"), vec![c], false);
    }
    push("ln_f.weight".into(), vec![c], false);
    push("ln_f.bias".into(), vec![c], false);
    specs
}

/// Splits a flat buffer into one mutable slice per tensor, in table order.
pub fn split_mut<'a>(mut buf: &'a mut [f32], specs: &[TensorSpec]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(spec.numel());
        out.push(head);
        buf = tail;
    }
    assert!(buf.is_empty(), "parameter table does not cover the buffer");
    out
}

/// Splits a flat buffer into one shared slice per tensor, in table order.
pub fn split<'a>(buf: &'a [f32], specs: &[TensorSpec]) -> Vec<&'a [f32]> {
    assert_eq!(buf.len(), specs.last().map_or(0, |s| s.offset + s.numel()));
    specs.iter().map(|s| &buf[s.range()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_contiguous_and_named_like_hugging_face() {
        let cfg = ModelConfig::preset("gpt2-124m").unwrap();
        let specs = param_specs(&cfg);
        let mut next = 0;
        for s in &specs {
            assert_eq!(s.offset, next, "{} is not contiguous", s.name);
            next += s.numel();
        }
        assert_eq!(specs[layer_base(0) + QKV_W].name, "h.0.attn.c_attn.weight");
        assert_eq!(specs[layer_base(0) + QKV_W].shape, vec![768, 2304]);
        assert_eq!(specs[layer_base(11) + FCPROJ_B].name, "h.11.mlp.c_proj.bias");
        assert_eq!(specs[lnf_w(&cfg)].name, "ln_f.weight");
    }
}
