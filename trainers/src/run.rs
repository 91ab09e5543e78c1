//! The run directory: `recipe.toml` (resolved), `run.json` (what the run started from),
//! `metrics.jsonl`, `tb/` (the same metrics as TensorBoard event files), `summary.json`,
//! `checkpoints/step-<N>/`, `plots/`, `report.html`, and `vocab.json` for character-level
//! models. Also reopens a finished run for `kiln eval` and `kiln generate`.

use crate::weights::{self, Weights};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use kiln_core::checkpoint;
use kiln_core::data::DataSplits;
use kiln_core::fs::{at, write_atomic};
use kiln_core::recipe::Recipe;
use kiln_models::{Model, ModelConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An image run's input geometry and normalization (`kiln_core::data::ImageInfo`).
pub const IMAGE_FILE: &str = "image.json";

/// The commit kiln was built from.
pub const GIT_COMMIT: &str = env!("KILN_GIT_COMMIT");

/// The folder of a run's TensorBoard event files.
pub const TB_DIR: &str = "tb";

/// What a run started from, written when it starts (`summary.json` comes only at the end).
pub const RECORD_FILE: &str = "run.json";

/// `run.json`: the kiln, device, seed, recipe and data a run started from, for `kiln verify`.
/// `summary.json` has the same fields but `recipe_sha256`, so it parses as one too (older runs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub kiln_version: String,
    pub git_commit: String,
    pub device: String,
    pub seed: u64,
    /// sha256 of `recipe.toml` as the run wrote it.
    #[serde(default)]
    pub recipe_sha256: Option<String>,
    pub data_files: Vec<DataFile>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataFile {
    pub path: String,
    pub sha256: String,
}

impl RunRecord {
    /// Reads `run_dir/run.json`; `Ok(None)` when the run has none.
    pub fn read(run_dir: &Path) -> Result<Option<RunRecord>> {
        read_record(&run_dir.join(RECORD_FILE))
    }
}

/// A [`RunRecord`] from `path` (`run.json`, or `summary.json`); `Ok(None)` when it is absent.
pub fn read_record(path: &Path) -> Result<Option<RunRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let record =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    Ok(Some(record))
}

pub struct RunDir {
    pub path: PathBuf,
    pub started: Instant,
    /// Made by this process (`create_for`), not reopened: a failed start may clear it.
    fresh: Option<Created>,
    /// An exclusive lock on `RUN/.lock` while this process writes the run: a second `kiln train
    /// --resume` of the same run would interleave checkpoints and metric lines. `None` on a
    /// data-parallel rank other than 0, which writes nothing.
    lock_file: Option<std::fs::File>,
}

/// A new run that fails before it starts (bad data, a model that does not fit, a missing
/// `init_from`) leaves nothing behind: otherwise its `recipe.toml` would make the same
/// `--run-dir` refuse a corrected retry, and `--resume` could only fail the same way again.
impl Drop for RunDir {
    fn drop(&mut self) {
        // Best effort, and silent: the error that stopped the start is what the user needs.
        match self.fresh {
            None => {}
            Some(Created::Directory) => {
                let _ = std::fs::remove_dir_all(&self.path);
            }
            Some(Created::Contents) => {
                for entry in std::fs::read_dir(&self.path)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let p = entry.path();
                    let _ = match p.is_dir() {
                        true => std::fs::remove_dir_all(p),
                        false => std::fs::remove_file(p),
                    };
                }
            }
        }
    }
}

/// What `create_for` made: the directory itself, or only its contents (it existed, empty).
#[derive(Clone, Copy)]
enum Created {
    Directory,
    Contents,
}

/// The lock file's name inside a run directory.
const LOCK_FILE: &str = ".lock";

/// `stopped.json`: the run ended early and cleanly (a signal, `stop_after`), with a checkpoint
/// to resume from; removed when it resumes. With `summary.json` (finished) and the lock (running)
/// it says a run's status without guessing: none of the three means the process died.
pub const STOPPED_FILE: &str = "stopped.json";

fn lock(run: &Path) -> Result<std::fs::File> {
    use std::io::Write;
    let p = run.join(LOCK_FILE);
    // Not truncated before the lock is ours: the holder's pid is in it.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&p)
        .map_err(at(&p))?;
    // `kiln runs` probes the lock with a shared lock it drops at once: wait out such a probe.
    let mut tries = 0;
    let locked = loop {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {
            // The pid, for `kiln runs`: which process is training the run.
            f.set_len(0)
                .and_then(|()| writeln!(f, "{}", std::process::id()))
                .map_err(at(&p))?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another kiln process (it holds {}); wait for it to finish or stop \
             it first",
            run.display(),
            p.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(at(&p)(e).into()),
    }
}

/// The pid of the kiln process writing the run now (`Some(None)` if its pid is unreadable), or
/// `None` when no process holds the run's lock. Probed with a shared lock, released at once.
pub fn lock_holder(run: &Path) -> Option<Option<u32>> {
    let p = run.join(LOCK_FILE);
    let f = std::fs::File::open(&p).ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        // Locks unsupported here (some network file systems): say nothing rather than "running".
        Err(std::fs::TryLockError::Error(_)) => None,
        Err(std::fs::TryLockError::WouldBlock) => Some(
            std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| t.trim().parse().ok()),
        ),
    }
}

