//! GELU, tanh approximation (GPT-2's `gelu_new`):
//!   y  = ½·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
//!   y' = ½·(1 + tanh(u)) + ½·x·(1 − tanh²(u))·√(2/π)·(1 + 3·0.044715·x²)
//!
//! On the CPU, forward and backward are each one parallel pass over the elements (candle's own
//! `gelu` backward is a chain of a dozen tensor ops), with tanh computed as 1 − 2/(1 + e^{2u}):
//! one `exp` instead of libm's `tanh`, three times faster and exact to a few ulps of f32. Other devices and dtypes use candle's
//! `gelu`, which computes the same function and has a backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const K: f64 = 0.044715;
const CHUNK: usize = 4096;

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (candle_core::Device::Cpu, DType::F32 | DType::F64) => x.contiguous()?.apply_op1(GeluTanh),
        _ => x.gelu(),
    }
}

/// Scalar reference: value and derivative.
pub fn gelu_ref(x: f64) -> (f64, f64) {
    let t = (C * (x + K * x * x * x)).tanh();
    let y = 0.5 * x * (1.0 + t);
    let dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * K * x * x);
    (y, dy)
}

macro_rules! fast_tanh {
    ($u:expr) => {
        1.0 - 2.0 / (1.0 + (2.0 * $u).exp())
    };
}

macro_rules! gelu_kernels {
    ($fwd:ident, $bwd:ident, $t:ty) => {
        fn $fwd(x: &[$t]) -> Vec<$t> {
            let (c, k) = (C as $t, K as $t);
            let mut y = vec![0 as $t; x.len()];
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = 0.5 * x * (1.0 + fast_tanh!(c * (x + k * x * x * x)));
                    }
                });
            y
        }

        fn $bwd(x: &[$t], g: &[$t]) -> Vec<$t> {
            let (c, k) = (C as $t, K as $t);
            let mut dx = vec![0 as $t; x.len()];
            dx.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(dx, (x, g))| {
                    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                        let t = fast_tanh!(c * (x + k * x * x * x));
                        let d =
                            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * k * x * x);
                        *dx = g * d;
                    }
                });
            dx
        }
    };
}
gelu_kernels!(fwd_f32, bwd_f32, f32);
gelu_kernels!(fwd_f64, bwd_f64, f64);

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("kiln gelu expects a contiguous tensor"),
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "kiln-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(fwd_f32(contiguous(v, l)?)),
            CpuStorage::F64(v) => CpuStorage::F64(fwd_f64(contiguous(v, l)?)),
            _ => candle_core::bail!("kiln gelu: only f32 and f64 on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluTanhBackward,
        )?))
    }
}

/// (x, dy) → dx. Never differentiated itself.
struct GeluTanhBackward;

impl CustomOp2 for GeluTanhBackward {
    fn name(&self) -> &'static str {
        "kiln-gelu-tanh-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(bwd_f32(contiguous(x, l1)?, contiguous(g, l2)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(bwd_f64(contiguous(x, l1)?, contiguous(g, l2)?))
            }
            _ => candle_core::bail!("kiln gelu backward: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
        let x = (rand(&[3, 11], 7) * 4.0).unwrap();
        let got: Vec<f64> = gelu(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for (v, g) in xs.iter().zip(got) {
            assert!((gelu_ref(*v).0 - g).abs() < 1e-12, "{v}");
        }
        check_grad(&x, gelu);
        // A non-contiguous input (a transpose) is handled.
        check_grad(&rand(&[4, 5], 8), |x| gelu(&x.t()?));
    }

    #[test]
    fn f32_matches_candle_gelu() {
        let x = (rand(&[2, 5000], 9) * 5.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let ours = gelu(&x).unwrap();
        let candle = x.gelu().unwrap();
        let diff: f32 = (ours - candle)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
