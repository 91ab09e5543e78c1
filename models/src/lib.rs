//! kiln-models: the model zoo. One model per file, parameter paths named as in Hugging Face
//! `transformers` where the architecture exists there, so checkpoints export without renaming.

pub mod batch_norm;
pub mod bert;
pub mod cnn;
pub mod gpt;
pub mod hf;
mod layers;
pub mod llama;
pub mod lora;
pub mod mlp;
pub mod resnet;
pub mod vit;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_core::recipe::{Recipe, RecipeError};
pub use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};

/// A trainable network: inputs → logits.
pub trait Model: Send + Sync {
    /// `train` turns dropout on, and BatchNorm to batch statistics (updating its running ones).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor>;

    /// The model as an incremental decoder, if it is one (GPT, Llama).
    fn as_decoder(&self) -> Option<&dyn Decoder> {
        None
    }
}

/// A causal language model that decodes incrementally, reusing the keys and values of the
/// positions it has already seen.
pub trait Decoder: Send + Sync {
    /// Longest context (positions).
    fn context(&self) -> usize;

    fn new_cache(&self) -> KvCache;

    /// Feeds `ids` (B, T; usually B = 1) after the cached positions; returns logits
    /// (B, T, vocab) in the weights' dtype (f32 under mixed precision) and extends the cache.
    /// Inference only: no dropout, and nothing is kept for a backward. Errors, leaving the
    /// cache as it was, when the positions would run past `context()`.
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
}

/// Keys and values of the positions a decoder has seen, per layer: (B, kv heads, positions,
/// head size) each, in the attention's compute dtype.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions cached.
    len: usize,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `ids` (B, T) fit after the cached positions within `context` and that the
    /// cache was made for `n_layers` layers; returns T.
    pub(crate) fn check_step(
        &self,
        ids: &Tensor,
        n_layers: usize,
        context: usize,
    ) -> Result<usize> {
        let (_, t) = ids.dims2()?;
        if self.layers.len() != n_layers {
            candle_core::bail!(
                "KV cache has {} layers, the model {n_layers}: make it with new_cache()",
                self.layers.len()
            );
        }
        if t == 0 {
            candle_core::bail!("forward_cached: no tokens");
        }
        if self.len + t > context {
            candle_core::bail!(
                "{t} tokens after the {} cached exceed the context of {context} positions",
                self.len
            );
        }
        Ok(t)
    }

    /// The cached keys and values of `layer` followed by the new positions' `k`, `v`.
    pub(crate) fn extended(&self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        // A cat per step copies the cache: O(T) per token, like the attention over it.
        match &self.layers[layer] {
            None => Ok((k, v)),
            Some((pk, pv)) => Ok((Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)),
        }
    }

    /// Stores every layer's extended keys and values at once, so that a step that fails half
    /// way leaves the cache as it was.
    pub(crate) fn commit(&mut self, layers: Vec<(Tensor, Tensor)>, t: usize) {
        debug_assert_eq!(layers.len(), self.layers.len());
        self.layers = layers.into_iter().map(Some).collect();
        self.len += t;
    }
}

