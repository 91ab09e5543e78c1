//! Tasks: how logits and targets become a loss and metrics.

use crate::distributed::World;
use candle_core::{Result, Tensor, D};
use kiln_core::data::{eval_shard, Examples};
use kiln_core::recipe::Task;
use kiln_models::Model;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Mean cross-entropy of logits (…, C) against targets (…).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    kiln_kernels::cross_entropy(&logits.reshape(((), c))?, &targets.flatten_all()?)
}

/// An evaluation given up between two batches because a signal asked the process to stop.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: usize,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "evaluation stopped by signal {}", self.signal)
    }
}

impl std::error::Error for Interrupted {}

/// Evaluates `model` on a split: `{prefix}/loss` plus `{prefix}/accuracy` and `{prefix}/f1`
/// (macro-averaged, classification) or `{prefix}/perplexity` (language models). Metrics are
/// averaged over targets, not batches. When `stop` holds a signal number (set by a handler),
/// the evaluation ends before the next batch with an [`Interrupted`] error.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Model,
    task: Task,
    examples: &dyn Examples,
    batch_size: usize,
    max_batches: Option<usize>,
    device: &candle_core::Device,
    prefix: &str,
    stop: Option<&AtomicUsize>,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let split = Split {
        examples,
        batch_size,
        max_batches,
        prefix,
    };
    Ok(evaluate_split(model, task, &split, device, stop, &World::single())?.metrics)
}

/// The split [`evaluate_split`] reads: `max_batches` of `batch_size` examples (all with `None`),
/// its metrics named `{prefix}/…`.
pub struct Split<'a> {
    pub examples: &'a dyn Examples,
    pub batch_size: usize,
    pub max_batches: Option<usize>,
    pub prefix: &'a str,
}