impl RunDir {
    /// Creates a new, empty run directory for `recipe`: `run_dir` exactly, or a fresh
    /// `<runs_root>/<recipe>-<timestamp>` (default root `runs`); never reuses a non-empty one.
    pub fn create_for(
        recipe: &Recipe,
        run_dir: Option<&Path>,
        runs_root: Option<&Path>,
    ) -> Result<Self> {
        let path = match run_dir {
            Some(p) => {
                if p.exists() && !p.is_dir() {
                    bail!(
                        "--run-dir {} is a file, not a directory; pick a directory path",
                        p.display()
                    );
                }
                if p.exists() && std::fs::read_dir(p).map_err(at(p))?.next().is_some() {
                    bail!(
                        "run directory {} already exists and is not empty; pick another --run-dir, \
                         or continue it with --resume (nothing was overwritten)",
                        p.display()
                    );
                }
                p.to_path_buf()
            }
            None => {
                let root = runs_root.unwrap_or(Path::new("runs"));
                let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
                let base = root.join(format!("{}-{stamp}", recipe.name));
                let mut p = base.clone();
                let mut n = 2;
                while p.exists() {
                    p = PathBuf::from(format!("{}-{n}", base.display()));
                    n += 1;
                }
                p
            }
        };
        let created = if path.exists() {
            Created::Contents
        } else {
            Created::Directory
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the run directory {}", path.display()))?;
        Ok(RunDir {
            lock_file: Some(lock(&path)?),
            path,
            started: Instant::now(),
            fresh: Some(created),
        })
    }

    /// The run has started (its first step may run): from here on a failure keeps the
    /// directory, whose checkpoints and metrics are worth keeping. A resumed run is no longer
    /// stopped (a resume refused before this point leaves it marked stopped).
    pub fn keep(&mut self) -> Result<()> {
        self.fresh = None;
        let stopped = self.path.join(STOPPED_FILE);
        if self.lock_file.is_some() && stopped.exists() {
            std::fs::remove_file(&stopped).map_err(at(&stopped))?;
        }
        Ok(())
    }

    /// Reopens a run to resume it after `step`: metric lines and TensorBoard events written
    /// after that step (by the attempt that did not reach its next checkpoint) are dropped, as
    /// they will be written again. Its `stopped.json` goes once training starts ([`Self::keep`]).
    pub fn reopen(path: &Path, step: usize) -> Result<Self> {
        let lock = lock(path)?;
        let metrics = path.join("metrics.jsonl");
        if metrics.exists() {
            let text = std::fs::read_to_string(&metrics).map_err(at(&metrics))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(&metrics, kept.as_bytes())?;
        }
        kiln_core::tensorboard::truncate_after(&path.join(TB_DIR), step as u64)?;
        Ok(RunDir {
            path: path.to_path_buf(),
            started: Instant::now(),
            fresh: None,
            lock_file: Some(lock),
        })
    }

    /// Forgets the final evaluation logged at `step` (metric lines and TensorBoard events of
    /// `eval/` and `test/` values only): a run resumed from its final checkpoint evaluates again,
    /// and must not log the same evaluation twice.
    pub fn forget_evaluation_at(&self, step: usize) -> Result<()> {
        let metrics = self.path.join("metrics.jsonl");
        if metrics.exists() {
            let text = std::fs::read_to_string(&metrics).map_err(at(&metrics))?;
            let evaluation_at_step = |l: &str| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l)
                    .ok()
                    .is_some_and(|m| {
                        m.get("step").and_then(|s| s.as_u64()) == Some(step as u64)
                            && m.keys()
                                .filter(|k| *k != "step")
                                .all(|k| kiln_core::tensorboard::is_evaluation(k))
                    })
            };
            let kept: String = (text.lines())
                .filter(|l| !evaluation_at_step(l))
                .map(|l| format!("{l}\n"))
                .collect();
            if kept.len() != text.len() {
                write_atomic(&metrics, kept.as_bytes())?;
            }
        }
        kiln_core::tensorboard::drop_evaluation_at(&self.path.join(TB_DIR), step as u64)
    }

    /// The run directory as a data-parallel rank other than 0 sees it: read, never written (rank
    /// 0 made or reopened it, and holds its lock).
    pub fn follower(path: &Path) -> Self {
        RunDir {
            path: path.to_path_buf(),
            started: Instant::now(),
            fresh: None,
            lock_file: None,
        }
    }

    /// Marks the run stopped after `step` with a checkpoint (by `signal`, or by `stop_after`).
    pub fn mark_stopped(&self, step: usize, signal: Option<usize>) -> Result<()> {
        let file = self.path.join(STOPPED_FILE);
        let text = serde_json::json!({ "step": step, "signal": signal }).to_string() + "\n";
        write_atomic(&file, text.as_bytes()).with_context(|| format!("writing {}", file.display()))
    }

    /// Writes `run.json` for a run that starts from step 0 (after [`Self::write_recipe`]).
    pub fn write_record(&self, recipe: &Recipe, device: &Device, data: &DataSplits) -> Result<()> {
        let recipe_file = self.path.join("recipe.toml");
        let record = RunRecord {
            kiln_version: kiln_core::VERSION.into(),
            git_commit: GIT_COMMIT.into(),
            device: kiln_core::device::device_name(device),
            seed: recipe.seed,
            recipe_sha256: Some(
                kiln_core::fs::sha256_file(&recipe_file)
                    .with_context(|| format!("cannot read {}", recipe_file.display()))?,
            ),
            data_files: data
                .files
                .iter()
                .map(|(path, sha256)| DataFile {
                    path: path.clone(),
                    sha256: sha256.clone(),
                })
                .collect(),
        };
        let file = self.path.join(RECORD_FILE);
        write_atomic(
            &file,
            (serde_json::to_string_pretty(&record)? + "\n").as_bytes(),
        )
        .with_context(|| format!("writing {}", file.display()))
    }

    /// Writes the resolved recipe (and the vocabulary of a character-level model).
    pub fn write_recipe(
        &self,
        recipe: &Recipe,
        model: &ModelConfig,
        data: &DataSplits,
    ) -> Result<()> {
        write_atomic(
            &self.path.join("recipe.toml"),
            recipe.to_toml(&model.to_table()).as_bytes(),
        )?;
        if let Some(vocab) = &data.vocab {
            let chars: Vec<String> = vocab.iter().map(|c| c.to_string()).collect();
            write_atomic(
                &self.path.join("vocab.json"),
                serde_json::to_string(&chars)?.as_bytes(),
            )?;
        }
        if let Some(labels) = &data.labels {
            write_atomic(
                &self.path.join("labels.json"),
                serde_json::to_string_pretty(labels)?.as_bytes(),
            )?;
        }
        // An image model's input geometry and normalization, for export and prediction.
        if let Some(image) = &data.image {
            write_atomic(
                &self.path.join(IMAGE_FILE),
                serde_json::to_string_pretty(image)?.as_bytes(),
            )?;
        }
        // The run keeps its own copy of the tokenizer: generation and export need it, and the
        // original may move.
        if let Some(tok) = &data.tokenizer {
            let bytes = std::fs::read(tok)
                .with_context(|| format!("cannot read the tokenizer {}", tok.display()))?;
            write_atomic(&self.path.join("tokenizer.json"), &bytes)?;
        }
        Ok(())
    }
}

