//! Launches `cuda/attention.cu` (f32 FMA kernels, every float dtype, head dims up to 128) and
//! `cuda/attention_tc.cu` (tensor cores: bf16/f16, head dims 64 and 128). Blocks of 128
//! threads; grid = (B·H, tiles along T): query tiles for the forward, key tiles for the
//! backward (grid y is capped at 65535, so the tile index goes there and B·H, which may be
//! large, on x). The backward first computes Δ = Σ do·o (a warp per row), accumulates dq in a
//! zeroed f32 buffer with atomics, and casts it for bf16/f16. All launches on the device's
//! stream, no host sync, no T×T buffer.
//!
//! Kernel choice (`Kernel`, `choose`): the tensor-core kernels for bf16/f16 with head dim 64
//! or 128 and 16-byte aligned inputs, the FMA kernels otherwise (they stay the reference).
//! Setting `KILN_ATTENTION_KERNEL=fma` (read once per process) forces the FMA kernels
//! everywhere, so the two can be compared on a device.
//!
//! Dropout on the probabilities runs the `_drop` instances of both (five more arguments: the
//! draw's key, first Philox block, threshold and scale); calls without it run the kernels
//! without those instructions.

use super::launch::{check_shape, expect_args};
use super::{alloc, as_i32, f32_to_storage, ptx, view, with_gpu_float, zeros_f32, GpuFloat};
use crate::dropout::MaskSpec;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};

const MODULE: &str = "kiln_attention";
const TC_MODULE: &str = "kiln_attention_tc";
const THREADS: u32 = 128;
/// Rows per tile (query and key) of the tensor-core kernels (`BM`, `BN` in attention_tc.cu).
const TC_TILE: usize = 64;
/// Padding, in elements, of each shared-memory row of the tensor-core kernels (`PAD`).
const TC_PAD: usize = 8;
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

/// Which implementation runs an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// `attention.cu`: f32 FMA loops, any float dtype, head dims up to 128.
    Fma,
    /// `attention_tc.cu`: mma.sync on tensor cores, bf16/f16, head dim 64 or 128.
    TensorCore,
}

/// True when `KILN_ATTENTION_KERNEL=fma` (read once per process).
fn fma_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        std::env::var("KILN_ATTENTION_KERNEL").is_ok_and(|v| v.trim().eq_ignore_ascii_case("fma"))
    })
}

/// The kernel for dtype `T`, head dim `d` and the given inputs: tensor cores for bf16/f16 with
/// `d` ∈ {64, 128} when every input starts 16-byte aligned (cp.async copies 16 bytes; each
/// buffer is at least 256-byte aligned, so the element offset decides) and the FMA kernel is
/// not forced.
fn choose<T: GpuFloat>(d: usize, inputs: &[&Layout]) -> Kernel {
    let half = matches!(T::DTYPE, DType::BF16 | DType::F16);
    let aligned = inputs.iter().all(|l| {
        l.contiguous_offsets()
            .is_some_and(|(start, _)| (start * T::DTYPE.size_in_bytes()).is_multiple_of(16))
    });
    if half && matches!(d, 64 | 128) && aligned && !fma_forced() {
        Kernel::TensorCore
    } else {
        Kernel::Fma
    }
}

/// Dynamic shared memory of the tensor-core kernels for head dim `d`, in bytes: (forward,
/// backward). Must match `Smem::FWD_BYTES` and `Smem::BWD_BYTES` in attention_tc.cu (the kernels
/// trap when given less).
fn tc_smem(d: usize) -> (usize, usize) {
    let tile = TC_TILE * (d + TC_PAD) * 2; // one [64][d + 8] tile of halves
    let ds = TC_TILE * (TC_TILE + TC_PAD) * 2; // dSᵀ [64][72]
    let stats = 2 * 2 * TC_TILE * 4; // lse, Δ: two stages of 64 f32 each
    (5 * tile, 6 * tile + ds + stats)
}

