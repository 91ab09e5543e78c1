//! BERT: Hugging Face `BertModel`'s encoder (word + position + token-type embeddings and a
//! LayerNorm; post-LayerNorm layers of bidirectional self-attention and an exact-erf GELU MLP;
//! the tanh pooler over the first token), optionally with `BertForSequenceClassification`'s head.
//!
//! Parameter paths and shapes are HF's. The encoder alone is named as `BertModel` saves it
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, …,
//! `pooler.dense.weight`), which is how sentence-transformers checkpoints such as
//! all-MiniLM-L6-v2 are stored. With `num_labels` > 0 the model is
//! `BertForSequenceClassification`: the same tensors under `bert.` plus `classifier.{weight,bias}`
//! on the pooled output, so export is the identity either way. Projections are `nn.Linear`,
//! weight stored (out, in).
//!
//! The [`Model`] input is one (B, 2, T) u32 tensor ([`pack_inputs`]): row 0 the token ids, row 1
//! the attention mask (1 for a token, 0 for padding). Token types are all 0 (single sentences).
//! Padded keys get a very negative additive bias before the softmax, so they receive exactly zero
//! weight: the outputs at real positions do not depend on the padding. The output is the last
//! hidden state (B, T, hidden) for the encoder alone, the logits (B, num_labels) with a head.
//!
//! Training ops: kiln's embedding, layer norm, softmax and dropout, and candle ops that have a
//! backward (matmul, `gelu_erf`, tanh). The attention is composed (scores, mask, softmax,
//! weighted sum) since kiln's fused attention kernel is causal. Under mixed precision the
//! matmuls run in bf16/f16 while the scores, the softmax, the norms and the residual stream stay
//! in f32. Dropout is HF's: `hidden_dropout_prob` after the embeddings, on each residual branch
//! and before the classifier, `attention_probs_dropout_prob` on the attention probabilities.
//! With `checkpoint_activations`, each layer's activations are recomputed in the backward.

use crate::hf::HfReader;
use crate::layers::{
    run_blocks, Activation, Attention, Block, Embedding, FeedForward, Linear, Norm, Residual,
};
use crate::lora::LoraConfig;
use crate::{
    check_encoder, check_labels_cover, dropout, resolve_context, ConfigError, DataFacts, HfConfig,
    Model, ModelSpec,
};
use anyhow::Context;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use kiln_core::rng::SharedRng;
use kiln_kernels::stats_dtype;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The field names are HF `config.json`'s, except the kiln-only `num_labels` (HF derives it
/// from `id2label`) and `checkpoint_activations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Longest input (rows of `position_embeddings`); defaults to `data.seq_len`.
    #[serde(default)]
    pub max_position_embeddings: usize,
    /// Rows of `token_type_embeddings`; kiln feeds type 0 only.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Dropout after the embeddings, on the residual branches and before the classifier.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Outputs of a classification head on the pooled output; 0: the encoder alone.
    #[serde(default)]
    pub num_labels: usize,
    /// Recompute each layer's activations in the backward instead of storing them.
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// LoRA adapters: only they (and the classifier) train; the pretrained weights stay frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_dropout() -> f64 {
    0.1
}

