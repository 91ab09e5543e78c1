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
/// can be read); otherwise returns the estimate. `ranks`: the processes of a data-parallel job
/// (each takes its slice of a batch, and under ZeRO-1 its share of the optimizer state).
pub fn check_fits(
    recipe: &Recipe,
    cfg: &ModelConfig,
    input_shape: &[usize],
    device: &Device,
    ranks: usize,
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
    let est = estimate(recipe, cfg, params, input_shape, ranks.max(1));
    if est.total() > available {
        let acts = est.activations.unwrap_or(0);
        let fix = match acts > est.total() - acts {
            true => format!(
                "lower data.batch_size (activations grow with it: {} per example)",
                human(acts / per_rank(recipe.data.batch_size, ranks.max(1)).max(1) as u128)
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
            match ranks {
                0 | 1 => recipe.data.batch_size.to_string(),
                n => format!(
                    "{} ({} on the busiest of {n} ranks)",
                    recipe.data.batch_size,
                    per_rank(recipe.data.batch_size, n)
                ),
            },
            est.activations.map_or("not estimated".into(), human),
        );
    }
    Ok(Some(est))
}

/// The examples of a batch of `batch` the busiest of `ranks` takes.
fn per_rank(batch: usize, ranks: usize) -> usize {
    batch.div_ceil(ranks)
}

fn estimate(
    recipe: &Recipe,
    cfg: &ModelConfig,
    params: ParamCount,
    shape: &[usize],
    ranks: usize,
) -> Estimate {
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
        // ZeRO-1: a rank holds about 1/N of the state (whole parameters, so roughly).
        optimizer: 4 * optimizer_floats * params.trainable
            / if recipe.trainer.zero_stage == 1 {
                ranks as u128
            } else {
                1
            },
        activations: cfg.activations_per_example(shape).map(|a| {
            let examples = per_rank(recipe.data.batch_size, ranks) as u128;
            a.saturating_mul(activation_bytes * examples)
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate of the shipped `shakespeare-char` recipe (vocabulary and context given, so
    /// no data is read) for a job of `ranks`, with `sets`.
    fn estimate_of(sets: &[&str], ranks: usize) -> Estimate {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../recipes/shakespeare-char.toml");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let recipe = Recipe::load(&path, &sets).unwrap();
        let cfg = ModelConfig::from_recipe(&recipe, 65, &[64]).unwrap();
        let params = cfg.count_parameters(u128::MAX).unwrap().unwrap();
        estimate(&recipe, &cfg, params, &[64], ranks)
    }

    #[test]
    fn ranks_take_slices_of_the_batch_and_zero_1_shares_the_state() {
        let one = estimate_of(&[], 1);
        let two = estimate_of(&[], 2);
        let sharded = estimate_of(&["trainer.zero_stage=1"], 2);
        // B12 → 6 examples a rank; the optimizer state whole on each DDP rank, halved under
        // ZeRO-1; weights and gradients whole everywhere.
        assert_eq!(two.activations.unwrap() * 2, one.activations.unwrap());
        assert_eq!(two.optimizer, one.optimizer);
        assert_eq!(sharded.optimizer * 2, one.optimizer);
        assert_eq!(
            (sharded.weights, sharded.gradients),
            (one.weights, one.gradients)
        );
        // 3 ranks: the busiest takes 4 of 12.
        assert_eq!(
            estimate_of(&[], 3).activations.unwrap() * 3,
            one.activations.unwrap()
        );
    }
}
