//! ReLU, alone and fused with the residual add before it (a ResNet block's join):
//!   y = max(0, x)  or  y = max(0, a + b),   dx = da = db = dy·[y > 0]
//!
//! One pass each way. candle's `relu` backward builds a zero tensor, a comparison mask, its
//! float copy and a product (four full-size passes and allocations), and the add before it
//! one more pass. The mask comes from the output, so nothing beyond y is kept; at exactly 0
//! the gradient is 0, as in PyTorch.

use crate::{out, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

const CHUNK: usize = 8192;

/// max(0, x).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.relu();
    }
    x.contiguous()?.apply_op1(RELU.with(()))
}

/// max(0, a + b), for `a` and `b` of one shape and dtype.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    if !a.device().is_cpu() {
        return (a + b)?.relu();
    }
    a.contiguous()?
        .apply_op2(&b.contiguous()?, ADD_RELU.with(()))
}

static RELU: Op<()> = Op {
    forward: Kernel {
        name: "kiln-relu",
        cpu: |args, ()| forward(args),
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| BACKWARD.run((), &[g.y, g.dy]),
};

static ADD_RELU: Op<()> = Op {
    forward: Kernel {
        name: "kiln-add-relu",
        cpu: |args, ()| forward(args),
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| {
        let dx = BACKWARD.run((), &[g.y, g.dy])?.remove(0);
        Ok(vec![dx.clone(), dx])
    },
};

static BACKWARD: Kernel<()> = Kernel {
    name: "kiln-relu-backward",
    cpu: |args, ()| backward(args),
    #[cfg(feature = "cuda")]
    cuda: crate::op::cpu_only,
};

/// x (, b) → max(0, x (+ b)).
fn forward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    with_float!(args[0].0, "relu", |T| {
        let zero = T::zero();
        let relu = |v: T| if v > zero { v } else { zero };
        let mut y = crate::zeros::<T>(shape.elem_count());
        if args.len() == 2 {
            let [a, b] = slices::<T, 2>(args)?;
            y.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(y, (a, b))| {
                    for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                        *y = relu(T::from_acc(a.acc() + b.acc()));
                    }
                });
        } else {
            let [x] = slices::<T, 1>(args)?;
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = relu(x);
                    }
                });
        }
        Ok(vec![out(y, shape)])
    })
}

/// y, dy → dy·[y > 0].
fn backward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    with_float!(args[0].0, "relu backward", |T| {
        let [y, dy] = slices::<T, 2>(args)?;
        let zero = T::zero();
        let mut dx = crate::zeros::<T>(y.len());
        dx.par_chunks_mut(CHUNK)
            .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(dx, (y, dy))| {
                for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = if y > zero { dy } else { zero };
                }
            });
        Ok(vec![out(dx, shape)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, rand};
    use candle_core::{DType, Var};

    /// Values and gradients against candle's `relu` and `+`, in every float dtype, on inputs
    /// with both signs (none exactly 0, where the two conventions differ).
    #[test]
    fn matches_candle() {
        let (a, b, up) = (
            rand(&[3, 5, 7], 1),
            rand(&[3, 5, 7], 2),
            rand(&[3, 5, 7], 3),
        );
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let va = Var::from_tensor(&a.to_dtype(dtype).unwrap()).unwrap();
            let vb = Var::from_tensor(&b.to_dtype(dtype).unwrap()).unwrap();
            let up = up.to_dtype(dtype).unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                [&va, &vb].map(|v| g.get(v.as_tensor()).cloned())
            };
            let (ta, tb) = (va.as_tensor(), vb.as_tensor());
            let ours = relu(ta).unwrap();
            let want = ta.relu().unwrap();
            assert_eq!(max_abs_diff(&ours, &want), 0.0, "relu {dtype:?}");
            let (g, w) = (grads(&ours), grads(&want));
            assert_eq!(
                max_abs_diff(g[0].as_ref().unwrap(), w[0].as_ref().unwrap()),
                0.0
            );

            let ours = add_relu(ta, tb).unwrap();
            let want = (ta + tb).unwrap().relu().unwrap();
            assert_eq!(max_abs_diff(&ours, &want), 0.0, "add_relu {dtype:?}");
            let (g, w) = (grads(&ours), grads(&want));
            for i in 0..2 {
                let e = max_abs_diff(g[i].as_ref().unwrap(), w[i].as_ref().unwrap());
                assert_eq!(e, 0.0, "add_relu gradient {i} {dtype:?}");
            }
            // Half the entries are negative: the mask really drops gradients.
            let zeros = g[0].as_ref().unwrap().eq(0.0).unwrap();
            let dropped = zeros.to_dtype(DType::F32).unwrap().sum_all().unwrap();
            assert!(dropped.to_scalar::<f32>().unwrap() > 20.0, "{dtype:?}");
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let e = add_relu(&rand(&[2, 3], 1), &rand(&[3, 2], 2)).unwrap_err();
        assert!(e.to_string().contains("differ"), "{e}");
    }
}
