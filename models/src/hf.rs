//! Hugging Face model folders: `config.json` ↔ kiln model configs, and tensors between kiln's
//! names and the ones `transformers` writes and reads.
//!
//! kiln's parameter paths already are HF's, so the mapping is small: GPT-2 always has biases
//! (a bias-free kiln GPT exports zeros for them), HF's GPT-2 checkpoints may omit the
//! `transformer.` prefix and carry attention-mask buffers, and Llama checkpoints may carry
//! rotary `inv_freq` buffers or a tied `lm_head`.

use crate::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Recipe keys that only affect training: a fine-tuning recipe may set them over a pretrained
/// model's config.
pub const TRAINING_KEYS: [&str; 6] = [
    "dropout",
    "checkpoint_activations",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "num_labels",
    "lora",
];

/// Special token ids written into `config.json` and `generation_config.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// The id batches are padded with (BERT's `[PAD]`); None when the vocabulary has none.
    pub pad: Option<u32>,
}

/// `config.json` for `cfg` (`torch_dtype` is the exported weights' dtype).
pub fn hf_config(cfg: &ModelConfig, dtype: DType, special: SpecialTokens) -> Result<Value> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot export weights as {other:?}"),
    };
    let mut v = match cfg.to_hf() {
        Some(v) => v?,
        None => bail!("a {} model has no Hugging Face export yet", cfg.kind()),
    };
    if cfg.image_classifier().is_some() {
        v["dtype"] = torch_dtype.into();
        v["torch_dtype"] = torch_dtype.into();
        return Ok(v);
    }
    // `dtype` is transformers ≥ 4.56's key, `torch_dtype` the one older readers look for.
    v["dtype"] = torch_dtype.into();
    v["torch_dtype"] = torch_dtype.into();
    // Explicit nulls: GPT-2's config class would otherwise assume its own ids (50256).
    v["bos_token_id"] = special.bos.into();
    v["eos_token_id"] = special.eos.into();
    v["pad_token_id"] = special.pad.into();
    Ok(v)
}

/// A `config.json` being read into a kiln config; its errors name the folder and the key.
pub struct HfReader<'a> {
    pub v: &'a Value,
    source: &'a Path,
}

impl HfReader<'_> {
    pub fn ctx(&self) -> String {
        format!("{}", self.source.display())
    }

    /// The whole number at `k`.
    pub fn uint(&self, k: &str) -> Result<usize> {
        self.v[k]
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("{}: `{k}` is missing or not a whole number", self.ctx()))
    }

    /// The number at `k`, or `d` when it is absent.
    pub fn float_or(&self, k: &str, d: f64) -> Result<f64> {
        match &self.v[k] {
            Value::Null => Ok(d),
            x => x
                .as_f64()
                .with_context(|| format!("{}: `{k}` is not a number", self.ctx())),
        }
    }

    /// The error for a value at `k` that kiln does not compute the same way, saying `why`.
    pub fn refuse(&self, k: &str, why: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: `{k}` = {}: {why}", self.ctx(), self.v[k])
    }
}

/// The kiln config of a `config.json`; anything kiln's implementation does not compute the same
/// way is refused, naming the key.
pub fn from_hf_config(v: &Value, source: &Path) -> Result<ModelConfig> {
    ModelConfig::from_hf(&HfReader { v, source })
}

/// Classes of a classifier's `config.json`: `id2label`'s size, else `num_labels`, else 0.
pub(crate) fn num_labels(v: &Value) -> usize {
    match v["id2label"].as_object() {
        Some(m) if !m.is_empty() => m.len(),
        _ => v["num_labels"].as_u64().unwrap_or(0) as usize,
    }
}

/// Reads and converts `folder/config.json`.
pub fn read_hf_config(folder: &Path) -> Result<ModelConfig> {
    let p = folder.join("config.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    parse_hf_config(&text, &p)
}

/// [`read_hf_config`] on the text of `config.json` (`source` names it in errors).
pub fn parse_hf_config(text: &str, source: &Path) -> Result<ModelConfig> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("{} is not JSON", source.display()))?;
    from_hf_config(&v, source)
}

