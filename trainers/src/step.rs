//! One optimizer update (forward, backward, gradient accumulation, the first step's gradient
//! checks, global-norm clipping, the update) and the parameters it trains.

use crate::amp::LossScaler;
use crate::distributed::World;
use crate::optim::{Optimizer, Param};
use crate::task;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use kiln_core::data::Batch;
use kiln_models::{Model, ModelConfig};
use std::time::Instant;

/// What one optimizer step reports.
pub struct StepOutput {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `Some((what, value))` when the loss or the gradient went non-finite; no update was made.
    pub diverged: Option<(&'static str, f64)>,
    /// Where the step's time went.
    pub times: StepTimes,
}

/// Wall time of a step's parts, in seconds (on CUDA, of their launches unless the device was
/// synchronized), and, while kernel profiling is on, the autograd graph's size.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Forward passes and losses.
    pub forward: f64,
    /// Backward passes and gradient accumulation.
    pub backward: f64,
    /// Gradient checks, the global norm, clipping and the optimizer update.
    pub update: f64,
    /// Summing the gradients over the ranks of a data-parallel job (included in `backward`).
    pub all_reduce: f64,
    /// Tensors in the autograd graphs of the step's losses (ops whose outputs need a gradient),
    /// counted only while [`kiln_kernels::profile`] is on.
    pub graph_ops: usize,
    /// The heap's peak above its size at the step's start in the forward passes, the backward
    /// passes and the update, in bytes (while the counting allocator counts; 0 otherwise).
    pub heap_peak: [i64; 3],
}

/// The heap's peaks per part of a step, relative to the step's start.
struct HeapWatch(Option<i64>);

impl HeapWatch {
    fn start() -> Self {
        kiln_core::alloc::take_peak();
        HeapWatch(kiln_core::alloc::live())
    }

    /// Raises `peak` to the heap's peak since the last call, above the step's start.
    fn note(&self, peak: &mut i64) {
        if let (Some(base), Some(p)) = (self.0, kiln_core::alloc::take_peak()) {
            *peak = (*peak).max(p - base);
        }
    }
}

/// One optimizer update: forward and backward over `batches` (gradients summed, each loss scaled
/// by 1/len), the no-gradient guard when `check`, global-norm clipping, then the update. With a
/// loss `scaler` (f16), the backward runs on the scaled loss, and a step whose gradients
/// overflow is skipped (no update) and lowers the scale.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &dyn Model,
    params: &[Param],
    optimizer: &mut dyn Optimizer,
    batches: &[Batch],
    lr: f64,
    clip_norm: f64,
    check: bool,
    scaler: Option<&mut LossScaler>,
) -> Result<StepOutput> {
    train_step_sharded(
        model, params, optimizer, batches, lr, clip_norm, check, scaler, None,
    )
}

/// A data-parallel rank's part in a step: its share of each micro-batch's examples.
pub struct Shard<'a> {
    pub world: &'a World,
    /// This rank's examples over the global micro-batch's, per micro-batch (they sum to 1 over
    /// the ranks). Each rank's loss is a mean over its examples, so weighting by the share makes
    /// the summed gradient the global batch's mean, also when the shares differ.
    pub shares: &'a [f64],
    /// BatchNorm's running statistics: each rank's forward moved them towards its own slice's
    /// statistics, so after the step they become the share-weighted mean over the ranks (as the
    /// statistics of the whole batch would have moved them, up to the variance between slices),
    /// and every rank evaluates and saves the same model.
    pub running_stats: &'a [Param],
    /// ZeRO stage 1: the rank that owns each parameter (its optimizer state and its update);
    /// None when every rank updates every parameter.
    pub owners: Option<&'a [usize]>,
}

