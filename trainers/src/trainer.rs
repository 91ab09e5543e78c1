//! The training loop. One function, top to bottom:
//! batch → forward → loss → backward → accumulate → clip → optimizer step → schedule → log →
//! periodic eval → checkpoint, then a final evaluation, checkpoint and summary.
//!
//! A checkpoint holds everything the loop's future depends on (weights, optimizer moments, the
//! data stream's position, the dropout generator's position, metric tracking), so a run resumed
//! from it continues exactly as if it had never stopped.

use crate::amp::{self, LossScaler};
use crate::optim::{self, Optimizer, Param};
use crate::run::{self, RunDir};
use crate::schedule::Schedule;
use crate::task;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_core::checkpoint;
use kiln_core::data::{self, Batch, DataSplits, Loader};
use kiln_core::metrics::{MetricsLog, Tracker};
use kiln_core::recipe::Recipe;
use kiln_models::{Model, ModelConfig, SharedRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How `kiln train` was invoked, beyond the recipe.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Exact run directory (default: `<runs_root>/<recipe>-<timestamp>`).
    pub run_dir: Option<PathBuf>,
    /// Parent of default run directories (default `runs`).
    pub runs_root: Option<PathBuf>,
    /// Overrides the recipe's `device`.
    pub device: Option<String>,
    /// Log lines only, no progress bar.
    pub quiet: bool,
    /// Set to a signal number (e.g. by a SIGTERM handler) to stop after the current step with a
    /// checkpoint.
    pub stop: Option<Arc<AtomicUsize>>,
}

/// What a run leaves behind.
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// `summary.json`; `Null` when the run was interrupted.
    pub summary: serde_json::Value,
    /// The signal that stopped the run early, after writing a checkpoint.
    pub interrupted: Option<usize>,
}

/// The loop's state at the end of a step: with the weights and the optimizer, all a resumed run
/// needs (`trainer_state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub epoch: u64,
    /// Batches drawn from the data stream (the stream restarts here).
    pub batches_consumed: u64,
    pub optimizer_steps: u64,
    /// Words drawn from the dropout generator (decimal: JSON numbers cannot hold a u128).
    pub dropout_rng_position: String,
    pub tracker: Tracker,
    /// The partly filled log window (its mean is logged at the next log step).
    pub window: Window,
    pub items_seen: usize,
    pub train_seconds: f64,
    /// f16 training's loss scale (absent for f32 and bf16).
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
}

/// Continues the run in `run_dir` from its newest intact checkpoint. `sets` may change only
/// `trainer.*` keys (e.g. a longer `trainer.max_steps`).
pub fn resume(run_dir: &Path, sets: &[String], opts: &TrainOptions) -> Result<TrainOutcome> {
    anyhow::ensure!(
        run_dir.is_dir(),
        "cannot resume: run directory {} does not exist",
        run_dir.display()
    );
    let saved = Recipe::load(run_dir.join("recipe.toml"), &[])
        .with_context(|| format!("{} is not a kiln run directory", run_dir.display()))?;
    let recipe = Recipe::load(run_dir.join("recipe.toml"), sets)?;
    let changed = run::changed_sections(&saved, &recipe);
    anyhow::ensure!(
        changed.is_empty(),
        "cannot resume {} with a different {}: only trainer.* keys may change on resume",
        run_dir.display(),
        changed.join(", ")
    );
    let (checkpoint, warnings) = checkpoint::newest_valid(&run_dir.join("checkpoints"))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let state: TrainerState = {
        let p = checkpoint.join(checkpoint::STATE_FILE);
        serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("{} is corrupt", p.display()))?
    };
    run_loop(
        &recipe,
        RunDir::reopen(run_dir, state.step)?,
        Some((checkpoint, state)),
        opts,
    )
}

pub fn train(recipe: &Recipe, opts: &TrainOptions) -> Result<TrainOutcome> {
    run_loop(recipe, RunDir::create_for(recipe, opts)?, None, opts)
}

