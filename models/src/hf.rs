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
use std::path::Path;

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
}

/// `config.json` for `cfg` (`torch_dtype` is the exported weights' dtype).
pub fn hf_config(cfg: &ModelConfig, dtype: DType, special: SpecialTokens) -> Result<Value> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot export weights as {other:?}"),
    };
    let mut v = match cfg {
        ModelConfig::Gpt(c) => crate::gpt::hf_config(c),
        ModelConfig::Llama(c) => crate::llama::hf_config(c),
        ModelConfig::Bert(c) => crate::bert::hf_config(c),
        ModelConfig::Resnet(c) => crate::resnet::hf_config(c)?,
        ModelConfig::Vit(c) => crate::vit::hf_config(c),
        other => bail!("a {} model has no Hugging Face export yet", other.kind()),
    };
    if matches!(cfg, ModelConfig::Resnet(_) | ModelConfig::Vit(_)) {
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
    Ok(v)
}

/// A `config.json` being read into a kiln config; its errors name the folder and the key.
pub(crate) struct HfReader<'a> {
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
    let r = HfReader { v, source };
    let ctx = || r.ctx();
    let model_type = v["model_type"].as_str().unwrap_or("");
    match model_type {
        "gpt2" => crate::gpt::config_from_hf(&r).map(ModelConfig::Gpt),
        "llama" => crate::llama::config_from_hf(&r).map(ModelConfig::Llama),
        "bert" => crate::bert::config_from_hf(v)
            .map(ModelConfig::Bert)
            .with_context(ctx),
        "resnet" => crate::resnet::config_from_hf(&r).map(ModelConfig::Resnet),
        "vit" => crate::vit::config_from_hf(&r).map(ModelConfig::Vit),
        other => bail!(
            "{}: model_type {other:?} is not one kiln implements (\"gpt2\", \"llama\", \"bert\", \
             \"resnet\", \"vit\")",
            ctx()
        ),
    }
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
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
    from_hf_config(&v, &p)
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
    if let ModelConfig::Gpt(c) = cfg {
        if !c.bias {
            let dev = Device::Cpu;
            let zeros = |n: usize| Tensor::zeros(n, DType::F32, &dev);
            let e = c.n_embd;
            for i in 0..c.n_layer {
                for (name, n) in [
                    ("ln_1.bias", e),
                    ("attn.c_attn.bias", 3 * e),
                    ("attn.c_proj.bias", e),
                    ("ln_2.bias", e),
                    ("mlp.c_fc.bias", 4 * e),
                    ("mlp.c_proj.bias", e),
                ] {
                    tensors.insert(format!("transformer.h.{i}.{name}"), zeros(n)?);
                }
            }
            tensors.insert("transformer.ln_f.bias".into(), zeros(e)?);
        }
    }
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
        let kiln_name = match cfg {
            ModelConfig::Gpt(_) => {
                let base = name.strip_prefix("transformer.").unwrap_or(&name);
                // Causal-mask buffers of older transformers versions, and the tied head.
                if base.ends_with(".attn.bias") && !base.ends_with("c_attn.bias")
                    || base.ends_with(".attn.masked_bias")
                    || name == "lm_head.weight"
                {
                    continue;
                }
                format!("transformer.{base}")
            }
            ModelConfig::Llama(c) => {
                if name.ends_with("rotary_emb.inv_freq")
                    || (c.tie_word_embeddings && name == "lm_head.weight")
                {
                    continue;
                }
                name
            }
            ModelConfig::Bert(c) => {
                // BertModel checkpoints (sentence-transformers) are unprefixed, task models
                // prefix the encoder with `bert.`; older ones name LayerNorm gamma/beta.
                let base = name.strip_prefix("bert.").unwrap_or(&name);
                let base = base.replace("LayerNorm.gamma", "LayerNorm.weight");
                let base = base.replace("LayerNorm.beta", "LayerNorm.bias");
                if base == "embeddings.position_ids"
                    || base.starts_with("cls.")
                    || (c.num_labels == 0 && base.starts_with("classifier."))
                {
                    continue;
                }
                if c.num_labels > 0 && !base.starts_with("classifier.") {
                    format!("bert.{base}")
                } else {
                    base
                }
            }
            _ => name,
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
    let fresh = |n: &str| {
        crate::lora::is_adapter(n)
            || matches!(cfg, ModelConfig::Bert(_)) && n.starts_with("classifier.")
    };
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

/// Sets every parameter in `varmap` from the pretrained `model.safetensors` in `folder`
/// (any dtype; converted to the parameters'), checking names and shapes.
pub fn load_pretrained(varmap: &VarMap, cfg: &ModelConfig, folder: &Path) -> Result<()> {
    let file = folder.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
        anyhow::anyhow!(
            "cannot load {}: {e}; the file is missing or corrupt (sharded checkpoints are not \
             supported)",
            file.display()
        )
    })?;
    let data = varmap
        .data()
        .lock()
        .expect("the varmap lock is not poisoned");
    let expected: Vec<String> = data.keys().cloned().collect();
    let tensors = from_hf_tensors(cfg, tensors, &expected, &file)?;
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
    let vision = matches!(cfg, ModelConfig::Resnet(_) | ModelConfig::Vit(_));
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
mod tests {
    use super::*;
    use crate::gpt::GptConfig;
    use crate::llama::LlamaConfig;
    use serde_json::json;

