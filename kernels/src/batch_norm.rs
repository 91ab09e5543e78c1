//! Batch normalization in training mode over (N, C, H, W): each channel c is normalized with
//! the mean μ_c and biased variance σ²_c of its M = N·H·W values,
//!   y = (x − μ)·rstd·w + b,  rstd = 1/√(σ² + ε).
//! Backward, with x̂ = (x − μ)·rstd:
//!   db = Σ dy,  dw = Σ dy·x̂,  dx = w·rstd·(dy − db/M − x̂·dw/M).
//!
//! The composition ([`batch_norm_train_composed`], the reference and the path on other devices)
//! reduces over three of four dimensions, which candle runs as strided reductions, twice in the
//! forward and again in the backward of each broadcast: the bulk of a CPU ResNet step after the
//! convolutions. Here the statistics are one pass per channel and y, dx one pass per plane.
//! Each channel's sums run in a fixed order, so results do not depend on scheduling.

use crate::{k, out, slice, slices, sum_by, sum_pairs_by, with_float, Elem, Kernel, Op, Saved};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;
use std::sync::Arc;

/// Normalizes `x` (N, C, H, W) with its batch statistics, gain `weight` and shift `bias` (C),
/// then, with `relu`, applies max(0, ·) in the same op (a ResNet's conv → BN → ReLU: one graph
/// node and one pass fewer each way). Returns y (x's dtype) and the batch mean and biased
/// variance (C) in f32 (f64 for f64), for the running statistics; these two carry no gradient.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, _, h, w) = x.dims4()?;
    if n * h * w < 2 {
        // As PyTorch: one value per channel has no variance to normalize with.
        candle_core::bail!("BatchNorm2d: training needs more than 1 value per channel");
    }
    if !x.device().is_cpu() {
        let (y, mean, var) = batch_norm_train_composed(x, weight, bias, eps)?;
        let y = if relu { crate::relu(&y)? } else { y };
        return Ok((y, mean, var));
    }
    let saved = Arc::new(Saved::default());
    let op = BATCH_NORM.sharing((eps, relu), saved.clone());
    let dtype = x.dtype();
    let y = x.contiguous()?.apply_op3(
        &weight.to_dtype(dtype)?.contiguous()?,
        &bias.to_dtype(dtype)?.contiguous()?,
        op,
    )?;
    let stats = saved.get();
    Ok((y, stats[0].clone(), stats[2].clone()))
}

/// [`batch_norm_train`] from candle ops, in f32 (f64 for f64).
pub fn batch_norm_train_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    let m = (n * h * w) as f64;
    let acc = crate::stats_dtype(x.dtype());
    let xa = x.to_dtype(acc)?;
    let per_channel = |t: &Tensor| t.to_dtype(acc)?.reshape((1, c, 1, 1));
    let mean = (xa.sum_keepdim((0, 2, 3))? / m)?;
    let centered = xa.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim((0, 2, 3))? / m)?;
    let scale = per_channel(weight)?.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = centered
        .broadcast_mul(&scale)?
        .broadcast_add(&per_channel(bias)?)?
        .to_dtype(x.dtype())?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// Parameter (ε, ReLU after); keeps mean, rstd and var (C), in the accumulation dtype.
