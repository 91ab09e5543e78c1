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
mod tests {
    use super::*;

    /// Random123's `tests/kat_vectors`, the three `philox4x32 10` lines (counter, key, output).
    #[test]
    fn philox_matches_the_known_answers() {
        let cases = [
            (
                [0u32; 4],
                [0u32; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
        }
    }

    #[test]
    fn drops_and_rescales() {
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        let rng = SharedRng::new(0, "dropout");
        let y: Vec<f32> = dropout(&x, 0.25, &rng).unwrap().to_vec1().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let mean = y.iter().sum::<f32>() / y.len() as f32;
        assert!((mean - 1.0).abs() < 0.03);
        assert_eq!(rng.position(), 10_000);
        let same: Vec<f32> = dropout(&x, 0.0, &rng).unwrap().to_vec1().unwrap();
        assert_eq!(same, vec![1.0; 10_000]);
        assert_eq!(rng.position(), 10_000, "p = 0 draws nothing");
    }

    #[test]
    fn a_mask_is_a_function_of_key_and_position() {
        let shape = Shape::from((3, 333));
        let mask = |key, start| -> Vec<f32> {
            dropout_mask(&shape, DType::F32, &Device::Cpu, 0.5, key, start)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let a = mask([1, 2], 8);
        assert_eq!(a, mask([1, 2], 8), "same key and position, same mask");
        assert_ne!(a, mask([1, 3], 8), "another key");
        // Position 8 + 4 is where the mask from 8 continues after one block.
        assert_eq!(a[4..], mask([1, 2], 12)[..a.len() - 4]);
        // Replaying a stream: rewinding the position gives the same draws again.
        let rng = SharedRng::new(3, "dropout");
        let x = Tensor::ones((7, 9), DType::F32, &Device::Cpu).unwrap();
        let first = dropout(&x, 0.3, &rng).unwrap();
        let second = dropout(&x, 0.3, &rng).unwrap();
        rng.set_position(0);
        let replay = dropout(&x, 0.3, &rng).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&first), v(&replay));
        assert_ne!(v(&first), v(&second));
    }

    #[test]
    fn every_dtype_draws_the_same_mask() {
        let shape = Shape::from(1001);
        let m = |dtype| {
            dropout_mask(&shape, dtype, &Device::Cpu, 0.1, [7, 9], 4)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let f32_mask = m(DType::F32);
        for dtype in [DType::F64, DType::BF16, DType::F16] {
            let other = m(dtype);
            for (a, b) in f32_mask.iter().zip(&other) {
                assert_eq!(*a == 0.0, *b == 0.0, "{dtype:?}");
                assert!((a - b).abs() <= 1e-2 * a.abs(), "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradient_is_the_same_mask() {
        let x = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, 64.0, &Device::Cpu)
                .unwrap()
                .reshape((8, 8))
                .unwrap(),
        )
        .unwrap();
        let rng = SharedRng::new(1, "dropout");
        let y = dropout(x.as_tensor(), 0.5, &rng).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mask = dropout_mask(
            &Shape::from((8, 8)),
            DType::F32,
            &Device::Cpu,
            0.5,
            rng.key(),
            0,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(g, mask);
    }

    #[test]
    fn bad_probability_and_position_are_errors() {
        let s = Shape::from(4);
        let e = dropout_mask(&s, DType::F32, &Device::Cpu, 1.0, [0, 0], 0).unwrap_err();
        assert!(e.to_string().contains("not in [0, 1)"), "{e}");
        let e = dropout_mask(&s, DType::F32, &Device::Cpu, 0.5, [0, 0], 2).unwrap_err();
        assert!(e.to_string().contains("multiple of 4"), "{e}");
    }
}
