//! Bidirectional multi-head attention (BERT, ViT) as one op on token-major projections:
//! o = dropout(softmax(q·kᵀ·scale + mask))·v, with q, k, v and o of shape (B, T, C) in heads of
//! D = C / H features, an additive per-key mask (B, T) and a dropout multiplier (B, H, T, T).
//!
//! Composed from candle's ops this is about eighteen graph nodes per layer (head splits and
//! merges with their copies, two batched matmuls, the scale, the mask, the softmax, the
//! dropout), several of them (B, H, T, T), each with a zero-filled gradient and an add in the
//! backward. Here the forward keeps only lse_i = m_i + ln l_i (B·H·T floats); the backward
//! recomputes P = exp(S − lse) per (batch, head), with P̃ = P ∘ drop:
//!   dV = P̃ᵀ·dO,  dP = (dO·Vᵀ) ∘ drop,  dS = P ∘ (dP − rowsum(P ∘ dP))·scale,
//!   dQ = dS·K,  dK = dSᵀ·Q.
//! Each (batch, head) is one parallel task whose products are gemm calls. CPU only: on other
//! devices the model keeps the composition.

use super::Heads;
use crate::gemm::{matmul, GemmElem, Mat};
use crate::vexp::{wide, Exp};
use crate::{locked, out, slice, with_float, Elem};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Mutex;

/// Attention of `n_head` heads over token-major `q`, `k`, `v` (B, T, C) → (B, T, C). `mask`
/// (B·T values, e.g. (B, 1, 1, T)) is added to every query's scores for each key; `drop`
/// (B, H, T, T) multiplies the probabilities (dropout's 0 or 1/(1 − p)). Both are in the
/// softmax's dtype (f32, f64 for f64) and get no gradient.
pub fn bidirectional_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_head: usize,
    mask: Option<&Tensor>,
    drop: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, c) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} must have the same shape",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if n_head == 0 || c % n_head != 0 {
        candle_core::bail!("attention: {c} features are not {n_head} equal heads")
    }
    if !q.device().is_cpu() {
        candle_core::bail!("bidirectional_attention runs on the CPU; compose it on other devices")
    }
    let acc = crate::stats_dtype(q.dtype());
    let constant = |x: Option<&Tensor>, n: usize, what: &str| -> Result<Option<Tensor>> {
        x.map(|x| {
            if x.elem_count() != n || x.dtype() != acc {
                candle_core::bail!(
                    "attention: {what} {:?} {:?}, expected {n} values in {acc:?}",
                    x.dims(),
                    x.dtype()
                )
            }
            x.detach().flatten_all()?.contiguous()
        })
        .transpose()
    };
    let op = Bidirectional {
        n_head,
        scale: 1.0 / ((c / n_head) as f64).sqrt(),
        mask: constant(mask, b * t, "mask")?,
        drop: constant(drop, b * n_head * t * t, "dropout multiplier")?,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Bidirectional {
    n_head: usize,
    scale: f64,
    mask: Option<Tensor>,
    drop: Option<Tensor>,
    /// The forward's lse (B·H·T), for the backward.
    lse: Mutex<Option<CpuStorage>>,
}

const NAME: &str = "kiln-bidirectional-attention";

/// A constant's values, borrowed from its storage (it was made contiguous on the CPU, in the
/// softmax's dtype): the dropout multiplier is B·H·T² values, not to be copied each pass.
fn values<'a, A, S>(g: &'a Option<(S, &Layout)>) -> Result<Option<&'a [A]>>
where
    A: candle_core::WithDType,
    S: std::ops::Deref<Target = Storage>,
{
    match g {
        None => Ok(None),
        Some((s, l)) => match &**s {
            Storage::Cpu(s) => slice::<A>((s, l)).map(Some),
            _ => candle_core::bail!("{NAME}: runs on the CPU only"),
        },
    }
}

impl Bidirectional {
    fn heads(&self, l: &Layout) -> Result<Heads> {
        let (b, t, c) = l.shape().dims3()?;
        Ok(Heads::packed(0, 1, (b, self.n_head, t, c / self.n_head)))
    }
}

