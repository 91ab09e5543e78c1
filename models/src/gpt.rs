//! GPT in the nanoGPT mould: token + position embeddings, pre-LayerNorm blocks of causal
//! self-attention and a GELU MLP, a final LayerNorm and a head tied to the token embedding.
//!
//! Parameter paths and shapes are Hugging Face `GPT2LMHeadModel`'s: `transformer.wte.weight`,
//! `transformer.h.0.attn.c_attn.weight`, … The projections are GPT-2's `Conv1D`, whose weight is
//! stored (in, out), so `x · W` needs no transpose and export is the identity.
//!
//! Every op on the training path is one of kiln's fused kernels (embedding, layer norm,
//! attention, bias+GELU), each with its own backward. Under mixed precision the matmuls and the
//! attention run in bf16/f16 while the residual stream, the norms and the loss stay in f32.
//! With `checkpoint_activations`, each block's activations are recomputed in the backward.
//! As a [`Decoder`], it generates with a KV cache (plain candle ops: inference needs no
//! backward).

use crate::hf::HfReader;
use crate::layers::{
    Activation, Attention, Block, Embedding, FeedForward, Linear, Norm, Qkv, Residual,
};
use crate::{
    check_divisible, check_dropout, check_positive, dropout, resolve_context, resolve_vocab,
    CausalLm, ConfigError, DataFacts, DecoderStack, HfConfig, ModelSpec,
};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest context (positions in `wpe`); defaults to `data.seq_len`.
    #[serde(default)]
    pub block_size: usize,
    /// Filled from the data's vocabulary when 0.
    #[serde(default)]
    pub vocab_size: usize,
    /// Dropout on the embeddings, each residual branch's output and the attention
    /// probabilities (nanoGPT's `dropout`; GPT-2's `embd_pdrop`, `resid_pdrop`, `attn_pdrop`).
    #[serde(default)]
    pub dropout: f64,
    /// Biases in the projections and LayerNorms (GPT-2 has them).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Recompute each block's activations in the backward instead of storing them.
    #[serde(default)]
    pub checkpoint_activations: bool,
}

/// GPT-2's layer-norm epsilon.
pub(crate) const LN_EPS: f64 = 1e-5;

fn yes() -> bool {
    true
}

pub struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    stack: DecoderStack,
    ln_f: Norm,
    dropout: f64,
    rng: SharedRng,
    compute: DType,
    pub config: GptConfig,
}

impl Gpt {
    /// `compute` is the dtype of the matmuls and the attention (the weights' dtype for full
    /// precision, bf16/f16 for mixed precision).
    pub fn new(cfg: &GptConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        let vb = vb.pp("transformer");
        let (c, bias) = (cfg.n_embd, cfg.bias);
        let std = 0.02;
        // Residual projections are scaled down by √(2·n_layer) (GPT-2 paper, nanoGPT).
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let ln = |vb: VarBuilder| Norm::layer_norm(c, LN_EPS, bias, vb);
        let heads = (cfg.n_head, cfg.n_head, c / cfg.n_head);
        let h = (0..cfg.n_layer)
            .map(|i| {
                let vb = vb.pp(format!("h.{i}"));
                let (a, m) = (vb.pp("attn"), vb.pp("mlp"));
                Ok(Block {
                    norm_1: ln(vb.pp("ln_1"))?,
                    attn: Attention::causal(
                        Qkv::Fused(Linear::conv1d(c, 3 * c, std, bias, a.pp("c_attn"))?),
                        Linear::conv1d(c, c, proj_std, bias, a.pp("c_proj"))?,
                        heads,
                        None,
                    )
                    .with_dropout(cfg.dropout),
                    norm_2: ln(vb.pp("ln_2"))?,
                    mlp: FeedForward::gelu(
                        Linear::conv1d(c, 4 * c, std, bias, m.pp("c_fc"))?,
                        Linear::conv1d(4 * c, c, proj_std, bias, m.pp("c_proj"))?,
                        Activation::GeluTanh,
                    ),
                    residual: Residual::pre(cfg.dropout, &rng, compute),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt {
            wte: Embedding::new(cfg.vocab_size, c, std, vb.pp("wte"))?,
            wpe: Embedding::new(cfg.block_size, c, std, vb.pp("wpe"))?,
            stack: DecoderStack {
                blocks: h,
                context: ("block_size", cfg.block_size),
                checkpoint: cfg.checkpoint_activations,
            },
            ln_f: ln(vb.pp("ln_f"))?,
            dropout: cfg.dropout,
            rng,
            compute,
            config: cfg.clone(),
        })
    }
}

impl CausalLm for Gpt {
    fn stack(&self) -> &DecoderStack {
        &self.stack
    }

    /// Token plus position embeddings.
    fn embed(&self, idx: &Tensor, start: usize, train: bool) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        let pos = Tensor::arange(start as u32, (start + t) as u32, idx.device())?;
        let x = (self.wte.forward(idx)?).broadcast_add(&self.wpe.forward(&pos)?)?;
        dropout(x, self.dropout, train, &self.rng)
    }

    /// The final LayerNorm and the head, which shares the token embedding (HF's
    /// `lm_head.weight` is `transformer.wte.weight`).
    fn head(&self, x: &Tensor) -> Result<(Tensor, &Tensor, DType)> {
        Ok((self.ln_f.forward(x)?, self.wte.table(), self.compute))
    }
}

impl ModelSpec for GptConfig {
    fn activations_per_example(&self, input_shape: &[usize]) -> Option<u128> {
        let seq = input_shape.first().copied().unwrap_or(self.block_size);
        Some(crate::transformer_activations(
            self.n_layer,
            seq,
            self.n_embd,
            4 * self.n_embd,
            2,
            self.n_head,
            self.checkpoint_activations,
        ))
    }

    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (vocab, seq_len) = (data.classes, data.seq_len);
        check_dropout(self.dropout, "model.dropout")?;
        check_positive(&[
            ("model.n_layer", self.n_layer),
            ("model.n_head", self.n_head),
            ("model.n_embd", self.n_embd),
        ])?;
        let (c, h) = (("n_embd", self.n_embd), ("n_head", self.n_head));
        check_divisible("model.n_head", c, h)?;
        resolve_context(&mut self.block_size, "model.block_size", seq_len, false)?;
        resolve_vocab(&mut self.vocab_size, vocab)
    }

    fn context(&self) -> Option<usize> {
        Some(self.block_size)
    }

    fn flops_per_token(&self, n_params: usize) -> Option<f64> {
        let n = n_params - self.block_size * self.n_embd;
        let attention = self.n_layer * self.n_embd * self.block_size;
        Some(6.0 * n as f64 + 12.0 * attention as f64)
    }

    /// HF's GPT-2 checkpoints may omit the `transformer.` prefix, and carry causal-mask
    /// buffers (older transformers) and the tied head.
    fn kiln_name_of(&self, name: &str) -> Option<String> {
        let base = name.strip_prefix("transformer.").unwrap_or(name);
        let mask_buffer = base.ends_with(".attn.bias") && !base.ends_with("c_attn.bias")
            || base.ends_with(".attn.masked_bias");
        (!mask_buffer && name != "lm_head.weight").then(|| format!("transformer.{base}"))
    }

    /// GPT-2 always has biases: a bias-free kiln GPT exports zeros for them.
    fn hf_extra_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.bias {
            return Ok(Vec::new());
        }
        let e = self.n_embd;
        let zeros = |name: String, n: usize| -> Result<(String, Tensor)> {
            Ok((
                name,
                Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu)?,
            ))
        };
        let per_layer = [
            ("ln_1.bias", e),
            ("attn.c_attn.bias", 3 * e),
            ("attn.c_proj.bias", e),
            ("ln_2.bias", e),
            ("mlp.c_fc.bias", 4 * e),
            ("mlp.c_proj.bias", e),
        ];
        let mut out = vec![zeros("transformer.ln_f.bias".into(), e)?];
        for i in 0..self.n_layer {
            for (name, n) in per_layer {
                out.push(zeros(format!("transformer.h.{i}.{name}"), n)?);
            }
        }
        Ok(out)
    }
}

