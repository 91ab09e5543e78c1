//! x · w for a frozen (constant) `w`: the backward computes x's gradient only.
//!
//! candle's matmul backward always computes both operands' gradients, even for a tensor that is
//! not a variable, so a frozen pretrained weight (LoRA) would cost a full `xᵀ · grad` matmul
//! per layer per step that is then thrown away: a third of the linear layers' training FLOPs.
//! Here the product runs outside the graph and enters it through a custom op on `x` alone,
//! whose `bwd` is `grad · wᵀ`.

use candle_core::{DType, Result, Tensor};

/// `x · w` (x (N, in), w (in, out)) with both operands in `compute` and the result in x's
/// dtype (mixed precision); `w` receives no gradient whatever it is.
pub fn frozen_matmul(x: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    let w = w.detach();
    let y = mm(&x.detach(), &w, compute)?;
    if !x.track_op() {
        return Ok(y);
    }
    let wt = w.t()?;
    crate::precomputed(x, &y, "kiln-frozen-matmul", move |_x, dy| {
        Ok(Some(mm(&dy.detach(), &wt, compute)?))
    })
}

/// `x · w` in `compute`, returned in x's dtype.
fn mm(x: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    if compute == x.dtype() && compute == w.dtype() {
        return x.matmul(w);
    }
    x.to_dtype(compute)?
        .matmul(&w.to_dtype(compute)?)?
        .to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, rand, tolerance};
    use candle_core::Var;

    #[test]
    fn same_values_and_input_gradient_as_matmul_and_no_weight_gradient() {
        for compute in [DType::F64, DType::F32, DType::BF16] {
            let x = Var::from_tensor(&rand(&[5, 4], 1)).unwrap();
            let w = Var::from_tensor(&rand(&[4, 3], 2)).unwrap();
            let up = rand(&[5, 3], 3);
            let plain = mm(x.as_tensor(), w.as_tensor(), compute).unwrap();
            let frozen = frozen_matmul(x.as_tensor(), w.as_tensor(), compute).unwrap();
            assert_eq!(frozen.dtype(), DType::F64);
            assert_eq!(max_abs_diff(&plain, &frozen), 0.0);
            let g_plain = (plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_frozen = (frozen * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = g_frozen.get(x.as_tensor()).expect("x gets its gradient");
            // The same products; the gemm may sum a transposed operand in another order.
            let e = max_abs_diff(g_plain.get(x.as_tensor()).unwrap(), dx);
            assert!(e <= tolerance(compute), "{compute:?}: dx differs by {e}");
            assert!(g_plain.get(w.as_tensor()).is_some());
            assert!(
                g_frozen.get(w.as_tensor()).is_none(),
                "the frozen weight got a gradient"
            );
        }
    }

    #[test]
    fn an_untracked_input_gives_a_plain_tensor() {
        let x = rand(&[2, 4], 1);
        let w = Var::from_tensor(&rand(&[4, 3], 2)).unwrap();
        let y = frozen_matmul(&x, w.as_tensor(), DType::F64).unwrap();
        assert!(!y.track_op());
        assert_eq!(max_abs_diff(&y, &x.matmul(w.as_tensor()).unwrap()), 0.0);
    }
}