impl BertConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The kiln config of a BERT `config.json`; anything kiln computes differently is refused,
/// naming the key. `BertForSequenceClassification` gets its head (`num_labels`, else the size of
/// `id2label`, else HF's default 2); any other architecture is read as the encoder alone.
/// Dropout probabilities are kept (HF fine-tunes with them); `classifier_dropout` is not
/// modelled: kiln's head uses `hidden_dropout_prob`.
pub fn config_from_hf(v: &Value) -> anyhow::Result<BertConfig> {
    let model_type = v["model_type"].as_str().unwrap_or("");
    anyhow::ensure!(
        model_type == "bert",
        "model_type {model_type:?} is not a BERT (\"bert\")"
    );
    let uint = |k: &str| -> anyhow::Result<usize> {
        v[k].as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("`{k}` is missing or not a whole number"))
    };
    let uint_or = |k: &str, d: usize| -> anyhow::Result<usize> {
        match &v[k] {
            Value::Null => Ok(d),
            _ => uint(k),
        }
    };
    let float_or = |k: &str, d: f64| -> anyhow::Result<f64> {
        match &v[k] {
            Value::Null => Ok(d),
            x => x.as_f64().with_context(|| format!("`{k}` is not a number")),
        }
    };
    let refuse = |k: &str, why: &str| anyhow::anyhow!("`{k}` = {}: {why}", v[k]);
    // HF's "gelu" is the exact erf GELU; "gelu_new" and friends are the tanh approximation.
    if !matches!(v["hidden_act"].as_str(), None | Some("gelu")) {
        return Err(refuse(
            "hidden_act",
            "kiln's BERT uses the exact (erf) GELU, HF's \"gelu\"",
        ));
    }
    if !matches!(
        v["position_embedding_type"].as_str(),
        None | Some("absolute")
    ) {
        return Err(refuse(
            "position_embedding_type",
            "kiln's BERT has absolute position embeddings",
        ));
    }
    for k in ["is_decoder", "add_cross_attention"] {
        if v[k].as_bool() == Some(true) {
            return Err(refuse(k, "kiln's BERT is a bidirectional encoder"));
        }
    }
    if !matches!(
        v["problem_type"].as_str(),
        None | Some("single_label_classification")
    ) {
        return Err(refuse(
            "problem_type",
            "kiln's BERT head is a single-label (softmax) classifier",
        ));
    }
    let classifies = v["architectures"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == "BertForSequenceClassification"));
    let num_labels = if !classifies {
        0
    } else if !v["num_labels"].is_null() {
        uint("num_labels")?
    } else if let Some(labels) = v["id2label"].as_object() {
        labels.len()
    } else {
        2
    };
    if num_labels == 1 {
        return Err(anyhow::anyhow!(
            "a BertForSequenceClassification with 1 label is a regression, which kiln's softmax \
             head does not do"
        ));
    }
    Ok(BertConfig {
        vocab_size: uint("vocab_size")?,
        hidden_size: uint("hidden_size")?,
        num_hidden_layers: uint("num_hidden_layers")?,
        num_attention_heads: uint("num_attention_heads")?,
        intermediate_size: uint("intermediate_size")?,
        max_position_embeddings: uint("max_position_embeddings")?,
        type_vocab_size: uint_or("type_vocab_size", default_type_vocab_size())?,
        layer_norm_eps: float_or("layer_norm_eps", default_layer_norm_eps())?,
        hidden_dropout_prob: float_or("hidden_dropout_prob", default_dropout())?,
        attention_probs_dropout_prob: float_or("attention_probs_dropout_prob", default_dropout())?,
        num_labels,
        checkpoint_activations: false,
        lora: None,
    })
}

/// The [`Model`] input: token ids and attention mask, each (B, T), stacked into (B, 2, T) u32.
pub fn pack_inputs(ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Tensor::stack(&[ids.to_dtype(DType::U32)?, mask.to_dtype(DType::U32)?], 1)
}

/// sentence-transformers' mean pooling: the average of `hidden` (B, T, C) over the positions
/// where `mask` (B, T) is nonzero → (B, C).
pub fn mean_pooled(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask
        .ne(&mask.zeros_like()?)?
        .to_dtype(hidden.dtype())?
        .unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    // Clamped like sentence-transformers, so an all-padding row gives zeros, not NaN.
    sum.broadcast_div(&m.sum(1)?.maximum(1e-9)?)
}

/// `x` scaled to unit L2 norm over its last dimension (torch's `F.normalize`, ε = 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?)
}

struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: Norm,
}

impl Embeddings {
    /// With LoRA the tables and the norm are constants, so the backward stops at the first
    /// adapter instead of scattering gradients into a vocabulary-sized table.
    fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let (frozen, c) = (cfg.lora.is_some(), cfg.hidden_size);
        let table = |n: usize, name: &str| {
            Ok::<_, candle_core::Error>(Embedding::new(n, c, 0.02, vb.pp(name))?.frozen_if(frozen))
        };
        Ok(Embeddings {
            word_embeddings: table(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: table(cfg.max_position_embeddings, "position_embeddings")?,
            token_type_embeddings: table(cfg.type_vocab_size, "token_type_embeddings")?,
            layer_norm: Norm::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("LayerNorm"))?
                .frozen_if(frozen),
        })
    }

    /// Normalized embeddings (B, T, hidden) of `ids` (B, T) at positions 0…T−1, token type 0.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let fixed = (self.position_embeddings.table().narrow(0, 0, t)?)
            .broadcast_add(&self.token_type_embeddings.table().narrow(0, 0, 1)?)?;
        let x = self.word_embeddings.forward(ids)?.broadcast_add(&fixed)?;
        self.layer_norm.forward(&x)
    }
}

