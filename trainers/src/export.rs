//! Hugging Face model folders out (`kiln export`) and in (`kiln generate --model`).
//!
//! An exported folder is what `transformers`' `from_pretrained`, vLLM, TGI and candle's model
//! code read: `config.json` (GPT2LMHeadModel or LlamaForCausalLM schema), `model.safetensors`
//! (HF names and shapes, `format: pt` metadata, f32/bf16/f16), the tokenizer
//! (`tokenizer.json` + `tokenizer_config.json`; a character model gets a tokenizer with the
//! same ids), `special_tokens_map.json` and `generation_config.json`. Weights above
//! `--max-shard-size` are sharded (`model-0000N-of-0000M.safetensors` and
//! `model.safetensors.index.json`); a BERT export also has the sentence-transformers layout
//! (`modules.json`, `1_Pooling/`, `2_Normalize/`). The folder is written next to `--out` and
//! renamed into place when complete, so a failed export leaves nothing half-written.

use crate::run::load_run_at;
use crate::weights::{self, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use kiln_core::checkpoint;
use kiln_core::data::codec::{Codec, END_OF_TEXT};
use kiln_core::fs::{at, write_atomic};
use kiln_models::hf::{self, SpecialTokens};
use kiln_models::{Model, ModelConfig};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ExportOptions {
    /// `latest`, `best` or `step-N`.
    pub checkpoint: String,
    /// Weights' dtype in the folder.
    pub dtype: DType,
    /// Replace a non-empty folder (once the new one is complete).
    pub force: bool,
    /// For a LoRA run: the adapter alone in PEFT's layout instead of merged weights.
    pub adapter: bool,
    /// Above this many bytes of tensors the weights are split into
    /// `model-0000N-of-0000M.safetensors` shards with a `model.safetensors.index.json`.
    pub max_shard_size: u64,
}

/// transformers' default shard size, 5 GB.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            checkpoint: "latest".into(),
            dtype: DType::F32,
            force: false,
            adapter: false,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// A size as `--max-shard-size` takes it: `5GB`, `500MB`, `2GiB`, `100kB` or plain bytes
/// (decimal units are powers of 1000, `i` units powers of 1024, as transformers reads them).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} is not a size: write e.g. 5GB, 500MB, 2GiB or bytes"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 5GB, 500MB, 2GiB or bytes"))?;
    match n.checked_mul(unit_bytes) {
        Some(0) => Err("the shard size must be at least one byte".into()),
        Some(b) => Ok(b),
        None => Err(format!("{s:?} is too large")),
    }
}

