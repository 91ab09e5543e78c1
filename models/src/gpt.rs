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

use crate::{
    cached_attention, check_dropout, checkpointed, dropout, in_precision, ConfigError, Decoder,
    KvCache, Model,
};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use kiln_core::rng::SharedRng;
use kiln_kernels::{bias_gelu, causal_self_attention, embedding, gelu, layer_norm};
use serde::{Deserialize, Serialize};

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
        for (key, v) in [
            ("model.n_layer", self.n_layer),
            ("model.n_head", self.n_head),
            ("model.n_embd", self.n_embd),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err((
                "model.n_head",
                format!(
                    "n_embd = {} is not divisible by n_head = {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if self.block_size == 0 {
            self.block_size = seq_len;
        }
        if seq_len > self.block_size {
            return Err((
                "model.block_size",
                format!(
                    "{} is shorter than data.seq_len = {seq_len}",
                    self.block_size
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
        Ok(())
    }
}

/// GPT-2's Conv1D: y = x · W + b with W stored (in, out).
#[derive(Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Conv1D {
    fn new(n_in: usize, n_out: usize, std: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (n_in, n_out),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let bias = bias
            .then(|| vb.get_with_hints(n_out, "bias", Init::Const(0.0)))
            .transpose()?;
        Ok(Conv1D { weight, bias })
    }
}

impl Conv1D {
    /// x · W in the `compute` dtype, returned in x's dtype, without the bias.
    fn matmul(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        // One 2-D matmul over all positions: cheaper forward and backward than a batched one.
        let mut out_dims = x.dims().to_vec();
        let n_in = out_dims.pop().expect("x has a feature dimension");
        out_dims.push(self.weight.dim(1)?);
        in_precision(&x.reshape(((), n_in))?, &self.weight, compute)?.reshape(out_dims)
    }

    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let y = self.matmul(x, compute)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn params(&self) -> impl Iterator<Item = Tensor> + '_ {
        std::iter::once(self.weight.clone()).chain(self.bias.clone())
    }
}

#[derive(Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LayerNorm {
    fn new(n: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(n, "weight", Init::Const(1.0))?;
        let bias = bias
            .then(|| vb.get_with_hints(n, "bias", Init::Const(0.0)))
            .transpose()?;
        Ok(LayerNorm { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, self.bias.as_ref(), 1e-5)
    }

    fn params(&self) -> impl Iterator<Item = Tensor> + '_ {
        std::iter::once(self.weight.clone()).chain(self.bias.clone())
    }
}

#[derive(Clone)]
struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
}

impl Attention {
    /// q, k, v (B, H, T, D), in the compute dtype: the attention kernel keeps its softmax in
    /// f32.
    fn qkv(&self, x: &Tensor, compute: DType) -> Result<[Tensor; 3]> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x, compute)?.to_dtype(compute)?;
        let heads = |i: usize| {
            qkv.narrow(D::Minus1, i * c, c)?
                .reshape((b, t, self.n_head, c / self.n_head))?
                .transpose(1, 2)?
                .contiguous()
        };
        Ok([heads(0)?, heads(1)?, heads(2)?])
    }

    /// The heads' outputs (B, H, T, D) merged and projected, in `dtype`.
    fn out(&self, y: &Tensor, dtype: DType, compute: DType) -> Result<Tensor> {
        let (b, h, t, d) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?.to_dtype(dtype)?;
        self.c_proj.forward(&y, compute)
    }

    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let [q, k, v] = self.qkv(x, compute)?;
        self.out(&causal_self_attention(&q, &k, &v)?, x.dtype(), compute)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        cache: &KvCache,
        i: usize,
        compute: DType,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let [q, k, v] = self.qkv(x, compute)?;
        let (k, v) = cache.extended(i, k, v)?;
        let y = self.out(&cached_attention(&q, &k, &v)?, x.dtype(), compute)?;
        Ok((y, (k, v)))
    }
}

#[derive(Clone)]
struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

impl Mlp {
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let h = self.c_fc.matmul(x, compute)?;
        let h = match &self.c_fc.bias {
            Some(b) => bias_gelu(&h, b)?,
            None => gelu(&h)?,
        };
        self.c_proj.forward(&h, compute)
    }
}

