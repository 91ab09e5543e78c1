//! What a run shows while it trains: the log window (loss and throughput since the last log
//! line) and the progress bar or plain log lines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Loss and throughput since the last log line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    loss_sum: f64,
    steps: usize,
    /// Examples (or tokens) drawn in the window.
    pub(crate) items: usize,
    seconds: f64,
}

impl Window {
    pub(crate) fn add(&mut self, loss: f64, seconds: f64) {
        self.loss_sum += loss;
        self.steps += 1;
        self.seconds += seconds;
    }
    pub(crate) fn mean_loss(&self) -> f64 {
        self.loss_sum / self.steps.max(1) as f64
    }
    /// Examples (or tokens) per second.
    pub(crate) fn rate(&self) -> f64 {
        self.items as f64 / self.seconds.max(1e-9)
    }
}

/// A progress bar (step, loss, lr, throughput, ETA) on a terminal; plain log lines otherwise or
/// with `--quiet`.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    silent: bool,
}

impl Progress {
    /// `silent`: no bar and no lines at all.
    pub(crate) fn new(total: usize, quiet: bool, silent: bool) -> Self {
        use std::io::IsTerminal;
        if silent || quiet || !std::io::stderr().is_terminal() {
            return Progress { bar: None, silent };
        }
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {pos}/{len} [{bar:30}] {msg} [{elapsed} < {eta}]",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Progress {
            bar: Some(bar),
            silent: false,
        }
    }

    pub(crate) fn step(&self, loss: f64, lr: f64, rate: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.0}/s"));
            bar.inc(1);
        }
    }

    pub(crate) fn line(&self, s: &str) {
        match &self.bar {
            Some(bar) => bar.println(s),
            None if self.silent => {}
            None => println!("{s}"),
        }
    }

    /// Log lines go to stdout with --quiet; eval lines are shown above the bar too.
    pub(crate) fn log(&self, step: usize, total: usize, values: &BTreeMap<String, f64>) {
        let is_eval = values
            .keys()
            .any(|k| !k.starts_with("train/") && k.contains('/'));
        if self.bar.is_some() && !is_eval {
            return;
        }
        let parts: Vec<String> = values
            .iter()
            .map(|(k, v)| {
                if k == "lr" {
                    format!("{k} {v:.3e}")
                } else {
                    format!("{k} {v:.4}")
                }
            })
            .collect();
        self.line(&format!("step {step}/{total} | {}", parts.join(" | ")));
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exact resume needs the half-filled log window back bit for bit: serde_json's default
    /// float parser can be one ulp off, hence its `float_roundtrip` feature.
    #[test]
    fn log_window_survives_the_state_file_bit_for_bit() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = Window {
                loss_sum: (x >> 11) as f64 / (1u64 << 53) as f64 * 10.0,
                steps: 3,
                items: 7,
                seconds: 0.5,
            };
            let back: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
            assert_eq!(
                back.loss_sum.to_bits(),
                w.loss_sum.to_bits(),
                "{}",
                w.loss_sum
            );
        }
    }
}
