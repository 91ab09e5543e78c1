//! `kiln verify RUN_DIR`: re-runs a run's resolved recipe from scratch in a temporary directory,
//! up to one of its checkpoints, and compares the weights, the optimizer state and the logged
//! metrics with the recorded ones. On one machine training is deterministic (the same recipe and
//! seed give byte-identical weights on the CPU), so a difference means the data, the recipe,
//! kiln or the device changed: the report says which of those did.

use crate::run::{self, RunRecord};
use crate::trainer::{train, TrainOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kiln_core::checkpoint::{self, MODEL_FILE, OPTIMIZER_FILE};
use kiln_core::fs::sha256_file;
use kiln_core::recipe::Recipe;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Metrics that measure time, not training: never compared.
use kiln_core::metrics::TIMING_KEYS;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Verify at the run's last checkpoint at or before this step (default: its first).
    pub steps: Option<usize>,
    /// Re-run on this device (default: the one the run trained on).
    pub device: Option<String>,
}

/// One line of the report: `<topic>: <text>`.
#[derive(Debug, Clone)]
pub struct Check {
    pub topic: &'static str,
    pub text: String,
    /// False when it found a difference or could not check. Differences of kiln or device are
    /// explanations, not failures.
    pub ok: bool,
}

impl Check {
    fn pass(topic: &'static str, text: impl Into<String>) -> Self {
        Check {
            topic,
            text: text.into(),
            ok: true,
        }
    }
    fn fail(topic: &'static str, text: impl Into<String>) -> Self {
        Check {
            topic,
            text: text.into(),
            ok: false,
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.topic, self.text)
    }
}

/// What `kiln verify` found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The checkpoint step verified at.
    pub step: usize,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn verified(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The topics that failed, e.g. "weights, data".
    pub fn failed(&self) -> String {
        let mut topics: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.topic)
            .collect();
        topics.dedup(); // a topic's lines are adjacent
        topics.join(", ")
    }
}

/// Re-runs `run_dir`'s `recipe.toml` to the checkpoint [`VerifyOptions::steps`] picks and
/// compares. Errors are for what prevents any comparison (no run, no intact checkpoint); a re-run
/// that fails is a failed check in the report.
pub fn verify(run_dir: &Path, opts: &VerifyOptions) -> Result<Report> {
    let recipe_file = run_dir.join("recipe.toml");
    anyhow::ensure!(
        recipe_file.is_file(),
        "{} is not a kiln run directory: it has no recipe.toml",
        run_dir.display()
    );
    let record = recorded(run_dir)?;
    let (step, recorded_ck) = pick_checkpoint(run_dir, opts.steps)?;
    let device = opts
        .device
        .clone()
        .or_else(|| record.as_ref().map(|r| r.device.clone()));

    let tmp = tempfile::Builder::new()
        .prefix("kiln-verify-")
        .tempdir()
        .context("cannot create a temporary directory for the re-run (set TMPDIR elsewhere)")?;
    let rerun_dir = tmp.path().join("run");
    eprintln!(
        "re-running {} to step {step} in {}",
        recipe_file.display(),
        rerun_dir.display()
    );
    let rerun = rerun(&recipe_file, &recorded_ck, &rerun_dir, step, device);
    // The re-run's own record: its device and the data files as they are now.
    let now = RunRecord::read(&rerun_dir).ok().flatten();

    let mut checks = Vec::new();
    match rerun {
        Ok(ck) => {
            checks.push(compare_tensors(
                "weights",
                &recorded_ck.join(MODEL_FILE),
                &ck.join(MODEL_FILE),
                step,
            ));
            checks.push(compare_tensors(
                "optimizer",
                &recorded_ck.join(OPTIMIZER_FILE),
                &ck.join(OPTIMIZER_FILE),
                step,
            ));
            checks.push(compare_metrics(run_dir, &rerun_dir, step));
        }
        Err(e) => checks.push(Check::fail(
            "weights",
            format!("cannot re-run the recipe to step {step}: {e:#}"),
        )),
    }
    checks.extend(check_data(record.as_ref(), now.as_ref()));
    checks.push(check_recipe(
        &recipe_file,
        record.as_ref(),
        &recorded_ck,
        step,
    ));
    checks.push(check_kiln(record.as_ref()));
    checks.push(check_device(record.as_ref(), now.map(|r| r.device)));
    Ok(Report { step, checks })
}

