//! Tasks: how logits and targets become a loss and metrics.

use candle_core::{Result, Tensor, D};
use kiln_core::data::{eval_batches, Examples};
use kiln_core::recipe::Task;
use kiln_models::Model;
use std::collections::BTreeMap;

/// Mean cross-entropy of logits (…, C) against targets (…).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    kiln_kernels::cross_entropy(&logits.reshape(((), c))?, &targets.flatten_all()?)
}

/// Evaluates `model` on a split: `{prefix}/loss` plus `{prefix}/accuracy` (classification) or
/// `{prefix}/perplexity` (language models). Metrics are averaged over targets, not batches.
pub fn evaluate(
    model: &dyn Model,
    task: Task,
    examples: &dyn Examples,
    batch_size: usize,
    max_batches: Option<usize>,
    device: &candle_core::Device,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let (mut loss_sum, mut correct, mut count) = (0.0f64, 0u64, 0u64);
    for host in eval_batches(examples, batch_size, max_batches) {
        let batch = host.to_device(device)?;
        let logits = model.forward(&batch.inputs, false)?;
        let n = host.targets.len() as u64;
        loss_sum += loss(&logits, &batch.targets)?.to_scalar::<f32>()? as f64 * n as f64;
        if task == Task::Classification {
            let pred = logits.argmax(D::Minus1)?;
            correct += pred
                .eq(&batch.targets)?
                .to_dtype(candle_core::DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()? as u64;
        }
        count += n;
    }
    anyhow::ensure!(count > 0, "the {prefix} split is empty");
    let mean = loss_sum / count as f64;
    let mut out = BTreeMap::from([(format!("{prefix}/loss"), mean)]);
    match task {
        Task::Classification => {
            out.insert(format!("{prefix}/accuracy"), correct as f64 / count as f64);
        }
        Task::LanguageModel => {
            out.insert(format!("{prefix}/perplexity"), mean.exp());
        }
    }
    Ok(out)
}
