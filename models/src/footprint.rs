//! How many parameters a config builds, counted without allocating them: the memory estimate
//! that refuses an impossible recipe (`n_embd = 1e9`, `n_layer = 1e5`) before anything is built.

use crate::ModelConfig;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use kiln_core::rng::SharedRng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Parameter counts of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    pub total: u128,
    /// Those the optimizer updates (with LoRA, the adapters and the task head).
    pub trainable: u128,
}

/// Hands out each parameter as a zero-stride view of a single zero (no storage of its own) and
/// records its shape. Refuses once the total passes `limit` elements, so that construction
/// stops before any buffer the model builds beside its parameters grows as large.
struct Counter {
    shapes: Arc<Mutex<HashMap<String, u128>>>,
    limit: u128,
}

impl SimpleBackend for Counter {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = s
            .dims()
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
            .unwrap_or(u128::MAX);
        let mut shapes = self.shapes.lock().unwrap_or_else(|e| e.into_inner());
        shapes.insert(name.to_string(), n);
        let total = shapes.values().fold(0u128, |a, &b| a.saturating_add(b));
        if total > self.limit {
            candle_core::bail!("{OVER_LIMIT} ({name} brings the count to {total})");
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

const OVER_LIMIT: &str = "more parameters than the limit";

impl ModelConfig {
    /// Counts the parameters this config builds, allocating none of them. `Ok(None)` when the
    /// count passes `limit` (the model cannot fit; counting stopped there).
    pub fn count_parameters(&self, limit: u128) -> anyhow::Result<Option<ParamCount>> {
        let shapes = Arc::new(Mutex::new(HashMap::new()));
        let counter = Counter {
            shapes: shapes.clone(),
            limit,
        };
        let vb = VarBuilder::from_backend(Box::new(counter), DType::F32, Device::Cpu);
        if let Err(e) = self.build(vb, SharedRng::new(0, "unused"), DType::F32) {
            if e.to_string().contains(OVER_LIMIT) {
                return Ok(None);
            }
            return Err(anyhow::anyhow!("cannot size the model: {e}"));
        }
        let shapes = shapes.lock().unwrap_or_else(|e| e.into_inner());
        let sum = |keep: &dyn Fn(&str) -> bool| {
            shapes
                .iter()
                .filter(|(n, _)| keep(n))
                .fold(0u128, |a, (_, &b)| a.saturating_add(b))
        };
        Ok(Some(ParamCount {
            total: sum(&|_| true),
            trainable: sum(&|n| self.trainable(n)),
        }))
    }

    /// See [`crate::ModelSpec::activations_per_example`].
    pub fn activations_per_example(&self, input_shape: &[usize]) -> Option<u128> {
        self.spec().activations_per_example(input_shape)
    }
}