/// An evaluation's metrics and, for a classifier, its confusion matrix.
pub struct Evaluation {
    pub metrics: BTreeMap<String, f64>,
    /// `confusion[target][prediction]`: how many examples of each class went to each class.
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// [`evaluate`], with the classifier's confusion matrix. In a data-parallel job each rank
/// evaluates every `size`-th batch and the sums (loss, count, confusion matrix) are added up over
/// the ranks, so every rank returns the same metrics.
pub fn evaluate_split(
    model: &dyn Model,
    task: Task,
    split: &Split,
    device: &candle_core::Device,
    stop: Option<&AtomicUsize>,
    world: &World,
) -> anyhow::Result<Evaluation> {
    let Split {
        examples,
        batch_size,
        max_batches,
        prefix,
    } = *split;
    let (mut loss_sum, mut count) = (0.0f64, 0u64);
    let (mut preds, mut truth) = (Vec::new(), Vec::new());
    let shard = eval_shard(
        examples,
        batch_size,
        max_batches,
        world.rank(),
        world.size(),
    );
    for host in shard {
        if let Some(signal) = stop.map(|s| s.load(Ordering::SeqCst)).filter(|&s| s != 0) {
            return Err(Interrupted { signal }.into());
        }
        let batch = host.to_device(device)?;
        let n = host.targets.len() as u64;
        let batch_loss = if task == Task::Classification {
            let logits = model.forward(&batch.inputs, false)?;
            preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            truth.extend_from_slice(&host.targets);
            loss(&logits, &batch.targets)?
        } else {
            model.loss(&batch.inputs, &batch.targets, false)?
        };
        loss_sum += batch_loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    let mut sums = [loss_sum, count as f64];
    world.sum_f64(&mut sums)?;
    let (loss_sum, count) = (sums[0], sums[1] as u64);
    anyhow::ensure!(count > 0, "the {prefix} split is empty");
    let mean = loss_sum / count as f64;
    let mut out = BTreeMap::from([(format!("{prefix}/loss"), mean)]);
    let mut matrix = None;
    match task {
        Task::Classification => {
            let m = reduce_confusion(world, confusion(&preds, &truth))?;
            let correct: u64 = (0..m.len()).map(|c| m[c][c]).sum();
            out.insert(format!("{prefix}/accuracy"), correct as f64 / count as f64);
            out.insert(format!("{prefix}/f1"), confusion_f1(&m));
            matrix = Some(m);
        }
        Task::LanguageModel => {
            out.insert(format!("{prefix}/perplexity"), mean.exp());
        }
    }
    Ok(Evaluation {
        metrics: out,
        confusion: matrix,
    })
}

/// The confusion matrices of every rank, added up (padded to the largest).
fn reduce_confusion(world: &World, m: Vec<Vec<u64>>) -> anyhow::Result<Vec<Vec<u64>>> {
    if world.size() == 1 {
        return Ok(m);
    }
    let mut n = [m.len() as u64];
    world.max_u64(&mut n)?;
    let n = n[0] as usize;
    let mut flat = vec![0f64; n * n];
    for (t, row) in m.iter().enumerate() {
        for (p, &v) in row.iter().enumerate() {
            flat[t * n + p] = v as f64;
        }
    }
    world.sum_f64(&mut flat)?;
    Ok(flat
        .chunks(n)
        .map(|r| r.iter().map(|&v| v as u64).collect())
        .collect())
}

/// [`macro_f1`] from a confusion matrix.
pub fn confusion_f1(m: &[Vec<u64>]) -> f64 {
    let n = m.len();
    let tp = |c: usize| m[c][c];
    let fp = |c: usize| (0..n).map(|t| m[t][c]).sum::<u64>() - tp(c);
    let fneg = |c: usize| m[c].iter().sum::<u64>() - tp(c);
    let classes: Vec<usize> = (0..n).filter(|&c| tp(c) + fp(c) + fneg(c) > 0).collect();
    if classes.is_empty() {
        return 0.0;
    }
    let f1 = |c: usize| 2.0 * tp(c) as f64 / (2 * tp(c) + fp(c) + fneg(c)) as f64;
    classes.iter().map(|&c| f1(c)).sum::<f64>() / classes.len() as f64
}

/// `m[target][prediction]` counts, square over the classes up to the largest seen.
pub fn confusion(preds: &[u32], targets: &[u32]) -> Vec<Vec<u64>> {
    let n = preds
        .iter()
        .chain(targets)
        .max()
        .map_or(0, |&m| m as usize + 1);
    let mut m = vec![vec![0u64; n]; n];
    for (&p, &t) in preds.iter().zip(targets) {
        m[t as usize][p as usize] += 1;
    }
    m
}

/// F1 averaged over the classes that occur among the targets or the predictions (as
/// scikit-learn's `f1_score(average="macro")`); a class with no true positive scores 0.
pub fn macro_f1(preds: &[u32], targets: &[u32]) -> f64 {
    let n = preds
        .iter()
        .chain(targets)
        .max()
        .map_or(0, |&m| m as usize + 1);
    let (mut tp, mut fp, mut fneg) = (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
    for (&p, &t) in preds.iter().zip(targets) {
        if p == t {
            tp[p as usize] += 1;
        } else {
            fp[p as usize] += 1;
            fneg[t as usize] += 1;
        }
    }
    let classes: Vec<usize> = (0..n).filter(|&c| tp[c] + fp[c] + fneg[c] > 0).collect();
    if classes.is_empty() {
        return 0.0;
    }
    let f1 = |c: usize| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fneg[c]) as f64;
    classes.iter().map(|&c| f1(c)).sum::<f64>() / classes.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_counts_targets_by_prediction() {
        let m = confusion(&[0, 0, 1, 0, 1], &[0, 0, 1, 1, 2]);
        assert_eq!(m, vec![vec![2, 0, 0], vec![1, 1, 0], vec![0, 1, 0]]);
        let total: u64 = m.iter().flatten().sum();
        assert_eq!(total, 5);
        let (p, t) = ([0, 0, 1, 0, 1, 3, 3], [0, 0, 1, 1, 2, 3, 0]);
        assert_eq!(confusion_f1(&confusion(&p, &t)), macro_f1(&p, &t));
    }

    #[test]
    fn macro_f1_by_hand() {
        // Class 0: tp 2, fp 1, fn 0 → 0.8; class 1: tp 1, fp 1, fn 1 → 0.5; class 2: only a
        // false negative → 0. Mean: (0.8 + 0.5 + 0) / 3.
        let f = macro_f1(&[0, 0, 1, 0, 1], &[0, 0, 1, 1, 2]);
        assert!((f - 1.3 / 3.0).abs() < 1e-12, "{f}");
        assert_eq!(macro_f1(&[1, 2, 3], &[1, 2, 3]), 1.0);
        // Classes absent from both do not count.
        assert_eq!(macro_f1(&[5, 5], &[5, 5]), 1.0);
    }
}
