//! Decoder-only language models (GPT, Llama): the [`Decoder`] interface for incremental
//! generation with a KV cache, and [`CausalLm`], the shape both models share (embeddings, causal
//! blocks, a norm and a head), which gives them their training forward and their decoding.

use crate::layers::{lm_head, run_blocks, Block};
use crate::Model;
use candle_core::{DType, Result, Tensor};

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

/// The causal blocks of a decoder-only transformer and how they run.
pub(crate) struct DecoderStack {
    pub blocks: Vec<Block>,
    /// The config key that sets the longest context (for errors), and its value.
    pub context: (&'static str, usize),
    /// Whether each block's activations are recomputed in the backward.
    pub checkpoint: bool,
}

/// A decoder-only transformer: embeddings, a [`DecoderStack`], a final norm and a head.
/// Implementing it makes a model a [`Model`] and a [`Decoder`].
pub(crate) trait CausalLm: Send + Sync {
    fn stack(&self) -> &DecoderStack;

    /// Embeddings of `ids` (B, T) at positions `start`…, with dropout when `train`.
    fn embed(&self, ids: &Tensor, start: usize, train: bool) -> Result<Tensor>;

    /// The final norm of the hidden states, the head's weight (vocab, C) and the dtype its
    /// matmul runs in.
    fn head(&self, x: &Tensor) -> Result<(Tensor, &Tensor, DType)>;

    /// The final norm and the head: hidden states → logits.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (x, weight, compute) = self.head(x)?;
        lm_head(&x, weight, compute)
    }

    /// Token ids (B, T) → the last blocks' hidden states (B, T, C).
    fn hidden(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let stack = self.stack();
        let (key, context) = stack.context;
        if t > context {
            candle_core::bail!("sequence of {t} tokens is longer than {key} {context}");
        }
        let x = self.embed(ids, 0, train)?;
        run_blocks(&stack.blocks, x, None, train, stack.checkpoint)
    }
}

impl<M: CausalLm> Model for M {
    /// Token ids (B, T) → logits (B, T, vocab).
    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.logits(&self.hidden(ids, train)?)
    }

    /// The head fused into the loss ([`kiln_kernels::linear_cross_entropy`]).
    fn loss(&self, ids: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        let (x, weight, compute) = self.head(&self.hidden(ids, train)?)?;
        let c = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), c))?;
        kiln_kernels::linear_cross_entropy(&x, weight, &targets.flatten_all()?, compute)
    }

    fn as_decoder(&self) -> Option<&dyn Decoder> {
        Some(self)
    }
}

impl<M: CausalLm> Decoder for M {
    fn context(&self) -> usize {
        self.stack().context.1
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.stack().blocks.len())
    }

    /// The cache is extended only if every block's step succeeds.
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let blocks = &self.stack().blocks;
        let t = cache.check_step(ids, blocks.len(), self.context())?;
        let mut x = self.embed(ids, cache.len(), false)?;
        let mut layers = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.iter().enumerate() {
            let (y, kv) = block.forward_cached(&x, cache, i)?;
            x = y;
            layers.push(kv);
        }
        let logits = self.logits(&x)?;
        cache.commit(layers, t);
        Ok(logits)
    }
}
