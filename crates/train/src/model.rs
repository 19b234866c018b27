//! The GPT-2 model: parameters and gradients in flat buffers (see `params`), activations sized for
//! one (batch, seq) shape, and an explicit forward and backward pass built from `kernels`.

use crate::config::ModelConfig;
use crate::kernels::{self as k, AttnShape};
use crate::params::{self as p, TensorSpec};
use crate::rng::Rng;
use rayon::prelude::*;

/// Activations of one block, kept from forward for backward.
struct LayerActs {
    ln1: Vec<f32>,      // (BT, C)
    ln1_mean: Vec<f32>, // (BT)
    ln1_rstd: Vec<f32>, // (BT)
    qkv: Vec<f32>,      // (BT, 3C)
    atty: Vec<f32>,     // (BT, C)
    att: Vec<f32>,      // (B, NH, T, T) softmax probabilities
    res2: Vec<f32>,     // (BT, C) residual after attention
    ln2: Vec<f32>,      // (BT, C)
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,      // (BT, 4C) pre-GELU
    fch_gelu: Vec<f32>, // (BT, 4C)
    res3: Vec<f32>,     // (BT, C) residual after the MLP: the block's output
}

struct Activations {
    b: usize,
    t: usize,
    inputs: Vec<u32>,
    encoded: Vec<f32>, // (BT, C)
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// (BT, Vp) logits; after forward, d(loss)/d(logits) (the fused softmax writes it in place).
    logits: Vec<f32>,
    losses: Vec<f32>, // (BT)
    // Backward scratch.
    dres: Vec<f32>, // (BT, C) gradient of the residual stream
    dc: Vec<f32>,   // (BT, C)
    dqkv: Vec<f32>, // (BT, 3C)
    dfch: Vec<f32>, // (BT, 4C)
}

impl Activations {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let (c, bt, nh) = (cfg.n_embd, b * t, cfg.n_head);
        let z = crate::memory::zeroed;
        let layers = (0..cfg.n_layer)
            .map(|_| LayerActs {
                ln1: z(bt * c),
                ln1_mean: z(bt),
                ln1_rstd: z(bt),
                qkv: z(bt * 3 * c),
                atty: z(bt * c),
                att: z(b * nh * t * t),
                res2: z(bt * c),
                ln2: z(bt * c),
                ln2_mean: z(bt),
                ln2_rstd: z(bt),
                fch: z(bt * 4 * c),
                fch_gelu: z(bt * 4 * c),
                res3: z(bt * c),
            })
            .collect();
        Activations {
            b,
            t,
            inputs: vec![0; bt],
            encoded: z(bt * c),
            layers,
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * cfg.padded_vocab_size),
            losses: z(bt),
            dres: z(bt * c),
            dc: z(bt * c),
            dqkv: z(bt * 3 * c),
            dfch: z(bt * 4 * c),
        }
    }
}

pub struct Gpt {
    pub cfg: ModelConfig,
    pub specs: Vec<TensorSpec>,
    pub params: crate::live::Buf,
    pub grads: Vec<f32>,
    acts: Option<Activations>,
}

