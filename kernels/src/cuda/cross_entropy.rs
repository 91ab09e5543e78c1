//! Launches `cuda/cross_entropy.cu`: a one-block count of the valid targets, one block per row
//! (up to 1024 threads; fewer for narrow rows, so a small vocabulary does not idle whole warps),
//! and a one-block mean. Three launches on the device's stream, no host synchronization.

use super::ptx;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, WithDType};

const MODULE: &str = "kiln_cross_entropy";
/// Threads of the one-block count and mean kernels.
const REDUCE_THREADS: u32 = 1024;

/// Threads for a row of `v` elements: about one 16-byte vector (8 16-bit elements) per thread,
/// a multiple of 32 between 32 and 1024.
fn row_threads(v: usize) -> u32 {
    (v.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// logits[N, V] (f32/bf16/f16), targets[N] u32 → loss[] f32 (mean over valid rows, 0 if none),
/// dlogits[N, V] in the logits' dtype.
pub fn forward(args: &[(&CudaStorage, &Layout)]) -> Result<Vec<(CudaStorage, Shape)>> {
    let [(logits, l_layout), (targets, t_layout)] = args else {
        candle_core::bail!(
            "cross_entropy: expected 2 arguments (logits, targets), got {}",
            args.len()
        )
    };
    let (n, v) = l_layout.shape().dims2()?;
    if t_layout.shape().dims() != [n] {
        candle_core::bail!(
            "cross_entropy: targets {:?} do not match logits {:?}",
            t_layout.shape(),
            l_layout.shape()
        )
    }
    if n > i32::MAX as usize || v > i32::MAX as usize {
        candle_core::bail!("cross_entropy: logits {:?} too large", l_layout.shape())
    }
    let offsets = |l: &Layout| {
        l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("cross_entropy: inputs must be contiguous".into())
        })
    };
    let logits_range = offsets(l_layout)?;
    let (t0, t1) = offsets(t_layout)?;
    let dev = logits.device();
    let CudaStorageSlice::U32(targets_slice) = &targets.slice else {
        candle_core::bail!(
            "cross_entropy: targets must be u32, got {:?}",
            targets.dtype()
        )
    };
    let targets = targets_slice.slice(t0..t1);
    let (loss, dlogits) = match &logits.slice {
        CudaStorageSlice::F32(s) => {
            let (loss, d) = launch(dev, s, logits_range, &targets, n, v)?;
            (loss, CudaStorageSlice::F32(d))
        }
        CudaStorageSlice::BF16(s) => {
            let (loss, d) = launch(dev, s, logits_range, &targets, n, v)?;
            (loss, CudaStorageSlice::BF16(d))
        }
        CudaStorageSlice::F16(s) => {
            let (loss, d) = launch(dev, s, logits_range, &targets, n, v)?;
            (loss, CudaStorageSlice::F16(d))
        }
        _ => candle_core::bail!(
            "cross_entropy: unsupported dtype {:?} on CUDA",
            logits.dtype()
        ),
    };
    let wrap = |slice| CudaStorage {
        slice,
        device: dev.clone(),
    };
    Ok(vec![
        (wrap(CudaStorageSlice::F32(loss)), Shape::from(())),
        (wrap(dlogits), Shape::from((n, v))),
    ])
}

fn launch<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    logits: &CudaSlice<T>,
    (l0, l1): (usize, usize),
    targets: &CudaView<u32>,
    n: usize,
    v: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<T>)> {
    let loss = dev.alloc_zeros::<f32>(1)?;
    // SAFETY: every element is written by ce_rows (each row by its own block).
    let dlogits = unsafe { dev.alloc::<T>(n * v)? };
    if n == 0 {
        return Ok((loss, dlogits));
    }
    let logits = logits.slice(l0..l1);
    // SAFETY: ce_count writes the count, ce_rows one loss per row, before any read.
    let count = unsafe { dev.alloc::<u32>(1)? };
    let losses = unsafe { dev.alloc::<f32>(n)? };
    let (n_i, v_i) = (n as i32, v as i32);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };

    let func = dev.get_or_load_custom_func("ce_count", MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(targets).arg(&n_i).arg(&v_i).arg(&count);
    // SAFETY: ce_count(targets[n], n, v, count[1]).
    unsafe { b.launch(one_block) }.w()?;

    let func =
        dev.get_or_load_custom_func(&kernel_name::<T>("ce_rows"), MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(&logits)
        .arg(targets)
        .arg(&count)
        .arg(&losses)
        .arg(&dlogits)
        .arg(&v_i);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (row_threads(v), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: ce_rows(logits[n·v], targets[n], count[1], losses[n], dlogits[n·v], v), one block
    // per row.
    unsafe { b.launch(cfg) }.w()?;

    let func = dev.get_or_load_custom_func("ce_mean", MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(&losses).arg(&n_i).arg(&count).arg(&loss);
    // SAFETY: ce_mean(losses[n], n, count[1], loss[1]).
    unsafe { b.launch(one_block) }.w()?;
    Ok((loss, dlogits))
}
