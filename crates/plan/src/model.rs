//! Model shapes: dense GPT/Llama-style decoders and mixture-of-experts, their parameter counts
//! and FLOPs, read from Hugging Face `config.json`, a TOML spec or a built-in preset.

use crate::error::{PlanError, Result};
use serde::{Deserialize, Serialize};

/// A decoder-only transformer. Sizes are element counts; `ffn` is the intermediate width of one
/// dense MLP (for SwiGLU, the width of each of the gate and up projections).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    pub name: String,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    /// Key/value heads: equal to `heads` for MHA, fewer for GQA, 1 for MQA.
    pub kv_heads: u64,
    pub head_dim: u64,
    pub ffn: u64,
    pub vocab: u64,
    /// SwiGLU-style MLP (three projections) instead of GELU (two).
    pub gated_mlp: bool,
    pub tied_embeddings: bool,
    /// Learned position embeddings (GPT-2) have this many rows; 0 for rotary/ALiBi.
    pub position_embeddings: u64,
    /// Linear layers carry biases and norms are LayerNorm with bias (GPT-2) rather than RMSNorm.
    pub biases: bool,
    /// Trained with dropout (GPT-3/Megatron defaults): its masks add to activation memory.
    pub dropout: bool,
    /// The parallel formulation of a layer, y = x + Attn(LN(x)) + MLP(LN(x)) (GPT-J, GPT-NeoX,
    /// PaLM, Falcon): one norm, one residual add, and under tensor parallelism one all-reduce per
    /// layer and direction instead of two, since the two branches' outputs are summed before it
    /// (PaLM, Chowdhery et al. 2022 §2: "roughly 15% faster training speed at large scales").
    pub parallel_block: bool,
    pub moe: Option<Moe>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    pub experts: u64,
    pub top_k: u64,
    /// Intermediate width of one routed expert.
    pub expert_ffn: u64,
    pub shared_experts: u64,
    /// Intermediate width of one shared expert.
    pub shared_ffn: u64,
    /// The first `dense_layers` layers use the dense MLP (`ffn`) instead of experts.
    pub dense_layers: u64,
}

/// Which FLOPs a run counts per token: the published conventions differ in small terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FlopsConvention {
    /// Megatron-LM (Narayanan et al., Korthikanti et al., `num_floating_point_operations`):
    /// 6 × (weights of every matrix multiply a token passes, output layer included even when
    /// tied) + 12 × layers × attention width × seq. For a GPT this is exactly
    /// 72·B·s·l·h²·(1 + s/6h + V/12lh) per step.
    Megatron,
    /// PaLM / nanoGPT / torchtitan and DESIGN.md: 6 × (active parameters − position
    /// embeddings) plus 12 × layers × attention width × seq. Embeddings, norms and biases count;
    /// a tied output layer counts once.
    SixN,
}

/// Activation recomputation, after Korthikanti et al. 2022.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    None,
    /// Recompute the attention core (QKᵀ, softmax, dropout, ·V) only.
    Selective,
    /// Keep only each layer's input; recompute the whole layer in the backward pass.
    Full,
}

impl Model {
    pub fn q_dim(&self) -> u64 {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim
    }
    fn mlp_mats(&self) -> u64 {
        if self.gated_mlp {
            3
        } else {
            2
        }
    }

    /// Matrix-multiply weights of attention in one layer (Q, K, V, output).
    pub fn attn_matmul_params(&self) -> u64 {
        let h = self.hidden;
        h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h
    }

    pub fn is_moe_layer(&self, layer: u64) -> bool {
        self.moe.as_ref().is_some_and(|m| layer >= m.dense_layers)
    }

    pub fn moe_layers(&self) -> u64 {
        self.moe.as_ref().map_or(0, |m| self.layers.saturating_sub(m.dense_layers))
    }

    /// MLP weights one token multiplies through in a dense layer.
    pub fn dense_mlp_params(&self) -> u64 {
        self.mlp_mats() * self.hidden * self.ffn
    }

