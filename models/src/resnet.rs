//! ResNet: Hugging Face `transformers`' `ResNetForImageClassification` (the "v1.5" ResNet of
//! microsoft/resnet-*): a stem, stages of residual layers, a global average pool and a linear
//! classifier. Every convolution is followed by a BatchNorm ([`crate::batch_norm`]).
//!
//! - Stem (`resnet.embedder`): `stem = "imagenet"` is HF's 7×7 stride-2 convolution + BN +
//!   ReLU, then a 3×3 stride-2 max-pool with padding 1 (a 224×224 image enters the stages at
//!   56×56). `stem = "small"` is a 3×3 stride-1 convolution + BN + ReLU and no pool, for 28×28
//!   or 32×32 images, which the ImageNet stem would shrink to 7×7 or 8×8 at once; it has no
//!   `transformers` equivalent (its `ResNetEmbeddings` is fixed), so such a model exports with
//!   HF's names but `transformers` cannot load it.
//! - Stages (`resnet.encoder.stages.{s}`): `depths[s]` layers of `hidden_sizes[s]` output
//!   channels. The first layer of each stage but the first downsamples with stride 2 (the first
//!   stage too with `downsample_in_first_stage`). A `"basic"` layer is two 3×3 convolutions
//!   (the first one strided); a `"bottleneck"` layer a 1×1 reduction to a quarter of the
//!   channels, a 3×3 (strided, or the 1×1 is with `downsample_in_bottleneck`) and a 1×1
//!   expansion. The last BN of a layer has no ReLU: it comes after the residual sum. The
//!   residual is the input itself, or, where the channels or the resolution change, a 1×1
//!   strided convolution + BN (`shortcut`).
//! - Head: the mean over H and W, then `classifier.1` (index 1 after HF's `nn.Flatten`).
//!
//! Parameter paths and shapes are HF's (`resnet.embedder.embedder.convolution.weight`,
//! `resnet.encoder.stages.0.layers.0.layer.1.normalization.running_var`,
//! `resnet.encoder.stages.1.layers.0.shortcut.convolution.weight`, `classifier.1.bias`, …),
//! convolutions without bias, so export is the identity of names. Initialization is HF's:
//! convolutions Kaiming normal (fan out, ReLU gain), BN weight 1 and bias 0, the classifier
//! PyTorch's `nn.Linear` default.
//!
//! Training ops: kiln's strided im2col convolution and max-pool (candle's max-pool backward is
//! wrong), composed BatchNorm, candle's ReLU and mean. Under mixed precision the convolutions
//! and the classifier matmul run in bf16/f16 while the BN statistics and the residual stream
//! stay in f32. `train` switches BN to batch statistics and updates its running statistics.

use crate::batch_norm::BatchNorm2d;
use crate::hf::HfReader;
use crate::{in_precision, ConfigError, DataFacts, HfConfig, Model, ModelSpec};
use anyhow::Context;
use candle_core::{DType, Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// HF's microsoft/resnet-* architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    #[serde(rename = "resnet-18")]
    Resnet18,
    #[serde(rename = "resnet-34")]
    Resnet34,
    #[serde(rename = "resnet-50")]
    Resnet50,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    Basic,
    Bottleneck,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// HF's: 7×7 stride-2 convolution, BN, ReLU, 3×3 stride-2 max-pool (padding 1).
    #[default]
    Imagenet,
    /// 3×3 stride-1 convolution, BN, ReLU; no pool. For small images; not in `transformers`.
    Small,
}

/// The architecture fields are HF `ResNetConfig`'s. `preset` fills the ones not given with
/// microsoft/resnet-18, -34 or -50's values; fields given next to a preset override it (a
/// narrower ResNet-18: `preset = "resnet-18"`, `hidden_sizes = [16, 32, 64, 128]`). Without a
/// preset, `embedding_size`, `hidden_sizes`, `depths` and `layer_type` are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    #[serde(default)]
    pub stem: Stem,
    /// Output channels of the stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    /// Output channels of each stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_sizes: Option<Vec<usize>>,
    /// Layers in each stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depths: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_type: Option<LayerType>,
    /// Stride 2 in the first stage's first layer too.
    #[serde(default)]
    pub downsample_in_first_stage: bool,
    /// A bottleneck downsamples in its first 1×1 convolution instead of the 3×3 (ResNet v1).
    #[serde(default)]
    pub downsample_in_bottleneck: bool,
    /// Only "relu".
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Filled from the data: image channels, classes, and (channels, height, width).
    #[serde(default)]
    pub num_channels: usize,
    #[serde(default)]
    pub num_labels: usize,
    #[serde(default)]
    pub input_shape: Vec<usize>,
}