static BATCH_NORM: Op<(f64, bool)> = Op {
    forward: Kernel {
        name: "kiln-batch-norm",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| {
        let saved = g.saved.get();
        let (x, w) = (g.inputs[0], g.inputs[1]);
        BACKWARD.run(g.param.1, &[x, w, &saved[0], &saved[1], g.dy, g.y])
    },
};

/// Parameter: whether the forward applied ReLU (y then masks dy).
static BACKWARD: Kernel<bool> = Kernel {
    name: "kiln-batch-norm-backward",
    cpu: backward,
    #[cfg(feature = "cuda")]
    cuda: crate::op::cpu_only,
};

/// Channel `c`'s H·W planes of `x` (N, C, H·W), one per image.
fn planes<T>(x: &[T], c: usize, channels: usize, hw: usize) -> impl Iterator<Item = &[T]> {
    x.chunks(hw).skip(c).step_by(channels)
}

/// x, w, b → y, mean, rstd, var.
fn forward(
    args: &[(&CpuStorage, &Layout)],
    (eps, relu): (f64, bool),
) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c, h, w) = shape.dims4()?;
    let hw = h * w;
    with_float!(args[0].0, "batch_norm", |T| {
        type A = <T as Elem>::Acc;
        let [x, wt, b] = slices::<T, 3>(args)?;
        let m = k::<A>((n * hw) as f64);
        let stats: Vec<(A, A)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let total = |s: A, v: A| s + v;
                let planes = || planes(x, ch, c, hw);
                let mean = planes()
                    .map(|p| sum_by(p, |v| v.acc()))
                    .fold(A::zero(), total)
                    / m;
                let var = planes()
                    .map(|p| sum_by(p, |v| (v.acc() - mean).powi(2)))
                    .fold(A::zero(), total);
                (mean, var / m)
            })
            .collect();
        let mean: Vec<A> = stats.iter().map(|s| s.0).collect();
        let var: Vec<A> = stats.iter().map(|s| s.1).collect();
        let rstd: Vec<A> = var
            .iter()
            .map(|v| (*v + k::<A>(eps)).sqrt().recip())
            .collect();
        let mut y = crate::zeros::<T>(x.len());
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let ch = i % c;
                let scale = rstd[ch] * wt[ch].acc();
                let shift = b[ch].acc() - mean[ch] * scale;
                let zero = T::from_acc(A::zero());
                for (y, x) in y.iter_mut().zip(x) {
                    let v = T::from_acc(x.acc() * scale + shift);
                    // As `relu` does on BN's output: 0 unless positive.
                    *y = if !relu || v > zero { v } else { zero };
                }
            });
        Ok(vec![out(y, shape), out(mean, c), out(rstd, c), out(var, c)])
    })
}