    /// (all, active per token) MLP weights of one MoE layer, router included.
    pub fn moe_mlp_params(&self) -> (u64, u64) {
        let m = self.moe.as_ref().expect("moe layer of a MoE model");
        let h = self.hidden;
        let one = self.mlp_mats() * h * m.expert_ffn;
        let shared = m.shared_experts * self.mlp_mats() * h * m.shared_ffn;
        let router = h * m.experts;
        (m.experts * one + shared + router, m.top_k * one + shared + router)
    }

    /// Weights of norms and biases in one layer (not matrix multiplies).
    fn layer_vector_params(&self) -> u64 {
        let h = self.hidden;
        if self.biases {
            // two LayerNorms (scale, shift), Q/K/V and output biases, MLP biases.
            4 * h + self.q_dim() + 2 * self.kv_dim() + h + self.ffn * (self.mlp_mats() - 1) + h
        } else {
            2 * h
        }
    }

    /// Total parameters.
    pub fn params(&self) -> u64 {
        let (dense_layers, moe_layers) = (self.layers - self.moe_layers(), self.moe_layers());
        let mut n = self.layers * (self.attn_matmul_params() + self.layer_vector_params());
        n += dense_layers * self.dense_mlp_params();
        if moe_layers > 0 {
            n += moe_layers * self.moe_mlp_params().0;
        }
        n + self.embedding_params() + if self.biases { 2 * self.hidden } else { self.hidden }
    }

    /// Parameters one token uses (all of a dense model; routed top-k of a MoE).
    pub fn active_params(&self) -> u64 {
        if self.moe.is_none() {
            return self.params();
        }
        let (all, active) = self.moe_mlp_params();
        self.params() - self.moe_layers() * (all - active)
    }

    /// Input embedding, output layer (unless tied) and learned position embeddings.
    pub fn embedding_params(&self) -> u64 {
        let e = self.vocab * self.hidden;
        e + if self.tied_embeddings { 0 } else { e } + self.position_embeddings * self.hidden
    }

    /// Matrix-multiply weights a token passes through, output layer included.
    pub fn active_matmul_params(&self) -> u64 {
        let dense = (self.layers - self.moe_layers()) * self.dense_mlp_params();
        let moe = if self.moe.is_some() { self.moe_layers() * self.moe_mlp_params().1 } else { 0 };
        self.layers * self.attn_matmul_params() + dense + moe + self.vocab * self.hidden
    }

    /// Training FLOPs per token (forward + backward) under `conv`, without recomputation.
    pub fn model_flops_per_token(&self, seq: u64, conv: FlopsConvention) -> f64 {
        let attn = 12.0 * self.layers as f64 * self.q_dim() as f64 * seq as f64;
        let weights = match conv {
            FlopsConvention::Megatron => self.active_matmul_params(),
            FlopsConvention::SixN => self.active_params() - self.position_embeddings * self.hidden,
        };
        6.0 * weights as f64 + attn
    }

    /// FLOPs per token that recomputation adds (counted by HFU, not MFU): full recomputation
    /// repeats each layer's forward (not the output layer), selective only the attention core.
    pub fn recompute_flops_per_token(&self, seq: u64, r: Recompute) -> f64 {
        let attn_fwd = 4.0 * self.layers as f64 * self.q_dim() as f64 * seq as f64;
        match r {
            Recompute::None => 0.0,
            Recompute::Selective => attn_fwd,
            Recompute::Full => {
                let layer_weights = self.active_matmul_params() - self.vocab * self.hidden;
                2.0 * layer_weights as f64 + attn_fwd
            }
        }
    }

    /// Checks the shape is usable; names the first field that is not.
    pub fn check(&self, source: &str) -> Result<()> {
        let bad = |field: &str, why: &str| {
            Err(PlanError::BadField { source: source.into(), field: field.into(), why: why.into() })
        };
        for (field, v) in [
            ("layers", self.layers),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
        ] {
            if v == 0 {
                return bad(field, "must be positive");
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad("kv_heads", &format!("{} heads are not a multiple of {}", self.heads, self.kv_heads));
        }
        if let Some(m) = &self.moe {
            if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
                return bad("experts", "need 0 < top_k <= experts");
            }
            if m.expert_ffn == 0 {
                return bad("expert_ffn", "must be positive");
            }
            if m.dense_layers >= self.layers {
                return bad("dense_layers", "must be fewer than layers");
            }
        }
        Ok(())
    }
}

