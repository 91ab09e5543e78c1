//! Mean cross-entropy of logits (N, V) against class ids (N,), fused with its gradient.
//!
//! One pass per row finds the max and the sum of exp(x − max) (log-sum-exp), giving the loss
//! lse − x[target]; when the logits are part of a graph, a second pass writes p − onehot, kept
//! for the backward, which scales it in place by upstream/count: no second N×V tensor, and the
//! 1/count (≈ 6e-5 at GPT-2's 16,384 rows) is applied in f32 with the upstream gradient (and
//! its loss scale), not stored first in f16 where (p − onehot)/count would underflow to 0.
//! Logits outside a graph (evaluation) get the loss alone: nothing of size N·V is computed.
//! The composition materializes shifted logits, their exponentials and log-probabilities, each
//! of size N·V: at GPT-2 shapes (4096 × 50304) that is 800 MB apiece in f32. Rows whose target
//! is `IGNORE_INDEX` count neither in the sum nor in the mean, and get a zero gradient; any
//! other target ≥ V is an error on every device. The loss is f32 (f64 for f64 logits).

use crate::{k, out, slice, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Shape, Tensor};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// Targets with this id are ignored (PyTorch's default `ignore_index = -100`, seen as u32).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Mean cross-entropy over the rows whose target is not [`IGNORE_INDEX`] (0 when none is).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!(
            "cross_entropy: {} targets for {n} rows of logits",
            targets.elem_count()
        )
    }
    let logits = logits.contiguous()?;
    let targets = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
    if !logits.track_op() {
        return Ok(CROSS_ENTROPY_ROWS
            .run(false, &[&logits, &targets])?
            .remove(0));
    }
    logits.apply_op2(&targets, CROSS_ENTROPY.with(true))
}

/// The error every device gives for a target that is neither a class id nor ignored.
pub(crate) fn bad_target(row: usize, target: u32, v: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "cross_entropy: target {target} of row {row} is not a class id (< {v})"
    ))
}

/// With `grad` (true): keeps p − onehot and 1/count.
static CROSS_ENTROPY: Op<bool> = Op {
    forward: Kernel {
        name: "kiln-cross-entropy",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: crate::cuda::cross_entropy::forward,
    },
    backward: |g| {
        // Taken, not cloned: the kept p − onehot becomes the gradient in place.
        let [dlogits, inv_count] = &g.saved.take()[..] else {
            candle_core::bail!("cross_entropy: a second backward through one forward")
        };
        let scale = (g.dy.to_dtype(inv_count.dtype())? * inv_count)?;
        dlogits.inplace_op2(&scale, &ScaleInPlace)?;
        // The targets get no gradient.
        Ok(vec![dlogits.clone()])
    },
};

/// The kernel outside autograd: the mean loss, and with `grad` also p − onehot and 1/count.
pub(crate) static CROSS_ENTROPY_ROWS: Kernel<bool> = Kernel {
    name: "cross_entropy",
    cpu: forward,
    #[cfg(feature = "cuda")]
    cuda: crate::cuda::cross_entropy::forward,
};

/// d *= s, with s a one-element tensor of the statistics dtype, the product taken in f32 (f64).
struct ScaleInPlace;

impl InplaceOp2 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let s = match s2 {
            CpuStorage::F32(v) => v[l2.start_offset()] as f64,
            CpuStorage::F64(v) => v[l2.start_offset()],
            _ => candle_core::bail!("cross_entropy: the backward's scale must be f32 or f64"),
        };
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("cross_entropy: the kept gradient is not contiguous")
        };
        fn scale<T: Elem>(d: &mut [T], s: f64) {
            let s: T::Acc = k(s);
            d.par_iter_mut().for_each(|d| *d = T::from_acc(d.acc() * s));
        }
        match s1 {
            CpuStorage::F32(v) => scale(&mut v[a..b], s),
            CpuStorage::F64(v) => scale(&mut v[a..b], s),
            CpuStorage::BF16(v) => scale(&mut v[a..b], s),
            CpuStorage::F16(v) => scale(&mut v[a..b], s),
            _ => candle_core::bail!("cross_entropy: unsupported dtype for the gradient"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::cross_entropy::scale_in_place(s1, l1, s2, l2)
    }
}

/// logits, targets → loss, then (with `grad`) p − onehot and 1/count for the backward.
pub fn forward(args: &[(&CpuStorage, &Layout)], grad: bool) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, v) = shape.dims2()?;
    let targets = slice::<u32>(args[1])?;
    if let Some((i, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && t as usize >= v)
    {
        return Err(bad_target(i, t, v));
    }
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    with_float!(args[0].0, "cross_entropy", |T| {
        type A = <T as Elem>::Acc;
        let logits = slice::<T>(args[0])?;
        let inv_count: A = k(1.0 / count.max(1) as f64);
        let mut dlogits = if grad {
            crate::zeros::<T>(n * v)
        } else {
            Vec::new()
        };
        let mut losses = vec![A::zero(); n];
        let row = |x: &[T], t: u32, loss: &mut A, d: Option<&mut [T]>| {
            if t == IGNORE_INDEX {
                return;
            }
            let (imax, m) = x.iter().map(|v| v.acc()).enumerate().fold(
                (0, A::neg_infinity()),
                |(i, m), (j, v)| if v > m { (j, v) } else { (i, m) },
            );
            // z = 1 + rest, with the max's own term left out of `rest`, so ln z = ln_1p(rest)
            // stays accurate when one logit dominates (the loss is then tiny, and 1 + rest
            // would round it away in f32).
            let rest: A = x
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != imax)
                .map(|(_, v)| (v.acc() - m).exp())
                .sum();
            let ln_z = rest.ln_1p();
            *loss = ln_z - (x[t as usize].acc() - m);
            let Some(d) = d else { return };
            let lse = m + ln_z;
            for (d, x) in d.iter_mut().zip(x) {
                *d = T::from_acc((x.acc() - lse).exp());
            }
            // p_t − 1; when t is the max, 1 − p_t = rest/(1 + rest) without cancellation.
            let t = t as usize;
            d[t] = if t == imax {
                T::from_acc(-(rest / (A::one() + rest)))
            } else {
                T::from_acc((x[t].acc() - lse).exp() - A::one())
            };
        };
        if grad {
            dlogits
                .par_chunks_mut(v)
                .zip(logits.par_chunks(v).zip(targets.par_iter()))
                .zip(losses.par_iter_mut())
                .for_each(|((d, (x, &t)), loss)| row(x, t, loss, Some(d)));
        } else {
            logits
                .par_chunks(v)
                .zip(targets.par_iter())
                .zip(losses.par_iter_mut())
                .for_each(|((x, &t), loss)| row(x, t, loss, None));
        }
        // Summed in row order, so the loss does not depend on the thread count.
        let total = losses.iter().fold(A::zero(), |s, &l| s + l) * inv_count;
        let mut outs = vec![out(vec![total], ())];
        if grad {
            outs.push(out(dlogits, shape));
            outs.push(out(vec![inv_count], ()));
        }
        Ok(outs)
    })
}

#[cfg(test)]
mod tests;