impl Gpt {
    /// GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L), zero
    /// biases, unit norms; padded vocabulary rows zero so they stay inert. Each 64K-element chunk
    /// draws from its own seeded stream, so init is parallel and still deterministic.
    pub fn new(cfg: ModelConfig, seed: u64) -> Self {
        cfg.validate().expect("Gpt::new takes a validated config");
        let n = p::param_specs(&cfg).iter().map(|s| s.numel()).sum();
        let mut model = Gpt::with_params(cfg, crate::memory::zeroed(n));
        let cfg = &model.cfg;
        let resid_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        for (ti, (spec, buf)) in
            model.specs.iter().zip(p::split_mut(&mut model.params, &model.specs)).enumerate()
        {
            let name = spec.name.as_str();
            let std = if name.ends_with("c_proj.weight") {
                resid_std
            } else if spec.decay {
                0.02
            } else if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") || name == "ln_f.weight"
            {
                buf.fill(1.0);
                continue;
            } else {
                continue; // biases stay zero
            };
            let live = if ti == p::WTE { cfg.vocab_size * cfg.n_embd } else { buf.len() };
            const CHUNK: usize = 1 << 16;
            buf[..live].par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
                let mut rng = Rng::new(seed ^ ((ti as u64) << 40) ^ (ci as u64).wrapping_mul(0x9E37_79B9));
                rng.fill_normal(chunk, std);
            });
        }
        model
    }

    /// A model whose weights come from elsewhere (a checkpoint): no random initialisation, which
    /// for `small` is a third of a second of every restart.
    pub fn with_params(cfg: ModelConfig, params: impl Into<crate::live::Buf>) -> Self {
        let params = params.into();
        cfg.validate().expect("Gpt takes a validated config");
        let specs = p::param_specs(&cfg);
        let n = specs.iter().map(|s| s.numel()).sum();
        assert_eq!(params.len(), n, "{n} parameters expected");
        Gpt { cfg, specs, grads: crate::memory::zeroed(n), params, acts: None }
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    pub fn zero_grad(&mut self) {
        self.grads.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
    }

    /// Forward pass over `inputs` (B×T token ids) with next-token `targets`; returns the mean loss.
    /// Leaves d(loss × dloss_scale × B×T)/d(logits) in place for [`Gpt::backward`]: `loss_scale` is
    /// the weight of this micro-batch's mean loss in the step's objective (1/accumulation steps).
    pub fn forward(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize, loss_scale: f32) -> f32 {
        let cfg = &self.cfg;
        let (c, bt, v, vp) = (cfg.n_embd, b * t, cfg.vocab_size, cfg.padded_vocab_size);
        assert!(t <= cfg.context_len, "seq {t} exceeds context {}", cfg.context_len);
        assert_eq!(inputs.len(), bt);
        assert_eq!(targets.len(), bt);
        assert!(inputs.iter().chain(targets).all(|&x| (x as usize) < v), "token id out of vocabulary");
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = Some(Activations::new(cfg, b, t));
        }
        let acts = self.acts.as_mut().unwrap();
        acts.inputs.copy_from_slice(inputs);
        let w = p::split(&self.params, &self.specs);
        let shape = AttnShape { b, t, c, nh: cfg.n_head };

        k::encoder_forward(&mut acts.encoded, inputs, w[p::WTE], w[p::WPE], t, c);
        for l in 0..cfg.n_layer {
            let (done, rest) = acts.layers.split_at_mut(l);
            let residual: &[f32] = if l == 0 { &acts.encoded } else { &done[l - 1].res3 };
            let a = &mut rest[0];
            let lw = &w[p::layer_base(l)..p::layer_base(l + 1)];
            k::layernorm_forward(
                &mut a.ln1,
                &mut a.ln1_mean,
                &mut a.ln1_rstd,
                residual,
                lw[p::LN1_W],
                lw[p::LN1_B],
            );
            k::seed_rows(&mut a.qkv, None, lw[p::QKV_B]);
            k::matmul(&mut a.qkv, &a.ln1, false, lw[p::QKV_W], false, bt, 3 * c, c, true);
            k::attention_forward(&mut a.atty, &mut a.att, &a.qkv, shape);
            k::seed_rows(&mut a.res2, Some(residual), lw[p::ATTPROJ_B]);
            k::matmul(&mut a.res2, &a.atty, false, lw[p::ATTPROJ_W], false, bt, c, c, true);
            k::layernorm_forward(
                &mut a.ln2,
                &mut a.ln2_mean,
                &mut a.ln2_rstd,
                &a.res2,
                lw[p::LN2_W],
                lw[p::LN2_B],
            );
            k::seed_rows(&mut a.fch, None, lw[p::FC_B]);
            k::matmul(&mut a.fch, &a.ln2, false, lw[p::FC_W], false, bt, 4 * c, c, true);
            k::gelu_forward(&mut a.fch_gelu, &a.fch);
            k::seed_rows(&mut a.res3, Some(&a.res2), lw[p::FCPROJ_B]);
            k::matmul(&mut a.res3, &a.fch_gelu, false, lw[p::FCPROJ_W], false, bt, c, 4 * c, true);
        }
        let last: &[f32] = acts.layers.last().map_or(&acts.encoded, |a| &a.res3);
        let lnf = p::lnf_w(cfg);
        k::layernorm_forward(&mut acts.lnf, &mut acts.lnf_mean, &mut acts.lnf_rstd, last, w[lnf], w[lnf + 1]);
        k::matmul(&mut acts.logits, &acts.lnf, false, w[p::WTE], true, bt, vp, c, false);
        let dloss = loss_scale / bt as f32;
        k::softmax_xent_fused(&mut acts.logits, &mut acts.losses, targets, v, vp, dloss);
        (acts.losses.iter().map(|&x| x as f64).sum::<f64>() / bt as f64) as f32
    }

    /// Backward pass of the last [`Gpt::forward`]; adds into `grads` (zero them per step).
    pub fn backward(&mut self) {
        self.backward_with(&mut |_| {});
    }

    /// Backward pass that hands each bucket of gradients to `ready` as soon as no later part of
    /// the pass writes it: the final norm, then each block from the last to the first, then the
    /// embeddings. A data-parallel trainer all-reduces a bucket while backward continues.
    pub fn backward_with<'a>(&'a mut self, ready: &mut dyn FnMut(&'a mut [f32])) {
        let cfg = &self.cfg;
        let acts = self.acts.as_mut().expect("backward needs a forward first");
        let (b, t, c, vp) = (acts.b, acts.t, cfg.n_embd, cfg.padded_vocab_size);
        let bt = b * t;
        let w = p::split(&self.params, &self.specs);
        let specs = &self.specs;
        let lnf = p::lnf_w(cfg);
        let (head, rest) = self.grads.split_at_mut(specs[p::WPE].range().end);
        let (layer_region, tail) = rest.split_at_mut(specs[lnf].offset - specs[p::WPE].range().end);
        let layer_len = layer_region.len() / cfg.n_layer;
        let mut layer_buckets: Vec<Option<&'a mut [f32]>> =
            layer_region.chunks_mut(layer_len).map(Some).collect();
        let mut gh = p::split_mut(&mut *head, &specs[..2]);
        let mut gt = p::split_mut(&mut *tail, &specs[lnf..]);
        let shape = AttnShape { b, t, c, nh: cfg.n_head };

        // LM head (tied to wte): logits = lnf · wteᵀ.
        k::matmul(&mut acts.dc, &acts.logits, false, w[p::WTE], false, bt, c, vp, false);
        k::matmul(gh[p::WTE], &acts.logits, true, &acts.lnf, false, vp, c, bt, true);
        acts.dres.fill(0.0);
        let last: &[f32] = acts.layers.last().map_or(&acts.encoded, |a| &a.res3);
        {
            let [gw, gb] = gt.get_disjoint_mut([0, 1]).unwrap();
            k::layernorm_backward(
                &mut acts.dres,
                gw,
                gb,
                &acts.dc,
                last,
                w[lnf],
                &acts.lnf_mean,
                &acts.lnf_rstd,
            );
        }
        drop(gt);
        ready(tail);

        for l in (0..cfg.n_layer).rev() {
            let base = p::layer_base(l);
            let lw = &w[base..base + p::PER_LAYER];
            let bucket = layer_buckets[l].take().expect("each block's bucket is used once");
            let mut lg_tensors = p::split_mut(&mut *bucket, &specs[base..base + p::PER_LAYER]);
            let lg = &mut lg_tensors[..];
            let residual: &[f32] = if l == 0 { &acts.encoded } else { &acts.layers[l - 1].res3 };
            let a = &acts.layers[l];
            // MLP projection: res3 = res2 + gelu(fch) · W + b; dres holds d(res3).
            k::matmul(&mut acts.dfch, &acts.dres, false, lw[p::FCPROJ_W], true, bt, 4 * c, c, false);
            k::matmul(lg[p::FCPROJ_W], &a.fch_gelu, true, &acts.dres, false, 4 * c, c, bt, true);
            k::bias_backward(lg[p::FCPROJ_B], &acts.dres);
            k::gelu_backward_inplace(&mut acts.dfch, &a.fch);
            // MLP input: fch = ln2 · W + b.
            k::matmul(&mut acts.dc, &acts.dfch, false, lw[p::FC_W], true, bt, c, 4 * c, false);
            k::matmul(lg[p::FC_W], &a.ln2, true, &acts.dfch, false, c, 4 * c, bt, true);
            k::bias_backward(lg[p::FC_B], &acts.dfch);
            {
                let [gw, gb] = lg.get_disjoint_mut([p::LN2_W, p::LN2_B]).unwrap();
                k::layernorm_backward(
                    &mut acts.dres,
                    gw,
                    gb,
                    &acts.dc,
                    &a.res2,
                    lw[p::LN2_W],
                    &a.ln2_mean,
                    &a.ln2_rstd,
                );
            }
            // Attention projection: res2 = residual + atty · W + b; dres now holds d(res2).
            k::matmul(&mut acts.dc, &acts.dres, false, lw[p::ATTPROJ_W], true, bt, c, c, false);
            k::matmul(lg[p::ATTPROJ_W], &a.atty, true, &acts.dres, false, c, c, bt, true);
            k::bias_backward(lg[p::ATTPROJ_B], &acts.dres);
            k::attention_backward(&mut acts.dqkv, &acts.dc, &a.qkv, &a.att, shape);
            // QKV: qkv = ln1 · W + b.
            k::matmul(&mut acts.dc, &acts.dqkv, false, lw[p::QKV_W], true, bt, c, 3 * c, false);
            k::matmul(lg[p::QKV_W], &a.ln1, true, &acts.dqkv, false, c, 3 * c, bt, true);
            k::bias_backward(lg[p::QKV_B], &acts.dqkv);
            {
                let [gw, gb] = lg.get_disjoint_mut([p::LN1_W, p::LN1_B]).unwrap();
                k::layernorm_backward(
                    &mut acts.dres,
                    gw,
                    gb,
                    &acts.dc,
                    residual,
                    lw[p::LN1_W],
                    &a.ln1_mean,
                    &a.ln1_rstd,
                );
            }
            ready(bucket);
        }
        let [gwte, gwpe] = gh.get_disjoint_mut([p::WTE, p::WPE]).unwrap();
        k::encoder_backward(gwte, gwpe, &acts.dres, &acts.inputs, t, c);
        drop(gh);
        ready(head);
    }
}
