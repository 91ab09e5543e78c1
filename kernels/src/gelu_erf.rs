//! The exact GELU (HF's "gelu", BERT's and ViT's), on the CPU:
//!   y  = ½·x·(1 + erf(x/√2)),   y' = ½·(1 + erf(x/√2)) + x·φ(x),   φ(x) = e^(−x²/2)/√(2π)
//!
//! One pass each way. candle's `gelu_erf` computes the same forward, but its backward is a
//! chain of element-wise tensor ops (an erf, an exp, products and sums, each a full-size pass
//! and allocation). f64 takes libm's erf; f32 (and the 16-bit types) a vectorizable erfc fit
//! (see `NormalCdf`), checked against f64 below. Other devices take candle's op.

use crate::vexp::wide;
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

/// Φ(x) = ½·(1 + erf(x/√2)), the standard normal CDF, in the accumulation types (f32 for the
/// 16-bit types).
trait NormalCdf: Sized {
    fn cdf(self) -> Self;
}
impl NormalCdf for f64 {
    fn cdf(self) -> f64 {
        0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
}
impl NormalCdf for f32 {
    /// Φ(x) = ½·erfc(−x/√2), with erfc from the Chebyshev fit in Numerical Recipes (§6.2,
    /// relative error below 1.2e-7 in exact arithmetic): no branch and no libm call, so that
    /// the element loops vectorize, and relatively accurate in the negative tail where 1 + erf
    /// cancels (tested below).
    #[inline(always)]
    fn cdf(self) -> f32 {
        use crate::vexp::Exp;
        let z = (self * std::f32::consts::FRAC_1_SQRT_2).abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let p = 0.170_872_77_f32;
        let p = p * t - 0.822_152_23;
        let p = p * t + 1.488_515_9;
        let p = p * t - 1.135_204;
        let p = p * t + 0.278_868_07;
        let p = p * t - 0.186_288_06;
        let p = p * t + 0.096_784_18;
        let p = p * t + 0.374_091_96;
        let p = p * t + 1.000_023_7;
        let p = p * t - 1.265_512_2;
        let half_erfc = 0.5 * t * (p - z * z).vexp();
        if self < 0.0 {
            half_erfc
        } else {
            1.0 - half_erfc
        }
    }
}

/// (gelu(x), gelu'(x)), the derivative only when `grad`.
#[inline(always)]
fn gelu<A>(x: A, grad: bool) -> (A, A)
where
    A: num_traits::Float + num_traits::FromPrimitive + NormalCdf + crate::vexp::Exp,
{
    let cdf = x.cdf();
    if !grad {
        return (x * cdf, A::zero());
    }
    // φ(x) = e^(−x²/2)/√(2π)
    let pdf = (-crate::k::<A>(0.5) * x * x).vexp() * crate::k::<A>(0.398_942_280_401_432_7);
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
                wide(|| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = T::from_acc(gelu(x.acc(), false).0);
                    }
                })
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
                wide(|| {
                    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                        *dx = T::from_acc(dy.acc() * gelu(x.acc(), true).1);
                    }
                })
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

    /// The f32 CDF against f64's libm erfc: within 3e-6 relative for x ≥ −4 (the rounding of
    /// x² in the exponent dominates), and relatively close in the far negative tail too, where
    /// ½·(1 + erff) in f32 cancels to 0.
    #[test]
    fn f32_cdf_is_relatively_accurate() {
        let (mut near, mut tail) = (0f64, 0f64);
        for i in 0..=40_000 {
            let x = (-12.0 + i as f64 * 0.0005) as f32;
            // ½·erfc(−x/√2): no cancellation in the negative tail, unlike 1 + erf.
            let want = 0.5 * libm::erfc(-x as f64 * std::f64::consts::FRAC_1_SQRT_2);
            let e = ((x.cdf() as f64 - want) / want).abs();
            if x >= -4.0 {
                near = near.max(e);
            } else {
                tail = tail.max(e);
            }
        }
        assert!(
            near < 3e-6 && tail < 5e-5,
            "relative error {near:e}, tail {tail:e}"
        );
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
