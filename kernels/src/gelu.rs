//! GELU, tanh approximation (GPT-2's `gelu_new`):
//! 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). candle's `gelu` unary op computes exactly this and
//! carries a backward.

use candle_core::{Result, Tensor};

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
        let x = (rand(&[3, 11], 7) * 4.0).unwrap();
        let got: Vec<f64> = gelu(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for (v, g) in xs.iter().zip(got) {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * v * (1.0 + (c * (v + 0.044715 * v.powi(3))).tanh());
            assert!((want - g).abs() < 1e-12, "{v}: {want} vs {g}");
        }
        check_grad(&x, gelu);
    }
}
