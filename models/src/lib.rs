//! kiln-models: the model zoo. One model per file, parameter paths named as in Hugging Face
//! `transformers` where the architecture exists there, so checkpoints export without renaming.

pub mod batch_norm;
pub mod bert;
pub mod cnn;
mod config;
mod decoder;
pub mod footprint;
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
pub(crate) use config::{
    check_divisible, check_dropout, check_encoder, check_labels_cover, check_positive,
    check_positive_f64, resolve_context, resolve_vocab, transformer_activations,
};
pub use config::{ConfigError, DataFacts, HfConfig, ModelSpec};
pub(crate) use decoder::{cached_attention, CausalLm, DecoderStack};
pub use decoder::{Decoder, KvCache};
use kiln_core::recipe::{Recipe, RecipeError, RecipeSource};
pub use kiln_core::rng::SharedRng;
use serde::{Deserialize, Serialize};

/// A trainable network: inputs → logits.
pub trait Model: Send + Sync {
    /// `train` turns dropout on, and BatchNorm to batch statistics (updating its running ones).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor>;

    /// Mean cross-entropy of the logits for `xs` against `targets` (one class id per logit
    /// row; [`kiln_kernels::IGNORE_INDEX`] rows are left out). Language models override it
    /// with a head fused into the loss, which never holds all the logits at once.
    fn loss(&self, xs: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self.forward(xs, train)?;
        let classes = logits.dim(candle_core::D::Minus1)?;
        kiln_kernels::cross_entropy(&logits.reshape(((), classes))?, &targets.flatten_all()?)
    }

    /// The model as an incremental decoder, if it is one (GPT, Llama).
    fn as_decoder(&self) -> Option<&dyn Decoder> {
        None
    }
}

/// Declares the model kinds: `"kind" => Variant(config type, model type)`, plus
/// `hf "model_type"` for a kind with a Hugging Face counterpart (its config implements
/// [`HfConfig`]). Each config implements [`ModelSpec`]; each model has
/// `new(config, vb, rng, compute)`. This is the one place that lists the kinds.
macro_rules! registry {
    ($($kind:literal => $variant:ident($cfg:ty, $model:ty) $(, hf $hf:literal)?;)*) => {
        /// The `[model]` section of a recipe, by `kind`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind")]
        pub enum ModelConfig {
            $(#[serde(rename = $kind)] $variant($cfg),)*
        }

        impl ModelConfig {
            /// Every `kind` a recipe may name.
            pub const KINDS: &[&str] = &[$($kind),*];

            /// The `model_type`s of Hugging Face configs kiln reads.
            pub const HF_MODEL_TYPES: &[&str] = &[$($($hf,)?)*];

            /// The recipe's `kind`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(ModelConfig::$variant(_) => $kind,)*
                }
            }

            /// The kind's config behaviour.
            pub fn spec(&self) -> &dyn ModelSpec {
                match self {
                    $(ModelConfig::$variant(c) => c,)*
                }
            }

            fn spec_mut(&mut self) -> &mut dyn ModelSpec {
                match self {
                    $(ModelConfig::$variant(c) => c,)*
                }
            }

            /// Builds the model; dropout masks come from `rng`. Matmuls run in `compute` (the
            /// weights' dtype, or bf16/f16 for mixed precision).
            pub fn build(
                &self,
                vb: VarBuilder,
                rng: SharedRng,
                compute: DType,
            ) -> Result<Box<dyn Model>> {
                Ok(match self {
                    $(ModelConfig::$variant(c) => Box::new(<$model>::new(c, vb, rng, compute)?),)*
                })
            }

            /// `config.json` in the HF schema (without dtype or special tokens); `None` for a
            /// kind without an HF counterpart.
            pub(crate) fn to_hf(&self) -> Option<anyhow::Result<serde_json::Value>> {
                match self {
                    $(ModelConfig::$variant(c) => registry!(@to_hf c $(, $hf)?),)*
                }
            }

            /// Decodes the `[model]` table (without `kind`) as the config of `kind`; `None` for
            /// an unknown kind.
            fn decode_kind(
                kind: &str,
                src: &RecipeSource,
                value: toml::Value,
            ) -> Option<std::result::Result<Self, RecipeError>> {
                match kind {
                    $($kind => Some(src.decode("model", value).map(ModelConfig::$variant)),)*
                    _ => None,
                }
            }

            /// The config of an HF `config.json` whose `model_type` is `model_type`; `None` for
            /// one kiln does not implement.
            fn from_hf_type(model_type: &str, r: &hf::HfReader) -> Option<anyhow::Result<Self>> {
                match model_type {
                    $($($hf => Some(<$cfg as HfConfig>::from_hf(r).and_then(|c| {
                        config::check_hf(&c, r)?;
                        Ok(ModelConfig::$variant(c))
                    })),)?)*
                    _ => None,
                }
            }
        }
    };
    (@to_hf $c:ident) => {{
        let _ = $c;
        None
    }};
    (@to_hf $c:ident, $hf:literal) => { Some(HfConfig::to_hf($c)) };
}

registry! {
    "mlp" => Mlp(mlp::MlpConfig, mlp::Mlp);
    "cnn" => Cnn(cnn::CnnConfig, cnn::Cnn);
    "gpt" => Gpt(gpt::GptConfig, gpt::Gpt), hf "gpt2";
    "llama" => Llama(llama::LlamaConfig, llama::Llama), hf "llama";
    "bert" => Bert(bert::BertConfig, bert::Bert), hf "bert";
    "vit" => Vit(vit::ViTConfig, vit::ViT), hf "vit";
    "resnet" => Resnet(resnet::ResNetConfig, resnet::ResNet), hf "resnet";
}

