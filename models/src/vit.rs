//! Vision Transformer: Hugging Face `transformers`' `ViTForImageClassification` (the image cut
//! into P×P patches, each projected to the hidden size; a learned CLS token and learned
//! position embeddings; pre-LayerNorm layers of bidirectional self-attention and an exact-erf
//! GELU MLP; a final LayerNorm; a linear classifier on the CLS token, with no pooler).
//!
//! Parameter paths and shapes are HF's, so export is the identity:
//! `vit.embeddings.cls_token` (1, 1, D), `vit.embeddings.position_embeddings` (1, N+1, D),
//! `vit.embeddings.patch_embeddings.projection.{weight,bias}` (the `nn.Conv2d`, weight
//! (D, C, P, P)), `vit.encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
//! attention.output.dense, layernorm_after, intermediate.dense, output.dense}.*`,
//! `vit.layernorm.*` and `classifier.{weight,bias}`. Projections are `nn.Linear`, weight stored
//! (out, in).
//!
//! The [`Model`] input is a batch of images (B, C, H, W), H = W = `image_size`. The patch
//! projection, a convolution whose kernel and stride are both P, is computed as what it is: the
//! image cut into its N = (H/P)·(W/P) patches, each flattened in (channel, row, column) order,
//! times the weight reshaped to (D, C·P·P). Patches are numbered row-major over the grid, as
//! HF's `projection(x).flatten(2).transpose(1, 2)` numbers them.
//!
//! Training ops: kiln's layer norm, softmax and dropout, and candle ops that have a backward
//! (matmul, reshape/permute, `gelu_erf`). The attention is composed (scores, softmax, weighted
//! sum) since kiln's fused attention kernel is causal. Under mixed precision the matmuls
//! (the patch projection included) run in bf16/f16 while the scores, the softmax, the norms and
//! the residual stream stay in f32. Dropout is HF's: `hidden_dropout_prob` after the embeddings
//! and on each residual branch, `attention_probs_dropout_prob` on the attention probabilities
//! (none before the classifier). With `checkpoint_activations`, each layer's activations are
//! recomputed in the backward.

