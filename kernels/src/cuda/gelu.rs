//! Launches `cuda/gelu.cu`. Element-wise kernels: `elementwise_config` (256 threads,
//! grid-stride, 16-byte vectors when aligned). Bias backward: `ColPartials` (32-column blocks
//! walking down the rows write dx and per-block partials of db, then a fixed-order sum and
//! cast: bitwise reproducible, no atomics).

use super::layer_norm::check_param;
use super::{alloc, as_i32, elementwise_config, ptx, view, with_gpu_float, ColPartials, GpuFloat};
use crate::rows_cols;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: &str = "kiln_gelu";

/// x → y = gelu(x).
pub fn forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x] = args else {
        candle_core::bail!("gelu: expected 1 argument (x), got {}", args.len())
    };
    with_gpu_float!(x.0.dtype(), "gelu", |T| fwd::<T>(*x))
}

fn fwd<T: GpuFloat>(x: (&CudaStorage, &Layout)) -> Result<Vec<(CudaStorage, Shape)>> {
    let shape = x.1.shape().clone();
    let n = shape.elem_count();
    let dev = x.0.device();
    let xv = view::<T>(x, "gelu")?;
    let mut y = alloc::<T>(dev, n)?;
    if n > 0 {
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("gelu_fwd"), MODULE, ptx::GELU)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&mut y).arg(&n);
        // SAFETY: x and y hold n elements.
        unsafe { bld.launch(elementwise_config(n)) }.w()?;
    }
    Ok(vec![(CudaStorage::wrap_cuda_slice(y, dev.clone()), shape)])
}

/// x, dy → dx = dy·gelu'(x).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, dy] = args else {
        candle_core::bail!(
            "gelu backward: expected 2 arguments (x, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(x.0.dtype(), "gelu backward", |T| bwd::<T>(*x, *dy))
}

fn bwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "gelu backward";
    let shape = x.1.shape().clone();
    if dy.1.shape() != &shape {
        candle_core::bail!("{NAME}: dy {:?} does not match x {shape:?}", dy.1.shape())
    }
    let n = shape.elem_count();
    let dev = x.0.device();
    let (xv, dyv) = (view::<T>(x, NAME)?, view::<T>(dy, NAME)?);
    let mut dx = alloc::<T>(dev, n)?;
    if n > 0 {
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("gelu_bwd"), MODULE, ptx::GELU)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&dyv).arg(&mut dx).arg(&n);
        // SAFETY: x, dy and dx hold n elements.
        unsafe { bld.launch(elementwise_config(n)) }.w()?;
    }
    Ok(vec![(CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape)])
}

/// x[N, C], b[C] → y = gelu(x + b).
pub fn bias_forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, b] = args else {
        candle_core::bail!("bias_gelu: expected 2 arguments (x, b), got {}", args.len())
    };
    with_gpu_float!(x.0.dtype(), "bias_gelu", |T| bias_fwd::<T>(*x, *b))
}

fn bias_fwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "bias_gelu";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(b.1, c, NAME, "b")?;
    let dev = x.0.device();
    let (xv, bv) = (view::<T>(x, NAME)?, view::<T>(b, NAME)?);
    let len = n * c;
    let mut y = alloc::<T>(dev, len)?;
    if len > 0 {
        let ci = as_i32(c, NAME)?;
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("gelu_bias_fwd"), MODULE, ptx::GELU)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&bv).arg(&mut y).arg(&len).arg(&ci);
        // SAFETY: x and y hold n·c elements, b c.
        unsafe { bld.launch(elementwise_config(len)) }.w()?;
    }
    Ok(vec![(CudaStorage::wrap_cuda_slice(y, dev.clone()), shape)])
}

/// x[N, C], b[C], dy[N, C] → dx = dy·gelu'(x + b), db = Σ_rows dx (x's dtype).
pub fn bias_backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, b, dy] = args else {
        candle_core::bail!(
            "bias_gelu backward: expected 3 arguments (x, b, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(x.0.dtype(), "bias_gelu backward", |T| bias_bwd::<T>(
        *x, *b, *dy
    ))
}

fn bias_bwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "bias_gelu backward";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(b.1, c, NAME, "b")?;
    if dy.1.shape() != &shape {
        candle_core::bail!("{NAME}: dy {:?} does not match x {shape:?}", dy.1.shape())
    }
    let dev = x.0.device();
    let (xv, bv, dyv) = (
        view::<T>(x, NAME)?,
        view::<T>(b, NAME)?,
        view::<T>(dy, NAME)?,
    );
    let mut dx = alloc::<T>(dev, n * c)?;
    let mut db = ColPartials::new(dev, n, c)?;
    if n * c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("gelu_bias_bwd"), MODULE, ptx::GELU)?;
        let cfg = db.config();
        let mut bld = func.builder();
        bld.arg(&xv)
            .arg(&bv)
            .arg(&dyv)
            .arg(&mut dx)
            .arg(&mut db.buf);
        bld.arg(&ni).arg(&ci);
        // SAFETY: x, dy and dx hold n·c elements, b c; the partials hold one float per (block
        // row, column) of this grid.
        unsafe { bld.launch(cfg) }.w()?;
    }
    let db = db.finish::<T>(dev, NAME)?;
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape),
        (db, Shape::from(c)),
    ])
}
