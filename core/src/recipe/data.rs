//! The `[data]` section: a few keys every data set takes (`dataset`, `path`, `batch_size`,
//! `shuffle`, `prefetch`), and the rest by `dataset`, each data set with a struct of its own
//! that denies keys it does not use.
//!
//! serde's `flatten` does not combine with `deny_unknown_fields`, so the table is decoded by
//! hand, like `[model]` by `kind`: the common keys first (through [`RecipeSource::decode`], so
//! errors keep their file and line), then whether the data set fits the task, then the keys the
//! data set does not take (one error naming the key, the data set and the keys it takes), then
//! the rest into the data set's struct. Serialized, the section is the same flat table again.
//!
//! Run directories written before the split hold a `recipe.toml` whose `[data]` carries every
//! key of the old flat struct that had a default, whatever the data set (a Fashion-MNIST run
//! has `val_fraction = 0.1`, `text_column = "text"`, `max_length = 128`, ...). So a key that
//! does not apply to the data set is let through (and dropped) when it holds exactly the value
//! the old version wrote by default ([`legacy_default`]); any other value is an error.

use super::{RecipeError, RecipeSource, Task};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

impl Dataset {
    pub const ALL: [Dataset; 5] = [
        Dataset::FashionMnist,
        Dataset::TextChar,
        Dataset::TextBpe,
        Dataset::TextClassification,
        Dataset::ImageFolder,
    ];

    /// The name a recipe writes, e.g. `"text-char"`.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::FashionMnist => "fashion-mnist",
            Dataset::TextChar => "text-char",
            Dataset::TextBpe => "text-bpe",
            Dataset::TextClassification => "text-classification",
            Dataset::ImageFolder => "image-folder",
        }
    }

    /// Every key this data set takes: the [`COMMON_KEYS`], then its own.
    pub fn keys(self) -> Vec<&'static str> {
        COMMON_KEYS.iter().chain(self.own_keys()).copied().collect()
    }

    /// The keys of this data set's own struct (besides the [`COMMON_KEYS`]).
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            Dataset::FashionMnist => struct_fields::<FashionMnistData>(),
            Dataset::TextChar => struct_fields::<TextCharData>(),
            Dataset::TextBpe => struct_fields::<TextBpeData>(),
            Dataset::TextClassification => struct_fields::<TextClassificationData>(),
            Dataset::ImageFolder => struct_fields::<ImageFolderData>(),
        }
    }

    /// The key this data set cannot do without, and what to say when it is missing.
    fn required(self) -> Option<(&'static str, &'static str)> {
        match self {
            Dataset::FashionMnist => None,
            Dataset::TextChar | Dataset::TextBpe => Some((
                "seq_len",
                "missing: text data needs a sequence length (the model's context), e.g. seq_len = 64",
            )),
            Dataset::TextClassification => Some((
                "train",
                "missing: the training file's name in data.path, e.g. train = \"train.tsv\"",
            )),
            Dataset::ImageFolder => Some((
                "image_size",
                "missing: image-folder resizes every image to [height, width], e.g. \
                 image_size = [32, 32]",
            )),
        }
    }

    fn fits(self, task: Task) -> bool {
        match task {
            Task::Classification => matches!(
                self,
                Dataset::FashionMnist | Dataset::ImageFolder | Dataset::TextClassification
            ),
            Task::LanguageModel => matches!(self, Dataset::TextChar | Dataset::TextBpe),
        }
    }
}

/// The keys every data set takes.
const COMMON_KEYS: [&str; 5] = ["dataset", "path", "batch_size", "shuffle", "prefetch"];

/// The `[data]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataConfig {
    /// `dataset` and the keys of that data set.
    #[serde(flatten)]
    pub source: DataSource,
    /// Folder (fashion-mnist, image-folder, text-classification) or file (text-char,
    /// text-bpe). Relative paths are taken from the current directory.
    pub path: Option<PathBuf>,
    pub batch_size: usize,
    pub shuffle: bool,
    /// Batches prepared ahead of the training step.
    pub prefetch: usize,
}

/// The common keys, as decoded (the rest of the table goes to the data set's struct).
#[derive(Deserialize)]
struct CommonKeys {
    dataset: Dataset,
    path: Option<PathBuf>,
    batch_size: usize,
    #[serde(default = "yes")]
    shuffle: bool,
    #[serde(default = "default_prefetch")]
    prefetch: usize,
}