fn default_hidden_act() -> String {
    "relu".into()
}

impl Preset {
    /// (embedding_size, hidden_sizes, depths, layer_type), as microsoft/resnet-*'s config.json.
    fn arch(self) -> (usize, Vec<usize>, Vec<usize>, LayerType) {
        match self {
            Preset::Resnet18 => (
                64,
                vec![64, 128, 256, 512],
                vec![2, 2, 2, 2],
                LayerType::Basic,
            ),
            Preset::Resnet34 => (
                64,
                vec![64, 128, 256, 512],
                vec![3, 4, 6, 3],
                LayerType::Basic,
            ),
            Preset::Resnet50 => (
                64,
                vec![256, 512, 1024, 2048],
                vec![3, 4, 6, 3],
                LayerType::Bottleneck,
            ),
        }
    }
}

/// The reduction of a bottleneck's inner convolutions.
const REDUCTION: usize = 4;

impl ResNetConfig {
    /// A config with `preset`'s architecture and the ImageNet stem (data fields unset).
    pub fn preset(preset: Preset) -> Self {
        ResNetConfig {
            preset: Some(preset),
            stem: Stem::Imagenet,
            embedding_size: None,
            hidden_sizes: None,
            depths: None,
            layer_type: None,
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
            hidden_act: default_hidden_act(),
            num_channels: 0,
            num_labels: 0,
            input_shape: Vec::new(),
        }
    }
}

/// HF's convolution init: Kaiming normal with fan out and the ReLU gain.
const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// HF's `ResNetConvLayer` (and, without the ReLU, `ResNetShortCut`): a k×k convolution with
/// padding k / 2 and no bias, then BN, then ReLU when `relu`.
struct ConvLayer {
    weight: Tensor,
    stride: usize,
    norm: BatchNorm2d,
    relu: bool,
}

impl ConvLayer {
    fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        relu: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(ConvLayer {
            weight: vb.get_with_hints((c_out, c_in, k, k), "convolution.weight", CONV_INIT)?,
            stride,
            norm: BatchNorm2d::new(c_out, vb.pp("normalization"))?,
            relu,
        })
    }

    /// The convolution runs in `compute`; BN and the output are in x's dtype.
    fn forward(&self, x: &Tensor, train: bool, compute: DType) -> Result<Tensor> {
        let pad = self.weight.dim(2)? / 2;
        let conv =
            |x: &Tensor, w: &Tensor| kiln_kernels::conv2d_strided(x, w, None, self.stride, pad);
        let y = if compute == x.dtype() {
            conv(x, &self.weight)?
        } else {
            conv(&x.to_dtype(compute)?, &self.weight.to_dtype(compute)?)?.to_dtype(x.dtype())?
        };
        self.norm.forward_then(&y, train, self.relu)
    }
}

/// HF's `ResNetBasicLayer` / `ResNetBottleNeckLayer`: relu(layer(x) + shortcut(x)).
struct ResidualLayer {
    shortcut: Option<ConvLayer>,
    layer: Vec<ConvLayer>,
}

