//! Causal self-attention: softmax(q·kᵀ/√d + mask)·v for q, k, v of shape (B, H, T, D), where the
//! mask hides future positions. This composition materializes the (T, T) scores; a fused kernel
//! keeps memory linear in T.

use crate::softmax;
use candle_core::{Result, Tensor};

/// An additive (T, T) mask: 0 on and below the diagonal, −∞ above it.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
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

pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let mask = causal_mask(t, q.device())?.to_dtype(q.dtype())?;
    let probs = softmax(&scores.broadcast_add(&mask)?)?;
    probs.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
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
        let (qs, ks, vs): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            q.flatten_all().unwrap().to_vec1().unwrap(),
            k.flatten_all().unwrap().to_vec1().unwrap(),
            v.flatten_all().unwrap().to_vec1().unwrap(),
        );
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
        check_grad(&q, |q| causal_self_attention(q, &k, &v));
        check_grad(&k, |k| causal_self_attention(&q, k, &v));
        check_grad(&v, |v| causal_self_attention(&q, &k, v));
    }
}
