//! Launches `cuda/rms_norm.cu`. Forward and dx: `rows_config` (a warp per row up to 1024 wide,
//! else a block per row). dw: `ColPartials` (32-column blocks walking down the rows write
//! per-block partials, then a fixed-order sum and cast: bitwise reproducible, no atomics).
//! All launches on the device's stream, no host sync.

use super::launch::{check_dy, check_param, check_per_row, expect_args};
use super::{ptx, Arg, Grid, Module};
use crate::rows_cols;
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: Module = Module {
    name: "kiln_rms_norm",
    ptx: ptx::RMS_NORM,
};

/// x[N, C], w[C] → y[N, C], rstd[N] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], eps: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "rms_norm";
    let [x, w] = expect_args(args, NAME, "x, w")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    let args = [
        Arg::X(x),
        Arg::X(w),
        Arg::Out(shape),
        Arg::OutF32(n.into()),
        Arg::Int(n),
        Arg::Int(c),
        Arg::Float(eps),
    ];
    // SAFETY: x and y hold n·c elements, w c, rstd n; one row per warp/block.
    unsafe { MODULE.launch(NAME, "rms_norm_fwd", Grid::Rows(n, c), &args) }
}

/// x, w, rstd, dy → dx[N, C], dw[C] (x's dtype).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "rms_norm backward";
    let [x, w, rstd, dy] = expect_args(args, NAME, "x, w, rstd, dy")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    check_per_row(rstd.1, n, NAME, "rstd")?;
    check_dy(dy.1, &shape, NAME, "x")?;
    let dx = [
        Arg::X(x),
        Arg::X(w),
        Arg::F32(rstd),
        Arg::X(dy),
        Arg::Out(shape),
        Arg::Int(n),
        Arg::Int(c),
    ];
    let dw = [
        Arg::X(x),
        Arg::F32(rstd),
        Arg::X(dy),
        Arg::ColSum,
        Arg::Int(n),
        Arg::Int(c),
    ];
    // SAFETY: x, dy and dx hold n·c elements, w c, rstd n.
    let mut outs = unsafe { MODULE.launch(NAME, "rms_norm_bwd_dx", Grid::Rows(n, c), &dx)? };
    // SAFETY: as above; the partials hold one float per (block row, column) of this grid.
    outs.extend(unsafe { MODULE.launch(NAME, "rms_norm_bwd_dw", Grid::Cols(n, c), &dw)? });
    Ok(outs)
}
