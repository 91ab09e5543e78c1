//! kiln-models: the model zoo. One model per file, parameter paths named as in Hugging Face
//! `transformers` where the architecture exists there, so checkpoints export without renaming.

pub mod cnn;
pub mod gpt;
pub mod mlp;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_core::recipe::{Recipe, RecipeError};
pub use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};

/// A trainable network: inputs → logits.
pub trait Model: Send + Sync {
    /// `train` turns dropout on.
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor>;
}

/// The `[model]` section of a recipe, by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    Mlp(mlp::MlpConfig),
    Cnn(cnn::CnnConfig),
    Gpt(gpt::GptConfig),
}

impl ModelConfig {
    /// Decodes the recipe's `[model]` table and fills in what the data decides (number of
    /// classes or vocabulary size, input size, context length).
    pub fn from_recipe(
        recipe: &Recipe,
        num_classes: usize,
        input_shape: &[usize],
    ) -> std::result::Result<Self, RecipeError> {
        let mut cfg = Self::decode(recipe)?;
        let err = |(key, msg): ConfigError| recipe.source.error(key, msg);
        match &mut cfg {
            ModelConfig::Mlp(c) => c.resolve(num_classes, input_shape).map_err(err)?,
            ModelConfig::Cnn(c) => c.resolve(num_classes, input_shape).map_err(err)?,
            ModelConfig::Gpt(c) => c
                .resolve(num_classes, recipe.data.seq_len.unwrap_or(0))
                .map_err(err)?,
        }
        Ok(cfg)
    }

    /// Decodes the `[model]` table as written, without consulting the data (a run's resolved
    /// `recipe.toml` already holds the data-derived fields).
    pub fn decode(recipe: &Recipe) -> std::result::Result<Self, RecipeError> {
        let src = &recipe.source;
        let mut table = recipe.model.clone();
        let kind = table.remove("kind");
        let value = toml::Value::Table(table);
        Ok(match kind.as_ref().and_then(|k| k.as_str()) {
            Some("mlp") => ModelConfig::Mlp(src.decode("model", value)?),
            Some("cnn") => ModelConfig::Cnn(src.decode("model", value)?),
            Some("gpt") => ModelConfig::Gpt(src.decode("model", value)?),
            other => {
                return Err(src.error(
                    "model.kind",
                    format!(
                        "unknown model kind {other:?}; valid choices: \"mlp\", \"cnn\", \"gpt\""
                    ),
                ))
            }
        })
    }

    /// The resolved config as a TOML table (for the run's `recipe.toml`).
    pub fn to_table(&self) -> toml::Table {
        match toml::Value::try_from(self).expect("configs serialize") {
            toml::Value::Table(t) => t,
            _ => unreachable!("a config is a table"),
        }
    }

    /// Builds the model; dropout masks come from `rng`. Matmuls run in `compute` (the
    /// weights' dtype, or bf16/f16 for mixed precision).
    pub fn build(&self, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Box<dyn Model>> {
        Ok(match self {
            ModelConfig::Mlp(c) => Box::new(mlp::Mlp::new(c, vb, rng, compute)?),
            ModelConfig::Cnn(c) => Box::new(cnn::Cnn::new(c, vb, rng, compute)?),
            ModelConfig::Gpt(c) => Box::new(gpt::Gpt::new(c, vb, rng, compute)?),
        })
    }
}

/// x · w with both operands in `compute` (mixed precision: the matmul, forward and backward,
/// runs in bf16/f16 while the weights stay f32); the result comes back in x's dtype. The casts
/// are differentiable, so the f32 weights get their gradients through them.
pub fn in_precision(x: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    if compute == x.dtype() && compute == w.dtype() {
        return x.matmul(w);
    }
    x.to_dtype(compute)?
        .matmul(&w.to_dtype(compute)?)?
        .to_dtype(x.dtype())
}

/// A validation failure: (key path, message).
pub type ConfigError = (&'static str, String);

pub(crate) fn check_dropout(p: f64, key: &'static str) -> std::result::Result<(), ConfigError> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err((key, format!("must be in [0, 1), got {p}")))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Gradient checks: every parameter's autograd gradient against central finite differences,
    //! in f64 on a tiny config.
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn check_model_grads(cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
        let model = cfg
            .build(vb, SharedRng::new(0, "dropout"), DType::F64)
            .unwrap();
        let loss_of = |m: &dyn Model| -> Tensor {
            let logits = m.forward(input, false).unwrap();
            let v = logits.dim(candle_core::D::Minus1).unwrap();
            kiln_kernels::cross_entropy(
                &logits.reshape(((), v)).unwrap(),
                &targets.flatten_all().unwrap(),
            )
            .unwrap()
        };
        let grads = loss_of(model.as_ref()).backward().unwrap();
        let mut vars: Vec<(String, Var)> = vm.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(!vars.is_empty());
        let h = 1e-6;
        for (name, var) in &vars {
            let g: Vec<f64> = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            // Probe a few coordinates of each parameter: the first, the last, and one between.
            for i in [0, flat.len() / 2, flat.len() - 1] {
                let eval = |delta: f64| -> f64 {
                    let mut p = flat.clone();
                    p[i] += delta;
                    var.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(model.as_ref()).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&orig).unwrap();
                assert!(
                    (fd - g[i]).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                );
            }
        }
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        (norm(&d) / norm(&b.to_dtype(DType::F64).unwrap())).sqrt()
    }

    /// The model with bf16 and f16 matmuls against itself in f32, on the same f32 weights:
    /// logits come back in f32 and stay close, and every weight gets a close f32 gradient.
    pub fn check_mixed_precision(cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let input = match input.dtype() {
            DType::F64 => input.to_dtype(DType::F32).unwrap(),
            _ => input.clone(),
        };
        let run = |compute: DType| {
            let model = cfg
                .build(vb.clone(), SharedRng::new(0, "d"), compute)
                .unwrap();
            let logits = model.forward(&input, false).unwrap();
            let v = logits.dim(candle_core::D::Minus1).unwrap();
            let loss = kiln_kernels::cross_entropy(
                &logits.reshape(((), v)).unwrap(),
                &targets.flatten_all().unwrap(),
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            let mut vars: Vec<(String, Var)> =
                vm.data().lock().unwrap().clone().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let g: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        grads
                            .get(v)
                            .unwrap_or_else(|| panic!("{n}: no gradient"))
                            .clone(),
                    )
                })
                .collect();
            (logits, g)
        };
        let (want, want_g) = run(DType::F32);
        for compute in [DType::BF16, DType::F16] {
            let (got, got_g) = run(compute);
            assert_eq!(got.dtype(), DType::F32);
            let e = rel_err(&got, &want);
            assert!(e < 2e-2, "{compute:?} logits: relative error {e}");
            assert!(
                e > 0.0,
                "identical logits: the matmuls did not run in {compute:?}"
            );
            for ((name, g), (_, w)) in got_g.iter().zip(&want_g) {
                assert_eq!(g.dtype(), DType::F32, "{name}");
                let e = rel_err(g, w);
                assert!(
                    e < 5e-2,
                    "{compute:?} gradient of {name}: relative error {e}"
                );
            }
        }
    }
}
