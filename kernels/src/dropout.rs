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
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: probability {p} is not in [0, 1)")
    }
    if !start.is_multiple_of(4) {
        candle_core::bail!("dropout: stream position {start} is not a multiple of 4")
    }
    let mask = MaskSpec {
        key,
        first_block: start / 4,
        threshold: threshold(p),
        scale: (1.0 / (1.0 - p)) as f32,
    };
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

/// Elements whose 32-bit draw is below this are dropped: round(p·2³²), so P(drop) = p to within
/// 2⁻³³.
fn threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).round() as u64
}

/// One dropout call's mask: what the CPU loop and the CUDA kernel are given.
pub(crate) struct MaskSpec {
    pub key: [u32; 2],
    /// Philox block of the call's first element.
    pub first_block: u64,
    pub threshold: u64,
    pub scale: f32,
}

impl MaskSpec {
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
