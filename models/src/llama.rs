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

use crate::{
    cached_attention, check_dropout, checkpointed, dropout, in_precision, ConfigError, Decoder,
    KvCache, Model,
};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use kiln_core::rng::SharedRng;
use kiln_kernels::{causal_self_attention, embedding, rms_norm};
use serde::{Deserialize, Serialize};

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
        for (key, v) in [
            ("model.hidden_size", self.hidden_size),
            ("model.intermediate_size", self.intermediate_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err((
                "model.num_attention_heads",
                format!(
                    "hidden_size = {} is not divisible by num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
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
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err((
                "model.num_key_value_heads",
                format!(
                    "num_attention_heads = {} is not divisible by num_key_value_heads = {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.max_position_embeddings == 0 {
            self.max_position_embeddings = seq_len;
        }
        if self.max_position_embeddings == 0 {
            return Err((
                "model.max_position_embeddings",
                "must be at least 1 (it defaults to data.seq_len)".into(),
            ));
        }
        if seq_len > self.max_position_embeddings {
            return Err((
                "model.max_position_embeddings",
                format!(
                    "{} is shorter than data.seq_len = {seq_len}",
                    self.max_position_embeddings
                ),
            ));
        }
        if self.vocab_size == 0 {
            self.vocab_size = vocab;
        } else if self.vocab_size < vocab {
            return Err((
                "model.vocab_size",
                format!(
                    "{} is smaller than the data's vocabulary ({vocab})",
                    self.vocab_size
                ),
            ));
        }
        for (key, v) in [
            ("model.rms_norm_eps", self.rms_norm_eps),
            ("model.rope_theta", self.rope_theta),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err((key, format!("must be positive, got {v}")));
            }
        }
        Ok(())
    }
}

/// `nn.Linear` without a bias: y = x · Wᵀ with W stored (out, in).
#[derive(Clone)]
struct Linear {
    weight: Tensor,
}

impl Linear {
    fn new(n_in: usize, n_out: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (n_out, n_in),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        Ok(Linear { weight })
    }

    /// x · Wᵀ in the `compute` dtype, returned in x's dtype.
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        // One 2-D matmul over all positions: cheaper forward and backward than a batched one.
        let mut out_dims = x.dims().to_vec();
        let n_in = out_dims.pop().expect("x has a feature dimension");
        out_dims.push(self.weight.dim(0)?);
        in_precision(&x.reshape(((), n_in))?, &self.weight.t()?, compute)?.reshape(out_dims)
    }
}

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(n: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(n, "weight", Init::Const(1.0))?;
        Ok(RmsNorm { weight, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// Rotary position embedding in HF's non-interleaved layout: feature i pairs with i + D/2,
/// and x ↦ x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁).
#[derive(Clone)]
struct Rope {
    /// cos and sin of p·θ^(−2i/D) for each position p and i < D/2, the D/2 angles repeated
    /// for both halves: (positions, D) each.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `positions` positions, computed in f64 and stored in `dtype`: the residual
    /// stream's, so f32 under mixed precision (HF computes them in f32).
    fn new(
        positions: usize,
        head_dim: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let angles: Vec<f64> = (0..positions)
            .flat_map(|p| {
                (0..head_dim).map(move |j| {
                    let i = j % half;
                    p as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64)
                })
            })
            .collect();
        let table = |f: fn(f64) -> f64| {
            let v: Vec<f64> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(v, (positions, head_dim), dev)?.to_dtype(dtype)
        };
        Ok(Rope {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// `x` (B, T, heads, D) at positions start…start+T, rotated.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t, _, d) = x.dims4()?;
        let table = |tab: &Tensor| tab.narrow(0, start, t)?.unsqueeze(1); // (T, 1, D)
        let half = d / 2;
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        x.broadcast_mul(&table(&self.cos)?)? + rotated.broadcast_mul(&table(&self.sin)?)?
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    rope: Rope,
}

impl Attention {
    /// q (B, H, T, D) and k, v (B, KV, T, D) of positions start…, rotated, in the compute dtype
    /// (the attention kernel keeps its softmax in f32).
    fn qkv(&self, x: &Tensor, start: usize, compute: DType) -> Result<[Tensor; 3]> {
        let (b, t, _) = x.dims3()?;
        let heads = |p: &Linear, n: usize| p.forward(x, compute)?.reshape((b, t, n, self.head_dim));
        // RoPE runs in x's dtype (f32 under mixed precision), then the heads go to `compute`.
        let bhtd = |x: Tensor| x.to_dtype(compute)?.transpose(1, 2)?.contiguous();
        let q = self.rope.apply(&heads(&self.q_proj, self.n_head)?, start)?;
        let k = self
            .rope
            .apply(&heads(&self.k_proj, self.n_kv_head)?, start)?;
        let v = heads(&self.v_proj, self.n_kv_head)?;
        Ok([bhtd(q)?, bhtd(k)?, bhtd(v)?])
    }

    /// k or v (B, KV, T, D) with each head repeated for the H / KV query heads that share it
    /// (HF's `repeat_kv`: query head h reads key/value head h / (H / KV)).
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let n = self.n_head / self.n_kv_head;
        if n == 1 {
            return Ok(x);
        }
        let (b, kv, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv, n, t, d))?
            .reshape((b, kv * n, t, d))
    }

    /// The heads' outputs (B, H, T, D) merged and projected, in `dtype`.
    fn out(&self, y: &Tensor, dtype: DType, compute: DType) -> Result<Tensor> {
        let (b, h, t, d) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?.to_dtype(dtype)?;
        self.o_proj.forward(&y, compute)
    }

    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let [q, k, v] = self.qkv(x, 0, compute)?;
        let y = causal_self_attention(&q, &self.repeat_kv(k)?, &self.repeat_kv(v)?)?;
        self.out(&y, x.dtype(), compute)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        cache: &KvCache,
        i: usize,
        compute: DType,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let [q, k, v] = self.qkv(x, cache.len(), compute)?;
        let (k, v) = cache.extended(i, k, v)?;
        let y = cached_attention(&q, &self.repeat_kv(k.clone())?, &self.repeat_kv(v.clone())?)?;
        Ok((self.out(&y, x.dtype(), compute)?, (k, v)))
    }
}

/// SwiGLU: down(silu(gate(x)) · up(x)).
#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        // candle's `silu` has a backward (unlike candle-nn's fused ops).
        let gate = self.gate_proj.forward(x, compute)?.silu()?;
        let h = (gate * self.up_proj.forward(x, compute)?)?;
        self.down_proj.forward(&h, compute)
    }
}

/// One pre-RMSNorm decoder layer, with what it needs to run alone (for recomputation).
#[derive(Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    dropout: f64,
    rng: SharedRng,
    compute: DType,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let a = (self.self_attn).forward(&self.input_layernorm.forward(x)?, self.compute)?;
        let x = (x + dropout(a, self.dropout, train, &self.rng)?)?;
        let m = (self.mlp).forward(&self.post_attention_layernorm.forward(&x)?, self.compute)?;
        x + dropout(m, self.dropout, train, &self.rng)?
    }

    fn params(&self) -> Vec<Tensor> {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &self.input_layernorm.weight,
            &a.q_proj.weight,
            &a.k_proj.weight,
            &a.v_proj.weight,
            &a.o_proj.weight,
            &self.post_attention_layernorm.weight,
            &m.gate_proj.weight,
            &m.up_proj.weight,
            &m.down_proj.weight,
        ]
        .into_iter()
        .cloned()
        .collect()
    }

    /// The block with its activations recomputed during the backward.
    fn forward_checkpointed(&self, x: &Tensor) -> Result<Tensor> {
        let block = self.clone();
        checkpointed(x, self.params(), &self.rng, move |x| block.forward(x, true))
    }

    /// An inference forward of new positions after those cached for layer `i`; returns the
    /// output and this layer's extended keys and values.
    fn forward_cached(
        &self,
        x: &Tensor,
        cache: &KvCache,
        i: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (a, kv) = (self.self_attn).forward_cached(
            &self.input_layernorm.forward(x)?,
            cache,
            i,
            self.compute,
        )?;
        let x = (x + a)?;
        let m = (self.mlp).forward(&self.post_attention_layernorm.forward(&x)?, self.compute)?;
        Ok(((x + m)?, kv))
    }
}

pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// None when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    compute: DType,
    pub config: LlamaConfig,
}

impl Llama {
    /// `compute` is the dtype of the matmuls and the attention (the weights' dtype for full
    /// precision, bf16/f16 for mixed precision).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let (n_head, n_kv_head, head_dim) =
            (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let std = 0.02;
        // Residual projections are scaled down by √(2·n_layers) (GPT-2 paper, nanoGPT).
        let proj_std = std / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let randn = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let rope = Rope::new(
            cfg.max_position_embeddings,
            head_dim,
            cfg.rope_theta,
            vb.dtype(),
            vb.device(),
        )?;
        let m = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = m.pp(format!("layers.{i}"));
                let (a, f) = (vb.pp("self_attn"), vb.pp("mlp"));
                let kv = n_kv_head * head_dim;
                Ok(Block {
                    input_layernorm: RmsNorm::new(c, eps, vb.pp("input_layernorm"))?,
                    self_attn: Attention {
                        q_proj: Linear::new(c, c, std, a.pp("q_proj"))?,
                        k_proj: Linear::new(c, kv, std, a.pp("k_proj"))?,
                        v_proj: Linear::new(c, kv, std, a.pp("v_proj"))?,
                        o_proj: Linear::new(c, c, proj_std, a.pp("o_proj"))?,
                        n_head,
                        n_kv_head,
                        head_dim,
                        rope: rope.clone(),
                    },
                    post_attention_layernorm: RmsNorm::new(
                        c,
                        eps,
                        vb.pp("post_attention_layernorm"),
                    )?,
                    mlp: Mlp {
                        gate_proj: Linear::new(c, cfg.intermediate_size, std, f.pp("gate_proj"))?,
                        up_proj: Linear::new(c, cfg.intermediate_size, std, f.pp("up_proj"))?,
                        down_proj: Linear::new(
                            cfg.intermediate_size,
                            c,
                            proj_std,
                            f.pp("down_proj"),
                        )?,
                    },
                    dropout: cfg.dropout,
                    rng: rng.clone(),
                    compute,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| vb.get_with_hints((cfg.vocab_size, c), "lm_head.weight", randn))
            .transpose()?;
        Ok(Llama {
            embed_tokens: m.get_with_hints((cfg.vocab_size, c), "embed_tokens.weight", randn)?,
            layers,
            norm: RmsNorm::new(c, eps, m.pp("norm"))?,
            lm_head,
            compute,
            config: cfg.clone(),
        })
    }

    /// The final RMSNorm and the head.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let x = self.norm.forward(x)?;
        let (b, t, c) = x.dims3()?;
        in_precision(&x.reshape((b * t, c))?, &head.t()?, self.compute)?.reshape((b, t, ()))
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
        let mut x = embedding(ids, &self.embed_tokens)?;
        for block in &self.layers {
            x = if train && self.config.checkpoint_activations {
                block.forward_checkpointed(&x)?
            } else {
                block.forward(&x, train)?
            };
        }
        self.logits(&x)
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
        let t = cache.check_step(ids, self.layers.len(), self.context())?;
        let mut x = embedding(ids, &self.embed_tokens)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, block) in self.layers.iter().enumerate() {
            let (y, kv) = block.forward_cached(&x, cache, i)?;
            x = y;
            layers.push(kv);
        }
        let logits = self.logits(&x)?;
        cache.commit(layers, t);
        Ok(logits)
    }
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