/// The run's `run.json`, or for a run older than it, the same fields from `summary.json`.
fn recorded(run_dir: &Path) -> Result<Option<RunRecord>> {
    if let Some(r) = RunRecord::read(run_dir)? {
        return Ok(Some(r));
    }
    run::read_record(&run_dir.join("summary.json"))
}

/// The intact recorded checkpoint to verify at: the first, or with `steps` the last at or before
/// it. Damaged ones are skipped with a warning.
fn pick_checkpoint(run_dir: &Path, steps: Option<usize>) -> Result<(usize, PathBuf)> {
    let checkpoints = run_dir.join("checkpoints");
    let mut dirs = checkpoint::step_dirs(&checkpoints).unwrap_or_default();
    if dirs.is_empty() {
        bail!(
            "{} has no checkpoint to verify against: train it to its first checkpoint \
             (trainer.checkpoint_every) first",
            run_dir.display()
        );
    }
    dirs.reverse(); // oldest first
    let first = dirs[0].0;
    let candidates: Vec<(usize, PathBuf)> = match steps {
        None => dirs,
        Some(n) => dirs.into_iter().filter(|(s, _)| *s <= n).rev().collect(),
    };
    if let (Some(n), true) = (steps, candidates.is_empty()) {
        bail!(
            "{} has no checkpoint at or before step {n}; its first is step-{first}",
            run_dir.display()
        );
    }
    for (step, dir) in candidates {
        match checkpoint::verify(&dir) {
            Ok(()) => return Ok((step, dir)),
            Err(e) => eprintln!(
                "warning: skipping damaged checkpoint {}: {e:#}",
                dir.display()
            ),
        }
    }
    bail!(
        "{} has no intact checkpoint to verify against",
        checkpoints.display()
    )
}

/// Trains `recipe_file` from scratch into `dir`, stopping after `step` with a checkpoint; returns
/// that checkpoint. The `[trainer]` table comes from the recorded checkpoint's copy of the recipe
/// when it has one: `--resume --set trainer.max_steps=N` rewrites the run's recipe.toml, and the
/// schedule up to `step` followed the steps in force then.
fn rerun(
    recipe_file: &Path,
    recorded_ck: &Path,
    dir: &Path,
    step: usize,
    device: Option<String>,
) -> Result<PathBuf> {
    let mut recipe = Recipe::load(recipe_file, &[])?;
    let copy = recorded_ck.join("recipe.toml");
    if copy.is_file() {
        recipe.trainer = Recipe::load(&copy, &[])?.trainer;
    }
    let opts = TrainOptions {
        run_dir: Some(dir.to_path_buf()),
        device,
        quiet: true,
        silent: true,
        stop_after: Some(step),
        ..Default::default()
    };
    train(&recipe, &opts)?;
    let ck = dir
        .join("checkpoints")
        .join(checkpoint::step_dir_name(step));
    anyhow::ensure!(
        ck.is_dir(),
        "the re-run ended without a checkpoint at step {step} (does its recipe train fewer steps?)"
    );
    Ok(ck)
}

