//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to
//! `min_lr_ratio · lr`.

use kiln_core::recipe::{ScheduleConfig, ScheduleName};

#[derive(Debug, Clone)]
pub struct Schedule {
    cfg: ScheduleConfig,
    lr: f64,
    decay_steps: usize,
}

impl Schedule {
    /// `total_steps` is the run's length, the default decay horizon.
    pub fn new(cfg: &ScheduleConfig, lr: f64, total_steps: usize) -> Self {
        Schedule {
            cfg: cfg.clone(),
            lr,
            decay_steps: cfg.decay_steps.unwrap_or(total_steps),
        }
    }

    /// Learning rate for the update at 0-based `step`.
    pub fn lr(&self, step: usize) -> f64 {
        let warmup = self.cfg.warmup_steps;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let min = self.lr * self.cfg.min_lr_ratio;
        let span = self.decay_steps.saturating_sub(warmup).max(1);
        let progress = ((step - warmup) as f64 / span as f64).min(1.0);
        match self.cfg.name {
            ScheduleName::Constant => self.lr,
            ScheduleName::Linear => self.lr - progress * (self.lr - min),
            ScheduleName::Cosine => {
                min + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - min)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(name: ScheduleName, warmup: usize) -> Schedule {
        let cfg = ScheduleConfig {
            name,
            warmup_steps: warmup,
            min_lr_ratio: 0.1,
            decay_steps: None,
        };
        Schedule::new(&cfg, 1.0, 110)
    }

    #[test]
    fn warmup_then_decay() {
        let s = sched(ScheduleName::Cosine, 10);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!(
            (s.lr(60) - 0.55).abs() < 1e-12,
            "halfway is the midpoint of lr and min"
        );
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12, "stays at the floor");
        let l = sched(ScheduleName::Linear, 10);
        assert!((l.lr(60) - 0.55).abs() < 1e-12);
        assert!((l.lr(35) - 0.775).abs() < 1e-12);
        let c = sched(ScheduleName::Constant, 0);
        assert_eq!(c.lr(0), 1.0);
        assert_eq!(c.lr(109), 1.0);
    }
}
