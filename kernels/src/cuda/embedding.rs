//! Launches `cuda/embedding.cu` with `rows_config` (a warp per dy row up to 1024 wide, 8 rows
//! per block, else a block per row) into a zeroed f32 dW, then a cast for bf16/f16.

use super::launch::expect_args;
use super::{ptx, Arg, Grid, Module};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

const MODULE: Module = Module {
    name: "kiln_embedding",
    ptx: ptx::EMBEDDING,
};

/// ids[N] u32, dy[N, C] → dW[vocab, C] in dy's dtype: row v is the sum of the dy rows whose
/// id is v; ids ≥ vocab (IGNORE_INDEX included) contribute nothing.
pub fn backward(
    args: &[(&CudaStorage, &Layout)],
    vocab: usize,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "embedding backward";
    let [ids, dy] = expect_args(args, NAME, "ids, dy")?;
    if ids.0.dtype() != DType::U32 {
        candle_core::bail!("{NAME}: ids must be u32, got {:?}", ids.0.dtype())
    }
    let n = ids.1.shape().elem_count();
    let c = dy.1.dims().last().copied().unwrap_or(0);
    if dy.1.shape().elem_count() != n * c {
        candle_core::bail!(
            "{NAME}: dy {:?} is not one row per id ({n} ids)",
            dy.1.shape()
        )
    }
    let vocab_u32 = u32::try_from(vocab)
        .map_err(|_| candle_core::Error::Msg(format!("{NAME}: vocab {vocab} too large")))?;
    let args = [
        Arg::U32(ids),
        Arg::X(dy),
        Arg::AccF32((vocab, c).into(), "embedding_cast"),
        Arg::Int(n),
        Arg::Int(c),
        Arg::U32s(vocab_u32),
    ];
    // No id can hit an empty vocabulary: no launch then.
    let rows = if vocab > 0 { n } else { 0 };
    // SAFETY: ids hold n elements, dy n·c, dW vocab·c zeroed floats; ids ≥ vocab are skipped in
    // the kernel.
    unsafe { MODULE.launch(NAME, "embedding_bwd", Grid::Rows(rows, c), &args) }
}