/// [`train_step`] on one rank's slices of the global micro-batches: the gradients (and the loss)
/// are summed over the ranks after the last micro-batch (not per micro-batch), then checked,
/// clipped by the global norm and applied on every rank alike.
#[allow(clippy::too_many_arguments)]
pub fn train_step_sharded(
    model: &dyn Model,
    params: &[Param],
    optimizer: &mut dyn Optimizer,
    batches: &[Batch],
    lr: f64,
    clip_norm: f64,
    check: bool,
    mut scaler: Option<&mut LossScaler>,
    shard: Option<Shard>,
) -> Result<StepOutput> {
    let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0;
    let mut times = StepTimes::default();
    let mut clock = Instant::now();
    let heap = HeapWatch::start();
    let out = |loss, grad_norm, diverged, times| StepOutput {
        loss,
        grad_norm,
        diverged,
        times,
    };
    for (i, batch) in batches.iter().enumerate() {
        let loss = match &batch.mix {
            None => model.loss(&batch.inputs, &batch.targets, true)?,
            // Mixup/CutMix: the images are blended, so is the loss over both label sets.
            Some((partner, lambda)) => {
                let logits = model.forward(&batch.inputs, true)?;
                let first = (task::loss(&logits, &batch.targets)? * *lambda)?;
                (first + (task::loss(&logits, partner)? * (1.0 - lambda))?)?
            }
        };
        let value = loss.to_scalar::<f32>()? as f64;
        times.forward += lap(&mut clock);
        heap.note(&mut times.heap_peak[0]);
        // A rank alone must not leave the step: the others would wait for it in the all-reduce,
        // where the non-finite loss reaches every rank.
        if !value.is_finite() && shard.is_none() {
            return Ok(out(value, f64::NAN, Some(("loss", value)), times));
        }
        if kiln_kernels::profile::enabled() {
            times.graph_ops += loss.sorted_nodes().len();
            lap(&mut clock);
        }
        let weight = match &shard {
            None => loss_scale / batches.len() as f64,
            Some(s) => loss_scale * s.shares[i] / batches.len() as f64,
        };
        loss_sum += match &shard {
            None => value,
            Some(s) => value * s.shares[i],
        };
        let store = kiln_kernels::backward(&(loss * weight)?)?;
        accumulate(&mut grads, params, &store)?;
        times.backward += lap(&mut clock);
        heap.note(&mut times.heap_peak[1]);
    }
    if let Some(s) = &shard {
        check_missing(params, &grads)?;
        let mut total = [loss_sum];
        s.world.sum_f64(&mut total)?;
        loss_sum = total[0];
        all_reduce(s.world, &mut grads)?;
        let share = s.shares.iter().sum::<f64>() / batches.len() as f64;
        average_running_stats(s.world, s.running_stats, share)?;
        times.all_reduce = clock.elapsed().as_secs_f64();
        times.backward += lap(&mut clock);
        if !loss_sum.is_finite() {
            let loss = loss_sum / batches.len() as f64;
            return Ok(out(loss, f64::NAN, Some(("loss", loss)), times));
        }
    }
    let loss = loss_sum / batches.len() as f64;
    if check {
        // Under loss scaling an overflow on the first step is expected (the scaler backs off),
        // so only missing gradients are refused there.
        match scaler {
            None => check_gradients(params, &grads)?,
            Some(_) => check_missing(params, &grads)?,
        }
    }
    let grads: Vec<Tensor> = grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| {
            g.with_context(|| format!("{} lost its gradient after the first step", p.name))
        })
        .collect::<Result<_>>()?;
    let grad_norm = global_norm(&grads)? / loss_scale;
    if let Some(s) = scaler.as_mut() {
        if !s.update(grad_norm.is_finite()) {
            times.update += lap(&mut clock);
            return Ok(out(loss, grad_norm, None, times));
        }
    }
    if !grad_norm.is_finite() {
        times.update += lap(&mut clock);
        return Ok(out(
            loss,
            grad_norm,
            Some(("gradient norm", grad_norm)),
            times,
        ));
    }
    let clip = if clip_norm > 0.0 && grad_norm > clip_norm {
        clip_norm / (grad_norm + 1e-6)
    } else {
        1.0
    };
    match shard.as_ref().and_then(|s| Some((s.world, s.owners?))) {
        // ZeRO-1: this rank's share of the update, then every rank gets every parameter.
        Some((world, owners)) => {
            let (mine, mine_grads): (Vec<Param>, Vec<Tensor>) = (params.iter().zip(&grads))
                .zip(owners)
                .filter(|(_, &owner)| owner == world.rank())
                .map(|((p, g), _)| (p.clone(), g.clone()))
                .unzip();
            optimizer.step(&mine, &mine_grads, lr, clip / loss_scale)?;
            share_updates(world, params, owners)?;
        }
        None => optimizer.step(params, &grads, lr, clip / loss_scale)?,
    }
    times.update += lap(&mut clock);
    heap.note(&mut times.heap_peak[2]);
    Ok(out(loss, grad_norm, None, times))
}