/// An export into the run directory itself (its tokenizer files), into its checkpoints or over
/// a folder holding the run would overwrite what it was made from, `--force` or not.
fn refuse_inside_run(run_dir: &Path, out: &Path) -> Result<()> {
    let resolve = |p: &Path| {
        kiln_core::fs::resolved(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let (run, out_abs) = (resolve(run_dir)?, resolve(out)?);
    let checkpoints = run.join("checkpoints");
    if out_abs == run || out_abs.starts_with(&checkpoints) {
        bail!(
            "--out {} is {} of the run being exported: writing there would overwrite it; pick a \
             folder outside {}",
            out.display(),
            match out_abs == run {
                true => "the directory",
                false => "inside the checkpoints",
            },
            checkpoints.display()
        );
    }
    if run.starts_with(&out_abs) {
        bail!(
            "--out {} holds the run being exported ({}); the export replaces --out as a whole, \
             so pick a folder outside it",
            out.display(),
            run_dir.display()
        );
    }
    Ok(())
}

/// An export is written into a temporary sibling folder (`.OUT.partial-<pid>`) and renamed
/// into place once complete; dropped before that, it removes what it wrote.
struct Staging {
    dir: PathBuf,
    done: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging> {
        let name = out.file_name().with_context(|| {
            format!(
                "--out {} does not name a folder; give its path",
                out.display()
            )
        })?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create the folder {}", parent.display()))?;
        let dir = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(at(&dir))?;
        }
        std::fs::create_dir(&dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;
        Ok(Staging { dir, done: false })
    }

    /// Moves the finished folder to `out`; an existing `out` (empty, or `--force`) is
    /// replaced only now, and put back if the move fails.
    fn install(mut self, out: &Path) -> Result<()> {
        let old = self.dir.with_file_name(
            self.dir
                .file_name()
                .expect("a named folder")
                .to_string_lossy()
                .replace(".partial-", ".old-"),
        );
        let existed = out.exists();
        if existed {
            std::fs::rename(out, &old)
                .with_context(|| format!("cannot move {} aside to replace it", out.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.dir, out) {
            if existed {
                let _ = std::fs::rename(&old, out);
            }
            return Err(e).with_context(|| format!("cannot move the export to {}", out.display()));
        }
        self.done = true;
        // The export is in place: a replaced folder that cannot be removed is worth a note,
        // not an error.
        if existed {
            if let Err(e) = std::fs::remove_dir_all(&old) {
                eprintln!(
                    "note: the replaced folder is left at {} ({e}); remove it by hand",
                    old.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes the HF folder for `run_dir`'s checkpoint into `out`: all of it or, on any error,
/// nothing (`out` is left as it was).
pub fn export(run_dir: &Path, out: &Path, o: &ExportOptions) -> Result<()> {
    refuse_inside_run(run_dir, out)?;
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {} is a file, not a folder; pick a folder path",
            out.display()
        );
    }
    if out.exists() && std::fs::read_dir(out).map_err(at(out))?.next().is_some() && !o.force {
        bail!(
            "{} exists and is not empty; pick another --out, or pass --force to replace it",
            out.display()
        );
    }
    let recipe_path = run_dir.join("recipe.toml");
    anyhow::ensure!(
        recipe_path.is_file(),
        "{} is not a kiln run directory: it has no recipe.toml",
        run_dir.display()
    );
    let staging = Staging::new(out)?;
    write_folder(run_dir, &staging.dir, o)?;
    staging.install(out)
}

/// The export's files, written into the (new, empty) folder `out`.
fn write_folder(run_dir: &Path, out: &Path, o: &ExportOptions) -> Result<()> {
    let recipe = kiln_core::Recipe::load(run_dir.join("recipe.toml"), &[])?;
    let mut cfg = ModelConfig::decode(&recipe)?;
    let vision = cfg.image_classifier().is_some();
    // Text models carry their tokenizer; image models their preprocessing instead.
    let codec = match vision {
        true => None,
        false => Some(Codec::from_dir(run_dir)?),
    };
    let ckpt = checkpoint::by_name(&run_dir.join("checkpoints"), &o.checkpoint)?;
    let checkpoint_file = ckpt.join(checkpoint::MODEL_FILE);
    if let Some(lora) = cfg.lora().filter(|_| o.adapter) {
        write_peft_adapter(&recipe, lora, &checkpoint_file, out)?;
        let codec = codec
            .as_ref()
            .context("a LoRA run is a text model: it has a tokenizer")?;
        write_tokenizer_files(codec, &cfg, recipe.chat_template.as_deref(), out)?;
        return Ok(());
    }
    anyhow::ensure!(!o.adapter, "--adapter applies to LoRA runs only");
    // Through the model, not straight from the file: every tensor is checked against it (name,
    // shape, dtype, finite values, nothing extra), so a damaged or foreign checkpoint is refused
    // here rather than written as a folder that fails in the serving stack. A LoRA run's frozen
    // base comes from init_from and its adapters are merged in.
    let from = Weights::Checkpoint {
        recipe: &recipe,
        file: &checkpoint_file,
    };
    let varmap = weights::load(&cfg, from, 0, DType::F32, &Device::Cpu)?;
    let mut weights: HashMap<String, candle_core::Tensor> = varmap
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    if let Some(lora) = cfg.lora().cloned() {
        kiln_models::lora::merge(&mut weights, &lora)?;
        cfg.clear_lora();
    }
    let mut config = hf::hf_config(&cfg, o.dtype, special_tokens(codec.as_ref(), &cfg))?;
    // A classifier's label names (`labels.json`), as transformers' pipelines print them.
    let labels_file = run_dir.join("labels.json");
    if labels_file.is_file() {
        let labels: Vec<String> =
            serde_json::from_str(&std::fs::read_to_string(&labels_file).map_err(at(&labels_file))?)
                .with_context(|| format!("{} is corrupt", labels_file.display()))?;
        let pairs = || labels.iter().enumerate();
        let id2label: serde_json::Map<_, _> =
            pairs().map(|(i, l)| (i.to_string(), json!(l))).collect();
        let label2id: serde_json::Map<_, _> = pairs().map(|(i, l)| (l.clone(), json!(i))).collect();
        config["id2label"] = id2label.into();
        config["label2id"] = label2id.into();
    }
    json_file(out, "config.json", &config)?;
    match &codec {
        Some(codec) => write_tokenizer_files(codec, &cfg, recipe.chat_template.as_deref(), out)?,
        None => json_file(
            out,
            "preprocessor_config.json",
            &preprocessor_config(run_dir)?,
        )?,
    }
    if let ModelConfig::Bert(b) = &cfg {
        write_sentence_transformers(b, out)?;
    }
    let tensors = hf::to_hf_tensors(&cfg, weights, o.dtype)?;
    write_weights(tensors, out, o.max_shard_size)
}

/// Writes `v` as `out/name`.
fn json_file(out: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    write_atomic(&out.join(name), serde_json::to_string_pretty(v)?.as_bytes())
        .with_context(|| format!("writing {name} in {}", out.display()))
}

/// The special-token ids of `config.json`: a language model's `<|endoftext|>` as bos and eos;
/// the pad id batches were padded with (an encoder pads with id 0 when its vocabulary has no
/// pad token, as kiln's training did).
fn special_tokens(codec: Option<&Codec>, cfg: &ModelConfig) -> SpecialTokens {
    let Some(codec) = codec else {
        return SpecialTokens::default();
    };
    let end_of_text = codec.end_of_text();
    let pad = ["[PAD]", "<pad>"].iter().find_map(|t| codec.token_id(t));
    let pad = match cfg {
        ModelConfig::Bert(_) => Some(pad.or(end_of_text).unwrap_or(0)),
        _ => pad,
    };
    SpecialTokens {
        bos: end_of_text,
        eos: end_of_text,
        pad,
    }
}

/// The weights as `model.safetensors`, or, above `max_shard_size` bytes, as
/// `model-0000N-of-0000M.safetensors` shards (tensors in name order, each shard filled up to
/// the size) with `model.safetensors.index.json`, as transformers' `save_pretrained` does.
fn write_weights(
    tensors: HashMap<String, candle_core::Tensor>,
    out: &Path,
    max_shard_size: u64,
) -> Result<()> {
    let bytes = |t: &candle_core::Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((name, t)) = named.iter().max_by_key(|(_, t)| bytes(t)) {
        anyhow::ensure!(
            bytes(t) <= max_shard_size,
            "--max-shard-size {max_shard_size} bytes is below the largest tensor, {name} ({} \
             bytes); a tensor is never split, so raise --max-shard-size to at least {}",
            bytes(t),
            bytes(t)
        );
    }
    let total: u64 = named.iter().map(|(_, t)| bytes(t)).sum();
    let mut shards: Vec<Vec<(String, candle_core::Tensor)>> = vec![vec![]];
    let mut filled = 0u64;
    for (name, t) in named {
        let current = shards.last_mut().expect("one shard at least");
        if !current.is_empty() && filled + bytes(&t) > max_shard_size {
            shards.push(vec![]);
            filled = 0;
        }
        filled += bytes(&t);
        shards
            .last_mut()
            .expect("one shard at least")
            .push((name, t));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = match count {
            1 => hf::WEIGHTS_FILE.to_string(),
            _ => format!("model-{:05}-of-{count:05}.safetensors", i + 1),
        };
        for (name, _) in &shard {
            weight_map.insert(name.clone(), json!(file));
        }
        let path = out.join(&file);
        safetensors::serialize_to_file(shard, Some(metadata.clone()), &path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        json_file(out, hf::WEIGHTS_INDEX, &index)?;
    }
    Ok(())
}

/// The sentence-transformers layout over a BERT export: the encoder, mean pooling and L2
/// normalization (`kiln embed`'s pipeline), so `SentenceTransformer(DIR)` and
/// text-embeddings-inference serve it as an embedding model.
fn write_sentence_transformers(b: &kiln_models::bert::BertConfig, out: &Path) -> Result<()> {
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]);
    json_file(out, "modules.json", &modules)?;
    json_file(
        out,
        "sentence_bert_config.json",
        &json!({"max_seq_length": b.max_position_embeddings, "do_lower_case": false}),
    )?;
    json_file(
        out,
        "config_sentence_transformers.json",
        &json!({
            "__version__": {"sentence_transformers": "3.0.0"},
            "prompts": {},
            "default_prompt_name": null,
            "similarity_fn_name": "cosine",
        }),
    )?;
    for folder in ["1_Pooling", "2_Normalize"] {
        std::fs::create_dir(out.join(folder)).map_err(at(&out.join(folder)))?;
    }
    json_file(
        &out.join("1_Pooling"),
        "config.json",
        &json!({
            "word_embedding_dimension": b.hidden_size,
            "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true,
        }),
    )
}

/// `preprocessor_config.json` of an image model: transformers' `ViTImageProcessor` resizes to
/// the training size, scales pixels by 1/255 and normalizes per channel with the statistics
/// the run trained with (`image.json`), which is exactly kiln's input pipeline.
fn preprocessor_config(run_dir: &Path) -> Result<serde_json::Value> {
    let p = run_dir.join(crate::run::IMAGE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{} is missing: the run predates image export; retrain it to export",
            p.display()
        )
    })?;
    let image: kiln_core::data::ImageInfo =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))?;
    // Each f32 as its shortest decimal (0.2860402, not 0.28604018688201904), as image.json has it.
    let decimal = |v: &[f32]| -> Vec<f64> {
        v.iter()
            .map(|x| x.to_string().parse().expect("an f32 prints as a number"))
            .collect()
    };
    Ok(json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": image.height, "width": image.width},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": decimal(&image.mean),
        "image_std": decimal(&image.std),
        "do_convert_rgb": image.channels == 3,
    }))
}

