//! Hugging Face model folders out (`kiln export`) and in (`kiln generate --model`).
//!
//! An exported folder is what `transformers`' `from_pretrained`, vLLM, TGI and candle's model
//! code read: `config.json` (GPT2LMHeadModel or LlamaForCausalLM schema), `model.safetensors`
//! (HF names and shapes, `format: pt` metadata, f32/bf16/f16), the tokenizer
//! (`tokenizer.json` + `tokenizer_config.json`; a character model gets a tokenizer with the
//! same ids) and `generation_config.json`.

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
use std::path::Path;

pub struct ExportOptions {
    /// `latest`, `best` or `step-N`.
    pub checkpoint: String,
    /// Weights' dtype in the folder.
    pub dtype: DType,
    /// Write into a non-empty folder.
    pub force: bool,
    /// For a LoRA run: the adapter alone in PEFT's layout instead of merged weights.
    pub adapter: bool,
}

/// An export into the run directory itself (its tokenizer files) or into its checkpoints would
/// overwrite what it was made from, `--force` or not.
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
    Ok(())
}

/// Writes the HF folder for `run_dir`'s checkpoint into `out`.
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
            "{} exists and is not empty; pick another --out, or pass --force to write over it",
            out.display()
        );
    }
    let recipe_path = run_dir.join("recipe.toml");
    anyhow::ensure!(
        recipe_path.is_file(),
        "{} is not a kiln run directory: it has no recipe.toml",
        run_dir.display()
    );
    let recipe = kiln_core::Recipe::load(&recipe_path, &[])?;
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
        std::fs::create_dir_all(out).map_err(at(out))?;
        write_peft_adapter(&recipe, lora, &checkpoint_file, out)?;
        let codec = codec
            .as_ref()
            .context("a LoRA run is a text model: it has a tokenizer")?;
        write_tokenizer_files(codec, &cfg, out)?;
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
    let end_of_text = codec.as_ref().and_then(Codec::end_of_text);
    let special = SpecialTokens {
        bos: end_of_text,
        eos: end_of_text,
    };
    let mut config = hf::hf_config(&cfg, o.dtype, special)?;
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
    let tensors = hf::to_hf_tensors(&cfg, weights, o.dtype)?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tmp = out.join("model.safetensors.tmp");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut named: Vec<(&String, &candle_core::Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(named, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&tmp, out.join("model.safetensors"))?;

    let json_file = |name: &str, v: &serde_json::Value| -> Result<()> {
        write_atomic(&out.join(name), serde_json::to_string_pretty(v)?.as_bytes())
            .with_context(|| format!("writing {name} in {}", out.display()))
    };
    json_file("config.json", &config)?;
    match &codec {
        Some(codec) => write_tokenizer_files(codec, &cfg, out),
        None => json_file("preprocessor_config.json", &preprocessor_config(run_dir)?),
    }
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

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
fn write_tokenizer_files(codec: &Codec, cfg: &ModelConfig, out: &Path) -> Result<()> {
    let json_file = |name: &str, v: &serde_json::Value| -> Result<()> {
        write_atomic(&out.join(name), serde_json::to_string_pretty(v)?.as_bytes())
            .with_context(|| format!("writing {name} in {}", out.display()))
    };
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
    let mut gen = json!({});
    if let Some(id) = codec.end_of_text() {
        for k in ["bos_token", "eos_token", "unk_token"] {
            tok_cfg[k] = END_OF_TEXT.into();
        }
        gen["bos_token_id"] = id.into();
        gen["eos_token_id"] = id.into();
    }
    // BERT-style special tokens, when the vocabulary has them.
    for (key, token) in [
        ("cls_token", "[CLS]"),
        ("sep_token", "[SEP]"),
        ("pad_token", "[PAD]"),
        ("unk_token", "[UNK]"),
        ("mask_token", "[MASK]"),
    ] {
        if codec.has_token(token) {
            tok_cfg[key] = token.into();
        }
    }
    json_file("tokenizer_config.json", &tok_cfg)?;
    json_file("generation_config.json", &gen)?;
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
    let tmp = out.join("adapter_model.safetensors.tmp");
    safetensors::serialize_to_file(named, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out.join("adapter_model.safetensors"))?;
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