impl HfConfig for GptConfig {
    fn own_facts(&self) -> DataFacts {
        DataFacts::text(self.vocab_size, self.block_size)
    }

    /// `config.json` for `c` in HF's `GPT2Config` schema, without the dtype keys or special
    /// tokens (the exporter adds those).
    fn to_hf(&self) -> anyhow::Result<Value> {
        let c = self;
        Ok(json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            // GPT2Config maps this name onto n_positions; stacks that read the key directly
            // (vLLM, TGI, TEI) find the context here.
            "max_position_embeddings": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "layer_norm_epsilon": LN_EPS,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
            "use_cache": true,
        }))
    }

    /// The kiln config of a GPT-2 `config.json`; anything kiln computes differently is refused,
    /// naming the key.
    fn from_hf(r: &HfReader) -> anyhow::Result<Self> {
        let n_embd = r.uint("n_embd")?;
        if !matches!(
            r.v["activation_function"].as_str(),
            None | Some("gelu_new") | Some("gelu_pytorch_tanh")
        ) {
            return Err(r.refuse(
                "activation_function",
                "kiln's GPT uses GPT-2's tanh GELU (gelu_new)",
            ));
        }
        let four_wide = |n: u64| Some(n) == (n_embd as u64).checked_mul(4);
        if !(r.v["n_inner"].is_null() || r.v["n_inner"].as_u64().is_some_and(four_wide)) {
            return Err(r.refuse("n_inner", "kiln's GPT has a 4 × n_embd MLP"));
        }
        let eps = r.float_or("layer_norm_epsilon", LN_EPS)?;
        if (eps - LN_EPS).abs() > 1e-12 {
            return Err(r.refuse("layer_norm_epsilon", "kiln's GPT uses 1e-5"));
        }
        for (k, want) in [
            ("tie_word_embeddings", true),
            ("scale_attn_weights", true),
            ("add_cross_attention", false),
            ("scale_attn_by_inverse_layer_idx", false),
        ] {
            if r.v[k].as_bool().is_some_and(|b| b != want) {
                return Err(r.refuse(k, &format!("kiln's GPT needs {want}")));
            }
        }
        Ok(GptConfig {
            n_layer: r.uint("n_layer")?,
            n_head: r.uint("n_head")?,
            n_embd,
            block_size: r.uint("n_positions")?,
            vocab_size: r.uint("vocab_size")?,
            dropout: 0.0,
            bias: true,
            checkpoint_activations: false,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
