//! Causal self-attention as one op: o = softmax(q·kᵀ·scale + causal mask)·v for q, k, v of
//! shape (B, H, T, D), with scale = 1/√D.
//!
//! Forward, per query row i: scores against keys 0..=i, their max m and sum l of exp(s − m),
//! then o_i = Σ_j exp(s_ij − m)·v_j / l. Only lse_i = m + ln l is kept (B·H·T floats), never the
//! (T, T) probabilities the composition stores for its backward.
//! Backward recomputes p_ij = exp(s_ij − lse_i) and, with Δ_i = do_i·o_i:
//!   dv_j += p_ij·do_i,  ds_ij = p_ij·(do_i·v_j − Δ_i),  dq_i += scale·ds_ij·k_j,
//!   dk_j += scale·ds_ij·q_i.
//! On the CPU each (batch, head) is one parallel task, so the scatter into dk/dv needs no
//! synchronization. The CUDA version tiles the same loops (flash attention).

use crate::{axpy, dot, out, slice, slices, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, _, d) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} must have the same shape",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let scale = 1.0 / (d as f64).sqrt();
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, ATTENTION.with(scale))
}

static ATTENTION: Op<f64> = Op {
    forward: Kernel {
        name: "kiln-causal-attention",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: |args, scale| crate::cuda::attention::forward(args, scale as f32),
    },
    backward: |g| {
        let lse = &g.saved.get()[0];
        let [q, k, v] = [g.inputs[0], g.inputs[1], g.inputs[2]];
        BACKWARD.run(g.param, &[q, k, v, g.y, lse, g.dy])
    },
};

static BACKWARD: Kernel<f64> = Kernel {
    name: "kiln-causal-attention-backward",
    cpu: backward,
    #[cfg(feature = "cuda")]
    cuda: |args, scale| crate::cuda::attention::backward(args, scale as f32),
};

fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// A (T, D) block of a (B, H, T, D) tensor, widened to the accumulation type.
fn widen<T: Elem>(x: &[T]) -> Vec<T::Acc> {
    x.iter().map(|v| v.acc()).collect()
}

/// q, k, v → o, lse.
pub fn forward(args: &[(&CpuStorage, &Layout)], scale: f64) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, h, t, d) = dims(args[0].1)?;
    with_float!(args[0].0, "attention", |T| {
        type A = <T as Elem>::Acc;
        let [q, k, v] = slices::<T, 3>(args)?;
        let scale: A = crate::k(scale);
        let mut o = crate::zeros::<T>(b * h * t * d);
        let mut lse = vec![A::zero(); b * h * t];
        let td = t * d;
        o.par_chunks_mut(td)
            .zip(lse.par_chunks_mut(t))
            .enumerate()
            .for_each(|(bh, (o, lse))| {
                let (q, k, v) = (
                    widen(&q[bh * td..][..td]),
                    widen(&k[bh * td..][..td]),
                    widen(&v[bh * td..][..td]),
                );
                let (mut s, mut acc) = (vec![A::zero(); t], vec![A::zero(); d]);
                for i in 0..t {
                    let qi = &q[i * d..][..d];
                    let mut m = A::neg_infinity();
                    for j in 0..=i {
                        s[j] = scale * dot(qi, &k[j * d..][..d]);
                        m = m.max(s[j]);
                    }
                    acc.fill(A::zero());
                    let mut l = A::zero();
                    for j in 0..=i {
                        let p = (s[j] - m).exp();
                        l += p;
                        axpy(&mut acc, p, &v[j * d..][..d]);
                    }
                    let r = l.recip();
                    for (o, a) in o[i * d..][..d].iter_mut().zip(&acc) {
                        *o = T::from_acc(*a * r);
                    }
                    lse[i] = m + l.ln();
                }
            });
        Ok(vec![out(o, (b, h, t, d)), out(lse, (b, h, t))])
    })
}