/// Inference attention of new queries `q` (B, H, Tq, D) over keys and values `k`, `v`
/// (B, H, Tk, D) whose last Tq positions are the queries' own: query i sees keys 0..=Tk−Tq+i.
/// Plain candle ops (no backward needed), in f32 (f64 for f64 inputs); returns q's dtype.
pub(crate) fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    let acc = kiln_kernels::stats_dtype(q.dtype());
    let (qa, ka, va) = (q.to_dtype(acc)?, k.to_dtype(acc)?, v.to_dtype(acc)?);
    let scores = (qa.matmul(&ka.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = if tq > 1 {
        let past = tk - tq;
        // Row i (query), column j (key): −∞ where j > past + i.
        let mask: Vec<f32> = (0..tq * tk)
            .map(|n| {
                if n % tk > past + n / tk {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), q.device())?.to_dtype(acc)?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    // kiln's softmax, like the training path: decoding is never trained, but an op with a
    // backward keeps that from mattering.
    let p = kiln_kernels::softmax(&scores)?;
    p.matmul(&va)?.to_dtype(q.dtype())
}

/// The `[model]` section of a recipe, by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    Mlp(mlp::MlpConfig),
    Cnn(cnn::CnnConfig),
    Gpt(gpt::GptConfig),
    Llama(llama::LlamaConfig),
    Bert(bert::BertConfig),
    Vit(vit::ViTConfig),
    Resnet(resnet::ResNetConfig),
}

impl ModelConfig {
    /// The recipe's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelConfig::Mlp(_) => "mlp",
            ModelConfig::Cnn(_) => "cnn",
            ModelConfig::Gpt(_) => "gpt",
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Bert(_) => "bert",
            ModelConfig::Vit(_) => "vit",
            ModelConfig::Resnet(_) => "resnet",
        }
    }

    /// Whether the parameter `name` trains: with LoRA only the adapters and the task head do,
    /// and the pretrained weights stay frozen (and out of checkpoints). BatchNorm's running
    /// statistics ([`Self::is_buffer`]) never do: the forward updates them.
    pub fn trainable(&self, name: &str) -> bool {
        if self.is_buffer(name) {
            return false;
        }
        match self {
            ModelConfig::Bert(c) if c.lora.is_some() => {
                lora::is_adapter(name) || name.starts_with("classifier.")
            }
            _ => true,
        }
    }

    /// Whether `name` is a buffer: state that a training forward updates in place (BatchNorm's
    /// `running_mean`, `running_var`, `num_batches_tracked`), not trained, but checkpointed.
    pub fn is_buffer(&self, name: &str) -> bool {
        batch_norm::is_buffer(name)
    }

    /// Whether a checkpoint must hold `name`: what trains, and the buffers.
    pub fn saved(&self, name: &str) -> bool {
        self.trainable(name) || self.is_buffer(name)
    }

    /// The LoRA settings, for a model that has adapters.
    pub fn lora(&self) -> Option<&lora::LoraConfig> {
        match self {
            ModelConfig::Bert(c) => c.lora.as_ref(),
            _ => None,
        }
    }

    /// Decodes the recipe's `[model]` table and fills in what the data decides (number of
    /// classes or vocabulary size, input size, context length).
    pub fn from_recipe(
        recipe: &Recipe,
        num_classes: usize,
        input_shape: &[usize],
    ) -> std::result::Result<Self, RecipeError> {
        let mut cfg = match &recipe.init_from {
            None => Self::decode(recipe)?,
            Some(from) => Self::pretrained(recipe, from)?,
        };
        let err = |(key, msg): ConfigError| recipe.source.error(key, msg);
        match &mut cfg {
            ModelConfig::Mlp(c) => c.resolve(num_classes, input_shape).map_err(err)?,
            ModelConfig::Cnn(c) => c.resolve(num_classes, input_shape).map_err(err)?,
            ModelConfig::Gpt(c) => c
                .resolve(num_classes, recipe.data.example_len())
                .map_err(err)?,
            ModelConfig::Llama(c) => c
                .resolve(num_classes, recipe.data.example_len())
                .map_err(err)?,
            ModelConfig::Bert(c) => {
                // A classification recipe gets a head with one output per class.
                if recipe.task == kiln_core::recipe::Task::Classification && c.num_labels == 0 {
                    c.num_labels = num_classes;
                }
                let seq_len = recipe.data.example_len();
                c.resolve(num_classes, seq_len).map_err(err)?
            }
            ModelConfig::Vit(c) => c.resolve(num_classes, input_shape).map_err(err)?,
            ModelConfig::Resnet(c) => c.resolve(num_classes, input_shape).map_err(err)?,
        }
        Ok(cfg)
    }

    /// Decodes the `[model]` table as written, without consulting the data (a run's resolved
    /// `recipe.toml` already holds the data-derived fields).
    pub fn decode(recipe: &Recipe) -> std::result::Result<Self, RecipeError> {
        Self::decode_table(recipe, recipe.model.clone())
    }

    /// The config of the pretrained model `init_from` names, with the recipe's training-only
    /// keys (dropout, activation checkpointing) laid over it.
    fn pretrained(recipe: &Recipe, from: &str) -> std::result::Result<Self, RecipeError> {
        let at_init = |e: anyhow::Error| recipe.source.error("init_from", format!("{e:#}"));
        let folder = kiln_core::hub::resolve(from).map_err(at_init)?;
        let pre = hf::read_hf_config(&folder).map_err(at_init)?;
        let mut table = recipe.model.clone();
        let kind = table.remove("kind");
        if kind.as_ref().and_then(|k| k.as_str()) != Some(pre.kind()) {
            return Err(recipe.source.error(
                "model.kind",
                format!(
                    "init_from {from} is a {:?} model; set model.kind = {:?}",
                    pre.kind(),
                    pre.kind()
                ),
            ));
        }
        let merged = hf::merge_recipe_model(&pre, &table, &folder.display().to_string())
            .map_err(|(k, m)| recipe.source.error(&k, m))?;
        Self::decode_table(recipe, merged)
    }

    fn decode_table(
        recipe: &Recipe,
        mut table: toml::Table,
    ) -> std::result::Result<Self, RecipeError> {
        let src = &recipe.source;
        let kind = table.remove("kind");
        let value = toml::Value::Table(table);
        Ok(match kind.as_ref().and_then(|k| k.as_str()) {
            Some("mlp") => ModelConfig::Mlp(src.decode("model", value)?),
            Some("cnn") => ModelConfig::Cnn(src.decode("model", value)?),
            Some("gpt") => ModelConfig::Gpt(src.decode("model", value)?),
            Some("llama") => ModelConfig::Llama(src.decode("model", value)?),
            Some("bert") => ModelConfig::Bert(src.decode("model", value)?),
            Some("vit") => ModelConfig::Vit(src.decode("model", value)?),
            Some("resnet") => ModelConfig::Resnet(src.decode("model", value)?),
            other => {
                return Err(src.error(
                    "model.kind",
                    format!(
                        "unknown model kind {other:?}; valid choices: \"mlp\", \"cnn\", \"gpt\", \"llama\", \"bert\", \"vit\", \"resnet\""
                    ),
                ))
            }
        })
    }

    /// The resolved config as a TOML table (for the run's `recipe.toml`).
    pub fn to_table(&self) -> toml::Table {
        match toml::Value::try_from(self).expect("configs serialize") {
            toml::Value::Table(t) => t,
            _ => unreachable!("a config is a table"),
        }
    }

    /// Builds the model; dropout masks come from `rng`. Matmuls run in `compute` (the
    /// weights' dtype, or bf16/f16 for mixed precision).
    pub fn build(&self, vb: VarBuilder, rng: SharedRng, compute: DType) -> Result<Box<dyn Model>> {
        Ok(match self {
            ModelConfig::Mlp(c) => Box::new(mlp::Mlp::new(c, vb, rng, compute)?),
            ModelConfig::Cnn(c) => Box::new(cnn::Cnn::new(c, vb, rng, compute)?),
            ModelConfig::Gpt(c) => Box::new(gpt::Gpt::new(c, vb, rng, compute)?),
            ModelConfig::Llama(c) => Box::new(llama::Llama::new(c, vb, rng, compute)?),
            ModelConfig::Bert(c) => Box::new(bert::Bert::new(c, vb, rng, compute)?),
            ModelConfig::Vit(c) => Box::new(vit::ViT::new(c, vb, rng, compute)?),
            ModelConfig::Resnet(c) => Box::new(resnet::ResNet::new(c, vb, rng, compute)?),
        })
    }
}