/// `"a", "b", …` for an error message.
fn quoted(items: &[&str]) -> String {
    let q: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    q.join(", ")
}

impl ModelConfig {
    /// Whether the parameter `name` trains: with LoRA only the adapters and the task head do,
    /// and the pretrained weights stay frozen (and out of checkpoints). BatchNorm's running
    /// statistics ([`Self::is_buffer`]) never do: the forward updates them.
    pub fn trainable(&self, name: &str) -> bool {
        if self.is_buffer(name) {
            return false;
        }
        match self.lora() {
            Some(_) => lora::is_adapter(name) || self.spec().is_task_head(name),
            None => true,
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
        self.spec().lora()
    }

    /// Drops the adapters from the config (their weights merged into the base).
    pub fn clear_lora(&mut self) {
        self.spec_mut().clear_lora()
    }

    /// Longest token sequence of a text model.
    pub fn context(&self) -> Option<usize> {
        self.spec().context()
    }

    /// An HF image classifier: (input channels, classes).
    pub fn image_classifier(&self) -> Option<(usize, usize)> {
        self.spec().image_classifier()
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
        let data = DataFacts {
            classes: num_classes,
            input_shape: input_shape.to_vec(),
            seq_len: recipe.data.example_len(),
            task: recipe.task,
        };
        let err = |(key, msg): ConfigError| recipe.source.error(key, msg);
        cfg.spec_mut().resolve(&data).map_err(err)?;
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
        let kind_str = kind.as_ref().and_then(|k| k.as_str());
        let problem = match kind_str {
            Some(k) => match Self::decode_kind(k, src, value) {
                Some(cfg) => return cfg,
                None => format!("unknown model kind {k:?}"),
            },
            None if kind.is_some() => "must be a string".to_string(),
            None => "missing".to_string(),
        };
        let choices = quoted(Self::KINDS);
        Err(src.error("model.kind", format!("{problem}; valid choices: {choices}")))
    }

    /// The config of an HF `config.json`, by its `model_type`.
    pub(crate) fn from_hf(r: &hf::HfReader) -> anyhow::Result<Self> {
        let model_type = r.v["model_type"].as_str().unwrap_or("");
        Self::from_hf_type(model_type, r).unwrap_or_else(|| {
            anyhow::bail!(
                "{}: model_type {model_type:?} is not one kiln implements ({})",
                r.ctx(),
                quoted(Self::HF_MODEL_TYPES)
            )
        })
    }

    /// The name and shape of every parameter of the model, found by building it on
    /// placeholders that allocate nothing. A model larger than `budget` (its parameters plus
    /// the tables it computes, like RoPE's) is refused as soon as it is known to be.
    pub fn parameter_shapes(
        &self,
        budget: Budget,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<usize>>> {
        let tables = self.spec().table_elements();
        anyhow::ensure!(
            tables <= budget.elements,
            "its tables (RoPE's cos and sin) alone would hold {tables} values, more than the \
             {} allowed",
            budget.elements
        );
        let shapes = std::sync::Arc::new(std::sync::Mutex::new(ShapeLog {
            shapes: Default::default(),
            elements: tables,
            budget,
        }));
        let backend = ShapeRecorder(shapes.clone());
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, candle_core::Device::Cpu);
        self.build(vb, SharedRng::new(0, "unused: shapes only"), DType::F32)
            .map_err(without_backtrace)?;
        let log = shapes.lock().unwrap_or_else(|e| e.into_inner());
        Ok(log.shapes.clone())
    }

    /// The resolved config as a TOML table (for the run's `recipe.toml`).
    pub fn to_table(&self) -> toml::Table {
        match toml::Value::try_from(self).expect("configs serialize") {
            toml::Value::Table(t) => t,
            _ => unreachable!("a config is a table"),
        }
    }
}

/// A candle error as its message alone: under `RUST_BACKTRACE` candle attaches a backtrace,
/// which would bury the message of an error shown to a user.
pub(crate) fn without_backtrace(e: candle_core::Error) -> anyhow::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => anyhow::anyhow!("{inner}"),
        e => anyhow::anyhow!("{e}"),
    }
}

/// The most a model may hold: parameters plus computed tables, in values, and parameter
/// tensors (see [`ModelConfig::parameter_shapes`]).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub elements: usize,
    pub tensors: usize,
}

struct ShapeLog {
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
    elements: usize,
    budget: Budget,
}

/// A VarBuilder backend that records each parameter's shape and hands out a broadcast scalar
/// in its place (no storage of the parameter's size).
struct ShapeRecorder(std::sync::Arc<std::sync::Mutex<ShapeLog>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match log.shapes.get(name) {
            Some(d) if d.as_slice() == s.dims() => {}
            Some(d) => candle_core::bail!(
                "parameter {name} requested with shape {s:?} but exists as {d:?}"
            ),
            None => {
                let n = s.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                let total = n.and_then(|n| n.checked_add(log.elements));
                match total {
                    Some(t)
                        if t <= log.budget.elements && log.shapes.len() < log.budget.tensors =>
                    {
                        log.elements = t;
                    }
                    _ => {
                        return Err(candle_core::Error::Msg(format!(
                            "the model needs more than {} values in {} tensors (stopped at \
                             {name}, shape {:?})",
                            log.budget.elements,
                            log.budget.tensors,
                            s.dims()
                        )))
                    }
                }
                log.shapes.insert(name.to_string(), s.dims().to_vec());
            }
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &candle_core::Device) -> Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.shapes.contains_key(name)
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
pub(crate) mod testing;
#[cfg(test)]
mod tests;
