//! The checks every model's tests share, on a tiny config: autograd gradients against central
//! finite differences (f64), bf16/f16 matmuls against f32, activation checkpointing against
//! stored activations, and cached decoding against the full forward.
use super::*;
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;
pub use kiln_kernels::compare::{max_abs_diff, rel_err};
use std::collections::HashMap;

/// What the gradient checks expect beyond the defaults.
pub struct GradCheck<'a> {
    /// The forward runs in training mode (batch statistics; the config's dropout must be 0,
    /// or the finite differences see new masks).
    pub train: bool,
    /// Largest relative error of a bf16/f16 gradient against f32's.
    pub grad_tol: f64,
    /// f16's loss scale, as the trainer's (trainers/src/amp.rs): tiny gradients would
    /// otherwise flush to f16 subnormals.
    pub f16_loss_scale: f64,
    /// Parameters the loss does not reach: they must get no gradient.
    pub unused: &'a dyn Fn(&str) -> bool,
    /// Parameters whose true gradient is 0, each with a parameter of the same layer whose
    /// gradient norm scales their bf16/f16 error (BERT's key biases: a bias on every key
    /// shifts all of a query's scores alike, which the softmax ignores, so what the backward
    /// computes is rounding noise).
    pub zero_gradient: &'a dyn Fn(&str) -> Option<String>,
}

impl Default for GradCheck<'_> {
    fn default() -> Self {
        GradCheck {
            train: false,
            grad_tol: 5e-2,
            f16_loss_scale: 1.0,
            unused: &|_| false,
            zero_gradient: &|_| None,
        }
    }
}

/// Cross-entropy over the output's last dimension against `targets`.
fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.dim(candle_core::D::Minus1).unwrap();
    kiln_kernels::cross_entropy(
        &logits.reshape(((), v)).unwrap(),
        &targets.flatten_all().unwrap(),
    )
    .unwrap()
}

/// Fresh parameters drawn from `seed`, in `dtype`, on the CPU.
fn weights(seed: u64, dtype: DType) -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, seed, dtype, &Device::Cpu);
    (vm, vb)
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = vm.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Both gradient checks with their defaults: finite differences and bf16/f16 against f32.
pub fn check_gradients(cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
    let check = GradCheck::default();
    check.finite_differences(cfg, input, targets);
    check.mixed_precision(cfg, input, targets);
}

