//! GPT in the nanoGPT mould: token + position embeddings, pre-LayerNorm blocks of causal
//! self-attention and a GELU MLP, a final LayerNorm and a head tied to the token embedding.
//!
//! Parameter paths and shapes are Hugging Face `GPT2LMHeadModel`'s: `transformer.wte.weight`,
//! `transformer.h.0.attn.c_attn.weight`, … The projections are GPT-2's `Conv1D`, whose weight is
//! stored (in, out), so `x · W` needs no transpose and export is the identity.

use crate::{check_dropout, ConfigError, Model};
use candle_core::{Result, Tensor, D};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use kiln_core::rng::SharedRng;
use kiln_kernels::{causal_self_attention, gelu, layer_norm};
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

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D matmul over all positions: cheaper forward and backward than a batched one.
        let mut out_dims = x.dims().to_vec();
        let n_in = out_dims.pop().expect("x has a feature dimension");
        out_dims.push(self.weight.dim(1)?);
        let y = x
            .reshape(((), n_in))?
            .matmul(&self.weight)?
            .reshape(out_dims)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

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
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| {
            qkv.narrow(D::Minus1, i * c, c)?
                .reshape((b, t, self.n_head, c / self.n_head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let y = causal_self_attention(&heads(0)?, &heads(1)?, &heads(2)?)?;
        self.c_proj.forward(&y.transpose(1, 2)?.reshape((b, t, c))?)
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

pub struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    dropout: f64,
    rng: SharedRng,
    pub config: GptConfig,
}

impl Gpt {
    pub fn new(cfg: &GptConfig, vb: VarBuilder, rng: SharedRng) -> Result<Self> {
        let vb = vb.pp("transformer");
        let (c, bias) = (cfg.n_embd, cfg.bias);
        let std = 0.02;
        // Residual projections are scaled down by √(2·n_layer) (GPT-2 paper, nanoGPT).
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let embedding = |n: usize, name: &str| -> Result<Embedding> {
            let w = vb.get_with_hints(
                (n, c),
                &format!("{name}.weight"),
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?;
            Ok(Embedding::new(w, c))
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

    fn drop(&self, x: Tensor, train: bool) -> Result<Tensor> {
        if train && self.dropout > 0.0 {
            kiln_kernels::dropout(&x, self.dropout, &mut self.rng.lock())
        } else {
            Ok(x)
        }
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
        let pos = Tensor::arange(0u32, t as u32, idx.device())?;
        let x = self
            .wte
            .forward(idx)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        let mut x = self.drop(x, train)?;
        for block in &self.h {
            let a = block.attn.forward(&block.ln_1.forward(&x)?)?;
            x = (x + self.drop(a, train)?)?;
            let m = block.mlp.c_fc.forward(&block.ln_2.forward(&x)?)?;
            let m = block.mlp.c_proj.forward(&gelu(&m)?)?;
            x = (x + self.drop(m, train)?)?;
        }
        // The head shares the token embedding (HF's `lm_head.weight` is `transformer.wte.weight`).
        self.ln_f
            .forward(&x)?
            .broadcast_matmul(&self.wte.embeddings().t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_model_grads;
    use crate::ModelConfig;
    use candle_core::{DType, Device};

    fn tiny() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 5,
            vocab_size: 7,
            dropout: 0.0,
            bias: true,
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
        check_model_grads(&ModelConfig::Gpt(tiny()), &x, &y);
    }

    #[test]
    fn parameter_names_are_hugging_face_gpt2() {
        let vm = candle_nn::VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout")).unwrap();
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
        let m = Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout")).unwrap();
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
}