/// A recipe's `[model]` table laid over a pretrained config: training-only keys may change;
/// any other key must agree with the pretrained value. Returns the merged table, or the key and
/// message of the first disagreement.
pub fn merge_recipe_model(
    pretrained: &ModelConfig,
    recipe: &toml::Table,
    source: &str,
) -> std::result::Result<toml::Table, (String, String)> {
    let mut merged = pretrained.to_table();
    for (k, v) in recipe {
        if TRAINING_KEYS.contains(&k.as_str()) {
            merged.insert(k.clone(), v.clone());
            continue;
        }
        match merged.get(k) {
            Some(p) if same(p, v) => {}
            Some(p) => {
                return Err((
                    format!("model.{k}"),
                    format!(
                        "{v} differs from the pretrained model's {p} ({source}); remove it to \
                         keep the pretrained architecture"
                    ),
                ))
            }
            None => {
                return Err((
                    format!("model.{k}"),
                    format!(
                        "not a key of the pretrained {} model ({source}); with init_from only \
                         kind and the training keys ({}) may be set",
                        pretrained.kind(),
                        TRAINING_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(merged)
}

fn same(a: &toml::Value, b: &toml::Value) -> bool {
    match (
        a.as_float().or(a.as_integer().map(|i| i as f64)),
        b.as_float().or(b.as_integer().map(|i| i as f64)),
    ) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// kiln's tensors (from a checkpoint) under the names and shapes HF expects, in `dtype`.
pub fn to_hf_tensors(
    cfg: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    tensors.extend(cfg.spec().hf_extra_tensors()?);
    tensors
        .into_iter()
        .map(|(k, t)| {
            // PyTorch's BatchNorm counts batches in an int64 buffer; kiln keeps it in f32.
            let dtype = if k.ends_with(".num_batches_tracked") {
                DType::I64
            } else {
                dtype
            };
            Ok((k, t.to_dtype(dtype)?.contiguous()?))
        })
        .collect()
}

/// A pretrained checkpoint's tensors under kiln's names: prefixes restored, buffers and tied
/// copies dropped. Anything else unexpected is an error naming it.
pub fn from_hf_tensors(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    expected: &[String],
    source: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut unexpected = Vec::new();
    for (name, t) in tensors {
        let Some(kiln_name) = cfg.spec().kiln_name_of(&name) else {
            continue;
        };
        if expected.contains(&kiln_name) {
            out.insert(kiln_name, t);
        } else {
            unexpected.push(kiln_name);
        }
    }
    unexpected.sort();
    if !unexpected.is_empty() {
        bail!(
            "{} has tensors this {} model does not: {}; is config.json the one these weights \
             were saved with?",
            source.display(),
            cfg.kind(),
            preview(&unexpected)
        );
    }
    // A task head a pretrained encoder does not have starts from its initialisation.
    let fresh = |n: &str| crate::lora::is_adapter(n) || cfg.spec().is_task_head(n);
    let mut missing: Vec<&String> = expected
        .iter()
        .filter(|n| !out.contains_key(*n) && !fresh(n))
        .collect();
    missing.sort();
    if !missing.is_empty() {
        bail!(
            "{} lacks tensors the {} model needs: {}",
            source.display(),
            cfg.kind(),
            preview(&missing)
        );
    }
    Ok(out)
}

/// Parameters a pretrained model may have beyond the tensors its file holds (a fresh task head,
/// LoRA adapters, RoPE tables), in elements, on top of as many as the file holds.
const FRESH_ELEMENTS: usize = 1 << 20;

/// A pretrained `model.safetensors`, read and checked against the model config before the
/// model is built: [`set_pretrained`] fills the built model's parameters from it.
pub struct Pretrained {
    /// The file's tensors under kiln's names, in the file's dtypes.
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
}

/// The weights file of an unsharded folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded folder: `weight_map` names each tensor's shard file.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Reads the weights of `folder` for `cfg` (`model.safetensors`, or the shards that
/// `model.safetensors.index.json` names): names, shapes and the model's size are checked
/// against them before anything is built (see [`parse_pretrained`]).
pub fn read_pretrained(cfg: &ModelConfig, folder: &Path) -> Result<Pretrained> {
    let file = folder.join(WEIGHTS_FILE);
    let index = folder.join(WEIGHTS_INDEX);
    if !file.exists() && index.is_file() {
        let tensors = read_shards(&index)?;
        return check_pretrained(cfg, tensors, &index);
    }
    let bytes = std::fs::read(&file).with_context(|| {
        format!(
            "cannot read {}; the folder needs the model's weights (model.safetensors, or \
             {WEIGHTS_INDEX} and its shards)",
            file.display()
        )
    })?;
    parse_pretrained(cfg, &bytes, &file)
}

/// The tensors of a sharded checkpoint: every shard the index names, each holding the tensors
/// the index puts there. A missing shard, or a tensor the index names that its shard lacks, is
/// an error naming both files.
pub fn read_shards(index: &Path) -> Result<HashMap<String, Tensor>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = v["weight_map"].as_object().with_context(|| {
        format!(
            "{} has no `weight_map` object (tensor name → shard file)",
            index.display()
        )
    })?;
    let mut by_shard: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (name, shard) in map {
        let shard = shard.as_str().with_context(|| {
            format!(
                "{}: weight_map[{name:?}] is not a file name",
                index.display()
            )
        })?;
        anyhow::ensure!(
            !shard.contains(['/', '\\']) && !shard.starts_with('.'),
            "{}: weight_map[{name:?}] = {shard:?} is not a file name in the folder",
            index.display()
        );
        by_shard.entry(shard).or_default().push(name);
    }
    let folder = index.parent().unwrap_or(Path::new("."));
    let mut out = HashMap::new();
    for (shard, names) in by_shard {
        let file = folder.join(shard);
        let bytes = std::fs::read(&file).with_context(|| {
            format!(
                "{} names the shard {}, which cannot be read; copy the whole folder",
                index.display(),
                file.display()
            )
        })?;
        let mut tensors = load_safetensors(&bytes, &file)?;
        for name in names {
            let t = tensors.remove(name).with_context(|| {
                format!(
                    "{} maps {name} to {}, which lacks it; the index and the shards do not \
                     belong together",
                    index.display(),
                    file.display()
                )
            })?;
            out.insert(name.to_string(), t);
        }
    }
    Ok(out)
}

fn load_safetensors(bytes: &[u8], source: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        let e = crate::without_backtrace(e);
        anyhow::anyhow!(
            "cannot load {}: {e}; the file is corrupt or not safetensors",
            source.display()
        )
    })
}

/// [`read_pretrained`] on the bytes of the file `source`: its tensors under kiln's names, each
/// the shape `cfg`'s model gives it. A config asking for more parameters than the file can
/// supply (beyond a fresh head or adapters) is refused before any is allocated.
pub fn parse_pretrained(cfg: &ModelConfig, bytes: &[u8], source: &Path) -> Result<Pretrained> {
    check_pretrained(cfg, load_safetensors(bytes, source)?, source)
}

/// [`parse_pretrained`] on tensors already read from `source`.
fn check_pretrained(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    source: &Path,
) -> Result<Pretrained> {
    let present: usize = tensors.values().map(Tensor::elem_count).sum();
    let budget = crate::Budget {
        elements: present.saturating_mul(2).saturating_add(FRESH_ELEMENTS),
        tensors: tensors.len().saturating_mul(2).saturating_add(4096),
    };
    let shapes = cfg.parameter_shapes(budget).map_err(|e| {
        anyhow::anyhow!(
            "{}: the {} model of config.json does not fit these weights ({present} values in \
             {} tensors): {e}; is config.json the one these weights were saved with?",
            source.display(),
            cfg.kind(),
            tensors.len()
        )
    })?;
    let expected: Vec<String> = shapes.keys().cloned().collect();
    let tensors = from_hf_tensors(cfg, tensors, &expected, source)?;
    let vision = cfg.image_classifier().is_some();
    for (name, w) in &tensors {
        let Some(want) = shapes.get(name) else {
            continue;
        };
        if w.dims() != want.as_slice() && !(vision && name.starts_with("classifier.")) {
            bail!(
                "{}: {name} has shape {:?}, the model from config.json expects {want:?}",
                source.display(),
                w.dims()
            );
        }
    }
    Ok(Pretrained {
        tensors,
        source: source.to_path_buf(),
    })
}

/// Sets every parameter in `varmap` (the model of `cfg`, built) from the pretrained tensors
/// (any dtype; converted to the parameters'), checking names and shapes.
pub fn set_pretrained(varmap: &VarMap, cfg: &ModelConfig, pretrained: Pretrained) -> Result<()> {
    let Pretrained { tensors, source } = pretrained;
    let file = source.as_path();
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    // LoRA adapters always start fresh; only name the other tensors the file lacks (a head).
    let mut fresh: Vec<&String> = (data.keys())
        .filter(|n| !tensors.contains_key(*n) && !crate::lora::is_adapter(n))
        .collect();
    if !fresh.is_empty() {
        fresh.sort();
        eprintln!(
            "note: {} has no {}; they start from their initialisation",
            file.display(),
            preview(&fresh)
        );
    }
    let vision = cfg.image_classifier().is_some();
    for (name, var) in data.iter() {
        let Some(w) = tensors.get(name) else {
            continue;
        };
        if vision && name.starts_with("classifier.") && w.dims() != var.dims() {
            // A pretrained head for other classes (ImageNet's 1000): a new one is trained, as
            // transformers' `ignore_mismatched_sizes` does.
            eprintln!(
                "note: {}'s {name} is {:?}, this data needs {:?}; the head starts from its \
                 initialisation",
                file.display(),
                w.dims(),
                var.dims()
            );
            continue;
        }
        anyhow::ensure!(
            w.dims() == var.dims(),
            "{}: {name} has shape {:?}, the model from config.json expects {:?}",
            file.display(),
            w.dims(),
            var.dims()
        );
        var.set(&w.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Sets every parameter in `varmap` (the model of `cfg`, built) from the pretrained
/// `model.safetensors` in `folder`: [`read_pretrained`], then [`set_pretrained`]. A caller that
/// has not built the model yet reads first, so a config too large for its weights is refused
/// before the model is allocated.
pub fn load_pretrained(varmap: &VarMap, cfg: &ModelConfig, folder: &Path) -> Result<()> {
    set_pretrained(varmap, cfg, read_pretrained(cfg, folder)?)
}

fn preview<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_ref()).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests;
