//! Mixed precision: which dtype the matmuls run in, and dynamic loss scaling for f16.
//!
//! bf16 has f32's exponent range, so its gradients neither underflow nor overflow and it needs
//! no scaling. f16's range is narrow (about 6e-8 to 65504): small gradients flush to zero. The
//! loss is multiplied by a scale before the backward and the gradients divided by it before the
//! update (folded into the optimizer's gradient factor). When a gradient overflows to inf/NaN
//! the step is skipped and the scale halved; after `growth_interval` clean steps it doubles.

use candle_core::DType;
use kiln_core::recipe::Precision;
use serde::{Deserialize, Serialize};

/// The dtype the matmuls (and attention) run in for a recipe's `precision`; weights, norms
/// and losses stay f32.
pub fn compute_dtype(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::F16 => DType::F16,
    }
}

/// Dynamic loss scaling (PyTorch's `GradScaler` defaults); saved with the trainer state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub clean_steps: u64,
    /// Steps skipped because a gradient overflowed.
    pub skipped_steps: u64,
    pub growth_interval: u64,
}

impl LossScaler {
    /// A scaler for f16 training; none for the other precisions.
    pub fn for_precision(p: Precision) -> Option<Self> {
        (p == Precision::F16).then_some(LossScaler {
            scale: 65536.0,
            clean_steps: 0,
            skipped_steps: 0,
            growth_interval: 2000,
        })
    }

    /// Records a step: `finite` tells whether every gradient was finite. Returns whether the
    /// update may be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            self.skipped_steps += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler::for_precision(Precision::F16).unwrap();
        s.growth_interval = 3;
        assert!(!s.update(false));
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 1));
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.clean_steps), (65536.0, 0));
        assert!(LossScaler::for_precision(Precision::Bf16).is_none());
    }
}
