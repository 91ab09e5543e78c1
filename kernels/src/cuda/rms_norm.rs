//! Launches `cuda/rms_norm.cu`. Forward and dx: `rows_config` (a warp per row up to 1024 wide,
//! else a block per row). dw: `ColPartials` (32-column blocks walking down the rows write
//! per-block partials, then a fixed-order sum and cast: bitwise reproducible, no atomics).
//! All launches on the device's stream, no host sync.

use super::layer_norm::check_param;
use super::{alloc, as_i32, ptx, rows_config, view, with_gpu_float, ColPartials, GpuFloat};
use crate::rows_cols;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: &str = "kiln_rms_norm";

/// x[N, C], w[C] → y[N, C], rstd[N] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], eps: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, w] = args else {
        candle_core::bail!("rms_norm: expected 2 arguments (x, w), got {}", args.len())
    };
    with_gpu_float!(x.0.dtype(), "rms_norm", |T| fwd::<T>(*x, *w, eps))
}

fn fwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "rms_norm";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    let dev = x.0.device();
    let (xv, wv) = (view::<T>(x, NAME)?, view::<T>(w, NAME)?);
    let mut y = alloc::<T>(dev, n * c)?;
    let mut rstd = alloc::<f32>(dev, n)?;
    if n * c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("rms_norm_fwd"), MODULE, ptx::RMS_NORM)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&wv).arg(&mut y).arg(&mut rstd);
        bld.arg(&ni).arg(&ci).arg(&eps);
        // SAFETY: x and y hold n·c elements, w c, rstd n; one row per warp/block.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;
    }
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(y, dev.clone()), shape),
        (
            CudaStorage::wrap_cuda_slice(rstd, dev.clone()),
            Shape::from(n),
        ),
    ])
}

/// x, w, rstd, dy → dx[N, C], dw[C] (x's dtype).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, w, rstd, dy] = args else {
        candle_core::bail!(
            "rms_norm backward: expected 4 arguments (x, w, rstd, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(x.0.dtype(), "rms_norm backward", |T| bwd::<T>(
        *x, *w, *rstd, *dy
    ))
}

fn bwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    rstd: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "rms_norm backward";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    if rstd.1.shape().elem_count() != n {
        candle_core::bail!("{NAME}: rstd must hold one value per row ({n})")
    }
    if dy.1.shape() != &shape {
        candle_core::bail!("{NAME}: dy {:?} does not match x {shape:?}", dy.1.shape())
    }
    let dev = x.0.device();
    let (xv, wv, dyv) = (
        view::<T>(x, NAME)?,
        view::<T>(w, NAME)?,
        view::<T>(dy, NAME)?,
    );
    let rv = view::<f32>(rstd, NAME)?;
    let mut dx = alloc::<T>(dev, n * c)?;
    let mut dw = ColPartials::new(dev, n, c)?;
    if n * c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("rms_norm_bwd_dx"),
            MODULE,
            ptx::RMS_NORM,
        )?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&wv).arg(&rv).arg(&dyv).arg(&mut dx);
        bld.arg(&ni).arg(&ci);
        // SAFETY: x, dy and dx hold n·c elements, w c, rstd n.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;

        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("rms_norm_bwd_dw"),
            MODULE,
            ptx::RMS_NORM,
        )?;
        let cfg = dw.config();
        let mut bld = func.builder();
        bld.arg(&xv).arg(&rv).arg(&dyv).arg(&mut dw.buf);
        bld.arg(&ni).arg(&ci);
        // SAFETY: as above; the partials hold one float per (block row, column) of this grid.
        unsafe { bld.launch(cfg) }.w()?;
    }
    let dw = dw.finish::<T>(dev, NAME)?;
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape),
        (dw, Shape::from(c)),
    ])
}
