//! Launches `cuda/layer_norm.cu`. Forward and dx: `rows_config` (a warp per row up to 1024
//! wide, else a block per row). dw/db: `ColPartials` (32-column blocks walking down the rows
//! write per-block partials, then a fixed-order sum and cast: bitwise reproducible, no
//! atomics). All launches on the device's stream, no host sync.

use super::launch::{check_dy, check_param, check_per_row, expect_args};
use super::{ptx, Arg, Grid, Module};
use crate::rows_cols;
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: Module = Module {
    name: "kiln_layer_norm",
    ptx: ptx::LAYER_NORM,
};

/// x[N, C], w[C], b[C] → y[N, C], mean[N] f32, rstd[N] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], eps: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "layer_norm";
    let [x, w, b] = expect_args(args, NAME, "x, w, b")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    check_param(b.1, c, NAME, "b")?;
    let args = [
        Arg::X(x),
        Arg::X(w),
        Arg::X(b),
        Arg::Out(shape),
        Arg::OutF32(n.into()),
        Arg::OutF32(n.into()),
        Arg::Int(n),
        Arg::Int(c),
        Arg::Float(eps),
    ];
    // SAFETY: x and y hold n·c elements, w and b c, mean and rstd n; one row per warp/block.
    unsafe { MODULE.launch(NAME, "layer_norm_fwd", Grid::Rows(n, c), &args) }
}

/// x, w, mean, rstd, dy → dx[N, C], dw[C], db[C] (x's dtype).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "layer_norm backward";
    let [x, w, mean, rstd, dy] = expect_args(args, NAME, "x, w, mean, rstd, dy")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(w.1, c, NAME, "w")?;
    check_per_row(mean.1, n, NAME, "mean")?;
    check_per_row(rstd.1, n, NAME, "rstd")?;
    check_dy(dy.1, &shape, NAME, "x")?;
    let (mean, rstd) = (Arg::F32(mean), Arg::F32(rstd));
    let dx = [
        Arg::X(x),
        Arg::X(w),
        mean.clone(),
        rstd.clone(),
        Arg::X(dy),
        Arg::Out(shape),
        Arg::Int(n),
        Arg::Int(c),
    ];
    let dwdb = [
        Arg::X(x),
        mean,
        rstd,
        Arg::X(dy),
        Arg::ColSum,
        Arg::ColSum,
        Arg::Int(n),
        Arg::Int(c),
    ];
    // SAFETY: x, dy and dx hold n·c elements, w c, mean and rstd n.
    let mut outs = unsafe { MODULE.launch(NAME, "layer_norm_bwd_dx", Grid::Rows(n, c), &dx)? };
    // SAFETY: as above; the partials hold one float per (block row, column) of this grid.
    outs.extend(unsafe { MODULE.launch(NAME, "layer_norm_bwd_dwdb", Grid::Cols(n, c), &dwdb)? });
    Ok(outs)
}
