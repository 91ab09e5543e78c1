//! A run's recorded metrics (`metrics.jsonl`) read back for plots, the report and `kiln runs`.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What the horizontal axis of a curve counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Step,
    /// Tokens (language models) or examples (classifiers) trained on.
    Items,
    /// Training seconds (evaluation and checkpoints not counted).
    Seconds,
}

impl XAxis {
    /// `step`, `tokens` (or `examples`), `seconds`.
    pub fn parse(s: &str) -> std::result::Result<XAxis, String> {
        match s {
            "step" | "steps" => Ok(XAxis::Step),
            "tokens" | "examples" => Ok(XAxis::Items),
            "seconds" | "time" => Ok(XAxis::Seconds),
            _ => Err(format!(
                "unknown x axis `{s}`: use step, tokens (examples for a classifier) or seconds"
            )),
        }
    }
}

/// The training-log columns that say how far a run has come: tokens or examples seen.
pub const ITEM_KEYS: [&str; 2] = ["tokens", "examples"];

/// One line of `metrics.jsonl`; JSON nulls (NaN, infinities) read as NaN.
#[derive(Debug, Clone)]
pub struct Row {
    pub step: usize,
    pub values: BTreeMap<String, f64>,
}

/// The metrics of one run directory.
#[derive(Debug, Clone)]
pub struct History {
    /// The run directory's name, as legends and tables show it.
    pub name: String,
    pub dir: PathBuf,
    pub rows: Vec<Row>,
}

/// The run directory's name for legends and tables.
pub fn run_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Refuses a path that is not a kiln run directory, saying what it is instead.
pub fn check_run_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("{} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!("{} is a file, not a kiln run directory", dir.display());
    }
    if !dir.join("recipe.toml").is_file() {
        bail!(
            "{} is not a kiln run directory (it has no recipe.toml); runs are the folders \
             `kiln train` writes, e.g. runs/<recipe>-<time>",
            dir.display()
        );
    }
    Ok(())
}

impl History {
    /// Reads `dir/metrics.jsonl`; a run that has logged nothing yet is an error.
    pub fn read(dir: &Path) -> Result<History> {
        let history = Self::read_lenient(dir)?;
        if history.rows.is_empty() {
            bail!(
                "{} has no metrics yet (metrics.jsonl is missing or empty): the run has not \
                 reached its first log step",
                dir.display()
            );
        }
        Ok(history)
    }

    /// As [`History::read`], but a run with no metrics yet has no rows.
    pub fn read_lenient(dir: &Path) -> Result<History> {
        check_run_dir(dir)?;
        let file = dir.join("metrics.jsonl");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        };
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            // A kill can tear the last line; every earlier line was flushed whole.
            let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line) else {
                if i + 1 == text.lines().count() {
                    break;
                }
                bail!(
                    "{} line {} is not a JSON object; the file is damaged",
                    file.display(),
                    i + 1
                );
            };
            let Some(step) = obj.get("step").and_then(|s| s.as_u64()) else {
                bail!("{} line {} has no step", file.display(), i + 1);
            };
            let values = obj
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| match v {
                    serde_json::Value::Number(n) => Some((k.clone(), n.as_f64()?)),
                    serde_json::Value::Null => Some((k.clone(), f64::NAN)),
                    _ => None,
                })
                .collect();
            rows.push(Row {
                step: step as usize,
                values,
            });
        }
        Ok(History {
            name: run_name(dir),
            dir: dir.to_path_buf(),
            rows,
        })
    }

    /// Every metric the run has logged.
    pub fn keys(&self) -> BTreeSet<String> {
        self.rows
            .iter()
            .flat_map(|r| r.values.keys().cloned())
            .collect()
    }

    /// The last value of each metric.
    pub fn last(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for r in &self.rows {
            out.extend(r.values.iter().map(|(k, v)| (k.clone(), *v)));
        }
        out
    }

    /// The last step logged.
    pub fn last_step(&self) -> Option<usize> {
        self.rows.last().map(|r| r.step)
    }

    /// What this run's item count is called: `tokens` or `examples` (`None` for runs logged
    /// before kiln recorded it).
    pub fn item_key(&self) -> Option<&'static str> {
        ITEM_KEYS
            .into_iter()
            .find(|k| self.rows.iter().any(|r| r.values.contains_key(*k)))
    }

    /// `(x, value)` for every logged value of `key`.
    pub fn series(&self, key: &str, x: XAxis) -> Result<Vec<(f64, f64)>> {
        let points: Vec<(usize, f64)> = self
            .rows
            .iter()
            .filter_map(|r| r.values.get(key).map(|v| (r.step, *v)))
            .collect();
        let x_key = match x {
            XAxis::Step => return Ok(points.iter().map(|&(s, v)| (s as f64, v)).collect()),
            XAxis::Items => self.item_key(),
            XAxis::Seconds => Some("seconds").filter(|k| self.keys().contains(*k)),
        };
        let Some(x_key) = x_key else {
            bail!(
                "{} was logged by a kiln that did not record tokens, examples or seconds; plot it \
                 with --x step",
                self.dir.display()
            );
        };
        // Training lines carry the x value; evaluation lines at other steps are placed by
        // interpolating between them.
        let known: Vec<(f64, f64)> = self
            .rows
            .iter()
            .filter_map(|r| r.values.get(x_key).map(|x| (r.step as f64, *x)))
            .collect();
        Ok(points
            .iter()
            .map(|&(s, v)| (interpolate(&known, s as f64), v))
            .collect())
    }
}

