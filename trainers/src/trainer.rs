//! The training loop, top to bottom. `run_loop` reads as nanoGPT's train.py: set up
//! (`Training::start`), then per step draw the batches → one optimizer update (forward → loss →
//! backward → accumulate → clip → step, in [`train_step`]) → schedule → log → periodic eval →
//! checkpoint, then a final evaluation, checkpoint and summary (`Training::finish`).
//!
//! A checkpoint holds everything the loop's future depends on (weights, optimizer moments, the
//! data stream's position, the dropout generator's position, metric tracking), so a run resumed
//! from it continues exactly as if it had never stopped.

use crate::amp::{self, LossScaler};
use crate::distributed::World;
use crate::optim::{self, Optimizer, Param};
use crate::progress::Progress;
pub use crate::progress::Window;
use crate::report;
use crate::run::{self, RunDir};
use crate::schedule::Schedule;
pub use crate::step::{check_gradients, params_of, params_where, train_step, StepOutput};
use crate::task;
use crate::weights::{detached_model, restore_weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use kiln_core::checkpoint;
use kiln_core::data::{self, Batch, DataSplits, Loader};
use kiln_core::metrics::{MetricsLog, Tracker};
use kiln_core::recipe::Recipe;
use kiln_models::{Model, ModelConfig, SharedRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
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
    /// End the run after this step with a checkpoint, as a signal does (`kiln verify`'s re-run):
    /// `max_steps` and with it the schedule stay as recorded. At the last step it changes nothing.
    pub stop_after: Option<usize>,
    /// Print nothing (no progress bar, no log lines).
    pub silent: bool,
    /// The data-parallel job this process is a rank of (`None`: training alone).
    pub world: Option<Rc<World>>,
}

/// What a run leaves behind.
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// `summary.json`; `Null` when the run stopped early (a signal, `stop_after`).
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
    /// In a data-parallel job, the same for ranks 1, 2, … (each masks with its own stream).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropout_rng_other_ranks: Vec<String>,
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
    let checkpoints = run_dir.join("checkpoints");
    if !checkpoint::any(&checkpoints) {
        // Killed before its first checkpoint: nothing to continue from, and the same recipe and
        // seed make a fresh start the same run.
        eprintln!(
            "note: {} has no checkpoint (it stopped before its first); training it again from \
             step 0",
            run_dir.display()
        );
        return run_loop(&recipe, reopen(run_dir, 0, opts)?, None, opts);
    }
    let (checkpoint, warnings) = checkpoint::newest_valid(&checkpoints)?;
    for w in warnings.iter().filter(|_| world_of(opts).is_main()) {
        eprintln!("warning: {w}");
    }
    let state: TrainerState = {
        let p = checkpoint.join(checkpoint::STATE_FILE);
        serde_json::from_str(&std::fs::read_to_string(&p).map_err(kiln_core::fs::at(&p))?)
            .with_context(|| format!("{} is corrupt", p.display()))?
    };
    run_loop(
        &recipe,
        reopen(run_dir, state.step, opts)?,
        Some((checkpoint, state)),
        opts,
    )
}

pub fn train(recipe: &Recipe, opts: &TrainOptions) -> Result<TrainOutcome> {
    let world = world_of(opts);
    // Rank 0 makes the directory (its default name has the time in it) and tells the others.
    let run = match world.is_main() {
        true => RunDir::create_for(recipe, opts.run_dir.as_deref(), opts.runs_root.as_deref())?,
        false => RunDir::follower(Path::new("")),
    };
    let mut path = run.path.to_string_lossy().into_owned().into_bytes();
    world.broadcast_bytes(&mut path)?;
    let run = match world.is_main() {
        true => run,
        false => RunDir::follower(Path::new(&String::from_utf8_lossy(&path).into_owned())),
    };
    run_loop(recipe, run, None, opts)
}

/// The job `opts` trains in: its world, or this process alone.
fn world_of(opts: &TrainOptions) -> Rc<World> {
    opts.world
        .clone()
        .unwrap_or_else(|| Rc::new(World::single()))
}

/// Rank 0 reopens (locks, trims the metrics); the other ranks only read the run.
fn reopen(run_dir: &Path, step: usize, opts: &TrainOptions) -> Result<RunDir> {
    let world = world_of(opts);
    let run = match world.is_main() {
        true => RunDir::reopen(run_dir, step)?,
        false => RunDir::follower(run_dir),
    };
    Ok(run)
}

/// The loop, as nanoGPT's train.py reads: set up, then per step draw the batches, make one
/// optimizer update, log, evaluate and checkpoint when due; then a final evaluation, checkpoint
/// and summary.
fn run_loop(
    recipe: &Recipe,
    run: RunDir,
    resumed: Option<(PathBuf, TrainerState)>,
    opts: &TrainOptions,
) -> Result<TrainOutcome> {
    let mut tr = Training::start(recipe, run, resumed, opts)?;
    let t = &recipe.trainer;
    let total_steps = tr.total_steps;
    for step in tr.state.step + 1..=total_steps {
        let started = Instant::now();
        let lr = tr.schedule.lr(step - 1);
        let (batches, shares) = tr.next_batches()?;
        let out = tr.optimizer_step(step, &batches, &shares, lr)?;
        tr.all_reduce = (tr.all_reduce.0 + out.times.all_reduce, tr.all_reduce.1 + 1);
        tr.finish_step(step, out.loss, lr, started.elapsed().as_secs_f64());

        if step % t.log_every == 0 || step == total_steps {
            tr.log_train(step, lr, out.grad_norm)?;
        }
        if t.eval_every > 0 && step % t.eval_every == 0 && step < total_steps {
            tr.evaluate_periodic(step)?;
        }
        // The last step is checkpointed by `finish`, before the final evaluation.
        if step < total_steps {
            let stop = tr.stop_signal();
            let stop_here = opts.stop_after == Some(step);
            tr.checkpoint_if_due(step, stop.is_some() || stop_here)?;
            if let Some(signal) = stop {
                return Ok(tr.interrupted(step, signal));
            }
            if stop_here {
                return Ok(tr.stopped_after());
            }
        }
    }
    tr.finish()
}