impl CustomOp3 for Bidirectional {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::profile::timed(NAME, crate::profile::Pass::Forward, || {
            let heads = self.heads(ql)?;
            let (b, h, t, d) = heads.dims;
            let args = [(q, ql), (k, kl), (v, vl)];
            let (o, lse) = with_float!(q, "attention", |T| {
                type A = <T as Elem>::Acc;
                let [q, k, v] = [0, 1, 2].map(|i| slice::<T>(args[i]));
                let (q, k, v) = (q?, k?, v?);
                let constants =
                    [&self.mask, &self.drop].map(|t| t.as_ref().map(Tensor::storage_and_layout));
                let (mask, drop) = (
                    values::<A, _>(&constants[0])?,
                    values::<A, _>(&constants[1])?,
                );
                let scale: A = crate::k(self.scale);
                let per_head: Vec<(Vec<A>, Vec<A>)> = (0..b * h)
                    .into_par_iter()
                    .map(|bh| {
                        let [q, k, v] = [q, k, v].map(|x| heads.gather(x, bh));
                        let mask = mask.as_ref().map(|m| &m[(bh / h) * t..][..t]);
                        let drop = drop.as_ref().map(|m| &m[bh * t * t..][..t * t]);
                        forward_head(&q, &k, &v, mask, drop, (t, d), scale)
                    })
                    .collect();
                let mut o = crate::zeros::<T>(b * t * h * d);
                let mut lse = Vec::with_capacity(b * h * t);
                for (bh, (o_bh, lse_bh)) in per_head.into_iter().enumerate() {
                    heads.scatter(&mut o, bh, &o_bh);
                    lse.extend(lse_bh);
                }
                let (o, _) = out(o, ql.shape().clone());
                let (lse, _) = out(lse, b * h * t);
                Ok::<_, candle_core::Error>((o, lse))
            })?;
            *locked(&self.lse) = Some(lse);
            Ok((o, ql.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed(NAME, crate::profile::Pass::Backward, || {
            let lse = locked(&self.lse).take().ok_or_else(|| {
                candle_core::Error::Msg(format!("{NAME}: a second backward through one forward"))
            })?;
            let dy = dy.contiguous()?;
            let guards = [q, k, v, &dy].map(|x| x.storage_and_layout());
            let mut args = Vec::with_capacity(4);
            for (s, l) in &guards {
                match &**s {
                    Storage::Cpu(s) => args.push((s, *l)),
                    _ => candle_core::bail!("{NAME}: runs on the CPU only"),
                }
            }
            let heads = self.heads(args[0].1)?;
            let (b, h, t, d) = heads.dims;
            let grads = with_float!(args[0].0, "attention backward", |T| {
                type A = <T as Elem>::Acc;
                let [q, k, v, d_o] = [0, 1, 2, 3].map(|i| slice::<T>(args[i]));
                let (q, k, v, d_o) = (q?, k?, v?, d_o?);
                let lse: &[A] = candle_core::WithDType::cpu_storage_as_slice(&lse)?;
                let constants =
                    [&self.mask, &self.drop].map(|t| t.as_ref().map(Tensor::storage_and_layout));
                let (mask, drop) = (
                    values::<A, _>(&constants[0])?,
                    values::<A, _>(&constants[1])?,
                );
                let scale: A = crate::k(self.scale);
                let per_head: Vec<[Vec<A>; 3]> = (0..b * h)
                    .into_par_iter()
                    .map(|bh| {
                        let [q, k, v, d_o] = [q, k, v, d_o].map(|x| heads.gather(x, bh));
                        let mask = mask.as_ref().map(|m| &m[(bh / h) * t..][..t]);
                        let drop = drop.as_ref().map(|m| &m[bh * t * t..][..t * t]);
                        let lse = &lse[bh * t..][..t];
                        backward_head(&q, &k, &v, &d_o, lse, mask, drop, (t, d), scale)
                    })
                    .collect();
                let mut g = [0, 1, 2].map(|_| crate::zeros::<T>(b * t * h * d));
                for (bh, head) in per_head.iter().enumerate() {
                    for (g, src) in g.iter_mut().zip(head) {
                        heads.scatter(g, bh, src);
                    }
                }
                Ok::<_, candle_core::Error>(g.map(|g| {
                    let (s, shape) = out(g, (b, t, h * d));
                    crate::detached(Storage::Cpu(s), shape)
                }))
            })?;
            let [dq, dk, dv] = grads;
            Ok((Some(dq), Some(dk), Some(dv)))
        })
    }
}

/// The scores of one head: S = scale·Q·Kᵀ + mask (each key's), (T, T).
fn scores<A: GemmElem + Float>(
    s: &mut [A],
    q: &[A],
    k: &[A],
    mask: Option<&[A]>,
    (t, d): (usize, usize),
    scale: A,
) {
    matmul(
        s,
        false,
        Mat::new(q, t, d),
        Mat::new(k, t, d).t(),
        Parallelism::None,
    );
    for row in s.chunks_exact_mut(t) {
        match mask {
            Some(m) => row
                .iter_mut()
                .zip(m)
                .for_each(|(x, &m)| *x = *x * scale + m),
            None => row.iter_mut().for_each(|x| *x = *x * scale),
        }
    }
}

/// One head's o (T, D) and lse (T).
fn forward_head<A: GemmElem + Float + std::ops::AddAssign + std::ops::MulAssign + Exp>(
    q: &[A],
    k: &[A],
    v: &[A],
    mask: Option<&[A]>,
    drop: Option<&[A]>,
    (t, d): (usize, usize),
    scale: A,
) -> (Vec<A>, Vec<A>) {
    let mut p = vec![A::zero(); t * t];
    scores(&mut p, q, k, mask, (t, d), scale);
    let mut lse = vec![A::zero(); t];
    wide(|| {
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let m = row.iter().fold(A::neg_infinity(), |m, &x| m.max(x));
            row.iter_mut().for_each(|x| *x = (*x - m).vexp());
            let mut l = A::zero();
            row.iter().for_each(|&x| l += x);
            let r_l = l.recip();
            row.iter_mut().for_each(|x| *x *= r_l);
            if let Some(drop) = drop {
                let drop = &drop[i * t..][..t];
                row.iter_mut().zip(drop).for_each(|(x, &m)| *x *= m);
            }
            lse[i] = m + l.ln();
        }
    });
    let mut o = vec![A::zero(); t * d];
    matmul(
        &mut o,
        false,
        Mat::new(&p, t, t),
        Mat::new(v, t, d),
        Parallelism::None,
    );
    (o, lse)
}

/// One head's dq, dk, dv (see the module docs).
#[allow(clippy::too_many_arguments)]
fn backward_head<A: GemmElem + Float + std::ops::AddAssign + Exp>(
    q: &[A],
    k: &[A],
    v: &[A],
    d_o: &[A],
    lse: &[A],
    mask: Option<&[A]>,
    drop: Option<&[A]>,
    (t, d): (usize, usize),
    scale: A,
) -> [Vec<A>; 3] {
    let mut p = vec![A::zero(); t * t];
    scores(&mut p, q, k, mask, (t, d), scale);
    wide(|| {
        for (row, &lse) in p.chunks_exact_mut(t).zip(lse) {
            row.iter_mut().for_each(|x| *x = (*x - lse).vexp());
        }
    });
    // P̃ = P ∘ drop, for dV.
    let dropped: Vec<A> = match drop {
        Some(drop) => p.iter().zip(drop).map(|(&p, &m)| p * m).collect(),
        None => p.clone(),
    };
    let mut dv = vec![A::zero(); t * d];
    matmul(
        &mut dv,
        false,
        Mat::new(&dropped, t, t).t(),
        Mat::new(d_o, t, d),
        Parallelism::None,
    );
    // dP = (dO·Vᵀ) ∘ drop, then dS = P ∘ (dP − Σ_j P·dP) · scale in its place.
    let mut ds = vec![A::zero(); t * t];
    matmul(
        &mut ds,
        false,
        Mat::new(d_o, t, d),
        Mat::new(v, t, d).t(),
        Parallelism::None,
    );
    for (i, (ds, p)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
        if let Some(drop) = drop {
            ds.iter_mut()
                .zip(&drop[i * t..][..t])
                .for_each(|(x, &m)| *x = *x * m);
        }
        let mut delta = A::zero();
        for (&x, &p) in ds.iter().zip(p) {
            delta += x * p;
        }
        for (x, &p) in ds.iter_mut().zip(p) {
            *x = p * (*x - delta) * scale;
        }
    }
    let (mut dq, mut dk) = (vec![A::zero(); t * d], vec![A::zero(); t * d]);
    matmul(
        &mut dq,
        false,
        Mat::new(&ds, t, t),
        Mat::new(k, t, d),
        Parallelism::None,
    );
    matmul(
        &mut dk,
        false,
        Mat::new(&ds, t, t).t(),
        Mat::new(q, t, d),
        Parallelism::None,
    );
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, check_parity, max_abs_diff, rand};
    use crate::{reference, stats_dtype};
    use candle_core::DType;

    /// The composition the op replaces: heads split, scores, mask, softmax, dropout
    /// multiplier, P·V, heads merged.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n_head: usize,
        mask: &Tensor,
        drop: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, c) = q.dims3()?;
        let d = c / n_head;
        let heads = |x: &Tensor| x.reshape((b, t, n_head, d))?.transpose(1, 2)?.contiguous();
        let s = (heads(q)?.matmul(&heads(k)?.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let s = s.broadcast_add(&mask.reshape((b, 1, 1, t))?)?;
        let p = (reference::softmax(&s)? * drop)?;
        p.matmul(&heads(v)?)?.transpose(1, 2)?.reshape((b, t, c))
    }

    /// A padding mask (0 to attend, f32's most negative value to ignore) hiding the last
    /// key of every other sequence, and a dropout multiplier with p = 0.25.
    fn constants(b: usize, h: usize, t: usize) -> (Tensor, Tensor) {
        let mask: Vec<f64> = (0..b * t)
            .map(|i| {
                if i / t % 2 == 1 && i % t == t - 1 {
                    f32::MIN as f64
                } else {
                    0.0
                }
            })
            .collect();
        let drop: Vec<f64> = (0..b * h * t * t)
            .map(|i| if i % 4 == 1 { 0.0 } else { 1.0 / 0.75 })
            .collect();
        let dev = &candle_core::Device::Cpu;
        (
            Tensor::from_vec(mask, (b, t), dev).unwrap(),
            Tensor::from_vec(drop, (b, h, t, t), dev).unwrap(),
        )
    }

    #[test]
    fn matches_the_composition_in_every_dtype_and_finite_differences() {
        for ((b, t, c), h) in [((1, 1, 4), 1), ((2, 7, 12), 3), ((3, 65, 32), 2)] {
            let inputs = [
                rand(&[b, t, c], 1),
                rand(&[b, t, c], 2),
                rand(&[b, t, c], 3),
            ];
            let (mask, drop) = constants(b, h, t);
            let at = |x: &Tensor, like: &Tensor| x.to_dtype(stats_dtype(like.dtype())).unwrap();
            check_parity(
                &inputs,
                3,
                |x| {
                    let (m, d) = (at(&mask, &x[0]), at(&drop, &x[0]));
                    bidirectional_attention(&x[0], &x[1], &x[2], h, Some(&m), Some(&d))
                },
                |x| composed(&x[0], &x[1], &x[2], h, &mask, &drop),
            );
        }
        let (q, k, v) = (
            rand(&[2, 5, 6], 4),
            rand(&[2, 5, 6], 5),
            rand(&[2, 5, 6], 6),
        );
        let (mask, drop) = constants(2, 2, 5);
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            bidirectional_attention(q, k, v, 2, Some(&mask), Some(&drop))
        };
        check_grad(&q, |q| f(q, &k, &v));
        check_grad(&k, |k| f(&q, k, &v));
        check_grad(&v, |v| f(&q, &k, v));
        check_grad(&q, |q| bidirectional_attention(q, &k, &v, 3, None, None));
    }

