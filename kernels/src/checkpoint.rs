//! Activation checkpointing: a block's forward runs without keeping its graph, and the backward
//! runs it again to get the activations it needs. Memory for a block's activations drops to its
//! input and output, for the price of a second forward.
//!
//! The block runs once outside the graph; its output enters the graph through a custom op on
//! the input whose `bwd` recomputes the block on a fresh copy of the input, back-propagates the
//! incoming gradient through it, returns the input's gradient to candle, and parks the
//! parameters' gradients in a thread-local store (candle's backward runs `bwd` on the calling
//! thread). [`backward`] runs candle's backward and adds the parked gradients, so it is what the
//! trainer calls; with plain `loss.backward()` the block's parameters get no gradient, which
//! the trainer's gradient check reports.
//!
//! The recompute must see the same randomness as the forward (dropout): the caller's closure
//! handles that (see the GPT model, which rewinds its dropout generator).
//!
//! A backward [`segment`] is the same wiring without the recompute: the block runs once with
//! its graph, which its op owns until the backward has gone through it and then drops. candle's
//! backward keeps every node of a graph alive until it returns, so a model's activations would
//! otherwise all live until its last gradient is computed, on top of the gradients; segmented by
//! block, each block's activations are freed as soon as its gradient is through (PyTorch frees
//! them node by node).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
#[cfg(feature = "cuda")]
use candle_core::{CudaStorage, DType};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

thread_local! {
    static PARKED: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x)`, with `f`'s activations recomputed during the backward instead of stored. `params`
/// are the variables `f` reads, whose gradients [`backward`] adds.
pub fn checkpoint(x: &Tensor, params: Vec<Tensor>, f: Block) -> Result<Tensor> {
    let y = f(&x.detach())?;
    crate::precomputed(x, &y, "kiln-checkpoint", move |x, dy| {
        let x = Var::from_tensor(&x.detach())?;
        let y = f(x.as_tensor())?;
        through(&y, dy, x.as_tensor(), &params)
    })
}

/// `f(x)` as a backward segment of its own (see the module docs): the same values and
/// gradients as `f(x)`, with `f`'s activations freed once the backward is through them.
/// `params` are the variables `f` reads, whose gradients [`backward`] adds; `f` must take
/// nothing else from the graph but `x`.
pub fn segment(
    x: &Tensor,
    params: Vec<Tensor>,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if !x.track_op() {
        // Nothing before the block needs a gradient: its graph is the whole graph anyway.
        return f(x);
    }
    let input = Var::from_tensor(&x.detach())?;
    let y = f(input.as_tensor())?;
    let graph = Mutex::new(Some(y.clone()));
    crate::precomputed(x, &y, "kiln-segment", move |_x, dy| {
        let y = (crate::locked(&graph).take()).ok_or_else(|| {
            candle_core::Error::Msg("kiln-segment: a second backward through one forward".into())
        })?;
        through(&y, dy, input.as_tensor(), &params)
        // `y`, and with it the segment's graph, is dropped here.
    })
}

/// Back-propagates `dy` through `y`'s graph: parks the gradients of `params` and returns that
/// of `x`, all detached. (candle's gradients are graph nodes themselves whenever an activation
/// entered their op, e.g. a weight's gradient xᵀ·dy: kept as they are, they would keep the
/// whole graph they came from alive.)
fn through(y: &Tensor, dy: &Tensor, x: &Tensor, params: &[Tensor]) -> Result<Option<Tensor>> {
    let grads = y.apply_op1(Seed(dy.detach()))?.backward()?;
    PARKED.with(|p| {
        let mut p = p.borrow_mut();
        for param in params {
            if let Some(g) = grads.get(param) {
                p.push((param.clone(), g.detach()));
            }
        }
    });
    Ok(grads.get(x).map(Tensor::detach))
}

/// A scalar (0) whose backward gives its input the gradient `dy`: the root from which candle's
/// backward starts a segment with a given output gradient, instead of from Σ y·dy, which costs
/// two ops and two tensors of y's size.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "kiln-segment-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((
            s.device().zeros_impl(&Shape::from(()), DType::F32)?,
            Shape::from(()),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// `loss.backward()`, plus the parameter gradients of checkpointed blocks.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    PARKED.with(|p| p.borrow_mut().clear());
    let mut grads = loss.backward()?;
    for (param, g) in PARKED.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        let sum = match grads.get(&param) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&param, sum);
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, rand};

    /// How a block joins the graph in the tests.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Plain,
        Checkpoint,
        Segment,
    }

    #[test]
    fn gradients_are_identical_with_checkpoints_and_segments() {
        let w = Var::from_tensor(&rand(&[6, 6], 1)).unwrap();
        let b = Var::from_tensor(&rand(&[6], 2)).unwrap();
        let x0 = Var::from_tensor(&rand(&[4, 6], 3)).unwrap();
        let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
        let block: Block = Arc::new(move |x: &Tensor| {
            crate::gelu(&crate::layer_norm(&x.matmul(&wt)?, &bt, None, 1e-5)?)
        });
        let run = |mode: Mode| {
            let mut x = x0.as_tensor().clone();
            for _ in 0..2 {
                let params = vec![w.as_tensor().clone(), b.as_tensor().clone()];
                x = match mode {
                    Mode::Plain => block(&x).unwrap(),
                    Mode::Checkpoint => checkpoint(&x, params, block.clone()).unwrap(),
                    Mode::Segment => segment(&x, params, |x| block(x)).unwrap(),
                };
            }
            let loss = x.sqr().unwrap().sum_all().unwrap();
            let g = backward(&loss).unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (x, get(&w), get(&b), get(&x0))
        };
        let plain = run(Mode::Plain);
        for mode in [Mode::Checkpoint, Mode::Segment] {
            let other = run(mode);
            assert_eq!(max_abs_diff(&plain.0, &other.0), 0.0);
            assert_eq!(max_abs_diff(&plain.1, &other.1), 0.0);
            assert_eq!(max_abs_diff(&plain.2, &other.2), 0.0);
            assert_eq!(max_abs_diff(&plain.3, &other.3), 0.0);
        }
    }

    /// The identity, holding an `Arc` clone: alive exactly as long as the graph node it is in.
    struct Marked {
        _alive: Arc<()>,
    }

    impl CustomOp1 for Marked {
        fn name(&self) -> &'static str {
            "marked"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            Ok((s.try_clone(l)?, l.shape().clone()))
        }
        fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(dy.clone()))
        }
    }

    #[test]
    fn a_segments_graph_is_freed_by_its_backward_and_cannot_run_twice() {
        let x = Var::from_tensor(&rand(&[3, 4], 4)).unwrap();
        let marker = Arc::new(());
        let m = marker.clone();
        let y = segment(x.as_tensor(), vec![], move |x| {
            (x.apply_op1(Marked { _alive: m })? * 2.0)?.exp()
        })
        .unwrap();
        let loss = y.sum_all().unwrap();
        // The segment's graph (and the marked node in it) is alive until the backward…
        assert_eq!(Arc::strong_count(&marker), 2);
        let g = backward(&loss).unwrap();
        // …which frees it while the outer graph (`loss`) still lives.
        assert_eq!(Arc::strong_count(&marker), 1);
        let want = ((x.as_tensor() * 2.0).unwrap().exp().unwrap() * 2.0).unwrap();
        let got = g.get(x.as_tensor()).unwrap();
        assert!(max_abs_diff(got, &want) < 1e-6);
        let Err(again) = backward(&loss) else {
            panic!("a second backward must fail")
        };
        assert!(again.to_string().contains("second backward"), "{again}");
    }
}
