//! Launches `cuda/layer_norm.cu`. Forward and dx: `rows_config` (a warp per row up to 1024
//! wide, else a block per row). dw/db: `ColPartials` (32-column blocks walking down the rows
//! write per-block partials, then a fixed-order sum and cast: bitwise reproducible, no
//! atomics). All launches on the device's stream, no host sync.

use super::{alloc, as_i32, ptx, rows_config, view, with_gpu_float, ColPartials, GpuFloat};
use crate::rows_cols;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: &str = "kiln_layer_norm";

/// x[N, C], w[C], b[C] → y[N, C], mean[N] f32, rstd[N] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], eps: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, w, b] = args else {
        candle_core::bail!(
            "layer_norm: expected 3 arguments (x, w, b), got {}",
            args.len()
        )
    };
    with_gpu_float!(x.0.dtype(), "layer_norm", |T| fwd::<T>(*x, *w, *b, eps))
}

fn fwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "layer_norm";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    check_param(b.1, c, NAME, "b")?;
    let dev = x.0.device();
    let (xv, wv, bv) = (
        view::<T>(x, NAME)?,
        view::<T>(w, NAME)?,
        view::<T>(b, NAME)?,
    );
    let mut y = alloc::<T>(dev, n * c)?;
    let mut mean = alloc::<f32>(dev, n)?;
    let mut rstd = alloc::<f32>(dev, n)?;
    if n > 0 && c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("layer_norm_fwd"),
            MODULE,
            ptx::LAYER_NORM,
        )?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&wv).arg(&bv).arg(&mut y);
        bld.arg(&mut mean).arg(&mut rstd);
        bld.arg(&ni).arg(&ci).arg(&eps);
        // SAFETY: x and y hold n·c elements, w and b c, mean and rstd n; one row per warp/block.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;
    }
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(y, dev.clone()), shape),
        (
            CudaStorage::wrap_cuda_slice(mean, dev.clone()),
            Shape::from(n),
        ),
        (
            CudaStorage::wrap_cuda_slice(rstd, dev.clone()),
            Shape::from(n),
        ),
    ])
}

/// x, w, mean, rstd, dy → dx[N, C], dw[C], db[C] (x's dtype).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [x, w, mean, rstd, dy] = args else {
        candle_core::bail!(
            "layer_norm backward: expected 5 arguments (x, w, mean, rstd, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(x.0.dtype(), "layer_norm backward", |T| bwd::<T>(
        *x, *w, *mean, *rstd, *dy
    ))
}

fn bwd<T: GpuFloat>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    mean: (&CudaStorage, &Layout),
    rstd: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "layer_norm backward";
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    if mean.1.shape().elem_count() != n || rstd.1.shape().elem_count() != n {
        candle_core::bail!("{NAME}: mean/rstd must hold one value per row ({n})")
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
    let (mv, rv) = (view::<f32>(mean, NAME)?, view::<f32>(rstd, NAME)?);
    let mut dx = alloc::<T>(dev, n * c)?;
    let mut dw = ColPartials::new(dev, n, c)?;
    let mut db = ColPartials::new(dev, n, c)?;
    if n > 0 && c > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("layer_norm_bwd_dx"),
            MODULE,
            ptx::LAYER_NORM,
        )?;
        let mut bld = func.builder();
        bld.arg(&xv)
            .arg(&wv)
            .arg(&mv)
            .arg(&rv)
            .arg(&dyv)
            .arg(&mut dx);
        bld.arg(&ni).arg(&ci);
        // SAFETY: x, dy and dx hold n·c elements, w c, mean and rstd n.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;

        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("layer_norm_bwd_dwdb"),
            MODULE,
            ptx::LAYER_NORM,
        )?;
        let cfg = dw.config();
        let mut bld = func.builder();
        bld.arg(&xv)
            .arg(&mv)
            .arg(&rv)
            .arg(&dyv)
            .arg(&mut dw.buf)
            .arg(&mut db.buf);
        bld.arg(&ni).arg(&ci);
        // SAFETY: as above; the partials hold one float per (block row, column) of this grid.
        unsafe { bld.launch(cfg) }.w()?;
    }
    let dw = dw.finish::<T>(dev, NAME)?;
    let db = db.finish::<T>(dev, NAME)?;
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape),
        (dw, Shape::from(c)),
        (db, Shape::from(c)),
    ])
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
