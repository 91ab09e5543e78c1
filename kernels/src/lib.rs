//! kiln-kernels: the ops kiln trains with, each with a forward and a backward on the CPU and on
//! CUDA (README.md is the contract both follow).
//!
//! candle-nn's fused norm/softmax/attention ops are applied without a backward, so gradients
//! silently stop at them (see DEVELOPERS.md). Each op here is a candle custom op whose `bwd`
//! runs a backward kernel; `reference` holds the same ops as plain candle compositions, which
//! the tests and benches compare against.

pub mod adamw;
pub mod attention;
pub mod batch_norm;
pub mod checkpoint;
pub mod conv2d;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod frozen;
pub mod gelu;
pub mod layer_norm;
pub mod max_pool;
mod op;
pub mod reference;
pub mod rms_norm;
pub mod softmax;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

pub use adamw::{adamw_step, AdamWHyper, AdamWTensor};
pub use attention::causal_self_attention;
pub use checkpoint::{backward, checkpoint};
pub use conv2d::{conv2d, conv2d_strided};
pub use cross_entropy::{cross_entropy, IGNORE_INDEX};
pub use dropout::dropout;
pub use embedding::embedding;
pub use frozen::frozen_matmul;
pub use gelu::{bias_gelu, gelu};
pub use layer_norm::layer_norm;
pub use max_pool::{max_pool2d, max_pool2d_strided};
pub use rms_norm::rms_norm;
pub use softmax::softmax;

pub(crate) use op::{Kernel, Op};

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// The float types the CPU kernels take. Arithmetic happens in `Acc`: f32 for the 16-bit types
/// and f32 itself, f64 for f64 (kept for the finite-difference gradient checks).
pub trait Elem: candle_core::WithDType + Copy + Send + Sync {
    type Acc: num_traits::Float
        + num_traits::FromPrimitive
        + std::iter::Sum
        + std::ops::AddAssign
        + Send
        + Sync
        + candle_core::WithDType;
    fn acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
}

macro_rules! elem {
    ($t:ty, $acc:ty, |$x:ident| $to:expr, |$a:ident| $from:expr) => {
        impl Elem for $t {
            type Acc = $acc;
            #[inline(always)]
            fn acc(self) -> $acc {
                let $x = self;
                $to
            }
            #[inline(always)]
            fn from_acc($a: $acc) -> Self {
                $from
            }
        }
    };
}
elem!(f32, f32, |x| x, |a| a);
elem!(f64, f64, |x| x, |a| a);
elem!(half::bf16, f32, |x| x.to_f32(), |a| half::bf16::from_f32(a));
elem!(half::f16, f32, |x| x.to_f32(), |a| half::f16::from_f32(a));

/// Calls `$body` with `$T` bound to the element type of a float `CpuStorage`.
macro_rules! with_float {
    ($storage:expr, $name:expr, |$T:ident| $body:expr) => {
        match candle_core::backend::BackendStorage::dtype($storage) {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?}", $name),
        }
    };
}
pub(crate) use with_float;

/// A vector of `n` zeros.
pub(crate) fn zeros<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    vec![T::from_f64(0.0); n]
}

/// The contiguous elements of a CPU tensor argument.
pub(crate) fn slice<'a, T: candle_core::WithDType>(
    (s, l): (&'a CpuStorage, &Layout),
) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("kiln kernels take contiguous tensors"),
    }
}

/// The dtype of the stats (mean, rstd, lse) kept for a float dtype.
pub fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A copy of `y`'s storage, the output of a custom op whose result was computed before the op
/// entered the graph (checkpointed blocks, frozen matmuls): an op must return fresh storage.
pub(crate) fn precomputed_cpu(y: &Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (storage, layout) = y.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("{op}: output on another device"),
    }
}

/// [`precomputed_cpu`] on a GPU.
#[cfg(feature = "cuda")]
pub(crate) fn precomputed_cuda(y: &Tensor, op: &str) -> Result<(CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (storage, layout) = y.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("{op}: output on another device"),
    }
}

/// A new tensor (outside any graph) over `storage`.
pub(crate) fn detached(storage: Storage, shape: Shape) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Tensors a forward kernel keeps for its backward (norm statistics, attention's log-sum-exp,
/// cross-entropy's dlogits). A custom op returns one tensor to autograd; the others wait here,
/// owned by the op in the graph, until `bwd` takes them.
#[derive(Default)]
pub(crate) struct Saved(std::sync::Mutex<Vec<Tensor>>);

impl Saved {
    /// Keeps every output but the first, which is returned.
    pub fn keep<S: IntoStorage>(&self, outs: Vec<(S, Shape)>) -> Result<(S, Shape)> {
        let mut outs = outs.into_iter();
        let first = outs
            .next()
            .ok_or_else(|| candle_core::Error::Msg("kernel returned no output".into()))?;
        *self.0.lock().unwrap() = outs.map(|(s, sh)| detached(s.into_storage(), sh)).collect();
        Ok(first)
    }

    pub fn get(&self) -> Vec<Tensor> {
        self.0.lock().unwrap().clone()
    }

    /// The kept tensors, leaving none: for a backward that reuses them in place.
    pub fn take(&self) -> Vec<Tensor> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A backend storage as candle's device-erased `Storage`.
pub(crate) trait IntoStorage {
    fn into_storage(self) -> Storage;
}
impl IntoStorage for CpuStorage {
    fn into_storage(self) -> Storage {
        Storage::Cpu(self)
    }
}
impl IntoStorage for CudaStorage {
    fn into_storage(self) -> Storage {
        Storage::Cuda(self)
    }
}

/// (rows, last dimension) of a tensor seen as a matrix over its last dimension.
pub(crate) fn rows_cols(shape: &Shape) -> Result<(usize, usize)> {
    let c = *shape
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg("expected at least one dimension".into()))?;
    Ok((shape.elem_count() / c.max(1), c))
}

/// A new CPU output from a vector.
pub(crate) fn out<T: candle_core::WithDType>(
    v: Vec<T>,
    shape: impl Into<Shape>,
) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(v), shape.into())
}

