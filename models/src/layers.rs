//! The parts the transformers share: projections, norms, embeddings, multi-head attention,
//! feed-forward networks and the residual block that strings them together. Each part takes
//! its [`VarBuilder`] prefix, so a model names its tensors exactly as Hugging Face does by
//! building its parts under HF's module paths; gpt.rs, llama.rs, bert.rs and vit.rs only say
//! which parts, in which order, under which names.
//!
//! Every op on a training path is one of kiln's fused kernels (projections, embedding, layer/RMS
//! norm, causal attention, softmax, bias+GELU, erf GELU, dropout, activation checkpointing,
//! backward segments), each with its own backward, or a candle op that has one (matmul, casts,
//! reshapes, `silu`). Under
//! mixed precision the matmuls run in the `compute` dtype (bf16/f16) through differentiable
//! casts ([`in_precision`]) while the residual stream, the norms and softmax statistics stay in
//! the weights' dtype.

use crate::lora::{Adapter, LoraConfig};
use crate::{cached_attention, checkpointed, dropout, in_precision, KvCache, SharedRng};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use kiln_kernels::dropout::dropout_mask;
use kiln_kernels::dropout::Draw;
use kiln_kernels::rms_norm;
use kiln_kernels::{
    bias_gelu, causal_self_attention_dropout, embedding, gelu, gelu_erf, layer_norm,
};
use kiln_kernels::{bidirectional_attention, causal_attention_packed};
use kiln_kernels::{softmax, stats_dtype, WeightLayout as Layout};

/// N(0, std²), the transformers' weight initialization.
pub(crate) fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// A projection y = x · W (+ b) (+ a LoRA adapter's update) on kiln's fused linear op, the
/// matmul in the `compute` dtype and the result in x's dtype. Weights are N(0, std²), biases 0.
#[derive(Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: Layout,
    /// A LoRA adapter, when the recipe targets this layer.
    lora: Option<Adapter>,
}

impl Linear {
    /// `nn.Linear`: weight (out, in).
    pub fn new(n_in: usize, n_out: usize, std: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((n_out, n_in), "weight", normal(std))?;
        Self::with_bias(weight, Layout::OutIn, n_out, bias, vb)
    }

    /// GPT-2's `Conv1D`: weight (in, out).
    pub fn conv1d(n_in: usize, n_out: usize, std: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((n_in, n_out), "weight", normal(std))?;
        Self::with_bias(weight, Layout::InOut, n_out, bias, vb)
    }

    fn with_bias(
        weight: Tensor,
        layout: Layout,
        n_out: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bias = bias
            .then(|| vb.get_with_hints(n_out, "bias", Init::Const(0.0)))
            .transpose()?;
        Ok(Linear {
            weight,
            bias,
            layout,
            lora: None,
        })
    }

    /// An `nn.Linear` with a bias, frozen and given a LoRA adapter when `lora` is set (the
    /// adapter only if `lora` targets its path).
    pub fn adapted(
        n_in: usize,
        n_out: usize,
        std: f64,
        lora: Option<&LoraConfig>,
        vb: VarBuilder,
        rng: &SharedRng,
    ) -> Result<Self> {
        let adapter = Adapter::for_layer(lora, n_in, n_out, &vb, rng)?;
        Ok(Linear {
            lora: adapter,
            ..Linear::new(n_in, n_out, std, true, vb)?.frozen_if(lora.is_some())
        })
    }

    /// With `yes`, the weights become constants (views of the same storage, so loading the
    /// pretrained values into the variables still reaches them) and the backward skips them.
    pub fn frozen_if(self, yes: bool) -> Self {
        if !yes {
            return self;
        }
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            ..self
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// x (…, in) · W (+ b) on all positions at once, as one graph node (kiln's `linear`):
    /// cheaper forward and backward than a batched matmul. A frozen weight is a constant, so
    /// it gets no gradient.
    fn project(&self, x: &Tensor, bias: Option<&Tensor>, compute: DType) -> Result<Tensor> {
        kiln_kernels::linear(x, &self.weight, bias, self.layout, compute)
    }

    /// x · W without the bias (nor an adapter), in x's dtype.
    pub fn matmul(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        self.project(x, None, compute)
    }

    /// x · W + b (+ the adapter's update) with the matmuls in `compute`, returned in x's
    /// dtype; `train` turns the adapter's dropout on.
    pub fn forward(&self, x: &Tensor, compute: DType, train: bool) -> Result<Tensor> {
        let y = self.project(x, self.bias.as_ref(), compute)?;
        match &self.lora {
            None => Ok(y),
            Some(lora) => {
                // The adapter's products run on (positions, in) rows.
                let n_in = x.dim(D::Minus1)?;
                let update = lora.forward(&x.reshape(((), n_in))?, compute, train)?;
                let update = update.reshape(y.shape())?;
                y + update
            }
        }
    }

    pub fn params(&self) -> Vec<Tensor> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .chain(self.lora.iter().flat_map(Adapter::params))
            .collect()
    }
}

