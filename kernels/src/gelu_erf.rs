//! The exact GELU (HF's "gelu", BERT's and ViT's), on the CPU:
//!   y  = ½·x·(1 + erf(x/√2)),   y' = ½·(1 + erf(x/√2)) + x·φ(x),   φ(x) = e^(−x²/2)/√(2π)
//!
//! One pass each way. candle's `gelu_erf` computes the same forward, but its backward is a
//! chain of element-wise tensor ops (an erf, an exp, products and sums, each a full-size pass
//! and allocation). erf is libm's (`erff` for f32, as candle uses). Other devices take
//! candle's op.

use crate::{out, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 8192;

/// ½·x·(1 + erf(x/√2)).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GELU_ERF.with(()))
}

static GELU_ERF: Op<()> = Op {
    forward: Kernel {
        name: "kiln-gelu-erf",
        cpu: |args, ()| forward(args),
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| BACKWARD.run((), &[g.inputs[0], g.dy]),
};

static BACKWARD: Kernel<()> = Kernel {
    name: "kiln-gelu-erf-backward",
    cpu: |args, ()| backward(args),
    #[cfg(feature = "cuda")]
    cuda: crate::op::cpu_only,
};

/// erf in the accumulation types (f32 for the 16-bit types).
trait Erf: Sized {
    fn erf(self) -> Self;
}
impl Erf for f32 {
    fn erf(self) -> f32 {
        libm::erff(self)
    }
}
impl Erf for f64 {
    fn erf(self) -> f64 {
        libm::erf(self)
    }
}

/// (gelu(x), gelu'(x)), the derivative only when `grad`.
#[inline(always)]
fn gelu<A: num_traits::Float + num_traits::FromPrimitive + Erf>(x: A, grad: bool) -> (A, A) {
    let (half, one) = (crate::k::<A>(0.5), A::one());
    let cdf = half * (one + (x * crate::k::<A>(std::f64::consts::FRAC_1_SQRT_2)).erf());
    if !grad {
        return (x * cdf, A::zero());
    }
    // 1/√(2π)
    let pdf = (-half * x * x).exp() * crate::k::<A>(0.398_942_280_401_432_7);
    (x * cdf, cdf + x * pdf)
}

/// x → y.
fn forward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    with_float!(args[0].0, "gelu_erf", |T| {
        let [x] = slices::<T, 1>(args)?;
        let mut y = crate::zeros::<T>(x.len());
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = T::from_acc(gelu(x.acc(), false).0);
                }
            });
        Ok(vec![out(y, shape)])
    })
}

/// x, dy → dx.
fn backward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    with_float!(args[0].0, "gelu_erf backward", |T| {
        let [x, dy] = slices::<T, 2>(args)?;
        let mut dx = crate::zeros::<T>(x.len());
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(dx, (x, dy))| {
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    *dx = T::from_acc(dy.acc() * gelu(x.acc(), true).1);
                }
            });
        Ok(vec![out(dx, shape)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, max_abs_diff, rand, tolerance};
    use candle_core::{DType, Var};

    #[test]
    fn gradients_match_finite_differences() {
        // rand's values span both signs; scaled so the tails of erf are in play too.
        let x = (rand(&[4, 9], 1) * 3.0).unwrap();
        check_grad(&x, gelu_erf);
    }

    /// Values and gradients against candle's `gelu_erf` in every float dtype.
    #[test]
    fn matches_candle() {
        let (x, up) = ((rand(&[5, 33], 2) * 4.0).unwrap(), rand(&[5, 33], 3));
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let v = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let up = up.to_dtype(dtype).unwrap();
            let grad = |y: &Tensor| {
                let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(v.as_tensor()).unwrap().clone()
            };
            let (ours, want) = (
                gelu_erf(v.as_tensor()).unwrap(),
                v.as_tensor().gelu_erf().unwrap(),
            );
            let tol = tolerance(dtype);
            assert!(max_abs_diff(&ours, &want) <= tol, "{dtype:?} values");
            // candle's f64 backward goes through its own erf approximation (≈ 1e-7 off; the
            // finite-difference test above holds ours to the true derivative).
            let e = max_abs_diff(&grad(&ours), &grad(&want));
            assert!(e <= (4.0 * tol).max(1e-6), "{dtype:?} gradient off by {e}");
        }
    }
}