/// An f64 constant in the accumulation type.
#[inline(always)]
pub(crate) fn k<A: num_traits::FromPrimitive>(x: f64) -> A {
    A::from_f64(x).unwrap()
}

/// Dot product with eight independent accumulators, so the compiler vectorizes it.
#[inline]
pub(crate) fn dot<A: num_traits::Float>(a: &[A], b: &[A]) -> A {
    let mut acc = [A::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    let mut s = A::zero();
    for (x, y) in ra.iter().zip(rb) {
        s = s + *x * *y;
    }
    acc.iter().fold(s, |s, &v| s + v)
}

/// y += a·x
#[inline]
pub(crate) fn axpy<A: num_traits::Float>(y: &mut [A], a: A, x: &[A]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::{Rng, SeedableRng};

    /// A random f64 tensor with values in [-1, 1).
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks the autograd gradient of `sum(f(x) * probe)` w.r.t. `x` against central finite
    /// differences, in f64.
    pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        assert_eq!(x.dtype(), DType::F64);
        let var = Var::from_tensor(x).unwrap();
        let out = f(var.as_tensor()).unwrap();
        let probe = rand(out.dims(), 99);
        let loss = |t: &Tensor| -> f64 {
            (f(t).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f64> = grads
            .get(&var)
            .expect("x has a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-5;
        for i in 0..xs.len() {
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let tp = Tensor::from_vec(p, x.dims(), &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(m, x.dims(), &Device::Cpu).unwrap();
            let fd = (loss(&tp) - loss(&tm)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "gradient mismatch at {i}: autograd {} vs finite differences {fd}",
                g[i]
            );
        }
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// ‖a − b‖ / ‖b‖ in f64; infinite when `a` holds a NaN or an infinity.
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let f64s = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap()
        };
        let (a, b) = (f64s(a), f64s(b));
        if a.iter().any(|v| !v.is_finite()) {
            return f64::INFINITY;
        }
        let diff: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        diff / norm.max(1e-30)
    }

    /// The relative-error bound for an op's outputs and gradients in `dtype`.
    pub fn tolerance(dtype: DType) -> f64 {
        match dtype {
            DType::F64 => 1e-10,
            DType::F32 => 1e-5,
            _ => 1e-2,
        }
    }

    /// Checks a fused op against its reference composition: for each float dtype, the inputs
    /// (f64; non-float inputs such as ids pass through) are rounded to the dtype, the fused op
    /// runs in that dtype, the reference in f64 on the same rounded values, and the output and
    /// the gradients of the first `n_grads` inputs must agree within [`tolerance`].
    pub fn check_parity(
        inputs: &[Tensor],
        n_grads: usize,
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let cast = |t: &Tensor, d: DType| -> Tensor {
                if t.dtype().is_float() {
                    t.to_dtype(d).unwrap()
                } else {
                    t.clone()
                }
            };
            let rounded: Vec<Tensor> = inputs
                .iter()
                .map(|t| cast(&cast(t, dtype), DType::F64))
                .collect();
            // The gradient of sum(out · probe), with the probe rounded to `dtype` for both runs.
            let run = |ts: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
                let vars: Vec<Var> = ts[..n_grads]
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                args.extend(ts[n_grads..].iter().cloned());
                let out = f(&args).unwrap();
                let probe = cast(&cast(&rand(out.dims(), 77), dtype), out.dtype());
                let grads = (&out * probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
                (out, g)
            };
            let in_dtype: Vec<Tensor> = rounded.iter().map(|t| cast(t, dtype)).collect();
            let (got, got_g) = run(&in_dtype, &fused);
            let (want, want_g) = run(&rounded, &reference);
            let tol = tolerance(dtype);
            let e = rel_err(&got, &want);
            assert!(e <= tol, "{dtype:?} output: relative error {e:e} > {tol:e}");
            for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
                let e = rel_err(g, w);
                assert!(
                    e <= tol,
                    "{dtype:?} gradient of input {i}: relative error {e:e} > {tol:e}"
                );
            }
        }
    }
}