/// Everything the loop reads and updates, from set-up to summary.
struct Training<'a> {
    recipe: &'a Recipe,
    run: RunDir,
    device: Device,
    data: DataSplits,
    model_cfg: ModelConfig,
    varmap: VarMap,
    model: Box<dyn Model>,
    params: Vec<Param>,
    /// BatchNorm's running means and variances, averaged over the ranks after each step of a
    /// data-parallel job.
    running_stats: Vec<Param>,
    n_params: usize,
    optimizer: Box<dyn Optimizer>,
    dropout_rng: SharedRng,
    state: TrainerState,
    /// The newest checkpoint written (or resumed from), named when training diverges.
    last_checkpoint: Option<PathBuf>,
    /// The step the run started from (0, or the resumed checkpoint's).
    started_at: usize,
    /// Holds a signal's number once SIGINT, SIGTERM or SIGUSR1 asks the run to stop.
    stop: Option<Arc<AtomicUsize>>,
    loader: Loader,
    total_steps: usize,
    schedule: Schedule,
    items_per_example: usize,
    /// What the run counts: `tokens` (language models) or `examples` (classifiers).
    items: &'static str,
    /// `None` on a data-parallel rank other than 0: rank 0 alone writes the run directory.
    log: Option<MetricsLog>,
    progress: Progress,
    /// The data-parallel job (one process alone: a world of one).
    world: Rc<World>,
    /// Seconds spent summing gradients over the ranks, and steps, since the last log line.
    all_reduce: (f64, usize),
    /// ZeRO stage 1 (`trainer.zero_stage = 1` on several ranks): the rank owning each of
    /// `params` (its optimizer state and update).
    owners: Option<Vec<usize>>,
}

impl<'a> Training<'a> {
    /// Device, data, model, optimizer and loop state (fresh, or from the checkpoint `resumed`),
    /// then the data stream, schedule, metrics file and progress display.
    fn start(
        recipe: &'a Recipe,
        run: RunDir,
        resumed: Option<(PathBuf, TrainerState)>,
        opts: &TrainOptions,
    ) -> Result<Self> {
        let world = world_of(opts);
        // One GPU per rank: `cuda` and `auto` mean the GPU of this rank's local rank.
        let requested = opts.device.as_deref().unwrap_or(&recipe.device);
        let device = kiln_core::device::open_device_at(requested, world.local_gpu())?;
        if world.size() > 1 {
            world.same_device_kind(&device)?;
        }
        world.connect_gpus(&device)?;
        let data = data::load(recipe)?;
        same_data_on_every_rank(&world, &data)?;
        let model_cfg = model_config(recipe, &data, resumed.is_some())?;
        crate::memory::check_fits(
            recipe,
            &model_cfg,
            &input_shape(&data),
            &device,
            world.size(),
        )?;
        if world.is_main() {
            run.write_recipe(recipe, &model_cfg, &data)?;
            // A run that starts from step 0 (also one restarted before its first checkpoint)
            // records what `kiln verify` needs; a resumed one keeps its record.
            if resumed.is_none() {
                run.write_record(recipe, &device, &data)?;
            }
        }

        // Pretrained weights are read and checked before the model is built, so a config.json
        // larger than its weights is refused before anything is allocated.
        let pretrained = match (&recipe.init_from, &resumed) {
            (Some(from), None) => Some(kiln_models::hf::read_pretrained(
                &model_cfg,
                &kiln_core::hub::resolve(from)?,
            )?),
            _ => None,
        };
        let varmap = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&varmap, recipe.seed, DType::F32, &device);
        // Each rank masks its own examples: its own stream (rank 0's is the single process's).
        let dropout_rng = match world.rank() {
            0 => SharedRng::new(recipe.seed, "dropout"),
            r => SharedRng::new(recipe.seed, &format!("dropout-rank{r}")),
        };
        let compute = amp::compute_dtype(recipe.precision);
        let model = model_cfg.build(vb, dropout_rng.clone(), compute)?;
        if model_cfg.lora().is_some() && recipe.init_from.is_none() {
            bail!(recipe.source.error(
                "model.lora",
                "LoRA adapts pretrained weights: set init_from to the model folder or hub id"
            ));
        }
        let params = params_of(&varmap, &model_cfg);
        // The batch count is the same on every rank; the statistics are not.
        let running_stats = params_where(&varmap, |n| {
            model_cfg.is_buffer(n) && !n.ends_with(".num_batches_tracked")
        });
        let n_params: usize = params_where(&varmap, |_| true)
            .iter()
            .map(|p| p.var.elem_count())
            .sum();
        let mut optimizer = optim::build(&recipe.optim);
        let owners = (recipe.trainer.zero_stage == 1 && world.size() > 1).then(|| {
            let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
            let owners = crate::distributed::partition(&sizes, world.size());
            let mine = (sizes.iter().zip(&owners)).filter(|(_, &o)| o == world.rank());
            let (count, elements) = mine.fold((0, 0), |(c, e), (n, _)| (c + 1, e + n));
            crate::distributed::say(&format!(
                "rank {}/{}: ZeRO-1, optimizer state of {count} of {} parameters ({elements} of \
                 {} elements)",
                world.rank(),
                world.size(),
                sizes.len(),
                sizes.iter().sum::<usize>()
            ));
            owners
        });
        let (state, last_checkpoint) = match resumed {
            None => {
                if let Some(p) = pretrained {
                    kiln_models::hf::set_pretrained(&varmap, &model_cfg, p)?;
                }
                let state = TrainerState {
                    loss_scaler: LossScaler::for_precision(recipe.precision),
                    ..TrainerState::default()
                };
                (state, None)
            }
            Some((dir, state)) => {
                restore_weights(
                    &varmap,
                    &model_cfg,
                    recipe,
                    &dir.join(checkpoint::MODEL_FILE),
                    &device,
                )?;
                let file = dir.join(checkpoint::OPTIMIZER_FILE);
                // Read into host memory: a checkpoint holds the whole state, and under ZeRO-1
                // a rank moves only its share to the device.
                let moments = checkpoint::load_tensors(&file, &Device::Cpu)?;
                optim::check_state(&moments, &params)
                    .with_context(|| format!("{} does not fit the model", file.display()))?;
                let moments = match &owners {
                    Some(owners) => optim::owned_state(moments, &params, owners, world.rank()),
                    None => moments,
                };
                let moments = (moments.into_iter())
                    .map(|(k, t)| Ok((k, t.to_device(&device)?)))
                    .collect::<Result<HashMap<_, _>>>()?;
                optimizer.load_state(moments, state.optimizer_steps)?;
                // Rank r > 0 continues its own stream when the checkpoint has it (a job resumed
                // with as many ranks or fewer); otherwise it starts where rank 0 stands.
                let position = match world.rank() {
                    0 => None,
                    r => state.dropout_rng_other_ranks.get(r - 1),
                };
                dropout_rng.set_position(
                    position
                        .unwrap_or(&state.dropout_rng_position)
                        .parse()
                        .context("trainer_state.json: bad dropout_rng_position")?,
                );
                (state, Some(dir))
            }
        };

