//! Launches `cuda/embedding.cu` with `rows_config` (a warp per dy row up to 1024 wide, 8 rows
//! per block, else a block per row) into a zeroed f32 dW, then a cast for bf16/f16.

use super::{as_i32, f32_to_storage, ptx, rows_config, view, with_gpu_float, zeros_f32, GpuFloat};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

const MODULE: &str = "kiln_embedding";

/// ids[N] u32, dy[N, C] → dW[vocab, C] in dy's dtype: row v is the sum of the dy rows whose
/// id is v; ids ≥ vocab (IGNORE_INDEX included) contribute nothing.
pub fn backward(
    args: &[(&CudaStorage, &Layout)],
    vocab: usize,
) -> Result<Vec<(CudaStorage, Shape)>> {
    let [ids, dy] = args else {
        candle_core::bail!(
            "embedding backward: expected 2 arguments (ids, dy), got {}",
            args.len()
        )
    };
    with_gpu_float!(dy.0.dtype(), "embedding backward", |T| bwd::<T>(
        *ids, *dy, vocab
    ))
}

fn bwd<T: GpuFloat>(
    ids: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "embedding backward";
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
    let dev = dy.0.device();
    let (idv, dyv) = (view::<u32>(ids, NAME)?, view::<T>(dy, NAME)?);
    let len = vocab * c;
    let mut dw32 = zeros_f32(dev, len)?;
    if n * c > 0 && vocab > 0 {
        let (ni, ci) = (as_i32(n, NAME)?, as_i32(c, NAME)?);
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("embedding_bwd"),
            MODULE,
            ptx::EMBEDDING,
        )?;
        let mut bld = func.builder();
        bld.arg(&idv)
            .arg(&dyv)
            .arg(&mut dw32)
            .arg(&ni)
            .arg(&ci)
            .arg(&vocab_u32);
        // SAFETY: ids hold n elements, dy n·c, dw32 vocab·c zeroed floats; ids ≥ vocab are
        // skipped in the kernel.
        unsafe { bld.launch(rows_config(n, c)) }.w()?;
    }
    let dw = f32_to_storage::<T>(dev, dw32, len, (MODULE, ptx::EMBEDDING, "embedding_cast"))?;
    Ok(vec![(dw, Shape::from((vocab, c)))])
}
