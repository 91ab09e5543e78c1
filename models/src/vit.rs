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
    run_blocks, Activation, Attention, Block, FeedForward, Linear, Norm, Residual,
};
use crate::{
    check_encoder, check_labels_cover, dropout, in_precision, ConfigError, DataFacts, HfConfig,
    Model, ModelSpec,
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
        residual: Residual::pre(cfg.hidden_dropout_prob, &rng, compute),
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

impl ModelSpec for ViTConfig {
    /// One token per patch plus the class token.
    fn activations_per_example(&self, _input_shape: &[usize]) -> Option<u128> {
        let side = self.image_size / self.patch_size.max(1);
        Some(crate::transformer_activations(
            self.num_hidden_layers,
            side * side + 1,
            self.hidden_size,
            self.intermediate_size,
            2,
            self.num_attention_heads,
            self.checkpoint_activations,
        ))
    }

    /// Checks the config against the data (`num_classes` classes, examples of `input` shape
    /// (C, H, W)) and fills in what the data decides: `image_size`, `num_channels`,
    /// `num_labels`.
    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (num_classes, input) = (data.classes, &data.input_shape[..]);
        check_encoder(
            (self.hidden_dropout_prob, self.attention_probs_dropout_prob),
            &[
                ("model.patch_size", self.patch_size),
                ("model.hidden_size", self.hidden_size),
                ("model.num_hidden_layers", self.num_hidden_layers),
                ("model.num_attention_heads", self.num_attention_heads),
                ("model.intermediate_size", self.intermediate_size),
            ],
            (self.hidden_size, self.num_attention_heads),
            self.layer_norm_eps,
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

    fn image_classifier(&self) -> Option<(usize, usize)> {
        Some((self.num_channels, self.num_labels))
    }
}

impl HfConfig for ViTConfig {
    /// Its images, and at least two classes (a config without labels gets its head from the
    /// recipe's data).
    fn own_facts(&self) -> DataFacts {
        let (c, s) = (self.num_channels, self.image_size);
        DataFacts::images(self.num_labels.max(2), &[c, s, s])
    }

    /// `config.json` for `c` in HF's `ViTConfig` schema, without the dtype keys (the exporter
    /// adds those).
    fn to_hf(&self) -> anyhow::Result<Value> {
        let c = self;
        Ok(json!({
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
        }))
    }

    /// The kiln config of a ViT `config.json`; anything kiln computes differently is refused,
    /// naming the key.
    fn from_hf(r: &HfReader) -> anyhow::Result<Self> {
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
}

#[cfg(test)]
pub(crate) mod tests;
