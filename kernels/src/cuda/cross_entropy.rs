//! Launches `cuda/cross_entropy.cu`: a one-block count of the valid targets, one block per row
//! (up to 1024 threads; fewer for narrow rows, so a small vocabulary does not idle whole warps),
//! and a one-block mean; then one 8-byte read of the first invalid target, which waits for the
//! stream (the trainer reads the loss each step anyway) and turns a bad target into the CPU's
//! error. The backward is one in-place scale.

use super::{elementwise_config, ptx, with_gpu_float, GpuFloat};
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
/// and with `grad` p − onehot [N, V] in the logits' dtype and 1/count[] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], grad: bool) -> Result<Vec<(CudaStorage, Shape)>> {
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
    let (loss, dlogits, inv_count) = match &logits.slice {
        CudaStorageSlice::F32(s) => {
            let (loss, d, c) = launch(dev, s, logits_range, &targets, n, v, grad)?;
            (loss, CudaStorageSlice::F32(d), c)
        }
        CudaStorageSlice::BF16(s) => {
            let (loss, d, c) = launch(dev, s, logits_range, &targets, n, v, grad)?;
            (loss, CudaStorageSlice::BF16(d), c)
        }
        CudaStorageSlice::F16(s) => {
            let (loss, d, c) = launch(dev, s, logits_range, &targets, n, v, grad)?;
            (loss, CudaStorageSlice::F16(d), c)
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
    let mut outs = vec![(wrap(CudaStorageSlice::F32(loss)), Shape::from(()))];
    if grad {
        outs.push((wrap(dlogits), Shape::from((n, v))));
        outs.push((wrap(CudaStorageSlice::F32(inv_count)), Shape::from(())));
    }
    Ok(outs)
}

/// The backward in place: d *= scale[0] (scale: an f32 scalar, upstream · 1/count).
pub fn scale_in_place(
    d: &mut CudaStorage,
    d_layout: &Layout,
    scale: &CudaStorage,
    s_layout: &Layout,
) -> Result<()> {
    let (a, b) = d_layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("cross_entropy: the kept gradient is not contiguous".into())
    })?;
    let scale = super::view::<f32>((scale, s_layout), "cross_entropy backward")?;
    let dev = d.device().clone();
    with_gpu_float!(d.dtype(), "cross_entropy backward", |T| {
        scale_launch::<T>(&dev, d, a, b, &scale)
    })
}

fn scale_launch<T: GpuFloat>(
    dev: &CudaDevice,
    d: &mut CudaStorage,
    a: usize,
    b: usize,
    scale: &CudaView<f32>,
) -> Result<()> {
    let n = b - a;
    if n == 0 {
        return Ok(());
    }
    let mut d = d.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
    let func =
        dev.get_or_load_custom_func(&kernel_name::<T>("ce_scale"), MODULE, ptx::CROSS_ENTROPY)?;
    let mut bld = func.builder();
    bld.arg(&mut d).arg(&n).arg(scale);
    // SAFETY: ce_scale(d[n], n, scale[1]) reads and writes each of the n elements once.
    unsafe { bld.launch(elementwise_config(n)) }.w()?;
    Ok(())
}

fn launch<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    logits: &CudaSlice<T>,
    (l0, l1): (usize, usize),
    targets: &CudaView<u32>,
    n: usize,
    v: usize,
    grad: bool,
) -> Result<(CudaSlice<f32>, CudaSlice<T>, CudaSlice<f32>)> {
    let loss = dev.alloc_zeros::<f32>(1)?;
    let inv_count = dev.alloc_zeros::<f32>(1)?;
    // SAFETY: with `grad`, every element is written by ce_rows (each row by its own block);
    // without it the one placeholder element is never read.
    let dlogits = unsafe { dev.alloc::<T>(if grad { (n * v).max(1) } else { 1 })? };
    if n == 0 {
        return Ok((loss, dlogits, inv_count));
    }
    let logits = logits.slice(l0..l1);
    // SAFETY: ce_count writes the count and `bad`, ce_rows one loss per row, before any read.
    let count = unsafe { dev.alloc::<u32>(1)? };
    let bad = unsafe { dev.alloc::<u32>(2)? };
    let losses = unsafe { dev.alloc::<f32>(n)? };
    let (n_i, v_i, grad_i) = (n as i32, v as i32, grad as i32);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };

    let func = dev.get_or_load_custom_func("ce_count", MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(targets).arg(&n_i).arg(&v_i).arg(&count).arg(&bad);
    // SAFETY: ce_count(targets[n], n, v, count[1], bad[2]).
    unsafe { b.launch(one_block) }.w()?;

    let func =
        dev.get_or_load_custom_func(&kernel_name::<T>("ce_rows"), MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(&logits)
        .arg(targets)
        .arg(&losses)
        .arg(&dlogits)
        .arg(&v_i)
        .arg(&grad_i);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (row_threads(v), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: ce_rows(logits[n·v], targets[n], losses[n], dlogits[n·v when grad], v, grad), one
    // block per row; without grad dlogits is not touched.
    unsafe { b.launch(cfg) }.w()?;

    let func = dev.get_or_load_custom_func("ce_mean", MODULE, ptx::CROSS_ENTROPY)?;
    let mut b = func.builder();
    b.arg(&losses)
        .arg(&n_i)
        .arg(&count)
        .arg(&loss)
        .arg(&inv_count);
    // SAFETY: ce_mean(losses[n], n, count[1], loss[1], inv_count[1]).
    unsafe { b.launch(one_block) }.w()?;

    let mut first_bad = [0u32; 2];
    dev.memcpy_dtoh(&bad, &mut first_bad)?;
    if first_bad[0] != u32::MAX {
        return Err(crate::cross_entropy::bad_target(
            first_bad[0] as usize,
            first_bad[1],
            v,
        ));
    }
    Ok((loss, dlogits, inv_count))
}
