//! Softmax over the last dimension. Forward: per row, the max, then one pass writing exp(x − m)
//! and summing, then a scale; the composition makes four full-size tensors for the same thing.
//! Backward from the output alone: dx = y·(dy − Σ dy·y), one pass per row.

use crate::vexp::{wide, Exp};
use crate::{out, rows_cols, slice, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SOFTMAX.with(()))
}

static SOFTMAX: Op<()> = Op {
    forward: Kernel {
        name: "kiln-softmax",
        cpu: |args, ()| forward(args),
        #[cfg(feature = "cuda")]
        cuda: |args, ()| crate::cuda::softmax::forward(args),
    },
    backward: |g| BACKWARD.run((), &[g.y, g.dy]),
};

static BACKWARD: Kernel<()> = Kernel {
    name: "kiln-softmax-backward",
    cpu: |args, ()| backward(args),
    #[cfg(feature = "cuda")]
    cuda: |args, ()| crate::cuda::softmax::backward(args),
};

/// x → y.
pub fn forward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "softmax", |T| {
        type A = <T as Elem>::Acc;
        let x = slice::<T>(args[0])?;
        let mut y = crate::zeros::<T>(n * c);
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each_init(
            || vec![Zero::zero(); c],
            |e, (y, x)| {
                let m = x
                    .iter()
                    .map(|v| v.acc())
                    .fold(A::neg_infinity(), Float::max);
                wide(|| {
                    for i in 0..c {
                        e[i] = (x[i].acc() - m).vexp();
                    }
                    let mut z = A::zero();
                    e.iter().for_each(|&e| z += e);
                    let r = z.recip();
                    for i in 0..c {
                        y[i] = T::from_acc(e[i] * r);
                    }
                })
            },
        );
        Ok(vec![out(y, shape)])
    })
}

/// y, dy → dx.
pub fn backward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    with_float!(args[0].0, "softmax backward", |T| {
        type A = <T as Elem>::Acc;
        let [y, dy] = slices::<T, 2>(args)?;
        let mut dx = crate::zeros::<T>(n * c);
        dx.par_chunks_mut(c)
            .zip(y.par_chunks(c).zip(dy.par_chunks(c)))
            .for_each(|(dx, (y, dy))| {
                let s: A = y.iter().zip(dy).map(|(y, d)| y.acc() * d.acc()).sum();
                for i in 0..c {
                    dx[i] = T::from_acc(y[i].acc() * (dy[i].acc() - s));
                }
            });
        Ok(vec![out(dx, shape)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};

    #[test]
    fn gradients_match_finite_differences() {
        check_grad(&(rand(&[4, 9], 6) * 10.0).unwrap(), softmax);
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        for (n, c) in [(1, 1), (37, 75), (3, 1031)] {
            let x = (rand(&[n, c], 4) * 8.0).unwrap();
            check_parity(&[x], 1, |t| softmax(&t[0]), |t| reference::softmax(&t[0]));
        }
    }

    /// A decoding-style causal mask: −inf after the diagonal (row 0 keeps one finite entry,
    /// the last row none). Masked entries get exactly 0, every row sums to 1, and neither the
    /// output nor the gradient holds a NaN, in every dtype.
    #[test]
    fn masked_entries_get_zero_and_no_nan() {
        let t = 9;
        let mut x = (rand(&[t, t], 7) * 8.0).unwrap().to_vec2::<f64>().unwrap();
        for (i, row) in x.iter_mut().enumerate() {
            for v in &mut row[i + 1..] {
                *v = f64::NEG_INFINITY;
            }
        }
        let x = Tensor::new(x, &candle_core::Device::Cpu).unwrap();
        let y: Vec<Vec<f64>> = softmax(&x).unwrap().to_vec2().unwrap();
        for (i, row) in y.iter().enumerate() {
            assert!(row.iter().all(|v| v.is_finite()), "row {i}: {row:?}");
            assert!(row[i + 1..].iter().all(|&v| v == 0.0), "row {i}: {row:?}");
            assert!(
                (row.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "row {i}: {row:?}"
            );
        }
        check_grad(&x, softmax);
        // check_parity fails on any NaN or infinity in the fused op's output or gradients.
        check_parity(&[x], 1, |t| softmax(&t[0]), |t| reference::softmax(&t[0]));
    }
}
