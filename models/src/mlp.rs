//! A multilayer perceptron for flattened images: Linear → ReLU → … → Linear.

use crate::{check_dropout, ConfigError, DataFacts, Model, ModelSpec};
use candle_core::{DType, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
    /// Filled from the data: flattened input size and number of classes.
    #[serde(default)]
    pub input_dim: usize,
    #[serde(default)]
    pub num_classes: usize,
}

pub struct Mlp {
    layers: Vec<Linear>,
    dropout: f64,
    rng: SharedRng,
    compute: DType,
}

impl Mlp {
    pub fn new(cfg: &MlpConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        let widths: Vec<usize> = std::iter::once(cfg.input_dim)
            .chain(cfg.hidden.iter().copied())
            .chain(std::iter::once(cfg.num_classes))
            .collect();
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(w[0], w[1], vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Mlp {
            layers,
            dropout: cfg.dropout,
            rng,
            compute,
        })
    }
}

/// A candle-nn `Linear` (its initialization, its parameter names) applied by kiln's fused
/// projection: one graph node instead of a transpose, a matmul and a broadcast add, and no
/// gradient computed for an input that needs none (a first layer's images).
fn linear_layer(layer: &Linear, x: &Tensor, compute: DType) -> Result<Tensor> {
    let layout = kiln_kernels::WeightLayout::OutIn;
    kiln_kernels::linear(x, layer.weight(), layer.bias(), layout, compute)
}

impl Model for Mlp {
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = xs.flatten_from(1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = linear_layer(layer, &x, self.compute)?;
            if i < last {
                x = kiln_kernels::relu(&x)?;
                if train {
                    x = kiln_kernels::dropout(&x, self.dropout, &self.rng)?;
                }
            }
        }
        Ok(x)
    }
}

impl ModelSpec for MlpConfig {
    /// Each layer keeps its output and activation (and a dropout mask).
    fn activations_per_example(&self, _input_shape: &[usize]) -> Option<u128> {
        let widths = self.hidden.iter().map(|&w| 3 * w as u128).sum::<u128>();
        Some(self.input_dim as u128 + widths + self.num_classes as u128)
    }

    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        let (classes, input) = (data.classes, &data.input_shape[..]);
        check_dropout(self.dropout, "model.dropout")?;
        if self.hidden.contains(&0) {
            return Err(("model.hidden", "layer widths must be at least 1".into()));
        }
        self.input_dim = input.iter().product();
        self.num_classes = classes;
        Ok(())
    }
}
