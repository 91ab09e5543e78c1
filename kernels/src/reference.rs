//! The ops as compositions of plain candle tensor ops, whose backward candle derives. They are
//! slow (many passes, intermediate tensors, the (T, T) attention scores) but easy to read: the
//! fused kernels are tested against them, and `benches/kernels.rs` measures against them.
//! Their own tests check them against scalar loops and finite differences.

use crate::IGNORE_INDEX;
use candle_core::{DType, Device, Result, Tensor, D};

/// f32 for the 16-bit types (norm statistics, softmax sums and losses stay in f32).
fn wide(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = wide(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = normed.broadcast_mul(&wide(weight)?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&wide(b)?)?,
        None => y,
    };
    y.to_dtype(dtype)
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = wide(x)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.broadcast_mul(&wide(weight)?)?.to_dtype(dtype)
}

/// Softmax over the last dimension, max-subtracted. The max is detached: softmax is invariant
/// to the shift, so its gradient through the max is zero anyway.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}

/// An additive (T, T) mask: 0 on and below the diagonal, −∞ above it.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// softmax(q·kᵀ/√d + mask)·v for q, k, v of shape (B, H, T, D).
pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    causal_probabilities(q, k)?.matmul(v)
}

/// [`causal_self_attention`] with the probabilities multiplied by `drop` (B, H, T, T), a
/// dropout mask.
pub fn causal_self_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    drop: &Tensor,
) -> Result<Tensor> {
    (causal_probabilities(q, k)? * drop)?.matmul(v)
}

fn causal_probabilities(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let mask = causal_mask(t, q.device())?.to_dtype(q.dtype())?;
    softmax(&scores.broadcast_add(&mask)?)
}

/// Mean cross-entropy of logits (N, V) against ids (N,), ignoring `IGNORE_INDEX` targets; f32
/// (f64 for f64 logits).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = wide(logits)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let keep = targets.ne(IGNORE_INDEX)?;
    let safe_targets = keep.where_cond(targets, &targets.zeros_like()?)?;
    let picked = shifted.gather(&safe_targets.unsqueeze(1)?, 1)?;
    let nll = (log_z - picked)?.squeeze(1)?;
    let keep_f = keep.to_dtype(nll.dtype())?;
    let count = keep_f.sum_all()?.maximum(1.0)?;
    (nll * keep_f)?.sum_all()?.div(&count)
}

/// GELU, tanh approximation: ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). (candle's `gelu`
/// computes the same forward, but its backward rounds the constants to six digits.)
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * 0.797_884_560_802_865_4)?;
    (x * 0.5)? * (inner.tanh()? + 1.0)?
}

pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    gelu(&x.broadcast_add(b)?)
}

/// Rows of `weight` (V, C) picked by `ids`.
pub fn embedding(ids: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let c = weight.dim(1)?;
    let mut shape = ids.dims().to_vec();
    shape.push(c);
    weight.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// One AdamW step as tensor ops (what `trainers` did before the fused kernel): returns the new
/// (param, m, v) instead of updating in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    weight_decay: f64,
    h: &crate::AdamWHyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let g = (grad.to_dtype(DType::F32)? * h.grad_scale as f64)?;
    let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let lr = h.lr as f64;
    let denom = ((&v / h.bias_correction2 as f64)?.sqrt()? + h.eps as f64)?;
    let update = ((&m * (lr / h.bias_correction1 as f64))? / denom)?;
    let p = ((param * (1.0 - lr * weight_decay))? - update)?;
    Ok((p, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, max_abs_diff, rand};

    #[test]
    fn layer_norm_matches_scalar_loop() {
        let (x, w, b) = (rand(&[3, 5, 7], 1), rand(&[7], 2), rand(&[7], 3));
        let got = layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
        let (xs, ws, bs): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            x.flatten_all().unwrap().to_vec1().unwrap(),
            w.to_vec1().unwrap(),
            b.to_vec1().unwrap(),
        );
        let want: Vec<f64> = xs
            .chunks(7)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / 7.0;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 7.0;
                let r = 1.0 / (var + 1e-5).sqrt();
                (0..7)
                    .map(|i| (row[i] - mean) * r * ws[i] + bs[i])
                    .collect::<Vec<_>>()
            })
            .collect();
        let want = Tensor::from_vec(want, (3, 5, 7), x.device()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-12);
        check_grad(&x, |x| layer_norm(x, &w, Some(&b), 1e-5));
    }

    #[test]
    fn softmax_matches_scalar_loop() {
        let x = (rand(&[4, 9], 5) * 30.0).unwrap(); // large logits exercise the max shift
        let got: Vec<Vec<f64>> = softmax(&x).unwrap().to_vec2().unwrap();
        for (row, g) in x.to_vec2::<f64>().unwrap().iter().zip(&got) {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for (v, p) in row.iter().zip(g) {
                assert!(((v - m).exp() / z - p).abs() < 1e-12);
            }
        }
        check_grad(&rand(&[4, 9], 6), softmax);
    }

    #[test]
    fn attention_matches_scalar_loop() {
        let (b, h, t, d) = (2, 3, 5, 4);
        let (q, k, v) = (
            rand(&[b, h, t, d], 1),
            rand(&[b, h, t, d], 2),
            rand(&[b, h, t, d], 3),
        );
        let got: Vec<f64> = causal_self_attention(&q, &k, &v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat = |x: &Tensor| -> Vec<f64> { x.flatten_all().unwrap().to_vec1().unwrap() };
        let (qs, ks, vs) = (flat(&q), flat(&k), flat(&v));
        for bh in 0..b * h {
            let at = |x: &[f64], i: usize, j: usize| x[(bh * t + i) * d + j];
            for i in 0..t {
                // Query i sees keys 0..=i only.
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d).map(|c| at(&qs, i, c) * at(&ks, j, c)).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let want: f64 = (0..=i).map(|j| (s[j] - m).exp() / z * at(&vs, j, c)).sum();
                    assert!((want - got[(bh * t + i) * d + c]).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn cross_entropy_matches_scalar_loop() {
        let logits = (rand(&[6, 5], 11) * 5.0).unwrap();
        let t = Tensor::new(&[0u32, 4, 2, IGNORE_INDEX, 1, 3], logits.device()).unwrap();
        let got = cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let rows = logits.to_vec2::<f64>().unwrap();
        let (mut sum, mut n) = (0.0, 0.0);
        for (row, &y) in rows.iter().zip(&[0usize, 4, 2, usize::MAX, 1, 3]) {
            if y == usize::MAX {
                continue;
            }
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            sum += z.ln() - row[y];
            n += 1.0;
        }
        assert!((got - sum / n).abs() < 1e-12, "{got} vs {}", sum / n);
        check_grad(&logits, |l| cross_entropy(l, &t));
    }

    #[test]
    fn rms_norm_matches_scalar_loop() {
        let (x, w) = (rand(&[4, 6], 21), rand(&[6], 22));
        let got: Vec<Vec<f64>> = rms_norm(&x, &w, 1e-6).unwrap().to_vec2().unwrap();
        let ws: Vec<f64> = w.to_vec1().unwrap();
        for (row, g) in x.to_vec2::<f64>().unwrap().iter().zip(&got) {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / 6.0 + 1e-6).sqrt();
            for i in 0..6 {
                assert!((row[i] * r * ws[i] - g[i]).abs() < 1e-12);
            }
        }
    }
}