/// Layer norm (weight, optional bias) or RMS norm (weight), on kiln's fused kernels.
#[derive(Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    rms: bool,
}

impl Norm {
    /// `nn.LayerNorm` (with a bias unless `bias` is false, as nanoGPT allows).
    pub fn layer_norm(n: usize, eps: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(n, "weight", Init::Const(1.0))?;
        let bias = bias
            .then(|| vb.get_with_hints(n, "bias", Init::Const(0.0)))
            .transpose()?;
        Ok(Norm {
            weight,
            bias,
            eps,
            rms: false,
        })
    }

    /// Llama's `LlamaRMSNorm`.
    pub fn rms_norm(n: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(n, "weight", Init::Const(1.0))?;
        Ok(Norm {
            weight,
            bias: None,
            eps,
            rms: true,
        })
    }

    /// Constant weights with `yes` (LoRA), as [`Linear::frozen_if`].
    pub fn frozen_if(self, yes: bool) -> Self {
        match yes {
            false => self,
            true => Norm {
                weight: self.weight.detach(),
                bias: self.bias.as_ref().map(Tensor::detach),
                ..self
            },
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.rms {
            rms_norm(x, &self.weight, self.eps)
        } else {
            layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)
        }
    }

    pub fn params(&self) -> Vec<Tensor> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .collect()
    }
}

/// `nn.Embedding`: a (rows, dims) table, N(0, std²), looked up with kiln's embedding kernel
/// (scatter-add backward).
#[derive(Clone)]
pub(crate) struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(rows: usize, dims: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((rows, dims), "weight", normal(std))?;
        Ok(Embedding { weight })
    }

    /// A constant table with `yes` (LoRA): the backward then never scatters into it.
    pub fn frozen_if(self, yes: bool) -> Self {
        match yes {
            false => self,
            true => Embedding {
                weight: self.weight.detach(),
            },
        }
    }

    /// Rows `ids` (any shape) → (…, dims).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        embedding(ids, &self.weight)
    }

    pub fn table(&self) -> &Tensor {
        &self.weight
    }
}

/// A language model head: x (B, T, C) · Wᵀ for a (vocab, C) `weight` (its own, or the tied
/// token embedding), the matmul in `compute` → logits (B, T, vocab) in x's dtype.
pub(crate) fn lm_head(x: &Tensor, weight: &Tensor, compute: DType) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    in_precision(&x.reshape((b * t, c))?, &weight.t()?, compute)?.reshape((b, t, ()))
}