fn run_loop(
    recipe: &Recipe,
    run: RunDir,
    resumed: Option<(PathBuf, TrainerState)>,
    opts: &TrainOptions,
) -> Result<TrainOutcome> {
    let device = kiln_core::device::open_device(opts.device.as_deref().unwrap_or(&recipe.device))?;
    let data = data::load(recipe)?;
    // A resumed run takes its weights from its checkpoint and its architecture from its own
    // resolved recipe, not from `init_from` (which may have moved since).
    let model_cfg = match &resumed {
        None => ModelConfig::from_recipe(recipe, data.num_classes, &input_shape(&data))?,
        Some(_) => {
            let mut r = recipe.clone();
            r.init_from = None;
            ModelConfig::from_recipe(&r, data.num_classes, &input_shape(&data))?
        }
    };
    run.write_recipe(recipe, &model_cfg, &data)?;

    let varmap = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&varmap, recipe.seed, DType::F32, &device);
    let dropout_rng = SharedRng::new(recipe.seed, "dropout");
    let compute = amp::compute_dtype(recipe.precision);
    let model = model_cfg.build(vb, dropout_rng.clone(), compute)?;
    if model_cfg.lora().is_some() && recipe.init_from.is_none() {
        bail!(recipe.source.error(
            "model.lora",
            "LoRA adapts pretrained weights: set init_from to the model folder or hub id"
        ));
    }
    let params = params_of(&varmap, &model_cfg);
    let n_trainable: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let n_params: usize = params_where(&varmap, |_| true)
        .iter()
        .map(|p| p.var.elem_count())
        .sum();
    let param_note = if n_trainable == n_params {
        format!("{n_params} parameters")
    } else {
        format!("{n_params} parameters, {n_trainable} trainable")
    };
    let mut optimizer = optim::build(&recipe.optim);
    let (mut state, mut last_checkpoint) = match resumed {
        None => {
            if let Some(from) = &recipe.init_from {
                let folder = kiln_core::hub::resolve(from)?;
                kiln_models::hf::load_pretrained(&varmap, &model_cfg, &folder)?;
            }
            (
                TrainerState {
                    loss_scaler: LossScaler::for_precision(recipe.precision),
                    ..TrainerState::default()
                },
                None,
            )
        }
        Some((dir, state)) => {
            restore_weights(
                &varmap,
                &model_cfg,
                recipe,
                &dir.join(checkpoint::MODEL_FILE),
                &device,
            )?;
            let moments = checkpoint::load_tensors(&dir.join(checkpoint::OPTIMIZER_FILE), &device)?;
            optimizer.load_state(moments, state.optimizer_steps)?;
            dropout_rng.set_position(
                state
                    .dropout_rng_position
                    .parse()
                    .context("trainer_state.json: bad dropout_rng_position")?,
            );
            (state, Some(dir))
        }
    };

    let t = &recipe.trainer;
    let d = &recipe.data;
    let loader = Loader::new(
        data.train.clone(),
        d.batch_size,
        d.shuffle,
        recipe.seed,
        d.prefetch,
        state.batches_consumed,
    );
    let total_steps = match (t.max_steps, t.epochs) {
        (Some(n), _) => n,
        (None, Some(e)) => (e * loader.batches_per_epoch / t.grad_accum).max(1),
        (None, None) => unreachable!("validated: one of max_steps and epochs is set"),
    };
    let schedule = Schedule::new(&recipe.schedule, recipe.optim.lr, total_steps);
    let items_per_example = data.train.items_per_example();
    let eval_batches = (t.eval_batches > 0).then_some(t.eval_batches);

    let mut log = MetricsLog::create(&run.path.join("metrics.jsonl"))?;
    let progress = Progress::new(total_steps, opts.quiet);
    if state.step >= total_steps {
        bail!("the run in {} already finished its {total_steps} steps; to train longer, resume with --set trainer.max_steps=N", run.path.display());
    }
    progress.line(&format!(
        "training {} ({param_note}) on {} for {total_steps} steps → {}",
        recipe.name,
        kiln_core::device::device_name(&device),
        run.path.display()
    ));

    let checkpoints = run.path.join("checkpoints");
    if state.step > 0 {
        progress.line(&format!(
            "resuming at step {} from {}",
            state.step,
            last_checkpoint.as_ref().unwrap().display()
        ));
    }
    for step in state.step + 1..=total_steps {
        let started = Instant::now();
        let lr = schedule.lr(step - 1);

        // This step's micro-batches: gradients are summed over them before one update.
        let mut batches = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let (batch_epoch, host) = loader.next_batch();
            state.epoch = batch_epoch;
            state.batches_consumed += 1;
            state.items_seen += host.len() * items_per_example;
            state.window.items += host.len() * items_per_example;
            batches.push(host.to_device(&device)?);
        }
        let out = train_step(
            model.as_ref(),
            &params,
            optimizer.as_mut(),
            &batches,
            lr,
            t.clip_grad_norm,
            step == 1,
            state.loss_scaler.as_mut(),
        )?;
        if let Some((what, value)) = out.diverged {
            bail!(diverged(step, what, value, &last_checkpoint));
        }
        let (step_loss, grad_norm) = (out.loss, out.grad_norm);

        let elapsed = started.elapsed().as_secs_f64();
        state.step = step;
        state.train_seconds += elapsed;
        state.window.add(step_loss, elapsed);
        progress.step(step_loss, lr, state.window.rate());

        if step % t.log_every == 0 || step == total_steps {
            let mut values = BTreeMap::from([
                ("train/loss".to_string(), state.window.mean_loss()),
                ("lr".to_string(), lr),
                ("grad_norm".to_string(), grad_norm),
                ("throughput".to_string(), state.window.rate()),
                // Fractional, as in "2.5 epochs done": the integer epoch read 0.0000 for a whole epoch.
                (
                    "epoch".to_string(),
                    state.batches_consumed as f64 / loader.batches_per_epoch as f64,
                ),
            ]);
            if let Some(s) = &state.loss_scaler {
                values.insert("loss_scale".into(), s.scale);
                values.insert("skipped_steps".into(), s.skipped_steps as f64);
            }
            log.write(step, &values)?;
            state.tracker.update(step, &values);
            progress.log(step, total_steps, &values);
            state.window = Window::default();
        }
        if t.eval_every > 0 && step % t.eval_every == 0 && step < total_steps {
            let values = evaluate(
                &varmap,
                &model_cfg,
                recipe,
                &data.val,
                eval_batches,
                &device,
                "eval",
            )?;
            log.write(step, &values)?;
            state.tracker.update(step, &values);
            progress.log(step, total_steps, &values);
        }
        let stop = opts.stop.as_ref().map_or(0, |s| s.load(Ordering::SeqCst));
        let periodic = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
        let new_best = t.keep_best && state.tracker.best_step.get(&t.best_metric) == Some(&step);
        if (periodic || stop != 0 || new_best) && step < total_steps {
            state.optimizer_steps = optimizer.steps();
            state.dropout_rng_position = dropout_rng.position().to_string();
            last_checkpoint = Some(save_checkpoint(
                &run.path,
                &varmap,
                &model_cfg,
                optimizer.as_ref(),
                &state,
            )?);
            if new_best {
                checkpoint::mark_best(&checkpoints, step)?;
            }
            checkpoint::prune(&checkpoints, t.keep_last)?;
        }
        if stop != 0 && step < total_steps {
            progress.finish();
            progress.line(&format!(
                "stopped by signal {stop} after step {step}; continue with `kiln train --resume {}`",
                run.path.display()
            ));
            return Ok(TrainOutcome {
                run_dir: run.path,
                summary: serde_json::Value::Null,
                interrupted: Some(stop),
            });
        }
    }
    let TrainerState {
        items_seen,
        train_seconds,
        ..
    } = state;

    // Final evaluation on the whole validation split (and the test split, when there is one).
    let mut values = evaluate(
        &varmap, &model_cfg, recipe, &data.val, None, &device, "eval",
    )?;
    if let Some(test) = &data.test {
        values.extend(evaluate(
            &varmap, &model_cfg, recipe, test, None, &device, "test",
        )?);
    }
    log.write(total_steps, &values)?;
    state.tracker.update(total_steps, &values);
    progress.log(total_steps, total_steps, &values);
    state.optimizer_steps = optimizer.steps();
    state.dropout_rng_position = dropout_rng.position().to_string();
    let final_checkpoint =
        save_checkpoint(&run.path, &varmap, &model_cfg, optimizer.as_ref(), &state)?;
    if t.keep_best && state.tracker.best_step.get(&t.best_metric) == Some(&total_steps) {
        checkpoint::mark_best(&checkpoints, total_steps)?;
    }
    checkpoint::prune(&checkpoints, t.keep_last)?;
    progress.finish();

    let rate_key = match recipe.task {
        kiln_core::recipe::Task::Classification => "samples_per_second",
        kiln_core::recipe::Task::LanguageModel => "tokens_per_second",
    };
    let summary = json!({
        "recipe": recipe.name,
        "kiln_version": kiln_core::VERSION,
        "git_commit": run::GIT_COMMIT,
        "seed": recipe.seed,
        "device": kiln_core::device::device_name(&device),
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "steps": total_steps,
        "epochs": items_seen as f64 / (loader.batches_per_epoch * d.batch_size * items_per_example) as f64,
        "wall_seconds": run.started.elapsed().as_secs_f64(),
        "train_seconds": train_seconds,
        rate_key: items_seen as f64 / train_seconds,
        "final": metric_map(&state.tracker.last),
        "best": metric_map(&state.tracker.best),
        "best_step": state.tracker.best_step,
        "checkpoint": final_checkpoint.strip_prefix(&run.path).unwrap_or(&final_checkpoint),
        "data_files": data.files.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
    });
    std::fs::write(
        run.path.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    progress.line(&format!(
        "done in {:.1}s → {}",
        run.started.elapsed().as_secs_f64(),
        run.path.display()
    ));
    Ok(TrainOutcome {
        interrupted: None,
        run_dir: run.path,
        summary,
    })
}

