//! Launches `cuda/gelu.cu`. Element-wise kernels: `elementwise_config` (256 threads,
//! grid-stride, 16-byte vectors when aligned). Bias backward: `ColPartials` (32-column blocks
//! walking down the rows write dx and per-block partials of db, then a fixed-order sum and
//! cast: bitwise reproducible, no atomics).

use super::launch::{check_dy, check_param, expect_args};
use super::{ptx, Arg, Grid, Module};
use crate::rows_cols;
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: Module = Module {
    name: "kiln_gelu",
    ptx: ptx::GELU,
};

/// x → y = gelu(x).
pub fn forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "gelu";
    let [x] = expect_args(args, NAME, "x")?;
    let shape = x.1.shape().clone();
    let n = shape.elem_count();
    let args = [Arg::X(x), Arg::Out(shape), Arg::Usize(n)];
    // SAFETY: x and y hold n elements.
    unsafe { MODULE.launch(NAME, "gelu_fwd", Grid::Elementwise(n), &args) }
}

/// x, dy → dx = dy·gelu'(x).
pub fn backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "gelu backward";
    let [x, dy] = expect_args(args, NAME, "x, dy")?;
    let shape = x.1.shape().clone();
    check_dy(dy.1, &shape, NAME, "x")?;
    let n = shape.elem_count();
    let args = [Arg::X(x), Arg::X(dy), Arg::Out(shape), Arg::Usize(n)];
    // SAFETY: x, dy and dx hold n elements.
    unsafe { MODULE.launch(NAME, "gelu_bwd", Grid::Elementwise(n), &args) }
}

/// x[N, C], b[C] → y = gelu(x + b).
pub fn bias_forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "bias_gelu";
    let [x, b] = expect_args(args, NAME, "x, b")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(b.1, c, NAME, "b")?;
    let len = n * c;
    let args = [
        Arg::X(x),
        Arg::X(b),
        Arg::Out(shape),
        Arg::Usize(len),
        Arg::Int(c),
    ];
    // SAFETY: x and y hold n·c elements, b c.
    unsafe { MODULE.launch(NAME, "gelu_bias_fwd", Grid::Elementwise(len), &args) }
}

/// x[N, C], b[C], dy[N, C] → dx = dy·gelu'(x + b), db = Σ_rows dx (x's dtype).
pub fn bias_backward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "bias_gelu backward";
    let [x, b, dy] = expect_args(args, NAME, "x, b, dy")?;
    let shape = x.1.shape().clone();
    let (n, c) = rows_cols(&shape)?;
    check_param(b.1, c, NAME, "b")?;
    check_dy(dy.1, &shape, NAME, "x")?;
    let args = [
        Arg::X(x),
        Arg::X(b),
        Arg::X(dy),
        Arg::Out(shape),
        Arg::ColSum,
        Arg::Int(n),
        Arg::Int(c),
    ];
    // SAFETY: x, dy and dx hold n·c elements, b c; the partials hold one float per (block
    // row, column) of this grid.
    unsafe { MODULE.launch(NAME, "gelu_bias_bwd", Grid::Cols(n, c), &args) }
}
