//! e^x for the element-wise loops, in a form the compiler vectorizes: libm's `expf` is a call
//! per element, which keeps a loop scalar. For f32 it is Cephes' `expf` range reduction and
//! polynomial with the rounding done by adding 1.5·2²³ (no `floor`, so plain SSE2 vectorizes
//! it): within 2 ulp of libm over [−87, 88], inputs outside clamped to it (e^−87 ≈ 1.6e−38,
//! e^88 ≈ 1.7e38). f64 keeps libm's `exp`: it is the reference dtype of the parity tests.

pub trait Exp: Copy {
    fn vexp(self) -> Self;
}

impl Exp for f64 {
    #[inline(always)]
    fn vexp(self) -> f64 {
        self.exp()
    }
}

impl Exp for f32 {
    #[inline(always)]
    fn vexp(self) -> f32 {
        exp_f32(self)
    }
}

/// Runs `f` (an element-wise loop) in a function compiled for AVX-512 when the CPU has it, so
/// that the loop, inlined there, vectorizes 16 wide; the build's baseline is SSE2 (4 wide).
/// The results are the same bits either way: each lane does the scalar IEEE operations, and
/// Rust never fuses a multiply and an add on its own.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { avx512(f) };
    }
    f()
}

/// 1.5·2²³: adding it rounds an |x| < 2²² to an integer, held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from n's bits: t's low mantissa bits hold n + 2²² (two's complement wraps).
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e * f32::from_bits(((n_bits + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_two_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x), x.exp());
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
            x += 0.000_37;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) < 1e-37 && exp_f32(-1e4) >= 0.0);
        assert!(exp_f32(1e4).is_finite());
        assert!(exp_f32(f32::NEG_INFINITY) >= 0.0);
    }
}
