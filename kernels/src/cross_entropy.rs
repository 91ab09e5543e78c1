//! Mean cross-entropy of logits (N, V) against class ids (N,), through a max-shifted
//! log-softmax. Targets equal to `ignore_index` count neither in the sum nor in the mean.

use candle_core::{DType, Result, Tensor, D};

/// Targets with this id are ignored (as in PyTorch's default `ignore_index = -100`, seen as u32).
pub const IGNORE_INDEX: u32 = u32::MAX;

pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    // The loss is computed in f32 (f64 stays f64, for gradient checks).
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(dtype)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
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
}
