//! Recipes: one TOML file that fully defines an experiment.
//!
//! Loading is three steps, each of which can fail with an error that names the key, the place it
//! came from (file and line, or the `--set` argument) and what would be valid:
//! 1. parse the text (syntax errors),
//! 2. apply `--set key.path=value` overrides on the document,
//! 3. deserialize into typed sections (unknown keys, wrong types) and validate ranges.
//!
//! The `[model]` table is kept as raw TOML here: each model owns its config type in
//! `kiln-models`, which deserializes it through [`RecipeSource::decode`] so its errors carry the
//! same file/line information.

mod data;
mod source;

pub use data::{
    AugmentConfig, DataConfig, DataSource, Dataset, FashionMnistData, ImageFolderData, Labels,
    NormalizeConfig, TextBpeData, TextCharData, TextClassificationData,
};
use serde::{Deserialize, Serialize};
pub use source::{RecipeError, RecipeSource};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// The typed recipe
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Inputs → one label per example; metrics: loss, accuracy.
    Classification,
    /// Next-token prediction; metrics: loss, perplexity.
    LanguageModel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub name: OptimizerName,
    pub lr: f64,
    /// Decoupled (AdamW) or L2-free SGD weight decay; applied to weights of rank ≥ 2 only.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW (β1, β2).
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// SGD momentum (0 = plain SGD).
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    Constant,
    Linear,
    Cosine,
}

/// Every key is optional: a `[schedule]` table with only `warmup_steps` is a constant schedule
/// with warmup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: ScheduleName,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Floor of the decay, as a fraction of `optim.lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Steps over which the decay runs (default: the run's total steps).
    #[serde(default)]
    pub decay_steps: Option<usize>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            name: ScheduleName::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            decay_steps: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Optimizer steps to run; exactly one of `max_steps` and `epochs` is set.
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Micro-batches summed into one optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Global L2 norm bound for the gradient (0 = no clipping).
    #[serde(default)]
    pub clip_grad_norm: f64,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// 0 = evaluate only at the end.
    #[serde(default)]
    pub eval_every: usize,
    /// Batches per periodic evaluation (0 = the whole split). The final evaluation always uses
    /// the whole split.
    #[serde(default)]
    pub eval_batches: usize,
    /// 0 = checkpoint only at the end.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Newest checkpoints kept, besides those `latest` and `best` name (0 = keep all).
    #[serde(default)]
    pub keep_last: usize,
    /// Also checkpoint at each new best of `best_metric`, and keep it (`checkpoints/best`).
    #[serde(default)]
    pub keep_best: bool,
    /// The evaluation metric `keep_best` follows; lower is better unless it is an accuracy or F1.
    #[serde(default = "default_best_metric")]
    pub best_metric: String,
    /// Data-parallel jobs: 1 shards the optimizer state over the ranks (ZeRO stage 1: each
    /// rank updates the parameters it owns and sends them to the others); 0 (default) keeps a
    /// whole copy on every rank. One process ignores it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zero_stage: u8,
}

fn is_zero(x: &u8) -> bool {
    *x == 0
}

fn default_best_metric() -> String {
    "eval/loss".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The recipe file's shape; `D` is the `[data]` section: raw TOML when reading (decoded by
/// [`DataConfig::decode`] once the task is known), the [`DataConfig`] when writing.
struct RawRecipe<D> {
    /// Written into a run's resolved recipe so the run keeps its recipe's name; otherwise the
    /// file name gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default)]
    description: String,
    task: Task,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default = "default_device")]
    device: String,
    #[serde(default = "default_precision")]
    precision: Precision,
    /// Start from these weights: a Hugging Face model folder or a hub id (`org/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_from: Option<String>,
    /// A language model's Jinja chat template, written by `kiln export` into
    /// `tokenizer_config.json` (serving stacks format chat requests with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
    model: toml::Table,
    data: D,
    optim: OptimConfig,
    #[serde(default)]
    schedule: ScheduleConfig,
    trainer: TrainerConfig,
}

/// A validated recipe. `model` is still raw TOML: `kiln-models` decodes it.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// File stem, e.g. `shakespeare-char`.
    pub name: String,
    pub description: String,
    pub task: Task,
    pub seed: u64,
    pub device: String,
    pub precision: Precision,
    /// Start from these weights: a Hugging Face model folder or a hub id (`org/name`).
    pub init_from: Option<String>,
    /// A language model's Jinja chat template, for its export's `tokenizer_config.json`.
    pub chat_template: Option<String>,
    pub model: toml::Table,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub trainer: TrainerConfig,
    pub source: RecipeSource,
}