/// x, w, mean, rstd, dy, y → dx, dw, db; with `relu`, dy counts only where y > 0.
fn backward(args: &[(&CpuStorage, &Layout)], relu: bool) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c, h, w) = shape.dims4()?;
    let hw = h * w;
    with_float!(args[0].0, "batch_norm backward", |T| {
        type A = <T as Elem>::Acc;
        let [x, wt] = slices::<T, 2>(args)?;
        let (mean, rstd) = (slice::<A>(args[2])?, slice::<A>(args[3])?);
        let (dy, y) = (slice::<T>(args[4])?, slice::<T>(args[5])?);
        // The gradient reaching the normalization: dy, masked by the ReLU after it.
        let masked: Vec<T>;
        let dy = if relu {
            let zero = T::from_acc(A::zero());
            masked = (dy.par_iter().zip(y.par_iter()))
                .map(|(&dy, &y)| if y > zero { dy } else { zero })
                .collect();
            &masked[..]
        } else {
            dy
        };
        let m = k::<A>((n * hw) as f64);
        // Per channel: (Σ dy, Σ dy·x̂).
        let sums: Vec<(A, A)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mu = mean[ch];
                let (s, sx) = planes(x, ch, c, hw).zip(planes(dy, ch, c, hw)).fold(
                    (A::zero(), A::zero()),
                    |(s, sx), (x, dy)| {
                        let (a, b) = sum_pairs_by(x, dy, |x, dy| {
                            let g = dy.acc();
                            (g, g * (x.acc() - mu))
                        });
                        (s + a, sx + b)
                    },
                );
                (s, sx * rstd[ch])
            })
            .collect();
        let mut dx = crate::zeros::<T>(x.len());
        dx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw).zip(dy.par_chunks(hw)))
            .enumerate()
            .for_each(|(i, (dx, (x, dy)))| {
                let ch = i % c;
                let (mu, r) = (mean[ch], rstd[ch]);
                let (db, dw) = (sums[ch].0 / m, sums[ch].1 / m);
                let scale = wt[ch].acc() * r;
                for ((dx, x), dy) in dx.iter_mut().zip(x).zip(dy) {
                    let xhat = (x.acc() - mu) * r;
                    *dx = T::from_acc(scale * (dy.acc() - db - xhat * dw));
                }
            });
        let dw: Vec<T> = sums.iter().map(|s| T::from_acc(s.1)).collect();
        let db: Vec<T> = sums.iter().map(|s| T::from_acc(s.0)).collect();
        Ok(vec![out(dx, shape), out(dw, c), out(db, c)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, max_abs_diff, rand, tolerance};
    use candle_core::{DType, Var};

    /// Values, statistics and all three gradients against the composition, in every float
    /// dtype, on channels with different means and spreads.
    #[test]
    fn matches_the_composition() {
        let shift = Tensor::new(&[0.0f64, 3.0, -2.0], &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        let x = rand(&[4, 3, 5, 3], 1)
            .broadcast_add(&shift)
            .unwrap()
            .broadcast_mul(&(shift.abs().unwrap() + 0.5).unwrap())
            .unwrap();
        let (w, b, up) = (rand(&[3], 2), rand(&[3], 3), rand(&[4, 3, 5, 3], 4));
        for (dtype, relu) in [DType::F64, DType::F32, DType::BF16]
            .into_iter()
            .flat_map(|d| [(d, false), (d, true)])
        {
            let vars: Vec<Var> = [&x, &w, &b]
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let (xv, wv, bv) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let fused = batch_norm_train(xv, wv, bv, 1e-5, relu).unwrap();
            let mut composed = batch_norm_train_composed(xv, wv, bv, 1e-5).unwrap();
            if relu {
                composed.0 = crate::relu(&composed.0).unwrap();
            }
            let tol = tolerance(dtype);
            for (what, a, b) in [
                ("y", &fused.0, &composed.0),
                ("mean", &fused.1, &composed.1),
                ("var", &fused.2, &composed.2),
            ] {
                assert_eq!(a.dtype(), b.dtype(), "{what} {dtype:?}");
                let e = max_abs_diff(a, b);
                assert!(e < tol * 10.0, "{what} {dtype:?} relu {relu}: {e}");
            }
            let grads = |y: &Tensor| {
                let up = up.to_dtype(dtype).unwrap();
                let g = (y * up).unwrap().sum_all().unwrap().backward().unwrap();
                vars.iter()
                    .map(|v| g.get(v.as_tensor()).unwrap().clone())
                    .collect::<Vec<_>>()
            };
            for (i, (a, b)) in grads(&fused.0).iter().zip(grads(&composed.0)).enumerate() {
                let e = max_abs_diff(a, &b);
                assert!(e < tol * 50.0, "gradient {i} {dtype:?} relu {relu}: {e}");
            }
            if relu {
                // The fused ReLU is kiln's `relu` after the op, to the bit, gradients too.
                let apart = crate::relu(&batch_norm_train(xv, wv, bv, 1e-5, false).unwrap().0);
                let apart = apart.unwrap();
                assert_eq!(max_abs_diff(&fused.0, &apart), 0.0, "{dtype:?}");
                for (a, b) in grads(&fused.0).iter().zip(grads(&apart)) {
                    assert_eq!(max_abs_diff(a, &b), 0.0, "{dtype:?} gradient");
                }
                // Some outputs were negative before the ReLU: the mask is exercised.
                assert!(
                    fused
                        .0
                        .min_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                        == 0.0
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = rand(&[3, 2, 2, 3], 5);
        let (w, b) = (rand(&[2], 6), rand(&[2], 7));
        let y = |x: &Tensor, w: &Tensor, b: &Tensor| Ok(batch_norm_train(x, w, b, 1e-5, false)?.0);
        check_grad(&x, |x| y(x, &w, &b));
        check_grad(&w, |w| y(&x, w, &b));
        check_grad(&b, |b| y(&x, &w, b));
    }

    #[test]
    fn one_value_per_channel_is_an_error() {
        let x = rand(&[1, 2, 1, 1], 8);
        let (w, b) = (rand(&[2], 9), rand(&[2], 10));
        let e = batch_norm_train(&x, &w, &b, 1e-5, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1 value"), "{e}");
    }
}