        same_weights_on_every_rank(&world, &varmap)?;

        let t = &recipe.trainer;
        anyhow::ensure!(
            recipe.data.batch_size >= world.size(),
            "data.batch_size = {} is smaller than the {} processes of the job: each takes a slice \
             of every batch; raise data.batch_size or start fewer processes",
            recipe.data.batch_size,
            world.size()
        );
        let loader = loader(recipe, &data, state.batches_consumed)?;
        let total_steps = match (t.max_steps, t.epochs) {
            (Some(n), _) => n,
            (None, Some(e)) => (e * loader.batches_per_epoch / t.grad_accum).max(1),
            (None, None) => unreachable!("validated: one of max_steps and epochs is set"),
        };
        let schedule = Schedule::new(&recipe.schedule, recipe.optim.lr, total_steps);
        let items_per_example = data.train.items_per_example();
        // Resumed from the final checkpoint of a run that did not finish (no summary): the final
        // evaluation runs again (forgotten before the log opens the file). A finished run is
        // refused further on, and keeps its evaluation.
        let finished = finished_at(&run.path) == Some(total_steps);
        if state.step == total_steps && !finished && world.is_main() {
            run.forget_evaluation_at(total_steps)?;
        }
        let log = match world.is_main() {
            true => Some(
                MetricsLog::create(&run.path.join("metrics.jsonl"))?
                    .with_tensorboard(&run.path.join(run::TB_DIR)),
            ),
            false => None,
        };
        let items = items_noun(recipe.task);
        let silent = opts.silent || !world.is_main();
        let progress = Progress::new(total_steps, opts.quiet, silent, items);
        let mut training = Training {
            recipe,
            run,
            device,
            data,
            model_cfg,
            varmap,
            model,
            params,
            running_stats,
            n_params,
            optimizer,
            dropout_rng,
            started_at: state.step,
            state,
            last_checkpoint,
            stop: opts.stop.clone(),
            loader,
            total_steps,
            schedule,
            items_per_example,
            items,
            log,
            progress,
            world,
            all_reduce: (0.0, 0),
            owners,
        };
        training.announce()?;
        training.run.keep()?;
        training.record_recipe()?;
        Ok(training)
    }

    /// The resolved recipe as TensorBoard text (a markdown code block) at the step the run
    /// starts from (0), unless the run's event files have it already (a resume).
    fn record_recipe(&mut self) -> Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(()); // a data-parallel rank other than 0
        };
        let tb = self.run.path.join(run::TB_DIR);
        if kiln_core::tensorboard::read_texts(&tb)?.contains_key("recipe") {
            return Ok(());
        }
        let file = self.run.path.join("recipe.toml");
        let text = std::fs::read_to_string(&file).map_err(kiln_core::fs::at(&file))?;
        // A fence longer than any run of backticks in the recipe (a description may hold some).
        let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
        let fence = "`".repeat(longest.max(2) + 1);
        let markdown = format!("{fence}toml\n{}\n{fence}", text.trim_end());
        log.text("recipe", self.state.step, &markdown)?;
        Ok(())
    }

    fn n_trainable(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Refuses a run that has already finished, then says what is about to be trained.
    fn announce(&self) -> Result<()> {
        let (n_params, n_trainable) = (self.n_params, self.n_trainable());
        let param_note = if n_trainable == n_params {
            format!("{n_params} parameters")
        } else {
            format!("{n_params} parameters, {n_trainable} trainable")
        };
        let (total_steps, path) = (self.total_steps, &self.run.path);
        let (step, evaluated) = (self.state.step, finished_at(path) == Some(total_steps));
        if step > total_steps || (step == total_steps && evaluated) {
            bail!("the run in {} already finished its {total_steps} steps; to train longer, resume with --set trainer.max_steps=N", path.display());
        }
        if step == total_steps {
            self.progress.line(&format!(
                "{} stopped after its last step, before the final evaluation: running it now",
                path.display()
            ));
            return Ok(());
        }
        let warmup = self.recipe.schedule.warmup_steps;
        if warmup >= total_steps && self.world.is_main() {
            eprintln!(
                "warning: schedule.warmup_steps = {warmup} covers the whole run of \
                 {total_steps} steps: the learning rate never reaches optim.lr"
            );
        }
        let ranks = match (self.world.size(), &self.owners) {
            (1, _) => String::new(),
            (n, None) => format!(" × {n} processes (MPI)"),
            (n, Some(_)) => format!(" × {n} processes (MPI, optimizer state sharded: ZeRO-1)"),
        };
        self.progress.line(&format!(
            "training {} ({param_note}) on {}{ranks} for {total_steps} steps → {}",
            self.recipe.name,
            kiln_core::device::device_name(&self.device),
            path.display()
        ));
        if let Some(from) = self
            .last_checkpoint
            .as_ref()
            .filter(|_| self.state.step > 0)
        {
            self.progress.line(&format!(
                "resuming at step {} from {}",
                self.state.step,
                from.display()
            ));
        }
        Ok(())
    }

    /// This step's micro-batches, on the device: gradients are summed over them before one
    /// update.
    /// In a data-parallel job, this rank's slice of each, and its share of the examples.
    fn next_batches(&mut self) -> Result<(Vec<Batch>, Vec<f64>)> {
        let grad_accum = self.recipe.trainer.grad_accum;
        let mut batches = Vec::with_capacity(grad_accum);
        let mut shares = Vec::with_capacity(grad_accum);
        for _ in 0..grad_accum {
            let (batch_epoch, host) = self.loader.next_batch()?;
            // Counted for the whole job: the loop state is the same on every rank.
            let items = host.len() * self.items_per_example;
            self.state.epoch = batch_epoch;
            self.state.batches_consumed += 1;
            self.state.items_seen += items;
            self.state.window.items += items;
            let host = match self.world.size() {
                1 => host,
                _ => {
                    let (start, end) = self.world.slice(host.len());
                    shares.push((end - start) as f64 / host.len() as f64);
                    host.rows(start, end)
                }
            };
            batches.push(host.to_device(&self.device)?);
        }
        Ok((batches, shares))
    }

    /// One optimizer update ([`train_step`]); a non-finite loss or gradient stops the run.
    fn optimizer_step(
        &mut self,
        step: usize,
        batches: &[Batch],
        shares: &[f64],
        lr: f64,
    ) -> Result<StepOutput> {
        let shard = (self.world.size() > 1).then(|| crate::step::Shard {
            world: &self.world,
            shares,
            running_stats: &self.running_stats,
            owners: self.owners.as_deref(),
        });
        let out = crate::step::train_step_sharded(
            self.model.as_ref(),
            &self.params,
            self.optimizer.as_mut(),
            batches,
            lr,
            self.recipe.trainer.clip_grad_norm,
            step == 1,
            self.state.loss_scaler.as_mut(),
            shard,
        )
        .map_err(|e| self.out_of_memory(step, e))?;
        if let Some((what, value)) = out.diverged {
            bail!(diverged(step, what, value, &self.last_checkpoint));
        }
        Ok(out)
    }

    /// A device allocation that failed mid-step (CUDA reports it as an error; the CPU's kernel
    /// kills the process instead), said as what it is and what to change. Checkpoints are
    /// written only between steps, so every one on disk is intact.
    fn out_of_memory(&self, step: usize, e: anyhow::Error) -> anyhow::Error {
        let text = format!("{e:#}");
        if !(text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory")) {
            return e;
        }
        let kept = match &self.last_checkpoint {
            Some(c) => format!("the newest checkpoint, {}, is intact", c.display()),
            None => "no checkpoint had been written yet".into(),
        };
        anyhow::anyhow!(
            "{} ran out of memory at step {step} ({text}); lower data.batch_size (raise \
             trainer.grad_accum to keep the effective batch), or set \
             model.checkpoint_activations = true on a transformer; {kept}",
            kiln_core::device::device_name(&self.device)
        )
    }

    /// Counts the step done: its time, its loss into the log window, the progress bar.
    fn finish_step(&mut self, step: usize, loss: f64, lr: f64, elapsed: f64) {
        self.state.step = step;
        self.state.train_seconds += elapsed;
        self.state.window.add(loss, elapsed);
        self.progress.step(loss, lr, self.state.window.rate());
    }

    /// Writes the log window's train metrics and starts a new window.
    fn log_train(&mut self, step: usize, lr: f64, grad_norm: f64) -> Result<()> {
        let state = &self.state;
        let mut values = BTreeMap::from([
            ("train/loss".to_string(), state.window.mean_loss()),
            ("lr".to_string(), lr),
            ("grad_norm".to_string(), grad_norm),
            ("throughput".to_string(), state.window.rate()),
            // How far the run has come, for curves over tokens or time (`kiln plot --x`).
            (self.items.to_string(), state.items_seen as f64),
            ("seconds".to_string(), state.train_seconds),
            // Fractional, as in "2.5 epochs done": the integer epoch read 0.0000 for a whole epoch.
            (
                "epoch".to_string(),
                state.batches_consumed as f64 / self.loader.batches_per_epoch as f64,
            ),
        ]);
        if let Some(s) = &state.loss_scaler {
            values.insert("loss_scale".into(), s.scale);
            values.insert("skipped_steps".into(), s.skipped_steps as f64);
        }
        if self.world.size() > 1 {
            // Rank 0's wait in the gradient all-reduce, per step: the job's communication cost.
            let (seconds, steps) = std::mem::take(&mut self.all_reduce);
            values.insert("all_reduce_ms".into(), 1e3 * seconds / steps.max(1) as f64);
        }
        self.record(step, &values)?;
        self.state.window = Window::default();
        Ok(())
    }

    /// A periodic evaluation on (up to `trainer.eval_batches` batches of) the validation split.
    /// A signal during it ends it unrecorded; the loop then checkpoints the step and stops.
    fn evaluate_periodic(&mut self, step: usize) -> Result<()> {
        let t = &self.recipe.trainer;
        let eval_batches = (t.eval_batches > 0).then_some(t.eval_batches);
        match self.evaluate(&self.data.val, eval_batches, "eval") {
            Ok(e) => self.record(step, &e.metrics),
            Err(e) if e.is::<task::Interrupted>() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The signal that asked the run to stop, if one has.
    fn stop_signal(&self) -> Option<usize> {
        let mut signal = [self.stop.as_ref().map_or(0, |s| s.load(Ordering::SeqCst)) as u64];
        // Every rank stops after the same step (each may have seen the signal at another one);
        // a failed exchange means another rank is gone, and the job ends anyway.
        if self.world.max_u64(&mut signal).is_err() {
            return None;
        }
        (signal[0] != 0).then_some(signal[0] as usize)
    }

    /// Evaluates the current weights without building an autograd graph: the model is rebuilt
    /// on detached views of the parameters (no copy), so no op records its inputs.
    fn evaluate(
        &self,
        examples: &Arc<dyn data::Examples>,
        max_batches: Option<usize>,
        prefix: &str,
    ) -> Result<task::Evaluation> {
        let compute = amp::compute_dtype(self.recipe.precision);
        let model = detached_model(&self.varmap, &self.model_cfg, &self.device, compute)?;
        let split = task::Split {
            examples: examples.as_ref(),
            batch_size: self.recipe.data.batch_size,
            max_batches,
            prefix,
        };
        task::evaluate_split(
            model.as_ref(),
            self.recipe.task,
            &split,
            &self.device,
            self.eval_stop(),
            &self.world,
        )
    }

    /// What may interrupt an evaluation: a signal, when training alone. In a data-parallel job
    /// the ranks could see it at different batches, so they finish the evaluation and stop
    /// after the step, together.
    fn eval_stop(&self) -> Option<&AtomicUsize> {
        self.stop.as_deref().filter(|_| self.world.size() == 1)
    }

    /// One set of metrics: into metrics.jsonl, the best/last tracker, and the display.
    fn record(&mut self, step: usize, values: &BTreeMap<String, f64>) -> Result<()> {
        if let Some(log) = self.log.as_mut() {
            log.write(step, values)?;
        }
        self.state.tracker.update(step, values);
        self.progress.log(step, self.total_steps, values);
        Ok(())
    }

    /// Before the last step: a checkpoint every `checkpoint_every` steps, at a new best
    /// `best_metric` (marked `best`), and when a signal asks the run to stop.
    fn checkpoint_if_due(&mut self, step: usize, stopping: bool) -> Result<()> {
        let t = &self.recipe.trainer;
        let periodic = t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every);
        if periodic || stopping || self.is_best(step) {
            self.last_checkpoint = Some(self.save_checkpoint(step)?);
        }
        Ok(())
    }

    /// Whether `step` set the best `best_metric` so far (with `trainer.keep_best`).
    fn is_best(&self, step: usize) -> bool {
        let t = &self.recipe.trainer;
        t.keep_best && self.state.tracker.best_step.get(&t.best_metric) == Some(&step)
    }

    /// Saves the model, the optimizer and the loop state at `step`, marks it `best` if it is,
    /// and prunes old checkpoints.
    fn save_checkpoint(&mut self, step: usize) -> Result<PathBuf> {
        self.state.optimizer_steps = self.optimizer.steps();
        self.state.dropout_rng_position = self.dropout_rng.position().to_string();
        if self.world.size() > 1 {
            // Every rank's position, gathered: each fills its own slot.
            let mut positions = vec![0u64; self.world.size()];
            positions[self.world.rank()] = self.dropout_rng.position();
            self.world.max_u64(&mut positions)?;
            self.state.dropout_rng_position = positions[0].to_string();
            self.state.dropout_rng_other_ranks =
                positions[1..].iter().map(u64::to_string).collect();
        }
        let optimizer_state = self.optimizer_state()?;
        if !self.world.is_main() {
            // Rank 0 writes it; the others name it in messages.
            let name = checkpoint::step_dir_name(step);
            return Ok(self.run.path.join("checkpoints").join(name));
        }
        let dir = save_checkpoint(
            &self.run.path,
            &self.varmap,
            &self.model_cfg,
            &optimizer_state,
            &self.state,
        )?;
        let checkpoints = self.run.path.join("checkpoints");
        if self.is_best(step) {
            checkpoint::mark_best(&checkpoints, step)?;
        }
        checkpoint::prune(&checkpoints, self.recipe.trainer.keep_last)?;
        Ok(dir)
    }

    /// The optimizer's whole state: this process's, or under ZeRO-1 every rank's share gathered
    /// on rank 0 (the others get theirs back), so a checkpoint resumes with any number of ranks
    /// and with or without sharding.
    fn optimizer_state(&self) -> Result<HashMap<String, Tensor>> {
        let mine = self.optimizer.state();
        if self.owners.is_none() {
            return Ok(mine);
        }
        // Rank 0 keeps its own share as it is; the others send theirs, serialized.
        let bytes = match self.world.is_main() {
            true => Vec::new(),
            false => safetensors::serialize(mine.iter().map(|(k, t)| (k.as_str(), t)), None)
                .context("serializing this rank's optimizer state")?,
        };
        let parts = self.world.gather_bytes(bytes)?;
        if !self.world.is_main() {
            return Ok(mine);
        }
        let mut all = mine;
        // Each rank's bytes are dropped once parsed; into host memory, since on a GPU the whole
        // state would not fit where its shares do.
        for (rank, bytes) in parts.into_iter().enumerate().skip(1) {
            let part = checkpoint::parse_tensors(&bytes, &Device::Cpu)
                .with_context(|| format!("rank {rank}'s optimizer state"))?;
            all.extend(part);
        }
        Ok(all)
    }

    /// The run stopped by signal `stop` after `step` (its checkpoint is written).
    fn interrupted(self, step: usize, stop: usize) -> TrainOutcome {
        self.progress.finish();
        self.mark_stopped(step, Some(stop));
        let rest = match step == self.total_steps {
            true => "before the final evaluation; run it with",
            false => "continue with",
        };
        self.progress.line(&format!(
            "stopped by signal {stop} after step {step} (checkpointed), {rest} `kiln train \
             --resume {}`",
            self.run.path.display()
        ));
        TrainOutcome {
            run_dir: self.run.path.clone(),
            summary: serde_json::Value::Null,
            interrupted: Some(stop),
        }
    }

    /// `stopped.json`, so `kiln runs` says "stopped", not "crashed". The checkpoint is what
    /// matters: failing to write the marker is only worth a warning.
    fn mark_stopped(&self, step: usize, signal: Option<usize>) {
        if !self.world.is_main() {
            return;
        }
        if let Err(e) = self.run.mark_stopped(step, signal) {
            eprintln!("warning: {e:#}");
        }
    }

    /// The run stopped by `TrainOptions::stop_after` (its checkpoint is written).
    fn stopped_after(self) -> TrainOutcome {
        self.progress.finish();
        self.mark_stopped(self.state.step, None);
        TrainOutcome {
            run_dir: self.run.path.clone(),
            summary: serde_json::Value::Null,
            interrupted: None,
        }
    }

    /// The final checkpoint, the final evaluation on the whole validation split (and the test
    /// split, when there is one), and `summary.json`. The checkpoint comes first: a signal or a
    /// crash during the evaluation (minutes on a large split) then loses no training, and
    /// `--resume` runs the evaluation alone.
    fn finish(mut self) -> Result<TrainOutcome> {
        let total_steps = self.total_steps;
        let final_checkpoint = match (&self.last_checkpoint, self.started_at == total_steps) {
            (Some(resumed), true) => resumed.clone(),
            _ => self.save_checkpoint(total_steps)?,
        };
        self.last_checkpoint = Some(final_checkpoint.clone());
        if let Some(signal) = self.stop_signal() {
            return Ok(self.interrupted(total_steps, signal));
        }
        let values = match self.final_evaluation() {
            Err(e) => match e.downcast_ref::<task::Interrupted>() {
                Some(i) => return Ok(self.interrupted(total_steps, i.signal)),
                None => return Err(e),
            },
            Ok(values) => values,
        };
        self.record(total_steps, &values)?;
        if self.is_best(total_steps) && self.world.is_main() {
            checkpoint::mark_best(&self.run.path.join("checkpoints"), total_steps)?;
        }
        self.progress.finish();
        if !self.world.is_main() {
            return Ok(TrainOutcome {
                interrupted: None,
                run_dir: self.run.path.clone(),
                summary: serde_json::Value::Null,
            });
        }

        let summary = self.summary(&final_checkpoint);
        let path = &self.run.path;
        // Atomic: a summary.json marks the run finished, so a kill must not leave half of one.
        let text = serde_json::to_string_pretty(&summary)? + "\n";
        let file = path.join("summary.json");
        kiln_core::fs::write_atomic(&file, text.as_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
        self.progress.line(&format!(
            "done in {} → {}",
            crate::progress::duration(self.run.started.elapsed().as_secs_f64()),
            path.display()
        ));
        self.write_artifacts();
        Ok(TrainOutcome {
            interrupted: None,
            run_dir: self.run.path.clone(),
            summary,
        })
    }

    /// Metrics of the whole validation (and test) split; a classifier's confusion matrices go
    /// to `confusion.json` for the report.
    fn final_evaluation(&self) -> Result<BTreeMap<String, f64>> {
        let mut values = BTreeMap::new();
        let mut matrices = Vec::new();
        let splits = [
            ("eval", Some(&self.data.val)),
            ("test", self.data.test.as_ref()),
        ];
        for (prefix, examples) in splits {
            let Some(examples) = examples else { continue };
            let e = self.evaluate(examples, None, prefix)?;
            values.extend(e.metrics);
            if let Some(matrix) = e.confusion {
                matrices.push(report::Confusion {
                    split: prefix.into(),
                    labels: self.data.labels.clone().unwrap_or_default(),
                    matrix,
                });
            }
        }
        if !matrices.is_empty() && self.world.is_main() {
            let file = self.run.path.join(report::CONFUSION_FILE);
            kiln_core::fs::write_atomic(&file, serde_json::to_string(&matrices)?.as_bytes())
                .with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(values)
    }

    /// A language model's continuations of a few prompts from the validation split, for the
    /// report (seeded: the same run draws the same samples).
    fn samples(&self) -> Result<Vec<report::Sample>> {
        use kiln_core::data::codec::Codec;
        if self.recipe.task != kiln_core::recipe::Task::LanguageModel {
            return Ok(Vec::new());
        }
        let codec = Codec::from_dir(&self.run.path)?;
        let compute = amp::compute_dtype(self.recipe.precision);
        let model = detached_model(&self.varmap, &self.model_cfg, &self.device, compute)?;
        let context = self.model_cfg.context().unwrap_or(64);
        let order = self.data.val.eval_order();
        let mut out = Vec::new();
        for i in 0..SAMPLES.min(order.len()) {
            let id = order[i * order.len() / SAMPLES];
            let data::HostTensor::U32(tokens, _) = self.data.val.collate(&[id]).inputs else {
                continue;
            };
            let prompt = &tokens[..(tokens.len() / 2).clamp(1, 32)];
            let sampling = crate::generate::Sampling {
                max_new_tokens: 64,
                temperature: 0.8,
                top_k: Some(40),
                top_p: None,
                seed: self.recipe.seed.wrapping_add(i as u64),
                stop: codec.end_of_text(),
            };
            let all = crate::generate::generate(
                model.as_ref(),
                prompt,
                context,
                &sampling,
                &self.device,
                |_| {},
            )?;
            out.push(report::Sample {
                prompt: codec.decode(prompt)?,
                continuation: codec.decode(&all[prompt.len()..])?,
            });
        }
        Ok(out)
    }

    /// After `summary.json`: samples (language models), `plots/` and `report.html`, then where
    /// they are and the commands that fit the run. The run is finished whatever happens here: a
    /// failure is a warning that says how to retry.
    fn write_artifacts(&self) {
        let path = &self.run.path;
        let warn = |what: &str, e: anyhow::Error| {
            eprintln!(
                "warning: could not write {what} ({e:#}); the run itself is complete. Retry with \
                 `kiln report {}`",
                path.display()
            )
        };
        match self.samples() {
            Ok(samples) if !samples.is_empty() => {
                let file = path.join(report::SAMPLES_FILE);
                let text = serde_json::to_string_pretty(&samples).unwrap_or_default();
                if let Err(e) = kiln_core::fs::write_atomic(&file, text.as_bytes()) {
                    warn("the samples", e.into());
                }
            }
            Ok(_) => {}
            Err(e) => warn("the samples", e),
        }
        let plots = report::write_plots(path).map_err(|e| warn("the plots", e));
        let report = report::write_report(path).map_err(|e| warn("report.html", e));
        let p = &self.progress;
        let last = &self.state.tracker.last;
        let finals: Vec<String> = last
            .iter()
            .filter(|(k, _)| k.starts_with("eval/") || k.starts_with("test/"))
            .map(|(k, v)| crate::progress::metric(k, *v, self.items))
            .collect();
        p.line(&format!("final: {}", finals.join(" | ")));
        if let Ok(file) = report {
            p.line(&format!("report: {}", file.display()));
        }
        if plots.is_ok() {
            p.line(&format!(
                "plots:  {}/",
                path.join(report::PLOTS_DIR).display()
            ));
        }
        let run = path.display();
        let mut next = Vec::new();
        match self.recipe.task {
            kiln_core::recipe::Task::LanguageModel => {
                next.push(format!("kiln generate {run} --prompt \"...\""));
            }
            kiln_core::recipe::Task::Classification => {
                next.push(format!(
                    "kiln predict {run} --input FILE --output predictions.csv"
                ));
                if self.data.test.is_some() {
                    next.push(format!("kiln eval {run} --split test"));
                }
            }
        }
        next.push(format!("kiln export {run} --out {run}/hf"));
        next.push(format!("kiln plot {run}"));
        next.push(format!("tensorboard --logdir {run}/tb"));
        p.line("next:");
        for n in next {
            p.line(&format!("  {n}"));
        }
    }

    fn summary(&self, final_checkpoint: &Path) -> serde_json::Value {
        let (recipe, state, run) = (self.recipe, &self.state, &self.run);
        let (items_seen, train_seconds) = (state.items_seen, state.train_seconds);
        let rate_key = match recipe.task {
            kiln_core::recipe::Task::Classification => "samples_per_second",
            kiln_core::recipe::Task::LanguageModel => "tokens_per_second",
        };
        let items_per_epoch =
            self.loader.batches_per_epoch * recipe.data.batch_size * self.items_per_example;
        json!({
            "recipe": recipe.name,
            "kiln_version": kiln_core::VERSION,
            "git_commit": run::GIT_COMMIT,
            "seed": recipe.seed,
            "device": kiln_core::device::device_name(&self.device),
            "parameters": self.n_params,
            "trainable_parameters": self.n_trainable(),
            "steps": self.total_steps,
            "epochs": items_seen as f64 / items_per_epoch as f64,
            "wall_seconds": run.started.elapsed().as_secs_f64(),
            "train_seconds": train_seconds,
            rate_key: items_seen as f64 / train_seconds,
            "final": metric_map(&state.tracker.last),
            "best": metric_map(&state.tracker.best),
            "best_step": state.tracker.best_step,
            "checkpoint": final_checkpoint.strip_prefix(&run.path).unwrap_or(final_checkpoint),
            "data_files": self.data.files.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        })
    }
}

/// The step count of the finished run in `dir` (its `summary.json`), if it finished. A run
/// resumed with a larger `trainer.max_steps` keeps its old summary until it finishes again, so
/// the count, not the file, says whether these steps were evaluated.
fn finished_at(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let summary: serde_json::Value = serde_json::from_str(&text).ok()?;
    summary["steps"].as_u64().map(|n| n as usize)
}

/// Refuses a job whose ranks read different data (a file changed between their starts, another
/// machine's copy): their gradients would average two data sets. Each rank says what it read.
fn same_data_on_every_rank(world: &World, data: &DataSplits) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let sum = crate::distributed::checksum(
        data.files
            .iter()
            .flat_map(|(p, h)| [p.as_bytes(), h.as_bytes()]),
    );
    crate::distributed::say(&format!(
        "rank {}/{}: data sha256 {:016x} ({} files)",
        world.rank(),
        world.size(),
        sum,
        data.files.len()
    ));
    anyhow::ensure!(
        world.agree(sum)?,
        "the processes of the job read different data (rank {} has {sum:016x}; see each rank's \
         line above): give every rank the same files, then start the job again",
        world.rank()
    );
    Ok(())
}

/// Rank 0's weights on every rank (initialization is seeded, but a checkpoint or a pretrained
/// folder could be read differently), confirmed by a checksum.
fn same_weights_on_every_rank(world: &World, varmap: &VarMap) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let f32s = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    // One checksum per parameter, of what it holds once set: no copy of the whole model.
    let mut sums = Vec::new();
    for p in &params_where(varmap, |_| true) {
        let t = p.var.as_tensor();
        let mut v = f32s(t)?;
        world.broadcast_f32(&mut v)?;
        let received = Tensor::from_slice(&v, t.shape(), t.device())?.to_dtype(t.dtype())?;
        p.var.set(&received)?;
        let held = f32s(p.var.as_tensor())?;
        let bytes: Vec<u8> = held.iter().flat_map(|x| x.to_le_bytes()).collect();
        sums.push(crate::distributed::checksum([bytes]).to_le_bytes());
    }
    let sum = crate::distributed::checksum(sums);
    anyhow::ensure!(
        world.agree(sum)?,
        "rank {}'s weights differ from rank 0's after the broadcast (checksum {sum:016x})",
        world.rank()
    );
    Ok(())
}

/// How many prompts a language model's report shows continued.
const SAMPLES: usize = 3;

/// What a run counts for throughput and progress: tokens or examples.
fn items_noun(task: kiln_core::recipe::Task) -> &'static str {
    match task {
        kiln_core::recipe::Task::LanguageModel => "tokens",
        kiln_core::recipe::Task::Classification => "examples",
    }
}

