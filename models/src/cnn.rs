//! A small convolutional network for 28×28 images:
//! [conv 3×3 → ReLU → max-pool 2] per stage, then a hidden linear layer and the classifier.

use crate::{check_dropout, in_precision, ConfigError, DataFacts, Model, ModelSpec};
use candle_core::{DType, Result, Tensor};
use candle_nn::{linear, Init, Linear, VarBuilder};
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    /// Output channels of each stage (each stage halves the resolution).
    pub channels: Vec<usize>,
    /// Width of the hidden linear layer.
    pub hidden: usize,
    #[serde(default)]
    pub dropout: f64,
    /// Filled from the data: (channels, height, width) and number of classes.
    #[serde(default)]
    pub input_shape: Vec<usize>,
    #[serde(default)]
    pub num_classes: usize,
}

/// A 3×3 convolution with "same" padding, initialized as PyTorch's `Conv2d`.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / ((c_in * 9) as f64).sqrt();
        Ok(Conv {
            weight: vb.get_with_hints(
                (c_out, c_in, 3, 3),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            )?,
            bias: vb.get_with_hints(
                c_out,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
        })
    }

    /// The convolution (a matmul) runs in `compute`; the bias is added in x's dtype.
    fn forward(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        if compute == x.dtype() {
            return kiln_kernels::conv2d(x, &self.weight, Some(&self.bias), 1);
        }
        let w = self.weight.to_dtype(compute)?;
        let y = kiln_kernels::conv2d(&x.to_dtype(compute)?, &w, None, 1)?.to_dtype(x.dtype())?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

pub struct Cnn {
    convs: Vec<Conv>,
    fc1: Linear,
    fc2: Linear,
    dropout: f64,
    rng: SharedRng,
    compute: DType,
}

fn linear_in(layer: &Linear, x: &Tensor, compute: DType) -> Result<Tensor> {
    let y = in_precision(x, &layer.weight().t()?, compute)?;
    match layer.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Cnn {
    pub fn new(cfg: &CnnConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        let mut c_in = cfg.input_shape[0];
        let mut convs = Vec::new();
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(Conv::new(c_in, c, vb.pp(format!("features.{i}")))?);
            c_in = c;
        }
        let shrink = 1 << cfg.channels.len();
        let flat = c_in * (cfg.input_shape[1] / shrink) * (cfg.input_shape[2] / shrink);
        Ok(Cnn {
            convs,
            fc1: linear(flat, cfg.hidden, vb.pp("classifier.fc1"))?,
            fc2: linear(cfg.hidden, cfg.num_classes, vb.pp("classifier.fc2"))?,
            dropout: cfg.dropout,
            rng,
            compute,
        })
    }
}

impl Model for Cnn {
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = xs.clone();
        for conv in &self.convs {
            x = kiln_kernels::max_pool2d(
                &kiln_kernels::relu(&conv.forward(&x, self.compute)?)?,
                2,
            )?;
        }
        let mut x = kiln_kernels::relu(&linear_in(&self.fc1, &x.flatten_from(1)?, self.compute)?)?;
        if train {
            x = kiln_kernels::dropout(&x, self.dropout, &self.rng)?;
        }
        linear_in(&self.fc2, &x, self.compute)
    }
}

impl ModelSpec for CnnConfig {
    /// Each stage keeps its convolution output and ReLU at full size and the pooled map.
    fn activations_per_example(&self, input_shape: &[usize]) -> Option<u128> {
        let (&[c, h, w], mut total) = (input_shape, 0u128) else {
            return None;
        };
        let (mut h, mut w) = (h as u128, w as u128);
        total += c as u128 * h * w;
        for &ch in &self.channels {
            total += 2 * ch as u128 * h * w;
            (h, w) = (h / 2, w / 2);
            total += ch as u128 * h * w;
        }
        Some(total + 3 * self.hidden as u128 + self.num_classes as u128)
    }

    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (classes, input) = (data.classes, &data.input_shape[..]);
        check_dropout(self.dropout, "model.dropout")?;
        if self.channels.is_empty() || self.channels.contains(&0) {
            return Err((
                "model.channels",
                "needs at least one stage, each with at least 1 channel".into(),
            ));
        }
        if self.hidden == 0 {
            return Err(("model.hidden", "must be at least 1".into()));
        }
        if input.len() != 3 {
            return Err((
                "model.kind",
                format!("cnn needs image inputs (C, H, W), the data gives {input:?}"),
            ));
        }
        let shrink = 1 << self.channels.len();
        if input[1] < shrink || input[2] < shrink {
            return Err((
                "model.channels",
                format!(
                    "{} stages shrink {}×{} images to nothing",
                    self.channels.len(),
                    input[1],
                    input[2]
                ),
            ));
        }
        self.input_shape = input.to_vec();
        self.num_classes = classes;
        Ok(())
    }
}
