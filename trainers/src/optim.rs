//! Optimizers whose whole state is plain named tensors plus a step count, so a checkpoint can
//! save it and a resumed run continue exactly (candle-nn's AdamW keeps its moments private).
//!
//! State tensors are detached when stored: an update reads the parameter (a candle `Var`), so
//! candle would otherwise chain every step's moments to the previous step's graph.
//!
//! Weight decay applies to parameters of rank ≥ 2 (matrices, embeddings, conv kernels) and not
//! to biases or norm gains, as in nanoGPT and most recipes.

use candle_core::{DType, Result, Tensor, Var};
use kiln_core::recipe::{OptimConfig, OptimizerName};
use kiln_kernels::{adamw_step, AdamWHyper, AdamWTensor};
use std::collections::HashMap;

/// A trainable parameter.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

impl Param {
    pub fn decays(&self) -> bool {
        self.var.rank() >= 2
    }
}

/// What every kiln optimizer offers: a step, and its state as named tensors.
pub trait Optimizer {
    /// Applies one update; `grads[i]` belongs to `params[i]`, and is used multiplied by
    /// `grad_scale` (clipping and loss-scale unscaling, folded into the update's one pass).
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()>;
    /// Updates applied so far.
    fn steps(&self) -> u64;
    /// State tensors by name (`<param>.exp_avg`, …) for checkpoints. AdamW's are the live
    /// moments, updated in place by the next step: save them before it.
    fn state(&self) -> HashMap<String, Tensor>;
    /// Restores state written by [`Optimizer::state`] at `steps`.
    fn load_state(&mut self, state: HashMap<String, Tensor>, steps: u64) -> Result<()>;
}

pub fn build(cfg: &OptimConfig) -> Box<dyn Optimizer> {
    match cfg.name {
        OptimizerName::Adamw => Box::new(AdamW {
            beta1: cfg.betas[0],
            beta2: cfg.betas[1],
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }),
        OptimizerName::Sgd => Box::new(Sgd {
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
            t: 0,
            buf: HashMap::new(),
        }),
    }
}

/// The entries of a whole optimizer state (`<param>.<kind>`) for the parameters `rank` owns
/// under ZeRO-1 (`owners[i]` owns `params[i]`).
pub fn owned_state(
    state: HashMap<String, Tensor>,
    params: &[Param],
    owners: &[usize],
    rank: usize,
) -> HashMap<String, Tensor> {
    let mine: std::collections::HashSet<&str> = (params.iter().zip(owners))
        .filter(|(_, &o)| o == rank)
        .map(|(p, _)| p.name.as_str())
        .collect();
    state
        .into_iter()
        .filter(|(k, _)| k.rsplit_once('.').is_some_and(|(p, _)| mine.contains(p)))
        .collect()
}

/// Checks saved optimizer state against the parameters it will update: every tensor
/// `<param>.<kind>` must belong to a trainable parameter of the same shape. A checkpoint from
/// another model (or a damaged one) is refused by name instead of failing mid-step or, worse,
/// training on with moments that belong elsewhere.
pub fn check_state(state: &HashMap<String, Tensor>, params: &[Param]) -> anyhow::Result<()> {
    let shapes: HashMap<&str, &[usize]> = params
        .iter()
        .map(|p| (p.name.as_str(), p.var.dims()))
        .collect();
    let mut names: Vec<&String> = state.keys().collect();
    names.sort();
    for k in names {
        let param = k.rsplit_once('.').map_or(k.as_str(), |(p, _)| p);
        let Some(&want) = shapes.get(param) else {
            anyhow::bail!(
                "optimizer state `{k}` belongs to no trainable parameter `{param}` of this model"
            );
        };
        let got = state[k].dims();
        anyhow::ensure!(
            got == want,
            "optimizer state `{k}` has shape {got:?} but parameter `{param}` has {want:?}"
        );
    }
    Ok(())
}

/// Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's `AdamW` semantics:
/// θ ← θ·(1 − lr·λ); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// θ ← θ − lr · m̂ / (√v̂ + ε) with bias-corrected m̂, v̂.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    t: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl Optimizer for AdamW {
    /// One fused pass over all parameters (kiln_kernels::adamw_step), in place.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        for p in params {
            for moments in [&mut self.m, &mut self.v] {
                if !moments.contains_key(&p.name) {
                    let zeros = p.var.zeros_like()?.to_dtype(DType::F32)?;
                    moments.insert(p.name.clone(), zeros);
                }
            }
        }
        let grads = grads
            .iter()
            .map(|g| g.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<AdamWTensor> = params
            .iter()
            .zip(&grads)
            .map(|(p, grad)| AdamWTensor {
                param: p.var.as_tensor(),
                grad,
                m: &self.m[&p.name],
                v: &self.v[&p.name],
                weight_decay: if p.decays() {
                    self.weight_decay as f32
                } else {
                    0.0
                },
                copy: None,
            })
            .collect();
        let hyper = AdamWHyper {
            lr: lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            bias_correction1: (1.0 - self.beta1.powi(t)) as f32,
            bias_correction2: (1.0 - self.beta2.powi(t)) as f32,
            grad_scale: grad_scale as f32,
        };
        adamw_step(&tensors, &hyper)
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn state(&self) -> HashMap<String, Tensor> {
        let m = self
            .m
            .iter()
            .map(|(k, t)| (format!("{k}.exp_avg"), t.clone()));
        let v = self
            .v
            .iter()
            .map(|(k, t)| (format!("{k}.exp_avg_sq"), t.clone()));
        m.chain(v).collect()
    }

    fn load_state(&mut self, state: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        self.t = steps;
        for (k, t) in state {
            // Own copies, in f32: the fused step updates them in place.
            let t = t.to_dtype(DType::F32)?.copy()?;
            if let Some(p) = k.strip_suffix(".exp_avg") {
                self.m.insert(p.to_string(), t);
            } else if let Some(p) = k.strip_suffix(".exp_avg_sq") {
                self.v.insert(p.to_string(), t);
            } else {
                candle_core::bail!("unexpected AdamW state tensor {k}");
            }
        }
        Ok(())
    }
}

