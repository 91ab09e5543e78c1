//! Metrics: one JSON object per line in `metrics.jsonl`, and best/final tracking for
//! `summary.json`.

use crate::tensorboard::EventWriter;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Appends metric records to `metrics.jsonl`, flushing each line so a crash loses nothing, and
/// (with [`MetricsLog::with_tensorboard`]) the same scalars at the same steps to a TensorBoard
/// event file.
pub struct MetricsLog {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    tensorboard: Option<TensorBoard>,
}

/// The event file's folder, and its writer once something was written: a run that writes
/// nothing (a refused resume) leaves no empty event file behind.
struct TensorBoard {
    dir: std::path::PathBuf,
    writer: Option<EventWriter>,
}

impl MetricsLog {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(crate::fs::at(path))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            tensorboard: None,
        })
    }

    /// Writes every record to a new event file in `dir` too (made at the first record).
    pub fn with_tensorboard(mut self, dir: &Path) -> Self {
        self.tensorboard = Some(TensorBoard {
            dir: dir.to_path_buf(),
            writer: None,
        });
        self
    }

    /// The event writer, made on first use; None without [`Self::with_tensorboard`].
    fn events(&mut self) -> std::io::Result<Option<&mut EventWriter>> {
        let Some(tb) = &mut self.tensorboard else {
            return Ok(None);
        };
        if tb.writer.is_none() {
            tb.writer = Some(EventWriter::create(&tb.dir)?);
        }
        Ok(tb.writer.as_mut())
    }

    /// A text summary (e.g. the recipe) in the event file; nothing without one.
    pub fn text(&mut self, tag: &str, step: usize, text: &str) -> std::io::Result<()> {
        match self.events()? {
            Some(w) => w.text(tag, step as u64, text),
            None => Ok(()),
        }
    }

    /// Writes `{"step": step, name: value, ...}`, and the values as scalars at `step` to the
    /// event file.
    pub fn write(&mut self, step: usize, values: &BTreeMap<String, f64>) -> std::io::Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in values {
            obj.insert(k.clone(), json_number(*v));
        }
        serde_json::to_writer(&mut self.file, &Value::Object(obj))
            .map_err(std::io::Error::from)
            .map_err(crate::fs::at(&self.path))?;
        self.file
            .write_all(b"\n")
            .map_err(crate::fs::at(&self.path))?;
        self.file.flush().map_err(crate::fs::at(&self.path))?;
        match self.events()? {
            Some(w) => w.scalars(step as u64, values),
            None => Ok(()),
        }
    }
}

/// Metrics that measure the machine, not the training: they differ between two runs of one
/// recipe, so exactness checks (resume, `kiln verify`) leave them aside.
pub const TIMING_KEYS: &[&str] = &["throughput", "seconds", "all_reduce_ms"];

/// JSON has no NaN or infinity: write those as null.
pub fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Whether a larger value of this metric is better (accuracy) or a smaller one (loss).
pub fn higher_is_better(name: &str) -> bool {
    name.ends_with("accuracy") || name.ends_with("f1")
}

/// The last value of every metric and the best one of each eval metric.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tracker {
    pub last: BTreeMap<String, f64>,
    pub best: BTreeMap<String, f64>,
    pub best_step: BTreeMap<String, usize>,
}

impl Tracker {
    pub fn update(&mut self, step: usize, values: &BTreeMap<String, f64>) {
        for (k, &v) in values {
            self.last.insert(k.clone(), v);
            if !k.starts_with("eval/") || !v.is_finite() {
                continue;
            }
            let better = match self.best.get(k) {
                None => true,
                Some(&b) if higher_is_better(k) => v > b,
                Some(&b) => v < b,
            };
            if better {
                self.best.insert(k.clone(), v);
                self.best_step.insert(k.clone(), step);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_best_by_direction() {
        let mut t = Tracker::default();
        let m = |l: f64, a: f64| {
            BTreeMap::from([
                ("eval/loss".to_string(), l),
                ("eval/accuracy".to_string(), a),
            ])
        };
        t.update(1, &m(2.0, 0.5));
        t.update(2, &m(1.0, 0.4));
        t.update(3, &m(1.5, 0.6));
        assert_eq!(t.best["eval/loss"], 1.0);
        assert_eq!(t.best_step["eval/loss"], 2);
        assert_eq!(t.best["eval/accuracy"], 0.6);
        assert_eq!(t.last["eval/loss"], 1.5);
    }

    #[test]
    fn writes_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        log.write(5, &BTreeMap::from([("train/loss".to_string(), 1.25)]))
            .unwrap();
        log.write(6, &BTreeMap::from([("train/loss".to_string(), f64::NAN)]))
            .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["step"], 5);
        assert_eq!(lines[0]["train/loss"], 1.25);
        assert!(lines[1]["train/loss"].is_null());
        // Without an event folder, no event file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn writes_the_same_scalars_to_tensorboard() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join("tb");
        let mut log = MetricsLog::create(&dir.path().join("m.jsonl"))
            .unwrap()
            .with_tensorboard(&tb);
        assert!(!tb.exists(), "no event file before the first record");
        log.text("recipe", 0, "seed = 1").unwrap();
        log.write(5, &BTreeMap::from([("train/loss".to_string(), 1.25)]))
            .unwrap();
        log.write(6, &BTreeMap::from([("eval/loss".to_string(), f64::NAN)]))
            .unwrap();
        let s = crate::tensorboard::read_scalars(&tb).unwrap();
        assert_eq!(s["train/loss"], vec![(5, 1.25)]);
        assert_eq!(s["eval/loss"].len(), 1);
        assert!(s["eval/loss"][0].1.is_nan());
        let t = crate::tensorboard::read_texts(&tb).unwrap();
        assert_eq!(t["recipe"], vec![(0, "seed = 1".to_string())]);
        assert_eq!(crate::tensorboard::event_files(&tb).unwrap().len(), 1);
    }
}
