//! `kiln bench`: the training step of a recipe, timed. The model, optimizer, precision and data
//! pipeline are the trainer's own; after `warmup` untimed steps, `steps` steps are timed one
//! by one with the device synchronized at each end, so a figure is a whole step as training
//! runs it (data, forward, backward, clipping, AdamW).
//!
//! FLOPs per token follow nanoGPT's `estimate_mfu` (each decoder's `ModelSpec::flops_per_token`).
//! MFU divides the achieved rate by the card's dense bf16 peak.

use crate::amp::{self, LossScaler};
use crate::optim;
use crate::step::StepTimes;
use crate::trainer::{params_of, train_step};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use kiln_core::alloc::AllocCount;
use kiln_core::data;
use kiln_core::recipe::Recipe;
use kiln_models::{ModelConfig, SharedRng};
use serde::Serialize;
use std::time::Instant;

/// Dense bf16 tensor-core peak of an H100 SXM / H200 (NVIDIA's data sheets: 989.4 TFLOP/s
/// without sparsity), the reference the issue tracker and nanoGPT-style MFU figures use.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

pub struct BenchOptions {
    pub steps: usize,
    pub warmup: usize,
    pub device: Option<String>,
    /// Peak TFLOP/s for MFU (default: the H100/H200 bf16 peak on CUDA, none on the CPU).
    pub peak_tflops: Option<f64>,
    /// Also report where the time goes ([`Profile`]).
    pub profile: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub recipe: String,
    pub device: String,
    pub precision: String,
    pub parameters: usize,
    /// Tokens (language models) or examples per optimizer step.
    pub items_per_step: usize,
    pub item: &'static str,
    pub steps: usize,
    pub ms_per_step_median: f64,
    pub ms_per_step_mean: f64,
    pub ms_per_step_min: f64,
    pub items_per_second: f64,
    /// Training FLOPs per step (language models).
    pub flops_per_step: Option<f64>,
    pub achieved_tflops: Option<f64>,
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    /// Peak memory in bytes, and what was measured.
    pub peak_memory_bytes: Option<u64>,
    pub memory_measure: &'static str,
    pub final_loss: f64,
    /// With `--profile`: where the timed steps' time went.
    pub profile: Option<Profile>,
}

/// Where the timed steps' time went, per step (means over the timed steps).
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Forward passes and losses; backward passes and gradient accumulation; gradient norm,
    /// clipping and the optimizer update; and the rest of the step (the batch: waiting on the
    /// loader and copying it to the device).
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub update_ms: f64,
    pub data_ms: f64,
    /// Tensors in the autograd graph of a step (ops whose outputs need a gradient).
    pub graph_ops: f64,
    /// Heap allocations and bytes allocated per step (the `kiln` binary's counting allocator;
    /// `None` where another allocator is installed).
    pub allocations: Option<f64>,
    pub allocated_bytes: Option<f64>,
    /// The heap's highest point above its size at a step's start, in the forward passes, the
    /// backward passes and the update (bytes, the most over the timed steps; same allocator).
    pub heap_peak_forward_bytes: Option<i64>,
    pub heap_peak_backward_bytes: Option<i64>,
    pub heap_peak_update_bytes: Option<i64>,
    /// kiln's fused ops, slowest first: calls and time per step in each pass.
    pub fused_ops: Vec<OpTime>,
    /// Whether each op and pass waited for the device (CUDA), so its time is its kernels'.
    pub waited_for_device: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub pass: &'static str,
    pub calls: f64,
    pub ms: f64,
}