/// The model's configuration. A resumed run takes its weights from its checkpoint and its
/// architecture from its own resolved recipe, not from `init_from` (which may have moved since).
fn model_config(recipe: &Recipe, data: &DataSplits, resuming: bool) -> Result<ModelConfig> {
    let shape = input_shape(data);
    if !resuming {
        return Ok(ModelConfig::from_recipe(recipe, data.num_classes, &shape)?);
    }
    let mut r = recipe.clone();
    r.init_from = None;
    Ok(ModelConfig::from_recipe(&r, data.num_classes, &shape)?)
}

/// The training data stream, from batch `start` on.
pub(crate) fn loader(recipe: &Recipe, data: &DataSplits, start: u64) -> Result<Loader> {
    let d = &recipe.data;
    let (batch_size, shuffle, prefetch) = (d.batch_size, d.shuffle, d.prefetch);
    Loader::new(
        data.train.clone(),
        batch_size,
        shuffle,
        recipe.seed,
        prefetch,
        start,
    )
}

/// The shape of one input example, e.g. [1, 28, 28] or [seq_len].
pub(crate) fn input_shape(data: &DataSplits) -> Vec<usize> {
    match data.train.collate(&[0]).inputs {
        data::HostTensor::F32(_, s) | data::HostTensor::U32(_, s) => s[1..].to_vec(),
    }
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

fn save_checkpoint(
    run_dir: &Path,
    varmap: &VarMap,
    cfg: &ModelConfig,
    optimizer_state: &HashMap<String, Tensor>,
    state: &TrainerState,
) -> Result<PathBuf> {
    // Frozen pretrained weights (LoRA) are not saved: `init_from` has them. Buffers (BatchNorm's
    // running statistics) are: evaluation depends on them.
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(k, _)| cfg.saved(k))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    checkpoint::write_checkpoint(&run_dir.join("checkpoints"), state.step, |dir| {
        checkpoint::save_tensors(&dir.join(checkpoint::MODEL_FILE), &weights)?;
        checkpoint::save_tensors(&dir.join(checkpoint::OPTIMIZER_FILE), optimizer_state)?;
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

fn metric_map(m: &BTreeMap<String, f64>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), kiln_core::metrics::json_number(*v)))
            .collect(),
    )
}
