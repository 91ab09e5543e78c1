//! Inverted dropout with a caller-owned, seeded generator: the mask is drawn on the host so runs
//! are reproducible on every device (candle's CPU generator cannot be seeded).

use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Zeroes each element with probability `p` and scales the rest by 1/(1−p).
pub fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn drops_and_rescales() {
        let x = Tensor::ones(10_000, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let y: Vec<f32> = dropout(&x, 0.25, &mut rng).unwrap().to_vec1().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let mean = y.iter().sum::<f32>() / y.len() as f32;
        assert!((mean - 1.0).abs() < 0.03);
        assert_eq!(
            dropout(&x, 0.0, &mut rng)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0; 10_000]
        );
    }
}
