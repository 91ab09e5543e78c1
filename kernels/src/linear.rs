//! A projection y = x·W (+ b) as one node of the graph, its product in a `compute` dtype
//! (mixed precision) and its result in x's.
//!
//! Composed from candle's ops a projection is a matmul and a broadcast add, plus a cast of each
//! operand under mixed precision: up to five nodes, each holding its inputs until the backward
//! is done. The product stays alive only because the add's node holds it, and x's bf16 copy
//! only because the matmul's does; neither backward reads them. candle's backward also gives
//! every input a zero-filled gradient plus an add, and computes both operands' gradients of a
//! matmul even when one is a constant (a frozen weight under LoRA). Here the forward runs on
//! the backend's own matmul, cast and add inside one custom op on (x, W, b), which keeps x, W,
//! b and y; its backward computes dx = dy·Wᵀ, dW = xᵀ·dy and db = Σ dy, each only for an
//! input that needs it, casting x again rather than keeping it twice.

use crate::gemm::{all_threads, matmul, mm, view};
use crate::profile::{timed, Pass};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// How a weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `nn.Linear`: (out, in), so the product takes Wᵀ.
    OutIn,
    /// GPT-2's `Conv1D`: (in, out).
    InOut,
}

/// x (…, in) through `weight` (stored as `layout` says) plus `bias` (out,), the product in
/// `compute`, the result (…, out) in x's dtype. The leading dimensions are taken as one, inside
/// the op: a reshape around it would be two more graph nodes, each with a zero-filled gradient
/// and an add in candle's backward.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
    compute: DType,
) -> Result<Tensor> {
    let Some(&k) = x.dims().last() else {
        candle_core::bail!("linear: x is a scalar; it needs a feature dimension")
    };
    let (out, w_in) = match (layout, weight.dims2()?) {
        (WeightLayout::OutIn, (o, i)) | (WeightLayout::InOut, (i, o)) => (o, i),
    };
    if w_in != k {
        candle_core::bail!("linear: x has {k} features, the weight takes {w_in} ({layout:?})")
    }
    if let Some(b) = bias {
        if b.dims() != [out] {
            candle_core::bail!("linear: bias of shape {:?} for {out} outputs", b.dims())
        }
    }
    let op = Linear { layout, compute };
    let x = x.contiguous()?;
    match bias {
        None => x.apply_op2(weight, op),
        Some(b) => x.apply_op3(weight, b, op),
    }
}

#[derive(Clone, Copy)]
struct Linear {
    layout: WeightLayout,
    compute: DType,
}

const NAME: &str = "kiln-linear";

impl Linear {
    /// The forward on any backend.
    fn forward<S: BackendStorage>(
        self,
        (x, xl): (&S, &Layout),
        (w, wl): (&S, &Layout),
        bias: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let (xl, out_shape) = (flat(xl)?, out_shape(xl, wl, self.layout)?);
        let (m, k) = xl.shape().dims2()?;
        // W as the (in, out) right operand.
        let wl = match self.layout {
            WeightLayout::OutIn => wl.transpose(0, 1)?,
            WeightLayout::InOut => wl.clone(),
        };
        let n = wl.shape().dims2()?.1;
        let compute = self.compute;
        let (xk, wk) = (cast(x, &xl, compute)?, cast(w, &wl, compute)?);
        let (xs, xl) = match &xk {
            Some(s) => (s, Layout::contiguous(xl.shape())),
            None => (x, xl.clone()),
        };
        let (ws, wl) = match &wk {
            Some(s) => (s, Layout::contiguous(wl.shape())),
            None => (w, wl),
        };
        let mut y = xs.matmul(ws, (1, m, n, k), &xl, &wl)?;
        let yl = Layout::contiguous((m, n));
        if y.dtype() != x.dtype() {
            y = y.to_dtype(&yl, x.dtype())?;
        }
        if let Some((b, bl)) = bias {
            let bk = cast(b, bl, y.dtype())?;
            let (b, bl) = match &bk {
                Some(s) => (s, Layout::contiguous(bl.shape())),
                None => (b, bl.clone()),
            };
            y = y.binary_impl::<candle_core::op::Add>(b, &yl, &bl.broadcast_as((m, n))?)?;
        }
        Ok((y, out_shape))
    }

