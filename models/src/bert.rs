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

use crate::layers::{
    run_blocks, Activation, Attention, Block, Embedding, FeedForward, Linear, Norm, NormPlace,
};
use crate::lora::LoraConfig;
use crate::{
    check_divisible, check_dropout, check_labels_cover, check_positive, check_positive_f64,
    dropout, resolve_context, ConfigError, Model,
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

    /// Checks the config against the data: `num_classes` labels (a head, when there is one,
    /// must have an output for each), sequences of `seq_len` tokens.
    pub(crate) fn resolve(
        &mut self,
        num_classes: usize,
        seq_len: usize,
    ) -> std::result::Result<(), ConfigError> {
        check_dropout(self.hidden_dropout_prob, "model.hidden_dropout_prob")?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        check_dropout(
            self.attention_probs_dropout_prob,
            "model.attention_probs_dropout_prob",
        )?;
        check_positive(&[
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
            ("model.intermediate_size", self.intermediate_size),
            ("model.type_vocab_size", self.type_vocab_size),
        ])?;
        check_divisible(
            "model.num_attention_heads",
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        let key = "model.max_position_embeddings";
        resolve_context(&mut self.max_position_embeddings, key, seq_len, true)?;
        check_positive_f64("model.layer_norm_eps", self.layer_norm_eps)?;
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

/// `config.json` for `c` in HF's `BertConfig` schema, without the dtype keys, special tokens
/// or label names (the exporter adds those).
pub fn hf_config(c: &BertConfig) -> Value {
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
    v
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
        place: NormPlace::Post,
        p_drop: cfg.hidden_dropout_prob,
        rng,
        compute,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_model_grads;
    use crate::ModelConfig;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    fn tiny(num_labels: usize) -> BertConfig {
        BertConfig {
            vocab_size: 11,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 6,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            num_labels,
            checkpoint_activations: false,
            lora: None,
        }
    }

    fn with_lora(num_labels: usize) -> BertConfig {
        BertConfig {
            lora: Some(LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec!["query".into(), "value".into(), "output.dense".into()],
            }),
            ..tiny(num_labels)
        }
    }

    fn logits_of(m: &Bert, x: &Tensor) -> Vec<f64> {
        m.forward(x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn lora_input() -> Tensor {
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 0], [3, 4, 9, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        pack_inputs(&ids, &mask).unwrap()
    }

    /// Adapters sit where PEFT puts them, train alone (with the head), and start as a no-op.
    #[test]
    fn lora_adapters_are_peft_named_trainable_and_start_as_the_base() {
        let cfg = with_lora(3);
        let (vm, m) = build(&cfg, DType::F64);
        let data = vm.data().lock().unwrap();
        let q = "bert.encoder.layer.1.attention.self.query";
        assert_eq!(data[&format!("{q}.lora_A.weight")].dims(), [2, 8]);
        assert_eq!(data[&format!("{q}.lora_B.weight")].dims(), [8, 2]);
        // `output.dense` matches the layer output and the attention output, not `intermediate`.
        assert!(data.contains_key("bert.encoder.layer.0.output.dense.lora_A.weight"));
        assert!(data.contains_key("bert.encoder.layer.0.attention.output.dense.lora_A.weight"));
        assert!(!data.contains_key("bert.encoder.layer.0.intermediate.dense.lora_A.weight"));
        assert!(!data
            .keys()
            .any(|k| k.starts_with("bert.encoder.layer.0.attention.self.key.lora")));
        let mc = crate::ModelConfig::Bert(cfg.clone());
        let trainable: Vec<&String> = data.keys().filter(|k| mc.trainable(k)).collect();
        assert_eq!(
            trainable.len(),
            2 * 4 * 2 + 2,
            "A and B of 4 layers (query, value, 2 × output.dense) × 2 blocks, + head"
        );
        assert!(!mc.trainable("bert.encoder.layer.0.attention.self.query.weight"));
        drop(data);
        // B = 0: the adapted model computes the base model's function.
        let (_, base) = build(&tiny(3), DType::F64);
        assert_eq!(
            logits_of(&m, &lora_input()),
            logits_of(&base, &lora_input())
        );
    }

    /// Merging the adapters into the weights gives the adapter-applied forward.
    #[test]
    fn lora_merge_equals_the_adapter_forward() {
        let cfg = with_lora(3);
        let (vm, m) = build(&cfg, DType::F64);
        for (name, v) in vm.data().lock().unwrap().iter() {
            if name.contains("lora_B") {
                let r = crate::testing::rand(v.dims(), name.len() as u64);
                v.set(&(r * 0.5).unwrap()).unwrap();
            }
        }
        let (_, base) = build(&tiny(3), DType::F64);
        let want = logits_of(&m, &lora_input());
        assert_ne!(
            want,
            logits_of(&base, &lora_input()),
            "the adapters change the function"
        );
        let mut tensors: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        let merged = crate::lora::merge(&mut tensors, cfg.lora.as_ref().unwrap()).unwrap();
        assert_eq!(merged, 8);
        assert!(!tensors.keys().any(|k| k.contains("lora_")));
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
        let plain = Bert::new(&tiny(3), vb, SharedRng::new(0, "d"), DType::F64).unwrap();
        let got = logits_of(&plain, &lora_input());
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-12, "merged vs adapted: {diff}");
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let cfg = crate::ModelConfig::Bert(with_lora(3));
        let x = lora_input();
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        crate::testing::check_model_grads(&cfg, &x, &y);
    }

    fn build(cfg: &BertConfig, dtype: DType) -> (VarMap, Bert) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
        let m = Bert::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
        (vm, m)
    }

    /// Two sequences of 5 positions, the second with 2 padded ones.
    fn padded_batch(pad_id: u32) -> Tensor {
        let ids = Tensor::new(
            &[[1u32, 2, 3, 4, 5], [6, 5, 10, pad_id, pad_id]],
            &Device::Cpu,
        );
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu);
        pack_inputs(&ids.unwrap(), &mask.unwrap()).unwrap()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let f = |t: &Tensor| -> Vec<f64> {
            let t = t.to_dtype(DType::F64).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (a, b) = (f(a), f(b));
        let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| y * y).sum();
        (d / n).sqrt()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        let v: Vec<f64> = d.abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().fold(0.0, f64::max)
    }

    /// The shared checks (`check_model_grads`, `check_mixed_precision`), adapted to BERT: the
    /// loss is a cross-entropy over the output's last dimension (the hidden features for the
    /// encoder alone, whose unused pooler gets no gradient); f16's backward is loss-scaled, as
    /// the trainer's is; and the key biases are compared in absolute terms. Their true gradient
    /// is 0: q·(k_j + b) = q·k_j + q·b shifts every score of a query by the same amount, which
    /// the softmax ignores; what the backward computes is rounding noise (in bf16, the row sums
    /// of the scores' gradient are no longer exactly 0).
    fn check_gradients(cfg: &BertConfig, input: &Tensor, targets: &Tensor) {
        let head = cfg.num_labels > 0;
        let loss_of = |m: &Bert| {
            let out = m.forward(input, false).unwrap();
            let v = out.dim(D::Minus1).unwrap();
            let (logits, y) = (
                out.reshape(((), v)).unwrap(),
                targets.flatten_all().unwrap(),
            );
            kiln_kernels::cross_entropy(&logits, &y).unwrap()
        };
        let unused = |name: &str| !head && name.starts_with("pooler.");
        let sorted = |vm: &VarMap| {
            let mut v: Vec<(String, Var)> = vm.data().lock().unwrap().clone().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };

        // Autograd against central finite differences, in f64.
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
        let m = Bert::new(cfg, vb, SharedRng::new(0, "d"), DType::F64).unwrap();
        let grads = loss_of(&m).backward().unwrap();
        let h = 1e-6;
        for (name, var) in &sorted(&vm) {
            if unused(name) {
                assert!(grads.get(var).is_none(), "{name} is not used");
                continue;
            }
            let g: Vec<f64> = (grads.get(var))
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            if name.ends_with("attention.self.key.bias") {
                assert!(g.iter().all(|g| g.abs() < 1e-12), "{name}: {g:?}");
            }
            let orig = var.as_tensor().copy().unwrap();
            let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, flat.len() / 2, flat.len() - 1] {
                let eval = |delta: f64| {
                    let mut p = flat.clone();
                    p[i] += delta;
                    var.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&m).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&orig).unwrap();
                assert!(
                    (fd - g[i]).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                );
            }
        }

        // bf16/f16 matmuls against f32 on the same f32 weights.
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let run = |compute: DType| {
            let m = Bert::new(cfg, vb.clone(), SharedRng::new(0, "d"), compute).unwrap();
            let out = m.forward(input, false).unwrap();
            // f16's gradients are loss-scaled, as the trainer does (trainers/src/amp.rs): the
            // query and key gradients of this tiny, nearly uniform attention are ~1e-7, which
            // f16 flushes to subnormals.
            let scale = if compute == DType::F16 { 65536.0 } else { 1.0 };
            let grads = (loss_of(&m) * scale).unwrap().backward().unwrap();
            let g: HashMap<String, Tensor> = (sorted(&vm).into_iter())
                .filter(|(n, _)| !unused(n))
                .map(|(n, v)| {
                    let g = grads.get(&v).unwrap_or_else(|| panic!("{n}: no gradient"));
                    (n, (g / scale).unwrap())
                })
                .collect();
            (out, g)
        };
        let (want, want_g) = run(DType::F32);
        let norm = |t: &Tensor| {
            let t = t.to_dtype(DType::F64).unwrap();
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt()
        };
        for compute in [DType::BF16, DType::F16] {
            let (got, got_g) = run(compute);
            assert_eq!(got.dtype(), DType::F32);
            let e = rel_err(&got, &want);
            assert!(
                e < 2e-2 && e > 0.0,
                "{compute:?} output: relative error {e}"
            );
            for (name, g) in &got_g {
                let w = &want_g[name];
                assert_eq!(g.dtype(), DType::F32, "{name}");
                let e = match name.strip_suffix("key.bias") {
                    // Against the scale of the same layer's query bias gradient.
                    Some(layer) => {
                        let d = (g - w).unwrap();
                        norm(&d) / norm(&want_g[&format!("{layer}query.bias")])
                    }
                    None => rel_err(g, w),
                };
                assert!(
                    e < 5e-2,
                    "{compute:?} gradient of {name}: relative error {e}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let input = padded_batch(0);
        // With a head: the shared check, then BERT's (which adds mixed precision).
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        check_model_grads(&ModelConfig::Bert(tiny(3)), &input, &y);
        check_gradients(&tiny(3), &input, &y);
        // The encoder alone: a target feature per position.
        let y = Tensor::new(&[[1u32, 7, 3, 0, 5], [2, 2, 6, 4, 1]], &Device::Cpu).unwrap();
        check_gradients(&tiny(0), &input, &y);
    }

    #[test]
    fn padding_does_not_reach_the_real_positions() {
        for num_labels in [0, 3] {
            let (_, m) = build(&tiny(num_labels), DType::F64);
            let out = |x: &Tensor| m.forward(x, false).unwrap();
            let real = |y: Tensor| match num_labels {
                0 => y.get(1).unwrap().narrow(0, 0, 3).unwrap(),
                _ => y.get(1).unwrap(),
            };
            let (a, b) = (out(&padded_batch(0)), out(&padded_batch(9)));
            // Exactly: padded keys get a weight of exactly 0.
            assert_eq!(max_abs_diff(&real(a.clone()), &real(b.clone())), 0.0);
            // The unpadded sequence alone gives the same outputs (up to summation order).
            let alone = pack_inputs(
                &Tensor::new(&[[6u32, 5, 10]], &Device::Cpu).unwrap(),
                &Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap(),
            )
            .unwrap();
            let c = out(&alone).get(0).unwrap();
            assert!(max_abs_diff(&real(a.clone()), &c) < 1e-12);
            // …while the padded positions' own outputs (encoder) do change.
            if num_labels == 0 {
                let pad = |y: &Tensor| y.get(1).unwrap().narrow(0, 3, 2).unwrap();
                assert!(max_abs_diff(&pad(&a), &pad(&b)) > 0.0);
            }
        }
    }

    #[test]
    fn parameter_names_are_hugging_face_bert() {
        let names = |cfg: &BertConfig| {
            let (vm, _) = build(cfg, DType::F32);
            let data = vm.data().lock().unwrap();
            let v: HashMap<String, Vec<usize>> = data
                .iter()
                .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                .collect();
            v
        };
        let enc = names(&tiny(0));
        let shape = |n: &str| enc.get(n).unwrap_or_else(|| panic!("missing {n}")).clone();
        assert_eq!(shape("embeddings.word_embeddings.weight"), [11, 8]);
        assert_eq!(shape("embeddings.position_embeddings.weight"), [6, 8]);
        assert_eq!(shape("embeddings.token_type_embeddings.weight"), [2, 8]);
        assert_eq!(shape("embeddings.LayerNorm.bias"), [8]);
        let l = "encoder.layer.1";
        assert_eq!(shape(&format!("{l}.attention.self.query.weight")), [8, 8]);
        assert_eq!(shape(&format!("{l}.attention.self.key.bias")), [8]);
        assert_eq!(shape(&format!("{l}.attention.self.value.weight")), [8, 8]);
        assert_eq!(shape(&format!("{l}.attention.output.dense.weight")), [8, 8]);
        assert_eq!(
            shape(&format!("{l}.attention.output.LayerNorm.weight")),
            [8]
        );
        assert_eq!(shape(&format!("{l}.intermediate.dense.weight")), [12, 8]); // (out, in)
        assert_eq!(shape(&format!("{l}.output.dense.weight")), [8, 12]);
        assert_eq!(shape(&format!("{l}.output.LayerNorm.bias")), [8]);
        assert_eq!(shape("pooler.dense.weight"), [8, 8]);
        // 5 embedding tensors, 16 per layer, 2 in the pooler.
        assert_eq!(enc.len(), 5 + 16 * 2 + 2);

        let cls = names(&tiny(3));
        assert_eq!(cls.len(), enc.len() + 2);
        for (n, s) in &enc {
            assert_eq!(cls.get(&format!("bert.{n}")), Some(s), "bert.{n}");
        }
        assert_eq!(cls["classifier.weight"], [3, 8]);
        assert_eq!(cls["classifier.bias"], [3]);
    }

    /// Recomputing the layers in the backward (with dropout on, so the recomputation must
    /// replay the same masks) gives the gradients of the stored-activation run.
    #[test]
    fn checkpointed_activations_give_identical_gradients() {
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let grads = |checkpoint: bool| {
            let cfg = BertConfig {
                hidden_dropout_prob: 0.3,
                attention_probs_dropout_prob: 0.2,
                checkpoint_activations: checkpoint,
                ..tiny(3)
            };
            let vm = VarMap::new();
            let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
            let rng = SharedRng::new(5, "dropout");
            let m = Bert::new(&cfg, vb, rng.clone(), DType::F64).unwrap();
            let logits = m.forward(&padded_batch(0), true).unwrap();
            let loss = kiln_kernels::cross_entropy(&logits, &y).unwrap();
            let g = kiln_kernels::backward(&loss).unwrap();
            let mut named: Vec<(String, Vec<f64>)> = (vm.data().lock().unwrap().iter())
                .map(|(n, v)| {
                    let g = g.get(v).unwrap_or_else(|| panic!("{n} has no gradient"));
                    (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (named, rng.position(), logits)
        };
        let (plain, plain_rng, plain_logits) = grads(false);
        let (ckpt, ckpt_rng, ckpt_logits) = grads(true);
        assert_eq!(
            plain_rng, ckpt_rng,
            "the recomputation must rewind the generator"
        );
        assert_eq!(max_abs_diff(&plain_logits, &ckpt_logits), 0.0);
        for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
            let diff = (a.iter().zip(b))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{name}: gradients differ by {diff}");
        }
    }

    #[test]
    fn resolve_fills_defaults_and_validates() {
        let mut cfg: BertConfig = toml::from_str(
            "vocab_size = 11\nhidden_size = 8\nnum_hidden_layers = 2\nnum_attention_heads = 2\n\
             intermediate_size = 12",
        )
        .unwrap();
        assert_eq!(
            (
                cfg.type_vocab_size,
                cfg.layer_norm_eps,
                cfg.hidden_dropout_prob,
                cfg.attention_probs_dropout_prob,
                cfg.num_labels,
                cfg.checkpoint_activations
            ),
            (2, 1e-12, 0.1, 0.1, 0, false)
        );
        cfg.resolve(2, 32).unwrap();
        assert_eq!(cfg.max_position_embeddings, 32);
        let fails = |f: fn(&mut BertConfig), key: &str| {
            let mut c = tiny(3);
            f(&mut c);
            assert_eq!(c.resolve(3, 6).unwrap_err().0, key);
        };
        fails(|c| c.num_attention_heads = 3, "model.num_attention_heads");
        fails(
            |c| c.max_position_embeddings = 5,
            "model.max_position_embeddings",
        );
        fails(|c| c.hidden_dropout_prob = 1.0, "model.hidden_dropout_prob");
        fails(
            |c| c.attention_probs_dropout_prob = -0.1,
            "model.attention_probs_dropout_prob",
        );
        fails(|c| c.num_labels = 2, "model.num_labels");
        fails(|c| c.num_labels = 1, "model.num_labels");
        fails(|c| c.layer_norm_eps = 0.0, "model.layer_norm_eps");
        fails(|c| c.vocab_size = 0, "model.vocab_size");
        fails(|c| c.type_vocab_size = 0, "model.type_vocab_size");
        assert!(toml::from_str::<BertConfig>("vocab_size = 3\nn_head = 2").is_err());
        // The encoder alone takes any number of classes.
        tiny(0).resolve(100, 6).unwrap();
    }

    #[test]
    fn configs_round_trip_through_config_json() {
        for num_labels in [0, 5] {
            let cfg = BertConfig {
                hidden_dropout_prob: 0.1,
                attention_probs_dropout_prob: 0.05,
                ..tiny(num_labels)
            };
            let v = hf_config(&cfg);
            let arch = ["BertModel", "BertForSequenceClassification"][(num_labels > 0) as usize];
            assert_eq!(v["architectures"][0], arch);
            assert_eq!(config_from_hf(&v).unwrap(), cfg);
        }
        // HF writes id2label, not num_labels.
        let mut v = hf_config(&tiny(3));
        v.as_object_mut().unwrap().remove("num_labels");
        v["id2label"] = json!({"0": "neg", "1": "neu", "2": "pos"});
        assert_eq!(config_from_hf(&v).unwrap().num_labels, 3);
        // Another architecture's encoder: no head.
        v["architectures"] = json!(["BertForMaskedLM"]);
        assert_eq!(config_from_hf(&v).unwrap().num_labels, 0);

        let refused = |key: &str, value: Value| {
            let mut v = hf_config(&tiny(0));
            v[key] = value;
            let e = config_from_hf(&v).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        refused("hidden_act", "gelu_new".into());
        refused("position_embedding_type", "relative_key".into());
        refused("is_decoder", true.into());
        refused("model_type", "roberta".into());
        refused("hidden_size", Value::Null);
        let mut v = hf_config(&tiny(2));
        v["problem_type"] = "regression".into();
        assert!(config_from_hf(&v)
            .unwrap_err()
            .to_string()
            .contains("problem_type"));
    }

    #[test]
    fn a_recipe_builds_a_bert() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../recipes/shakespeare-char.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let model = "[model]\nkind = \"bert\"\nvocab_size = 65\nhidden_size = 16\n\
                     num_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 32\n";
        let start = text.find("[model]").unwrap();
        let end = text.find("[data]").unwrap();
        let text = format!("{}{model}\n{}", &text[..start], &text[end..]);
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &text, &[]).unwrap();
        let cfg = ModelConfig::from_recipe(&recipe, 65, &[64]).unwrap();
        assert_eq!(cfg.kind(), "bert");
        let ModelConfig::Bert(c) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!((c.max_position_embeddings, c.num_labels), (64, 0));
        // The resolved table decodes back to the same config.
        let mut table = cfg.to_table();
        assert_eq!(table.get("kind").and_then(|k| k.as_str()), Some("bert"));
        table.remove("kind");
        assert_eq!(
            &toml::Value::Table(table).try_into::<BertConfig>().unwrap(),
            c
        );
        let model = cfg
            .build(
                kiln_core::rng::seeded_var_builder(&VarMap::new(), 0, DType::F32, &Device::Cpu),
                SharedRng::new(0, "d"),
                DType::F32,
            )
            .unwrap();
        let x = pack_inputs(
            &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
            &Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert_eq!(model.forward(&x, false).unwrap().dims(), [1, 3, 16]);
        let err = model.forward(&x.get(0).unwrap(), false).unwrap_err();
        assert!(err.to_string().contains("(batch, 2, seq)"), "{err}");

        let bad = text.replace("kind = \"bert\"", "kind = \"bret\"");
        let recipe = kiln_core::recipe::Recipe::parse(path.as_ref(), &bad, &[]).unwrap();
        let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
        assert!(err.contains("\"bert\""), "{err}");
    }

    /// The shared folder, or None (the test skips) unless KILN_REQUIRE_SHARED=1.
    fn shared(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data")
            .join(name);
        if p.exists() {
            return Some(p);
        }
        if std::env::var("KILN_REQUIRE_SHARED").as_deref() == Ok("1") {
            panic!("{} is missing and KILN_REQUIRE_SHARED=1", p.display());
        }
        eprintln!("skipping: {} not found", p.display());
        None
    }

    /// The pretrained sentence-transformers/all-MiniLM-L6-v2 against the outputs of HF
    /// transformers (reference_embeddings.json): token ids, last hidden state, and the
    /// mean-pooled normalized embeddings, one sentence at a time and as a padded batch.
    #[test]
    fn matches_pretrained_all_minilm_l6_v2() {
        let Some(dir) = shared("all-MiniLM-L6-v2") else {
            return;
        };
        let read_json = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let cfg = config_from_hf(&read_json("config.json")).unwrap();
        assert_eq!(
            (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_labels),
            (384, 6, 0)
        );
        assert_eq!(cfg.layer_norm_eps, 1e-12);

        let (vm, model) = build(&cfg, DType::F32);
        let mut tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        // A buffer (arange of positions), not a parameter.
        assert!(tensors.remove("embeddings.position_ids").is_some());
        {
            let data = vm.data().lock().unwrap();
            let mut ours: Vec<&String> = data.keys().collect();
            let mut theirs: Vec<&String> = tensors.keys().collect();
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs, "parameter names differ from the checkpoint's");
            for (name, var) in data.iter() {
                assert_eq!(var.dims(), tensors[name].dims(), "{name}");
                var.set(&tensors[name]).unwrap();
            }
        }

        let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        // tokenizer.json pads and truncates to 128 by default.
        tok.with_padding(None);
        tok.with_truncation(None).unwrap();
        let dev = Device::Cpu;
        let reference = read_json("reference_embeddings.json");
        let sentences = reference["sentences"].as_array().unwrap();
        let floats = |v: &Value| -> Vec<f32> {
            let a = v.as_array().unwrap();
            a.iter().map(|x| x.as_f64().unwrap() as f32).collect()
        };
        let (mut max_hidden_diff, mut min_cos) = (0f64, 1f64);
        let mut all_ids = Vec::new();
        let mut singles = Vec::new();
        for s in sentences {
            let text = s["text"].as_str().unwrap();
            let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
            let want: Vec<u32> = (s["input_ids"].as_array().unwrap().iter())
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want, "{text}");
            let t = Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mask = t.ones_like().unwrap();
            let hidden = model.encode(&t, &mask, false).unwrap();
            // Model::forward on the packed input is the same computation.
            let packed = model
                .forward(&pack_inputs(&t, &mask).unwrap(), false)
                .unwrap();
            assert_eq!(max_abs_diff(&packed, &hidden), 0.0);

            let first8 = hidden
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .narrow(0, 0, 8)
                .unwrap();
            let want8 = Tensor::new(floats(&s["last_hidden_state_token0_first8"]), &dev).unwrap();
            let d = max_abs_diff(&first8, &want8);
            assert!(d <= 1e-4, "{text}: token 0 hidden state differs by {d}");
            max_hidden_diff = max_hidden_diff.max(d);

            let emb = l2_normalize(&mean_pooled(&hidden, &mask).unwrap()).unwrap();
            let emb: Vec<f32> = emb.get(0).unwrap().to_vec1().unwrap();
            let want = floats(&s["embedding_normalized"]);
            assert_eq!(emb.len(), 384);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
            };
            let cos = dot(&emb, &want) / (dot(&emb, &emb) * dot(&want, &want)).sqrt();
            assert!(cos >= 0.9999, "{text}: cosine {cos}");
            min_cos = min_cos.min(cos);
            all_ids.push(ids);
            singles.push(emb);
        }

        // Cosine similarities between the sentences, against the reference matrix.
        let mut max_sim_diff = 0f64;
        for (i, row) in reference["cosine_similarity_matrix"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (j, want) in floats(row).into_iter().enumerate() {
                let got: f32 = singles[i].iter().zip(&singles[j]).map(|(a, b)| a * b).sum();
                max_sim_diff = max_sim_diff.max((got - want).abs() as f64);
            }
        }
        assert!(
            max_sim_diff <= 1e-4,
            "similarities differ by {max_sim_diff}"
        );

        // All sentences as one padded batch give the one-at-a-time embeddings.
        let t = all_ids.iter().map(Vec::len).max().unwrap();
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for s in &all_ids {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())));
            mask.extend((0..t).map(|i| (i < s.len()) as u32));
        }
        let n = all_ids.len();
        let ids = Tensor::from_vec(ids, (n, t), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (n, t), &dev).unwrap();
        let hidden = model
            .forward(&pack_inputs(&ids, &mask).unwrap(), false)
            .unwrap();
        let batched = l2_normalize(&mean_pooled(&hidden, &mask).unwrap()).unwrap();
        let mut max_batch_diff = 0f64;
        for (i, single) in singles.iter().enumerate() {
            let single = Tensor::new(single.as_slice(), &dev).unwrap();
            max_batch_diff = max_batch_diff.max(max_abs_diff(&batched.get(i).unwrap(), &single));
        }
        // HF's pooler_output (BertModel, transformers 5.24.0 on this folder, the same two
        // sentences padded to 11 tokens), first 6 values, for the classification head's input.
        let pooled = model.pooled(&hidden).unwrap();
        let want_pooled = [
            [
                0.0134286f32,
                0.0400362,
                0.0030797,
                0.0077095,
                -0.0857406,
                -0.0328736,
            ],
            [
                0.0625217, -0.0569555, 0.0113349, 0.0263086, -0.1301868, -0.0593565,
            ],
        ];
        let mut max_pooled_diff = 0f64;
        for (row, want) in [0, 3].into_iter().zip(want_pooled) {
            let got = pooled.get(row).unwrap().narrow(0, 0, 6).unwrap();
            let want = Tensor::new(&want, &dev).unwrap();
            max_pooled_diff = max_pooled_diff.max(max_abs_diff(&got, &want));
        }
        assert!(
            max_pooled_diff <= 1e-5,
            "pooler output differs by {max_pooled_diff}"
        );
        assert!(
            max_batch_diff <= 1e-5,
            "batched embeddings differ by {max_batch_diff}"
        );
        println!(
            "all-MiniLM-L6-v2: token-0 hidden state max |diff| {max_hidden_diff:.2e}, min cosine \
             1 - {:.1e}, similarity matrix max |diff| {max_sim_diff:.2e}, padded batch vs \
             single max |diff| {max_batch_diff:.2e}, pooler max |diff| {max_pooled_diff:.2e}",
            1.0 - min_cos
        );
    }
}
