//! Autoregressive sampling from a language model: temperature (0 = greedy) and top-k.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kiln_models::Model;
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::SeedableRng;

pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// Extends `prompt` by up to `max_new_tokens` tokens, calling `emit` with each new one. The
/// model sees at most `context` trailing tokens.
pub fn generate(
    model: &dyn Model,
    prompt: &[u32],
    context: usize,
    s: &Sampling,
    device: &Device,
    mut emit: impl FnMut(u32),
) -> Result<Vec<u32>> {
    anyhow::ensure!(
        !prompt.is_empty(),
        "the prompt is empty: give at least one character"
    );
    anyhow::ensure!(
        s.temperature >= 0.0 && s.temperature.is_finite(),
        "--temperature must be ≥ 0 (0 = greedy), got {}",
        s.temperature
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let mut tokens = prompt.to_vec();
    for _ in 0..s.max_new_tokens {
        let start = tokens.len().saturating_sub(context);
        let input = Tensor::new(&tokens[start..], device)?.unsqueeze(0)?;
        let logits = model.forward(&input, false)?;
        let last: Vec<f32> = logits
            .squeeze(0)?
            .get(tokens.len() - start - 1)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let next = sample(&last, s, &mut rng)?;
        tokens.push(next);
        emit(next);
    }
    Ok(tokens)
}

fn sample(logits: &[f32], s: &Sampling, rng: &mut rand_chacha::ChaCha8Rng) -> Result<u32> {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .expect("non-empty vocabulary")
    };
    if s.temperature == 0.0 {
        return Ok(argmax());
    }
    let mut cutoff = f32::NEG_INFINITY;
    if let Some(k) = s.top_k.filter(|&k| k > 0 && k < logits.len()) {
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        cutoff = sorted[k - 1];
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| {
            if l < cutoff {
                0.0
            } else {
                (((l - max) as f64) / s.temperature).exp()
            }
        })
        .collect();
    let dist = WeightedIndex::new(&weights)?;
    Ok(dist.sample(rng) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: Option<usize>) -> Sampling {
        Sampling {
            max_new_tokens: 1,
            temperature,
            top_k,
            seed: 0,
        }
    }

    #[test]
    fn greedy_and_top_k() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&logits, &sampling(0.0, None), &mut rng).unwrap(), 1);
        // With top-2 only ids 1 and 2 can come out, and both do.
        let got: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| sample(&logits, &sampling(1.0, Some(2)), &mut rng).unwrap())
            .collect();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![1, 2]);
        // A high temperature reaches every token.
        let got: std::collections::BTreeSet<u32> = (0..500)
            .map(|_| sample(&logits, &sampling(50.0, None), &mut rng).unwrap())
            .collect();
        assert_eq!(got.len(), 4);
    }
}