/// x · w with both operands in `compute` (mixed precision: the matmul, forward and backward,
/// runs in bf16/f16 while the weights stay f32); the result comes back in x's dtype. The casts
/// are differentiable, so the f32 weights get their gradients through them.
pub fn in_precision(x: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    if compute == x.dtype() && compute == w.dtype() {
        return x.matmul(w);
    }
    x.to_dtype(compute)?
        .matmul(&w.to_dtype(compute)?)?
        .to_dtype(x.dtype())
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

/// Dropout on `x` while training.
pub(crate) fn dropout(x: Tensor, p: f64, train: bool, rng: &SharedRng) -> Result<Tensor> {
    if train && p > 0.0 {
        kiln_kernels::dropout(&x, p, rng)
    } else {
        Ok(x)
    }
}

/// `block(x)` (a training forward) with its activations recomputed during the backward;
/// `params` are the tensors the block reads. The recomputation rewinds the dropout generator
/// to where this forward started, so it draws the same masks, then puts it back.
pub(crate) fn checkpointed(
    x: &Tensor,
    params: Vec<Tensor>,
    rng: &SharedRng,
    block: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let rng = rng.clone();
    let start = rng.position();
    let f = move |x: &Tensor| {
        let now = rng.position();
        rng.set_position(start);
        let y = block(x);
        if now != start {
            rng.set_position(now);
        }
        y
    };
    kiln_kernels::checkpoint(x, params, std::sync::Arc::new(f))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Gradient checks: every parameter's autograd gradient against central finite differences,
    //! in f64 on a tiny config.
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn check_model_grads(cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        check_model_grads_mode(cfg, input, targets, false)
    }

    /// [`check_model_grads`] with the forward in training mode (`train`: batch statistics; the
    /// config's dropout must be 0, or the finite differences see new masks) or evaluation mode. Buffers (BatchNorm's running statistics) are not
    /// parameters: they must get no gradient. A model with buffers is evaluated after one
    /// training forward, so that its running statistics are not the trivial initial ones.
    pub fn check_model_grads_mode(
        cfg: &ModelConfig,
        input: &Tensor,
        targets: &Tensor,
        train: bool,
    ) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
        let model = cfg
            .build(vb, SharedRng::new(0, "dropout"), DType::F64)
            .unwrap();
        let has_buffers = vm.data().lock().unwrap().keys().any(|n| cfg.is_buffer(n));
        if !train && has_buffers {
            model.forward(input, true).unwrap();
        }
        let loss_of = |m: &dyn Model| -> Tensor {
            let logits = m.forward(input, train).unwrap();
            let v = logits.dim(candle_core::D::Minus1).unwrap();
            kiln_kernels::cross_entropy(
                &logits.reshape(((), v)).unwrap(),
                &targets.flatten_all().unwrap(),
            )
            .unwrap()
        };
        let grads = loss_of(model.as_ref()).backward().unwrap();
        let mut vars: Vec<(String, Var)> = vm.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        // Buffers, and frozen weights (LoRA's base), get no gradient: not even computed.
        for (name, var) in &vars {
            if !cfg.trainable(name) {
                assert!(grads.get(var).is_none(), "untrained {name} has a gradient");
            }
        }
        vars.retain(|(name, _)| cfg.trainable(name));
        assert!(!vars.is_empty());
        let h = 1e-6;
        for (name, var) in &vars {
            let g: Vec<f64> = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            // Probe a few coordinates of each parameter: the first, the last, and one between.
            for i in [0, flat.len() / 2, flat.len() - 1] {
                let eval = |delta: f64| -> f64 {
                    let mut p = flat.clone();
                    p[i] += delta;
                    var.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(model.as_ref()).to_scalar::<f64>().unwrap()
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
    }

    /// Logits of a 7-token sequence from `forward` against `forward_cached`, both on all 7
    /// tokens at once and as a 3-token prefill then 4 single tokens; and a step past the
    /// context errors, leaving the cache usable. `cfg`'s context must be 7.
    pub fn check_cached_decoding(cfg: &ModelConfig) {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
            let vm = VarMap::new();
            let vb = kiln_core::rng::seeded_var_builder(&vm, 3, dtype, &Device::Cpu);
            let model = cfg.build(vb, SharedRng::new(0, "d"), dtype).unwrap();
            let dec = model.as_decoder().expect("a decoder");
            assert_eq!(dec.context(), 7);
            let ids = Tensor::new(&[[1u32, 5, 2, 0, 6, 3, 3]], &Device::Cpu).unwrap();
            let want = model.forward(&ids, false).unwrap();
            assert_eq!(want.dtype(), dtype);

            let mut cache = dec.new_cache();
            assert!(cache.is_empty());
            let all = dec.forward_cached(&ids, &mut cache).unwrap();
            assert_eq!(cache.len(), 7);
            let e = rel_err(&all, &want);
            assert!(e <= tol, "{dtype:?} one cached call: relative error {e:e}");
            let err = dec
                .forward_cached(&ids.narrow(1, 0, 1).unwrap(), &mut cache)
                .unwrap_err()
                .to_string();
            assert!(err.contains("context"), "{err}");
            assert_eq!(cache.len(), 7);

            let mut cache = dec.new_cache();
            let mut parts = vec![dec
                .forward_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache)
                .unwrap()];
            assert_eq!(cache.len(), 3);
            // Too many tokens for what is left: an error, and the cache is untouched.
            assert!(dec
                .forward_cached(&ids.narrow(1, 0, 5).unwrap(), &mut cache)
                .is_err());
            assert_eq!(cache.len(), 3);
            for i in 3..7 {
                parts.push(
                    dec.forward_cached(&ids.narrow(1, i, 1).unwrap(), &mut cache)
                        .unwrap(),
                );
            }
            assert_eq!(cache.len(), 7);
            let stepped = Tensor::cat(&parts, 1).unwrap();
            let e = rel_err(&stepped, &want);
            assert!(e <= tol, "{dtype:?} prefill + steps: relative error {e:e}");
        }
    }

    pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        (norm(&d) / norm(&b.to_dtype(DType::F64).unwrap())).sqrt()
    }

    /// The model with bf16 and f16 matmuls against itself in f32, on the same f32 weights:
    /// logits come back in f32 and stay close, and every weight gets a close f32 gradient.
    pub fn check_mixed_precision(cfg: &ModelConfig, input: &Tensor, targets: &Tensor) {
        check_mixed_precision_mode(cfg, input, targets, false, 5e-2)
    }

    /// [`check_mixed_precision`] with the forward in training (`train`) or evaluation mode and
    /// gradients held to a relative error of `grad_tol`; buffers are skipped (a model with
    /// buffers is evaluated after one f32 training forward).
    pub fn check_mixed_precision_mode(
        cfg: &ModelConfig,
        input: &Tensor,
        targets: &Tensor,
        train: bool,
        grad_tol: f64,
    ) {
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let input = match input.dtype() {
            DType::F64 => input.to_dtype(DType::F32).unwrap(),
            _ => input.clone(),
        };
        let run = |compute: DType| {
            let model = cfg
                .build(vb.clone(), SharedRng::new(0, "d"), compute)
                .unwrap();
            let logits = model.forward(&input, train).unwrap();
            let v = logits.dim(candle_core::D::Minus1).unwrap();
            let loss = kiln_kernels::cross_entropy(
                &logits.reshape(((), v)).unwrap(),
                &targets.flatten_all().unwrap(),
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            let mut vars: Vec<(String, Var)> =
                vm.data().lock().unwrap().clone().into_iter().collect();
            vars.retain(|(n, _)| !cfg.is_buffer(n));
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let g: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        grads
                            .get(v)
                            .unwrap_or_else(|| panic!("{n}: no gradient"))
                            .clone(),
                    )
                })
                .collect();
            (logits, g)
        };
        let f32_model = cfg
            .build(vb.clone(), SharedRng::new(0, "d"), DType::F32)
            .unwrap();
        if !train && vm.data().lock().unwrap().keys().any(|n| cfg.is_buffer(n)) {
            f32_model.forward(&input, true).unwrap();
        }
        let (want, want_g) = run(DType::F32);
        for compute in [DType::BF16, DType::F16] {
            let (got, got_g) = run(compute);
            assert_eq!(got.dtype(), DType::F32);
            let e = rel_err(&got, &want);
            assert!(e < 2e-2, "{compute:?} logits: relative error {e}");
            assert!(
                e > 0.0,
                "identical logits: the matmuls did not run in {compute:?}"
            );
            for ((name, g), (_, w)) in got_g.iter().zip(&want_g) {
                assert_eq!(g.dtype(), DType::F32, "{name}");
                let e = rel_err(g, w);
                assert!(
                    e < grad_tol,
                    "{compute:?} gradient of {name}: relative error {e}"
                );
            }
        }
    }
}
