//! Layer normalization over the last dimension: y = (x − mean) / sqrt(var + eps) · w + b.
//!
//! Statistics are computed in f32 (or wider) whatever the input dtype, so a low-precision
//! activation never loses the variance to rounding.

use candle_core::{DType, Result, Tensor, D};

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = normed.to_dtype(dtype)?.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, max_abs_diff, rand};

    /// Row-by-row scalar reference.
    fn reference(x: &[f64], w: &[f64], b: &[f64], c: usize, eps: f64) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / c as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                let r = 1.0 / (var + eps).sqrt();
                row.iter()
                    .enumerate()
                    .map(move |(i, v)| (v - mean) * r * w[i] + b[i])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn matches_reference_and_gradients() {
        let (x, w, b) = (rand(&[3, 5, 7], 1), rand(&[7], 2), rand(&[7], 3));
        let got = layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
        let want = reference(
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            &w.to_vec1().unwrap(),
            &b.to_vec1().unwrap(),
            7,
            1e-5,
        );
        let want = Tensor::from_vec(want, (3, 5, 7), x.device()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-12);
        check_grad(&x, |x| layer_norm(x, &w, Some(&b), 1e-5));
        check_grad(&w, |w| layer_norm(&x, w, Some(&b), 1e-5));
        check_grad(&b, |b| layer_norm(&x, &w, Some(b), 1e-5));
    }
}