/// One pre-LayerNorm transformer block, with what it needs to run alone (for recomputation).
#[derive(Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
    dropout: f64,
    rng: SharedRng,
    compute: DType,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let a = self.attn.forward(&self.ln_1.forward(x)?, self.compute)?;
        let x = (x + dropout(a, self.dropout, train, &self.rng)?)?;
        let m = self.mlp.forward(&self.ln_2.forward(&x)?, self.compute)?;
        x + dropout(m, self.dropout, train, &self.rng)?
    }

    fn params(&self) -> Vec<Tensor> {
        let (a, m) = (&self.attn, &self.mlp);
        (self.ln_1.params())
            .chain(a.c_attn.params())
            .chain(a.c_proj.params())
            .chain(self.ln_2.params())
            .chain(m.c_fc.params())
            .chain(m.c_proj.params())
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
        let (a, kv) = self
            .attn
            .forward_cached(&self.ln_1.forward(x)?, cache, i, self.compute)?;
        let x = (x + a)?;
        let m = self.mlp.forward(&self.ln_2.forward(&x)?, self.compute)?;
        Ok(((x + m)?, kv))
    }
}

pub struct Gpt {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    dropout: f64,
    rng: SharedRng,
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
        let embedding = |n: usize, name: &str| -> Result<Tensor> {
            vb.get_with_hints(
                (n, c),
                &format!("{name}.weight"),
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )
        };
        let h = (0..cfg.n_layer)
            .map(|i| {
                let vb = vb.pp(format!("h.{i}"));
                Ok(Block {
                    ln_1: LayerNorm::new(c, bias, vb.pp("ln_1"))?,
                    attn: Attention {
                        c_attn: Conv1D::new(c, 3 * c, std, bias, vb.pp("attn.c_attn"))?,
                        c_proj: Conv1D::new(c, c, proj_std, bias, vb.pp("attn.c_proj"))?,
                        n_head: cfg.n_head,
                    },
                    ln_2: LayerNorm::new(c, bias, vb.pp("ln_2"))?,
                    mlp: Mlp {
                        c_fc: Conv1D::new(c, 4 * c, std, bias, vb.pp("mlp.c_fc"))?,
                        c_proj: Conv1D::new(4 * c, c, proj_std, bias, vb.pp("mlp.c_proj"))?,
                    },
                    dropout: cfg.dropout,
                    rng: rng.clone(),
                    compute,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt {
            wte: embedding(cfg.vocab_size, "wte")?,
            wpe: embedding(cfg.block_size, "wpe")?,
            h,
            ln_f: LayerNorm::new(c, bias, vb.pp("ln_f"))?,
            dropout: cfg.dropout,
            rng,
            config: cfg.clone(),
        })
    }

    /// Token plus position embeddings of `idx` (B, T) at positions `start`…
    fn embed(&self, idx: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        let pos = Tensor::arange(start as u32, (start + t) as u32, idx.device())?;
        embedding(idx, &self.wte)?.broadcast_add(&embedding(&pos, &self.wpe)?)
    }

    /// The final LayerNorm and the head.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        // The head shares the token embedding (HF's `lm_head.weight` is `transformer.wte.weight`).
        let compute = self.h.first().map_or(x.dtype(), |b| b.compute);
        let x = self.ln_f.forward(x)?;
        let (b, t, c) = x.dims3()?;
        in_precision(&x.reshape((b * t, c))?, &self.wte.t()?, compute)?.reshape((b, t, ()))
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
        let mut x = dropout(self.embed(idx, 0)?, self.dropout, train, &self.rng)?;
        for block in &self.h {
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

impl Decoder for Gpt {
    fn context(&self) -> usize {
        self.config.block_size
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.h.len())
    }

    fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = cache.check_step(idx, self.h.len(), self.context())?;
        let mut x = self.embed(idx, cache.len())?;
        let mut layers = Vec::with_capacity(self.h.len());
        for (i, block) in self.h.iter().enumerate() {
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