    /// The f32 CPU forward on the BLAS, when one is active ([`crate::blas`]) and no cast is
    /// needed; `None` otherwise (the backend's matmul then runs it).
    fn blas_forward(
        self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Option<(CpuStorage, Shape)>> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            return Ok(None);
        };
        if crate::blas::active().is_none() || self.compute != DType::F32 {
            return Ok(None);
        }
        let out_shape = out_shape(xl, wl, self.layout)?;
        let xl = &flat(xl)?;
        let (m, k) = xl.shape().dims2()?;
        let (rows, cols) = wl.shape().dims2()?;
        let n = if self.layout == WeightLayout::OutIn {
            rows
        } else {
            cols
        };
        let b = match bias {
            None => None,
            Some((CpuStorage::F32(b), bl)) => match bl.contiguous_offsets() {
                Some((start, end)) => Some(&b[start..end]),
                None => return Ok(None),
            },
            Some(_) => return Ok(None),
        };
        let (Some(xm), Some(wm)) = (view(x, xl, m, k), view(w, wl, rows, cols)) else {
            return Ok(None);
        };
        let wm = if self.layout == WeightLayout::OutIn {
            wm.t()
        } else {
            wm
        };
        let mut y = vec![0f32; m * n];
        matmul(&mut y, false, xm, wm, all_threads());
        if let Some(b) = b {
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(Some((CpuStorage::F32(y), out_shape)))
    }