pub fn bench(recipe: &Recipe, o: &BenchOptions) -> Result<BenchReport> {
    anyhow::ensure!(o.steps > 0, "--steps must be at least 1");
    let device = kiln_core::device::open_device(o.device.as_deref().unwrap_or(&recipe.device))?;
    let data = data::load(recipe)?;
    let input_shape = crate::trainer::input_shape(&data);
    let cfg = ModelConfig::from_recipe(recipe, data.num_classes, &input_shape)?;
    crate::memory::check_fits(recipe, &cfg, &input_shape, &device, 1)?;
    let varmap = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&varmap, recipe.seed, DType::F32, &device);
    let compute = amp::compute_dtype(recipe.precision);
    let model = cfg.build(vb, SharedRng::new(recipe.seed, "dropout"), compute)?;
    let params = params_of(&varmap, &cfg);
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let mut optimizer = optim::build(&recipe.optim);
    let mut scaler = LossScaler::for_precision(recipe.precision);
    let d = &recipe.data;
    let loader = crate::trainer::loader(recipe, &data, 0)?;
    let grad_accum = recipe.trainer.grad_accum;
    let items_per_step = d.batch_size * grad_accum * data.train.items_per_example();

    let mut times = Vec::with_capacity(o.steps);
    let mut loss = f64::NAN;
    let mut mem = MemoryProbe::new(&device);
    let mut parts = StepTimes::default();
    let mut allocs_before = None;
    for i in 0..o.warmup + o.steps {
        if i == o.warmup && o.profile {
            kiln_kernels::profile::take();
            // On CUDA each op and pass waits for the device, so their times are the kernels'.
            kiln_kernels::profile::wait_for(device.is_cuda().then(|| device.clone()));
            kiln_kernels::profile::enable(true);
            kiln_core::alloc::enable(true);
            allocs_before = kiln_core::alloc::count();
        }
        let started = Instant::now();
        let batches = (0..grad_accum)
            .map(|_| Ok(loader.next_batch()?.1.to_device(&device)?))
            .collect::<Result<Vec<_>>>()?;
        let out = train_step(
            model.as_ref(),
            &params,
            optimizer.as_mut(),
            &batches,
            recipe.optim.lr,
            recipe.trainer.clip_grad_norm,
            i == 0,
            scaler.as_mut(),
        )?;
        device.synchronize()?;
        if let Some((what, value)) = out.diverged {
            bail!("step {i}: {what} is {value}; the benchmark needs a stable recipe");
        }
        loss = out.loss;
        mem.sample();
        if i >= o.warmup {
            times.push(started.elapsed().as_secs_f64());
            parts.forward += out.times.forward;
            parts.backward += out.times.backward;
            parts.update += out.times.update;
            parts.graph_ops += out.times.graph_ops;
            for (peak, step) in parts.heap_peak.iter_mut().zip(out.times.heap_peak) {
                *peak = (*peak).max(step);
            }
        }
    }
    let profile = o.profile.then(|| {
        kiln_kernels::profile::enable(false);
        kiln_kernels::profile::wait_for(None);
        kiln_core::alloc::enable(false);
        let allocs = kiln_core::alloc::count().zip(allocs_before);
        Profile::new(&times, &parts, allocs, device.is_cuda())
    });

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let flops_per_step = (cfg.spec().flops_per_token(n_params)).map(|f| f * items_per_step as f64);
    let peak = o.peak_tflops.or(match device {
        Device::Cuda(_) => Some(H100_BF16_PEAK_TFLOPS),
        _ => None,
    });
    let achieved = flops_per_step.map(|f| f / median / 1e12);
    let (peak_memory_bytes, memory_measure) = mem.finish();
    Ok(BenchReport {
        recipe: recipe.name.clone(),
        device: kiln_core::device::device_name(&device),
        precision: format!("{:?}", recipe.precision).to_lowercase(),
        parameters: n_params,
        items_per_step,
        item: if data.train.items_per_example() > 1 {
            "tokens"
        } else {
            "examples"
        },
        steps: o.steps,
        ms_per_step_median: median * 1e3,
        ms_per_step_mean: mean * 1e3,
        ms_per_step_min: sorted[0] * 1e3,
        items_per_second: items_per_step as f64 / median,
        flops_per_step,
        achieved_tflops: achieved,
        peak_tflops: peak,
        mfu: achieved.zip(peak).map(|(a, p)| a / p),
        peak_memory_bytes,
        memory_measure,
        final_loss: loss,
        profile,
    })
}

