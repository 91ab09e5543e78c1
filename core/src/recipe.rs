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

mod source;

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
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    /// Fashion-MNIST in IDX(.gz) files (Debian's `dataset-fashion-mnist`).
    FashionMnist,
    /// One text file, character-level tokens, first `1 - val_fraction` for training.
    TextChar,
    /// One text file tokenized with a Hugging Face `tokenizer.json` (e.g. GPT-2's BPE).
    TextBpe,
    /// Labelled text in TSV/CSV files, for an encoder (BERT).
    TextClassification,
    /// PNG/JPEG images in class folders: `path/{train,val,test}/<class>/*` or `path/<class>/*`.
    ImageFolder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: Dataset,
    /// Folder (fashion-mnist, image-folder, text-classification) or file (text-char,
    /// text-bpe). Relative paths are taken from the current directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    pub batch_size: usize,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// fashion-mnist, image-folder (without a `val` folder), text-classification (without
    /// `val`): examples held out of the training split for validation.
    #[serde(default)]
    pub val_size: usize,
    /// text-char: fraction of the text (from the end) used for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// text-char: tokens per training sequence.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Batches prepared ahead of the training step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// text-bpe: the tokenizer (default: `init_from`'s `tokenizer.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// text-bpe: where token arrays are cached (default: `$KILN_CACHE_DIR`, else
    /// `~/.cache/kiln`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// text-classification: file names in `path` (`val` absent: `val_size` training rows are
    /// held out; `test` absent: no test split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    /// text-classification: the header names of the text and label columns.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// text-classification: label names in id order, or a JSON file (in `path`) holding that
    /// list (default: the sorted training labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// text-classification: tokens per example, special tokens included.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// text-classification: batch examples of similar length together (less padding).
    #[serde(default)]
    pub bucket_by_length: bool,
    /// image-folder (required): every image is resized to `[height, width]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[usize; 2]>,
    /// image-folder: 1 (grey) or 3 (RGB, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// fashion-mnist, image-folder: per-channel normalization of pixels scaled to [0, 1]
    /// (default: the data set's own statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<NormalizeConfig>,
    /// fashion-mnist, image-folder: training-time augmentation (absent: none). Validation and
    /// test batches are never augmented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentConfig>,
}

impl DataConfig {
    /// Tokens per example the data yields (what a text model's context must hold): text-char
    /// and text-bpe's `seq_len`, text-classification's `max_length`, 0 for images.
    pub fn example_len(&self) -> usize {
        match (self.seq_len, self.dataset) {
            (Some(n), _) => n,
            (None, Dataset::TextClassification) => self.max_length,
            (None, _) => 0,
        }
    }
}

/// `normalize = { mean = [...], std = [...] }`: `x = (pixel / 255 - mean[c]) / std[c]`, one
/// value per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// `augment = { crop_padding = 4, hflip = true, mixup_alpha = 0.2, cutmix_alpha = 1.0,
/// mix_prob = 1.0 }`; every key is optional and off by default (`mix_prob`: 1). Per example:
/// a random crop after zero padding, then a horizontal flip, then normalization; per batch,
/// with probability `mix_prob`, Mixup or CutMix (50/50 when both alphas are set) with the
/// batch reversed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Zero (black) padding added on each side before cropping back to the image size at a
    /// random offset, like torchvision's `RandomCrop(size, padding = crop_padding)`; 0 = no crop.
    #[serde(deserialize_with = "non_negative_int")]
    pub crop_padding: usize,
    /// Flip each training image left-right with probability 0.5.
    pub hflip: bool,
    /// Mixup: `x = λ·x + (1 − λ)·x_partner`, `λ ~ Beta(α, α)`; 0 = off.
    pub mixup_alpha: f64,
    /// CutMix: a box of area `1 − λ` pasted from the partner, `λ ~ Beta(α, α)` (then
    /// recomputed from the clipped box); 0 = off.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all (when an alpha is set).
    pub mix_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_padding: 0,
            hflip: false,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
        }
    }
}