/// `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and
/// `generation_config.json` (its `eos_token_id` is where vLLM takes its stop token from); the
/// recipe's `chat_template`, if it names one, goes into `tokenizer_config.json`.
fn write_tokenizer_files(
    codec: &Codec,
    cfg: &ModelConfig,
    chat_template: Option<&str>,
    out: &Path,
) -> Result<()> {
    write_atomic(
        &out.join("tokenizer.json"),
        codec.tokenizer_json()?.as_bytes(),
    )?;
    let context = cfg.context().unwrap_or(0);
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "clean_up_tokenization_spaces": false,
    });
    let mut special = serde_json::Map::new();
    let special_ids = special_tokens(Some(codec), cfg);
    let mut gen = json!({});
    if codec.end_of_text().is_some() {
        for k in ["bos_token", "eos_token", "unk_token"] {
            special.insert(k.into(), END_OF_TEXT.into());
        }
    }
    for (k, id) in [
        ("bos_token_id", special_ids.bos),
        ("eos_token_id", special_ids.eos),
        ("pad_token_id", special_ids.pad),
    ] {
        if let Some(id) = id {
            gen[k] = id.into();
        }
    }
    // Special tokens, when the vocabulary has them.
    for (key, token) in [
        ("cls_token", "[CLS]"),
        ("sep_token", "[SEP]"),
        ("pad_token", "[PAD]"),
        ("pad_token", "<pad>"),
        ("unk_token", "[UNK]"),
        ("mask_token", "[MASK]"),
    ] {
        if codec.has_token(token) {
            special.insert(key.into(), token.into());
        }
    }
    for (k, v) in &special {
        tok_cfg[k] = v.clone();
    }
    if let Some(t) = chat_template {
        tok_cfg["chat_template"] = t.into();
    }
    json_file(out, "tokenizer_config.json", &tok_cfg)?;
    json_file(out, "special_tokens_map.json", &special.into())?;
    json_file(out, "generation_config.json", &gen)?;
    Ok(())
}