/// Keys outside `[trainer]` whose values differ between two recipes (e.g. `optim.lr`).
pub fn changed_sections(a: &Recipe, b: &Recipe) -> Vec<String> {
    let table = |r: &Recipe| -> toml::Value {
        let mut t: toml::Table =
            toml::from_str(&r.to_toml(&r.model)).expect("a resolved recipe parses");
        t.remove("trainer");
        t.remove("description");
        t.remove("device");
        toml::Value::Table(t)
    };
    changed_keys(&table(a), &table(b))
}

/// The dotted keys whose values differ between two TOML documents (present in one only, too).
pub fn changed_keys(a: &toml::Value, b: &toml::Value) -> Vec<String> {
    fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => diff(&key, u, v, out),
                        _ => out.push(key),
                    }
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    diff("", a, b, &mut out);
    out
}

/// A finished (or checkpointed) run, loaded for inference.
pub struct LoadedRun {
    pub recipe: Recipe,
    pub model_cfg: ModelConfig,
    pub model: Box<dyn Model>,
    pub checkpoint: PathBuf,
}

/// Reads `run_dir/recipe.toml` and the weights of `run_dir/checkpoints/latest`.
pub fn load_run(run_dir: &Path, device: &Device) -> Result<LoadedRun> {
    load_run_at(run_dir, "latest", device)
}

/// Reads `run_dir/recipe.toml` and the weights of the checkpoint `which` (`latest`, `best`,
/// `step-N`).
pub fn load_run_at(run_dir: &Path, which: &str, device: &Device) -> Result<LoadedRun> {
    let recipe_path = run_dir.join("recipe.toml");
    if !recipe_path.exists() {
        bail!(
            "{} is not a kiln run directory: it has no recipe.toml",
            run_dir.display()
        );
    }
    let recipe = Recipe::load(&recipe_path, &[])?;
    let model_cfg = ModelConfig::decode(&recipe)?;
    let checkpoint = checkpoint::by_name(&run_dir.join("checkpoints"), which)?;
    // Fresh parameters, overwritten by the checkpoint's (each name and shape checked), then a
    // detached copy of the model for inference.
    let from = Weights::Checkpoint {
        recipe: &recipe,
        file: &checkpoint.join(checkpoint::MODEL_FILE),
    };
    let compute = crate::amp::compute_dtype(recipe.precision);
    let model = weights::load_model(&model_cfg, from, recipe.seed, compute, device)?;
    Ok(LoadedRun {
        recipe,
        model_cfg,
        model,
        checkpoint,
    })
}
