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
    decode_step, lm_head, normal, run_blocks, Attention, Block, Embedding, FeedForward, Linear,
    Norm, NormPlace, Qkv, Rope,
};
use crate::{
    check_divisible, check_dropout, check_positive, check_positive_f64, resolve_context,
    resolve_vocab, ConfigError, Decoder, KvCache, Model,
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
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Key/value heads (num_attention_heads when left at 0).
    pub fn kv_heads(&self) -> usize {
        match self.num_key_value_heads {
            0 => self.num_attention_heads,
            n => n,
        }
    }

    pub(crate) fn resolve(
        &mut self,
        vocab: usize,
        seq_len: usize,
    ) -> std::result::Result<(), ConfigError> {
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
}

pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
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
                    place: NormPlace::Pre,
                    p_drop: cfg.dropout,
                    rng: rng.clone(),
                    compute,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| vb.get_with_hints((cfg.vocab_size, c), "lm_head.weight", normal(std)))
            .transpose()?;
        Ok(Llama {
            embed_tokens: Embedding::new(cfg.vocab_size, c, std, m.pp("embed_tokens"))?,
            layers,
            norm: Norm::rms_norm(c, eps, m.pp("norm"))?,
            lm_head,
            compute,
            config: cfg.clone(),
        })
    }

    /// The final RMSNorm and the head.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = (self.lm_head.as_ref()).unwrap_or(self.embed_tokens.table());
        lm_head(&self.norm.forward(x)?, head, self.compute)
    }
}

impl Model for Llama {
    /// Token ids (B, T) → logits (B, T, vocab).
    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens is longer than max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let x = self.embed_tokens.forward(ids)?;
        let ckpt = self.config.checkpoint_activations;
        self.logits(&run_blocks(&self.layers, x, None, train, ckpt)?)
    }

    fn as_decoder(&self) -> Option<&dyn Decoder> {
        Some(self)
    }
}

impl Decoder for Llama {
    fn context(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let embed = |ids: &Tensor, _| self.embed_tokens.forward(ids);
        let logits = |x: &Tensor| self.logits(x);
        decode_step(&self.layers, ids, cache, self.context(), embed, logits)
    }
}

/// `config.json` for `c` in HF's `LlamaConfig` schema, without the dtype keys or special
/// tokens (the exporter adds those).
pub(crate) fn hf_config(c: &LlamaConfig) -> Value {
    json!({
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
    })
}

