//! What every model kind provides to the rest of kiln ([`ModelSpec`]), the data facts a config
//! is resolved against ([`DataFacts`]), and the checks the configs share.
//!
//! A model kind is one file (its config, its network, its `config.json` mapping) plus one line
//! in the registry in `lib.rs`; nothing else in kiln lists the kinds (only pipelines made for
//! one model, like BERT's text classifier in `infer.rs`, name that model).

use crate::hf::HfReader;
use crate::lora::LoraConfig;
use candle_core::{Result, Tensor};
use kiln_core::recipe::Task;
use serde_json::Value;

/// What the data decides about a model: filled into a config by [`ModelSpec::resolve`].
#[derive(Debug, Clone, PartialEq)]
pub struct DataFacts {
    /// Classes of a classifier, or the vocabulary of a language model.
    pub classes: usize,
    /// One example's input shape: (C, H, W) for images, (T) for text.
    pub input_shape: Vec<usize>,
    /// Tokens per example (text), 0 for images.
    pub seq_len: usize,
    pub task: Task,
}

impl DataFacts {
    /// Token sequences of `seq_len` over a vocabulary of `vocab`, for next-token prediction.
    pub fn text(vocab: usize, seq_len: usize) -> Self {
        DataFacts {
            classes: vocab,
            input_shape: vec![seq_len],
            seq_len,
            task: Task::LanguageModel,
        }
    }

    /// Images of `input_shape` (C, H, W) in `classes` classes.
    pub fn images(classes: usize, input_shape: &[usize]) -> Self {
        DataFacts {
            classes,
            input_shape: input_shape.to_vec(),
            seq_len: 0,
            task: Task::Classification,
        }
    }
}

/// One model kind's config: resolved against the data, and whatever of it differs from the
/// defaults (a context, LoRA, a task head, an HF checkpoint's naming). The network is built by
/// the kind's `new(config, vb, rng, compute)`, which the registry in `lib.rs` calls.
pub trait ModelSpec: Send + Sync {
    /// Validates the config and fills in what the data decides (classes or vocabulary, input
    /// shape, context). Errors name the recipe key.
    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError>;

    /// Longest token sequence the model takes (text models).
    fn context(&self) -> Option<usize> {
        None
    }

    /// The LoRA settings, for a model with adapters.
    fn lora(&self) -> Option<&LoraConfig> {
        None
    }

    /// Drops the adapters from the config, once they are merged into the weights.
    fn clear_lora(&mut self) {}

    /// Training FLOPs per token of a decoder with `n_params` parameters, nanoGPT's
    /// `estimate_mfu` (PaLM appendix B): 6·N for the matmuls of forward and backward, N
    /// counting every weight but a position table, plus 12·L·C·T for attention scores and
    /// values. `None` for other models.
    fn flops_per_token(&self, _n_params: usize) -> Option<f64> {
        None
    }

    /// Activation values one training example keeps from the forward pass for the backward
    /// (a rough count, for the memory estimate made before anything is allocated), given the
    /// input shape of one example. `None` where kiln has no estimate for the kind.
    fn activations_per_example(&self, _input_shape: &[usize]) -> Option<u128> {
        None
    }

    /// A parameter that a pretrained checkpoint need not hold and that starts from its
    /// initialisation: a task head (BERT's classifier). With LoRA it trains beside the adapters.
    fn is_task_head(&self, _name: &str) -> bool {
        false
    }

    /// Values of the tables the model computes when it is built (not parameters): RoPE's cos
    /// and sin.
    fn table_elements(&self) -> usize {
        0
    }

    /// An image classifier with a Hugging Face counterpart: (input channels, classes). Its
    /// export writes a preprocessor config instead of tokenizer files.
    fn image_classifier(&self) -> Option<(usize, usize)> {
        None
    }

    /// The kiln name of the HF checkpoint tensor `name`, or `None` for one kiln does not keep
    /// (buffers, tied copies).
    fn kiln_name_of(&self, name: &str) -> Option<String> {
        Some(name.to_string())
    }

    /// Tensors HF's layout has and kiln's (for this config) lacks, added on export.
    fn hf_extra_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
}

/// A kind with a Hugging Face counterpart: its config to and from `config.json` (registered
/// under its `model_type`).
pub trait HfConfig: Sized {
    /// `config.json` in the HF schema, without the dtype keys or special tokens (the exporter
    /// adds those).
    fn to_hf(&self) -> anyhow::Result<Value>;

    /// The kiln config of a `config.json`; anything kiln computes differently is refused,
    /// naming the key.
    fn from_hf(r: &HfReader) -> anyhow::Result<Self>;

    /// The data the config describes itself (its vocabulary and context, its images and
    /// classes): what a `config.json` is checked against on its own.
    fn own_facts(&self) -> DataFacts;
}

/// The checks a recipe's config gets ([`ModelSpec::resolve`]), for a config read from
/// `config.json`, against the data it describes itself. On a copy: nothing is filled in.
/// Refused: what would make building the model fail or divide by zero (no heads, heads that do
/// not divide the width, a patch larger than the image, ...), naming the key.
pub(crate) fn check_hf<C: HfConfig + ModelSpec + Clone>(c: &C, r: &HfReader) -> anyhow::Result<()> {
    let mut probe = c.clone();
    probe.resolve(&c.own_facts()).map_err(|(key, msg)| {
        let key = key.strip_prefix("model.").unwrap_or(key);
        anyhow::anyhow!("{}: `{key}` {msg}", r.ctx())
    })
}

