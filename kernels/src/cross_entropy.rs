//! Mean cross-entropy of logits (N, V) against class ids (N,), fused with its gradient.
//!
//! One pass per row finds the max and the sum of exp(x − max) (log-sum-exp), giving the loss
//! lse − x[target]; a second pass writes dlogits = (softmax − onehot) / count directly, so the
//! backward is one scale by the incoming gradient. The composition materializes shifted logits,
//! their exponentials and log-probabilities, each of size N·V: at GPT-2 shapes (4096 × 50304)
//! that is 800 MB apiece in f32. Rows whose target is `IGNORE_INDEX` count neither in the sum
//! nor in the mean, and get a zero gradient. The loss is f32 (f64 for f64 logits).

use crate::{k, out, slice, with_float, Elem, Saved};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
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
    let op = CrossEntropy {
        saved: Saved::default(),
    };
    logits.contiguous()?.apply_op2(
        &targets.to_dtype(candle_core::DType::U32)?.contiguous()?,
        op,
    )
}

struct CrossEntropy {
    saved: Saved,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.saved.keep(forward(&[(s1, l1), (s2, l2)])?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.saved
            .keep(crate::cuda::cross_entropy::forward(&[(s1, l1), (s2, l2)])?)
    }

    fn bwd(
        &self,
        _logits: &Tensor,
        _targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = &self.saved.get()[0];
        let g = dlogits.broadcast_mul(&grad.to_dtype(dlogits.dtype())?)?;
        Ok((Some(g), None))
    }
}

/// logits, targets → loss, dlogits.
pub fn forward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    let shape = args[0].1.shape().clone();
    let (n, v) = shape.dims2()?;
    let targets = slice::<u32>(args[1])?;
    if let Some((i, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && t as usize >= v)
    {
        candle_core::bail!("cross_entropy: target {t} of row {i} is not a class id (< {v})")
    }
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    with_float!(args[0].0, "cross_entropy", |T| {
        type A = <T as Elem>::Acc;
        let logits = slice::<T>(args[0])?;
        let inv_count: A = k(1.0 / count.max(1) as f64);
        let mut dlogits = crate::zeros::<T>(n * v);
        let mut losses = vec![A::zero(); n];
        dlogits
            .par_chunks_mut(v)
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .zip(losses.par_iter_mut())
            .for_each(|((d, (x, &t)), loss)| {
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
                let lse = m + ln_z;
                *loss = ln_z - (x[t as usize].acc() - m);
                for (d, x) in d.iter_mut().zip(x) {
                    *d = T::from_acc((x.acc() - lse).exp() * inv_count);
                }
                // p_t − 1; when t is the max, 1 − p_t = rest/(1 + rest) without cancellation.
                let t = t as usize;
                d[t] = if t == imax {
                    T::from_acc(-(rest / (A::one() + rest)) * inv_count)
                } else {
                    T::from_acc(d[t].acc() - inv_count)
                };
            });
        // Summed in row order, so the loss does not depend on the thread count.
        let total = losses.iter().fold(A::zero(), |s, &l| s + l) * inv_count;
        Ok(vec![out(vec![total], ()), out(dlogits, shape)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};
    use candle_core::Device;

    fn targets(n: usize, v: usize) -> Tensor {
        let t: Vec<u32> = (0..n)
            .map(|i| {
                if i % 5 == 3 {
                    IGNORE_INDEX
                } else {
                    (i * 7919 % v) as u32
                }
            })
            .collect();
        Tensor::new(t, &Device::Cpu).unwrap()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let logits = (rand(&[6, 5], 11) * 5.0).unwrap();
        let t = targets(6, 5);
        check_grad(&logits, |l| cross_entropy(l, &t));
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        for (n, v) in [(1, 2), (37, 75), (9, 5003)] {
            let inputs = [(rand(&[n, v], 4) * 6.0).unwrap(), targets(n, v)];
            check_parity(
                &inputs,
                1,
                |t| cross_entropy(&t[0], &t[1]),
                |t| reference::cross_entropy(&t[0], &t[1]),
            );
        }
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_gradient() {
        let logits = candle_core::Var::from_tensor(&rand(&[3, 4], 1)).unwrap();
        let t = Tensor::new(&[IGNORE_INDEX; 3], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &t).unwrap();
        assert_eq!(loss.to_scalar::<f64>().unwrap(), 0.0);
        let g = loss.backward().unwrap();
        let g = g.get(&logits).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(g.to_scalar::<f64>().unwrap(), 0.0);
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let err = cross_entropy(
            &rand(&[2, 4], 1),
            &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("target 4 of row 1"), "{err}");
    }
}