/// A GPT-3-style model: MHA, GELU MLP of 4h, learned positions omitted, no biases counted.
pub fn gpt(name: &str, layers: u64, hidden: u64, heads: u64, vocab: u64) -> Model {
    Model {
        name: name.into(),
        layers,
        hidden,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        ffn: 4 * hidden,
        vocab,
        gated_mlp: false,
        tied_embeddings: true,
        position_embeddings: 0,
        biases: false,
        dropout: true,
        parallel_block: false,
        moe: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn llama(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    kv: u64,
    ffn: u64,
    vocab: u64,
    tied: bool,
) -> Model {
    Model {
        name: name.into(),
        layers,
        hidden,
        heads,
        kv_heads: kv,
        head_dim: hidden / heads,
        ffn,
        vocab,
        gated_mlp: true,
        tied_embeddings: tied,
        position_embeddings: 0,
        biases: false,
        dropout: false,
        parallel_block: false,
        moe: None,
    }
}

/// Built-in models: those of the published runs (shapes from their papers and released configs).
pub fn presets() -> Vec<Model> {
    // Mixtral: every MLP eight experts of the model's width, two of them per token.
    let mixtral = |name: &str, l, h, a, f, v| {
        let mut m = llama(name, l, h, a, 8, f, v, false);
        m.moe = Some(Moe {
            experts: 8,
            top_k: 2,
            expert_ffn: f,
            shared_experts: 0,
            shared_ffn: 0,
            dense_layers: 0,
        });
        m
    };
    // DeepSeek-V3: MLA is approximated as MHA with 128 heads of 128 (its q/kv LoRA ranks are not
    // modelled); 3 dense layers, then 256 routed experts (top-8) and 1 shared expert.
    let mut dsv3 = llama("deepseek-v3", 61, 7168, 128, 128, 18432, 129280, false);
    dsv3.moe = Some(Moe {
        experts: 256,
        top_k: 8,
        expert_ffn: 2048,
        shared_experts: 1,
        shared_ffn: 2048,
        dense_layers: 3,
    });
    let mut palm = llama("palm-540b", 118, 18432, 48, 1, 4 * 18432, 256000, true);
    palm.head_dim = 256;
    palm.parallel_block = true;
    // BLOOM and MPT pre-trained without dropout.
    let mut bloom = gpt("bloom-176b", 70, 14336, 112, 250880);
    bloom.biases = true;
    bloom.dropout = false;
    let mpt = |name: &str, l, h, a| {
        let mut m = gpt(name, l, h, a, 50368);
        m.dropout = false;
        m
    };
    // Qwen2.5 biases its Q, K and V projections.
    let qwen = |name: &str, l, h, a, kv, f| {
        let mut m = llama(name, l, h, a, kv, f, 152064, false);
        m.biases = true;
        m
    };
    vec![
        llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, false),
        llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, false),
        llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, false),
        llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, false),
        llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, false),
        llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, false),
        qwen("qwen2.5-7b", 28, 3584, 28, 4, 18944),
        qwen("qwen2.5-72b", 80, 8192, 64, 8, 29568),
        mixtral("mixtral-8x7b", 32, 4096, 32, 14336, 32000),
        mixtral("mixtral-8x22b", 56, 6144, 48, 16384, 32768),
        dsv3,
        palm,
        bloom,
        mpt("mpt-30b", 48, 7168, 64),
        mpt("mpt-70b", 80, 8192, 64),
        gpt("gpt3-175b", 96, 12288, 96, 51200),
        gpt("mt-nlg-530b", 105, 20480, 128, 51200),
        gpt("gpt-1t", 128, 25600, 160, 51200),
    ]
}