/// Compares two safetensors files tensor by tensor.
fn compare_tensors(topic: &'static str, recorded: &Path, rerun: &Path, step: usize) -> Check {
    match tensor_difference(recorded, rerun) {
        Ok(Difference::None { tensors, layout }) => {
            let layout = if layout {
                "; the files' layouts differ"
            } else {
                ""
            };
            Check::pass(
                topic,
                format!("identical at step {step} ({tensors} tensors{layout})"),
            )
        }
        Ok(Difference::Values {
            largest,
            name,
            differing,
            tensors,
        }) => Check::fail(
            topic,
            format!(
                "differ at step {step}: largest |difference| {largest:.3e} in {name} \
                 ({differing} of {tensors} tensors differ)"
            ),
        ),
        Ok(Difference::Structure(text)) => {
            Check::fail(topic, format!("differ at step {step}: {text}"))
        }
        Err(e) => Check::fail(topic, format!("cannot compare at step {step}: {e:#}")),
    }
}

enum Difference {
    /// Every tensor bit-identical (`layout`: though the files' bytes differ).
    None { tensors: usize, layout: bool },
    Values {
        largest: f64,
        name: String,
        differing: usize,
        tensors: usize,
    },
    /// A tensor missing from one side, or of another shape or dtype.
    Structure(String),
}

fn tensor_difference(recorded: &Path, rerun: &Path) -> Result<Difference> {
    let read = |p: &Path| -> Result<(Vec<u8>, HashMap<String, Tensor>)> {
        let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        let tensors = checkpoint::parse_tensors(&bytes, &Device::Cpu)
            .with_context(|| format!("{} is not a safetensors file", p.display()))?;
        Ok((bytes, tensors))
    };
    let (a_bytes, a) = read(recorded)?;
    let (b_bytes, b) = read(rerun)?;
    let tensors = a.len();
    if a_bytes == b_bytes {
        return Ok(Difference::None {
            tensors,
            layout: false,
        });
    }
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut worst: Option<(f64, &String)> = None;
    let mut differing = 0;
    for name in names {
        let (x, y) = match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) => (x, y),
            (Some(_), None) => {
                return Ok(Difference::Structure(format!(
                    "{name} is missing from the re-run"
                )))
            }
            (None, _) => {
                return Ok(Difference::Structure(format!(
                    "{name} is in the re-run only"
                )))
            }
        };
        if x.dims() != y.dims() || x.dtype() != y.dtype() {
            return Ok(Difference::Structure(format!(
                "{name} is {:?} {:?} in the run, {:?} {:?} in the re-run",
                x.dtype(),
                x.dims(),
                y.dtype(),
                y.dims()
            )));
        }
        if let Some(d) = max_abs_difference(x, y)? {
            differing += 1;
            if worst.is_none_or(|(w, _)| d > w || d.is_nan()) {
                worst = Some((d, name));
            }
        }
    }
    Ok(match worst {
        None => Difference::None {
            tensors,
            layout: true,
        },
        Some((largest, name)) => Difference::Values {
            largest,
            name: name.clone(),
            differing,
            tensors,
        },
    })
}

/// The largest |x − y| over the elements, `None` when every element is bit-identical; NaN when a
/// NaN meets anything but the same NaN.
fn max_abs_difference(x: &Tensor, y: &Tensor) -> Result<Option<f64>> {
    // Every dtype a checkpoint holds converts to f64 exactly, so bits compare as stored.
    let values = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let (xs, ys) = (values(x)?, values(y)?);
    let mut worst: Option<f64> = None;
    for (a, b) in xs.iter().zip(&ys) {
        if a.to_bits() != b.to_bits() {
            let d = (a - b).abs();
            worst = Some(match worst {
                Some(w) if w.is_nan() || d.is_nan() => f64::NAN,
                Some(w) => w.max(d),
                None => d,
            });
        }
    }
    Ok(worst)
}

/// The metric lines up to `step`, timing fields removed; lines that do not parse (a torn last
/// line) are left out, as `--resume` does.
fn metric_lines(
    file: &Path,
    step: usize,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Map<_, _>>(l).ok())
        .filter(|m| {
            m.get("step")
                .and_then(|s| s.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|mut m| {
            for k in TIMING_KEYS {
                m.remove(*k);
            }
            m
        })
        .collect())
}

