//! Launches `cuda/attention.cu`. Blocks of 128 threads; grid = (B·H, tiles along T): query tiles
//! for the forward, key tiles for the backward (grid y is capped at 65535, so the tile index
//! goes there and B·H, which may be large, on x). The backward first computes Δ = Σ do·o (a
//! warp per row), accumulates dq in a zeroed f32 buffer with atomics, and casts it for
//! bf16/f16. All launches on the device's stream, no host sync, no T×T buffer.

use super::{alloc, as_i32, f32_to_storage, ptx, view, with_gpu_float, zeros_f32, GpuFloat};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const MODULE: &str = "kiln_attention";
const THREADS: u32 = 128;
/// Largest head dim the kernels are instantiated for.
const MAX_D: usize = 128;

/// The padded head dim (the `d32/d64/d128` kernel variant) for head dim `d`.
fn padded_d(d: usize, name: &str) -> Result<usize> {
    match d {
        0..=32 => Ok(32),
        33..=64 => Ok(64),
        65..=MAX_D => Ok(128),
        _ => candle_core::bail!("{name}: head dim {d} is not supported on CUDA (at most {MAX_D})"),
    }
}

/// Rows per block along T for the padded head dim `dp`: (forward query tile, backward key
/// tile). Must match `FwdCfg::BR` and `BwdCfg::BC` in attention.cu.
fn tiles(dp: usize) -> (usize, usize) {
    match dp {
        32 => (64, 64),
        64 => (64, 32),
        _ => (32, 16),
    }
}

/// grid = (B·H, ceil(T / tile)), 128 threads, static shared memory only.
fn tiled_config(bh: usize, t: usize, tile: usize, name: &str) -> Result<LaunchConfig> {
    let gy = t.div_ceil(tile);
    if gy > 65535 {
        candle_core::bail!("{name}: sequence length {t} too long for the CUDA grid")
    }
    Ok(LaunchConfig {
        grid_dim: (as_i32(bh, name)? as u32, gy as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// [B, H, T, D] of a layout, or an error naming `name` and `what`.
fn dims4(l: &Layout, name: &str, what: &str) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{name}: {what} must be [B, H, T, D], got {:?}",
            l.shape()
        ))
    })
}

/// q, k, v [B, H, T, D] → o [B, H, T, D], lse [B, H, T] f32.
pub fn forward(args: &[(&CudaStorage, &Layout)], scale: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    let [q, k, v] = args else {
        candle_core::bail!(
            "attention: expected 3 arguments (q, k, v), got {}",
            args.len()
        )
    };
    with_gpu_float!(q.0.dtype(), "attention", |T| fwd::<T>(*q, *k, *v, scale))
}

fn fwd<T: GpuFloat>(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "attention";
    let shape = q.1.shape().clone();
    let (b, h, t, d) = dims4(q.1, NAME, "q")?;
    for (what, x) in [("k", k), ("v", v)] {
        if x.1.shape() != &shape {
            candle_core::bail!(
                "{NAME}: {what} {:?} does not match q {shape:?}",
                x.1.shape()
            )
        }
    }
    let dp = padded_d(d, NAME)?;
    let dev = q.0.device();
    let (qv, kv, vv) = (
        view::<T>(q, NAME)?,
        view::<T>(k, NAME)?,
        view::<T>(v, NAME)?,
    );
    let bh = b * h;
    let mut o = alloc::<T>(dev, bh * t * d)?;
    let mut lse = alloc::<f32>(dev, bh * t)?;
    if bh * t > 0 {
        let cfg = tiled_config(bh, t, tiles(dp).0, NAME)?;
        let (ti, di) = (as_i32(t, NAME)?, as_i32(d, NAME)?);
        // The kernel's softmax runs on exp2: q is pre-scaled by scale·log2(e).
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>(&format!("attention_fwd_d{dp}")),
            MODULE,
            ptx::ATTENTION,
        )?;
        let mut bld = func.builder();
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&mut lse);
        bld.arg(&ti).arg(&di).arg(&scale_log2);
        // SAFETY: q, k, v and o hold B·H·T·D elements, lse B·H·T; the kernel reads and writes
        // only rows < T and columns < D of each (b, h).
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok(vec![
        (CudaStorage::wrap_cuda_slice(o, dev.clone()), shape),
        (
            CudaStorage::wrap_cuda_slice(lse, dev.clone()),
            Shape::from((b, h, t)),
        ),
    ])
}

