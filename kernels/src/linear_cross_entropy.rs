//! A language model's head and loss as one op: the mean cross-entropy of the logits x·Wᵀ
//! (x: (N, C) hidden states, W: (V, C) the head) against targets (N,), computed over chunks of
//! rows, so the (N, V) logits and their gradient never exist whole.
//!
//! At GPT-2's B2 × T1024 the logits are 2048 × 50,304 floats, 393 MiB, and the unfused graph
//! keeps them and p − onehot (another 393 MiB) from the forward to the backward, then builds
//! their gradient through the reshapes. Here each chunk of rows goes through the head, the
//! fused cross-entropy kernel (loss and p − onehot) and straight on to its share of the
//! gradients, dx = (p − onehot)·W and dW += (p − onehot)ᵀ·x, while the forward runs (as
//! Liger-Kernel's fused linear cross-entropy does); the backward only scales them by the
//! upstream gradient over the count. What stays from forward to backward is dx (N × C) and dW
//! (V × C, the size of W's gradient anyway). The matmuls are the unfused path's, in the
//! `compute` dtype; the logits and the loss statistics are in x's dtype, as there.
//!
//! Outside a graph (evaluation) only the loss is computed, chunk by chunk.

use crate::cross_entropy::{bad_target, CROSS_ENTROPY_ROWS};
use crate::{stats_dtype, IGNORE_INDEX};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Elements of one chunk's logits on the CPU: 8 Mi (32 MiB in f32), small enough to stay near
/// the cache-friendly sizes the gemm likes and far below the whole logits.
const CPU_CHUNK_ELEMENTS: usize = 1 << 23;
/// On a GPU: 256 Mi (1 GiB in f32; about 3 GiB of a chunk's buffers in all). Small chunks
/// there cost a launch sequence and a V × C addition into dW each (GPT-2 at B16 × T1024 would
/// take 99 chunks of 166 rows); these take 4, still far below the 16 × 1024 × 50,304 logits
/// an unfused head holds twice.
const GPU_CHUNK_ELEMENTS: usize = 1 << 28;

/// Mean cross-entropy of x·Wᵀ against `targets` over the rows whose target is not
/// [`IGNORE_INDEX`] (0 when none is); the matmuls in `compute`.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    compute: DType,
) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let (v, wc) = w.dims2()?;
    if wc != c {
        candle_core::bail!("linear_cross_entropy: x has {c} features, the head's weight {wc}")
    }
    if targets.dims() != [n] {
        candle_core::bail!(
            "linear_cross_entropy: {} targets for {n} rows",
            targets.elem_count()
        )
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let host = targets.to_vec1::<u32>()?;
    if let Some((i, &t)) =
        (host.iter().enumerate()).find(|(_, &t)| t != IGNORE_INDEX && t as usize >= v)
    {
        return Err(bad_target(i, t, v));
    }
    let counted = |rows: &[u32]| rows.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let count = counted(&host);
    let (need_dx, need_dw) = (x.track_op(), w.track_op());
    let grad = need_dx || need_dw;

    let wk = w.detach().to_dtype(compute)?;
    let xk = x.detach().to_dtype(compute)?;
    let chunk = if x.device().is_cpu() {
        CPU_CHUNK_ELEMENTS
    } else {
        GPU_CHUNK_ELEMENTS
    };
    let rows = (chunk / v.max(1)).clamp(1, n.max(1));
    let stats = stats_dtype(x.dtype());
    let mut loss = Tensor::zeros((), stats, x.device())?;
    let (mut dx, mut dw) = (Vec::new(), None::<Tensor>);
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let xc = xk.narrow(0, start, len)?;
        let logits = xc.matmul(&wk.t()?)?.to_dtype(x.dtype())?;
        let t = targets.narrow(0, start, len)?;
        let mut outs = CROSS_ENTROPY_ROWS.run(grad, &[&logits, &t])?;
        drop(logits);
        // The kernel's mean over this chunk's counted rows, back to their sum.
        let counted_here = counted(&host[start..start + len]);
        loss = (loss + (&outs[0] * counted_here as f64)?)?;
        if !grad {
            continue;
        }
        let p_minus_onehot = outs.swap_remove(1).to_dtype(compute)?;
        if need_dx {
            dx.push(p_minus_onehot.matmul(&wk)?);
        }
        if need_dw {
            let part = p_minus_onehot.t()?.matmul(&xc)?.to_dtype(stats)?;
            dw = Some(match dw {
                None => part,
                Some(sum) => (sum + part)?,
            });
        }
    }
    let loss = (loss / count.max(1) as f64)?;
    if !grad {
        return Ok(loss);
    }
    let dx = match dx.len() {
        0 => None,
        _ => Some(Tensor::cat(&dx, 0)?.to_dtype(x.dtype())?),
    };
    let dw = dw.map(|g| g.to_dtype(w.dtype())).transpose()?;
    x.apply_op2(
        w,
        Head {
            loss: Mutex::new(Some(loss)),
            grads: Mutex::new(Some((dx, dw))),
            count,
        },
    )
}

/// The op that enters the precomputed loss into the graph, with the gradients for x and W
/// computed alongside it.
struct Head {
    /// The loss until the forward hands it over.
    loss: Mutex<Option<Tensor>>,
    /// (p − onehot)·W and (p − onehot)ᵀ·x, unscaled, until the backward takes them.
    grads: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
    count: usize,
}

