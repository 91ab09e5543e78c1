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
    decode_step, lm_head, run_blocks, Activation, Attention, Block, Embedding, FeedForward, Linear,
    Norm, NormPlace, Qkv,
};
use crate::{
    check_divisible, check_dropout, check_positive, dropout, resolve_context, resolve_vocab,
    ConfigError, Decoder, KvCache, Model,
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

impl GptConfig {
    pub(crate) fn resolve(
        &mut self,
        vocab: usize,
        seq_len: usize,
    ) -> std::result::Result<(), ConfigError> {
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
}

pub struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
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
                    ),
                    norm_2: ln(vb.pp("ln_2"))?,
                    mlp: FeedForward::gelu(
                        Linear::conv1d(c, 4 * c, std, bias, m.pp("c_fc"))?,
                        Linear::conv1d(4 * c, c, proj_std, bias, m.pp("c_proj"))?,
                        Activation::GeluTanh,
                    ),
                    place: NormPlace::Pre,
                    p_drop: cfg.dropout,
                    rng: rng.clone(),
                    compute,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt {
            wte: Embedding::new(cfg.vocab_size, c, std, vb.pp("wte"))?,
            wpe: Embedding::new(cfg.block_size, c, std, vb.pp("wpe"))?,
            h,
            ln_f: ln(vb.pp("ln_f"))?,
            dropout: cfg.dropout,
            rng,
            compute,
            config: cfg.clone(),
        })
    }

    /// Token plus position embeddings of `idx` (B, T) at positions `start`…
    fn embed(&self, idx: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        let pos = Tensor::arange(start as u32, (start + t) as u32, idx.device())?;
        self.wte
            .forward(idx)?
            .broadcast_add(&self.wpe.forward(&pos)?)
    }

    /// The final LayerNorm and the head, which shares the token embedding (HF's
    /// `lm_head.weight` is `transformer.wte.weight`).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        lm_head(&self.ln_f.forward(x)?, self.wte.table(), self.compute)
    }
}

impl Model for Gpt {
    /// Token ids (B, T) → logits (B, T, vocab).
    fn forward(&self, idx: &Tensor, train: bool) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        if t > self.config.block_size {
            candle_core::bail!(
                "sequence of {t} tokens is longer than block_size {}",
                self.config.block_size
            );
        }
        let x = dropout(self.embed(idx, 0)?, self.dropout, train, &self.rng)?;
        let ckpt = self.config.checkpoint_activations;
        self.logits(&run_blocks(&self.h, x, None, train, ckpt)?)
    }

    fn as_decoder(&self) -> Option<&dyn Decoder> {
        Some(self)
    }
}

impl Decoder for Gpt {
    fn context(&self) -> usize {
        self.config.block_size
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.h.len())
    }

    fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let embed = |ids: &Tensor, start| self.embed(ids, start);
        let logits = |x: &Tensor| self.logits(x);
        decode_step(&self.h, idx, cache, self.context(), embed, logits)
    }
}

/// `config.json` for `c` in HF's `GPT2Config` schema, without the dtype keys or special
/// tokens (the exporter adds those).
pub(crate) fn hf_config(c: &GptConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LN_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "use_cache": true,
    })
}

/// The kiln config of a GPT-2 `config.json`; anything kiln computes differently is refused,
/// naming the key.
pub(crate) fn config_from_hf(r: &HfReader) -> anyhow::Result<GptConfig> {
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
    if !(r.v["n_inner"].is_null() || r.v["n_inner"].as_u64() == Some(4 * n_embd as u64)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_model_grads;
    use crate::ModelConfig;
    use candle_core::{DType, Device};

    #[test]
    fn cached_decoding_matches_the_full_forward() {
        let cfg = GptConfig {
            block_size: 7,
            ..tiny()
        };
        crate::testing::check_cached_decoding(&ModelConfig::Gpt(cfg));
    }

    fn tiny() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 5,
            vocab_size: 7,
            dropout: 0.0,
            bias: true,
            checkpoint_activations: false,
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
        check_model_grads(&ModelConfig::Gpt(tiny()), &x, &y);
        crate::testing::check_mixed_precision(&ModelConfig::Gpt(tiny()), &x, &y);
    }

    #[test]
    fn parameter_names_are_hugging_face_gpt2() {
        let vm = candle_nn::VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout"), DType::F32).unwrap();
        let data = vm.data().lock().unwrap();
        let shape = |n: &str| {
            data.get(n)
                .unwrap_or_else(|| panic!("missing {n}"))
                .dims()
                .to_vec()
        };
        assert_eq!(shape("transformer.wte.weight"), [7, 8]);
        assert_eq!(shape("transformer.wpe.weight"), [5, 8]);
        assert_eq!(shape("transformer.h.1.attn.c_attn.weight"), [8, 24]); // Conv1D: (in, out)
        assert_eq!(shape("transformer.h.1.mlp.c_proj.weight"), [32, 8]);
        assert_eq!(shape("transformer.ln_f.bias"), [8]);
        // 4 tensors outside the blocks, 12 per block, no separate head.
        assert_eq!(data.len(), 4 + 12 * 2);
    }

    #[test]
    fn attention_is_causal() {
        // Changing a later token must not change earlier logits.
        let vm = candle_nn::VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
        let m = Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout"), DType::F64).unwrap();
        let a = m
            .forward(
                &Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap(),
                false,
            )
            .unwrap();
        let b = m
            .forward(
                &Tensor::new(&[[1u32, 2, 3, 6]], &Device::Cpu).unwrap(),
                false,
            )
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum((0, 2))
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(&diff[..3], &[0.0, 0.0, 0.0]);
        assert!(diff[3] > 0.0);
    }

    /// Recomputing the blocks in the backward (with dropout on, so the recomputation must
    /// replay the same masks) gives the gradients of the stored-activation run.
    #[test]
    fn checkpointed_activations_give_identical_gradients() {
        let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
        let grads = |checkpoint: bool| {
            let cfg = GptConfig {
                dropout: 0.3,
                checkpoint_activations: checkpoint,
                ..tiny()
            };
            let vm = candle_nn::VarMap::new();
            let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
            let m = Gpt::new(&cfg, vb, SharedRng::new(5, "dropout"), DType::F64).unwrap();
            let logits = m.forward(&x, true).unwrap();
            let loss = kiln_kernels::cross_entropy(
                &logits.reshape((8, 7)).unwrap(),
                &y.flatten_all().unwrap(),
            )
            .unwrap();
            let g = kiln_kernels::backward(&loss).unwrap();
            let mut named: Vec<(String, Vec<f64>)> = vm
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(n, v)| {
                    let g = g.get(v).unwrap_or_else(|| panic!("{n} has no gradient"));
                    (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (named, m.rng.position())
        };
        let (plain, plain_rng) = grads(false);
        let (ckpt, ckpt_rng) = grads(true);
        assert_eq!(
            plain_rng, ckpt_rng,
            "the recomputation must leave the generator as it was"
        );
        for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
            let diff = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{name}: gradients differ by {diff}");
        }
    }
}