/// Elements per all-reduce: large enough to amortize each call, small enough to bound the copy.
const BUCKET: usize = 1 << 22;

/// Sums the gradients over the ranks in f32 (MPI has no bf16), in buckets of whole parameters in
/// the parameters' (sorted) order: on the GPUs with NCCL when the job has connected them, else
/// through host memory with MPI.
fn all_reduce(world: &World, grads: &mut [Option<Tensor>]) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let lens: Vec<usize> = grads
        .iter()
        .map(|g| g.as_ref().map_or(0, Tensor::elem_count))
        .collect();
    for range in buckets(&lens) {
        let bucket = &mut grads[range];
        let flat = bucket
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if !flat.is_empty() {
            let summed = sum_over_ranks(world, &Tensor::cat(&flat, 0)?)?;
            let mut offset = 0;
            for g in bucket.iter_mut().flatten() {
                let len = g.elem_count();
                *g = summed
                    .narrow(0, offset, len)?
                    .reshape(g.shape())?
                    .to_dtype(g.dtype())?;
                offset += len;
            }
        }
    }
    Ok(())
}

/// Consecutive ranges of tensors of `lens` elements: each at least one tensor and, beyond its
/// first, at most `BUCKET` elements in all.
fn buckets(lens: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let (mut end, mut n) = (start, 0);
        while end < lens.len() && (end == start || n + lens[end] <= BUCKET) {
            n += lens[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The element-wise sum over the ranks of the f32 vector `flat`.
fn sum_over_ranks(world: &World, flat: &Tensor) -> Result<Tensor> {
    #[cfg(all(feature = "distributed", feature = "cuda"))]
    if let Some(nccl) = world.nccl() {
        return nccl.sum(flat);
    }
    let mut host = flat.to_vec1::<f32>()?;
    world.sum_f32(&mut host)?;
    Ok(Tensor::from_vec(host, flat.shape(), flat.device())?)
}

/// After a ZeRO-1 update: every rank's parameters become their owners' updated values, through
/// all-gathers of each rank's parameters in buckets of whole parameters (parameter order, up to
/// `BUCKET` elements, so no rank ever holds a second copy of the model), in f32 (f64 when a
/// parameter is f64), through host memory.
fn share_updates(world: &World, params: &[Param], owners: &[usize]) -> Result<()> {
    let wide = params.iter().any(|p| p.var.dtype() == DType::F64);
    let lens: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
    for r in buckets(&lens) {
        share_bucket(world, &params[r.clone()], &owners[r], wide)?;
    }
    Ok(())
}

/// [`share_updates`] for one bucket of parameters.
fn share_bucket(world: &World, params: &[Param], owners: &[usize], wide: bool) -> Result<()> {
    let flat_of = |p: &Param| -> candle_core::Result<Tensor> {
        let t = p.var.as_tensor().flatten_all()?;
        t.to_dtype(if wide { DType::F64 } else { DType::F32 })
    };
    let mut counts = vec![0usize; world.size()];
    for (p, &o) in params.iter().zip(owners) {
        counts[o] += p.var.elem_count();
    }
    let mine = (params.iter().zip(owners))
        .filter(|(_, &o)| o == world.rank())
        .map(|(p, _)| flat_of(p))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let gathered = match mine.is_empty() {
        true => None,
        false => Some(Tensor::cat(&mine, 0)?),
    };
    let all = match wide {
        true => {
            let mine = gathered.map_or(Ok(Vec::new()), |t| t.to_vec1::<f64>())?;
            let all = world.all_gather_f64(&mine, &counts)?;
            let n = all.len();
            Tensor::from_vec(all, n, &Device::Cpu)
        }
        false => {
            let mine = gathered.map_or(Ok(Vec::new()), |t| t.to_vec1::<f32>())?;
            let all = world.all_gather_f32(&mine, &counts)?;
            let n = all.len();
            Tensor::from_vec(all, n, &Device::Cpu)
        }
    };
    let all = all?;
    // Rank r's block starts after the blocks of ranks < r; inside it, r's parameters in order.
    let mut at: Vec<usize> = counts
        .iter()
        .scan(0, |sum, &c| {
            let start = *sum;
            *sum += c;
            Some(start)
        })
        .collect();
    for (p, &o) in params.iter().zip(owners) {
        let len = p.var.elem_count();
        if o != world.rank() {
            let t = p.var.as_tensor();
            let value = all.narrow(0, at[o], len)?.reshape(t.shape())?;
            p.var
                .set(&value.to_dtype(t.dtype())?.to_device(t.device())?)?;
        }
        at[o] += len;
    }
    Ok(())
}

/// Sets every rank's `stats` to their sum over the ranks weighted by `share` (this rank's part
/// of the step's examples; the shares sum to 1), in place: the model reads them through shared
/// storage.
fn average_running_stats(world: &World, stats: &[Param], share: f64) -> Result<()> {
    if stats.is_empty() {
        return Ok(());
    }
    let mut flat = Vec::new();
    for p in stats {
        let t = p.var.as_tensor().to_dtype(DType::F64)?.flatten_all()?;
        flat.extend(t.to_vec1::<f64>()?.into_iter().map(|x| x * share));
    }
    world.sum_f64(&mut flat)?;
    let mut offset = 0;
    for p in stats {
        let t = p.var.as_tensor();
        let len = t.elem_count();
        let mean = Tensor::from_slice(&flat[offset..offset + len], t.shape(), t.device())?
            .to_dtype(t.dtype())?;
        p.var.set(&mean)?;
        offset += len;
    }
    Ok(())
}

/// Seconds since `clock`, which restarts (after the device's queued work, while kernel
/// profiling waits for it: see `kiln_kernels::profile::wait_for`).
fn lap(clock: &mut Instant) -> f64 {
    kiln_kernels::profile::wait();
    let now = Instant::now();
    let dt = (now - *clock).as_secs_f64();
    *clock = now;
    dt
}

/// Trainable parameters (all of them, or with LoRA the adapters and the head), sorted by name
/// so every run visits them in the same order.
pub fn params_of(varmap: &VarMap, cfg: &ModelConfig) -> Vec<Param> {
    params_where(varmap, |name| cfg.trainable(name))
}

/// The parameters whose names `keep` selects, sorted by name.
pub fn params_where(varmap: &VarMap, keep: impl Fn(&str) -> bool) -> Vec<Param> {
    let mut params: Vec<Param> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    params
}

/// Adds this micro-batch's gradients to the running sums. Gradients are detached: candle records
/// the ops that computed them, and a kept reference would keep the whole step's graph (and, via
/// the optimizer moments, every earlier step's) alive.
fn accumulate(grads: &mut [Option<Tensor>], params: &[Param], store: &GradStore) -> Result<()> {
    for (acc, p) in grads.iter_mut().zip(params) {
        if let Some(g) = store.get(p.var.as_tensor()).map(Tensor::detach) {
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// Refuses to train when a trainable parameter gets no gradient (an op without a backward cut
/// the graph, or the parameter is unused) or a non-finite one.
pub fn check_gradients(params: &[Param], grads: &[Option<Tensor>]) -> Result<()> {
    check_missing(params, grads)?;
    check_finite(params, grads)
}

fn check_missing(params: &[Param], grads: &[Option<Tensor>]) -> Result<()> {
    let missing: Vec<&str> = params
        .iter()
        .zip(grads)
        .filter(|(_, g)| g.is_none())
        .map(|(p, _)| p.name.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "refusing to train: {} trainable parameter(s) received no gradient: {}. An op without \
             a backward pass (e.g. candle-nn's fused layer_norm/softmax) or an unused or detached \
             parameter cuts them off; use kiln's ops from kiln-kernels",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(())
}

fn check_finite(params: &[Param], grads: &[Option<Tensor>]) -> Result<()> {
    let mut bad = Vec::new();
    for (p, g) in params.iter().zip(grads) {
        let g = g.as_ref().expect("checked above");
        let sum = g
            .to_dtype(DType::F32)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !sum.is_finite() {
            bad.push(p.name.as_str());
        }
    }
    if !bad.is_empty() {
        bail!(
            "refusing to train: non-finite gradients before the first update for: {}. Check the \
             data for NaN/Inf and the model's initialization",
            bad.join(", ")
        );
    }
    Ok(())
}

fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let squares = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&squares, 0)?
        .sum_all()?
        .to_scalar::<f32>()?
        .sqrt() as f64)
}
