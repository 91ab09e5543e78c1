//! LoRA (Hu et al., 2021): a frozen linear layer W plus a trainable low-rank update,
//! y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ, with A (r, in) and B (out, r).
//!
//! Parameter paths are PEFT's without its `base_model.model.` prefix
//! (`….attention.self.query.lora_A.weight`), so an adapter exports by renaming alone. A starts
//! as PEFT's (uniform ±1/√in, Kaiming with a = √5) and B at zero, so training starts from the
//! pretrained function exactly.

use crate::{in_precision, SharedRng};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

/// `[model] lora = { rank = 8, alpha = 16, dropout = 0.1, targets = ["query", "value"] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// The update is scaled by alpha / rank (PEFT's `lora_alpha`; default: the rank, scale 1).
    #[serde(default)]
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default)]
    pub dropout: f64,
    /// Layers that get an adapter: a name matches a layer whose path ends with it
    /// (`"query"`, `"dense"`, `"attention.output.dense"`), as PEFT's `target_modules`.
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        let alpha = if self.alpha > 0.0 {
            self.alpha
        } else {
            self.rank as f64
        };
        alpha / self.rank as f64
    }

    /// Whether the layer at `path` (e.g. `bert.encoder.layer.0.attention.self.query`) is one
    /// of the targets.
    pub fn targets_layer(&self, path: &str) -> bool {
        self.targets
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), crate::ConfigError> {
        if self.rank == 0 {
            return Err(("model.lora.rank", "must be at least 1".into()));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err((
                "model.lora.alpha",
                format!("must be ≥ 0, got {}", self.alpha),
            ));
        }
        crate::check_dropout(self.dropout, "model.lora.dropout")?;
        if self.targets.is_empty() {
            return Err((
                "model.lora.targets",
                "name at least one layer, e.g. [\"query\", \"value\"]".into(),
            ));
        }
        Ok(())
    }
}

/// Whether a parameter path belongs to a LoRA adapter.
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The trainable low-rank update of one linear layer.
#[derive(Clone)]
pub struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    rng: SharedRng,
}

impl Adapter {
    /// The adapter of the linear layer whose `VarBuilder` is `vb`, if `cfg` targets it.
    pub fn for_layer(
        cfg: Option<&LoraConfig>,
        n_in: usize,
        n_out: usize,
        vb: &VarBuilder,
        rng: &SharedRng,
    ) -> Result<Option<Adapter>> {
        let Some(cfg) = cfg.filter(|c| c.targets_layer(&vb.prefix())) else {
            return Ok(None);
        };
        let bound = 1.0 / (n_in as f64).sqrt();
        let a = vb.get_with_hints(
            (cfg.rank, n_in),
            "lora_A.weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = vb.get_with_hints((n_out, cfg.rank), "lora_B.weight", Init::Const(0.0))?;
        Ok(Some(Adapter {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            rng: rng.clone(),
        }))
    }

    /// (α/r)·dropout(x)·Aᵀ·Bᵀ for x (N, in), matmuls in `compute`, returned in x's dtype.
    pub fn forward(&self, x: &Tensor, compute: DType, train: bool) -> Result<Tensor> {
        let x = crate::dropout(x.clone(), self.dropout, train, &self.rng)?;
        let h = in_precision(&x, &self.a.t()?, compute)?;
        in_precision(&h, &self.b.t()?, compute)? * self.scale
    }

    /// The dense update (α/r)·B·A (out, in), to merge into W.
    pub fn delta(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }

    pub fn params(&self) -> [Tensor; 2] {
        [self.a.clone(), self.b.clone()]
    }
}

/// Merges adapters into their base weights: for each `<layer>.lora_A.weight` /
/// `<layer>.lora_B.weight` pair, `<layer>.weight += scale·B·A`, and the adapter tensors go.
pub fn merge(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    cfg: &LoraConfig,
) -> Result<usize> {
    let layers: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect();
    for layer in &layers {
        let a = tensors
            .remove(&format!("{layer}.lora_A.weight"))
            .expect("listed above");
        let b = tensors
            .remove(&format!("{layer}.lora_B.weight"))
            .ok_or_else(|| candle_core::Error::Msg(format!("{layer} has lora_A but no lora_B")))?;
        let w = tensors.get(&format!("{layer}.weight")).ok_or_else(|| {
            candle_core::Error::Msg(format!("{layer} has an adapter but no weight"))
        })?;
        let merged = (w + (b.matmul(&a)? * cfg.scale())?.to_dtype(w.dtype())?)?;
        tensors.insert(format!("{layer}.weight"), merged);
    }
    Ok(layers.len())
}
