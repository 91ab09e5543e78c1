//! Inverted dropout with a counter-based generator: element `e` of a call is kept unless the
//! Philox4x32-10 output for (stream key, position + e) falls below p·2³², so a mask is a pure
//! function of the stream key and the positions the call reserved. The CPU and the GPU compute
//! the same masks bit for bit, each on its own device (no host→device copy of masks), and
//! rewinding the stream's position (resume, recomputation under checkpointing) replays them.
//!
//! Counter layout (shared with `cuda/dropout.cu`): position q belongs to the Philox block with
//! counter (q/4 as two u32 words, 0, 0) and is word q % 4 of its output; a call reserves whole
//! blocks (see `SharedRng::reserve`).

use candle_core::{DType, Device, Result, Shape, Storage, Tensor};
use kiln_core::rng::SharedRng;
use rayon::prelude::*;

/// Zeroes each element with probability `p` and scales the rest by 1/(1−p), drawing the mask
/// from `rng` (which advances by the element count).
pub fn dropout(x: &Tensor, p: f64, rng: &SharedRng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let start = rng.reserve(x.elem_count() as u64);
    x * dropout_mask(x.shape(), x.dtype(), x.device(), p, rng.key(), start)?
}

/// The mask dropout multiplies by: 0 where an element is dropped, 1/(1−p) (rounded to `dtype`
/// from f32) elsewhere, for the positions `start..start + shape.elem_count()` of stream `key`.
/// `start` must be a multiple of 4.
pub fn dropout_mask(
    shape: &Shape,
    dtype: DType,
    device: &Device,
    p: f64,
    key: [u32; 2],
    start: u64,
) -> Result<Tensor> {
    let mask = Draw { p, key, start }.spec()?;
    let n = shape.elem_count();
    let storage = match device {
        Device::Cpu => Storage::Cpu(match dtype {
            DType::F32 => candle_core::CpuStorage::F32(mask.cpu(n, |s| s)),
            DType::F64 => candle_core::CpuStorage::F64(mask.cpu(n, f64::from)),
            DType::BF16 => candle_core::CpuStorage::BF16(mask.cpu(n, half::bf16::from_f32)),
            DType::F16 => candle_core::CpuStorage::F16(mask.cpu(n, half::f16::from_f32)),
            other => candle_core::bail!("dropout: unsupported dtype {other:?}"),
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => Storage::Cuda(crate::cuda::dropout::mask(dev, n, dtype, &mask)?),
        _ => candle_core::bail!("dropout: unsupported device {device:?}"),
    };
    Ok(crate::detached(storage, shape.clone()))
}

/// Dropout drawn inside a fused op (attention's probabilities) instead of from a mask tensor:
/// element e of the op's (B, H, T, T) probabilities is multiplied by element e of
/// `dropout_mask(shape, F32, .., p, key, start)`, computed where it is used, so the op equals
/// the composition with that f32 mask (a bf16/f16 mask rounds 1/(1 − p); the op does not) and
/// never holds the B·H·T² multipliers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub p: f64,
    pub key: [u32; 2],
    /// Stream position of element 0, a multiple of 4.
    pub start: u64,
}

impl Draw {
    /// The draw for `n` elements at probability `p`, reserved from `rng` (None when p is 0, so
    /// the op runs its dropout-free kernels).
    pub fn reserve(p: f64, n: u64, rng: &SharedRng) -> Option<Self> {
        (p > 0.0).then(|| Draw {
            p,
            key: rng.key(),
            start: rng.reserve(n),
        })
    }

    /// What the kernels are given, after checking p and the start.
    pub(crate) fn spec(&self) -> Result<MaskSpec> {
        if !(0.0..1.0).contains(&self.p) {
            candle_core::bail!("dropout: probability {} is not in [0, 1)", self.p)
        }
        if !self.start.is_multiple_of(4) {
            candle_core::bail!(
                "dropout: stream position {} is not a multiple of 4",
                self.start
            )
        }
        Ok(MaskSpec {
            key: self.key,
            first_block: self.start / 4,
            threshold: threshold(self.p),
            scale: (1.0 / (1.0 - self.p)) as f32,
        })
    }
}

/// Elements whose 32-bit draw is below this are dropped: round(p·2³²), so P(drop) = p to within
/// 2⁻³³.
fn threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).round() as u64
}

/// One dropout call's mask: what the CPU loop and the CUDA kernel are given.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskSpec {
    pub key: [u32; 2],
    /// Philox block of the call's first element.
    pub first_block: u64,
    pub threshold: u64,
    pub scale: f32,
}

impl MaskSpec {
    /// The multipliers (0 or `scale`) of the call's elements e0, e0 + 1, … into `out`, one
    /// Philox block per four of them.
    pub(crate) fn fill<A: num_traits::Float>(&self, e0: u64, out: &mut [A]) {
        let keep = A::from(self.scale).unwrap_or_else(A::one);
        let mut e = e0;
        let mut rest = &mut out[..];
        while !rest.is_empty() {
            let block = self.first_block + e / 4;
            let r = philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], self.key);
            let word = (e % 4) as usize;
            let n = (4 - word).min(rest.len());
            let (now, later) = rest.split_at_mut(n);
            for (o, &r) in now.iter_mut().zip(&r[word..]) {
                *o = if (r as u64) < self.threshold {
                    A::zero()
                } else {
                    keep
                };
            }
            rest = later;
            e += n as u64;
        }
    }

    /// The mask on the CPU, four elements per Philox block, blocks in parallel.
    fn cpu<T: Copy + Send + Sync + Default>(
        &self,
        n: usize,
        from_f32: impl Fn(f32) -> T,
    ) -> Vec<T> {
        let (keep, drop) = (from_f32(self.scale), from_f32(0.0));
        let mut out = vec![T::default(); n];
        out.par_chunks_mut(4 * 1024)
            .enumerate()
            .for_each(|(chunk, out)| {
                for (i, quad) in out.chunks_mut(4).enumerate() {
                    let block = self.first_block + (chunk * 1024 + i) as u64;
                    let r = philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], self.key);
                    for (o, &r) in quad.iter_mut().zip(&r) {
                        *o = if (r as u64) < self.threshold {
                            drop
                        } else {
                            keep
                        };
                    }
                }
            });
        out
    }
}

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): ten
/// rounds of two 32×32→64-bit multiplies and a key bump; the same function as `philox` in
/// `cuda/dropout.cu`.
pub fn philox4x32_10(mut ctr: [u32; 4], [mut k0, mut k1]: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(0x9E37_79B9);
            k1 = k1.wrapping_add(0xBB67_AE85);
        }
        let p0 = M0 * ctr[0] as u64;
        let p1 = M1 * ctr[2] as u64;
        ctr = [
            (p1 >> 32) as u32 ^ ctr[1] ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ ctr[3] ^ k1,
            p0 as u32,
        ];
    }
    ctr
}

#[cfg(test)]
mod tests;
