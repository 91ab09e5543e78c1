//! `kiln runs`: what each run directory holds — status, progress, metrics, time, device — read
//! from its files, never guessed: `summary.json` (finished), `stopped.json` (stopped cleanly),
//! the lock a training process holds (running, with its pid); none of these: the process died.

use crate::history::{check_run_dir, History};
use crate::progress::{duration, metric, thousands};
use crate::run::{changed_keys, lock_holder, STOPPED_FILE};
use anyhow::{bail, Context, Result};
use kiln_core::metrics::higher_is_better;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// A kiln process holds the run's lock (its pid, when readable).
    Running(Option<u32>),
    Finished,
    /// Stopped by a signal after a checkpoint: `kiln train --resume` continues it.
    Stopped,
    /// No process holds it, it did not finish and was not stopped: killed, or ended by an error.
    Crashed,
}

impl Status {
    pub fn of(dir: &Path) -> Status {
        // This process holds the lock while it writes a finished run's report: its files say.
        let holder = lock_holder(dir).filter(|pid| *pid != Some(std::process::id()));
        if let Some(pid) = holder {
            return Status::Running(pid);
        }
        if dir.join("summary.json").is_file() {
            Status::Finished
        } else if dir.join(STOPPED_FILE).is_file() {
            Status::Stopped
        } else {
            Status::Crashed
        }
    }

    pub fn word(&self) -> &'static str {
        match self {
            Status::Running(_) => "running",
            Status::Finished => "finished",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
        }
    }
}

/// One run, as `kiln runs` lists it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub name: String,
    pub dir: PathBuf,
    pub recipe: String,
    pub status: Status,
    pub step: Option<usize>,
    /// `trainer.max_steps`, or the steps a finished epoch-based run took.
    pub total: Option<usize>,
    /// The metric `trainer.best_metric` names (default `eval/loss`).
    pub primary: String,
    pub last: BTreeMap<String, f64>,
    pub best: BTreeMap<String, f64>,
    pub wall_seconds: Option<f64>,
    pub device: Option<String>,
    /// Tokens or examples per second.
    pub throughput: Option<f64>,
    /// `tokens` or `examples`.
    pub items: &'static str,
    pub summary: Option<Value>,
    /// The resolved recipe, as a TOML table.
    pub recipe_table: toml::Table,
}

