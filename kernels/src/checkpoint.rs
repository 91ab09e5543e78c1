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

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::cell::RefCell;
use std::sync::Arc;

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
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        PARKED.with(|p| {
            let mut p = p.borrow_mut();
            for param in &params {
                if let Some(g) = grads.get(param) {
                    p.push((param.clone(), g.clone()));
                }
            }
        });
        Ok(grads.get(x.as_tensor()).cloned())
    })
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

    #[test]
    fn gradients_are_identical_with_and_without_checkpointing() {
        let w = Var::from_tensor(&rand(&[6, 6], 1)).unwrap();
        let b = Var::from_tensor(&rand(&[6], 2)).unwrap();
        let x0 = Var::from_tensor(&rand(&[4, 6], 3)).unwrap();
        let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
        let block: Block = Arc::new(move |x: &Tensor| {
            crate::gelu(&crate::layer_norm(&x.matmul(&wt)?, &bt, None, 1e-5)?)
        });
        let run = |ckpt: bool| {
            let mut x = x0.as_tensor().clone();
            for _ in 0..2 {
                x = if ckpt {
                    let params = vec![w.as_tensor().clone(), b.as_tensor().clone()];
                    checkpoint(&x, params, block.clone()).unwrap()
                } else {
                    block(&x).unwrap()
                };
            }
            let loss = x.sqr().unwrap().sum_all().unwrap();
            let g = backward(&loss).unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (x, get(&w), get(&b), get(&x0))
        };
        let (a, b_) = (run(false), run(true));
        assert_eq!(max_abs_diff(&a.0, &b_.0), 0.0);
        assert_eq!(max_abs_diff(&a.1, &b_.1), 0.0);
        assert_eq!(max_abs_diff(&a.2, &b_.2), 0.0);
        assert_eq!(max_abs_diff(&a.3, &b_.3), 0.0);
    }
}
