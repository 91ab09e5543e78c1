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

/// `12,345` for 12345.4: counts and rates read at a glance.
pub fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    match v < 0.0 && digits != "0" {
        true => format!("-{out}"),
        false => out,
    }
}

/// `42.3 s`, `4m 05s`, `2h 03m`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    let s = seconds.round() as u64;
    match seconds {
        x if x < 60.0 => format!("{seconds:.1} s"),
        x if x < 3600.0 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// One metric as a log line shows it, with its unit and a precision that fits it: `lr 3.00e-4`,
/// `throughput 10,884 tok/s`, `eval/accuracy 91.25%`. `items` is what the run counts: `tokens`
/// or `examples`.
pub fn metric(key: &str, v: f64, items: &str) -> String {
    let unit = match items {
        "tokens" => "tok",
        _ => "ex",
    };
    let value = match key.rsplit('/').next().unwrap_or(key) {
        _ if v.is_nan() => "nan".to_string(),
        "lr" => format!("{v:.2e}"),
        "throughput" if v >= 100.0 => format!("{} {unit}/s", thousands(v)),
        "throughput" => format!("{v:.1} {unit}/s"),
        "tokens" | "examples" | "loss_scale" | "skipped_steps" => thousands(v),
        "seconds" => duration(v),
        "accuracy" => format!("{:.2}%", v * 100.0),
        "perplexity" | "epoch" | "all_reduce_ms" => format!("{v:.2}"),
        "grad_norm" => format!("{v:.3}"),
        _ => format!("{v:.4}"),
    };
    format!("{key} {value}")
}

/// A progress bar (step, loss, lr, throughput, ETA) on a terminal; plain log lines otherwise or
/// with `--quiet`.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    silent: bool,
    /// What the run counts: `tokens` or `examples`.
    items: &'static str,
}

impl Progress {
    /// `silent`: no bar and no lines at all.
    pub(crate) fn new(total: usize, quiet: bool, silent: bool, items: &'static str) -> Self {
        use std::io::IsTerminal;
        if silent || quiet || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                silent,
                items,
            };
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
            items,
        }
    }

    pub(crate) fn step(&self, loss: f64, lr: f64, rate: f64) {
        if let Some(bar) = &self.bar {
            let items = self.items;
            bar.set_message(format!(
                "{} {} {}",
                metric("loss", loss, items),
                metric("lr", lr, items),
                metric("throughput", rate, items).trim_start_matches("throughput ")
            ));
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
            .map(|(k, v)| metric(k, *v, self.items))
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

    #[test]
    fn log_values_carry_units_and_fitting_precision() {
        assert_eq!(
            metric("throughput", 10884.229, "tokens"),
            "throughput 10,884 tok/s"
        );
        assert_eq!(
            metric("throughput", 42.04, "examples"),
            "throughput 42.0 ex/s"
        );
        assert_eq!(metric("lr", 3e-4, "tokens"), "lr 3.00e-4");
        assert_eq!(
            metric("eval/accuracy", 0.91254, "examples"),
            "eval/accuracy 91.25%"
        );
        assert_eq!(
            metric("train/loss", 1.234567, "tokens"),
            "train/loss 1.2346"
        );
        assert_eq!(metric("tokens", 1234567.0, "tokens"), "tokens 1,234,567");
        assert_eq!(metric("train/loss", f64::NAN, "tokens"), "train/loss nan");
        assert_eq!(thousands(-1234.0), "-1,234");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(duration(42.31), "42.3 s");
        assert_eq!(duration(245.0), "4m 05s");
        assert_eq!(duration(7380.0), "2h 03m");
    }

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