fn one() -> usize {
    1
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_log_every() -> usize {
    10
}
fn default_seed() -> u64 {
    1337
}
fn default_device() -> String {
    "auto".into()
}
fn default_precision() -> Precision {
    Precision::F32
}

impl Recipe {
    /// Reads a recipe file and applies `--set` overrides.
    pub fn load(path: impl AsRef<Path>, sets: &[String]) -> Result<Recipe, RecipeError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            location: path.display().to_string(),
            key: String::new(),
            message: format!("cannot read the recipe: {e} (run `kiln recipes` to list recipes)"),
        })?;
        Self::parse(path, &text, sets)
    }

    /// Parses recipe text; `path` is used for the name and in error messages.
    pub fn parse(path: &Path, text: &str, sets: &[String]) -> Result<Recipe, RecipeError> {
        let source = RecipeSource::new(path, text, sets)?;
        let value: toml::Value = toml::from_str::<toml::Table>(&source.text)
            .map(toml::Value::Table)
            .map_err(|e| RecipeError {
                location: path.display().to_string(),
                key: String::new(),
                message: format!("TOML syntax error: {}", e.message()),
            })?;
        let raw: RawRecipe<toml::Table> = source.decode("", value)?;
        let data = DataConfig::decode(&source, raw.task, raw.data)?;
        let name = raw.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "recipe".into())
        });
        let recipe = Recipe {
            name,
            description: raw.description,
            task: raw.task,
            seed: raw.seed,
            device: raw.device,
            precision: raw.precision,
            init_from: raw.init_from,
            chat_template: raw.chat_template,
            model: raw.model,
            data,
            optim: raw.optim,
            schedule: raw.schedule,
            trainer: raw.trainer,
            source,
        };
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), RecipeError> {
        let err = |key: &str, msg: String| Err(self.source.error(key, msg));
        crate::device::parse_device(&self.device).map_err(|m| self.source.error("device", m))?;
        self.data.validate(&self.source)?;
        if let Some(t) = &self.chat_template {
            if self.task != Task::LanguageModel {
                return err(
                    "chat_template",
                    "applies to language-model recipes only; remove it".into(),
                );
            }
            if t.trim().is_empty() {
                return err(
                    "chat_template",
                    "is empty; remove it, or give the Jinja template that serving stacks format \
                     chat requests with"
                        .into(),
                );
            }
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return err(
                "optim.lr",
                format!("must be a positive number, got {}", o.lr),
            );
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return err(
                "optim.weight_decay",
                format!("must be ≥ 0, got {}", o.weight_decay),
            );
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return err(
                    "optim.betas",
                    format!("betas[{i}] must be in [0, 1), got {b}"),
                );
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return err("optim.eps", format!("must be > 0, got {}", o.eps));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return err(
                "optim.momentum",
                format!("must be in [0, 1), got {}", o.momentum),
            );
        }
        if o.nesterov && (o.name != OptimizerName::Sgd || o.momentum == 0.0) {
            return err(
                "optim.nesterov",
                "needs name = \"sgd\" and momentum > 0".into(),
            );
        }
        let s = &self.schedule;
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return err(
                "schedule.min_lr_ratio",
                format!("must be in [0, 1], got {}", s.min_lr_ratio),
            );
        }
        if s.decay_steps == Some(0) {
            return err("schedule.decay_steps", "must be at least 1".into());
        }
        let t = &self.trainer;
        match (t.max_steps, t.epochs) {
            (Some(_), Some(_)) => {
                return err(
                    "trainer.epochs",
                    "set either trainer.max_steps or trainer.epochs, not both".into(),
                )
            }
            (None, None) => {
                return err(
                    "trainer.max_steps",
                    "missing: set trainer.max_steps or trainer.epochs".into(),
                )
            }
            (Some(0), _) => return err("trainer.max_steps", "must be at least 1".into()),
            (_, Some(0)) => return err("trainer.epochs", "must be at least 1".into()),
            _ => {}
        }
        if t.grad_accum == 0 {
            return err("trainer.grad_accum", "must be at least 1".into());
        }
        if !(t.clip_grad_norm.is_finite() && t.clip_grad_norm >= 0.0) {
            return err(
                "trainer.clip_grad_norm",
                format!("must be ≥ 0 (0 = off), got {}", t.clip_grad_norm),
            );
        }
        if !t.best_metric.starts_with("eval/") {
            return err(
                "trainer.best_metric",
                format!(
                    "`{}` is not an evaluation metric; use e.g. \"eval/loss\" or \"eval/accuracy\"",
                    t.best_metric
                ),
            );
        }
        if t.log_every == 0 {
            return err("trainer.log_every", "must be at least 1".into());
        }
        if t.zero_stage > 1 {
            return err(
                "trainer.zero_stage",
                format!(
                    "stage {} is not built: 0 (whole optimizer state on every rank) or 1 (the \
                     state sharded over the ranks)",
                    t.zero_stage
                ),
            );
        }
        Ok(())
    }

    /// The model table's `kind`.
    pub fn model_kind(&self) -> &str {
        self.model
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }

    /// The recipe as resolved TOML (after overrides, defaults filled in). `model` is the resolved
    /// model table supplied by the model zoo.
    pub fn to_toml(&self, model: &toml::Table) -> String {
        let raw = RawRecipe {
            name: Some(self.name.clone()),
            description: self.description.clone(),
            task: self.task,
            seed: self.seed,
            device: self.device.clone(),
            precision: self.precision,
            init_from: self.init_from.clone(),
            chat_template: self.chat_template.clone(),
            model: model.clone(),
            data: self.data.clone(),
            optim: self.optim.clone(),
            schedule: self.schedule.clone(),
            trainer: self.trainer.clone(),
        };
        toml::to_string(&raw).expect("a recipe always serializes")
    }
}

/// A recipe in `recipes/` with its one-line description (for `kiln recipes`).
pub struct RecipeListing {
    pub name: String,
    pub path: PathBuf,
    pub description: String,
}

/// Lists `*.toml` recipes in `dir`, sorted by name.
pub fn list_recipes(dir: &Path) -> std::io::Result<Vec<RecipeListing>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(crate::fs::at(dir))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).map_err(crate::fs::at(&path))?;
            let description = toml::from_str::<toml::Table>(&text)
                .ok()
                .and_then(|t| t.get("description")?.as_str().map(str::to_string))
                .unwrap_or_else(|| "(unreadable recipe)".into());
            out.push(RecipeListing {
                name: path
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                path,
                description,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