/// A LoRA run's adapter as PEFT writes it: `adapter_config.json` and `adapter_model.safetensors`
/// (the adapters and the classifier under `base_model.model.`), loadable with
/// `PeftModel.from_pretrained(base, DIR)` over the `init_from` model.
fn write_peft_adapter(
    recipe: &kiln_core::Recipe,
    lora: &kiln_models::lora::LoraConfig,
    checkpoint_file: &Path,
    out: &Path,
) -> Result<()> {
    let weights = checkpoint::load_tensors(checkpoint_file, &Device::Cpu)?;
    let renamed: HashMap<String, candle_core::Tensor> = weights
        .into_iter()
        .map(|(k, v)| (format!("base_model.model.{k}"), v))
        .collect();
    let mut named: Vec<(&String, &candle_core::Tensor)> = renamed.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = out.join("adapter_model.safetensors");
    safetensors::serialize_to_file(named, Some(metadata), &file)
        .with_context(|| format!("writing {}", file.display()))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": recipe.init_from,
        "r": lora.rank,
        "lora_alpha": lora.scale() * lora.rank as f64,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "modules_to_save": ["classifier"],
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    });
    write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}

/// A language model ready to generate, with its text codec.
pub struct LanguageModel {
    pub cfg: ModelConfig,
    pub model: Box<dyn Model>,
    pub codec: Codec,
    /// Where it came from, for messages.
    pub source: String,
}