/// What one optimizer step reports.
pub struct StepOutput {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `Some((what, value))` when the loss or the gradient went non-finite; no update was made.
    pub diverged: Option<(&'static str, f64)>,
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
    mut scaler: Option<&mut LossScaler>,
) -> Result<StepOutput> {
    let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0;
    for batch in batches {
        let logits = model.forward(&batch.inputs, true)?;
        let loss = match &batch.mix {
            None => task::loss(&logits, &batch.targets)?,
            // Mixup/CutMix: the images are blended, so is the loss over both label sets.
            Some((partner, lambda)) => {
                let first = (task::loss(&logits, &batch.targets)? * *lambda)?;
                (first + (task::loss(&logits, partner)? * (1.0 - lambda))?)?
            }
        };
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Ok(StepOutput {
                loss: value,
                grad_norm: f64::NAN,
                diverged: Some(("loss", value)),
            });
        }
        loss_sum += value;
        let store = kiln_kernels::backward(&(loss * (loss_scale / batches.len() as f64))?)?;
        accumulate(&mut grads, params, &store)?;
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
            return Ok(StepOutput {
                loss,
                grad_norm,
                diverged: None,
            });
        }
    }
    if !grad_norm.is_finite() {
        return Ok(StepOutput {
            loss,
            grad_norm,
            diverged: Some(("gradient norm", grad_norm)),
        });
    }
    let clip = if clip_norm > 0.0 && grad_norm > clip_norm {
        clip_norm / (grad_norm + 1e-6)
    } else {
        1.0
    };
    optimizer.step(params, &grads, lr, clip / loss_scale)?;
    Ok(StepOutput {
        loss,
        grad_norm,
        diverged: None,
    })
}

