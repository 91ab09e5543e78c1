//! `BatchNorm2d` over (N, C, H, W) with PyTorch's semantics: momentum 0.1, eps 1e-5, an affine
//! `weight` and `bias` (C), and the buffers `running_mean`, `running_var` (C) and
//! `num_batches_tracked` (a scalar, f32 here: export writes it as int64).
//!
//! Training normalizes each channel with the batch mean and the biased batch variance, and
//! updates the running statistics with the unbiased variance:
//! `running = 0.9 · running + 0.1 · batch`. Evaluation normalizes with the running statistics.
//!
//! Training runs kiln's batch-norm kernel (`kiln_kernels::batch_norm`, which has a backward:
//! candle_nn's fused norms are applied without one, and would silently stop the gradients);
//! statistics are in f32 (f64 for f64 inputs) whatever the input's dtype. The buffers come from the VarBuilder, so they live in the
//! trainer's VarMap and are checkpointed with the weights; a training forward overwrites them
//! in place, recording no graph, and everything that shares their storage (the VarMap's Var, a
//! model built from detached copies of it) sees the new values.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use kiln_kernels::stats_dtype;

pub const MOMENTUM: f64 = 0.1;
pub const EPS: f64 = 1e-5;

/// The names of BatchNorm's buffers: running statistics, not trained and not decayed, but
/// saved with the weights.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    /// `vb` names the tensors `weight`, `bias`, `running_mean`, `running_var` and
    /// `num_batches_tracked`; initialized as PyTorch: weight 1, bias 0, mean 0, variance 1.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.))?,
            num_batches_tracked: vb.get_with_hints((), "num_batches_tracked", Init::Const(0.))?,
        })
    }

    /// Normalizes `x` (N, C, H, W); returns x's dtype. `train`: batch statistics, and the
    /// running ones are updated.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, false)
    }

    /// [`BatchNorm2d::forward`], followed by a ReLU when `relu` (in training, in the same op).
    pub fn forward_then(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if train {
            let (y, mean, var) =
                kiln_kernels::batch_norm::batch_norm_train(x, &self.weight, &self.bias, EPS, relu)?;
            let m = (n * h * w) as f64;
            self.update(&mean, &(var * (m / (m - 1.0)))?)?;
            return Ok(y);
        }
        // The buffers are read detached: they get no gradient.
        let acc = stats_dtype(x.dtype());
        let per_channel = |t: &Tensor| t.to_dtype(acc)?.reshape((1, c, 1, 1));
        let mean = per_channel(&self.running_mean.detach())?;
        let var = per_channel(&self.running_var.detach())?;
        let scale = per_channel(&self.weight)?.broadcast_div(&(var + EPS)?.sqrt()?)?;
        let y = x
            .to_dtype(acc)?
            .broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&per_channel(&self.bias)?)?
            .to_dtype(x.dtype())?;
        if relu {
            kiln_kernels::relu(&y)
        } else {
            Ok(y)
        }
    }

    /// Moves the running statistics towards the batch's `mean` and unbiased `var` (C),
    /// in place and outside the graph.
    fn update(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let blend = |running: &Tensor, batch: &Tensor| -> Result<()> {
            let acc = batch.dtype();
            let new = ((running.detach().to_dtype(acc)? * (1.0 - MOMENTUM))?
                + (batch.detach().flatten_all()? * MOMENTUM)?)?
                .to_dtype(running.dtype())?;
            running.slice_set(&new, 0, 0)
        };
        blend(&self.running_mean, mean)?;
        blend(&self.running_var, var)?;
        // slice_set needs a dimension: write the scalar through a shape-(1) view of its storage.
        let count = self.num_batches_tracked.reshape(1)?;
        count.slice_set(&(count.detach() + 1.0)?, 0, 0)
    }

    /// The buffers' current values: (running_mean, running_var, num_batches_tracked).
    pub fn running_stats(&self) -> (&Tensor, &Tensor, &Tensor) {
        (
            &self.running_mean,
            &self.running_var,
            &self.num_batches_tracked,
        )
    }
}

#[cfg(test)]
mod tests;
