//! Launches `cuda/dropout.cu`: the mask drawn on the device, one thread per Philox block of
//! four elements, 256-thread blocks, grid-stride. No host data, no synchronization.

use super::{alloc, ptx, with_gpu_float, GpuFloat};
use crate::dropout::MaskSpec;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Result};

const MODULE: &str = "kiln_dropout";

/// The mask of `n` elements in `dtype` described by `spec`.
pub fn mask(dev: &CudaDevice, n: usize, dtype: DType, spec: &MaskSpec) -> Result<CudaStorage> {
    with_gpu_float!(dtype, "dropout", |T| launch::<T>(dev, n, spec))
}

fn launch<T: GpuFloat>(dev: &CudaDevice, n: usize, spec: &MaskSpec) -> Result<CudaStorage> {
    let mut out = alloc::<T>(dev, n)?;
    if n > 0 {
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("dropout_mask"), MODULE, ptx::DROPOUT)?;
        let mut b = func.builder();
        let [k0, k1] = spec.key;
        b.arg(&mut out)
            .arg(&n)
            .arg(&k0)
            .arg(&k1)
            .arg(&spec.first_block)
            .arg(&spec.threshold)
            .arg(&spec.scale);
        let blocks = n.div_ceil(4);
        let cfg = LaunchConfig {
            grid_dim: (blocks.div_ceil(256).clamp(1, 65536) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dropout_mask(mask[n], n, k0, k1, first_block, threshold, scale) writes each of
        // the n elements once.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