impl LanguageModel {
    pub fn context(&self) -> usize {
        self.model.as_decoder().map_or(0, |d| d.context())
    }
}

/// Loads a kiln run directory (its latest checkpoint, or `checkpoint`), a Hugging Face model
/// folder, or a hub id from the cache.
pub fn load_language_model(
    spec: &Path,
    checkpoint: Option<&str>,
    device: &Device,
) -> Result<LanguageModel> {
    if spec.join("recipe.toml").is_file() {
        let run = load_run_at(spec, checkpoint.unwrap_or("latest"), device)?;
        if run.model.as_decoder().is_none() {
            bail!("{} is not a language-model run", spec.display());
        }
        return Ok(LanguageModel {
            cfg: run.model_cfg,
            model: run.model,
            codec: Codec::from_dir(spec)?,
            source: run.checkpoint.display().to_string(),
        });
    }
    anyhow::ensure!(
        checkpoint.is_none(),
        "--checkpoint applies to kiln run directories only"
    );
    let folder = kiln_core::hub::resolve(&spec.to_string_lossy())?;
    let cfg = hf::read_hf_config(&folder)?;
    let model = weights::load_model(&cfg, Weights::Pretrained(&folder), 0, DType::F32, device)?;
    Ok(LanguageModel {
        cfg,
        model,
        codec: Codec::from_dir(&folder)?,
        source: folder.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn shard_sizes_parse_as_transformers_reads_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100kb"), Ok(100_000));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("7 MiB"), Ok(7 << 20));
        for bad in ["", "GB", "5TB", "-1", "1.5GB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