/// Allows `func` `smem` bytes of dynamic shared memory (above the default 48 KB the function
/// attribute must say so).
fn allow_smem(func: &CudaFunction, smem: usize) -> Result<()> {
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()
}

/// The two launches a kernel family has.
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

/// The `<dtype>` function of `kernel`'s `pass` for head dim `d` (its dropout instance when
/// `drop`), with its launch shape (and the dynamic shared memory the tensor-core kernels need,
/// allowed on the function).
fn load<T: GpuFloat>(
    dev: &CudaDevice,
    (kernel, pass, drop): (Kernel, Pass, bool),
    d: usize,
    bh: usize,
    t: usize,
) -> Result<(CudaFunction, LaunchConfig)> {
    const NAME: &str = "attention";
    let fwd = matches!(pass, Pass::Forward);
    let which = match (fwd, drop) {
        (true, false) => "fwd",
        (true, true) => "fwd_drop",
        (false, false) => "bwd",
        (false, true) => "bwd_drop",
    };
    match kernel {
        Kernel::TensorCore => {
            let (fwd_smem, bwd_smem) = tc_smem(d);
            let smem = if fwd { fwd_smem } else { bwd_smem };
            let func = dev.get_or_load_custom_func(
                &kernel_name::<T>(&format!("attention_tc_{which}_d{d}")),
                TC_MODULE,
                ptx::ATTENTION_TC,
            )?;
            allow_smem(&func, smem)?;
            Ok((
                func.into_cuda_function(),
                tiled_config(bh, t, TC_TILE, smem, NAME)?,
            ))
        }
        Kernel::Fma => {
            let dp = padded_d(d, NAME)?;
            let (fwd_tile, bwd_tile) = tiles(dp);
            let func = dev.get_or_load_custom_func(
                &kernel_name::<T>(&format!("attention_{which}_d{dp}")),
                MODULE,
                ptx::ATTENTION,
            )?;
            let tile = if fwd { fwd_tile } else { bwd_tile };
            Ok((
                func.into_cuda_function(),
                tiled_config(bh, t, tile, 0, NAME)?,
            ))
        }
    }
}