impl Profile {
    /// From the timed steps' wall `times`, the sums of their `parts`, the allocation counts
    /// (after, before) and the fused ops' table collected meanwhile.
    fn new(
        times: &[f64],
        parts: &StepTimes,
        allocs: Option<(AllocCount, AllocCount)>,
        waited: bool,
    ) -> Self {
        let n = times.len() as f64;
        let per_step_ms = |s: f64| 1e3 * s / n;
        let total: f64 = times.iter().sum();
        let accounted = parts.forward + parts.backward + parts.update;
        let mut fused_ops: Vec<OpTime> = kiln_kernels::profile::take()
            .into_iter()
            .map(|((op, pass), s)| OpTime {
                op,
                pass: pass.name(),
                calls: s.calls as f64 / n,
                ms: per_step_ms(s.seconds),
            })
            .collect();
        fused_ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Profile {
            forward_ms: per_step_ms(parts.forward),
            backward_ms: per_step_ms(parts.backward),
            update_ms: per_step_ms(parts.update),
            data_ms: per_step_ms((total - accounted).max(0.0)),
            graph_ops: parts.graph_ops as f64 / n,
            allocations: allocs.map(|(a, b)| (a.allocations - b.allocations) as f64 / n),
            allocated_bytes: allocs.map(|(a, b)| (a.bytes - b.bytes) as f64 / n),
            heap_peak_forward_bytes: allocs.map(|_| parts.heap_peak[0]),
            heap_peak_backward_bytes: allocs.map(|_| parts.heap_peak[1]),
            heap_peak_update_bytes: allocs.map(|_| parts.heap_peak[2]),
            fused_ops,
            waited_for_device: waited,
        }
    }

    /// The report's lines: the step's parts, then kiln's fused ops against the rest.
    fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "profile      forward {:.2} ms, backward {:.2} ms, update {:.2} ms, batch {:.2} ms",
            self.forward_ms, self.backward_ms, self.update_ms, self.data_ms
        )];
        out.push(format!("graph        {:.0} ops per step", self.graph_ops));
        if self.waited_for_device {
            out.push(
                "device       each fused op and pass waited for the device: kernel times, in a \
                 step slowed by the waits"
                    .into(),
            );
        }
        if let (Some(n), Some(b)) = (self.allocations, self.allocated_bytes) {
            out.push(format!(
                "allocations  {n:.0} per step, {:.1} MiB",
                b / (1024.0 * 1024.0)
            ));
        }
        if let (Some(f), Some(b), Some(u)) = (
            self.heap_peak_forward_bytes,
            self.heap_peak_backward_bytes,
            self.heap_peak_update_bytes,
        ) {
            let mib = |x: i64| x as f64 / (1024.0 * 1024.0);
            out.push(format!(
                "heap peak    above the step's start: forward {:+.1} MiB, backward {:+.1} MiB, \
                 update {:+.1} MiB",
                mib(f),
                mib(b),
                mib(u)
            ));
        }
        let in_pass = |pass: &str| -> f64 {
            (self.fused_ops.iter())
                .filter(|o| o.pass == pass)
                .map(|o| o.ms)
                .sum()
        };
        for (pass, total) in [("forward", self.forward_ms), ("backward", self.backward_ms)] {
            let fused = in_pass(pass);
            out.push(format!(
                "{pass:<12} kiln's fused ops {fused:.2} ms, candle's ops (matmuls, \
                 element-wise, copies, reductions) and autograd {:.2} ms",
                (total - fused).max(0.0)
            ));
        }
        out.push(format!(
            "{:<34} {:>8} {:>8} {:>9}",
            "fused op", "pass", "calls", "ms/step"
        ));
        for o in &self.fused_ops {
            out.push(format!(
                "{:<34} {:>8} {:>8.1} {:>9.3}",
                o.op, o.pass, o.calls, o.ms
            ));
        }
        out
    }
}

