//! Launch code for the kernels in `kernels/cuda/*.cu`: one module per op, each entry point
//! taking the same arguments as its CPU twin (see README.md).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod launch;
pub mod layer_norm;
pub mod rms_norm;
pub mod softmax;

/// One `&str` of PTX per `cuda/<op>.cu`, e.g. `ptx::LAYER_NORM`.
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

// ---- Shared launch helpers (used by layer_norm, rms_norm, softmax, gelu, embedding) ----

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, WithDType};

/// The float types the kernels are instantiated for (`<kernel>_f32/_bf16/_f16`, named with
/// `candle_core::cuda_backend::kernel_name::<T>`).
pub(crate) trait GpuFloat: CudaDType + DeviceRepr + WithDType {}
impl GpuFloat for f32 {}
impl GpuFloat for half::bf16 {}
impl GpuFloat for half::f16 {}

/// Calls `$body` with `$T` bound to the `GpuFloat` of `$dtype`; other dtypes are an error
/// naming `$name`.
macro_rules! with_gpu_float {
    ($dtype:expr, $name:expr, |$T:ident| $body:expr) => {
        $crate::match_dtype!(
            $dtype,
            [F32 => f32, BF16 => half::bf16, F16 => half::f16],
            |$T| $body,
            other => candle_core::bail!("{}: unsupported dtype {other:?} on CUDA", $name)
        )
    };
}
pub(crate) use with_gpu_float;

pub(crate) use launch::{Arg, Grid, Module};

/// The contiguous elements of a CUDA argument as a view of `T` (an error naming `name` if the
/// layout is not contiguous or the dtype is not `T`).
pub(crate) fn view<'a, T: CudaDType>(
    (s, l): (&'a CudaStorage, &Layout),
    name: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{name}: kiln kernels take contiguous tensors"))
    })?;
    let slice = s
        .as_cuda_slice::<T>()
        .map_err(|e| e.context(name.to_string()))?;
    Ok(slice.slice(a..b))
}

/// `n` uninitialized elements, at least one (CUDA cannot allocate zero bytes): every caller
/// writes all `n` before the buffer is read.
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the launches that follow write every element the output's shape covers.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// `n` zeroed f32 (at least one), for kernels that accumulate with atomicAdd.
pub(crate) fn zeros_f32(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    dev.alloc_zeros::<f32>(n.max(1))
}

/// `n` as an i32 kernel argument, or an error naming `name`.
pub(crate) fn as_i32(n: usize, name: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{name}: size {n} too large")))
}

/// Row kernels (see `row_index` in cuda/common.cuh): rows up to 1024 wide get one warp each,
/// 8 rows to a 256-thread block, so narrow rows do not idle most of a block; wider rows get a
/// block each, about 8 elements per thread (160 to 1024 threads).
pub(crate) fn rows_config(rows: usize, cols: usize) -> LaunchConfig {
    if cols <= 1024 {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    } else {
        let threads = (cols.div_ceil(8).div_ceil(32) * 32).min(1024);
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Column reductions over rows (see `ColPartials`): blocks of 32 columns × 8 row lanes, and
/// enough blocks down the rows (about 2048 blocks in all) to fill the GPU. The grid depends on
/// (rows, cols) only, so each column is summed in the same order on every run.
pub(crate) fn cols_config(rows: usize, cols: usize) -> LaunchConfig {
    let gx = cols.div_ceil(32);
    let gy = 2048usize.div_ceil(gx).min(rows.div_ceil(8)).clamp(1, 65535);
    LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// Deterministic column sums over rows (layer_norm dw/db, rms_norm dw, bias-GELU db), in two
/// steps and without atomics: a kernel launched with `config()` writes one f32 partial per
/// (block row, column) into `buf`, [parts, cols] with parts = its gridDim.y (see
/// `col_partial_store` in cuda/common.cuh); `finish` then sums each column's partials in a fixed
/// order and casts them to `T` (`colsum_partials` in cuda/colsum.cu). Both grids depend on
/// (rows, cols) only, so the sums are bitwise identical from run to run. (Attention's dq and the
/// embedding's dW still add with f32 atomics, in arrival order.)
pub(crate) struct ColPartials {
    pub(crate) buf: CudaSlice<f32>,
    rows: usize,
    pub(crate) cols: usize,
}

impl ColPartials {
    /// Uninitialized partials for a reduction of `rows` × `cols`: the kernel launched with
    /// `config()` writes all of them when rows and cols are non-zero.
    pub(crate) fn new(dev: &CudaDevice, rows: usize, cols: usize) -> Result<Self> {
        let parts = cols_config(rows, cols).grid_dim.1 as usize;
        Ok(Self {
            buf: alloc::<f32>(dev, parts * cols)?,
            rows,
            cols,
        })
    }

    /// The launch configuration of the kernel that writes the partials (`cols_config`).
    pub(crate) fn config(&self) -> LaunchConfig {
        cols_config(self.rows, self.cols)
    }

    /// The column sums as `cols` elements of `T` (zeros when there are no rows: the partials
    /// are then neither written nor read).
    pub(crate) fn finish<T: GpuFloat>(self, dev: &CudaDevice, name: &str) -> Result<CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{kernel_name, WrapErr};
        let mut out = alloc::<T>(dev, self.cols)?;
        if self.cols > 0 {
            let parts = if self.rows == 0 {
                0
            } else {
                self.config().grid_dim.1 as usize
            };
            let (parts, cols) = (as_i32(parts, name)?, as_i32(self.cols, name)?);
            let func = dev.get_or_load_custom_func(
                &kernel_name::<T>("colsum_partials"),
                "kiln_colsum",
                ptx::COLSUM,
            )?;
            let mut b = func.builder();
            b.arg(&self.buf).arg(&mut out).arg(&parts).arg(&cols);
            let cfg = LaunchConfig {
                grid_dim: (self.cols.div_ceil(32) as u32, 1, 1),
                block_dim: (32, 32, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `buf` holds parts·cols floats (written by the partials kernel when
            // parts > 0), `out` cols elements; one thread column per output column.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Grid-stride element-wise kernels: 256 threads, a block per 2048 elements (one or two
/// 16-byte vectors per thread), at most 65536 blocks.
pub(crate) fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(2048).clamp(1, 65536) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An f32 accumulation buffer of `n` elements as a `T` output: the buffer itself for f32,
/// otherwise cast by `<cast_kernel>_<T>` (a `cast_from_f32` instantiation in `ptx`). Used by
/// the kernels that still accumulate with f32 atomics (attention dq, embedding dW).
pub(crate) fn f32_to_storage<T: GpuFloat>(
    dev: &CudaDevice,
    acc: CudaSlice<f32>,
    n: usize,
    (module, ptx, cast_kernel): (&str, &str, &str),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{kernel_name, WrapErr};
    if T::DTYPE == candle_core::DType::F32 {
        return Ok(CudaStorage::wrap_cuda_slice(acc, dev.clone()));
    }
    let mut out = alloc::<T>(dev, n)?;
    if n > 0 {
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(cast_kernel), module, ptx)?;
        let mut b = func.builder();
        b.arg(&acc).arg(&mut out).arg(&n);
        // SAFETY: `acc` and `out` hold at least `n` elements.
        unsafe { b.launch(elementwise_config(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