impl ResidualLayer {
    fn new(
        cfg: &ResNetConfig,
        c_in: usize,
        c_out: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if c_in != c_out || stride != 1 {
            Some(ConvLayer::new(
                c_in,
                c_out,
                1,
                stride,
                false,
                vb.pp("shortcut"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("layer");
        let layer = match cfg.layer_type {
            Some(LayerType::Basic) => vec![
                ConvLayer::new(c_in, c_out, 3, stride, true, vb.pp("0"))?,
                ConvLayer::new(c_out, c_out, 3, 1, false, vb.pp("1"))?,
            ],
            Some(LayerType::Bottleneck) => {
                let r = c_out / REDUCTION;
                // ResNet v1.5 strides the 3×3; v1 (downsample_in_bottleneck) the first 1×1.
                let (s1, s3) = if cfg.downsample_in_bottleneck {
                    (stride, 1)
                } else {
                    (1, stride)
                };
                vec![
                    ConvLayer::new(c_in, r, 1, s1, true, vb.pp("0"))?,
                    ConvLayer::new(r, r, 3, s3, true, vb.pp("1"))?,
                    ConvLayer::new(r, c_out, 1, 1, false, vb.pp("2"))?,
                ]
            }
            None => candle_core::bail!("resnet config not resolved: layer_type is unset"),
        };
        Ok(ResidualLayer { shortcut, layer })
    }

    fn forward(&self, x: &Tensor, train: bool, compute: DType) -> Result<Tensor> {
        let mut y = x.clone();
        for conv in &self.layer {
            y = conv.forward(&y, train, compute)?;
        }
        let residual = match &self.shortcut {
            Some(s) => s.forward(x, train, compute)?,
            None => x.clone(),
        };
        kiln_kernels::add_relu(&y, &residual)
    }
}

pub struct ResNet {
    stem: ConvLayer,
    pool: bool,
    layers: Vec<ResidualLayer>,
    classifier_weight: Tensor,
    classifier_bias: Tensor,
    compute: DType,
}

impl ResNet {
    /// `cfg` must be resolved. ResNet has no dropout: `_rng` is unused.
    pub fn new(
        cfg: &ResNetConfig,
        vb: VarBuilder,
        _rng: SharedRng,
        compute: DType,
    ) -> Result<Self> {
        let (Some(embedding), Some(hidden), Some(depths)) =
            (cfg.embedding_size, &cfg.hidden_sizes, &cfg.depths)
        else {
            candle_core::bail!("resnet config not resolved: call ModelConfig::from_recipe");
        };
        let (k, stride) = match cfg.stem {
            Stem::Imagenet => (7, 2),
            Stem::Small => (3, 1),
        };
        let stem = ConvLayer::new(
            cfg.num_channels,
            embedding,
            k,
            stride,
            true,
            vb.pp("resnet.embedder.embedder"),
        )?;
        let mut layers = Vec::new();
        let mut c_in = embedding;
        for (s, (&c_out, &depth)) in hidden.iter().zip(depths).enumerate() {
            let vb = vb.pp(format!("resnet.encoder.stages.{s}.layers"));
            let stride = if s > 0 || cfg.downsample_in_first_stage {
                2
            } else {
                1
            };
            for l in 0..depth {
                let (c, st) = if l == 0 { (c_in, stride) } else { (c_out, 1) };
                layers.push(ResidualLayer::new(cfg, c, c_out, st, vb.pp(l.to_string()))?);
            }
            c_in = c_out;
        }
        // PyTorch's nn.Linear default (HF leaves the classifier to it).
        let bound = 1.0 / (c_in as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let head = vb.pp("classifier.1");
        Ok(ResNet {
            stem,
            pool: cfg.stem == Stem::Imagenet,
            layers,
            classifier_weight: head.get_with_hints((cfg.num_labels, c_in), "weight", uniform)?,
            classifier_bias: head.get_with_hints(cfg.num_labels, "bias", uniform)?,
            compute,
        })
    }
}

impl Model for ResNet {
    /// `xs` (B, C, H, W) → logits (B, num_labels).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.stem.forward(xs, train, self.compute)?;
        if self.pool {
            x = kiln_kernels::max_pool2d_strided(&x, 3, 2, 1)?;
        }
        for layer in &self.layers {
            x = layer.forward(&x, train, self.compute)?;
        }
        // Adaptive average pool to 1×1, flattened: (B, C).
        let pooled = x.mean((2, 3))?;
        in_precision(&pooled, &self.classifier_weight.t()?, self.compute)?
            .broadcast_add(&self.classifier_bias)
    }
}

impl ModelSpec for ResNetConfig {
    /// Fills the preset's fields and the data's (`classes`, `input` = (C, H, W)) and validates.
    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (classes, input) = (data.classes, &data.input_shape[..]);
        if let Some(p) = self.preset {
            let (e, h, d, l) = p.arch();
            self.embedding_size.get_or_insert(e);
            self.hidden_sizes.get_or_insert(h);
            self.depths.get_or_insert(d);
            self.layer_type.get_or_insert(l);
        }
        let missing = || {
            "missing: set it, or a preset (\"resnet-18\", \"resnet-34\", \"resnet-50\")".to_string()
        };
        if self.hidden_act != "relu" {
            return Err((
                "model.hidden_act",
                format!("only \"relu\" is supported, got {:?}", self.hidden_act),
            ));
        }
        match self.embedding_size {
            None => return Err(("model.embedding_size", missing())),
            Some(0) => return Err(("model.embedding_size", "must be at least 1".into())),
            Some(_) => {}
        }
        let layer_type = self
            .layer_type
            .ok_or_else(|| ("model.layer_type", missing()))?;
        let hidden = self
            .hidden_sizes
            .as_ref()
            .ok_or_else(|| ("model.hidden_sizes", missing()))?;
        let depths = self
            .depths
            .as_ref()
            .ok_or_else(|| ("model.depths", missing()))?;
        let min = match layer_type {
            LayerType::Basic => 1,
            // The inner convolutions have hidden_size / 4 channels (rounded down, as HF).
            LayerType::Bottleneck => REDUCTION,
        };
        if hidden.is_empty() || hidden.iter().any(|&h| h < min) {
            return Err((
                "model.hidden_sizes",
                format!(
                    "needs at least one stage, each with at least {min} channels, got {hidden:?}"
                ),
            ));
        }
        if depths.len() != hidden.len() || depths.contains(&0) {
            return Err((
                "model.depths",
                format!(
                    "needs one depth of at least 1 per stage ({} stages in hidden_sizes), got {depths:?}",
                    hidden.len()
                ),
            ));
        }
        if input.len() != 3 || input.contains(&0) {
            return Err((
                "model.kind",
                format!("resnet needs image inputs (C, H, W), the data gives {input:?}"),
            ));
        }
        if self.num_channels != 0 && self.num_channels != input[0] {
            return Err((
                "model.num_channels",
                format!(
                    "{} but the data's images have {} channels",
                    self.num_channels, input[0]
                ),
            ));
        }
        if self.num_labels == 0 {
            self.num_labels = classes;
        }
        if self.num_labels < classes.max(2) {
            return Err((
                "model.num_labels",
                format!(
                    "{} is fewer than the data's {classes} classes (a classifier needs at least 2)",
                    self.num_labels
                ),
            ));
        }
        self.num_channels = input[0];
        self.input_shape = input.to_vec();
        Ok(())
    }

    fn image_classifier(&self) -> Option<(usize, usize)> {
        Some((self.num_channels, self.num_labels))
    }
}

impl HfConfig for ResNetConfig {
    /// Images of any size (a ResNet pools them), and at least two classes (a config without
    /// labels gets its head from the recipe's data).
    fn own_facts(&self) -> DataFacts {
        DataFacts::images(
            self.num_labels.max(2),
            &[self.num_channels.max(1), 224, 224],
        )
    }

    /// HF `ResNetConfig` of a resolved kiln ResNet; the small-image stem has no counterpart there.
    fn to_hf(&self) -> anyhow::Result<Value> {
        let c = self;
        if c.stem == Stem::Small {
            anyhow::bail!(
            "this ResNet has kiln's small-image stem (model.stem = \"small\"), which transformers' \
             ResNet does not have (its stem is a 7×7 stride-2 convolution and a max-pool), so \
             no ResNetForImageClassification folder can reproduce it; train with \
             model.stem = \"imagenet\" to export"
        );
        }
        let layer_type = match c.layer_type {
            Some(LayerType::Basic) => "basic",
            Some(LayerType::Bottleneck) => "bottleneck",
            None => anyhow::bail!("the ResNet config is not resolved (no layer_type)"),
        };
        Ok(json!({
            "architectures": ["ResNetForImageClassification"],
            "model_type": "resnet",
            "num_channels": c.num_channels,
            "embedding_size": c.embedding_size,
            "hidden_sizes": c.hidden_sizes,
            "depths": c.depths,
            "layer_type": layer_type,
            "hidden_act": c.hidden_act,
            "downsample_in_first_stage": c.downsample_in_first_stage,
            "downsample_in_bottleneck": c.downsample_in_bottleneck,
            "num_labels": c.num_labels,
        }))
    }

    /// The kiln config of a ResNet `config.json`; anything kiln computes differently is refused,
    /// naming the key.
    fn from_hf(r: &HfReader) -> anyhow::Result<Self> {
        if !matches!(r.v["hidden_act"].as_str(), None | Some("relu")) {
            return Err(r.refuse("hidden_act", "kiln's ResNet uses ReLU"));
        }
        let sizes = |k: &str| -> anyhow::Result<Vec<usize>> {
            serde_json::from_value(r.v[k].clone())
                .with_context(|| format!("{}: `{k}` is not a list of whole numbers", r.ctx()))
        };
        let layer_type = match r.v["layer_type"].as_str() {
            None | Some("bottleneck") => LayerType::Bottleneck,
            Some("basic") => LayerType::Basic,
            Some(_) => return Err(r.refuse("layer_type", "expected basic or bottleneck")),
        };
        Ok(ResNetConfig {
            preset: None,
            stem: Stem::Imagenet,
            embedding_size: Some(r.uint("embedding_size")?),
            hidden_sizes: Some(sizes("hidden_sizes")?),
            depths: Some(sizes("depths")?),
            layer_type: Some(layer_type),
            downsample_in_first_stage: r.v["downsample_in_first_stage"].as_bool().unwrap_or(false),
            downsample_in_bottleneck: r.v["downsample_in_bottleneck"].as_bool().unwrap_or(false),
            hidden_act: "relu".into(),
            num_channels: r.uint("num_channels")?,
            num_labels: crate::hf::num_labels(r.v),
            input_shape: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests;