    #[test]
    fn a_masked_key_changes_nothing_and_bad_constants_are_named() {
        let (q, k, v) = (
            rand(&[2, 5, 6], 7),
            rand(&[2, 5, 6], 8),
            rand(&[2, 5, 6], 9),
        );
        let (mask, _) = constants(2, 2, 5);
        let f = |k: &Tensor, v: &Tensor| bidirectional_attention(&q, k, v, 2, Some(&mask), None);
        // Sequence 1's last key is masked: bumping its key and value leaves every output equal.
        let bump = |x: &Tensor| {
            let last = (x.narrow(0, 1, 1).unwrap().narrow(1, 4, 1).unwrap() + 3.0).unwrap();
            let seq1 = Tensor::cat(
                &[&x.narrow(0, 1, 1).unwrap().narrow(1, 0, 4).unwrap(), &last],
                1,
            );
            Tensor::cat(&[&x.narrow(0, 0, 1).unwrap(), &seq1.unwrap()], 0).unwrap()
        };
        let (before, after) = (f(&k, &v).unwrap(), f(&bump(&k), &bump(&v)).unwrap());
        assert_eq!(max_abs_diff(&before, &after), 0.0);
        let short = mask.narrow(1, 0, 4).unwrap();
        let err = bidirectional_attention(&q, &k, &v, 2, Some(&short), None).unwrap_err();
        assert!(
            err.to_string().contains("expected 10 values in F64"),
            "{err}"
        );
        let err = bidirectional_attention(&q, &k, &v, 4, None, None).unwrap_err();
        assert!(
            err.to_string().contains("6 features are not 4 equal heads"),
            "{err}"
        );
        let f32_mask = mask.to_dtype(DType::F32).unwrap();
        assert!(bidirectional_attention(&q, &k, &v, 2, Some(&f32_mask), None).is_err());
    }
}
