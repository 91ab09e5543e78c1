//! Launches `cuda/adamw.cu`: the tensors are grouped by (gradient dtype, copy dtype), one table
//! of pointers for all groups goes to the device in a single copy, and each group is one launch
//! of 256-thread blocks, one block per `CHUNK` elements of a tensor.

use super::ptx;
use crate::adamw::{AdamWHyper, AdamWTensor};
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Device, Layout, Result, Storage};

const MODULE: &str = "kiln_adamw";
/// Elements per block: 4 unrolled iterations of 256 threads × 4 elements (see adamw.cu).
const CHUNK: usize = 4096;
const THREADS: u32 = 256;
/// u64 entries per tensor in the table (param, grad, m, v, copy, count, decay, chunk start),
/// plus one closing chunk start per group.
const FIELDS: usize = 8;

/// (gradient dtype, copy dtype): one kernel instantiation, one launch.
type GroupKey = (DType, Option<DType>);

/// Updates every tensor in place (see `crate::adamw` for the formula); all tensors must be on
/// the same CUDA device.
pub fn step(tensors: &[AdamWTensor], hyper: &AdamWHyper) -> Result<()> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    let device = first.param.device().clone();
    let Device::Cuda(dev) = &device else {
        candle_core::bail!(
            "adamw: the CUDA step got tensors on {:?}",
            device.location()
        )
    };
    for t in tensors {
        check(t, &device)?;
    }

    // Groups by (grad dtype, copy dtype), in order of first appearance.
    let mut groups: Vec<(GroupKey, Vec<usize>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let key = (t.grad.dtype(), t.copy.map(|c| c.dtype()));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }

    // Read guards on every storage, held until all launches are enqueued.
    let guards: Vec<_> = tensors
        .iter()
        .map(|t| {
            [
                Some(t.param.storage_and_layout()),
                Some(t.grad.storage_and_layout()),
                Some(t.m.storage_and_layout()),
                Some(t.v.storage_and_layout()),
                t.copy.map(|c| c.storage_and_layout()),
            ]
        })
        .collect();
    let stream = dev.cuda_stream();
    // SAFETY (writing through pointers taken from read guards): the kernel writes param, m, v
    // and copy in place. The optimizer owns the moments, and parameters and their copies are
    // only updated between steps, on this device's single stream, with no concurrent reader or
    // writer; stream order makes earlier kernels' reads of the parameters finish first and
    // later kernels see the update.
    let mut syncs: Vec<SyncOnDrop> = Vec::new();
    let mut ptrs: Vec<[u64; 5]> = Vec::with_capacity(tensors.len());
    for g in &guards {
        let mut p = [0u64; 5];
        for (slot, gl) in p.iter_mut().zip(g) {
            if let Some((storage, layout)) = gl {
                let Storage::Cuda(s) = &**storage else {
                    candle_core::bail!("adamw: a tensor is not on the CUDA device")
                };
                let (ptr, sync) = device_ptr(s, layout, &stream)?;
                *slot = ptr;
                syncs.push(sync);
            }
        }
        ptrs.push(p);
    }

    // One table for all groups: per group, FIELDS arrays of n u64 and the closing chunk start.
    let mut table: Vec<u64> = Vec::new();
    let mut launches = Vec::new();
    for ((grad_dtype, copy_dtype), members) in &groups {
        let n = members.len();
        let offset = table.len();
        table.resize(offset + FIELDS * n + 1, 0);
        let t = &mut table[offset..];
        let mut chunks = 0usize;
        for (j, &i) in members.iter().enumerate() {
            for (f, &ptr) in ptrs[i].iter().enumerate() {
                t[f * n + j] = ptr;
            }
            let numel = tensors[i].param.elem_count();
            t[5 * n + j] = numel as u64;
            t[6 * n + j] = tensors[i].weight_decay.to_bits() as u64;
            t[7 * n + j] = chunks as u64;
            chunks += numel.div_ceil(CHUNK);
        }
        t[8 * n] = chunks as u64;
        if chunks > i32::MAX as usize || n > u32::MAX as usize {
            candle_core::bail!("adamw: too many elements for one launch ({chunks} chunks)")
        }
        if chunks > 0 {
            let name = format!(
                "adamw_{}_{}",
                grad_dtype.as_str(),
                copy_dtype.map_or("none", |d| d.as_str())
            );
            launches.push((name, offset, n, chunks));
        }
    }
    let table_dev = dev.clone_htod(&table)?;
    let h = hyper;
    for (name, offset, n, chunks) in launches {
        let view = table_dev.slice(offset..offset + FIELDS * n + 1);
        let (n, chunk) = (n as u32, CHUNK as u32);
        let func = dev.get_or_load_custom_func(&name, MODULE, ptx::ADAMW)?;
        let mut b = func.builder();
        b.arg(&view).arg(&n).arg(&chunk);
        b.arg(&h.lr).arg(&h.beta1).arg(&h.beta2).arg(&h.eps);
        b.arg(&h.bias_correction1)
            .arg(&h.bias_correction2)
            .arg(&h.grad_scale);
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the table holds, for each of the group's n tensors, valid device pointers to
        // contiguous buffers of its element count (checked above), kept alive by `guards`.
        unsafe { b.launch(cfg) }.w()?;
    }
    drop(syncs);
    drop(guards);
    Ok(())
}

/// The checks whose failure would make the kernel read or write out of bounds.
fn check(t: &AdamWTensor, device: &Device) -> Result<()> {
    let n = t.param.elem_count();
    let named = [
        ("param", Some(t.param)),
        ("grad", Some(t.grad)),
        ("exp_avg", Some(t.m)),
        ("exp_avg_sq", Some(t.v)),
        ("copy", t.copy),
    ];
    for (what, x) in named {
        let Some(x) = x else { continue };
        if !x.device().same_device(device) {
            candle_core::bail!(
                "adamw: {what} is on {:?}, not the CUDA device",
                x.device().location()
            )
        }
        if x.elem_count() != n || !x.is_contiguous() {
            candle_core::bail!("adamw: {what} must be contiguous with {n} elements")
        }
    }
    if [t.param, t.m, t.v].iter().any(|x| x.dtype() != DType::F32) {
        candle_core::bail!("adamw: weights and moments must be f32");
    }
    if !matches!(t.grad.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "adamw: unsupported gradient dtype {:?} on CUDA",
            t.grad.dtype()
        )
    }
    if let Some(c) = t.copy {
        if !matches!(c.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("adamw: unsupported copy dtype {:?} on CUDA", c.dtype())
        }
    }
    Ok(())
}

/// The device address of a tensor's first element (its layout's start offset applied).
fn device_ptr<'a>(
    s: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("adamw: tensors must be contiguous")
    };
    let (ptr, sync, size) = match &s.slice {
        CudaStorageSlice::F32(x) => {
            let (p, s) = x.device_ptr(stream);
            (p, s, 4)
        }
        CudaStorageSlice::BF16(x) => {
            let (p, s) = x.device_ptr(stream);
            (p, s, 2)
        }
        CudaStorageSlice::F16(x) => {
            let (p, s) = x.device_ptr(stream);
            (p, s, 2)
        }
        _ => candle_core::bail!("adamw: unsupported dtype on CUDA"),
    };
    Ok((ptr + (start * size) as u64, sync))
}