/// The data set and its own keys; `dataset` is the tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "dataset", rename_all = "kebab-case")]
pub enum DataSource {
    FashionMnist(FashionMnistData),
    TextChar(TextCharData),
    TextBpe(TextBpeData),
    TextClassification(TextClassificationData),
    ImageFolder(ImageFolderData),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistData {
    /// Training images held out (from the end) for validation.
    #[serde(default)]
    pub val_size: usize,
    /// Per-channel normalization (default: the data set's own statistics).
    pub normalize: Option<NormalizeConfig>,
    /// Training-time augmentation (absent: none).
    pub augment: Option<AugmentConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderData {
    /// Every image is resized to `[height, width]`.
    pub image_size: [usize; 2],
    /// 1 (grey) or 3 (RGB, the default).
    pub channels: Option<usize>,
    /// Without a `val` folder: training images held out for validation.
    #[serde(default)]
    pub val_size: usize,
    /// Per-channel normalization (default: the training images' own statistics).
    pub normalize: Option<NormalizeConfig>,
    /// Training-time augmentation (absent: none).
    pub augment: Option<AugmentConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextCharData {
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of the text (from the end) used for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextBpeData {
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of the tokens (from the end) used for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// The tokenizer (default: `init_from`'s `tokenizer.json`).
    pub tokenizer: Option<PathBuf>,
    /// Where token arrays are cached (default: `$KILN_CACHE_DIR`, else `~/.cache/kiln`).
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextClassificationData {
    /// File names in `path` (`val` absent: `val_size` training rows are held out; `test`
    /// absent: no test split).
    pub train: String,
    pub val: Option<String>,
    pub test: Option<String>,
    #[serde(default)]
    pub val_size: usize,
    /// The header names of the text and label columns.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Label names in id order, or a JSON file (in `path`) holding that list (default: the
    /// sorted training labels).
    pub labels: Option<Labels>,
    /// Tokens per example, special tokens included.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Batch examples of similar length together, in training and evaluation (less padding).
    #[serde(default)]
    pub bucket_by_length: bool,
    /// The tokenizer (default: `init_from`'s `tokenizer.json`).
    pub tokenizer: Option<PathBuf>,
}

impl DataConfig {
    /// Which data set.
    pub fn dataset(&self) -> Dataset {
        match &self.source {
            DataSource::FashionMnist(_) => Dataset::FashionMnist,
            DataSource::TextChar(_) => Dataset::TextChar,
            DataSource::TextBpe(_) => Dataset::TextBpe,
            DataSource::TextClassification(_) => Dataset::TextClassification,
            DataSource::ImageFolder(_) => Dataset::ImageFolder,
        }
    }

    /// Tokens per example the data yields (what a text model's context must hold): text-char
    /// and text-bpe's `seq_len`, text-classification's `max_length`, 0 for images.
    pub fn example_len(&self) -> usize {
        match &self.source {
            DataSource::TextChar(t) => t.seq_len,
            DataSource::TextBpe(t) => t.seq_len,
            DataSource::TextClassification(t) => t.max_length,
            DataSource::FashionMnist(_) | DataSource::ImageFolder(_) => 0,
        }
    }

    /// The text-classification settings, if this is that data set.
    pub fn text_classification(&self) -> Option<&TextClassificationData> {
        match &self.source {
            DataSource::TextClassification(t) => Some(t),
            _ => None,
        }
    }

    /// Decodes the `[data]` table of a recipe whose task is `task`.
    pub(super) fn decode(
        src: &RecipeSource,
        task: Task,
        table: toml::Table,
    ) -> Result<Self, RecipeError> {
        let (common, mut rest): (toml::Table, toml::Table) = table
            .into_iter()
            .partition(|(k, _)| COMMON_KEYS.contains(&k.as_str()));
        let c: CommonKeys = src.decode("data", toml::Value::Table(common))?;
        let ds = c.dataset;
        if !ds.fits(task) {
            return Err(src.error(
                "data.dataset",
                format!(
                    "{ds:?} does not fit task {task:?}: fashion-mnist, image-folder and \
                     text-classification are for \"classification\", text-char and text-bpe for \
                     \"language-model\""
                ),
            ));
        }
        let own = ds.own_keys();
        let foreign: Vec<String> = rest
            .keys()
            .filter(|k| !own.contains(&k.as_str()))
            .cloned()
            .collect();
        for key in foreign {
            let value = rest.remove(&key);
            if legacy_default(&key).is_some_and(|old| value == Some(old)) {
                continue;
            }
            let keys = (ds.keys().iter())
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let what = if Dataset::ALL
                .iter()
                .any(|d| d.own_keys().contains(&key.as_str()))
            {
                format!("data.{key} does not apply to")
            } else {
                format!("unknown field `{key}` for")
            };
            return Err(src.error(
                &format!("data.{key}"),
                format!("{what} dataset \"{}\"; its keys: {keys}", ds.name()),
            ));
        }
        if let Some((key, message)) = ds.required() {
            if !rest.contains_key(key) {
                return Err(src.error(&format!("data.{key}"), message));
            }
        }
        let value = toml::Value::Table(rest);
        let source = match ds {
            Dataset::FashionMnist => DataSource::FashionMnist(src.decode("data", value)?),
            Dataset::TextChar => DataSource::TextChar(src.decode("data", value)?),
            Dataset::TextBpe => DataSource::TextBpe(src.decode("data", value)?),
            Dataset::TextClassification => {
                DataSource::TextClassification(src.decode("data", value)?)
            }
            Dataset::ImageFolder => DataSource::ImageFolder(src.decode("data", value)?),
        };
        Ok(DataConfig {
            path: c.path,
            batch_size: c.batch_size,
            shuffle: c.shuffle,
            prefetch: c.prefetch,
            source,
        })
    }

    /// Range checks, and the keys that depend on each other.
    pub(super) fn validate(&self, src: &RecipeSource) -> Result<(), RecipeError> {
        let err = |key: &str, msg: String| Err(src.error(key, msg));
        if self.batch_size == 0 {
            return err("data.batch_size", "must be at least 1".into());
        }
        if self.prefetch == 0 {
            return err("data.prefetch", "must be at least 1".into());
        }
        let (seq_len, val_fraction) = match &self.source {
            DataSource::TextChar(t) => (t.seq_len, t.val_fraction),
            DataSource::TextBpe(t) => (t.seq_len, t.val_fraction),
            DataSource::TextClassification(t) if t.max_length < 2 => {
                return err("data.max_length", "must be at least 2".into())
            }
            DataSource::TextClassification(_) => return Ok(()),
            DataSource::FashionMnist(f) => {
                // Fashion-MNIST is grey.
                return validate_image_keys(src, 1, &f.normalize, &f.augment);
            }
            DataSource::ImageFolder(f) => return self.validate_image_folder(src, f),
        };
        if !(0.0..1.0).contains(&val_fraction) {
            return err(
                "data.val_fraction",
                format!("must be in [0, 1), got {val_fraction}"),
            );
        }
        if seq_len == 0 {
            return err("data.seq_len", "must be at least 1".into());
        }
        Ok(())
    }

    fn validate_image_folder(
        &self,
        src: &RecipeSource,
        f: &ImageFolderData,
    ) -> Result<(), RecipeError> {
        let err = |key: &str, msg: String| Err(src.error(key, msg));
        if self.path.is_none() {
            return err(
                "data.path",
                "missing: image-folder needs the root folder, holding train/<class>/*.png \
                 (and optionally val/, test/) or <class>/*.png"
                    .into(),
            );
        }
        let [h, w] = f.image_size;
        if h == 0 || w == 0 {
            return err(
                "data.image_size",
                format!("both sides must be at least 1, got [{h}, {w}]"),
            );
        }
        if h.saturating_mul(w) > 4096 * 4096 {
            return err(
                "data.image_size",
                format!("[{h}, {w}] is too large (at most 4096 × 4096 pixels)"),
            );
        }
        let channels = f.channels.unwrap_or(3);
        if channels != 1 && channels != 3 {
            return err(
                "data.channels",
                format!("must be 1 (grey) or 3 (RGB), got {channels}"),
            );
        }
        validate_image_keys(src, channels, &f.normalize, &f.augment)
    }
}

/// The value the flat `[data]` struct before the split wrote for `key` in every run's
/// `recipe.toml`, whatever the data set (the keys that had a default and no `Option`).
fn legacy_default(key: &str) -> Option<toml::Value> {
    Some(match key {
        "val_size" => toml::Value::Integer(0),
        "val_fraction" => toml::Value::Float(default_val_fraction()),
        "text_column" => toml::Value::String(default_text_column()),
        "label_column" => toml::Value::String(default_label_column()),
        "max_length" => toml::Value::Integer(default_max_length() as i64),
        "bucket_by_length" => toml::Value::Boolean(false),
        _ => return None,
    })
}

/// `normalize` and `augment` of images with `channels` channels.
fn validate_image_keys(
    src: &RecipeSource,
    channels: usize,
    normalize: &Option<NormalizeConfig>,
    augment: &Option<AugmentConfig>,
) -> Result<(), RecipeError> {
    let err = |key: &str, msg: String| Err(src.error(key, msg));
    if let Some(n) = normalize {
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
    if let Some(a) = augment {
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
/// batch reversed. Validation and test batches are never augmented.
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

fn yes() -> bool {
    true
}
fn default_prefetch() -> usize {
    4
}
fn default_val_fraction() -> f64 {
    0.1
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

/// The field names a derived `Deserialize` struct declares (what `deny_unknown_fields` accepts),
/// read by asking it to deserialize from a deserializer that only records them.
fn struct_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(&'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut probe = Probe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}