impl AugmentConfig {
    /// Whether any batch gets mixed.
    pub fn mixes(&self) -> bool {
        self.mix_prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }
}

fn non_negative_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = i64::deserialize(d)?;
    usize::try_from(v).map_err(|_| {
        serde::de::Error::custom(format!(
            "must be a whole number ≥ 0 (pixels of padding on each side; 0 = no crop), got {v}"
        ))
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Labels {
    List(Vec<String>),
    File(PathBuf),
}

fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}
fn default_max_length() -> usize {
    128
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
}

fn default_best_metric() -> String {
    "eval/loss".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
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
    model: toml::Table,
    data: DataConfig,
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
    pub model: toml::Table,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub trainer: TrainerConfig,
    pub source: RecipeSource,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_val_fraction() -> f64 {
    0.1
}
fn default_prefetch() -> usize {
    4
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
        let raw: RawRecipe = source.decode("", value)?;
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
            model: raw.model,
            data: raw.data,
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
        if !self.model.contains_key("kind") {
            return err(
                "model.kind",
                "missing; valid choices: \"mlp\", \"cnn\", \"gpt\", \"llama\", \"bert\"".into(),
            );
        }
        let d = &self.data;
        if d.batch_size == 0 {
            return err("data.batch_size", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&d.val_fraction) {
            return err(
                "data.val_fraction",
                format!("must be in [0, 1), got {}", d.val_fraction),
            );
        }
        if d.prefetch == 0 {
            return err("data.prefetch", "must be at least 1".into());
        }
        match (self.task, d.dataset) {
            (Task::Classification, Dataset::TextClassification) => {
                if d.train.is_none() {
                    return err(
                        "data.train",
                        "missing: the training file's name in data.path, e.g. train = \"train.tsv\"".into(),
                    );
                }
                if d.max_length < 2 {
                    return err("data.max_length", "must be at least 2".into());
                }
            }
            (Task::Classification, Dataset::FashionMnist | Dataset::ImageFolder) => {
                if d.seq_len.is_some() {
                    return err(
                        "data.seq_len",
                        "applies to text data sets only; remove it".into(),
                    );
                }
            }
            (Task::LanguageModel, Dataset::TextChar | Dataset::TextBpe) => match d.seq_len {
                None => return err("data.seq_len", "missing: text data needs a sequence length (the model's context), e.g. seq_len = 64".into()),
                Some(0) => return err("data.seq_len", "must be at least 1".into()),
                _ => {}
            },
            (task, ds) => {
                return err(
                    "data.dataset",
                    format!(
                        "{ds:?} does not fit task {task:?}: fashion-mnist, image-folder and \
                         text-classification are for \"classification\", text-char and text-bpe for \
                         \"language-model\""
                    ),
                )
            }
        }
        self.validate_image_keys()?;
        if d.dataset != Dataset::TextBpe {
            if d.cache_dir.is_some() {
                return err(
                    "data.cache_dir",
                    "applies to dataset = \"text-bpe\" only; remove it".into(),
                );
            }
            if d.tokenizer.is_some() && d.dataset != Dataset::TextClassification {
                return err(
                    "data.tokenizer",
                    "applies to dataset = \"text-bpe\" or \"text-classification\" only; remove it"
                        .into(),
                );
            }
        }
        if d.dataset != Dataset::TextClassification {
            for (key, set) in [
                ("data.train", d.train.is_some()),
                ("data.val", d.val.is_some()),
                ("data.test", d.test.is_some()),
                ("data.labels", d.labels.is_some()),
                ("data.text_column", d.text_column != default_text_column()),
                (
                    "data.label_column",
                    d.label_column != default_label_column(),
                ),
                ("data.max_length", d.max_length != default_max_length()),
                ("data.bucket_by_length", d.bucket_by_length),
            ] {
                if set {
                    return err(
                        key,
                        "applies to dataset = \"text-classification\" only; remove it".into(),
                    );
                }
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
        Ok(())
    }

    /// The keys of image data sets: `image_size`, `channels`, `normalize`, `augment`.
    fn validate_image_keys(&self) -> Result<(), RecipeError> {
        let err = |key: &str, msg: String| Err(self.source.error(key, msg));
        let d = &self.data;
        let folder = d.dataset == Dataset::ImageFolder;
        if !folder {
            for (key, set) in [
                ("data.image_size", d.image_size.is_some()),
                ("data.channels", d.channels.is_some()),
            ] {
                if set {
                    return err(
                        key,
                        "applies to dataset = \"image-folder\" only; remove it".into(),
                    );
                }
            }
        }
        if !matches!(d.dataset, Dataset::FashionMnist | Dataset::ImageFolder) {
            for (key, set) in [
                ("data.normalize", d.normalize.is_some()),
                ("data.augment", d.augment.is_some()),
            ] {
                if set {
                    return err(
                        key,
                        "applies to image data sets (fashion-mnist, image-folder) only; remove it"
                            .into(),
                    );
                }
            }
            return Ok(());
        }
        if folder {
            if d.path.is_none() {
                return err(
                    "data.path",
                    "missing: image-folder needs the root folder, holding train/<class>/*.png \
                     (and optionally val/, test/) or <class>/*.png"
                        .into(),
                );
            }
            match d.image_size {
                None => {
                    return err(
                        "data.image_size",
                        "missing: image-folder resizes every image to [height, width], e.g. \
                         image_size = [32, 32]"
                            .into(),
                    )
                }
                Some([h, w]) if h == 0 || w == 0 => {
                    return err(
                        "data.image_size",
                        format!("both sides must be at least 1, got [{h}, {w}]"),
                    )
                }
                Some([h, w]) if h.saturating_mul(w) > 4096 * 4096 => {
                    return err(
                        "data.image_size",
                        format!("[{h}, {w}] is too large (at most 4096 × 4096 pixels)"),
                    )
                }
                _ => {}
            }
            if let Some(c) = d.channels {
                if c != 1 && c != 3 {
                    return err(
                        "data.channels",
                        format!("must be 1 (grey) or 3 (RGB), got {c}"),
                    );
                }
            }
        }
        // Fashion-MNIST is grey.
        let channels = if folder { d.channels.unwrap_or(3) } else { 1 };
        if let Some(n) = &d.normalize {
            for (key, v) in [
                ("data.normalize.mean", &n.mean),
                ("data.normalize.std", &n.std),
            ] {
                if v.len() != channels {
                    return err(
                        key,
                        format!(
                            "needs one value per channel: {channels} for these images, got {}",
                            v.len()
                        ),
                    );
                }
            }
            if let Some(m) = n.mean.iter().find(|m| !m.is_finite()) {
                return err("data.normalize.mean", format!("must be finite, got {m}"));
            }
            if let Some(s) = n.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return err(
                    "data.normalize.std",
                    format!("every value must be a positive number, got {s}"),
                );
            }
        }
        if let Some(a) = &d.augment {
            if a.crop_padding > 4096 {
                return err(
                    "data.augment.crop_padding",
                    format!("must be at most 4096, got {}", a.crop_padding),
                );
            }
            for (key, alpha) in [
                ("data.augment.mixup_alpha", a.mixup_alpha),
                ("data.augment.cutmix_alpha", a.cutmix_alpha),
            ] {
                if !(alpha.is_finite() && alpha >= 0.0) {
                    return err(
                        key,
                        format!("must be ≥ 0 (0 = off; 0.2 to 1 are usual), got {alpha}"),
                    );
                }
            }
            if !(0.0..=1.0).contains(&a.mix_prob) {
                return err(
                    "data.augment.mix_prob",
                    format!("must be in [0, 1], got {}", a.mix_prob),
                );
            }
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
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)?;
            let description = toml::from_str::<toml::Table>(&text)
                .ok()
                .and_then(|t| t.get("description")?.as_str().map(str::to_string))
                .unwrap_or_else(|| "(unreadable recipe)".into());
            out.push(RecipeListing {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                path,
                description,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