/// The shape of one input example, e.g. [1, 28, 28] or [seq_len].
pub(crate) fn input_shape(data: &DataSplits) -> Vec<usize> {
    match data.train.collate(&[0]).inputs {
        data::HostTensor::F32(_, s) | data::HostTensor::U32(_, s) => s[1..].to_vec(),
    }
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

fn diverged(step: usize, what: &str, value: f64, last: &Option<PathBuf>) -> String {
    let kept = match last {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint had been written yet".into(),
    };
    format!(
        "training diverged at step {step}: the {what} is {value}. Nothing was saved from this \
         step; {kept}. Try a lower optim.lr, trainer.clip_grad_norm = 1.0, or a longer \
         schedule.warmup_steps"
    )
}

/// Evaluates the current weights without building an autograd graph: the model is rebuilt on
/// detached views of the parameters (no copy), so no op records its inputs.
pub fn evaluate(
    varmap: &VarMap,
    model_cfg: &ModelConfig,
    recipe: &Recipe,
    examples: &std::sync::Arc<dyn data::Examples>,
    max_batches: Option<usize>,
    device: &Device,
    prefix: &str,
) -> Result<BTreeMap<String, f64>> {
    let compute = amp::compute_dtype(recipe.precision);
    let model = detached_model(varmap, model_cfg, device, compute)?;
    task::evaluate(
        model.as_ref(),
        recipe.task,
        examples.as_ref(),
        recipe.data.batch_size,
        max_batches,
        device,
        prefix,
    )
}

/// The model over detached copies of the parameters (no graph is recorded), for evaluation and
/// generation; matmuls in `compute`, as in training.
pub fn detached_model(
    varmap: &VarMap,
    cfg: &ModelConfig,
    device: &Device,
    compute: DType,
) -> Result<Box<dyn Model>> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
    let rng = SharedRng::new(0, "unused: evaluation has no dropout");
    Ok(cfg.build(vb, rng, compute)?)
}

fn save_checkpoint(
    run_dir: &Path,
    varmap: &VarMap,
    cfg: &ModelConfig,
    optimizer: &dyn Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    // Frozen pretrained weights (LoRA) are not saved: `init_from` has them. Buffers (BatchNorm's
    // running statistics) are: evaluation depends on them.
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| cfg.saved(k))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    checkpoint::write_checkpoint(&run_dir.join("checkpoints"), state.step, |dir| {
        checkpoint::save_tensors(&dir.join(checkpoint::MODEL_FILE), &weights)?;
        checkpoint::save_tensors(&dir.join(checkpoint::OPTIMIZER_FILE), &optimizer.state())?;
        std::fs::write(
            dir.join(checkpoint::STATE_FILE),
            serde_json::to_string_pretty(state)?,
        )?;
        // The resolved recipe, so a checkpoint copied elsewhere still says what it trained.
        std::fs::copy(run_dir.join("recipe.toml"), dir.join("recipe.toml"))?;
        Ok(())
    })
    .with_context(|| {
        format!(
            "writing the checkpoint at step {} (the previous checkpoint is untouched)",
            state.step
        )
    })
}