impl GradCheck<'_> {
    /// Every trained parameter's autograd gradient against central finite differences at three
    /// coordinates. Buffers (BatchNorm's running statistics) and frozen weights are not trained:
    /// they must get no gradient. A model with buffers is evaluated after one training forward,
    /// so that its running statistics are not the trivial initial ones.
    pub fn finite_differences(&self, cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        let train = self.train;
        let (vm, vb) = weights(3, DType::F64);
        let model = cfg
            .build(vb, SharedRng::new(0, "dropout"), DType::F64)
            .unwrap();
        let has_buffers = vm.data().lock().unwrap().keys().any(|n| cfg.is_buffer(n));
        if !train && has_buffers {
            model.forward(input, true).unwrap();
        }
        let loss_of = |m: &dyn Model| loss(&m.forward(input, train).unwrap(), targets);
        let grads = loss_of(model.as_ref()).backward().unwrap();
        let mut vars = sorted_vars(&vm);
        // Buffers, frozen weights (LoRA's base) and what the loss does not reach get no
        // gradient: not even computed.
        for (name, var) in &vars {
            if !cfg.trainable(name) || (self.unused)(name) {
                assert!(grads.get(var).is_none(), "{name} has a gradient");
            }
        }
        vars.retain(|(name, _)| cfg.trainable(name) && !(self.unused)(name));
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
            if (self.zero_gradient)(name).is_some() {
                assert!(g.iter().all(|g| g.abs() < 1e-12), "{name}: {g:?}");
            }
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

    /// The model with bf16 and f16 matmuls against itself in f32, on the same f32 weights.
    /// Buffers and unused parameters are skipped (a model with buffers is evaluated after one
    /// f32 training forward).
    pub fn mixed_precision(&self, cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        let train = self.train;
        let (vm, vb) = weights(3, DType::F32);
        let input = match input.dtype() {
            DType::F64 => input.to_dtype(DType::F32).unwrap(),
            _ => input.clone(),
        };
        let run = |compute: DType| {
            let model = cfg
                .build(vb.clone(), SharedRng::new(0, "d"), compute)
                .unwrap();
            let logits = model.forward(&input, train).unwrap();
            let scale = match compute {
                DType::F16 => self.f16_loss_scale,
                _ => 1.0,
            };
            let grads = (loss(&logits, targets) * scale)
                .unwrap()
                .backward()
                .unwrap();
            let mut vars = sorted_vars(&vm);
            vars.retain(|(n, _)| !cfg.is_buffer(n) && !(self.unused)(n));
            let g: HashMap<String, Tensor> = vars
                .iter()
                .map(|(n, v)| {
                    let g = grads.get(v).unwrap_or_else(|| panic!("{n}: no gradient"));
                    (n.clone(), (g / scale).unwrap())
                })
                .collect();
            (logits, g)
        };
        let f32_model = cfg
            .build(vb.clone(), SharedRng::new(0, "d"), DType::F32)
            .unwrap();
        if !train && vm.data().lock().unwrap().keys().any(|n| cfg.is_buffer(n)) {
            f32_model.forward(&input, true).unwrap();
        }
        let (want, want_g) = run(DType::F32);
        let norm = |t: &Tensor| {
            let t = t.to_dtype(DType::F64).unwrap();
            let sq = t.sqr().unwrap().sum_all().unwrap();
            sq.to_scalar::<f64>().unwrap().sqrt()
        };
        for compute in [DType::BF16, DType::F16] {
            let (got, got_g) = run(compute);
            assert_eq!(got.dtype(), DType::F32);
            let e = rel_err(&got, &want);
            assert!(e < 2e-2, "{compute:?} logits: relative error {e}");
            assert!(
                e > 0.0,
                "identical logits: the matmuls did not run in {compute:?}"
            );
            assert_eq!(got_g.len(), want_g.len());
            for (name, g) in &got_g {
                let w = &want_g[name];
                assert_eq!(g.dtype(), DType::F32, "{name}");
                let e = match (self.zero_gradient)(name) {
                    Some(scale_by) => norm(&(g - w).unwrap()) / norm(&want_g[&scale_by]),
                    None => rel_err(g, w),
                };
                assert!(
                    e < self.grad_tol,
                    "{compute:?} gradient of {name}: relative error {e}"
                );
            }
        }
    }
}

