//! The one launcher of the element-wise and row-wise kernels: an op's launch code lists its
//! kernel's arguments ([`Arg`]) and grid ([`Grid`]); [`Module::launch`] picks the kernel's
//! instantiation for the float type of the first [`Arg::X`] (`with_gpu_float!`,
//! `kernel_name::<T>`), views the inputs, allocates the outputs, launches on the device's stream
//! (when the grid has work) and returns the outputs in the order they are listed.

use super::{
    alloc, as_i32, cols_config, elementwise_config, f32_to_storage, rows_config, view,
    with_gpu_float, zeros_f32, ColPartials, GpuFloat,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

/// The kernels of one `cuda/<op>.cu`: its module name and its PTX (`ptx::<OP>`).
pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
}

/// A launch's grid, from the shape of its work; there is no launch when that is empty.
#[derive(Clone, Copy)]
pub(crate) enum Grid {
    /// `rows_config(rows, cols)`: a warp or a block per row.
    Rows(usize, usize),
    /// `elementwise_config(n)`: grid-stride over n elements.
    Elementwise(usize),
    /// `cols_config(rows, cols)`: column blocks walking down the rows, writing the
    /// [`Arg::ColSum`] partials.
    Cols(usize, usize),
}

impl Grid {
    fn config(self) -> LaunchConfig {
        match self {
            Grid::Rows(n, c) => rows_config(n, c),
            Grid::Elementwise(n) => elementwise_config(n),
            Grid::Cols(n, c) => cols_config(n, c),
        }
    }

    fn has_work(self) -> bool {
        match self {
            Grid::Rows(n, c) | Grid::Cols(n, c) => n * c > 0,
            Grid::Elementwise(n) => n > 0,
        }
    }
}

/// One kernel argument, in the kernel's order.
#[derive(Clone)]
pub(crate) enum Arg<'a> {
    /// An input of the launch's float type (the first one's dtype picks the instantiation).
    X((&'a CudaStorage, &'a Layout)),
    /// An f32 input (norm statistics).
    F32((&'a CudaStorage, &'a Layout)),
    /// A u32 input (ids).
    U32((&'a CudaStorage, &'a Layout)),
    /// A new output of this shape, in the launch's float type (uninitialized: the kernel writes
    /// all of it).
    Out(Shape),
    /// A new f32 output of this shape (uninitialized: the kernel writes all of it).
    OutF32(Shape),
    /// The column sums of a [`Grid::Cols`] launch: the kernel gets the `ColPartials` buffer,
    /// the output (shape [cols], the float type) is their fixed-order sum.
    ColSum,
    /// A zeroed f32 accumulator of this shape (the kernel adds with atomics), returned in the
    /// float type: cast by the module's `<cast kernel>_<T>` (`f32_to_storage`).
    AccF32(Shape, &'static str),
    /// A size, passed as an i32 (an error naming the op when it does not fit).
    Int(usize),
    /// Scalars passed as they are.
    Float(f32),
    Usize(usize),
    U32s(u32),
}