/// grid = (B·H, ceil(T / tile)), 128 threads, `smem` bytes of dynamic shared memory.
fn tiled_config(bh: usize, t: usize, tile: usize, smem: usize, name: &str) -> Result<LaunchConfig> {
    let gy = t.div_ceil(tile);
    if gy > 65535 {
        candle_core::bail!("{name}: sequence length {t} too long for the CUDA grid")
    }
    Ok(LaunchConfig {
        grid_dim: (as_i32(bh, name)? as u32, gy as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
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

/// q's shape and its [B, H, T, D], checking that each of `others` (named) has that shape too.
fn q_shape(
    q: &Layout,
    others: &[(&str, &Layout)],
    name: &str,
) -> Result<(Shape, (usize, usize, usize, usize))> {
    let shape = q.shape().clone();
    let dims = dims4(q, name, "q")?;
    for (what, l) in others {
        check_shape(l, &shape, name, what, "q")?;
    }
    Ok((shape, dims))
}

/// Pushes a dropout kernel's five draw arguments.
fn push_drop<'a>(bld: &mut LaunchArgs<'a>, drop: &'a MaskSpec) {
    bld.arg(&drop.key[0])
        .arg(&drop.key[1])
        .arg(&drop.first_block)
        .arg(&drop.threshold)
        .arg(&drop.scale);
}

/// q, k, v [B, H, T, D] → o [B, H, T, D], lse [B, H, T] f32; dropout `drop` on the
/// probabilities.
pub fn forward(
    args: &[(&CudaStorage, &Layout)],
    scale: f32,
    drop: Option<MaskSpec>,
) -> Result<Vec<(CudaStorage, Shape)>> {
    let [q, k, v] = expect_args(args, "attention", "q, k, v")?;
    with_gpu_float!(q.0.dtype(), "attention", |T| fwd::<T>(
        [q, k, v],
        scale,
        drop.as_ref()
    ))
}

fn fwd<T: GpuFloat>(
    [q, k, v]: [(&CudaStorage, &Layout); 3],
    scale: f32,
    drop: Option<&MaskSpec>,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "attention";
    let (shape, (b, h, t, d)) = q_shape(q.1, &[("k", k.1), ("v", v.1)], NAME)?;
    padded_d(d, NAME)?; // a head dim the kernels take, checked before allocating
    let kernel = choose::<T>(d, &[q.1, k.1, v.1]);
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
        let (ti, di) = (as_i32(t, NAME)?, as_i32(d, NAME)?);
        // The kernels' softmax runs on exp2: scores are scaled by scale·log2(e).
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let pass = (kernel, Pass::Forward, drop.is_some());
        let (func, cfg) = load::<T>(dev, pass, d, bh, t)?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut o)
            .arg(&mut lse)
            .arg(&ti);
        if kernel == Kernel::Fma {
            bld.arg(&di);
        }
        bld.arg(&scale_log2);
        if let Some(drop) = drop {
            push_drop(&mut bld, drop);
        }
        // SAFETY: q, k, v and o hold B·H·T·D elements, lse B·H·T; the kernel reads and writes
        // only rows < T (and columns < D) of each (b, h). The tensor-core kernel's compile-time
        // head dim is D (64 or 128) and its inputs are 16-byte aligned (`choose`).
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

/// q, k, v, o, lse, do → dq, dk, dv (q's dtype), with the forward's dropout `drop`.
pub fn backward(
    args: &[(&CudaStorage, &Layout)],
    scale: f32,
    drop: Option<MaskSpec>,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "attention backward";
    let [q, k, v, o, lse, d_o] = expect_args(args, NAME, "q, k, v, o, lse, do")?;
    with_gpu_float!(q.0.dtype(), NAME, |T| bwd::<T>(
        [q, k, v, o, d_o],
        lse,
        scale,
        drop.as_ref()
    ))
}

fn bwd<T: GpuFloat>(
    [q, k, v, o, d_o]: [(&CudaStorage, &Layout); 5],
    lse: (&CudaStorage, &Layout),
    scale: f32,
    drop: Option<&MaskSpec>,
) -> Result<Vec<(CudaStorage, Shape)>> {
    const NAME: &str = "attention backward";
    let others = [("k", k.1), ("v", v.1), ("o", o.1), ("do", d_o.1)];
    let (shape, (b, h, t, d)) = q_shape(q.1, &others, NAME)?;
    let bh = b * h;
    if lse.1.shape().elem_count() != bh * t {
        candle_core::bail!(
            "{NAME}: lse {:?} must hold B·H·T = {} values",
            lse.1.shape(),
            bh * t
        )
    }
    padded_d(d, NAME)?; // a head dim the kernels take, checked before allocating
                        // o is read only by the Δ kernel (attention.cu, any alignment).
    let kernel = choose::<T>(d, &[q.1, k.1, v.1, d_o.1]);
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

        let pass = (kernel, Pass::Backward, drop.is_some());
        let (func, cfg) = load::<T>(dev, pass, d, bh, t)?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&dov)
            .arg(&lv)
            .arg(&delta);
        bld.arg(&mut dq32).arg(&mut dk).arg(&mut dv).arg(&ti);
        if kernel == Kernel::Fma {
            bld.arg(&di);
        }
        bld.arg(&scale);
        if let Some(drop) = drop {
            push_drop(&mut bld, drop);
        }
        // SAFETY: q, k, v, do, dq32, dk and dv hold B·H·T·D elements, lse and delta B·H·T;
        // dq32 is zeroed (atomics add into it); each block writes only its own key rows of dk
        // and dv, rows < T (and columns < D). The tensor-core kernel's compile-time head dim is
        // D (64 or 128) and q, k, v, do are 16-byte aligned (`choose`).
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