use crate::hf::HfReader;
use crate::layers::{
    run_blocks, Activation, Attention, Block, FeedForward, Linear, Norm, NormPlace,
};
use crate::{
    check_divisible, check_dropout, check_labels_cover, check_positive, check_positive_f64,
    dropout, in_precision, ConfigError, Model,
};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The field names are HF `config.json`'s (`ViTConfig`), except the kiln-only `num_labels`
/// (HF derives it from `id2label`) and `checkpoint_activations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViTConfig {
    /// Side of the (square) images; filled from the data when 0.
    #[serde(default)]
    pub image_size: usize,
    /// Side of a patch; must divide `image_size`.
    pub patch_size: usize,
    /// Channels of the images; filled from the data when 0.
    #[serde(default)]
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Dropout after the embeddings and on the residual branches (HF's default: 0).
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (HF's default: 0).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Biases in the query, key and value projections.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// Only "gelu", HF's name for the exact (erf) GELU.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Outputs of the classifier; filled from the data's classes when 0.
    #[serde(default)]
    pub num_labels: usize,
    /// Recompute each layer's activations in the backward instead of storing them.
    #[serde(default)]
    pub checkpoint_activations: bool,
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn yes() -> bool {
    true
}

fn default_hidden_act() -> String {
    "gelu".into()
}

impl ViTConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per image, N.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Checks the config against the data (`num_classes` classes, examples of `input` shape
    /// (C, H, W)) and fills in what the data decides: `image_size`, `num_channels`,
    /// `num_labels`.
    pub(crate) fn resolve(
        &mut self,
        num_classes: usize,
        input: &[usize],
    ) -> std::result::Result<(), ConfigError> {
        check_dropout(self.hidden_dropout_prob, "model.hidden_dropout_prob")?;
        check_dropout(
            self.attention_probs_dropout_prob,
            "model.attention_probs_dropout_prob",
        )?;
        if self.hidden_act != "gelu" {
            return Err((
                "model.hidden_act",
                format!(
                    "{:?} is not supported: kiln's ViT uses the exact (erf) GELU, HF's \"gelu\"",
                    self.hidden_act
                ),
            ));
        }
        check_positive(&[
            ("model.patch_size", self.patch_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
            ("model.intermediate_size", self.intermediate_size),
        ])?;
        check_divisible(
            "model.num_attention_heads",
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        check_positive_f64("model.layer_norm_eps", self.layer_norm_eps)?;
        let &[c, h, w] = input else {
            return Err((
                "model.kind",
                format!("vit needs image inputs (C, H, W), the data gives {input:?}"),
            ));
        };
        if h != w {
            return Err((
                "model.image_size",
                format!(
                    "the data's images are {h}×{w} (H×W), but a ViT (HF's ViTConfig has one \
                     image_size) takes square images: resize or crop them to a square"
                ),
            ));
        }
        if self.image_size == 0 {
            self.image_size = h;
        } else if self.image_size != h {
            return Err((
                "model.image_size",
                format!(
                    "{} does not match the data's {h}×{w} images (leave it out to take the data's)",
                    self.image_size
                ),
            ));
        }
        if self.num_channels == 0 {
            self.num_channels = c;
        } else if self.num_channels != c {
            return Err((
                "model.num_channels",
                format!(
                    "{} does not match the data's {c} channels (leave it out to take the data's)",
                    self.num_channels
                ),
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err((
                "model.patch_size",
                format!(
                    "{} does not divide image_size = {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.num_labels == 0 {
            self.num_labels = num_classes;
        }
        if self.num_labels < 2 {
            // HF reads num_labels = 1 as regression; kiln's head is a softmax classifier.
            return Err((
                "model.num_labels",
                format!(
                    "a classifier needs at least 2 labels, got {}",
                    self.num_labels
                ),
            ));
        }
        check_labels_cover(self.num_labels, num_classes)
    }
}

/// HF's initialization for `nn.Linear`/`nn.Conv2d` weights and the CLS and position
/// embeddings is `trunc_normal_(std = 0.02)`, whose default cut-offs are ±2 in absolute terms,
/// i.e. ±100 σ: a plain N(0, 0.02), which is what this draws (through the seeded VarBuilder).
fn normal_init() -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// HF's `ViTPatchEmbeddings.projection`: a `nn.Conv2d` with kernel = stride = P, computed as a
/// matmul over the flattened patches.
struct PatchEmbeddings {
    /// (D, C, P, P).
    weight: Tensor,
    /// (D).
    bias: Tensor,
    patch: usize,
}

impl PatchEmbeddings {
    fn new(c: usize, d: usize, p: usize, vb: VarBuilder) -> Result<Self> {
        Ok(PatchEmbeddings {
            weight: vb.get_with_hints((d, c, p, p), "weight", normal_init())?,
            bias: vb.get_with_hints(d, "bias", Init::Const(0.0))?,
            patch: p,
        })
    }

    /// Images (B, C, H, W) → patch embeddings (B, N, D), N = (H/P)·(W/P), the patch at grid
    /// row i, column j at index i·(W/P) + j; in the weights' dtype, the matmul in `compute`.
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (d, p) = (self.weight.dim(0)?, self.patch);
        if self.weight.dim(1)? != c || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "patch embedding of {p}×{p} patches over {} channels cannot cut a {c}×{h}×{w} image",
                self.weight.dim(1)?
            );
        }
        let (nh, nw) = (h / p, w / p);
        // x[b, ch, i·P + u, j·P + v] → patches[b·N + i·nw + j, (ch·P + u)·P + v].
        let patches = x
            .to_dtype(self.weight.dtype())?
            .reshape(vec![b, c, nh, p, nw, p])?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * nh * nw, c * p * p))?;
        let w = self.weight.reshape((d, c * p * p))?;
        in_precision(&patches, &w.t()?, compute)?
            .broadcast_add(&self.bias)?
            .reshape((b, nh * nw, d))
    }
}

/// HF's `ViTEmbeddings`: [CLS; patch embeddings] + position embeddings.
struct Embeddings {
    /// (1, 1, D).
    cls_token: Tensor,
    /// (1, N+1, D).
    position_embeddings: Tensor,
    patch_embeddings: PatchEmbeddings,
}

impl Embeddings {
    fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Embeddings {
            cls_token: vb.get_with_hints((1, 1, d), "cls_token", normal_init())?,
            position_embeddings: vb.get_with_hints(
                (1, cfg.num_patches() + 1, d),
                "position_embeddings",
                normal_init(),
            )?,
            patch_embeddings: PatchEmbeddings::new(
                cfg.num_channels,
                d,
                cfg.patch_size,
                vb.pp("patch_embeddings.projection"),
            )?,
        })
    }

    /// Images (B, C, H, W) → embeddings (B, N+1, D), the CLS token first.
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let patches = self.patch_embeddings.forward(x, compute)?;
        let (b, _, d) = patches.dims3()?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?.contiguous()?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)
    }
}