/// One post-LayerNorm encoder layer (HF's `BertLayer`): LN(x + attn(x)), then
/// LN(x + mlp(x)), under HF's module paths. With LoRA, the linear layers the config targets get
/// adapters and every pretrained weight is frozen.
fn layer(cfg: &BertConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Block> {
    let (c, eps, ff) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
    let frozen = cfg.lora.is_some();
    let linear = |n_in, n_out, vb| Linear::adapted(n_in, n_out, 0.02, cfg.lora.as_ref(), vb, &rng);
    let ln =
        |vb| Ok::<_, candle_core::Error>(Norm::layer_norm(c, eps, true, vb)?.frozen_if(frozen));
    let (a, i, o) = (vb.pp("attention"), vb.pp("intermediate"), vb.pp("output"));
    Ok(Block {
        attn: Attention::bidirectional(
            linear(c, c, a.pp("self.query"))?,
            linear(c, c, a.pp("self.key"))?,
            linear(c, c, a.pp("self.value"))?,
            linear(c, c, a.pp("output.dense"))?,
            (cfg.num_attention_heads, cfg.head_dim()),
            cfg.attention_probs_dropout_prob,
        ),
        norm_1: ln(a.pp("output.LayerNorm"))?,
        // kiln's `gelu` is the tanh approximation, which is not BERT's.
        mlp: FeedForward::gelu(
            linear(c, ff, i.pp("dense"))?,
            linear(ff, c, o.pp("dense"))?,
            Activation::GeluErf,
        ),
        norm_2: ln(o.pp("LayerNorm"))?,
        residual: Residual::post(cfg.hidden_dropout_prob, &rng, compute),
    })
}

pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Block>,
    /// `pooler.dense`.
    pooler: Linear,
    classifier: Option<Linear>,
    rng: SharedRng,
    compute: DType,
    pub config: BertConfig,
}

impl Bert {
    /// `compute` is the dtype of the matmuls (the weights' dtype for full precision, bf16/f16
    /// for mixed precision).
    pub fn new(cfg: &BertConfig, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        // HF's BertForSequenceClassification keeps the encoder under `bert.`; BertModel does not.
        let head = cfg.num_labels > 0;
        let enc = if head { vb.pp("bert") } else { vb.clone() };
        let c = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                layer(
                    cfg,
                    enc.pp(format!("encoder.layer.{i}")),
                    rng.clone(),
                    compute,
                )
            })
            .collect::<Result<_>>()?;
        let classifier = head
            .then(|| Linear::new(c, cfg.num_labels, 0.02, true, vb.pp("classifier")))
            .transpose()?;
        Ok(Bert {
            embeddings: Embeddings::new(cfg, enc.pp("embeddings"))?,
            layers,
            pooler: Linear::new(c, c, 0.02, true, enc.pp("pooler.dense"))?
                .frozen_if(cfg.lora.is_some()),
            classifier,
            rng,
            compute,
            config: cfg.clone(),
        })
    }

    /// The last hidden state (B, T, hidden) of token ids `ids` (B, T) whose attention `mask`
    /// (B, T) is nonzero for tokens and 0 for padding; `train` turns dropout on.
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if mask.dims() != [b, t] {
            candle_core::bail!(
                "attention mask {:?} does not match the ids {:?}",
                mask.dims(),
                ids.dims()
            );
        }
        if t == 0 || t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens: BERT takes 1 to max_position_embeddings = {}",
                self.config.max_position_embeddings
            );
        }
        let p = self.config.hidden_dropout_prob;
        let x = dropout(self.embeddings.forward(ids)?, p, train, &self.rng)?;
        // An additive bias: 0 for tokens, f32's most negative value for padding, so that exp
        // underflows to exactly 0 while a row of padding only keeps a finite max (uniform
        // weights, not NaN as with −∞). The scores and the softmax are f32 (f64 for f64).
        let acc = stats_dtype(x.dtype());
        let bias = (mask.eq(&mask.zeros_like()?)?.to_dtype(acc)? * f32::MIN as f64)?
            .reshape((b, 1, 1, t))?;
        let ckpt = self.config.checkpoint_activations;
        run_blocks(&self.layers, x, Some(&bias), train, ckpt)
    }

    /// HF's `pooler_output`: tanh(dense(first token's hidden state)), (B, hidden).
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        self.pooler.forward(&first, self.compute, false)?.tanh()
    }
}

impl Model for Bert {
    /// Ids and attention mask (B, 2, T) → the last hidden state (B, T, hidden), or with a head
    /// the logits (B, num_labels).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !matches!(xs.dims(), [_, 2, _]) {
            candle_core::bail!(
                "BERT takes (batch, 2, seq): token ids and attention mask; got {:?}",
                xs.dims()
            );
        }
        let ids = xs.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let mask = xs.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
        let hidden = self.encode(&ids, &mask, train)?;
        match &self.classifier {
            None => Ok(hidden),
            Some(classifier) => {
                let p = self.config.hidden_dropout_prob;
                let pooled = dropout(self.pooled(&hidden)?, p, train, &self.rng)?;
                classifier.forward(&pooled, self.compute, train)
            }
        }
    }
}