/// q, k, v, o, lse, do → dq, dk, dv (q's dtype).
pub fn backward(args: &[(&CudaStorage, &Layout)], scale: f32) -> Result<Vec<(CudaStorage, Shape)>> {
    let [q, k, v, o, lse, d_o] = args else {
        candle_core::bail!(
            "attention backward: expected 6 arguments (q, k, v, o, lse, do), got {}",
            args.len()
        )
    };
    with_gpu_float!(q.0.dtype(), "attention backward", |T| bwd::<T>(
        [*q, *k, *v, *o, *d_o],
        *lse,
        scale
    ))
}

fn bwd<T: GpuFloat>(
    [q, k, v, o, d_o]: [(&CudaStorage, &Layout); 5],
    lse: (&CudaStorage, &Layout),
    scale: f32,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "attention backward";
    let shape = q.1.shape().clone();
    let (b, h, t, d) = dims4(q.1, NAME, "q")?;
    for (what, x) in [("k", k), ("v", v), ("o", o), ("do", d_o)] {
        if x.1.shape() != &shape {
            candle_core::bail!(
                "{NAME}: {what} {:?} does not match q {shape:?}",
                x.1.shape()
            )
        }
    }
    let bh = b * h;
    if lse.1.shape().elem_count() != bh * t {
        candle_core::bail!(
            "{NAME}: lse {:?} must hold B·H·T = {} values",
            lse.1.shape(),
            bh * t
        )
    }
    let dp = padded_d(d, NAME)?;
    let dev = q.0.device();
    let (qv, kv, vv) = (
        view::<T>(q, NAME)?,
        view::<T>(k, NAME)?,
        view::<T>(v, NAME)?,
    );
    let (ov, dov) = (view::<T>(o, NAME)?, view::<T>(d_o, NAME)?);
    let lv = view::<f32>(lse, NAME)?;
    let n = bh * t * d;
    let rows = bh * t;
    let mut dq32 = zeros_f32(dev, n)?;
    let mut dk = alloc::<T>(dev, n)?;
    let mut dv = alloc::<T>(dev, n)?;
    if rows > 0 {
        let cfg = tiled_config(bh, t, tiles(dp).1, NAME)?;
        let (ti, di) = (as_i32(t, NAME)?, as_i32(d, NAME)?);

        let mut delta = alloc::<f32>(dev, rows)?;
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("attention_bwd_delta"),
            MODULE,
            ptx::ATTENTION,
        )?;
        let mut bld = func.builder();
        bld.arg(&ov).arg(&dov).arg(&mut delta).arg(&rows).arg(&di);
        let warps = (THREADS / 32) as usize;
        let delta_cfg = LaunchConfig {
            grid_dim: (as_i32(rows.div_ceil(warps), NAME)? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: o and do hold rows·D elements, delta rows; one warp per row.
        unsafe { bld.launch(delta_cfg) }.w()?;

        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>(&format!("attention_bwd_d{dp}")),
            MODULE,
            ptx::ATTENTION,
        )?;
        let mut bld = func.builder();
        bld.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&dov)
            .arg(&lv)
            .arg(&delta);
        bld.arg(&mut dq32).arg(&mut dk).arg(&mut dv);
        bld.arg(&ti).arg(&di).arg(&scale);
        // SAFETY: q, k, v, do, dq32, dk and dv hold B·H·T·D elements, lse and delta B·H·T;
        // dq32 is zeroed (atomics add into it); each block writes only its own key rows of dk
        // and dv, rows < T and columns < D.
        unsafe { bld.launch(cfg) }.w()?;
    }
    let dq = f32_to_storage::<T>(dev, dq32, n, (MODULE, ptx::ATTENTION, "attention_dq_cast"))?;
    let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
    Ok(vec![
        (dq, shape.clone()),
        (wrap(dk), shape.clone()),
        (wrap(dv), shape),
    ])
}