/// Compares the metric lines up to `step` exactly, timing aside; names the first difference.
fn compare_metrics(run_dir: &Path, rerun_dir: &Path, step: usize) -> Check {
    let lines = |dir: &Path| metric_lines(&dir.join("metrics.jsonl"), step);
    let (a, b) = match (lines(run_dir), lines(rerun_dir)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Check::fail("metrics", format!("{e:#}")),
    };
    let show = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
    // Keys the re-run logs and the run does not: added by a newer kiln, not a difference.
    let mut added: BTreeSet<&String> = BTreeSet::new();
    for (x, y) in a.iter().zip(&b) {
        if x == y {
            continue;
        }
        added.extend(y.keys().filter(|k| !x.contains_key(*k)));
        let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        let differs = |k: &&String| x.contains_key(*k) && x.get(*k) != y.get(*k);
        if let Some(k) = keys.into_iter().find(differs) {
            return Check::fail(
                "metrics",
                format!(
                    "differ first at step {}: {k} is {} in the run, {} in the re-run",
                    show(x.get("step")),
                    show(x.get(k)),
                    show(y.get(k))
                ),
            );
        }
    }
    if a.len() != b.len() {
        return Check::fail(
            "metrics",
            format!(
                "the run logged {} lines up to step {step}, the re-run {}",
                a.len(),
                b.len()
            ),
        );
    }
    let added = match added.is_empty() {
        true => String::new(),
        false => format!(
            "; the re-run also logs {}, which this run's kiln did not",
            added.into_iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    Check::pass(
        "metrics",
        format!(
            "identical up to step {step} ({} lines, {} aside){added}",
            a.len(),
            TIMING_KEYS.join(", ")
        ),
    )
}

/// The first 8 hex digits of a sha256, for messages.
fn short(sha: &str) -> String {
    format!("{}…", sha.get(..8).unwrap_or(sha))
}

/// One line per data file whose sha256 changed (or that is missing) since the run, else one
/// line for all. Today's hashes come from the re-run (which hashes exactly what training reads,
/// folders included), or from the files themselves when the re-run did not get that far.
fn check_data(record: Option<&RunRecord>, now: Option<&RunRecord>) -> Vec<Check> {
    let Some(record) = record else {
        return vec![Check::fail(
            "data",
            "cannot check: the run has no run.json or summary.json recording its data files",
        )];
    };
    let now: HashMap<&str, &str> = now
        .map(|r| {
            r.data_files
                .iter()
                .map(|f| (f.path.as_str(), f.sha256.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let mut checks = Vec::new();
    for f in &record.data_files {
        let current = match now.get(f.path.as_str()) {
            Some(h) => Ok(h.to_string()),
            None => sha256_file(Path::new(&f.path)),
        };
        match current {
            Ok(h) if h == f.sha256 => {}
            Ok(h) => checks.push(Check::fail(
                "data",
                format!(
                    "{} changed since the run (sha256 {} → {})",
                    f.path,
                    short(&f.sha256),
                    short(&h)
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => checks.push(Check::fail(
                "data",
                format!(
                    "{} is missing (relative paths are read from the current directory)",
                    f.path
                ),
            )),
            Err(e) => checks.push(Check::fail("data", format!("cannot check {}: {e}", f.path))),
        }
    }
    let recorded: BTreeSet<&str> = record.data_files.iter().map(|f| f.path.as_str()).collect();
    let mut extra: Vec<&&str> = now.keys().filter(|p| !recorded.contains(**p)).collect();
    extra.sort();
    for p in extra {
        checks.push(Check::fail(
            "data",
            format!("{p} is read by the re-run but was not by the run"),
        ));
    }
    if checks.is_empty() {
        let n = record.data_files.len();
        let files = if n == 1 { "file" } else { "files" };
        checks.push(Check::pass(
            "data",
            format!("{n} {files} unchanged since the run"),
        ));
    }
    checks
}

/// Whether `recipe.toml` is still the one the run started with (`run.json`'s sha256; for older
/// runs, the copy in the verified checkpoint), naming the keys that differ from that copy.
fn check_recipe(
    recipe_file: &Path,
    record: Option<&RunRecord>,
    recorded_ck: &Path,
    step: usize,
) -> Check {
    let current = match sha256_file(recipe_file) {
        Ok(h) => h,
        Err(e) => {
            return Check::fail(
                "recipe",
                format!("cannot read {}: {e}", recipe_file.display()),
            )
        }
    };
    let copy = recorded_ck.join("recipe.toml");
    let changed = changed_keys(&copy, recipe_file);
    let trainer_only = changed
        .as_ref()
        .is_some_and(|k| !k.is_empty() && k.iter().all(|k| k.starts_with("trainer.")));
    let keys = changed
        .filter(|k| !k.is_empty())
        .map(|k| {
            format!(
                "; changed from checkpoint step-{step}'s copy: {}",
                k.join(", ")
            )
        })
        .unwrap_or_default();
    match record.and_then(|r| r.recipe_sha256.as_deref()) {
        Some(h) if h == current => {
            Check::pass("recipe", "recipe.toml unchanged since the run started")
        }
        // A resume may change [trainer] keys (a longer max_steps): explained, not failed.
        Some(_) if trainer_only => Check::pass(
            "recipe",
            format!("recipe.toml changed since the run started in [trainer] only, as a --resume may{keys}"),
        ),
        Some(h) => Check::fail(
            "recipe",
            format!(
                "recipe.toml changed since the run started (sha256 {} → {}){keys}",
                short(h),
                short(&current)
            ),
        ),
        None => match sha256_file(&copy) {
            Ok(h) if h == current => Check::pass(
                "recipe",
                format!("recipe.toml is checkpoint step-{step}'s copy (the run has no run.json)"),
            ),
            Ok(_) if trainer_only => Check::pass(
                "recipe",
                format!("recipe.toml differs from checkpoint step-{step}'s copy in [trainer] only, as a --resume may{keys}"),
            ),
            Ok(_) => Check::fail(
                "recipe",
                format!("recipe.toml differs from checkpoint step-{step}'s copy{keys}"),
            ),
            Err(e) => Check::fail(
                "recipe",
                format!(
                    "cannot check: the run has no run.json and {} cannot be read ({e})",
                    copy.display()
                ),
            ),
        },
    }
}

/// The keys whose values differ between two TOML files; `None` when either does not parse.
fn changed_keys(a: &Path, b: &Path) -> Option<Vec<String>> {
    let parse = |p: &Path| -> Option<toml::Value> {
        let text = std::fs::read_to_string(p).ok()?;
        toml::from_str::<toml::Table>(&text)
            .ok()
            .map(toml::Value::Table)
    };
    Some(run::changed_keys(&parse(a)?, &parse(b)?))
}

/// The kiln that trained the run against this one: a difference explains, does not fail.
fn check_kiln(record: Option<&RunRecord>) -> Check {
    let (version, commit) = (kiln_core::VERSION, run::GIT_COMMIT);
    match record {
        None => Check::pass(
            "kiln",
            format!("this is {version} (commit {commit}); the run's is not recorded"),
        ),
        Some(r) if r.kiln_version == version && r.git_commit == commit => Check::pass(
            "kiln",
            format!("same version {version} and commit {commit}"),
        ),
        Some(r) => Check::pass(
            "kiln",
            format!(
                "the run was trained by {} (commit {}), this is {version} (commit {commit}): \
                 a possible explanation of any difference",
                r.kiln_version, r.git_commit
            ),
        ),
    }
}

/// The device the run trained on against the re-run's (`None`: it did not get to open one): a
/// difference explains, does not fail.
fn check_device(record: Option<&RunRecord>, rerun: Option<String>) -> Check {
    let recorded = record.map_or("an unrecorded device", |r| r.device.as_str());
    let Some(rerun) = rerun else {
        return Check::pass(
            "device",
            format!("the run trained on {recorded}; the re-run did not get to open a device"),
        );
    };
    let cuda_note = if rerun.starts_with("cuda") {
        "; on CUDA, runs agree to a tolerance, not bit for bit (f32 atomics sum in arrival order)"
    } else {
        ""
    };
    match record.map(|r| r.device.as_str()) {
        Some(d) if d == rerun => Check::pass("device", format!("{d}, as the run{cuda_note}")),
        Some(d) => Check::pass(
            "device",
            format!(
                "the run trained on {d}, the re-run on {rerun}: their kernels round \
                 differently, a likely explanation of any difference{cuda_note}"
            ),
        ),
        None => Check::pass(
            "device",
            format!("re-ran on {rerun}; the run's device is not recorded{cuda_note}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_difference_sees_bits() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        assert_eq!(
            max_abs_difference(&t(&[1., 2.]), &t(&[1., 2.])).unwrap(),
            None
        );
        assert_eq!(
            max_abs_difference(&t(&[1., 2.]), &t(&[1.5, 2.])).unwrap(),
            Some(0.5)
        );
        // -0.0 and 0.0 are different bytes, at distance 0.
        assert_eq!(
            max_abs_difference(&t(&[0.]), &t(&[-0.])).unwrap(),
            Some(0.0)
        );
        assert!(max_abs_difference(&t(&[f32::NAN, 1.]), &t(&[0., 3.]))
            .unwrap()
            .unwrap()
            .is_nan());
    }

    #[test]
    fn data_names_changed_missing_and_new_files() {
        let file = |path: &str, sha256: &str| run::DataFile {
            path: path.into(),
            sha256: sha256.into(),
        };
        let record = |files| RunRecord {
            kiln_version: "0".into(),
            git_commit: "x".into(),
            device: "cpu".into(),
            seed: 1,
            recipe_sha256: None,
            data_files: files,
        };
        let then = record(vec![file("a.txt", "aaaa1111bbbb"), file("b.txt", "cccc")]);
        let same = check_data(Some(&then), Some(&then.clone()));
        assert_eq!(same.len(), 1);
        assert!(same[0].ok && same[0].text == "2 files unchanged since the run");

        let now = record(vec![file("a.txt", "dddd2222eeee"), file("c.txt", "ffff")]);
        let lines: Vec<String> = check_data(Some(&then), Some(&now))
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            lines,
            [
                "data: a.txt changed since the run (sha256 aaaa1111… → dddd2222…)",
                "data: b.txt is missing (relative paths are read from the current directory)",
                "data: c.txt is read by the re-run but was not by the run",
            ]
        );
    }

    #[test]
    fn metrics_compare_what_the_run_logged() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("metrics.jsonl"), text).unwrap();
            d
        };
        // An older kiln's run; the re-run logs `tokens` too, and its own timings.
        let old = write("old", "{\"step\":5,\"train/loss\":2.5,\"seconds\":1.0}\n");
        let new = write(
            "new",
            "{\"step\":5,\"train/loss\":2.5,\"tokens\":640,\"seconds\":0.7}\n",
        );
        let c = compare_metrics(&old, &new, 5);
        assert!(c.ok, "{c}");
        assert!(c.text.contains("also logs tokens"), "{c}");
        // A value that changed, or a key the re-run lost, is a difference.
        let changed = write(
            "changed",
            "{\"step\":5,\"train/loss\":2.6,\"tokens\":640}\n",
        );
        let c = compare_metrics(&old, &changed, 5);
        assert!(
            !c.ok && c.text.contains("train/loss is 2.5 in the run, 2.6"),
            "{c}"
        );
        let c = compare_metrics(&new, &old, 5);
        assert!(
            !c.ok && c.text.contains("tokens is 640 in the run, absent"),
            "{c}"
        );
    }
}