/// SGD with optional momentum and Nesterov momentum, PyTorch's `SGD` semantics (no dampening;
/// weight decay is added to the gradient).
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    t: u64,
    buf: HashMap<String, Tensor>,
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        for (p, g) in params.iter().zip(grads) {
            let theta = p.var.as_tensor();
            let mut g = g.to_dtype(DType::F32)?.detach();
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            if p.decays() && self.weight_decay > 0.0 {
                g = (g + (theta * self.weight_decay)?)?;
            }
            if self.momentum > 0.0 {
                let b = match self.buf.get(&p.name) {
                    Some(b) => ((b * self.momentum)? + &g)?,
                    None => g.clone(),
                };
                g = if self.nesterov {
                    (g + (&b * self.momentum)?)?
                } else {
                    b.clone()
                };
                self.buf.insert(p.name.clone(), b.detach());
            }
            p.var.set(&(theta - (g * lr)?)?)?;
        }
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn state(&self) -> HashMap<String, Tensor> {
        self.buf
            .iter()
            .map(|(k, t)| (format!("{k}.momentum_buffer"), t.clone()))
            .collect()
    }

    fn load_state(&mut self, state: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        self.t = steps;
        for (k, t) in state {
            let Some(p) = k.strip_suffix(".momentum_buffer") else {
                candle_core::bail!("unexpected SGD state tensor {k}");
            };
            self.buf.insert(p.to_string(), t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(name: OptimizerName) -> OptimConfig {
        OptimConfig {
            name,
            lr: 0.1,
            weight_decay: 0.1,
            betas: [0.9, 0.99],
            eps: 1e-8,
            momentum: 0.9,
            nesterov: false,
        }
    }

    fn param(values: &[f32], shape: (usize, usize)) -> Param {
        let t = Tensor::from_slice(values, shape, &Device::Cpu).unwrap();
        Param {
            name: "w".into(),
            var: Var::from_tensor(&t).unwrap(),
        }
    }

    fn values(p: &Param) -> Vec<f32> {
        p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Two AdamW steps against the update rule written out by hand in f64.
    #[test]
    fn adamw_matches_hand_computation() {
        let p = param(&[1.0, -2.0], (1, 2));
        let mut opt = build(&cfg(OptimizerName::Adamw));
        let gs = [[0.5f64, -1.0], [0.25, 2.0]];
        let (mut theta, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let gt = Tensor::from_slice(&[g[0] as f32, g[1] as f32], (1, 2), &Device::Cpu).unwrap();
            opt.step(std::slice::from_ref(&p), &[gt], 0.1, 1.0).unwrap();
            let t = t as i32 + 1;
            for i in 0..2 {
                theta[i] *= 1.0 - 0.1 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                theta[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        for (a, b) in values(&p).iter().zip(theta) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn sgd_nesterov_matches_hand_computation() {
        let mut c = cfg(OptimizerName::Sgd);
        c.nesterov = true;
        let p = param(&[1.0, 2.0], (2, 1));
        let mut opt = build(&c);
        let (mut theta, mut buf) = ([1.0f64, 2.0], [0.0f64; 2]);
        for step in 0..3 {
            let g = [0.5f64, -0.25];
            let gt = Tensor::from_slice(&[0.5f32, -0.25], (2, 1), &Device::Cpu).unwrap();
            opt.step(std::slice::from_ref(&p), &[gt], 0.1, 1.0).unwrap();
            for i in 0..2 {
                let gi = g[i] + 0.1 * theta[i];
                buf[i] = if step == 0 { gi } else { 0.9 * buf[i] + gi };
                theta[i] -= 0.1 * (gi + 0.9 * buf[i]);
            }
        }
        for (a, b) in values(&p).iter().zip(theta) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn biases_do_not_decay() {
        let t = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let bias = Param {
            name: "b".into(),
            var: Var::from_tensor(&t).unwrap(),
        };
        let mut c = cfg(OptimizerName::Sgd);
        c.momentum = 0.0;
        let mut opt = build(&c);
        let zero = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&bias), &[zero], 0.1, 1.0)
            .unwrap();
        assert_eq!(values(&bias), vec![1.0, 1.0]);
    }

    /// Saving and restoring the state mid-run gives exactly the same trajectory.
    #[test]
    fn state_round_trip_is_exact() {
        for name in [OptimizerName::Adamw, OptimizerName::Sgd] {
            let g =
                |s: f32| Tensor::from_slice(&[s, -s, 2.0 * s, 0.5], (2, 2), &Device::Cpu).unwrap();
            let a = param(&[1.0, 2.0, 3.0, 4.0], (2, 2));
            let mut oa = build(&cfg(name));
            for s in 0..3 {
                oa.step(std::slice::from_ref(&a), &[g(s as f32)], 0.05, 1.0)
                    .unwrap();
            }
            let b = param(&values(&a), (2, 2));
            let mut ob = build(&cfg(name));
            ob.load_state(oa.state(), oa.steps()).unwrap();
            for s in 3..6 {
                oa.step(std::slice::from_ref(&a), &[g(s as f32)], 0.05, 1.0)
                    .unwrap();
                ob.step(std::slice::from_ref(&b), &[g(s as f32)], 0.05, 1.0)
                    .unwrap();
            }
            assert_eq!(values(&a), values(&b));
        }
    }
}
