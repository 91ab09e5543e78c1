//! Softmax over the last dimension, max-subtracted for stability. The max is detached: the
//! softmax is invariant to the shift, so its gradient through the max is zero anyway and
//! detaching saves the backward a reduction.

use candle_core::{Result, Tensor, D};

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
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
}
