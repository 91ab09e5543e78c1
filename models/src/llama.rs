//! Llama: token embeddings, pre-RMSNorm blocks of rotary (RoPE) grouped-query causal
//! self-attention and a SwiGLU MLP, a final RMSNorm and a head (its own, or tied to the token
//! embedding).
//!
//! Parameter paths and shapes are Hugging Face `LlamaForCausalLM`'s: `model.embed_tokens.weight`,
//! `model.layers.0.self_attn.q_proj.weight`, …, `lm_head.weight`. The projections are
//! `nn.Linear` without biases, whose weight is stored (out, in), so the matmul takes `Wᵀ`. With
//! `tie_word_embeddings` there is no `lm_head.weight`: the head is `model.embed_tokens.weight`.
//! The config's field names are those of HF's `config.json`.
//!
//! The training path uses kiln's fused kernels (embedding, RMS norm, attention), each with its
//! own backward, and plain differentiable candle ops for the rest (RoPE, the key/value head
//! repetition, SiLU). Under mixed precision the matmuls and the attention run in bf16/f16 while
//! the residual stream, the norms, RoPE and the loss stay in f32. Dropout (0 in HF) is on the
//! blocks' residual branches. With `checkpoint_activations`, each block's activations are
//! recomputed in the backward. As a [`Decoder`], it generates with a KV cache that holds the
//! key/value heads before their repetition.

use crate::hf::HfReader;
use crate::layers::{
    normal, Attention, Block, Embedding, FeedForward, Linear, Norm, Qkv, Residual, Rope,
};
use crate::{
    check_divisible, check_dropout, check_positive, check_positive_f64, resolve_context,
    resolve_vocab, CausalLm, ConfigError, DataFacts, DecoderStack, HfConfig, ModelSpec,
};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads, each shared by num_attention_heads / num_key_value_heads query heads
    /// (grouped-query attention); 0 means num_attention_heads.
    #[serde(default)]
    pub num_key_value_heads: usize,
    /// Filled from the data's vocabulary when 0.
    #[serde(default)]
    pub vocab_size: usize,
    /// Longest context (positions in the RoPE tables); defaults to `data.seq_len`.
    #[serde(default)]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// The head shares the token embedding (no `lm_head.weight`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Dropout on the residual branches while training (HF's Llama has none).
    #[serde(default)]
    pub dropout: f64,
    /// Recompute each block's activations in the backward instead of storing them.
    #[serde(default)]
    pub checkpoint_activations: bool,
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

fn default_rope_theta() -> f64 {
    10000.0
}

impl LlamaConfig {
    /// Size of one attention head (0 without heads, which `resolve` refuses).
    pub fn head_dim(&self) -> usize {
        self.hidden_size
            .checked_div(self.num_attention_heads)
            .unwrap_or(0)
    }

    /// Key/value heads (num_attention_heads when left at 0).
    pub fn kv_heads(&self) -> usize {
        match self.num_key_value_heads {
            0 => self.num_attention_heads,
            n => n,
        }
    }
}

pub struct Llama {
    embed_tokens: Embedding,
    stack: DecoderStack,
    norm: Norm,
    /// None when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    compute: DType,
    pub config: LlamaConfig,
}

impl Llama {
    /// `compute` is the dtype of the matmuls and the attention (the weights' dtype for full
    /// precision, bf16/f16 for mixed precision).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        let (c, eps, ff) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.intermediate_size);
        let heads = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let kv = cfg.kv_heads() * cfg.head_dim();
        let std = 0.02;
        // Residual projections are scaled down by √(2·n_layers) (GPT-2 paper, nanoGPT).
        let proj_std = std / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let rope = Rope::new(
            cfg.max_position_embeddings,
            cfg.head_dim(),
            cfg.rope_theta,
            vb.dtype(),
            vb.device(),
        )?;
        // `nn.Linear` without a bias.
        let linear = |n_in, n_out, std, vb| Linear::new(n_in, n_out, std, false, vb);
        let m = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = m.pp(format!("layers.{i}"));
                let (a, f) = (vb.pp("self_attn"), vb.pp("mlp"));
                let qkv = Qkv::Split {
                    q: linear(c, c, std, a.pp("q_proj"))?,
                    k: linear(c, kv, std, a.pp("k_proj"))?,
                    v: linear(c, kv, std, a.pp("v_proj"))?,
                };
                let o_proj = linear(c, c, proj_std, a.pp("o_proj"))?;
                Ok(Block {
                    norm_1: Norm::rms_norm(c, eps, vb.pp("input_layernorm"))?,
                    attn: Attention::causal(qkv, o_proj, heads, Some(rope.clone())),
                    norm_2: Norm::rms_norm(c, eps, vb.pp("post_attention_layernorm"))?,
                    mlp: FeedForward::swiglu(
                        linear(c, ff, std, f.pp("gate_proj"))?,
                        linear(c, ff, std, f.pp("up_proj"))?,
                        linear(ff, c, proj_std, f.pp("down_proj"))?,
                    ),
                    residual: Residual::pre(cfg.dropout, &rng, compute),
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| vb.get_with_hints((cfg.vocab_size, c), "lm_head.weight", normal(std)))
            .transpose()?;
        Ok(Llama {
            embed_tokens: Embedding::new(cfg.vocab_size, c, std, m.pp("embed_tokens"))?,
            stack: DecoderStack {
                blocks: layers,
                context: ("max_position_embeddings", cfg.max_position_embeddings),
                checkpoint: cfg.checkpoint_activations,
            },
            norm: Norm::rms_norm(c, eps, m.pp("norm"))?,
            lm_head,
            compute,
            config: cfg.clone(),
        })
    }
}