    fn tiny_gpt(bias: bool) -> ModelConfig {
        ModelConfig::Gpt(GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 16,
            vocab_size: 11,
            dropout: 0.1,
            bias,
            checkpoint_activations: false,
        })
    }

    #[test]
    fn configs_round_trip_through_config_json() {
        let llama = ModelConfig::Llama(LlamaConfig {
            hidden_size: 16,
            intermediate_size: 40,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 11,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            tie_word_embeddings: false,
            dropout: 0.0,
            checkpoint_activations: false,
        });
        let gpt = tiny_gpt(true);
        for cfg in [gpt, llama] {
            let v = hf_config(&cfg, DType::BF16, SpecialTokens::default()).unwrap();
            assert_eq!(v["torch_dtype"], "bfloat16");
            let mut back = from_hf_config(&v, Path::new("config.json")).unwrap();
            if let (ModelConfig::Gpt(b), ModelConfig::Gpt(a)) = (&mut back, &cfg) {
                b.dropout = a.dropout; // training-only
            }
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn unsupported_configs_are_refused_by_key() {
        let mut v = hf_config(&tiny_gpt(true), DType::F32, SpecialTokens::default()).unwrap();
        v["activation_function"] = "relu".into();
        let e = from_hf_config(&v, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("activation_function"),
            "{e}"
        );
        let e = from_hf_config(&json!({"model_type": "t5"}), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"t5\""), "{e}");
        let e = from_hf_config(&json!({"model_type": "gpt2"}), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n_embd` is missing"), "{e}");
    }

    #[test]
    fn recipe_keys_over_a_pretrained_config() {
        let pre = tiny_gpt(true);
        let t: toml::Table = toml::from_str("dropout = 0.2\nn_layer = 2").unwrap();
        let m = merge_recipe_model(&pre, &t, "x").unwrap();
        assert_eq!(m["dropout"].as_float(), Some(0.2));
        let t: toml::Table = toml::from_str("n_layer = 3").unwrap();
        let (k, msg) = merge_recipe_model(&pre, &t, "hub:x").unwrap_err();
        assert_eq!(k, "model.n_layer");
        assert!(msg.contains("differs") && msg.contains("hub:x"), "{msg}");
        let t: toml::Table = toml::from_str("n_layers = 3").unwrap();
        assert_eq!(
            merge_recipe_model(&pre, &t, "x").unwrap_err().0,
            "model.n_layers"
        );
    }

    #[test]
    fn gpt2_names_from_hf_checkpoints() {
        let cfg = tiny_gpt(true);
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let expected = vec![
            "transformer.wte.weight".to_string(),
            "transformer.h.0.attn.c_attn.bias".into(),
        ];
        // openai-community/gpt2 stores names without the prefix, plus mask buffers.
        let hf: HashMap<String, Tensor> = [
            "wte.weight",
            "h.0.attn.c_attn.bias",
            "h.0.attn.bias",
            "h.0.attn.masked_bias",
            "lm_head.weight",
        ]
        .iter()
        .map(|n| (n.to_string(), t.clone()))
        .collect();
        let got = from_hf_tensors(&cfg, hf.clone(), &expected, Path::new("m")).unwrap();
        let mut names: Vec<_> = got.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            ["transformer.h.0.attn.c_attn.bias", "transformer.wte.weight"]
        );
        let mut extra = hf.clone();
        extra.insert("h.0.mlp.gate.weight".into(), t.clone());
        let e = from_hf_tensors(&cfg, extra, &expected, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("transformer.h.0.mlp.gate.weight"), "{e}");
        let mut short = hf;
        short.remove("wte.weight");
        let e = from_hf_tensors(&cfg, short, &expected, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lacks") && e.contains("transformer.wte.weight"),
            "{e}"
        );
    }

    #[test]
    fn bias_free_gpt_exports_zero_biases() {
        let cfg = tiny_gpt(false);
        let w = Tensor::ones((11, 8), DType::F32, &Device::Cpu).unwrap();
        let out = to_hf_tensors(
            &cfg,
            HashMap::from([("transformer.wte.weight".to_string(), w)]),
            DType::F16,
        )
        .unwrap();
        assert_eq!(out["transformer.wte.weight"].dtype(), DType::F16);
        assert_eq!(out["transformer.h.1.attn.c_attn.bias"].dims(), [24]);
        assert_eq!(out["transformer.ln_f.bias"].dims(), [8]);
        assert_eq!(out.len(), 1 + 2 * 6 + 1);
    }
}