impl ModelSpec for BertConfig {
    fn activations_per_example(&self, input_shape: &[usize]) -> Option<u128> {
        let seq = input_shape
            .first()
            .copied()
            .unwrap_or(self.max_position_embeddings);
        Some(crate::transformer_activations(
            self.num_hidden_layers,
            seq,
            self.hidden_size,
            self.intermediate_size,
            2,
            self.num_attention_heads,
            self.checkpoint_activations,
        ))
    }

    /// Checks the config against the data: `num_classes` labels (a head, when there is one,
    /// must have an output for each), sequences of `seq_len` tokens.
    fn resolve(&mut self, data: &DataFacts) -> std::result::Result<(), ConfigError> {
        // A classification recipe gets a head with one output per class.
        if data.task == kiln_core::recipe::Task::Classification && self.num_labels == 0 {
            self.num_labels = data.classes;
        }
        let (num_classes, seq_len) = (data.classes, data.seq_len);
        check_encoder(
            (self.hidden_dropout_prob, self.attention_probs_dropout_prob),
            &[
                ("model.vocab_size", self.vocab_size),
                ("model.hidden_size", self.hidden_size),
                ("model.num_hidden_layers", self.num_hidden_layers),
                ("model.num_attention_heads", self.num_attention_heads),
                ("model.intermediate_size", self.intermediate_size),
                ("model.type_vocab_size", self.type_vocab_size),
            ],
            (self.hidden_size, self.num_attention_heads),
            self.layer_norm_eps,
        )?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        let key = "model.max_position_embeddings";
        resolve_context(&mut self.max_position_embeddings, key, seq_len, true)?;
        if self.num_labels == 1 {
            // HF reads num_labels = 1 as regression; kiln's head is a softmax classifier.
            return Err((
                "model.num_labels",
                "a classifier needs at least 2 labels (0: no head)".into(),
            ));
        }
        if self.num_labels > 0 {
            check_labels_cover(self.num_labels, num_classes)?;
        }
        Ok(())
    }

    fn context(&self) -> Option<usize> {
        Some(self.max_position_embeddings)
    }

    fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    fn clear_lora(&mut self) {
        self.lora = None;
    }

    fn is_task_head(&self, name: &str) -> bool {
        name.starts_with("classifier.")
    }

    /// `BertModel` checkpoints (sentence-transformers) are unprefixed, task models prefix the
    /// encoder with `bert.`; older ones name LayerNorm gamma/beta; the position ids buffer and
    /// a pretraining head (`cls.`) are dropped, and so is a classifier when this has none.
    fn kiln_name_of(&self, name: &str) -> Option<String> {
        let base = name.strip_prefix("bert.").unwrap_or(name);
        let base = base.replace("LayerNorm.gamma", "LayerNorm.weight");
        let base = base.replace("LayerNorm.beta", "LayerNorm.bias");
        let head = base.starts_with("classifier.");
        if base == "embeddings.position_ids"
            || base.starts_with("cls.")
            || (self.num_labels == 0 && head)
        {
            return None;
        }
        Some(match self.num_labels > 0 && !head {
            true => format!("bert.{base}"),
            false => base,
        })
    }
}

impl HfConfig for BertConfig {
    fn own_facts(&self) -> DataFacts {
        let t = self.max_position_embeddings;
        DataFacts {
            classes: self.num_labels,
            input_shape: vec![t],
            seq_len: t,
            task: kiln_core::recipe::Task::Classification,
        }
    }

    /// `config.json` for `c` in HF's `BertConfig` schema, without the dtype keys, special tokens
    /// or label names (the exporter adds those).
    fn to_hf(&self) -> anyhow::Result<Value> {
        let c = self;
        let arch = if c.num_labels > 0 {
            "BertForSequenceClassification"
        } else {
            "BertModel"
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": "bert",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": c.hidden_dropout_prob,
            "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
            "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size,
            "initializer_range": 0.02,
            "layer_norm_eps": c.layer_norm_eps,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "classifier_dropout": null,
            "use_cache": true,
        });
        if c.num_labels > 0 {
            v["num_labels"] = c.num_labels.into();
            v["problem_type"] = "single_label_classification".into();
        }
        Ok(v)
    }

    fn from_hf(r: &HfReader) -> anyhow::Result<Self> {
        config_from_hf(r.v).with_context(|| r.ctx())
    }
}

#[cfg(test)]
pub(crate) mod tests;