pub fn preset(name: &str) -> Result<Model> {
    let all = presets();
    all.iter().find(|m| m.name.eq_ignore_ascii_case(name)).cloned().ok_or_else(|| PlanError::Unknown {
        what: "model".into(),
        name: name.into(),
        known: all.iter().map(|m| m.name.clone()).collect(),
    })
}

/// Reads a Hugging Face `config.json` (GPT-2, Llama, Mistral/Mixtral, Qwen2/Qwen2-MoE,
/// DeepSeek-V2/V3 field names). `source` names the file in errors.
pub fn from_hf_config(source: &str, text: &str) -> Result<Model> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| PlanError::Parse { source: source.into(), why: e.to_string() })?;
    let obj = v.as_object().ok_or_else(|| PlanError::Parse {
        source: source.into(),
        why: "top level is not a JSON object".into(),
    })?;
    let uint = |key: &str| -> Result<Option<u64>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| PlanError::BadField {
                source: source.into(),
                field: key.into(),
                why: format!("{x} is not a non-negative integer"),
            }),
        }
    };
    // The first of several names a family uses for one field.
    let any = |keys: &[&str]| -> Result<Option<u64>> {
        for k in keys {
            if let Some(x) = uint(k)? {
                return Ok(Some(x));
            }
        }
        Ok(None)
    };
    let need = |keys: &[&str]| -> Result<u64> {
        any(keys)?.ok_or_else(|| PlanError::MissingField { source: source.into(), field: keys[0].into() })
    };
    let model_type = obj.get("model_type").and_then(|x| x.as_str()).unwrap_or("").to_string();
    let act = obj
        .get("hidden_act")
        .or_else(|| obj.get("activation_function"))
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let gpt2_like = matches!(model_type.as_str(), "gpt2" | "gpt_neox" | "bloom" | "gpt_bigcode" | "opt");
    let layers = need(&["num_hidden_layers", "n_layer", "num_layers"])?;
    let hidden = need(&["hidden_size", "n_embd", "d_model"])?;
    let heads = need(&["num_attention_heads", "n_head"])?;
    let kv_heads = any(&["num_key_value_heads", "multi_query_group_num"])?.unwrap_or(heads);
    let vocab = need(&["vocab_size"])?;
    let head_dim = any(&["head_dim"])?.unwrap_or(hidden / heads.max(1));
    let ffn = match any(&["intermediate_size", "n_inner", "ffn_dim"])? {
        Some(f) => f,
        None if gpt2_like => 4 * hidden,
        None => {
            return Err(PlanError::MissingField { source: source.into(), field: "intermediate_size".into() })
        }
    };
    let gated =
        if gpt2_like { false } else { act.is_empty() || act.contains("silu") || act.contains("swiglu") };
    let tied = match obj.get("tie_word_embeddings") {
        Some(serde_json::Value::Bool(b)) => *b,
        _ => gpt2_like,
    };
    let dropout = ["resid_pdrop", "hidden_dropout", "attention_dropout", "attn_pdrop", "hidden_dropout_prob"]
        .iter()
        .filter_map(|k| obj.get(*k).and_then(|x| x.as_f64()))
        .any(|p| p > 0.0)
        || (model_type == "gpt2" && !obj.contains_key("resid_pdrop"));
    // GPT-NeoX's `use_parallel_residual`, Falcon's `parallel_attn`; GPT-J is parallel by design.
    let parallel_block = ["use_parallel_residual", "parallel_attn"]
        .iter()
        .any(|k| obj.get(*k).and_then(|x| x.as_bool()) == Some(true))
        || model_type == "gptj";
    let position_embeddings = if model_type == "gpt2" {
        any(&["n_positions", "max_position_embeddings"])?.unwrap_or(1024)
    } else {
        0
    };
    let experts = any(&["num_local_experts", "n_routed_experts", "num_experts"])?;
    let moe = match experts {
        Some(e) if e > 1 => {
            let top_k = any(&["num_experts_per_tok", "moe_top_k", "top_k"])?.ok_or_else(|| {
                PlanError::MissingField { source: source.into(), field: "num_experts_per_tok".into() }
            })?;
            let expert_ffn = any(&["moe_intermediate_size"])?.unwrap_or(ffn);
            let (shared_experts, shared_ffn) = match any(&["n_shared_experts"])? {
                Some(n) => (n, expert_ffn),
                None => match any(&["shared_expert_intermediate_size"])? {
                    Some(w) if w > 0 => (1, w),
                    _ => (0, 0),
                },
            };
            let dense_layers = any(&["first_k_dense_replace"])?.unwrap_or(0);
            Some(Moe { experts: e, top_k, expert_ffn, shared_experts, shared_ffn, dense_layers })
        }
        _ => None,
    };
    let name = obj
        .get("_name_or_path")
        .and_then(|x| x.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(if model_type.is_empty() { "hf-config" } else { &model_type })
        .to_string();
    let m = Model {
        name,
        layers,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        gated_mlp: gated,
        tied_embeddings: tied,
        position_embeddings,
        biases: gpt2_like,
        dropout,
        parallel_block,
        moe,
    };
    m.check(source)?;
    Ok(m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    name: Option<String>,
    layers: Option<u64>,
    hidden: Option<u64>,
    heads: Option<u64>,
    kv_heads: Option<u64>,
    head_dim: Option<u64>,
    ffn: Option<u64>,
    vocab: Option<u64>,
    #[serde(default)]
    gated_mlp: bool,
    #[serde(default)]
    tied_embeddings: bool,
    #[serde(default)]
    position_embeddings: u64,
    #[serde(default)]
    biases: bool,
    #[serde(default)]
    dropout: bool,
    #[serde(default)]
    parallel_block: bool,
    experts: Option<u64>,
    top_k: Option<u64>,
    expert_ffn: Option<u64>,
    #[serde(default)]
    shared_experts: u64,
    shared_ffn: Option<u64>,
    #[serde(default)]
    dense_layers: u64,
}

/// Reads a TOML model spec: `layers`, `hidden`, `heads`, `vocab` required; `kv_heads` (= heads),
/// `head_dim` (= hidden/heads), `ffn` (= 4·hidden), `gated_mlp`, `tied_embeddings`,
/// `position_embeddings`, `biases`, `dropout`, `parallel_block`, and for MoE `experts`, `top_k`, `expert_ffn` (= ffn),
/// `shared_experts`, `shared_ffn`, `dense_layers`.
pub fn from_toml(source: &str, text: &str) -> Result<Model> {
    let t: ModelToml = toml::from_str(text)
        .map_err(|e| PlanError::Parse { source: source.into(), why: e.message().into() })?;
    let need = |v: Option<u64>, f: &str| {
        v.ok_or_else(|| PlanError::MissingField { source: source.into(), field: f.into() })
    };
    let layers = need(t.layers, "layers")?;
    let hidden = need(t.hidden, "hidden")?;
    let heads = need(t.heads, "heads")?;
    let vocab = need(t.vocab, "vocab")?;
    let ffn = t.ffn.unwrap_or(4 * hidden);
    let moe = match t.experts {
        Some(e) => Some(Moe {
            experts: e,
            top_k: need(t.top_k, "top_k")?,
            expert_ffn: t.expert_ffn.unwrap_or(ffn),
            shared_experts: t.shared_experts,
            shared_ffn: t.shared_ffn.unwrap_or(t.expert_ffn.unwrap_or(ffn)),
            dense_layers: t.dense_layers,
        }),
        None => None,
    };
    let m = Model {
        name: t.name.unwrap_or_else(|| "toml-model".into()),
        layers,
        hidden,
        heads,
        kv_heads: t.kv_heads.unwrap_or(heads),
        head_dim: t.head_dim.unwrap_or(hidden / heads.max(1)),
        ffn,
        vocab,
        gated_mlp: t.gated_mlp,
        tied_embeddings: t.tied_embeddings,
        position_embeddings: t.position_embeddings,
        biases: t.biases,
        dropout: t.dropout,
        parallel_block: t.parallel_block,
        moe,
    };
    m.check(source)?;
    Ok(m)
}
