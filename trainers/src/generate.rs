//! Autoregressive sampling from a language model: greedy (temperature 0), temperature, top-k
//! and top-p (nucleus), reproducible under a seed.
//!
//! Decoders (GPT, Llama) run with a KV cache: the prompt is fed once, then one position per new
//! token. When the context fills up, the cache is rebuilt from the trailing half of the
//! context, so long generations cost one prefill per half-context of new tokens.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kiln_models::Model;
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::SeedableRng;

pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probabilities add up to at least this (1 = off).
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Stop after emitting this token (e.g. `<|endoftext|>`).
    pub stop: Option<u32>,
}

impl Sampling {
    /// Refuses settings that cannot sample (a negative temperature, top-p outside (0, 1]).
    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be ≥ 0 (0 = greedy), got {}",
            self.temperature
        );
        if let Some(p) = self.top_p {
            anyhow::ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1], got {p}");
        }
        Ok(())
    }
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
        "the prompt is empty: give at least one token"
    );
    anyhow::ensure!(context > 0, "the model has no context");
    s.check()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let mut tokens = prompt.to_vec();
    let last_logits = |logits: &Tensor| -> Result<Vec<f32>> {
        let t = logits.dim(1)?;
        Ok(logits
            .squeeze(0)?
            .get(t - 1)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    };
    let decoder = model.as_decoder();
    let mut cache = decoder.map(|d| d.new_cache());
    // Tokens fed to the model but not yet in the cache.
    let mut pending: Vec<u32> = tokens[tokens.len().saturating_sub(context)..].to_vec();
    for _ in 0..s.max_new_tokens {
        let logits = match (decoder, cache.as_mut()) {
            (Some(d), Some(cache)) => {
                if cache.len() + pending.len() > context {
                    // Full: start again from the trailing half-context.
                    *cache = d.new_cache();
                    pending = tokens[tokens.len().saturating_sub(context.div_ceil(2))..].to_vec();
                }
                let input = Tensor::new(pending.as_slice(), device)?.unsqueeze(0)?;
                d.forward_cached(&input, cache)?
            }
            _ => {
                let start = tokens.len().saturating_sub(context);
                let input = Tensor::new(&tokens[start..], device)?.unsqueeze(0)?;
                model.forward(&input, false)?
            }
        };
        let next = sample(&last_logits(&logits)?, s, &mut rng)?;
        tokens.push(next);
        pending = vec![next];
        emit(next);
        if s.stop == Some(next) {
            break;
        }
    }
    Ok(tokens)
}

fn sample(logits: &[f32], s: &Sampling, rng: &mut rand_chacha::ChaCha8Rng) -> Result<u32> {
    anyhow::ensure!(
        logits.iter().all(|l| !l.is_nan()),
        "the model produced NaN logits; its weights are damaged"
    );
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
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<f64> = logits
        .iter()
        .map(|&l| (((l - max) as f64) / s.temperature).exp())
        .collect();
    // Candidates by falling probability; top-k and top-p cut the tail.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut keep = order.len();
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        keep = keep.min(k);
    }
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        for (n, &i) in order.iter().enumerate().take(keep) {
            acc += weights[i] / total;
            if acc >= p {
                keep = n + 1;
                break;
            }
        }
    }
    for &i in &order[keep..] {
        weights[i] = 0.0;
    }
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
            top_p: None,
            seed: 0,
            stop: None,
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

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ∝ e^l: ≈ 0.64, 0.24, 0.09, 0.03.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let draw = |p: f64, rng: &mut rand_chacha::ChaCha8Rng| -> std::collections::BTreeSet<u32> {
            let s = Sampling {
                top_p: Some(p),
                ..sampling(1.0, None)
            };
            (0..400)
                .map(|_| sample(&logits, &s, rng).unwrap())
                .collect()
        };
        assert_eq!(draw(0.5, &mut rng).into_iter().collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            draw(0.8, &mut rng).into_iter().collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(draw(0.95, &mut rng).len(), 3);
        assert_eq!(draw(1.0, &mut rng).len(), 4);
        assert!(Sampling {
            top_p: Some(0.0),
            ..sampling(1.0, None)
        }
        .check()
        .is_err());
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use candle_core::DType;
    use kiln_models::gpt::{Gpt, GptConfig};
    use kiln_models::SharedRng;

    /// The same model without its KV cache: generation falls back to full forwards.
    struct Uncached(Gpt);
    impl Model for Uncached {
        fn forward(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
            self.0.forward(xs, train)
        }
    }

    fn gpt() -> Gpt {
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            block_size: 12,
            vocab_size: 9,
            dropout: 0.0,
            bias: true,
            checkpoint_activations: false,
        };
        let vm = candle_nn::VarMap::new();
        // A large init so the greedy path is not a constant token.
        let vb = kiln_core::rng::seeded_var_builder(&vm, 4, DType::F32, &Device::Cpu);
        let m = Gpt::new(&cfg, vb, SharedRng::new(0, "d"), DType::F32).unwrap();
        for v in vm.all_vars() {
            v.set(&(v.as_tensor() * 30.0).unwrap()).unwrap();
        }
        m
    }

    #[test]
    fn cached_generation_matches_full_forwards_and_runs_past_the_context() {
        let s = |n: usize, temperature: f64| Sampling {
            max_new_tokens: n,
            temperature,
            top_k: None,
            top_p: Some(0.9),
            seed: 3,
            stop: None,
        };
        let d = Device::Cpu;
        let cached = gpt();
        let plain = Uncached(gpt());
        for t in [0.0, 1.0] {
            let a = generate(&cached, &[1, 2, 3], 12, &s(9, t), &d, |_| {}).unwrap();
            let b = generate(&plain, &[1, 2, 3], 12, &s(9, t), &d, |_| {}).unwrap();
            assert_eq!(a, b, "temperature {t}");
            let distinct: std::collections::BTreeSet<_> = a.iter().collect();
            assert!(distinct.len() > 2, "{a:?}");
        }
        let long = generate(&cached, &[1, 2, 3], 12, &s(40, 1.0), &d, |_| {}).unwrap();
        assert_eq!(long.len(), 43);
        // Stops at the stop token.
        let first = generate(&cached, &[1, 2, 3], 12, &s(1, 0.0), &d, |_| {}).unwrap()[3];
        let stop = Sampling {
            stop: Some(first),
            ..s(10, 0.0)
        };
        assert_eq!(
            generate(&cached, &[1, 2, 3], 12, &stop, &d, |_| {})
                .unwrap()
                .len(),
            4
        );
    }
}
