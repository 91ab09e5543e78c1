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
pub mod blas;
pub mod checkpoint;
pub mod compare;
pub mod conv2d;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gelu_erf;
mod gemm;
pub mod layer_norm;
pub mod linear;
pub mod linear_cross_entropy;
pub mod max_pool;
mod op;
pub mod profile;
pub mod reference;
pub mod relu;
pub mod rms_norm;
pub mod softmax;
mod vexp;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

pub use adamw::{adamw_step, AdamWHyper, AdamWTensor};
pub use attention::{
    bidirectional_attention, causal_attention_packed, causal_self_attention,
    causal_self_attention_dropout,
};
pub use checkpoint::{backward, checkpoint, segment};
pub use conv2d::{conv2d, conv2d_strided};
pub use cross_entropy::{cross_entropy, IGNORE_INDEX};
pub use dropout::dropout;
pub use embedding::embedding;
pub use gelu::{bias_gelu, gelu};
pub use gelu_erf::gelu_erf;
pub use layer_norm::layer_norm;
pub use linear::{linear, WeightLayout};
pub use linear_cross_entropy::linear_cross_entropy;
pub use max_pool::{max_pool2d, max_pool2d_strided};
pub use relu::{add_relu, relu};
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
        + candle_core::WithDType
        + crate::vexp::Exp;
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

/// Evaluates `$body` with `$T` bound to the Rust type that `$dtype` maps to in the list
/// `[DTypeVariant => type, …]`; any other dtype, bound to `$other`, gives `$else`.
macro_rules! match_dtype {
    ($dtype:expr, [$($v:ident => $t:ty),*], |$T:ident| $body:expr, $other:ident => $else:expr) => {
        match $dtype {
            $(candle_core::DType::$v => {
                type $T = $t;
                $body
            })*
            $other => $else,
        }
    };
}
pub(crate) use match_dtype;

/// Calls `$body` with `$T` bound to the element type of a float `CpuStorage`.
macro_rules! with_float {
    ($storage:expr, $name:expr, |$T:ident| $body:expr) => {
        $crate::match_dtype!(
            candle_core::backend::BackendStorage::dtype($storage),
            [F32 => f32, F64 => f64, BF16 => half::bf16, F16 => half::f16],
            |$T| $body,
            other => candle_core::bail!("{}: unsupported dtype {other:?}", $name)
        )
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

/// [`slice`] of each of the first `N` CPU tensor arguments, all of element type `T`.
pub(crate) fn slices<'a, T: candle_core::WithDType, const N: usize>(
    args: &[(&'a CpuStorage, &Layout)],
) -> Result<[&'a [T]; N]> {
    if args.len() < N {
        candle_core::bail!("expected {N} arguments, got {}", args.len())
    }
    let mut out: [&'a [T]; N] = [&[]; N];
    for (o, &a) in out.iter_mut().zip(args) {
        *o = slice(a)?;
    }
    Ok(out)
}

/// The dtype of the stats (mean, rstd, lse) kept for a float dtype.
pub fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `y`, computed from `x` outside the graph (checkpointed blocks, backward segments), entered
/// into the graph as the output of the custom op `name` on `x`, whose backward is `bwd(x, dy)`.
pub(crate) fn precomputed<B>(x: &Tensor, y: &Tensor, name: &'static str, bwd: B) -> Result<Tensor>
where
    B: Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
{
    // Its own storage, starting at 0, so the op can hand over a plain clone.
    let y = y.contiguous()?.copy()?.detach();
    x.apply_op1(Precomputed {
        name,
        y: std::sync::Mutex::new(Some(y)),
        bwd,
    })
}

/// The op of [`precomputed`].
struct Precomputed<B> {
    name: &'static str,
    /// The output until the forward hands it over (the graph then holds the only copy).
    y: std::sync::Mutex<Option<Tensor>>,
    bwd: B,
}

impl<B> Precomputed<B> {
    fn output(&self) -> Result<Tensor> {
        (locked(&self.y).take())
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward run twice", self.name)))
    }
}

impl<B> candle_core::CustomOp1 for Precomputed<B>
where
    B: Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    /// Hands the precomputed output to the graph.
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        hand_over::cpu(&self.output()?, self.name)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        hand_over::cuda(&self.output()?, self.name)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(x, dy)
    }
}

/// A tensor computed outside the graph, handed to a custom op's forward as its output: a copy
/// of its storage (an op returns fresh storage), which must be its own from offset 0
/// (`contiguous()?.copy()?` makes it so; a fresh op output is).
mod hand_over {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, Result, Shape, Storage, Tensor};

    pub fn cpu(t: &Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: output on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda(t: &Tensor, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: output on another device"),
        }
    }
}

/// `m` locked. A lock is only poisoned by a panic while it was held, and the values kept here
/// (tensors handed from a forward to its backward) are whole either way, so it is taken as is.
pub(crate) fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        *locked(&self.0) = outs.map(|(s, sh)| detached(s.into_storage(), sh)).collect();
        Ok(first)
    }

    pub fn get(&self) -> Vec<Tensor> {
        locked(&self.0).clone()
    }

    /// The kept tensors, leaving none: for a backward that reuses them in place.
    pub fn take(&self) -> Vec<Tensor> {
        std::mem::take(&mut *locked(&self.0))
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

/// Σ f(x_i) with eight independent accumulators (a fixed order, so the compiler vectorizes it
/// and the result does not depend on scheduling).
#[inline]
pub(crate) fn sum_by<T: Copy, A: num_traits::Float>(x: &[T], f: impl Fn(T) -> A) -> A {
    sum_pairs_by(x, x, |v, _| (f(v), A::zero())).0
}

/// (Σ f(a_i, b_i).0, Σ f(a_i, b_i).1), eight accumulators each, as [`sum_by`].
#[inline]
pub(crate) fn sum_pairs_by<T: Copy, U: Copy, A: num_traits::Float>(
    a: &[T],
    b: &[U],
    f: impl Fn(T, U) -> (A, A),
) -> (A, A) {
    let mut acc = [(A::zero(), A::zero()); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let (u, v) = f(x[i], y[i]);
            acc[i] = (acc[i].0 + u, acc[i].1 + v);
        }
    }
    let mut s = (A::zero(), A::zero());
    for (&x, &y) in ra.iter().zip(rb) {
        let (u, v) = f(x, y);
        s = (s.0 + u, s.1 + v);
    }
    acc.iter().fold(s, |s, v| (s.0 + v.0, s.1 + v.1))
}

/// y += a·x
#[inline]
pub(crate) fn axpy<A: num_traits::Float>(y: &mut [A], a: A, x: &[A]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}
#[cfg(test)]
pub(crate) mod testing;