fn read_json(p: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(p) {
        Ok(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("{} is corrupt", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

impl RunInfo {
    pub fn read(dir: &Path) -> Result<RunInfo> {
        check_run_dir(dir)?;
        let recipe_file = dir.join("recipe.toml");
        let text = std::fs::read_to_string(&recipe_file)
            .with_context(|| format!("cannot read {}", recipe_file.display()))?;
        let recipe_table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", recipe_file.display()))?;
        let history = History::read_lenient(dir)?;
        let summary = read_json(&dir.join("summary.json"))?;
        let record = read_json(&dir.join(crate::run::RECORD_FILE))?;
        let trainer = recipe_table.get("trainer").and_then(|t| t.as_table());
        let primary = trainer
            .and_then(|t| t.get("best_metric"))
            .and_then(|v| v.as_str())
            .unwrap_or("eval/loss")
            .to_string();
        let summary_num = |k: &str| summary.as_ref().and_then(|s| s[k].as_f64());
        let total = trainer
            .and_then(|t| t.get("max_steps"))
            .and_then(|v| v.as_integer())
            .map(|n| n as usize)
            .or(summary_num("steps").map(|n| n as usize));
        let last = history.last();
        let best = best_values(&history);
        let items = match recipe_table.get("task").and_then(|t| t.as_str()) {
            Some("classification") => "examples",
            _ => "tokens",
        };
        let throughput = summary_num("tokens_per_second")
            .or(summary_num("samples_per_second"))
            .or(last.get("throughput").copied());
        Ok(RunInfo {
            name: history.name.clone(),
            dir: dir.to_path_buf(),
            recipe: recipe_table
                .get("name")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string(),
            status: Status::of(dir),
            step: history.last_step(),
            total,
            primary,
            best,
            wall_seconds: summary_num("wall_seconds").or(last.get("seconds").copied()),
            device: summary
                .as_ref()
                .or(record.as_ref())
                .and_then(|s| s["device"].as_str())
                .map(String::from),
            last,
            throughput,
            items,
            summary,
            recipe_table,
        })
    }

    fn to_json(&self) -> Value {
        let map = |m: &BTreeMap<String, f64>| {
            Value::Object(
                m.iter()
                    .filter(|(k, _)| k.starts_with("eval/") || k.starts_with("test/"))
                    .map(|(k, v)| (k.clone(), kiln_core::metrics::json_number(*v)))
                    .collect(),
            )
        };
        json!({
            "name": self.name,
            "dir": self.dir,
            "recipe": self.recipe,
            "status": self.status.word(),
            "pid": match self.status { Status::Running(pid) => json!(pid), _ => Value::Null },
            "step": self.step,
            "total_steps": self.total,
            "final": map(&self.last),
            "best": map(&self.best),
            "wall_seconds": self.wall_seconds,
            "device": self.device,
            "throughput": self.throughput,
            "throughput_unit": format!("{}/s", self.items),
        })
    }
}

/// The best value of every `eval/*` and `test/*` metric over the run.
fn best_values(h: &History) -> BTreeMap<String, f64> {
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    for row in &h.rows {
        for (k, &v) in &row.values {
            if !(k.starts_with("eval/") || k.starts_with("test/")) || !v.is_finite() {
                continue;
            }
            let better = best.get(k).is_none_or(|&b| match higher_is_better(k) {
                true => v > b,
                false => v < b,
            });
            if better {
                best.insert(k.clone(), v);
            }
        }
    }
    best
}

/// What [`list`] found: the runs it could read, and the folders it could not, with why (one
/// damaged run does not hide the others).
pub struct Listing {
    pub runs: Vec<RunInfo>,
    pub unreadable: Vec<(PathBuf, anyhow::Error)>,
}

/// Every run directory directly inside `root`, oldest first (folders without a recipe.toml are
/// not runs and are passed over).
pub fn list(root: &Path) -> Result<Listing> {
    if !root.is_dir() {
        bail!(
            "{} is not a folder of runs; `kiln train` writes its runs to runs/ by default, or \
             give the folder: kiln runs DIR",
            root.display()
        );
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("recipe.toml").is_file())
        .collect();
    dirs.sort();
    let mut listing = Listing {
        runs: Vec::new(),
        unreadable: Vec::new(),
    };
    for d in dirs {
        match RunInfo::read(&d) {
            Ok(r) => listing.runs.push(r),
            Err(e) => listing.unreadable.push((d, e)),
        }
    }
    Ok(listing)
}

/// Orders runs by the final value of `metric`, best first (by its direction); runs without it
/// (or with NaN) last. An unknown metric is refused with the ones the runs have.
pub fn sort(runs: &mut [RunInfo], metric: &str) -> Result<()> {
    let known: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| r.last.keys()).collect();
    if !runs.is_empty() && !known.contains(&metric.to_string()) {
        let names: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
        bail!(
            "--sort {metric}: no run logged it; they logged: {}",
            names.join(", ")
        );
    }
    let up = higher_is_better(metric);
    // A NaN (a diverged run) sorts with the runs that lack the metric.
    let value = |r: &RunInfo| r.last.get(metric).copied().filter(|v| !v.is_nan());
    runs.sort_by(|a, b| {
        let (x, y) = (value(a), value(b));
        match (x, y) {
            (Some(x), Some(y)) if up => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    });
    Ok(())
}

/// The runs as a JSON array.
pub fn to_json(runs: &[RunInfo]) -> Value {
    Value::Array(runs.iter().map(RunInfo::to_json).collect())
}

/// The runs as an aligned text table.
pub fn table(runs: &[RunInfo]) -> String {
    // One metric for all runs goes in the header; otherwise each cell names its own.
    let shared = runs
        .first()
        .map(|r| r.primary.clone())
        .filter(|p| runs.iter().all(|r| &r.primary == p));
    let value = |r: &RunInfo, m: &BTreeMap<String, f64>| {
        let shown = m.get(&r.primary).map(|v| metric(&r.primary, *v, r.items));
        match (shown, &shared) {
            (None, _) => "-".into(),
            (Some(s), Some(p)) => s.trim_start_matches(&format!("{p} ")).to_string(),
            (Some(s), None) => s,
        }
    };
    let (final_head, best_head) = match &shared {
        Some(p) => (format!("final {p}"), format!("best {p}")),
        None => ("final".into(), "best".into()),
    };
    let header = [
        "run",
        "recipe",
        "status",
        "step",
        &final_head,
        &best_head,
        "time",
        "device",
        "throughput",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in runs {
        let status = match r.status {
            Status::Running(Some(pid)) => format!("running (pid {pid})"),
            ref s => s.word().into(),
        };
        let step = match (r.step, r.total) {
            (Some(s), Some(t)) => format!("{s}/{t}"),
            (Some(s), None) => s.to_string(),
            (None, Some(t)) => format!("0/{t}"),
            (None, None) => "-".into(),
        };
        rows.push(vec![
            r.name.clone(),
            r.recipe.clone(),
            status,
            step,
            value(r, &r.last),
            value(r, &r.best),
            r.wall_seconds.map_or("-".into(), duration),
            r.device.clone().unwrap_or_else(|| "-".into()),
            r.throughput.map_or("-".into(), |t| {
                let unit = if r.items == "tokens" { "tok" } else { "ex" };
                format!("{} {unit}/s", thousands(t))
            }),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

/// `kiln runs --diff A B`: the recipe keys that differ (with both values) and the metric deltas.
pub fn diff(a: &Path, b: &Path) -> Result<String> {
    let (x, y) = (RunInfo::read(a)?, RunInfo::read(b)?);
    let mut out = format!("A = {}\nB = {}\n\nrecipe:\n", a.display(), b.display());
    let (tx, ty) = (
        toml::Value::Table(x.recipe_table.clone()),
        toml::Value::Table(y.recipe_table.clone()),
    );
    let keys = changed_keys(&tx, &ty);
    if keys.is_empty() {
        out += "  identical\n";
    }
    let lookup = |t: &toml::Value, key: &str| -> String {
        key.split('.')
            .try_fold(t, |v, k| v.get(k))
            .map_or("(absent)".into(), |v| v.to_string())
    };
    for k in &keys {
        out += &format!("  {k}: {} → {}\n", lookup(&tx, k), lookup(&ty, k));
    }
    out += "\nmetrics (final; B − A):\n";
    let names: std::collections::BTreeSet<&String> = x
        .last
        .keys()
        .chain(y.last.keys())
        .filter(|k| k.starts_with("eval/") || k.starts_with("test/") || *k == "train/loss")
        .collect();
    if names.is_empty() {
        out += "  neither run has logged a metric yet\n";
    }
    for k in names {
        let show = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let (va, vb) = (x.last.get(k), y.last.get(k));
        let delta = match (va, vb) {
            (Some(p), Some(q)) => {
                let d = q - p;
                let better = match higher_is_better(k) {
                    true => d > 0.0,
                    false => d < 0.0,
                };
                let note = match d == 0.0 {
                    true => "",
                    false if better => " (B better)",
                    false => " (A better)",
                };
                format!("{d:+.4}{note}")
            }
            _ => "-".into(),
        };
        out += &format!("  {k}: {} → {}   {delta}\n", show(va), show(vb));
    }
    let time = |r: &RunInfo| r.wall_seconds.map_or("-".into(), duration);
    out += &format!(
        "\nstatus: {} → {}; time: {} → {}\n",
        x.status.word(),
        y.status.word(),
        time(&x),
        time(&y)
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(root: &Path, name: &str, loss: f64, finished: bool) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("recipe.toml"),
            format!(
                "name = \"{name}\"\ntask = \"language_model\"\n[trainer]\nmax_steps = 10\n\
                 [optim]\nlr = {}\n",
                loss / 10.0
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("metrics.jsonl"),
            format!(
                "{{\"step\":5,\"train/loss\":3.0,\"seconds\":2.0}}\n{{\"step\":10,\"eval/loss\":{loss}}}\n"
            ),
        )
        .unwrap();
        if finished {
            std::fs::write(
                dir.join("summary.json"),
                r#"{"device":"cpu","wall_seconds":12.5}"#,
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn status_comes_from_files_and_the_lock() {
        let root = tempfile::tempdir().unwrap();
        let done = fake_run(root.path(), "a", 2.0, true);
        let died = fake_run(root.path(), "b", 1.0, false);
        assert_eq!(Status::of(&done), Status::Finished);
        assert_eq!(Status::of(&died), Status::Crashed);
        std::fs::write(died.join(STOPPED_FILE), "{}").unwrap();
        assert_eq!(Status::of(&died), Status::Stopped);
        // A lock held by a process (here: this one, through another handle) means running.
        let lock = std::fs::File::create(died.join(".lock")).unwrap();
        lock.lock().unwrap();
        std::fs::write(died.join(".lock"), "4242\n").unwrap();
        assert_eq!(Status::of(&died), Status::Running(Some(4242)));
        drop(lock);
        assert_eq!(Status::of(&died), Status::Stopped);
    }

    #[test]
    fn lists_sorts_and_diffs() {
        let root = tempfile::tempdir().unwrap();
        fake_run(root.path(), "a", 2.0, true);
        fake_run(root.path(), "b", 1.0, false);
        std::fs::create_dir(root.path().join("not-a-run")).unwrap();
        // A damaged run is reported, and the others are still listed.
        let broken = fake_run(root.path(), "c", 0.5, true);
        std::fs::write(broken.join("recipe.toml"), "name = [").unwrap();
        let listing = list(root.path()).unwrap();
        assert_eq!(listing.unreadable.len(), 1);
        assert_eq!(listing.unreadable[0].0, broken);
        assert!(format!("{:#}", listing.unreadable[0].1).contains("not valid TOML"));
        let mut runs = listing.runs;
        assert_eq!(runs.len(), 2);
        sort(&mut runs, "eval/loss").unwrap();
        assert_eq!(runs[0].name, "b");
        // A diverged run's NaN sorts last, not first.
        runs[0].last.insert("eval/loss".into(), f64::NAN);
        sort(&mut runs, "eval/loss").unwrap();
        assert_eq!(runs[0].name, "a");
        sort(&mut runs, "eval/loss").unwrap();
        runs[1].last.insert("eval/loss".into(), 1.0);
        sort(&mut runs, "eval/loss").unwrap();
        assert_eq!(runs[0].name, "b");
        let t = table(&runs);
        assert!(t.lines().nth(1).unwrap().starts_with("b "), "{t}");
        assert!(
            t.contains("finished") && t.contains("crashed") && t.contains("10/10"),
            "{t}"
        );
        assert!(
            t.starts_with("run ") && t.contains("final eval/loss"),
            "{t}"
        );
        let err = sort(&mut runs, "eval/acc").unwrap_err().to_string();
        assert!(err.contains("eval/loss"), "{err}");
        let d = diff(&root.path().join("a"), &root.path().join("b")).unwrap();
        assert!(d.contains("name: \"a\" → \"b\""), "{d}");
        assert!(d.contains("optim.lr: 0.2 → 0.1"), "{d}");
        assert!(
            d.contains("eval/loss: 2.0000 → 1.0000   -1.0000 (B better)"),
            "{d}"
        );
        let err = diff(root.path(), &root.path().join("a")).unwrap_err();
        assert!(
            err.to_string().contains("not a kiln run directory"),
            "{err}"
        );
    }
}
