//! Layer normalization over the last dimension: y = (x − μ)·rstd·w + b, rstd = 1/√(σ² + ε).
//!
//! Forward: one pass per row computes μ and σ² (in f32, or f64 for f64; the row sums in
//! eight lanes, so that they vectorize), writes y and keeps μ and rstd for the backward: N
//! floats each, instead of the composition's normalized copy of x.
//! Backward, with x̂ = (x − μ)·rstd and g = dy·w:
//!   dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),  dw = Σ_rows dy·x̂,  db = Σ_rows dy.
//! Rows are split across threads; each block of rows sums its own dw/db, then the partial sums
//! are added, so the result does not depend on scheduling.

use crate::{k, out, rows_cols, slice, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

/// Layer norm of `x` (…, C) with gain `weight` (C) and optional `bias` (C).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = weight.zeros_like()?.detach();
            &zeros
        }
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LAYER_NORM.with(eps),
    )
}

static LAYER_NORM: Op<f64> = Op {
    forward: Kernel {
        name: "kiln-layer-norm",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: |args, eps| crate::cuda::layer_norm::forward(args, eps as f32),
    },
    backward: |g| {
        let saved = g.saved.get();
        let (x, w) = (g.inputs[0], g.inputs[1]);
        BACKWARD.run((), &[x, w, &saved[0], &saved[1], g.dy])
    },
};

static BACKWARD: Kernel<()> = Kernel {
    name: "kiln-layer-norm-backward",
    cpu: |args, ()| backward(args),
    #[cfg(feature = "cuda")]
    cuda: |args, ()| crate::cuda::layer_norm::backward(args),
};

/// x, w, b → y, mean, rstd.
pub fn forward(args: &[(&CpuStorage, &Layout)], eps: f64) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "layer_norm", |T| {
        type A = <T as Elem>::Acc;
        let [x, w, b] = slices::<T, 3>(args)?;
        let w: Vec<_> = w.iter().map(|v| v.acc()).collect();
        let b: Vec<_> = b.iter().map(|v| v.acc()).collect();
        let mut y = crate::zeros::<T>(n * c);
        let mut mean = vec![Zero::zero(); n];
        let mut rstd = vec![Zero::zero(); n];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(|((y, x), (mean, rstd))| {
                crate::vexp::wide(|| {
                    let m = crate::sum_by(x, |v| v.acc()) / k::<A>(c as f64);
                    let var = crate::sum_by(x, |v| (v.acc() - m).powi(2)) / k::<A>(c as f64);
                    let r = (var + k::<A>(eps)).sqrt().recip();
                    for i in 0..c {
                        y[i] = T::from_acc((x[i].acc() - m) * r * w[i] + b[i]);
                    }
                    (*mean, *rstd) = (m, r);
                })
            });
        Ok(vec![out(y, shape), out(mean, n), out(rstd, n)])
    })
}

/// x, w, mean, rstd, dy → dx, dw, db.
pub fn backward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "layer_norm backward", |T| {
        type A = <T as Elem>::Acc;
        let (x, w, dy) = (
            slice::<T>(args[0])?,
            slice::<T>(args[1])?,
            slice::<T>(args[4])?,
        );
        let (mean, rstd) = (slice::<A>(args[2])?, slice::<A>(args[3])?);
        let w: Vec<A> = w.iter().map(|v| v.acc()).collect();
        let mut dx = crate::zeros::<T>(n * c);
        let rows = rows_per_task(n);
        let partials: Vec<(Vec<A>, Vec<A>)> = dx
            .par_chunks_mut(rows * c)
            .enumerate()
            .map(|(task, dx)| {
                let (mut dw, mut db) = (vec![A::zero(); c], vec![A::zero(); c]);
                let mut xhat = vec![A::zero(); c];
                let mut g = vec![A::zero(); c];
                for (r, dx) in dx.chunks_mut(c).enumerate() {
                    let row = task * rows + r;
                    let (x, dy) = (&x[row * c..][..c], &dy[row * c..][..c]);
                    let (m, rs) = (mean[row], rstd[row]);
                    let (mut sum_g, mut sum_gx) = (A::zero(), A::zero());
                    for i in 0..c {
                        let d = dy[i].acc();
                        xhat[i] = (x[i].acc() - m) * rs;
                        g[i] = d * w[i];
                        sum_g += g[i];
                        sum_gx += g[i] * xhat[i];
                        dw[i] += d * xhat[i];
                        db[i] += d;
                    }
                    let (mg, mgx) = (sum_g / k::<A>(c as f64), sum_gx / k::<A>(c as f64));
                    for i in 0..c {
                        dx[i] = T::from_acc(rs * (g[i] - mg - xhat[i] * mgx));
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = sum_partials(partials, c);
        Ok(vec![
            out(dx, shape),
            out(dw.into_iter().map(T::from_acc).collect(), c),
            out(db.into_iter().map(T::from_acc).collect(), c),
        ])
    })
}

/// Rows per parallel task: a few tasks per thread, for balance without tiny tasks.
pub(crate) fn rows_per_task(n: usize) -> usize {
    n.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// Adds per-task partial sums in task order.
pub(crate) fn sum_rows<A: Float>(partials: Vec<Vec<A>>, c: usize) -> Vec<A> {
    let mut sum = vec![A::zero(); c];
    for p in partials {
        crate::axpy(&mut sum, A::one(), &p);
    }
    sum
}

/// Adds per-task (dw, db) partial sums in task order.
pub(crate) fn sum_partials<A: Float + std::ops::AddAssign>(
    partials: Vec<(Vec<A>, Vec<A>)>,
    c: usize,
) -> (Vec<A>, Vec<A>) {
    let (mut dw, mut db) = (vec![A::zero(); c], vec![A::zero(); c]);
    for (pw, pb) in partials {
        for i in 0..c {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
    (dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};

    #[test]
    fn gradients_match_finite_differences() {
        let (x, w, b) = (rand(&[3, 5, 7], 1), rand(&[7], 2), rand(&[7], 3));
        check_grad(&x, |x| layer_norm(x, &w, Some(&b), 1e-5));
        check_grad(&w, |w| layer_norm(&x, w, Some(&b), 1e-5));
        check_grad(&b, |b| layer_norm(&x, &w, Some(b), 1e-5));
        check_grad(&x, |x| layer_norm(x, &w, None, 1e-5));
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        for (n, c) in [(1, 1), (37, 75), (5, 771), (130, 33)] {
            let inputs = [rand(&[n, c], 4), rand(&[c], 5), rand(&[c], 6)];
            check_parity(
                &inputs,
                3,
                |t| layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
                |t| reference::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
            );
        }
    }
}