/// Loads a checkpoint into the model: with LoRA, the frozen weights from the recipe's
/// `init_from` first, then every trainable parameter from `path`.
pub fn restore_weights(
    varmap: &VarMap,
    cfg: &ModelConfig,
    recipe: &Recipe,
    path: &Path,
    device: &Device,
) -> Result<()> {
    if cfg.lora().is_some() {
        let from = recipe.init_from.as_deref().context(
            "this LoRA run's recipe has no init_from, so its frozen base weights are unknown",
        )?;
        kiln_models::hf::load_pretrained(varmap, cfg, &kiln_core::hub::resolve(from)?)?;
    }
    load_weights(varmap, path, device, |n| cfg.saved(n))
}

/// Loads checkpoint weights into the parameters `needed` selects, naming any missing or
/// misshapen tensor.
pub fn load_weights(
    varmap: &VarMap,
    path: &Path,
    device: &Device,
    needed: impl Fn(&str) -> bool,
) -> Result<()> {
    let weights = checkpoint::load_tensors(path, device)?;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !needed(name) {
            continue;
        }
        let w = weights.get(name).with_context(|| {
            format!(
                "{} has no tensor {name}; it does not belong to this model",
                path.display()
            )
        })?;
        anyhow::ensure!(
            w.shape() == var.shape() && w.dtype() == var.dtype(),
            "{}: {name} is {:?} {:?}, the model expects {:?} {:?}",
            path.display(),
            w.dtype(),
            w.dims(),
            var.dtype(),
            var.dims()
        );
        var.set(w)?;
    }
    Ok(())
}

fn metric_map(m: &BTreeMap<String, f64>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), kiln_core::metrics::json_number(*v)))
            .collect(),
    )
}

/// Loss and throughput since the last log line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    loss_sum: f64,
    steps: usize,
    items: usize,
    seconds: f64,
}

impl Window {
    fn add(&mut self, loss: f64, seconds: f64) {
        self.loss_sum += loss;
        self.steps += 1;
        self.seconds += seconds;
    }
    fn mean_loss(&self) -> f64 {
        self.loss_sum / self.steps.max(1) as f64
    }
    /// Examples (or tokens) per second.
    fn rate(&self) -> f64 {
        self.items as f64 / self.seconds.max(1e-9)
    }
}

/// A progress bar (step, loss, lr, throughput, ETA) on a terminal; plain log lines otherwise or
/// with `--quiet`.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Self {
        use std::io::IsTerminal;
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {pos}/{len} [{bar:30}] {msg} [{elapsed} < {eta}]",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Progress { bar: Some(bar) }
    }

    fn step(&self, loss: f64, lr: f64, rate: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.0}/s"));
            bar.inc(1);
        }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(bar) => bar.println(s),
            None => println!("{s}"),
        }
    }

    /// Log lines go to stdout with --quiet; eval lines are shown above the bar too.
    fn log(&self, step: usize, total: usize, values: &BTreeMap<String, f64>) {
        let is_eval = values
            .keys()
            .any(|k| !k.starts_with("train/") && k.contains('/'));
        if self.bar.is_some() && !is_eval {
            return;
        }
        let parts: Vec<String> = values
            .iter()
            .map(|(k, v)| {
                if k == "lr" {
                    format!("{k} {v:.3e}")
                } else {
                    format!("{k} {v:.4}")
                }
            })
            .collect();
        self.line(&format!("step {step}/{total} | {}", parts.join(" | ")));
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exact resume needs the half-filled log window back bit for bit: serde_json's default
    /// float parser can be one ulp off, hence its `float_roundtrip` feature.
    #[test]
    fn log_window_survives_the_state_file_bit_for_bit() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = Window {
                loss_sum: (x >> 11) as f64 / (1u64 << 53) as f64 * 10.0,
                steps: 3,
                items: 7,
                seconds: 0.5,
            };
            let back: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
            assert_eq!(
                back.loss_sum.to_bits(),
                w.loss_sum.to_bits(),
                "{}",
                w.loss_sum
            );
        }
    }
}