/// An [`Arg`] made concrete for the float type `T`.
enum Bound<'a, T> {
    X(CudaView<'a, T>),
    F32(CudaView<'a, f32>),
    U32(CudaView<'a, u32>),
    Out(CudaSlice<T>),
    OutF32(CudaSlice<f32>),
    ColSum(ColPartials),
    AccF32(CudaSlice<f32>),
    I32(i32),
    Float(f32),
    Usize(usize),
    U32s(u32),
}

impl Module {
    /// Launches `kernel` (`<kernel>_<T>` of this module) of op `op` (which errors name) with
    /// `args` over `grid`, returning the outputs the args list, in their order.
    ///
    /// # Safety
    /// Each input and output must hold every element the kernel reads or writes for these
    /// scalars and this grid (the caller checks the shapes).
    pub unsafe fn launch(
        &self,
        op: &str,
        kernel: &str,
        grid: Grid,
        args: &[Arg],
    ) -> Result<Vec<(CudaStorage, Shape)>> {
        let first = args.iter().find_map(|a| match a {
            Arg::X(x) => Some(*x),
            _ => None,
        });
        let Some(first) = first else {
            candle_core::bail!("{op}: a launch needs a float input")
        };
        let dev = first.0.device();
        // SAFETY: passed on from the caller.
        with_gpu_float!(first.0.dtype(), op, |T| unsafe {
            self.launch_as::<T>(dev, op, kernel, grid, args)
        })
    }

    /// [`Module::launch`] for the float type `T`.
    unsafe fn launch_as<T: GpuFloat>(
        &self,
        dev: &CudaDevice,
        op: &str,
        kernel: &str,
        grid: Grid,
        args: &[Arg],
    ) -> Result<Vec<(CudaStorage, Shape)>> {
        let mut bound = Vec::with_capacity(args.len());
        for arg in args {
            bound.push(match arg {
                Arg::X(x) => Bound::X(view::<T>(*x, op)?),
                Arg::F32(x) => Bound::F32(view::<f32>(*x, op)?),
                Arg::U32(x) => Bound::U32(view::<u32>(*x, op)?),
                Arg::Out(s) => Bound::Out(alloc::<T>(dev, s.elem_count())?),
                Arg::OutF32(s) => Bound::OutF32(alloc::<f32>(dev, s.elem_count())?),
                Arg::ColSum => {
                    let Grid::Cols(n, c) = grid else {
                        candle_core::bail!("{op}: a column sum needs a Grid::Cols launch")
                    };
                    Bound::ColSum(ColPartials::new(dev, n, c)?)
                }
                Arg::AccF32(s, _) => Bound::AccF32(zeros_f32(dev, s.elem_count())?),
                Arg::Int(v) => Bound::I32(as_i32(*v, op)?),
                Arg::Float(v) => Bound::Float(*v),
                Arg::Usize(v) => Bound::Usize(*v),
                Arg::U32s(v) => Bound::U32s(*v),
            });
        }
        if grid.has_work() {
            let func =
                dev.get_or_load_custom_func(&kernel_name::<T>(kernel), self.name, self.ptx)?;
            let mut b = func.builder();
            for arg in bound.iter_mut() {
                match arg {
                    Bound::X(v) => b.arg(&*v),
                    Bound::F32(v) => b.arg(&*v),
                    Bound::U32(v) => b.arg(&*v),
                    Bound::Out(s) => b.arg(s),
                    Bound::OutF32(s) | Bound::AccF32(s) => b.arg(s),
                    Bound::ColSum(p) => b.arg(&mut p.buf),
                    Bound::I32(v) => b.arg(&*v),
                    Bound::Float(v) => b.arg(&*v),
                    Bound::Usize(v) => b.arg(&*v),
                    Bound::U32s(v) => b.arg(&*v),
                };
            }
            // SAFETY: the caller's contract.
            unsafe { b.launch(grid.config()) }.w()?;
        }
        let mut outs = Vec::new();
        for (arg, bound) in args.iter().zip(bound) {
            match (arg, bound) {
                (Arg::Out(shape), Bound::Out(y)) => {
                    outs.push((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape.clone()))
                }
                (Arg::OutF32(shape), Bound::OutF32(y)) => {
                    outs.push((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape.clone()))
                }
                (Arg::ColSum, Bound::ColSum(p)) => {
                    let c = p.cols;
                    outs.push((p.finish::<T>(dev, op)?, Shape::from(c)))
                }
                (Arg::AccF32(shape, cast), Bound::AccF32(acc)) => {
                    let n = shape.elem_count();
                    let y = f32_to_storage::<T>(dev, acc, n, (self.name, self.ptx, cast))?;
                    outs.push((y, shape.clone()))
                }
                _ => {}
            }
        }
        Ok(outs)
    }
}

/// The `N` arguments of an entry point, or an error naming the op and what it takes (`names`:
/// "x, w, b").
pub(crate) fn expect_args<'a, const N: usize>(
    args: &[(&'a CudaStorage, &'a Layout)],
    op: &str,
    names: &str,
) -> Result<[(&'a CudaStorage, &'a Layout); N]> {
    <[_; N]>::try_from(args).map_err(|_| {
        let s = if N == 1 { "" } else { "s" };
        candle_core::Error::Msg(format!(
            "{op}: expected {N} argument{s} ({names}), got {}",
            args.len()
        ))
    })
}

/// A per-column parameter (`what`: w, b) of op `op` must hold C elements.
pub(crate) fn check_param(l: &Layout, c: usize, op: &str, what: &str) -> Result<()> {
    if l.shape().elem_count() != c {
        candle_core::bail!(
            "{op}: {what} {:?} does not match the last dim {c}",
            l.shape()
        )
    }
    Ok(())
}

/// An argument of op `op` (`what`) must have the shape of another (`of`, whose shape is `shape`).
pub(crate) fn check_shape(l: &Layout, shape: &Shape, op: &str, what: &str, of: &str) -> Result<()> {
    if l.shape() != shape {
        candle_core::bail!("{op}: {what} {:?} does not match {of} {shape:?}", l.shape())
    }
    Ok(())
}

/// An upstream gradient must have the shape of the tensor it is the gradient of (`what`).
pub(crate) fn check_dy(dy: &Layout, shape: &Shape, op: &str, what: &str) -> Result<()> {
    check_shape(dy, shape, op, "dy", what)
}

/// Saved per-row statistics of op `op` (`what`: mean, rstd) must hold one value per row.
pub(crate) fn check_per_row(l: &Layout, rows: usize, op: &str, what: &str) -> Result<()> {
    if l.shape().elem_count() != rows {
        candle_core::bail!("{op}: {what} must hold one value per row ({rows})")
    }
    Ok(())
}