/// One pre-LayerNorm encoder layer (HF's `ViTLayer`): x + attn(LN_before(x)), then
/// x + mlp(LN_after(x)), under HF's module paths.
fn layer(cfg: &ViTConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Block> {
    let (c, eps, ff) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
    let linear = |n_in, n_out, bias, vb| Linear::new(n_in, n_out, 0.02, bias, vb);
    let (a, qkv_bias) = (vb.pp("attention"), cfg.qkv_bias);
    Ok(Block {
        norm_1: Norm::layer_norm(c, eps, true, vb.pp("layernorm_before"))?,
        attn: Attention::bidirectional(
            linear(c, c, qkv_bias, a.pp("attention.query"))?,
            linear(c, c, qkv_bias, a.pp("attention.key"))?,
            linear(c, c, qkv_bias, a.pp("attention.value"))?,
            linear(c, c, true, a.pp("output.dense"))?,
            (cfg.num_attention_heads, cfg.head_dim()),
            cfg.attention_probs_dropout_prob,
        ),
        norm_2: Norm::layer_norm(c, eps, true, vb.pp("layernorm_after"))?,
        // kiln's `gelu` is the tanh approximation, HF's "gelu_new", not ViT's "gelu".
        mlp: FeedForward::gelu(
            linear(c, ff, true, vb.pp("intermediate.dense"))?,
            linear(ff, c, true, vb.pp("output.dense"))?,
            Activation::GeluErf,
        ),
        place: NormPlace::Pre,
        p_drop: cfg.hidden_dropout_prob,
        rng,
        compute,
    })
}

pub struct ViT {
    embeddings: Embeddings,
    layers: Vec<Block>,
    /// `vit.layernorm`.
    layernorm: Norm,
    classifier: Linear,
    rng: SharedRng,
    compute: DType,
    pub config: ViTConfig,
}

impl ViT {
    /// `cfg` must be resolved (image size and channels known). `compute` is the dtype of the
    /// matmuls (the weights' dtype for full precision, bf16/f16 for mixed precision).
    pub fn new(cfg: &ViTConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        if cfg.patch_size == 0
            || cfg.image_size == 0
            || cfg.num_channels == 0
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
        {
            candle_core::bail!(
                "ViT config not resolved: image_size {}, patch_size {}, num_channels {}",
                cfg.image_size,
                cfg.patch_size,
                cfg.num_channels
            );
        }
        let (enc, c) = (vb.pp("vit"), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                layer(
                    cfg,
                    enc.pp(format!("encoder.layer.{i}")),
                    rng.clone(),
                    compute,
                )
            })
            .collect::<Result<_>>()?;
        Ok(ViT {
            embeddings: Embeddings::new(cfg, enc.pp("embeddings"))?,
            layers,
            layernorm: Norm::layer_norm(c, cfg.layer_norm_eps, true, enc.pp("layernorm"))?,
            classifier: Linear::new(c, cfg.num_labels, 0.02, true, vb.pp("classifier"))?,
            rng,
            compute,
            config: cfg.clone(),
        })
    }

    /// The encoder's output before the final LayerNorm, (B, N+1, D).
    fn encode(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let s = c.image_size;
        if !matches!(xs.dims(), &[_, ch, h, w] if ch == c.num_channels && h == s && w == s) {
            candle_core::bail!(
                "ViT takes images (batch, {}, {s}, {s}); got {:?}",
                c.num_channels,
                xs.dims()
            );
        }
        let x = self.embeddings.forward(xs, self.compute)?;
        let x = dropout(x, c.hidden_dropout_prob, train, &self.rng)?;
        run_blocks(&self.layers, x, None, train, c.checkpoint_activations)
    }

    /// HF's `ViTModel` `last_hidden_state` (B, N+1, D): the encoder's output after the final
    /// LayerNorm, the CLS token first.
    pub fn last_hidden_state(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.layernorm.forward(&self.encode(xs, train)?)
    }
}

impl Model for ViT {
    /// Images (B, C, H, W) → logits (B, num_labels).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.encode(xs, train)?;
        // The classifier reads the CLS token of the final LayerNorm's output; the norm is per
        // token, so normalizing the CLS token alone gives the same thing.
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        (self.classifier).forward(&self.layernorm.forward(&cls)?, self.compute, train)
    }
}

/// `config.json` for `c` in HF's `ViTConfig` schema, without the dtype keys (the exporter
/// adds those).
pub(crate) fn hf_config(c: &ViTConfig) -> Value {
    json!({
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act,
        "hidden_dropout_prob": c.hidden_dropout_prob,
        "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
        "layer_norm_eps": c.layer_norm_eps,
        "qkv_bias": c.qkv_bias,
        "encoder_stride": c.patch_size,
        "initializer_range": 0.02,
        "num_labels": c.num_labels,
    })
}

