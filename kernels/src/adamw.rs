//! Fused AdamW: one pass over every parameter updates the moments and the weights in place
//! (PyTorch's `AdamW` semantics, decoupled weight decay):
//!
//!   g ← grad · grad_scale            (unscaling and clipping folded into one factor)
//!   m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
//!   θ ← θ·(1 − lr·λ) − lr/bc1 · m / (√(v/bc2) + ε)
//!   copy ← θ in bf16/f16              (optional: the low-precision weights a mixed-precision
//!                                       forward reads, written in the same pass)
//!
//! Weights and moments are f32; gradients may be f32, bf16 or f16. The composed version reads
//! and writes each tensor several times and allocates new ones; this reads each once and writes
//! in place. On the CPU the elements of all tensors are split across threads; on CUDA there is
//! one launch per (gradient dtype, copy dtype) group over a table of tensor pointers.

use crate::Elem;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

/// One parameter's tensors. `param`, `m` and `v` are f32 and updated in place; `grad` is read.
pub struct AdamWTensor<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// Decoupled weight decay λ for this tensor (0 for biases and norm gains).
    pub weight_decay: f32,
    /// A bf16/f16 copy of `param` to refresh in the same pass.
    pub copy: Option<&'a Tensor>,
}

/// The step's scalars, shared by all tensors.
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − β1^t and 1 − β2^t for the step t being taken.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    /// Multiplies every gradient before use (loss-scale unscaling × clipping factor).
    pub grad_scale: f32,
}

/// Applies one AdamW update to every tensor in place.
pub fn adamw_step(tensors: &[AdamWTensor], hyper: &AdamWHyper) -> Result<()> {
    for t in tensors {
        let n = t.param.elem_count();
        for (what, x) in [("grad", t.grad), ("exp_avg", t.m), ("exp_avg_sq", t.v)] {
            if x.elem_count() != n || !x.is_contiguous() {
                candle_core::bail!("adamw: {what} must be contiguous with {n} elements")
            }
        }
        if [t.param, t.m, t.v].iter().any(|x| x.dtype() != DType::F32) {
            candle_core::bail!("adamw: weights and moments must be f32");
        }
    }
    let pass = crate::profile::Pass::Update;
    crate::profile::timed("kiln-adamw", pass, || {
        match tensors.first().map(|t| t.param.device()) {
            None => Ok(()),
            #[cfg(feature = "cuda")]
            Some(candle_core::Device::Cuda(_)) => crate::cuda::adamw::step(tensors, hyper),
            Some(_) => tensors.iter().try_for_each(|t| step_cpu(t, hyper)),
        }
    })
}

/// Element-wise update of one tensor; the scalar reference the CUDA kernel mirrors.
#[inline(always)]
fn update(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, wd: f32, h: &AdamWHyper) {
    let g = g * h.grad_scale;
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
    let denom = (*v / h.bias_correction2).sqrt() + h.eps;
    *p = *p * (1.0 - h.lr * wd) - (h.lr / h.bias_correction1) * *m / denom;
}

const CHUNK: usize = 1 << 14;

fn step_cpu(t: &AdamWTensor, h: &AdamWHyper) -> Result<()> {
    let (g_storage, g_layout) = t.grad.storage_and_layout();
    let candle_core::Storage::Cpu(g_storage) = &*g_storage else {
        candle_core::bail!("adamw: gradient on another device")
    };
    let grad = (g_storage, g_layout);
    with_mut(t.m, |m| {
        with_mut(t.v, |v| {
            with_mut(t.param, |p| {
                crate::with_float!(grad.0, "adamw", |G| {
                    let g = crate::slice::<G>(grad)?;
                    p.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((p, m), v), g)| {
                            for i in 0..p.len() {
                                let gi = num_traits::ToPrimitive::to_f32(&g[i].acc()).unwrap();
                                update(&mut p[i], &mut m[i], &mut v[i], gi, t.weight_decay, h);
                            }
                        });
                });
                Ok(())
            })
        })
    })?;
    if let Some(copy) = t.copy {
        let low = t.param.to_dtype(copy.dtype())?;
        copy_into(copy, &low)?;
    }
    Ok(())
}

/// Runs `f` on the f32 elements of `t`, mutably, in place.
fn with_mut(t: &Tensor, f: impl FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
    struct Op<F>(std::cell::RefCell<F>);
    impl<F: FnMut(&mut [f32]) -> Result<()>> InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "kiln-adamw"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("adamw: non-contiguous".into()))?;
            match s {
                CpuStorage::F32(v) => (self.0.borrow_mut())(&mut v[a..b]),
                _ => candle_core::bail!("adamw: expected f32"),
            }
        }
    }
    t.inplace_op1(&Op(std::cell::RefCell::new(f)))
}