/// Logits of a 7-token sequence from `forward` against `forward_cached`, both on all 7
/// tokens at once and as a 3-token prefill then 4 single tokens; and a step past the
/// context errors, leaving the cache usable. `cfg`'s context must be 7.
pub fn check_cached_decoding(cfg: &ModelConfig) {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
        let (_, vb) = weights(3, dtype);
        let model = cfg.build(vb, SharedRng::new(0, "d"), dtype).unwrap();
        let dec = model.as_decoder().expect("a decoder");
        assert_eq!(dec.context(), 7);
        let ids = Tensor::new(&[[1u32, 5, 2, 0, 6, 3, 3]], &Device::Cpu).unwrap();
        let want = model.forward(&ids, false).unwrap();
        assert_eq!(want.dtype(), dtype);

        let mut cache = dec.new_cache();
        assert!(cache.is_empty());
        let all = dec.forward_cached(&ids, &mut cache).unwrap();
        assert_eq!(cache.len(), 7);
        let e = rel_err(&all, &want);
        assert!(e <= tol, "{dtype:?} one cached call: relative error {e:e}");
        let err = dec
            .forward_cached(&ids.narrow(1, 0, 1).unwrap(), &mut cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("context"), "{err}");
        assert_eq!(cache.len(), 7);

        let mut cache = dec.new_cache();
        let mut parts = vec![dec
            .forward_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache)
            .unwrap()];
        assert_eq!(cache.len(), 3);
        // Too many tokens for what is left: an error, and the cache is untouched.
        assert!(dec
            .forward_cached(&ids.narrow(1, 0, 5).unwrap(), &mut cache)
            .is_err());
        assert_eq!(cache.len(), 3);
        for i in 3..7 {
            parts.push(
                dec.forward_cached(&ids.narrow(1, i, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 7);
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let e = rel_err(&stepped, &want);
        assert!(e <= tol, "{dtype:?} prefill + steps: relative error {e:e}");
    }
}

/// Recomputing the layers in the backward (with dropout on, so the recomputation must
/// replay the same masks) gives the stored-activation run's logits and gradients, and leaves
/// the dropout generator where that run leaves it. `plain` has dropout and stores its
/// activations; the same config with `checkpoint_activations = true` is the other run.
pub fn check_checkpointing(plain: &ModelConfig, input: &Tensor, targets: &Tensor) {
    let mut table = plain.to_table();
    table.insert("checkpoint_activations".into(), true.into());
    let checkpointed: ModelConfig = toml::Value::Table(table).try_into().unwrap();
    assert_ne!(&checkpointed, plain);
    let grads = |cfg: &ModelConfig| {
        let (vm, vb) = weights(0, DType::F64);
        let rng = SharedRng::new(5, "dropout");
        let m = cfg.build(vb, rng.clone(), DType::F64).unwrap();
        let logits = m.forward(input, true).unwrap();
        let g = kiln_kernels::backward(&loss(&logits, targets)).unwrap();
        let named: Vec<(String, Vec<f64>)> = (sorted_vars(&vm).into_iter())
            .map(|(n, v)| {
                let g = g.get(&v).unwrap_or_else(|| panic!("{n} has no gradient"));
                (n, g.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        let position = rng.position();
        let eval = m.forward(input, false).unwrap();
        (named, position, logits, eval)
    };
    let (plain, plain_rng, plain_logits, eval) = grads(plain);
    let (ckpt, ckpt_rng, ckpt_logits, _) = grads(&checkpointed);
    // Dropout did something: the training forward differs from the inference one.
    assert!(max_abs_diff(&plain_logits, &eval) > 1e-6);
    assert_eq!(
        plain_rng, ckpt_rng,
        "the recomputation must leave the generator as it was"
    );
    assert_eq!(max_abs_diff(&plain_logits, &ckpt_logits), 0.0);
    assert_eq!(plain.len(), ckpt.len());
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        let diff = (a.iter().zip(b))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-12, "{name}: gradients differ by {diff}");
    }
}

/// The resolved config's table (what a run's `recipe.toml` holds) names its kind and decodes
/// back to the same config; returns the model built from it, in f32.
pub fn check_table_round_trip(cfg: &ModelConfig) -> Box<dyn Model> {
    let table = cfg.to_table();
    assert_eq!(table.get("kind").and_then(|k| k.as_str()), Some(cfg.kind()));
    let back: ModelConfig = toml::Value::Table(table).try_into().unwrap();
    assert_eq!(&back, cfg);
    let (_, vb) = weights(0, DType::F32);
    cfg.build(vb, SharedRng::new(0, "d"), DType::F32).unwrap()
}

/// Changing the last of 4 tokens changes the logits at that position only.
pub fn check_causal(model: &dyn Model) {
    let logits = |ids: [u32; 4]| {
        let ids = Tensor::new(&[ids], &Device::Cpu).unwrap();
        model.forward(&ids, false).unwrap()
    };
    let diff = (logits([1, 2, 3, 4]) - logits([1, 2, 3, 6])).unwrap();
    let per_position = diff.abs().unwrap().sum((0, 2)).unwrap();
    let diff: Vec<f64> = per_position
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(&diff[..3], &[0.0, 0.0, 0.0]);
    assert!(diff[3] > 0.0);
}

/// The shipped recipe `recipes/<name>.toml` with its `[model]` section replaced by `model`:
/// its path and text.
pub fn recipe_with_model(name: &str, model: &str) -> (std::path::PathBuf, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../recipes")
        .join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("[model]").unwrap();
    let end = text.find("[data]").unwrap();
    let text = format!("{}{model}\n{}", &text[..start], &text[end..]);
    (path, text)
}