/// The kiln config of a ViT `config.json`; anything kiln computes differently is refused,
/// naming the key.
pub(crate) fn config_from_hf(r: &HfReader) -> anyhow::Result<ViTConfig> {
    if !matches!(r.v["hidden_act"].as_str(), None | Some("gelu")) {
        return Err(r.refuse("hidden_act", "kiln's ViT uses the exact (erf) GELU"));
    }
    Ok(ViTConfig {
        image_size: r.uint("image_size")?,
        patch_size: r.uint("patch_size")?,
        num_channels: r.uint("num_channels")?,
        hidden_size: r.uint("hidden_size")?,
        num_hidden_layers: r.uint("num_hidden_layers")?,
        num_attention_heads: r.uint("num_attention_heads")?,
        intermediate_size: r.uint("intermediate_size")?,
        hidden_dropout_prob: r.float_or("hidden_dropout_prob", 0.0)?,
        attention_probs_dropout_prob: r.float_or("attention_probs_dropout_prob", 0.0)?,
        layer_norm_eps: r.float_or("layer_norm_eps", 1e-12)?,
        qkv_bias: r.v["qkv_bias"].as_bool().unwrap_or(true),
        hidden_act: "gelu".into(),
        num_labels: crate::hf::num_labels(r.v),
        checkpoint_activations: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_mixed_precision, check_model_grads, rand};
    use crate::ModelConfig;
    use candle_core::{Device, Shape};
    use candle_nn::VarMap;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// 4×4 images of 2 channels in 2×2 patches (4 patches + CLS = 5 tokens).
    fn tiny() -> ViTConfig {
        ViTConfig {
            image_size: 4,
            patch_size: 2,
            num_channels: 2,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            layer_norm_eps: 1e-12,
            qkv_bias: true,
            hidden_act: "gelu".into(),
            num_labels: 3,
            checkpoint_activations: false,
        }
    }

    fn build(cfg: &ViTConfig, dtype: DType) -> (VarMap, ViT) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
        let m = ViT::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
        (vm, m)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        let v: Vec<f64> = d.abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().fold(0.0, f64::max)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = rand(&[2, 2, 4, 4], 1);
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        for qkv_bias in [true, false] {
            let cfg = ModelConfig::Vit(ViTConfig { qkv_bias, ..tiny() });
            check_model_grads(&cfg, &x, &y);
        }
    }

    /// bf16/f16 matmuls against f32. Without the query/key/value biases: the key bias's true
    /// gradient is 0 (q·(k_j + b) shifts every score of a query by the same q·b, which the
    /// softmax ignores), so its mixed-precision gradient is pure rounding noise, and a relative
    /// comparison against 0 means nothing. The f64 check above covers it.
    #[test]
    fn mixed_precision_matches_f32() {
        let cfg = ModelConfig::Vit(ViTConfig {
            qkv_bias: false,
            ..tiny()
        });
        let x = rand(&[2, 2, 4, 4], 1);
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        check_mixed_precision(&cfg, &x, &y);
    }

    /// The patch projection against the convolution with kernel = stride = P written out as
    /// loops, on a non-square image (so that rows and columns of the patch grid cannot be
    /// confused) with several channels and a batch of 2.
    #[test]
    fn patch_embedding_is_the_strided_convolution() {
        let (b, c, h, w, p, d) = (2, 3, 6, 9, 3, 4);
        let x = rand(&[b, c, h, w], 11);
        let weight = rand(&[d, c, p, p], 12);
        let bias = rand(&[d], 13);
        let pe = PatchEmbeddings {
            weight: weight.clone(),
            bias: bias.clone(),
            patch: p,
        };
        let got = pe.forward(&x, DType::F64).unwrap();
        let (nh, nw) = (h / p, w / p);
        assert_eq!(got.dims(), [b, nh * nw, d]);
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f64> = weight.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f64> = bias.to_vec1().unwrap();
        let mut want = vec![0f64; b * nh * nw * d];
        for bi in 0..b {
            for i in 0..nh {
                for j in 0..nw {
                    for o in 0..d {
                        let mut s = bv[o];
                        for ch in 0..c {
                            for u in 0..p {
                                for v in 0..p {
                                    let xi = ((bi * c + ch) * h + i * p + u) * w + j * p + v;
                                    let wi = ((o * c + ch) * p + u) * p + v;
                                    s += wv[wi] * xv[xi];
                                }
                            }
                        }
                        // Conv2d's output (B, D, nh, nw), flatten(2).transpose(1, 2).
                        want[(bi * nh * nw + i * nw + j) * d + o] = s;
                    }
                }
            }
        }
        let want = Tensor::from_vec(want, (b, nh * nw, d), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-12, "patch embedding vs convolution: {diff}");
        // A bad cut is an error, not a silently wrong reshape.
        assert!(pe.forward(&rand(&[1, c, 7, 9], 1), DType::F64).is_err());
        assert!(pe.forward(&rand(&[1, 2, 6, 9], 1), DType::F64).is_err());
    }

    /// The classifier reads the final-LayerNormed CLS token, which sees every patch (the
    /// attention is bidirectional: the last pixel reaches the CLS token); images in a batch do
    /// not mix.
    #[test]
    fn classifier_reads_the_normed_cls_token() {
        let (vm, m) = build(&tiny(), DType::F64);
        // Weights away from their initialization, so the check is not about zero biases.
        for (name, v) in vm.data().lock().unwrap().iter() {
            let r = rand(v.dims(), name.len() as u64);
            v.set(&(v.as_tensor() + (r * 0.3).unwrap()).unwrap())
                .unwrap();
        }
        let x = rand(&[2, 2, 4, 4], 5);
        let hidden = m.last_hidden_state(&x, false).unwrap();
        assert_eq!(hidden.dims(), [2, 5, 8]);
        let cls = hidden.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let want = m.classifier.forward(&cls, DType::F64, false).unwrap();
        let logits = m.forward(&x, false).unwrap();
        assert_eq!(logits.dims(), [2, 3]);
        assert!(max_abs_diff(&logits, &want) < 1e-12);
        // The last pixel (image 1, bottom-right patch) changes image 1's logits, not image 0's.
        let mut v: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        *v.last_mut().unwrap() += 1.0;
        let x2 = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
        let logits2 = m.forward(&x2, false).unwrap();
        let first = |t: &Tensor| t.get(0).unwrap();
        assert_eq!(max_abs_diff(&first(&logits), &first(&logits2)), 0.0);
        assert!(max_abs_diff(&logits.get(1).unwrap(), &logits2.get(1).unwrap()) > 1e-6);
        // Images of the wrong size are refused.
        let err = m.forward(&rand(&[2, 2, 6, 6], 1), false).unwrap_err();
        assert!(err.to_string().contains("(batch, 2, 4, 4)"), "{err}");
        assert!(m.forward(&rand(&[2, 3, 4, 4], 1), false).is_err());
    }

    #[test]
    fn parameter_names_are_hugging_face_vit() {
        let names = |cfg: &ViTConfig| {
            let (vm, _) = build(cfg, DType::F32);
            let data = vm.data().lock().unwrap();
            let v: HashMap<String, Vec<usize>> = data
                .iter()
                .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                .collect();
            v
        };
        let all = names(&tiny());
        let shape = |n: &str| all.get(n).unwrap_or_else(|| panic!("missing {n}")).clone();
        let e = "vit.embeddings";
        assert_eq!(shape(&format!("{e}.cls_token")), [1, 1, 8]);
        assert_eq!(shape(&format!("{e}.position_embeddings")), [1, 5, 8]);
        let proj = format!("{e}.patch_embeddings.projection");
        assert_eq!(shape(&format!("{proj}.weight")), [8, 2, 2, 2]);
        assert_eq!(shape(&format!("{proj}.bias")), [8]);
        for i in 0..2 {
            let l = format!("vit.encoder.layer.{i}");
            for ln in ["layernorm_before", "layernorm_after"] {
                assert_eq!(shape(&format!("{l}.{ln}.weight")), [8]);
                assert_eq!(shape(&format!("{l}.{ln}.bias")), [8]);
            }
            for qkv in ["query", "key", "value"] {
                let p = format!("{l}.attention.attention.{qkv}");
                assert_eq!(shape(&format!("{p}.weight")), [8, 8]);
                assert_eq!(shape(&format!("{p}.bias")), [8]);
            }
            assert_eq!(shape(&format!("{l}.attention.output.dense.weight")), [8, 8]);
            assert_eq!(shape(&format!("{l}.attention.output.dense.bias")), [8]);
            // (out, in)
            assert_eq!(shape(&format!("{l}.intermediate.dense.weight")), [12, 8]);
            assert_eq!(shape(&format!("{l}.intermediate.dense.bias")), [12]);
            assert_eq!(shape(&format!("{l}.output.dense.weight")), [8, 12]);
            assert_eq!(shape(&format!("{l}.output.dense.bias")), [8]);
        }
        assert_eq!(shape("vit.layernorm.weight"), [8]);
        assert_eq!(shape("vit.layernorm.bias"), [8]);
        assert_eq!(shape("classifier.weight"), [3, 8]);
        assert_eq!(shape("classifier.bias"), [3]);
        // 4 embedding tensors, 16 per layer, the final norm's 2, the classifier's 2: no pooler.
        assert_eq!(all.len(), 4 + 16 * 2 + 2 + 2);
        assert!(!all.keys().any(|k| k.contains("pooler")));

        let no_bias = names(&ViTConfig {
            qkv_bias: false,
            ..tiny()
        });
        assert_eq!(no_bias.len(), all.len() - 3 * 2);
        assert!(!no_bias.contains_key("vit.encoder.layer.0.attention.attention.key.bias"));
        assert!(no_bias.contains_key("vit.encoder.layer.0.attention.output.dense.bias"));
    }

    /// Records the name and shape of each parameter a model asks for, handing out a
    /// broadcast scalar (no storage) instead of initializing it.
    struct Shapes(Arc<Mutex<Vec<(String, Shape)>>>);

    impl candle_nn::var_builder::SimpleBackend for Shapes {
        fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            self.0.lock().unwrap().push((name.into(), s.clone()));
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            candle_core::bail!("{name}: shapes only")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            false
        }
    }

    /// HF's google/vit-base-patch16-224 config: image 224, patch 16, 3 channels, D = 768,
    /// 12 layers of 12 heads, MLP 3072, 1000 labels. By hand, with N = (224/16)² = 196:
    ///   patch projection  768·3·16·16 + 768                 =    590,592
    ///   CLS + positions   768 + 197·768                     =    152,064
    ///   one layer         2·768 (LN before)
    ///                   + 3·(768·768 + 768) (q, k, v)       =  1,771,776
    ///                   + 768·768 + 768 (attention output)  =    590,592
    ///                   + 2·768 (LN after)
    ///                   + 768·3072 + 3072 (intermediate)    =  2,362,368
    ///                   + 3072·768 + 768 (output)           =  2,360,064
    ///                                                total  =  7,087,872
    ///   12 layers                                           = 85,054,464
    ///   final LayerNorm   2·768                             =      1,536
    ///   classifier        768·1000 + 1000                   =    769,000
    ///   sum: 590,592 + 152,064 + 85,054,464 + 1,536 + 769,000 = 86,567,656.
    #[test]
    fn vit_base_patch16_224_has_86_567_656_parameters() {
        let mut cfg: ViTConfig = toml::from_str(
            "patch_size = 16\nhidden_size = 768\nnum_hidden_layers = 12\n\
             num_attention_heads = 12\nintermediate_size = 3072\nnum_labels = 1000",
        )
        .unwrap();
        cfg.resolve(1000, &[3, 224, 224]).unwrap();
        assert_eq!((cfg.image_size, cfg.num_channels), (224, 3));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let vb = VarBuilder::from_backend(Box::new(Shapes(seen.clone())), DType::F32, Device::Cpu);
        ViT::new(&cfg, vb, SharedRng::new(0, "d"), DType::F32).unwrap();
        let seen = seen.lock().unwrap();
        let total: usize = seen.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!(total, 86_567_656);
        assert_eq!(seen.len(), 4 + 16 * 12 + 2 + 2);
        let shape = |n: &str| {
            let (_, s) = seen.iter().find(|(k, _)| k == n).unwrap();
            s.dims().to_vec()
        };
        assert_eq!(shape("vit.embeddings.position_embeddings"), [1, 197, 768]);
        assert_eq!(
            shape("vit.embeddings.patch_embeddings.projection.weight"),
            [768, 3, 16, 16]
        );
    }

    /// Recomputing the layers in the backward (with dropout on, so the recomputation must
    /// replay the same masks) gives the gradients of the stored-activation run.
    #[test]
    fn checkpointed_activations_give_identical_gradients() {
        let x = rand(&[2, 2, 4, 4], 1);
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let grads = |checkpoint: bool| {
            let cfg = ViTConfig {
                hidden_dropout_prob: 0.3,
                attention_probs_dropout_prob: 0.2,
                checkpoint_activations: checkpoint,
                ..tiny()
            };
            let vm = VarMap::new();
            let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
            let rng = SharedRng::new(5, "dropout");
            let m = ViT::new(&cfg, vb, rng.clone(), DType::F64).unwrap();
            let logits = m.forward(&x, true).unwrap();
            let loss = kiln_kernels::cross_entropy(&logits, &y).unwrap();
            let g = kiln_kernels::backward(&loss).unwrap();
            let mut named: Vec<(String, Vec<f64>)> = (vm.data().lock().unwrap().iter())
                .map(|(n, v)| {
                    let g = g.get(v).unwrap_or_else(|| panic!("{n} has no gradient"));
                    (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let eval = m.forward(&x, false).unwrap();
            (named, rng.position(), logits, eval)
        };
        let (plain, plain_rng, plain_logits, eval) = grads(false);
        let (ckpt, ckpt_rng, ckpt_logits, _) = grads(true);
        // Dropout did something: the training forward differs from the inference one.
        assert!(max_abs_diff(&plain_logits, &eval) > 1e-6);
        assert_eq!(
            plain_rng, ckpt_rng,
            "the recomputation must rewind the generator"
        );
        assert_eq!(max_abs_diff(&plain_logits, &ckpt_logits), 0.0);
        assert_eq!(plain.len(), ckpt.len());
        for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
            let diff = (a.iter().zip(b))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{name}: gradients differ by {diff}");
        }
    }

    #[test]
    fn resolve_fills_from_the_data_and_names_bad_keys() {
        let mut cfg: ViTConfig = toml::from_str(
            "patch_size = 7\nhidden_size = 8\nnum_hidden_layers = 2\nnum_attention_heads = 2\n\
             intermediate_size = 12",
        )
        .unwrap();
        assert_eq!(
            (
                cfg.layer_norm_eps,
                cfg.qkv_bias,
                cfg.hidden_act.as_str(),
                cfg.hidden_dropout_prob,
                cfg.attention_probs_dropout_prob,
                cfg.checkpoint_activations
            ),
            (1e-12, true, "gelu", 0.0, 0.0, false)
        );
        cfg.resolve(10, &[1, 28, 28]).unwrap();
        assert_eq!(
            (cfg.image_size, cfg.num_channels, cfg.num_labels),
            (28, 1, 10)
        );
        assert_eq!(cfg.num_patches(), 16);

        let fails = |f: fn(&mut ViTConfig), input: &[usize], key: &str| {
            let mut c = tiny();
            f(&mut c);
            let (k, msg) = c.resolve(3, input).unwrap_err();
            assert_eq!(k, key, "{msg}");
            msg
        };
        let ok = [2, 4, 4];
        let msg = fails(|_| {}, &[2, 4, 6], "model.image_size");
        assert!(msg.contains("4×6") && msg.contains("square"), "{msg}");
        fails(|c| c.image_size = 8, &ok, "model.image_size");
        fails(|c| c.num_channels = 3, &ok, "model.num_channels");
        fails(|c| c.patch_size = 3, &ok, "model.patch_size");
        fails(|c| c.patch_size = 0, &ok, "model.patch_size");
        fails(|_| {}, &[16], "model.kind");
        fails(
            |c| c.num_attention_heads = 3,
            &ok,
            "model.num_attention_heads",
        );
        fails(|c| c.hidden_size = 0, &ok, "model.hidden_size");
        fails(|c| c.num_hidden_layers = 0, &ok, "model.num_hidden_layers");
        fails(|c| c.intermediate_size = 0, &ok, "model.intermediate_size");
        let msg = fails(
            |c| c.hidden_act = "gelu_new".into(),
            &ok,
            "model.hidden_act",
        );
        assert!(msg.contains("gelu_new"), "{msg}");
        fails(
            |c| c.hidden_dropout_prob = 1.0,
            &ok,
            "model.hidden_dropout_prob",
        );
        fails(
            |c| c.attention_probs_dropout_prob = -0.1,
            &ok,
            "model.attention_probs_dropout_prob",
        );
        fails(|c| c.layer_norm_eps = 0.0, &ok, "model.layer_norm_eps");
        fails(|c| c.num_labels = 1, &ok, "model.num_labels");
        fails(|c| c.num_labels = 2, &ok, "model.num_labels");
        // Given values that agree with the data pass.
        tiny().resolve(3, &ok).unwrap();
        assert!(
            toml::from_str::<ViTConfig>("patch_size = 2\nhidden_size = 8\nn_head = 2").is_err()
        );
    }

    /// The model against HF's computation written out independently in plain f64 candle ops,
    /// on weights moved away from their initialization (non-zero biases, non-unit norms): the
    /// patch embedding as a strided `conv2d` + flatten(2) + transpose(1, 2), the CLS token
    /// first, pre-LN layers, softmax(q·kᵀ/√d), the exact erf GELU, the final LayerNorm and the
    /// classifier on the CLS token.
    #[test]
    fn forward_matches_a_plain_reference() {
        let cfg = tiny();
        let (vm, m) = build(&cfg, DType::F64);
        let data = vm.data().lock().unwrap();
        for (name, v) in data.iter() {
            let r = rand(v.dims(), name.len() as u64 + 7);
            v.set(&(v.as_tensor() + (r * 0.5).unwrap()).unwrap())
                .unwrap();
        }
        let w = |n: &str| data[n].as_tensor().clone();
        let x = rand(&[2, 2, 4, 4], 9);

        let ln = |x: &Tensor, p: &str| {
            let mu = x.mean_keepdim(2).unwrap();
            let xc = x.broadcast_sub(&mu).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
            let y = xc
                .broadcast_div(&(var + cfg.layer_norm_eps).unwrap().sqrt().unwrap())
                .unwrap();
            y.broadcast_mul(&w(&format!("{p}.weight")))
                .unwrap()
                .broadcast_add(&w(&format!("{p}.bias")))
                .unwrap()
        };
        let linear = |x: &Tensor, p: &str| {
            x.broadcast_matmul(&w(&format!("{p}.weight")).t().unwrap())
                .unwrap()
                .broadcast_add(&w(&format!("{p}.bias")))
                .unwrap()
        };
        let proj = "vit.embeddings.patch_embeddings.projection";
        let patches = x
            .conv2d(&w(&format!("{proj}.weight")), 0, cfg.patch_size, 1, 1)
            .unwrap()
            .broadcast_add(&w(&format!("{proj}.bias")).reshape((1, (), 1, 1)).unwrap())
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let cls = w("vit.embeddings.cls_token")
            .broadcast_as((2, 1, 8))
            .unwrap()
            .contiguous()
            .unwrap();
        let mut h = Tensor::cat(&[&cls, &patches], 1)
            .unwrap()
            .broadcast_add(&w("vit.embeddings.position_embeddings"))
            .unwrap();
        let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim());
        for i in 0..cfg.num_hidden_layers {
            let l = format!("vit.encoder.layer.{i}");
            let a = ln(&h, &format!("{l}.layernorm_before"));
            let heads = |n: &str| {
                linear(&a, &format!("{l}.attention.attention.{n}"))
                    .reshape((2, 5, nh, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (heads("query"), heads("key"), heads("value"));
            let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(3).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
            let ctx = p
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((2, 5, 8))
                .unwrap();
            h = (h + linear(&ctx, &format!("{l}.attention.output.dense"))).unwrap();
            let u = linear(
                &ln(&h, &format!("{l}.layernorm_after")),
                &format!("{l}.intermediate.dense"),
            );
            // 0.5·u·(1 + erf(u/√2)).
            let g = ((u.clone() * 0.5).unwrap()
                * ((u / std::f64::consts::SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap())
            .unwrap();
            h = (h + linear(&g, &format!("{l}.output.dense"))).unwrap();
        }
        let h = ln(&h, "vit.layernorm");
        let want = linear(
            &h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
            "classifier",
        );
        drop(data);
        let got = m.forward(&x, false).unwrap();
        assert_eq!(got.dims(), [2, 3]);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-10, "ViT vs the plain reference: {diff}");
        let hidden = m.last_hidden_state(&x, false).unwrap();
        assert!(max_abs_diff(&hidden, &h) < 1e-10);
    }

    #[test]
    fn a_recipe_builds_a_vit() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../recipes/fashion-mnist-cnn.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let model = "[model]\nkind = \"vit\"\npatch_size = 7\nhidden_size = 16\n\
                     num_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 32\n";
        let start = text.find("[model]").unwrap();
        let end = text.find("[data]").unwrap();
        let text = format!("{}{model}\n{}", &text[..start], &text[end..]);
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &text, &[]).unwrap();
        let cfg = ModelConfig::from_recipe(&recipe, 10, &[1, 28, 28]).unwrap();
        assert_eq!(cfg.kind(), "vit");
        let ModelConfig::Vit(c) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!((c.image_size, c.num_channels, c.num_labels), (28, 1, 10));
        // The resolved table decodes back to the same config.
        let mut table = cfg.to_table();
        assert_eq!(table.get("kind").and_then(|k| k.as_str()), Some("vit"));
        table.remove("kind");
        assert_eq!(
            &toml::Value::Table(table).try_into::<ViTConfig>().unwrap(),
            c
        );
        let model = cfg
            .build(
                kiln_core::rng::seeded_var_builder(&VarMap::new(), 0, DType::F32, &Device::Cpu),
                SharedRng::new(0, "d"),
                DType::F32,
            )
            .unwrap();
        let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&x, false).unwrap().dims(), [2, 10]);

        // Non-square images are refused at the key that would have to change.
        let err = ModelConfig::from_recipe(&recipe, 10, &[1, 28, 32])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("image_size") && err.contains("square"),
            "{err}"
        );

        let bad = text.replace("kind = \"vit\"", "kind = \"vti\"");
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &bad, &[]).unwrap();
        let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
        assert!(err.contains("\"vit\""), "{err}");
    }
}
