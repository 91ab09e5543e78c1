//! Launches `cuda/softmax.cu` with `rows_config`: a warp per row for rows up to 1024 wide
//! (8 rows per block), else a block per row.

use super::{alloc, as_i32, ptx, rows_config, view, with_gpu_float, GpuFloat};
use crate::rows_cols;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: &str = "kiln_softmax";

/// x[N, C] → y = softmax over the last dim.
pub fn forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x] = args else {
        candle_core::bail!("softmax: expected 1 argument (x), got {}", args.len())
    };
    with_gpu_float!(x.0.dtype(), "softmax", |T| fwd::<T>(*x))
}

fn fwd<T: GpuFloat>(x: (&CudaStorage, &Layout)) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "softmax";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    let dev = x.0.device();
    let xv = view::<T>(x, NAME)?;
    let mut y = alloc::<T>(dev, n * c)?;
    if n * c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("softmax_fwd"), MODULE, ptx::SOFTMAX)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&mut y).arg(&ni).arg(&ci);
        // SAFETY: x and y hold n·c elements; one row per warp/block.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;
    }
    Ok(vec![(CudaStorage::wrap_cuda_slice(y, dev.clone()), shape)])
}

/// y, dy → dx = y·(dy − Σ dy·y).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [y, dy] = args else {
        candle_core::bail!(
            "softmax backward: expected 2 arguments (y, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(y.0.dtype(), "softmax backward", |T| bwd::<T>(*y, *dy))
}

fn bwd<T: GpuFloat>(
    y: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "softmax backward";
    let shape = y.1.shape().clone();
    if dy.1.shape() != &shape {
        candle_core::bail!("{NAME}: dy {:?} does not match y {shape:?}", dy.1.shape())
    }
    let (n, c) = rows_cols(&shape)?;
    let dev = y.0.device();
    let (yv, dyv) = (view::<T>(y, NAME)?, view::<T>(dy, NAME)?);
    let mut dx = alloc::<T>(dev, n * c)?;
    if n * c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("softmax_bwd"), MODULE, ptx::SOFTMAX)?;
        let mut bld = func.builder();
        bld.arg(&yv).arg(&dyv).arg(&mut dx).arg(&ni).arg(&ci);
        // SAFETY: y, dy and dx hold n·c elements; one row per warp/block.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;
    }
    Ok(vec![(CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape)])
}
