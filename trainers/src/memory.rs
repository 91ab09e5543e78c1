//! The memory a recipe needs, estimated from its config before anything is allocated: weights,
//! gradients and optimizer state from the exact parameter count, activations from the model's
//! per-example estimate times the batch. A recipe that cannot fit is refused with the estimate
//! and what the device has, instead of a capacity-overflow panic or the kernel's OOM killer.

use anyhow::{bail, Result};
use candle_core::Device;
use kiln_core::recipe::{OptimizerName, Precision, Recipe};
use kiln_models::footprint::ParamCount;
use kiln_models::ModelConfig;

/// Bytes a training run of the recipe needs, by part.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    pub params: ParamCount,
    /// f32 weights.
    pub weights: u128,
    /// f32 gradients of the trainable parameters.
    pub gradients: u128,
    /// Optimizer state (AdamW: two f32 moments per trainable parameter).
    pub optimizer: u128,
    /// Activations kept for the backward, for one micro-batch; `None` without a model estimate.
    pub activations: Option<u128>,
}

impl Estimate {
    pub fn total(&self) -> u128 {
        self.weights + self.gradients + self.optimizer + self.activations.unwrap_or(0)
    }
}

/// Refuses the recipe when its estimate exceeds the memory `device` has available (when that
/// can be read); otherwise returns the estimate.
pub fn check_fits(
    recipe: &Recipe,
    cfg: &ModelConfig,
    input_shape: &[usize],
    device: &Device,
) -> Result<Option<Estimate>> {
    let Some(available) = kiln_core::device::available_memory(device) else {
        return Ok(None);
    };
    let where_ = kiln_core::device::device_name(device);
    let available = available as u128;
    // Counting stops once the f32 weights alone would not fit.
    let Some(params) = cfg.count_parameters(available / 4)? else {
        bail!(
            "the model has more than {} parameters: their f32 weights alone need more than the \
             {} available on {where_}; make the [model] smaller (its width, depth or \
             vocabulary), or start from a smaller init_from",
            available / 4,
            human(available)
        );
    };
    let est = estimate(recipe, cfg, params, input_shape);
    if est.total() > available {
        let acts = est.activations.unwrap_or(0);
        let fix = match acts > est.total() - acts {
            true => format!(
                "lower data.batch_size (activations grow with it: {} per example)",
                human(acts / recipe.data.batch_size.max(1) as u128)
            ),
            false => "make the [model] smaller (its width, depth or vocabulary)".to_string(),
        };
        bail!(
            "this recipe needs about {} but {where_} has {} available: {} parameters → weights \
             {}, gradients {}, optimizer state {}; activations for data.batch_size = {}: {}. \
             To fit, {fix}",
            human(est.total()),
            human(available),
            est.params.total,
            human(est.weights),
            human(est.gradients),
            human(est.optimizer),
            recipe.data.batch_size,
            est.activations.map_or("not estimated".into(), human),
        );
    }
    Ok(Some(est))
}

fn estimate(recipe: &Recipe, cfg: &ModelConfig, params: ParamCount, shape: &[usize]) -> Estimate {
    let optimizer_floats = match recipe.optim.name {
        OptimizerName::Adamw => 2,
        OptimizerName::Sgd if recipe.optim.momentum != 0.0 => 1,
        OptimizerName::Sgd => 0,
    };
    let activation_bytes = match recipe.precision {
        Precision::F32 => 4,
        Precision::Bf16 | Precision::F16 => 2,
    };
    Estimate {
        params,
        weights: 4 * params.total,
        gradients: 4 * params.trainable,
        optimizer: 4 * optimizer_floats * params.trainable,
        activations: cfg
            .activations_per_example(shape)
            .map(|a| a.saturating_mul(activation_bytes * recipe.data.batch_size as u128)),
    }
}

/// `1.5 GiB`, `340 MiB`.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}
