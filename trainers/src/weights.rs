//! Building a model and filling its parameters: from a kiln checkpoint (for a LoRA run, the
//! frozen base from the recipe's `init_from` first) or from a Hugging Face folder. Training,
//! `kiln eval`/`generate`, export and prediction all load weights through here.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use kiln_core::checkpoint;
use kiln_core::recipe::Recipe;
use kiln_models::{Model, ModelConfig, SharedRng};
use std::path::Path;

/// Where a model's weights come from.
pub enum Weights<'a> {
    /// A checkpoint's model file (`model.safetensors`) of a run with this recipe.
    Checkpoint { recipe: &'a Recipe, file: &'a Path },
    /// A Hugging Face model folder.
    Pretrained(&'a Path),
}

/// Builds `cfg` on fresh parameters (seeded by `seed`, matmuls in `compute`) and overwrites them
/// from `from`, each name and shape checked. Returns the parameters.
pub fn load(
    cfg: &ModelConfig,
    from: Weights,
    seed: u64,
    compute: DType,
    device: &Device,
) -> Result<VarMap> {
    // Pretrained weights are read and checked against the config before the model is built,
    // so a config.json larger than its weights is refused before anything is allocated.
    let pretrained = match from {
        Weights::Pretrained(folder) => Some(kiln_models::hf::read_pretrained(cfg, folder)?),
        Weights::Checkpoint { .. } => None,
    };
    let varmap = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&varmap, seed, DType::F32, device);
    cfg.build(vb, SharedRng::new(seed, "dropout"), compute)?;
    if let Weights::Checkpoint { recipe, file } = from {
        restore_weights(&varmap, cfg, recipe, file, device)?;
    }
    if let Some(p) = pretrained {
        kiln_models::hf::set_pretrained(&varmap, cfg, p)?;
    }
    Ok(varmap)
}

/// [`load`], then the model over detached parameters, for inference.
pub fn load_model(
    cfg: &ModelConfig,
    from: Weights,
    seed: u64,
    compute: DType,
    device: &Device,
) -> Result<Box<dyn Model>> {
    let varmap = load(cfg, from, seed, compute, device)?;
    detached_model(&varmap, cfg, device, compute)
}

/// The model over detached copies of the parameters (no graph is recorded), for evaluation and
/// generation; matmuls in `compute`, as in training.
pub fn detached_model(
    varmap: &VarMap,
    cfg: &ModelConfig,
    device: &Device,
    compute: DType,
) -> Result<Box<dyn Model>> {
    let vb = kiln_core::rng::detached_var_builder(varmap, DType::F32, device);
    let rng = SharedRng::new(0, "unused: evaluation has no dropout");
    Ok(cfg.build(vb, rng, compute)?)
}

/// Loads a checkpoint into the model: with LoRA, the frozen weights from the recipe's
/// `init_from` first, then every trainable parameter from `path`.
pub fn restore_weights(
    varmap: &VarMap,
    cfg: &ModelConfig,
    recipe: &Recipe,
    path: &Path,
    device: &Device,
) -> Result<()> {
    if cfg.lora().is_some() {
        let from = recipe.init_from.as_deref().context(
            "this LoRA run's recipe has no init_from, so its frozen base weights are unknown",
        )?;
        kiln_models::hf::load_pretrained(varmap, cfg, &kiln_core::hub::resolve(from)?)?;
    }
    load_weights(varmap, path, device, |n| cfg.saved(n))
}

/// Loads checkpoint weights into the parameters `needed` selects, naming any missing or
/// misshapen tensor.
pub fn load_weights(
    varmap: &VarMap,
    path: &Path,
    device: &Device,
    needed: impl Fn(&str) -> bool,
) -> Result<()> {
    let weights = checkpoint::load_tensors(path, device)?;
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut extra: Vec<&String> = weights
        .keys()
        .filter(|n| !(vars.contains_key(*n) && needed(n)))
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        anyhow::bail!(
            "{} has {} tensor(s) this model does not (first: {first}); it belongs to another \
             model or recipe",
            path.display(),
            extra.len()
        );
    }
    for (name, var) in vars.iter() {
        if !needed(name) {
            continue;
        }
        let w = weights.get(name).with_context(|| {
            format!(
                "{} has no tensor {name}; it does not belong to this model",
                path.display()
            )
        })?;
        anyhow::ensure!(
            w.shape() == var.shape() && w.dtype() == var.dtype(),
            "{}: {name} is {:?} {:?}, the model expects {:?} {:?}",
            path.display(),
            w.dtype(),
            w.dims(),
            var.dtype(),
            var.dims()
        );
        ensure_finite(w, name, path)?;
        var.set(w)?;
    }
    Ok(())
}

/// Refuses a tensor holding NaN or ±inf: a model with one evaluates to `null` metrics and
/// generates garbage, which says nothing about where it came from.
fn ensure_finite(w: &candle_core::Tensor, name: &str, path: &Path) -> Result<()> {
    // x·0 is 0 for every finite x and NaN for NaN and ±inf, so the sum is finite exactly when
    // every element is.
    let probe = w
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    anyhow::ensure!(
        probe.is_finite(),
        "{}: tensor {name} holds NaN or infinite values (the run had diverged when it was \
         saved); use an earlier checkpoint (--checkpoint step-N) or retrain with a lower \
         optim.lr",
        path.display()
    );
    Ok(())
}