/// A validation failure: (key path, message).
pub type ConfigError = (&'static str, String);

pub(crate) fn check_dropout(p: f64, key: &'static str) -> std::result::Result<(), ConfigError> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err((key, format!("must be in [0, 1), got {p}")))
    }
}

/// Each `(key, value)` is at least 1.
pub(crate) fn check_positive(
    fields: &[(&'static str, usize)],
) -> std::result::Result<(), ConfigError> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err((key, "must be at least 1".into())),
        None => Ok(()),
    }
}

/// `a` (named `a_name`) is a multiple of `b`; the error is reported at `key`.
pub(crate) fn check_divisible(
    key: &'static str,
    (a_name, a): (&str, usize),
    (b_name, b): (&str, usize),
) -> std::result::Result<(), ConfigError> {
    if a.is_multiple_of(b) {
        return Ok(());
    }
    Err((
        key,
        format!("{a_name} = {a} is not divisible by {b_name} = {b}"),
    ))
}

/// The checks of a BERT-style encoder's settings, under HF's names as BERT and ViT have them:
/// both dropout rates in [0, 1), `sizes` at least 1, `num_attention_heads` dividing
/// `hidden_size`, a positive `layer_norm_eps`.
pub(crate) fn check_encoder(
    (hidden_dropout, attention_dropout): (f64, f64),
    sizes: &[(&'static str, usize)],
    (hidden_size, heads): (usize, usize),
    layer_norm_eps: f64,
) -> std::result::Result<(), ConfigError> {
    check_dropout(hidden_dropout, "model.hidden_dropout_prob")?;
    check_dropout(attention_dropout, "model.attention_probs_dropout_prob")?;
    check_positive(sizes)?;
    check_divisible(
        "model.num_attention_heads",
        ("hidden_size", hidden_size),
        ("num_attention_heads", heads),
    )?;
    check_positive_f64("model.layer_norm_eps", layer_norm_eps)
}

/// A float setting `key` that must be positive and finite (an epsilon, RoPE's base).
pub(crate) fn check_positive_f64(
    key: &'static str,
    v: f64,
) -> std::result::Result<(), ConfigError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err((key, format!("must be positive, got {v}")))
    }
}

/// A context length at `key`: 0 takes `seq_len`; it must then be at least 1 (when `nonzero`)
/// and hold `seq_len` positions.
pub(crate) fn resolve_context(
    value: &mut usize,
    key: &'static str,
    seq_len: usize,
    nonzero: bool,
) -> std::result::Result<(), ConfigError> {
    if *value == 0 {
        *value = seq_len;
    }
    if nonzero && *value == 0 {
        return Err((
            key,
            "must be at least 1 (it defaults to data.seq_len)".into(),
        ));
    }
    if seq_len > *value {
        return Err((
            key,
            format!("{value} is shorter than data.seq_len = {seq_len}"),
        ));
    }
    Ok(())
}

/// `model.vocab_size`: 0 takes the data's `vocab`; a set one must hold it.
pub(crate) fn resolve_vocab(
    value: &mut usize,
    vocab: usize,
) -> std::result::Result<(), ConfigError> {
    if *value == 0 {
        *value = vocab;
    } else if *value < vocab {
        return Err((
            "model.vocab_size",
            format!("{value} is smaller than the data's vocabulary ({vocab})"),
        ));
    }
    Ok(())
}

/// `model.num_labels` has an output for each of the data's `num_classes` classes.
pub(crate) fn check_labels_cover(
    num_labels: usize,
    num_classes: usize,
) -> std::result::Result<(), ConfigError> {
    if num_labels < num_classes {
        return Err((
            "model.num_labels",
            format!("{num_labels} is fewer than the data's {num_classes} classes"),
        ));
    }
    Ok(())
}

/// Activation values a transformer keeps per example for the backward: per layer, about 11
/// hidden-wide tensors (norms, Q/K/V, attention output, projections, residuals), `ffn_tensors`
/// MLP-wide ones and one attention-probability row per head and query. With activation
/// checkpointing, each layer keeps its input and one layer is recomputed at a time. On GPT-2
/// 124M (B2, T1024) this gives 2.64 GB; the measured peak, 4,477 MiB resident (benches/
/// RESULTS.md), is 2.7 GB above the weights, gradients and AdamW moments (1.99 GB).
pub(crate) fn transformer_activations(
    layers: usize,
    seq: usize,
    hidden: usize,
    ffn: usize,
    ffn_tensors: usize,
    heads: usize,
    checkpointed: bool,
) -> u128 {
    let (l, t, d, f, h) = (
        layers as u128,
        seq as u128,
        hidden as u128,
        ffn as u128,
        heads as u128,
    );
    let layer = t * (11 * d + ffn_tensors as u128 * f) + h * t * t;
    match checkpointed {
        true => l * t * d + layer,
        false => l * layer,
    }
}
