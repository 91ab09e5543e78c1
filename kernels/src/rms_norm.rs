//! RMS normalization over the last dimension (Llama): y = x·rstd·w, rstd = 1/√(mean(x²) + ε).
//!
//! Forward: one pass per row, keeping rstd (N floats) for the backward. Backward, with
//! x̂ = x·rstd and g = dy·w:  dx = rstd·(g − x̂·mean(g·x̂)),  dw = Σ_rows dy·x̂.
//! Row blocks run in parallel and sum their own dw; the partials are added in order.

use crate::layer_norm::{rows_per_task, sum_rows};
use crate::{k, out, rows_cols, slice, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// RMS norm of `x` (…, C) with gain `weight` (C).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RMS_NORM.with(eps))
}

static RMS_NORM: Op<f64> = Op {
    forward: Kernel {
        name: "kiln-rms-norm",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: |args, eps| crate::cuda::rms_norm::forward(args, eps as f32),
    },
    backward: |g| {
        let rstd = &g.saved.get()[0];
        BACKWARD.run((), &[g.inputs[0], g.inputs[1], rstd, g.dy])
    },
};

static BACKWARD: Kernel<()> = Kernel {
    name: "kiln-rms-norm-backward",
    cpu: |args, ()| backward(args),
    #[cfg(feature = "cuda")]
    cuda: |args, ()| crate::cuda::rms_norm::backward(args),
};

/// x, w → y, rstd.
pub fn forward(args: &[(&CpuStorage, &Layout)], eps: f64) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "rms_norm", |T| {
        type A = <T as Elem>::Acc;
        let [x, w] = slices::<T, 2>(args)?;
        let w: Vec<_> = w.iter().map(|v| v.acc()).collect();
        let mut y = crate::zeros::<T>(n * c);
        let mut rstd = vec![Zero::zero(); n];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .zip(rstd.par_iter_mut())
            .for_each(|((y, x), rstd)| {
                let ms = x.iter().map(|v| v.acc().powi(2)).sum::<A>() / k::<A>(c as f64);
                let r = (ms + k::<A>(eps)).sqrt().recip();
                for i in 0..c {
                    y[i] = T::from_acc(x[i].acc() * r * w[i]);
                }
                *rstd = r;
            });
        Ok(vec![out(y, shape), out(rstd, n)])
    })
}

/// x, w, rstd, dy → dx, dw.
pub fn backward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "rms_norm backward", |T| {
        type A = <T as Elem>::Acc;
        let (x, w, dy) = (
            slice::<T>(args[0])?,
            slice::<T>(args[1])?,
            slice::<T>(args[3])?,
        );
        let rstd = slice::<A>(args[2])?;
        let w: Vec<A> = w.iter().map(|v| v.acc()).collect();
        let mut dx = crate::zeros::<T>(n * c);
        let rows = rows_per_task(n);
        let partials: Vec<Vec<A>> = dx
            .par_chunks_mut(rows * c)
            .enumerate()
            .map(|(task, dx)| {
                let mut dw = vec![A::zero(); c];
                let (mut xhat, mut g) = (vec![A::zero(); c], vec![A::zero(); c]);
                for (r, dx) in dx.chunks_mut(c).enumerate() {
                    let row = task * rows + r;
                    let (x, dy) = (&x[row * c..][..c], &dy[row * c..][..c]);
                    let rs = rstd[row];
                    let mut sum_gx = A::zero();
                    for i in 0..c {
                        let d = dy[i].acc();
                        xhat[i] = x[i].acc() * rs;
                        g[i] = d * w[i];
                        sum_gx += g[i] * xhat[i];
                        dw[i] += d * xhat[i];
                    }
                    let mgx = sum_gx / k::<A>(c as f64);
                    for i in 0..c {
                        dx[i] = T::from_acc(rs * (g[i] - xhat[i] * mgx));
                    }
                }
                dw
            })
            .collect();
        let dw = sum_rows(partials, c);
        Ok(vec![
            out(dx, shape),
            out(dw.into_iter().map(T::from_acc).collect(), c),
        ])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};

    #[test]
    fn gradients_match_finite_differences() {
        let (x, w) = (rand(&[3, 4, 6], 1), rand(&[6], 2));
        check_grad(&x, |x| rms_norm(x, &w, 1e-6));
        check_grad(&w, |w| rms_norm(&x, w, 1e-6));
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        // One column is ill-conditioned (y ≈ ±w, a gradient ~ε): not a parity case.
        for (n, c) in [(3, 2), (37, 75), (5, 771)] {
            let inputs = [rand(&[n, c], 4), rand(&[c], 5)];
            check_parity(
                &inputs,
                2,
                |t| rms_norm(&t[0], &t[1], 1e-6),
                |t| reference::rms_norm(&t[0], &t[1], 1e-6),
            );
        }
    }
}