/// The piecewise-linear function through `known` (sorted by step) at `step`; beyond the ends
/// it continues the nearest segment (through the origin before the first point).
fn interpolate(known: &[(f64, f64)], step: f64) -> f64 {
    let mut points = vec![(0.0, 0.0)];
    points.extend(known.iter().copied().filter(|p| p.0 > 0.0));
    if points.len() < 2 {
        return 0.0;
    }
    let i = points
        .iter()
        .position(|p| p.0 >= step)
        .unwrap_or(points.len() - 1)
        .max(1);
    let ((s0, x0), (s1, x1)) = (points[i - 1], points[i]);
    if s1 == s0 {
        return x1;
    }
    x0 + (x1 - x0) * (step - s0) / (s1 - s0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(lines: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("recipe.toml"), "name = \"t\"\n").unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        dir
    }

    #[test]
    fn evaluation_points_sit_between_training_lines() {
        let dir = write_run(&[
            r#"{"step":10,"train/loss":2.0,"tokens":100,"seconds":1.0}"#,
            r#"{"step":15,"eval/loss":1.9}"#,
            r#"{"step":20,"train/loss":1.5,"tokens":200,"seconds":3.0}"#,
            r#"{"step":20,"eval/loss":1.4}"#,
        ]);
        let h = History::read(dir.path()).unwrap();
        assert_eq!(h.item_key(), Some("tokens"));
        assert_eq!(
            h.series("eval/loss", XAxis::Items).unwrap(),
            vec![(150.0, 1.9), (200.0, 1.4)]
        );
        assert_eq!(
            h.series("eval/loss", XAxis::Seconds).unwrap(),
            vec![(2.0, 1.9), (3.0, 1.4)]
        );
        assert_eq!(
            h.series("train/loss", XAxis::Step).unwrap(),
            vec![(10.0, 2.0), (20.0, 1.5)]
        );
        // Before the first training line: proportional from the origin.
        assert_eq!(interpolate(&[(10.0, 100.0), (20.0, 200.0)], 5.0), 50.0);
        // After the last: the last segment continued.
        assert_eq!(interpolate(&[(10.0, 100.0), (20.0, 300.0)], 30.0), 500.0);
    }

    #[test]
    fn nulls_read_as_nan_and_a_torn_last_line_is_dropped() {
        let dir = write_run(&[
            r#"{"step":1,"train/loss":null}"#,
            r#"{"step":2,"train/loss":1.0}"#,
            r#"{"step":3,"train/lo"#,
        ]);
        let h = History::read(dir.path()).unwrap();
        assert_eq!(h.rows.len(), 2);
        assert!(h.rows[0].values["train/loss"].is_nan());
        assert_eq!(h.last()["train/loss"], 1.0);
        let err = History::read(dir.path())
            .unwrap()
            .series("train/loss", XAxis::Seconds)
            .unwrap_err();
        assert!(err.to_string().contains("--x step"), "{err}");
    }

    #[test]
    fn refuses_what_is_not_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = History::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a kiln run directory"), "{err}");
        std::fs::write(dir.path().join("recipe.toml"), "").unwrap();
        let err = History::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no metrics yet"), "{err}");
        let damaged = write_run(&["{\"step\":1}", "garbage", "{\"step\":2}"]);
        let err = History::read(damaged.path()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
