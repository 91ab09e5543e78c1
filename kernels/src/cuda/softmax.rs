//! Launches `cuda/softmax.cu` with `rows_config`: a warp per row for rows up to 1024 wide
//! (8 rows per block), else a block per row.

use super::launch::{check_dy, expect_args};
use super::{ptx, Arg, Grid, Module};
use crate::rows_cols;
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: Module = Module {
    name: "kiln_softmax",
    ptx: ptx::SOFTMAX,
};

/// x[N, C] → y = softmax over the last dim.
pub fn forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "softmax";
    let [x] = expect_args(args, NAME, "x")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    let args = [Arg::X(x), Arg::Out(shape), Arg::Int(n), Arg::Int(c)];
    // SAFETY: x and y hold n·c elements; one row per warp/block.
    unsafe { MODULE.launch(NAME, "softmax_fwd", Grid::Rows(n, c), &args) }
}

/// y, dy → dx = y·(dy − Σ dy·y).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "softmax backward";
    let [y, dy] = expect_args(args, NAME, "y, dy")?;
    let shape = y.1.shape().clone();
    check_dy(dy.1, &shape, NAME, "y")?;
    let (n, c) = rows_cols(&shape)?;
    let args = [
        Arg::X(y),
        Arg::X(dy),
        Arg::Out(shape),
        Arg::Int(n),
        Arg::Int(c),
    ];
    // SAFETY: y, dy and dx hold n·c elements; one row per warp/block.
    unsafe { MODULE.launch(NAME, "softmax_bwd", Grid::Rows(n, c), &args) }
}