    /// dx, dW and db for the inputs that track a gradient.
    fn backward(
        self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        timed(NAME, Pass::Backward, || {
            let k = self.compute;
            // The products on (rows, features) views: x and dy are contiguous.
            let n_in = x.dim(candle_core::D::Minus1)?;
            let x_ = x.detach().reshape(((), n_in))?;
            let (w_, dy) = (w.detach(), dy.detach());
            let dy = dy.reshape(((), dy.dim(candle_core::D::Minus1)?))?;
            let dyk = dy.to_dtype(k)?;
            let dx = x
                .track_op()
                .then(|| {
                    let w = w_.to_dtype(k)?;
                    let w = match self.layout {
                        WeightLayout::OutIn => w,
                        WeightLayout::InOut => w.t()?,
                    };
                    mm(&dyk, &w)?.to_dtype(x.dtype())?.reshape(x.shape())
                })
                .transpose()?;
            let dw = w
                .track_op()
                .then(|| {
                    let xk = x_.to_dtype(k)?;
                    match self.layout {
                        WeightLayout::OutIn => mm(&dyk.t()?, &xk),
                        WeightLayout::InOut => mm(&xk.t()?, &dyk),
                    }?
                    .to_dtype(w.dtype())
                })
                .transpose()?;
            // Σ over rows as a (1, N)·dy product: candle's `sum(0)` walks the rows with a
            // strided index and took 2.6 ms on a (2048, 384) gradient, the product 0.1 ms.
            let db = b
                .filter(|b| b.track_op())
                .map(|b| {
                    let ones = Tensor::ones((1, dy.dim(0)?), dy.dtype(), dy.device())?;
                    mm(&ones, &dy)?.squeeze(0)?.to_dtype(b.dtype())
                })
                .transpose()?;
            Ok([dx, dw, db])
        })
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(NAME, Pass::Forward, || {
            match self.blas_forward((x, xl), (w, wl), None)? {
                Some(y) => Ok(y),
                None => self.forward((x, xl), (w, wl), None),
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((x, xl), (w, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(NAME, Pass::Forward, || {
            match self.blas_forward((x, xl), (w, wl), Some((b, bl)))? {
                Some(y) => Ok(y),
                None => self.forward((x, xl), (w, wl), Some((b, bl))),
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((x, xl), (w, wl), Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.backward(x, w, Some(b), dy)?;
        Ok((dx, dw, db))
    }
}

/// A contiguous (…, in) layout as (rows, in).
fn flat(l: &Layout) -> Result<Layout> {
    let dims = l.dims();
    let k = dims.last().copied().unwrap_or(1);
    if !l.is_contiguous() || k == 0 {
        candle_core::bail!(
            "linear: x must be contiguous with features, got {:?}",
            l.shape()
        )
    }
    Ok(Layout::contiguous_with_offset(
        (l.shape().elem_count() / k, k),
        l.start_offset(),
    ))
}

/// x's dimensions with the features replaced by the weight's outputs.
fn out_shape(xl: &Layout, wl: &Layout, layout: WeightLayout) -> Result<Shape> {
    let (rows, cols) = wl.shape().dims2()?;
    let n = match layout {
        WeightLayout::OutIn => rows,
        WeightLayout::InOut => cols,
    };
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Shape::from(dims))
}

/// `s` in `dtype` (contiguous), or `None` when it already is.
fn cast<S: BackendStorage>(s: &S, l: &Layout, dtype: DType) -> Result<Option<S>> {
    if s.dtype() == dtype {
        return Ok(None);
    }
    s.to_dtype(l, dtype).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, rand, tolerance};
    use candle_core::Var;

    /// The composition: casts, matmul and broadcast add in candle's graph.
    fn composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>, l: WeightLayout, k: DType) -> Tensor {
        let w = match l {
            WeightLayout::OutIn => w.t().unwrap(),
            WeightLayout::InOut => w.clone(),
        };
        let y = (x.to_dtype(k).unwrap())
            .matmul(&w.to_dtype(k).unwrap())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    #[test]
    fn values_and_gradients_match_the_composition() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for compute in [DType::F64, DType::F32, DType::BF16] {
                for with_bias in [true, false] {
                    let x = Var::from_tensor(&rand(&[7, 5], 1)).unwrap();
                    let shape = match layout {
                        WeightLayout::OutIn => [3, 5],
                        WeightLayout::InOut => [5, 3],
                    };
                    let w = Var::from_tensor(&rand(&shape, 2)).unwrap();
                    let b = Var::from_tensor(&rand(&[3], 3)).unwrap();
                    let up = rand(&[7, 3], 4);
                    let b_in = with_bias.then(|| b.as_tensor());
                    let (xt, wt) = (x.as_tensor(), w.as_tensor());
                    let fused = linear(xt, wt, b_in, layout, compute).unwrap();
                    let plain = composed(xt, wt, b_in, layout, compute);
                    let what = format!("{layout:?} {compute:?} bias {with_bias}");
                    let tol = tolerance(compute);
                    assert!(max_abs_diff(&fused, &plain) <= tol, "{what}: values");
                    let grads = |y: Tensor| (y * &up).unwrap().sum_all().unwrap().backward();
                    let (gf, gp) = (grads(fused).unwrap(), grads(plain).unwrap());
                    let mut vars = vec![&x, &w];
                    if with_bias {
                        vars.push(&b);
                    }
                    for v in vars {
                        let (a, e) = (gf.get(v.as_tensor()), gp.get(v.as_tensor()));
                        let err = max_abs_diff(a.unwrap(), e.unwrap());
                        assert!(err <= tol, "{what}: gradient off by {err}");
                    }
                    if !with_bias {
                        assert!(gf.get(b.as_tensor()).is_none());
                    }
                }
            }
        }
    }

    #[test]
    fn a_constant_weight_gets_no_gradient_and_constant_inputs_make_no_graph() {
        let x = Var::from_tensor(&rand(&[4, 5], 5)).unwrap();
        let w = rand(&[3, 5], 6);
        let y = linear(x.as_tensor(), &w, None, WeightLayout::OutIn, DType::F64).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&w).is_none());
        let y = linear(
            &x.as_tensor().detach(),
            &w,
            None,
            WeightLayout::OutIn,
            DType::F64,
        );
        assert!(!y.unwrap().track_op());
        let err = linear(x.as_tensor(), &w, None, WeightLayout::InOut, DType::F64).unwrap_err();
        assert!(err.to_string().contains("x has 5 features"), "{err}");
    }

    /// Leading dimensions are one row dimension: the same values and gradients as the
    /// projection of the (rows, in) reshape, and the output keeps x's leading dimensions.
    #[test]
    fn leading_dimensions_are_rows() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let x = Var::from_tensor(&rand(&[2, 3, 5], 7)).unwrap();
            let shape = match layout {
                WeightLayout::OutIn => [4, 5],
                WeightLayout::InOut => [5, 4],
            };
            let (w, b) = (rand(&shape, 8), rand(&[4], 9));
            let w = Var::from_tensor(&w).unwrap();
            let up = rand(&[2, 3, 4], 10);
            let (xt, wt) = (x.as_tensor(), w.as_tensor());
            let y = linear(xt, wt, Some(&b), layout, DType::F64).unwrap();
            assert_eq!(y.dims(), [2, 3, 4]);
            let flat = linear(
                &xt.reshape((6, 5)).unwrap(),
                wt,
                Some(&b),
                layout,
                DType::F64,
            )
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
            assert_eq!(max_abs_diff(&y, &flat), 0.0);
            let grads = |y: Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (g, gf) = (grads(y), grads(flat));
            for v in [xt, wt] {
                let (a, e) = (g.get(v).unwrap(), gf.get(v).unwrap());
                assert_eq!(a.dims(), v.dims());
                assert_eq!(max_abs_diff(a, e), 0.0, "{layout:?}");
            }
        }
    }
}