/// q, k, v, o, lse, do → dq, dk, dv.
pub fn backward(args: &[(&CpuStorage, &Layout)], scale: f64) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, h, t, d) = dims(args[0].1)?;
    with_float!(args[0].0, "attention backward", |T| {
        type A = <T as Elem>::Acc;
        let [q, k, v, o] = [0, 1, 2, 3].map(|i| slice::<T>(args[i]));
        let (q, k, v, o) = (q?, k?, v?, o?);
        let lse = slice::<A>(args[4])?;
        let d_o = slice::<T>(args[5])?;
        let scale: A = crate::k(scale);
        let n = b * h * t * d;

        let (mut dq, mut dk, mut dv) = (
            crate::zeros::<T>(n),
            crate::zeros::<T>(n),
            crate::zeros::<T>(n),
        );
        let td = t * d;
        dq.par_chunks_mut(td)
            .zip(dk.par_chunks_mut(td).zip(dv.par_chunks_mut(td)))
            .enumerate()
            .for_each(|(bh, (dq_out, (dk_out, dv_out)))| {
                let at = |x: &[T]| widen(&x[bh * td..][..td]);
                let (q, k, v, o, d_o) = (at(q), at(k), at(v), at(o), at(d_o));
                let lse = &lse[bh * t..][..t];
                let (mut dq, mut dk, mut dv) = (
                    vec![A::zero(); td],
                    vec![A::zero(); td],
                    vec![A::zero(); td],
                );
                for i in 0..t {
                    let (qi, doi) = (&q[i * d..][..d], &d_o[i * d..][..d]);
                    let delta = dot(doi, &o[i * d..][..d]);
                    let dqi = &mut dq[i * d..][..d];
                    for j in 0..=i {
                        let kj = &k[j * d..][..d];
                        let p = (scale * dot(qi, kj) - lse[i]).exp();
                        axpy(&mut dv[j * d..][..d], p, doi);
                        let ds = p * (dot(doi, &v[j * d..][..d]) - delta) * scale;
                        axpy(dqi, ds, kj);
                        axpy(&mut dk[j * d..][..d], ds, qi);
                    }
                }
                for (dst, src) in [(dq_out, &dq), (dk_out, &dk), (dv_out, &dv)] {
                    for (x, a) in dst.iter_mut().zip(src.iter()) {
                        *x = T::from_acc(*a);
                    }
                }
            });
        let shape = (b, h, t, d);
        Ok(vec![out(dq, shape), out(dk, shape), out(dv, shape)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};

    #[test]
    fn gradients_match_finite_differences() {
        let shape = [2, 2, 5, 4];
        let (q, k, v) = (rand(&shape, 1), rand(&shape, 2), rand(&shape, 3));
        check_grad(&q, |q| causal_self_attention(q, &k, &v));
        check_grad(&k, |k| causal_self_attention(&q, k, &v));
        check_grad(&v, |v| causal_self_attention(&q, &k, v));
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        for shape in [[1, 1, 1, 8], [2, 3, 67, 16], [1, 2, 130, 40]] {
            let inputs = [rand(&shape, 4), rand(&shape, 5), rand(&shape, 6)];
            check_parity(
                &inputs,
                3,
                |t| causal_self_attention(&t[0], &t[1], &t[2]),
                |t| reference::causal_self_attention(&t[0], &t[1], &t[2]),
            );
        }
    }

    #[test]
    fn a_query_never_sees_later_keys() {
        let shape = [1, 1, 6, 4];
        let (q, k, v) = (rand(&shape, 7), rand(&shape, 8), rand(&shape, 9));
        let before = causal_self_attention(&q, &k, &v).unwrap();
        // Changing the last key and value leaves every earlier output unchanged.
        let bump = |x: &Tensor| {
            let last = (x.narrow(2, 5, 1).unwrap() + 3.0).unwrap();
            Tensor::cat(&[&x.narrow(2, 0, 5).unwrap(), &last], 2).unwrap()
        };
        let after = causal_self_attention(&q, &bump(&k), &bump(&v)).unwrap();
        let head = |x: &Tensor| x.narrow(2, 0, 5).unwrap();
        assert_eq!(
            crate::testing::max_abs_diff(&head(&before), &head(&after)),
            0.0
        );
    }
}