impl Head {
    fn loss(&self) -> Result<Tensor> {
        (crate::locked(&self.loss).take()).ok_or_else(|| {
            candle_core::Error::Msg("linear_cross_entropy: forward run twice".into())
        })
    }
}

impl CustomOp2 for Head {
    fn name(&self) -> &'static str {
        "kiln-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::hand_over::cpu(&self.loss()?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::hand_over::cuda(&self.loss()?, self.name())
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = crate::locked(&self.grads).take().ok_or_else(|| {
            candle_core::Error::Msg(
                "linear_cross_entropy: a second backward through one forward".into(),
            )
        })?;
        // upstream / count, applied in the statistics dtype (f32 for f16 and bf16 too).
        let s = (dloss / self.count.max(1) as f64)?;
        let scaled = |g: Option<Tensor>| -> Result<Option<Tensor>> {
            g.map(|g| g.broadcast_mul(&s.to_dtype(g.dtype())?))
                .transpose()
        };
        Ok((scaled(dx)?, scaled(dw)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, rand};
    use crate::{compare::rel_err, cross_entropy, IGNORE_INDEX};
    use candle_core::{Device, Var};

    /// The unfused head: logits = x·Wᵀ in `compute`, then kiln's cross-entropy.
    fn unfused(x: &Tensor, w: &Tensor, t: &Tensor, compute: DType) -> Result<Tensor> {
        let logits = x
            .to_dtype(compute)?
            .matmul(&w.to_dtype(compute)?.t()?)?
            .to_dtype(x.dtype())?;
        cross_entropy(&logits, t)
    }

    fn targets(n: usize, v: usize, ignored: &[usize]) -> Tensor {
        let t: Vec<u32> = (0..n)
            .map(|i| match ignored.contains(&i) {
                true => IGNORE_INDEX,
                false => ((i * 7 + 3) % v) as u32,
            })
            .collect();
        Tensor::new(t, &Device::Cpu).unwrap()
    }

    /// Loss, dx and dW of `f` (scaled by 3 upstream, so the scaling is checked too).
    fn run(
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x: &Tensor,
        w: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let (x, w) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let loss = f(x.as_tensor(), w.as_tensor()).unwrap();
        let g = (&loss * 3.0).unwrap().backward().unwrap();
        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (loss, get(&x), get(&w))
    }

    #[test]
    fn matches_the_unfused_head_over_one_chunk_and_many() {
        // V = 5000 → 1677 rows a chunk: 37 rows are one chunk, 4000 rows three (the last short).
        for (n, v, c) in [(37, 5000, 16), (4000, 5000, 8), (9, 11, 4)] {
            let x = rand(&[n, c], 1).to_dtype(DType::F64).unwrap();
            let w = rand(&[v, c], 2).to_dtype(DType::F64).unwrap();
            let t = targets(n, v, &[0, n / 2]);
            let fused = run(|x, w| linear_cross_entropy(x, w, &t, DType::F64), &x, &w);
            let plain = run(|x, w| unfused(x, w, &t, DType::F64), &x, &w);
            for (a, b) in [
                (&fused.0, &plain.0),
                (&fused.1, &plain.1),
                (&fused.2, &plain.2),
            ] {
                let err = max_abs_diff(a, b);
                assert!(err < 1e-12, "n {n}, v {v}: {err}");
            }
        }
    }

    #[test]
    fn f32_and_bf16_compute_agree_with_the_unfused_head() {
        let (n, v, c) = (3000, 4000, 32);
        let x = rand(&[n, c], 3).to_dtype(DType::F32).unwrap();
        let w = rand(&[v, c], 4).to_dtype(DType::F32).unwrap();
        let t = targets(n, v, &[5]);
        for (compute, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let fused = run(|x, w| linear_cross_entropy(x, w, &t, compute), &x, &w);
            let plain = run(|x, w| unfused(x, w, &t, compute), &x, &w);
            assert!(rel_err(&fused.0, &plain.0) < tol, "{compute:?} loss");
            assert!(rel_err(&fused.1, &plain.1) < tol, "{compute:?} dx");
            assert!(rel_err(&fused.2, &plain.2) < tol, "{compute:?} dw");
        }
    }

    #[test]
    fn outside_a_graph_gives_the_loss_alone_and_bad_targets_are_refused() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, w) = (f32(rand(&[6, 4], 5)), f32(rand(&[10, 4], 6)));
        let t = targets(6, 10, &[]);
        let fused = linear_cross_entropy(&x, &w, &t, DType::F32).unwrap();
        assert!(!fused.track_op());
        let plain = unfused(&x, &w, &t, DType::F32).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-6);
        let bad = Tensor::new(&[1u32, 2, 10, 0, 0, 0], &Device::Cpu).unwrap();
        let err = linear_cross_entropy(&x, &w, &bad, DType::F32).unwrap_err();
        assert!(err.to_string().contains("target 10 of row 2"), "{err}");
        let all_ignored = targets(6, 10, &[0, 1, 2, 3, 4, 5]);
        let zero = linear_cross_entropy(&x, &w, &all_ignored, DType::F32).unwrap();
        assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
    }
}