/// Overwrites `dst` with `src` (same shape and dtype) in place.
fn copy_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    let (s, l) = src.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("adamw: copy on another device")
    };
    struct Op<'a>(&'a CpuStorage, &'a Layout);
    impl InplaceOp1 for Op<'_> {
        fn name(&self) -> &'static str {
            "kiln-adamw-copy"
        }
        fn cpu_fwd(&self, d: &mut CpuStorage, l: &Layout) -> Result<()> {
            let (a, b) = l.contiguous_offsets().expect("contiguous copy target");
            let (sa, sb) = self.1.contiguous_offsets().expect("contiguous source");
            match (d, self.0) {
                (CpuStorage::BF16(d), CpuStorage::BF16(s)) => d[a..b].copy_from_slice(&s[sa..sb]),
                (CpuStorage::F16(d), CpuStorage::F16(s)) => d[a..b].copy_from_slice(&s[sa..sb]),
                (CpuStorage::F32(d), CpuStorage::F32(s)) => d[a..b].copy_from_slice(&s[sa..sb]),
                _ => candle_core::bail!("adamw: copy dtypes differ"),
            }
            Ok(())
        }
    }
    dst.inplace_op1(&Op(s, l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// Two steps of the fused update against the same formulas in f64 by hand.
    #[test]
    fn matches_scalar_formula_over_two_steps() {
        let init = [0.5f32, -1.0, 2.0, 0.25, -0.125];
        let grads = [[0.1f32, -0.2, 0.3, 0.0, 5.0], [-0.3, 0.2, 0.1, 1.0, -4.0]];
        let (p, m, v) = (t(&init), t(&[0.0; 5]), t(&[0.0; 5]));
        let bf = Tensor::zeros(5, DType::BF16, &Device::Cpu).unwrap();
        let (b1, b2, eps, lr, wd, scale) = (0.9f64, 0.95f64, 1e-8f64, 0.01f64, 0.1f64, 0.5f64);
        let mut want: Vec<(f64, f64, f64)> = init.iter().map(|&x| (x as f64, 0.0, 0.0)).collect();
        for (step, g) in grads.iter().enumerate() {
            let tt = step as i32 + 1;
            let (bc1, bc2) = (1.0 - b1.powi(tt), 1.0 - b2.powi(tt));
            let hyper = AdamWHyper {
                lr: lr as f32,
                beta1: b1 as f32,
                beta2: b2 as f32,
                eps: eps as f32,
                bias_correction1: bc1 as f32,
                bias_correction2: bc2 as f32,
                grad_scale: scale as f32,
            };
            let grad = t(g).to_dtype(DType::BF16).unwrap();
            adamw_step(
                &[AdamWTensor {
                    param: &p,
                    grad: &grad,
                    m: &m,
                    v: &v,
                    weight_decay: wd as f32,
                    copy: Some(&bf),
                }],
                &hyper,
            )
            .unwrap();
            for (w, &gi) in want.iter_mut().zip(g) {
                let gi = half::bf16::from_f32(gi).to_f64() * scale;
                w.1 = b1 * w.1 + (1.0 - b1) * gi;
                w.2 = b2 * w.2 + (1.0 - b2) * gi * gi;
                w.0 = w.0 * (1.0 - lr * wd) - lr / bc1 * w.1 / ((w.2 / bc2).sqrt() + eps);
            }
        }
        let got = p.to_vec1::<f32>().unwrap();
        let got_m = m.to_vec1::<f32>().unwrap();
        let got_bf = bf.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..5 {
            assert!(
                (got[i] as f64 - want[i].0).abs() < 1e-6,
                "{i}: {} vs {:?}",
                got[i],
                want[i]
            );
            assert!((got_m[i] as f64 - want[i].1).abs() < 1e-6);
            assert_eq!(got_bf[i], half::bf16::from_f32(got[i]).to_f32());
        }
    }

    /// The fused step against the composed one (`reference::adamw_step`) on a tensor whose
    /// size is not a multiple of the chunk, with a gradient factor and weight decay.
    #[test]
    fn matches_the_composition() {
        let n = 3 * CHUNK + 17;
        let (p0, g) = (
            crate::testing::rand(&[n], 1).to_dtype(DType::F32).unwrap(),
            crate::testing::rand(&[n], 2).to_dtype(DType::F32).unwrap(),
        );
        let (p, m, v) = (
            p0.copy().unwrap(),
            p0.zeros_like().unwrap(),
            p0.zeros_like().unwrap(),
        );
        let (mut rp, mut rm, mut rv) = (
            p0.clone(),
            p0.zeros_like().unwrap(),
            p0.zeros_like().unwrap(),
        );
        for t in 1..=3 {
            let h = AdamWHyper {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                bias_correction1: 1.0 - 0.9f32.powi(t),
                bias_correction2: 1.0 - 0.95f32.powi(t),
                grad_scale: 0.25,
            };
            let ts = [AdamWTensor {
                param: &p,
                grad: &g,
                m: &m,
                v: &v,
                weight_decay: 0.1,
                copy: None,
            }];
            adamw_step(&ts, &h).unwrap();
            (rp, rm, rv) = crate::reference::adamw_step(&rp, &g, &rm, &rv, 0.1, &h).unwrap();
        }
        for (a, b) in [(&p, &rp), (&m, &rm), (&v, &rv)] {
            let e = crate::testing::rel_err(a, b);
            assert!(e < 1e-6, "relative error {e}");
        }
    }

    #[test]
    fn refuses_mismatched_tensors() {
        let (p, m, v, g) = (t(&[1.0; 3]), t(&[0.0; 3]), t(&[0.0; 2]), t(&[1.0; 3]));
        let hyper = AdamWHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            bias_correction1: 0.1,
            bias_correction2: 0.01,
            grad_scale: 1.0,
        };
        let err = adamw_step(
            &[AdamWTensor {
                param: &p,
                grad: &g,
                m: &m,
                v: &v,
                weight_decay: 0.0,
                copy: None,
            }],
            &hyper,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exp_avg_sq"), "{err}");
    }
}
