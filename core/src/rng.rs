//! Seeded parameter initialization.
//!
//! candle's CPU random generator cannot be seeded, so kiln creates every parameter itself: each
//! one is drawn from a ChaCha stream seeded by the run seed and the parameter's name. The values
//! are therefore the same on every run with the same seed, independent of the order in which a
//! model creates its layers.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The dropout stream shared between a model (whose dropout calls take numbers from it) and the
/// trainer (which checkpoints its position so a resumed run draws the same masks).
///
/// It is counter-based: a key fixed by `(seed, label)` and a position, the count of random
/// numbers handed out so far. A dropout call reserves a range of positions, and its mask is a
/// pure function of (key, position) (Philox4x32-10 in `kiln-kernels`), so every device draws
/// the same masks without a host-side generator, and rewinding the position replays them.
#[derive(Clone)]
pub struct SharedRng {
    key: [u32; 2],
    position: Arc<AtomicU64>,
}

impl SharedRng {
    pub fn new(seed: u64, label: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(seed.to_le_bytes())
            .chain_update(b"counter-stream/")
            .chain_update(label.as_bytes())
            .finalize();
        let word = |i: usize| {
            u32::from_le_bytes([
                digest[4 * i],
                digest[4 * i + 1],
                digest[4 * i + 2],
                digest[4 * i + 3],
            ])
        };
        SharedRng {
            key: [word(0), word(1)],
            position: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The stream's key (the same for every clone).
    pub fn key(&self) -> [u32; 2] {
        self.key
    }

    /// Reserves `n` numbers, rounded up to a multiple of 4 (one Philox block gives four), and
    /// returns the position of the first.
    pub fn reserve(&self, n: u64) -> u64 {
        self.position
            .fetch_add(n.next_multiple_of(4), Ordering::SeqCst)
    }

    /// Numbers handed out so far: with the seed, the stream's whole state.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    pub fn set_position(&self, pos: u64) {
        self.position.store(pos, Ordering::SeqCst)
    }
}

/// A ChaCha generator for `(seed, label)`: independent streams for independent purposes.
pub fn rng_for(seed: u64, label: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(label.as_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |std: f64, mean: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let d = Normal::new(mean, std).expect("finite std");
        (0..n).map(|_| d.sample(rng) as f32).collect()
    };
    let uniform = |lo: f64, up: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let d = Uniform::new(lo, up).expect("lo < up");
        (0..n).map(|_| d.sample(rng) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normal(stdev, mean, rng),
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(std, 0.0, rng),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "parameter {name} requested with shape {s:?} but exists as {:?}",
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let values = sample(h, &s, &mut rng_for(self.seed, name));
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let vars = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        vars.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

/// A VarBuilder that creates trainable parameters in `varmap`, initialized from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededInit {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// A VarBuilder over detached views of `varmap`'s tensors (same storage, no graph recorded
/// through them): the model that evaluation and generation run.
pub fn detached_var_builder(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    VarBuilder::from_tensors(tensors, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_regardless_of_order() {
        let dev = Device::Cpu;
        let build = |seed, names: &[&str]| {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
            for n in names {
                vb.get_with_hints(
                    (3, 4),
                    n,
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )
                .unwrap();
            }
            let data = vm.data().lock().unwrap();
            let mut out: Vec<(String, Vec<f32>)> = data
                .iter()
                .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        };
        let a = build(1, &["a", "b"]);
        assert_eq!(a, build(1, &["b", "a"]));
        assert_ne!(a, build(2, &["a", "b"]));
        assert_ne!(a[0].1, a[1].1, "each name has its own stream");
    }

    #[test]
    fn counter_stream_reserves_in_blocks_of_four() {
        let a = SharedRng::new(1, "dropout");
        let b = a.clone();
        assert_eq!(a.reserve(10), 0);
        assert_eq!(b.reserve(3), 12, "clones share the position");
        assert_eq!(a.position(), 16);
        a.set_position(4);
        assert_eq!(b.reserve(1), 4);
        assert_eq!(a.key(), SharedRng::new(1, "dropout").key());
        assert_ne!(a.key(), SharedRng::new(2, "dropout").key());
        assert_ne!(a.key(), SharedRng::new(1, "other").key());
    }

    #[test]
    fn init_statistics() {
        let mut rng = rng_for(0, "x");
        let v = sample(
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            &Shape::from(10_000),
            &mut rng,
        );
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 1e-3);
        assert_eq!(
            sample(Init::Const(1.0), &Shape::from(3), &mut rng),
            vec![1.0; 3]
        );
    }
}