/// Rotary position embedding in HF's non-interleaved layout: feature i pairs with i + D/2,
/// and x ↦ x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁).
#[derive(Clone)]
pub(crate) struct Rope {
    /// cos and sin of p·θ^(−2i/D) for each position p and i < D/2, the D/2 angles repeated
    /// for both halves: (positions, D) each.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `positions` positions, computed in f64 and stored in `dtype`: the residual
    /// stream's, so f32 under mixed precision (HF computes them in f32).
    pub fn new(
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
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
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

/// The query, key and value projections: one fused (GPT-2's `c_attn`, output [q; k; v]) or
/// three.
#[derive(Clone)]
pub(crate) enum Qkv {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

impl Qkv {
    fn params(&self) -> Vec<Tensor> {
        match self {
            Qkv::Fused(p) => p.params(),
            Qkv::Split { q, k, v } => [q.params(), k.params(), v.params()].concat(),
        }
    }
}

/// Multi-head self-attention and its output projection: causal (on kiln's fused attention
/// kernel, with grouped key/value heads, RoPE and a KV cache for decoding) or bidirectional
/// (with an optional additive key mask), either with dropout on the attention probabilities.
#[derive(Clone)]
pub(crate) struct Attention {
    qkv: Qkv,
    out: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    causal: bool,
    rope: Option<Rope>,
    /// Dropout on the attention probabilities.
    dropout: f64,
}

impl Attention {
    /// Causal attention of `n_head` query heads over `n_kv_head` key/value heads, each query
    /// head h reading key/value head h / (n_head / n_kv_head), positions rotated by `rope`.
    pub fn causal(
        qkv: Qkv,
        out: Linear,
        (n_head, n_kv_head, head_dim): (usize, usize, usize),
        rope: Option<Rope>,
    ) -> Self {
        Attention {
            qkv,
            out,
            n_head,
            n_kv_head,
            head_dim,
            causal: true,
            rope,
            dropout: 0.0,
        }
    }

    /// The same attention with dropout `p_drop` on its probabilities (GPT-2's `attn_pdrop`).
    pub fn with_dropout(self, p_drop: f64) -> Self {
        Attention {
            dropout: p_drop,
            ..self
        }
    }

    /// Bidirectional attention with `n_head` heads of `head_dim`, and dropout `p_drop` on the
    /// attention probabilities.
    pub fn bidirectional(
        q: Linear,
        k: Linear,
        v: Linear,
        out: Linear,
        (n_head, head_dim): (usize, usize),
        p_drop: f64,
    ) -> Self {
        Attention {
            qkv: Qkv::Split { q, k, v },
            out,
            n_head,
            n_kv_head: n_head,
            head_dim,
            causal: false,
            rope: None,
            dropout: p_drop,
        }
    }

    /// q (B, H, T, D) and k, v (B, KV, T, D) of positions start…, rotated. Causal heads come
    /// in the compute dtype (the attention kernel keeps its softmax in f32), bidirectional ones
    /// in x's.
    fn heads(&self, x: &Tensor, start: usize, compute: DType, train: bool) -> Result<[Tensor; 3]> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        match &self.qkv {
            Qkv::Fused(p) => {
                let c = self.n_head * d;
                let qkv = p.forward(x, compute, train)?.to_dtype(compute)?;
                let heads = |i: usize| {
                    qkv.narrow(D::Minus1, i * c, c)?
                        .reshape((b, t, self.n_head, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                Ok([heads(0)?, heads(1)?, heads(2)?])
            }
            Qkv::Split { q, k, v } => {
                let heads = |p: &Linear, n: usize, rotate: bool| {
                    let h = p.forward(x, compute, train)?.reshape((b, t, n, d))?;
                    let h = match (&self.rope, rotate) {
                        // RoPE runs in x's dtype (f32 under mixed precision).
                        (Some(rope), true) => rope.apply(&h, start)?,
                        _ => h,
                    };
                    let h = if self.causal { h.to_dtype(compute)? } else { h };
                    h.transpose(1, 2)?.contiguous()
                };
                let (n, kv) = (self.n_head, self.n_kv_head);
                Ok([
                    heads(q, n, true)?,
                    heads(k, kv, true)?,
                    heads(v, kv, false)?,
                ])
            }
        }
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

    /// The causal heads' outputs (B, H, T, D) merged and projected, in `dtype`.
    fn merged_out(&self, y: &Tensor, dtype: DType, compute: DType) -> Result<Tensor> {
        let (b, h, t, d) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?.to_dtype(dtype)?;
        self.out.forward(&y, compute, false)
    }

    /// The attention's output (B, T, C) in x's dtype. `mask` (B, 1, 1, T), in the softmax's
    /// dtype (f32, or f64 for f64), is added to the bidirectional scores: 0 for a key to
    /// attend to, very negative for one to ignore. `rng` draws the probabilities' dropout.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
        rng: &SharedRng,
        compute: DType,
    ) -> Result<Tensor> {
        if let (true, Qkv::Fused(p), None) = (self.causal, &self.qkv, &self.rope) {
            if self.n_kv_head == self.n_head {
                // GPT-2: the heads stay packed as `c_attn` gives them (one graph node).
                let qkv = p.forward(x, compute, train)?.to_dtype(compute)?;
                let drop = self.causal_dropout(x, train, rng)?;
                let y = causal_attention_packed(&qkv, self.n_head, drop.as_ref())?;
                let y = y.to_dtype(x.dtype())?;
                return self.out.forward(&y, compute, false);
            }
        }
        if let (false, Qkv::Split { q, k, v }, true) = (self.causal, &self.qkv, x.device().is_cpu())
        {
            // On the CPU, one op on the token-major projections (its products in f32, or f64).
            let [q, k, v] = [q, k, v].map(|p| p.forward(x, compute, train));
            let (b, t, _) = x.dims3()?;
            // The multiplier the composition's dropout would draw: the same stream positions.
            let drop = if train && self.dropout > 0.0 {
                let shape = candle_core::Shape::from((b, self.n_head, t, t));
                let start = rng.reserve(shape.elem_count() as u64);
                let acc = stats_dtype(x.dtype());
                let (p, key) = (self.dropout, rng.key());
                Some(dropout_mask(&shape, acc, x.device(), p, key, start)?)
            } else {
                None
            };
            let y = bidirectional_attention(&q?, &k?, &v?, self.n_head, mask, drop.as_ref())?;
            return self.out.forward(&y, compute, train);
        }
        let [q, k, v] = self.heads(x, 0, compute, train)?;
        if self.causal {
            let drop = self.causal_dropout(x, train, rng)?;
            let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
            let y = causal_self_attention_dropout(&q, &k, &v, drop.as_ref())?;
            return self.merged_out(&y, x.dtype(), compute);
        }
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let acc = stats_dtype(x.dtype());
        let scores = in_precision(&q, &k.t()?, compute)?.to_dtype(acc)?;
        let scores = (scores * (1.0 / (d as f64).sqrt()))?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let p = dropout(softmax(&scores)?, self.dropout, train, rng)?;
        let y = in_precision(&p, &v.to_dtype(acc)?, compute)?
            .to_dtype(x.dtype())?
            .transpose(1, 2)?
            .reshape((b, t, self.n_head * d))?;
        self.out.forward(&y, compute, train)
    }

    /// The stream positions of the causal kernel's dropout for input x (B, T, ·): one per
    /// (batch, head, query, key), drawn inside the kernel; None outside training or at p = 0.
    fn causal_dropout(&self, x: &Tensor, train: bool, rng: &SharedRng) -> Result<Option<Draw>> {
        let (b, t, _) = x.dims3()?;
        let n = (b * self.n_head * t * t) as u64;
        Ok(if train {
            Draw::reserve(self.dropout, n, rng)
        } else {
            None
        })
    }

    /// An inference forward of new positions after those `cache` holds for layer `i`: the
    /// output and this layer's extended keys and values (before their repetition).
    fn forward_cached(
        &self,
        x: &Tensor,
        cache: &KvCache,
        i: usize,
        compute: DType,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let [q, k, v] = self.heads(x, cache.len(), compute, false)?;
        let (k, v) = cache.extended(i, k, v)?;
        let y = cached_attention(&q, &self.repeat_kv(k.clone())?, &self.repeat_kv(v.clone())?)?;
        Ok((self.merged_out(&y, x.dtype(), compute)?, (k, v)))
    }

    fn params(&self) -> Vec<Tensor> {
        [self.qkv.params(), self.out.params()].concat()
    }
}

/// The feed-forward network's activation.
#[derive(Clone, Copy)]
pub(crate) enum Activation {
    /// GPT-2's tanh-approximated GELU (HF's "gelu_new"), fused with the bias (kiln's kernel).
    GeluTanh,
    /// The exact erf GELU (HF's "gelu"), kiln's `gelu_erf` (candle's on other devices).
    GeluErf,
    /// SwiGLU: silu(gate(x)) · up(x), candle's `silu` (which has a backward).
    SwiGlu,
}

/// down(act(up(x))), or down(silu(gate(x)) · up(x)) for SwiGLU.
#[derive(Clone)]
pub(crate) struct FeedForward {
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
    act: Activation,
}

impl FeedForward {
    /// A two-layer MLP with a GELU between.
    pub fn gelu(up: Linear, down: Linear, act: Activation) -> Self {
        FeedForward {
            up,
            gate: None,
            down,
            act,
        }
    }

    /// Llama's SwiGLU MLP.
    pub fn swiglu(gate: Linear, up: Linear, down: Linear) -> Self {
        FeedForward {
            up,
            gate: Some(gate),
            down,
            act: Activation::SwiGlu,
        }
    }

    pub fn forward(&self, x: &Tensor, compute: DType, train: bool) -> Result<Tensor> {
        let h = match (self.act, &self.gate) {
            (Activation::GeluTanh, _) => {
                let h = self.up.matmul(x, compute)?;
                match self.up.bias() {
                    Some(b) => bias_gelu(&h, b)?,
                    None => gelu(&h)?,
                }
            }
            (Activation::GeluErf, _) => gelu_erf(&self.up.forward(x, compute, train)?)?,
            (Activation::SwiGlu, Some(gate)) => {
                let g = gate.forward(x, compute, train)?.silu()?;
                (g * self.up.forward(x, compute, train)?)?
            }
            (Activation::SwiGlu, None) => candle_core::bail!("SwiGLU without a gate"),
        };
        self.down.forward(&h, compute, train)
    }

    fn params(&self) -> Vec<Tensor> {
        let gate = self.gate.iter().flat_map(Linear::params);
        gate.chain(self.up.params())
            .chain(self.down.params())
            .collect()
    }
}

/// Where a residual block normalizes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormPlace {
    /// x + f(norm(x)) (GPT-2, Llama, ViT).
    Pre,
    /// norm(x + f(x)) (BERT).
    Post,
}

/// How a block's residual branches run: where they normalize, the dropout on their outputs
/// (rate and mask generator) and the dtype of their matmuls.
#[derive(Clone)]
pub(crate) struct Residual {
    pub place: NormPlace,
    pub p_drop: f64,
    pub rng: SharedRng,
    pub compute: DType,
}

impl Residual {
    /// x + f(norm(x)), dropout `p_drop` on f's output.
    pub fn pre(p_drop: f64, rng: &SharedRng, compute: DType) -> Self {
        let (place, rng) = (NormPlace::Pre, rng.clone());
        Residual {
            place,
            p_drop,
            rng,
            compute,
        }
    }

    /// norm(x + f(x)), dropout `p_drop` on f's output.
    pub fn post(p_drop: f64, rng: &SharedRng, compute: DType) -> Self {
        let place = NormPlace::Post;
        Residual {
            place,
            ..Residual::pre(p_drop, rng, compute)
        }
    }
}

/// A transformer layer: attention then feed-forward, each a residual branch, with what it
/// needs to run alone (for recomputation).
#[derive(Clone)]
pub(crate) struct Block {
    pub norm_1: Norm,
    pub attn: Attention,
    pub norm_2: Norm,
    pub mlp: FeedForward,
    pub residual: Residual,
}

impl Block {
    /// A training (`train`) or evaluation forward; `mask` as in [`Attention::forward`].
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let r = &self.residual;
        let (p, rng, compute) = (r.p_drop, &r.rng, r.compute);
        match r.place {
            NormPlace::Pre => {
                let a = (self.attn).forward(&self.norm_1.forward(x)?, mask, train, rng, compute)?;
                let x = (x + dropout(a, p, train, rng)?)?;
                let m = self
                    .mlp
                    .forward(&self.norm_2.forward(&x)?, compute, train)?;
                x + dropout(m, p, train, rng)?
            }
            NormPlace::Post => {
                let a = self.attn.forward(x, mask, train, rng, compute)?;
                let x = self.norm_1.forward(&(x + dropout(a, p, train, rng)?)?)?;
                let m = self.mlp.forward(&x, compute, train)?;
                self.norm_2.forward(&(x + dropout(m, p, train, rng)?)?)
            }
        }
    }

    /// The tensors the block reads, in the order its forward reads them.
    fn params(&self) -> Vec<Tensor> {
        let (n1, a, n2, m) = (
            self.norm_1.params(),
            self.attn.params(),
            self.norm_2.params(),
            self.mlp.params(),
        );
        match self.residual.place {
            NormPlace::Pre => [n1, a, n2, m].concat(),
            NormPlace::Post => [a, n1, m, n2].concat(),
        }
    }

    /// A training forward with the block's activations recomputed during the backward.
    pub fn forward_checkpointed(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (block, mask) = (self.clone(), mask.cloned());
        checkpointed(x, self.params(), &self.residual.rng, move |x| {
            block.forward(x, mask.as_ref(), true)
        })
    }

    /// A training forward as a backward segment of its own: the block's activations are freed
    /// as soon as the backward is through the block, not when it has gone through the model.
    pub fn forward_segmented(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        kiln_kernels::segment(x, self.params(), |x| self.forward(x, mask, true))
    }

    /// An inference forward of new positions after those cached for layer `i` (pre-norm causal
    /// blocks); returns the output and this layer's extended keys and values.
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        cache: &KvCache,
        i: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (a, kv) = (self.attn).forward_cached(
            &self.norm_1.forward(x)?,
            cache,
            i,
            self.residual.compute,
        )?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.norm_2.forward(&x)?, self.residual.compute, false)?;
        Ok(((x + m)?, kv))
    }
}

/// `x` through `blocks` in order; in training, each a backward segment of its own, or
/// recomputed in the backward with `checkpoint`.
pub(crate) fn run_blocks(
    blocks: &[Block],
    mut x: Tensor,
    mask: Option<&Tensor>,
    train: bool,
    checkpoint: bool,
) -> Result<Tensor> {
    for block in blocks {
        x = match (train, checkpoint) {
            (true, true) => block.forward_checkpointed(&x, mask)?,
            (true, false) => block.forward_segmented(&x, mask)?,
            (false, _) => block.forward(&x, mask, false)?,
        };
    }
    Ok(x)
}