/// The process's peak resident memory on the CPU. On CUDA, where candle allocates from the
/// device's memory pool (cuMemAllocAsync), the pool's high-water mark of memory in use by
/// allocations since the probe was made (what PyTorch's `max_memory_allocated` counts: it sees
/// the peak inside a step); on a device without pools, the most memory in use (total − free,
/// cached blocks included) seen after any step.
struct MemoryProbe {
    cuda: bool,
    peak: u64,
    #[cfg(feature = "cuda")]
    pool: Option<pool::Pool>,
}

impl MemoryProbe {
    fn new(device: &Device) -> Self {
        MemoryProbe {
            cuda: device.is_cuda(),
            peak: 0,
            #[cfg(feature = "cuda")]
            pool: match device {
                Device::Cuda(dev) => pool::Pool::current(dev),
                _ => None,
            },
        }
    }

    fn sample(&mut self) {
        if self.cuda {
            #[cfg(feature = "cuda")]
            if let Ok((free, total)) =
                candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            {
                self.peak = self.peak.max((total - free) as u64);
            }
        }
    }

    fn finish(self) -> (Option<u64>, &'static str) {
        if self.cuda {
            #[cfg(feature = "cuda")]
            if let Some(high) = self.pool.as_ref().and_then(pool::Pool::used_high) {
                return (
                    Some(high),
                    "peak device memory in use by allocations (memory pool high-water mark)",
                );
            }
            return (
                (self.peak > 0).then_some(self.peak),
                "device memory in use (total − free), highest after any step",
            );
        }
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
        let rss = ok.then(|| unsafe { usage.assume_init() }.ru_maxrss as u64 * 1024);
        (rss, "peak resident set size of the process")
    }
}

/// The CUDA memory pool candle's allocations come from, and its high-water mark.
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    pub struct Pool(sys::CUmemoryPool);

    impl Pool {
        /// The device's current pool with its high-water mark reset to the memory in use now;
        /// None where the device has no pools (candle then allocates with cuMemAlloc) or a
        /// call fails.
        pub fn current(dev: &CudaDevice) -> Option<Pool> {
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                return None;
            }
            ctx.bind_to_thread().ok()?;
            let mut pool = std::ptr::null_mut();
            // SAFETY: writes the device's current pool handle into `pool`.
            unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
                .result()
                .ok()?;
            let mut zero = 0u64;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            // SAFETY: USED_MEM_HIGH is a cuuint64_t; setting it to 0 resets the mark.
            unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast()) }
                .result()
                .ok()?;
            Some(Pool(pool))
        }

        /// The most memory in use by allocations from the pool since `current`.
        pub fn used_high(&self) -> Option<u64> {
            let mut high = 0u64;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            // SAFETY: USED_MEM_HIGH is read into a cuuint64_t.
            unsafe { sys::cuMemPoolGetAttribute(self.0, attr, (&mut high as *mut u64).cast()) }
                .result()
                .ok()?;
            (high > 0).then_some(high)
        }
    }
}

impl BenchReport {
    /// The human-readable summary.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "{} on {} ({}, {} parameters): {} timed steps",
                self.recipe, self.device, self.precision, self.parameters, self.steps
            ),
            format!(
                "ms/step      {:.2} median, {:.2} mean, {:.2} min",
                self.ms_per_step_median, self.ms_per_step_mean, self.ms_per_step_min
            ),
            format!(
                "{:<12} {:.0}/s ({} per step)",
                self.item, self.items_per_second, self.items_per_step
            ),
        ];
        if let Some(a) = self.achieved_tflops {
            out.push(format!("TFLOP/s      {a:.3}"));
        }
        out.push(match (self.mfu, self.peak_tflops) {
            (Some(m), Some(p)) => format!("MFU          {:.1}% of {p} TFLOP/s", 100.0 * m),
            _ => "MFU          n/a (no peak for this device: pass --peak-tflops)".into(),
        });
        out.push(match self.peak_memory_bytes {
            Some(b) => format!(
                "peak memory  {:.1} MiB ({})",
                b as f64 / (1024.0 * 1024.0),
                self.memory_measure
            ),
            None => "peak memory  n/a".into(),
        });
        if let Some(p) = &self.profile {
            out.extend(p.lines());
        }
        out
    }
}