/// The kiln config of a Llama `config.json`; anything kiln computes differently is refused,
/// naming the key.
pub(crate) fn config_from_hf(r: &HfReader) -> anyhow::Result<LlamaConfig> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_cached_decoding, check_mixed_precision, check_model_grads};
    use crate::ModelConfig;
    use candle_core::Device;

    /// Grouped-query attention: 4 query heads share 2 key/value heads, head size 4.
    fn tiny() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 7,
            max_position_embeddings: 5,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            dropout: 0.0,
            checkpoint_activations: false,
        }
    }

    /// Tied head, and 0 key/value heads meaning one per query head (plain multi-head).
    fn tiny_tied() -> LlamaConfig {
        LlamaConfig {
            num_key_value_heads: 0,
            tie_word_embeddings: true,
            ..tiny()
        }
    }

    fn build(cfg: &LlamaConfig, dtype: DType) -> (candle_nn::VarMap, Llama) {
        let vm = candle_nn::VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
        let m = Llama::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
        (vm, m)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
        for cfg in [tiny(), tiny_tied()] {
            check_model_grads(&ModelConfig::Llama(cfg.clone()), &x, &y);
            check_mixed_precision(&ModelConfig::Llama(cfg), &x, &y);
        }
    }

    #[test]
    fn parameter_names_are_hugging_face_llama() {
        let shapes = |cfg: &LlamaConfig| {
            let (vm, _) = build(cfg, DType::F32);
            let data = vm.data().lock().unwrap();
            let mut v: Vec<(String, Vec<usize>)> = data
                .iter()
                .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                .collect();
            v.sort();
            v
        };
        let untied = shapes(&tiny());
        let shape = |n: &str| {
            let found = untied.iter().find(|(name, _)| name == n);
            found.unwrap_or_else(|| panic!("missing {n}")).1.clone()
        };
        assert_eq!(shape("model.embed_tokens.weight"), [7, 16]);
        assert_eq!(shape("model.layers.1.input_layernorm.weight"), [16]);
        assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [16, 16]); // (out, in)
        assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [8, 16]); // 2 kv heads of 4
        assert_eq!(shape("model.layers.1.self_attn.v_proj.weight"), [8, 16]);
        assert_eq!(shape("model.layers.1.self_attn.o_proj.weight"), [16, 16]);
        assert_eq!(
            shape("model.layers.1.post_attention_layernorm.weight"),
            [16]
        );
        assert_eq!(shape("model.layers.1.mlp.gate_proj.weight"), [24, 16]);
        assert_eq!(shape("model.layers.1.mlp.up_proj.weight"), [24, 16]);
        assert_eq!(shape("model.layers.1.mlp.down_proj.weight"), [16, 24]);
        assert_eq!(shape("model.norm.weight"), [16]);
        assert_eq!(shape("lm_head.weight"), [7, 16]);
        // 3 tensors outside the layers, 9 per layer; tied: no lm_head.
        assert_eq!(untied.len(), 3 + 9 * 2);
        let tied = shapes(&tiny_tied());
        assert_eq!(tied.len(), 2 + 9 * 2);
        assert!(tied.iter().all(|(n, _)| n != "lm_head.weight"));
        assert!(tied
            .iter()
            .any(|(n, s)| n == "model.layers.0.self_attn.k_proj.weight" && s == &[16, 16]));
    }

    #[test]
    fn initialization() {
        let cfg = LlamaConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            vocab_size: 256,
            ..tiny()
        };
        let (vm, _) = build(&cfg, DType::F64);
        let data = vm.data().lock().unwrap();
        let std = |n: &str| {
            let t = data[n].as_tensor();
            let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        let near = |got: f64, want: f64| (got / want - 1.0).abs() < 0.1;
        assert!(near(std("model.embed_tokens.weight"), 0.02));
        assert!(near(std("model.layers.0.mlp.up_proj.weight"), 0.02));
        assert!(near(std("model.layers.0.self_attn.o_proj.weight"), 0.01)); // 0.02 / √(2·2)
        assert!(near(std("model.layers.0.mlp.down_proj.weight"), 0.01));
        let norm: Vec<f64> = data["model.norm.weight"].as_tensor().to_vec1().unwrap();
        assert!(norm.iter().all(|&w| w == 1.0));
    }

    #[test]
    fn rope_matches_hugging_face() {
        // HF: inv_freq = θ^(−[0, 2]/4) = [1, 0.01]; q·cos + rotate_half(q)·sin at position 1.
        let rope = Rope::new(3, 4, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let x = x.reshape((1, 1, 1, 4)).unwrap();
        let got: Vec<f64> = rope
            .apply(&x, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
        let want = [
            c1 - 3.0 * s1,
            2.0 * c2 - 4.0 * s2,
            3.0 * c1 + s1,
            4.0 * c2 + 2.0 * s2,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // Position 0 is the identity.
        let at0 = rope.apply(&x, 0).unwrap();
        assert_eq!(
            at0.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn attention_is_causal() {
        // Changing a later token must not change earlier logits.
        let (_, m) = build(&tiny(), DType::F64);
        let logits = |ids: [u32; 4]| {
            m.forward(&Tensor::new(&[ids], &Device::Cpu).unwrap(), false)
                .unwrap()
        };
        let diff = (logits([1, 2, 3, 4]) - logits([1, 2, 3, 6]))
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

    #[test]
    fn cached_decoding_matches_the_full_forward() {
        for cfg in [tiny(), tiny_tied()] {
            let cfg = LlamaConfig {
                max_position_embeddings: 7,
                ..cfg
            };
            check_cached_decoding(&ModelConfig::Llama(cfg));
        }
    }

    /// Recomputing the blocks in the backward (with dropout on, so the recomputation must
    /// replay the same masks) gives the gradients of the stored-activation run.
    #[test]
    fn checkpointed_activations_give_identical_gradients() {
        let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
        let grads = |checkpoint: bool| {
            let cfg = LlamaConfig {
                dropout: 0.3,
                checkpoint_activations: checkpoint,
                ..tiny()
            };
            let vm = candle_nn::VarMap::new();
            let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
            let rng = SharedRng::new(5, "dropout");
            let m = Llama::new(&cfg, vb, rng.clone(), DType::F64).unwrap();
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
            (named, rng.position())
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

    #[test]
    fn resolve_fills_defaults_and_validates() {
        let mut cfg: LlamaConfig = toml::from_str(
            "hidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 2\n\
             num_attention_heads = 4",
        )
        .unwrap();
        assert_eq!((cfg.rms_norm_eps, cfg.rope_theta), (1e-5, 10000.0));
        cfg.resolve(65, 32).unwrap();
        assert_eq!(
            (
                cfg.num_key_value_heads,
                cfg.vocab_size,
                cfg.max_position_embeddings
            ),
            (4, 65, 32)
        );
        let fails = |f: fn(&mut LlamaConfig), key: &str| {
            let mut c = tiny();
            f(&mut c);
            assert_eq!(c.resolve(7, 5).unwrap_err().0, key);
        };
        fails(|c| c.num_key_value_heads = 3, "model.num_key_value_heads");
        fails(|c| c.num_key_value_heads = 8, "model.num_key_value_heads");
        fails(|c| c.num_attention_heads = 3, "model.num_attention_heads");
        fails(|c| c.hidden_size = 12, "model.num_attention_heads"); // head size 3 is odd
        fails(
            |c| c.max_position_embeddings = 4,
            "model.max_position_embeddings",
        );
        fails(|c| c.vocab_size = 6, "model.vocab_size");
        fails(|c| c.dropout = 1.0, "model.dropout");
        fails(|c| c.rope_theta = 0.0, "model.rope_theta");
        fails(|c| c.intermediate_size = 0, "model.intermediate_size");
        assert!(toml::from_str::<LlamaConfig>("hidden_size = 16\nn_head = 2").is_err());
    }

    #[test]
    fn a_recipe_builds_a_llama() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../recipes/shakespeare-char.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let model = "[model]\nkind = \"llama\"\nhidden_size = 16\nintermediate_size = 24\n\
                     num_hidden_layers = 1\nnum_attention_heads = 4\nnum_key_value_heads = 1\n";
        let start = text.find("[model]").unwrap();
        let end = text.find("[data]").unwrap();
        let text = format!("{}{model}\n{}", &text[..start], &text[end..]);
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &text, &[]).unwrap();
        let cfg = ModelConfig::from_recipe(&recipe, 65, &[64]).unwrap();
        assert_eq!(cfg.kind(), "llama");
        let ModelConfig::Llama(c) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!(
            (
                c.vocab_size,
                c.max_position_embeddings,
                c.num_key_value_heads
            ),
            (65, 64, 1)
        );
        // The resolved table decodes back to the same config.
        let mut table = cfg.to_table();
        assert_eq!(table.get("kind").and_then(|k| k.as_str()), Some("llama"));
        table.remove("kind");
        assert_eq!(
            &toml::Value::Table(table).try_into::<LlamaConfig>().unwrap(),
            c
        );

        let bad = text.replace("kind = \"llama\"", "kind = \"lama\"");
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &bad, &[]).unwrap();
        let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
        assert!(err.contains("\"llama\""), "{err}");
    }
}