impl CausalLm for Llama {
    fn stack(&self) -> &DecoderStack {
        &self.stack
    }

    /// Token embeddings (positions enter through RoPE, in the attention).
    fn embed(&self, ids: &Tensor, _start: usize, _train: bool) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// The final RMSNorm and the head (its own weight, or the token embedding when tied).
    fn head(&self, x: &Tensor) -> Result<(Tensor, &Tensor, DType)> {
        let head = (self.lm_head.as_ref()).unwrap_or(self.embed_tokens.table());
        Ok((self.norm.forward(x)?, head, self.compute))
    }
}

impl ModelSpec for LlamaConfig {
    /// SwiGLU keeps four MLP-wide tensors (gate, up, activation, product).
    fn activations_per_example(&self, input_shape: &[usize]) -> Option<u128> {
        let seq = input_shape
            .first()
            .copied()
            .unwrap_or(self.max_position_embeddings);
        Some(crate::transformer_activations(
            self.num_hidden_layers,
            seq,
            self.hidden_size,
            self.intermediate_size,
            4,
            self.num_attention_heads,
            self.checkpoint_activations,
        ))
    }

    /// RoPE's angles, cos and sin: one value per position and head feature each.
    fn table_elements(&self) -> usize {
        (self.max_position_embeddings)
            .saturating_mul(self.head_dim())
            .saturating_mul(3)
    }

    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (vocab, seq_len) = (data.classes, data.seq_len);
        check_dropout(self.dropout, "model.dropout")?;
        check_positive(&[
            ("model.hidden_size", self.hidden_size),
            ("model.intermediate_size", self.intermediate_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
        ])?;
        let heads = ("num_attention_heads", self.num_attention_heads);
        check_divisible(
            "model.num_attention_heads",
            ("hidden_size", self.hidden_size),
            heads,
        )?;
        if !self.head_dim().is_multiple_of(2) {
            return Err((
                "model.num_attention_heads",
                format!(
                    "RoPE rotates pairs of features, so the head size hidden_size / \
                     num_attention_heads = {} must be even",
                    self.head_dim()
                ),
            ));
        }
        self.num_key_value_heads = self.kv_heads();
        check_divisible(
            "model.num_key_value_heads",
            heads,
            ("num_key_value_heads", self.num_key_value_heads),
        )?;
        let key = "model.max_position_embeddings";
        resolve_context(&mut self.max_position_embeddings, key, seq_len, true)?;
        resolve_vocab(&mut self.vocab_size, vocab)?;
        check_positive_f64("model.rms_norm_eps", self.rms_norm_eps)?;
        check_positive_f64("model.rope_theta", self.rope_theta)
    }

    fn context(&self) -> Option<usize> {
        Some(self.max_position_embeddings)
    }

    /// RoPE has no position table: every parameter counts.
    fn flops_per_token(&self, n_params: usize) -> Option<f64> {
        let attention = self.num_hidden_layers * self.hidden_size * self.max_position_embeddings;
        Some(6.0 * n_params as f64 + 12.0 * attention as f64)
    }

    /// Llama checkpoints may carry rotary `inv_freq` buffers, or a tied `lm_head`.
    fn kiln_name_of(&self, name: &str) -> Option<String> {
        let tied_head = self.tie_word_embeddings && name == "lm_head.weight";
        (!name.ends_with("rotary_emb.inv_freq") && !tied_head).then(|| name.to_string())
    }
}

impl HfConfig for LlamaConfig {
    fn own_facts(&self) -> DataFacts {
        DataFacts::text(self.vocab_size, self.max_position_embeddings)
    }

    /// `config.json` for `c` in HF's `LlamaConfig` schema, without the dtype keys or special
    /// tokens (the exporter adds those).
    fn to_hf(&self) -> anyhow::Result<Value> {
        let c = self;
        Ok(json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.hidden_size / c.num_attention_heads,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "tie_word_embeddings": c.tie_word_embeddings,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
        }))
    }

    /// The kiln config of a Llama `config.json`; anything kiln computes differently is refused,
    /// naming the key.
    fn from_hf(r: &HfReader) -> anyhow::Result<Self> {
        if !matches!(r.v["hidden_act"].as_str(), None | Some("silu")) {
            return Err(r.refuse("hidden_act", "kiln's Llama uses SiLU"));
        }
        if !r.v["rope_scaling"].is_null() {
            return Err(r.refuse("rope_scaling", "kiln's Llama has plain RoPE"));
        }
        for k in ["attention_bias", "mlp_bias"] {
            if r.v[k].as_bool() == Some(true) {
                return Err(r.refuse(k, "kiln's Llama has no biases"));
            }
        }
        let hidden = r.uint("hidden_size")?;
        let heads = r.uint("num_attention_heads")?;
        if let Some(d) = r.v["head_dim"].as_u64() {
            if d as usize * heads != hidden {
                return Err(r.refuse("head_dim", "kiln's Llama needs hidden_size / heads"));
            }
        }
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: r.uint("intermediate_size")?,
            num_hidden_layers: r.uint("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: r.v["num_key_value_heads"]
                .as_u64()
                .map_or(heads, |x| x as usize),
            vocab_size: r.uint("vocab_size")?,
            max_position_embeddings: r.uint("max_position_embeddings")?,
            rms_norm_eps: r.float_or("rms_norm_eps", 1e-6)?,
            rope_theta: r.float_or("rope_theta", 10_000.0)?,
            tie_word_embeddings: r.v["tie_word_embeddings"].as_bool().unwrap_or(false),
            dropout: 0.0,
            checkpoint_activations: false,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
