//! The `kiln` command line: train, eval, generate, export, recipes.

use anyhow::{Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use kiln::core::data::codec::StreamDecoder;
use kiln::core::recipe::{list_recipes, Recipe};
use kiln::trainers::export::{export, load_language_model, ExportOptions};
use kiln::trainers::generate::{generate, Sampling};
use kiln::trainers::run::load_run_at;
use kiln::trainers::{train, TrainOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

// candle allocates a fresh buffer for every op; glibc hands large ones back to the kernel and
// page-faults them in again on the next step. mimalloc keeps them. Counted for
// `kiln bench --profile`.
#[global_allocator]
static GLOBAL: kiln::core::alloc::Counting<mimalloc::MiMalloc> =
    kiln::core::alloc::Counting(mimalloc::MiMalloc);

/// mimalloc's `mi_option_purge_delay` (option 15 of `mi_option_e` in its v2 `mimalloc.h`, which
/// libmimalloc-sys builds; the crate has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Every training step frees and reallocates the same large buffers. By default mimalloc hands
/// freed memory back to the kernel after 10 ms, and the next step faults it in again, zeroed
/// page by page: a third of a CPU ResNet step went to `clear_page` (perf). Never purging keeps
/// the process at the peak it reaches every step anyway. `MIMALLOC_PURGE_DELAY` still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it at each purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

/// candle runs element-wise ops over 64K+ elements on its own worker pool, whose workers spin
/// 25,000 times after each op before they sleep. With as many workers as cores, that spin takes
/// a core from the next op (a matmul, a rayon kernel) for about as long as a small op lasts:
/// `perf` put 31% of a Fashion-MNIST MLP step's samples in the spinning worker. Sleeping after
/// 2,000 spins made the MLP and shakespeare-char steps 15–25% faster (benches/RESULTS.md);
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` still wins.
fn short_worker_spin() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread starts: candle reads it when its pool first runs.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

/// Runs `f` on a worker of a thread pool with one thread per core, which the kernels' parallel
/// loops and the products then run in. Called from outside a pool, every parallel loop hands
/// its work to the pool's threads and puts the caller to sleep until they finish, then wakes
/// it: two context switches and a wake-up's latency per op, and a third runnable thread on as
/// many cores as workers. On a worker, the caller takes part in its own loops and the others
/// steal from it. shakespeare-char: 181K context switches in 205 steps -> 32K, step median
/// 40.1 -> 35.3 ms and mean 44.2 -> 36.3 ms (`perf stat`, benches/RESULTS.md). The data
/// thread's own parallel loops stay on rayon's global pool, so a worker waiting for a batch
/// never waits on itself. Workers get main's stack size: candle's backward walks the graph
/// recursively.
fn on_a_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .stack_size(8 << 20)
        .thread_name(|i| format!("kiln-worker-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        // No threads to be had: run as before, the loops on rayon's global pool.
        Err(_) => f(),
    }
}

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train deep-learning models from TOML recipes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a recipe; writes a run directory with the resolved recipe, metrics, checkpoints
    /// and a summary. SIGINT/SIGTERM finish the current step, write a checkpoint and exit
    /// (a second signal exits at once).
    Train {
        /// Recipe file, e.g. recipes/shakespeare-char.toml (or a name from `kiln recipes`).
        #[arg(required_unless_present = "resume", conflicts_with = "resume")]
        recipe: Option<PathBuf>,
        /// Continue the run in RUN_DIR from its newest intact checkpoint, exactly as if it had
        /// not stopped (--set may change trainer.* keys only).
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
        resume: Option<PathBuf>,
        /// Override a recipe key, type-checked: --set optim.lr=3e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run directory (default: runs/<recipe>-<timestamp>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N (overrides the recipe's `device`).
        #[arg(long)]
        device: Option<String>,
        /// Print log lines only, no progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a run's latest checkpoint; prints the metrics as JSON.
    Eval {
        run_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Split::Val)]
        split: Split,
        /// The run's checkpoint: latest, best or step-N.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Sample text from a language model (a run, an exported folder or a hub id), streaming
    /// it to stdout.
    Generate {
        /// A kiln run directory.
        #[arg(required_unless_present = "model", conflicts_with = "model")]
        run_dir: Option<PathBuf>,
        /// A Hugging Face model folder (e.g. from `kiln export`) or a hub id in the HF cache.
        #[arg(long, value_name = "DIR|ID")]
        model: Option<PathBuf>,
        /// The run's checkpoint: latest, best or step-N.
        #[arg(long)]
        checkpoint: Option<String>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: keep the most likely tokens up to this total probability.
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        device: Option<String>,
    },
    /// Write a run's checkpoint as a Hugging Face model folder (config.json, model.safetensors
    /// or shards, tokenizer, generation_config.json; a BERT also in the sentence-transformers
    /// layout) that transformers, vLLM, TGI, text-embeddings-inference and candle load.
    Export {
        run_dir: PathBuf,
        /// latest, best or step-N.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportDtype::F32)]
        dtype: ExportDtype,
        /// Replace a folder that is not empty (only once the new one is complete).
        #[arg(long)]
        force: bool,
        /// For a LoRA run: write the adapter alone (PEFT's adapter_config.json +
        /// adapter_model.safetensors) instead of merged weights.
        #[arg(long)]
        adapter: bool,
        /// Split weights above this size into model-0000N-of-0000M.safetensors shards with a
        /// model.safetensors.index.json: 5GB, 500MB, 2GiB or bytes.
        #[arg(long, default_value = "5GB", value_parser = kiln::trainers::export::parse_size)]
        max_shard_size: u64,
    },
    /// Sentence embeddings from a BERT model (mean-pooled, L2-normalized): one JSON array per
    /// text, one per line.
    Embed {
        /// A Hugging Face model folder or a hub id in the HF cache.
        #[arg(long, value_name = "DIR|ID")]
        model: String,
        /// The texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
        #[arg(long, default_value_t = 32, value_parser = positive)]
        batch_size: usize,
        #[arg(long)]
        device: Option<String>,
    },
    /// Classify every row of a TSV/CSV file (text classifiers) or every image below a folder
    /// (image classifiers) with a run or an exported folder; writes one JSON object per row or
    /// image (text or file, label, score, probs).
    Predict {
        /// A kiln run directory, an exported Hugging Face folder or a hub id.
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Default: the run's data.text_column, else "text".
        #[arg(long)]
        text_column: Option<String>,
        /// When the input has it, accuracy is printed. Default: the run's data.label_column.
        #[arg(long)]
        label_column: Option<String>,
        #[arg(long, default_value_t = 64, value_parser = positive)]
        batch_size: usize,
        #[arg(long)]
        device: Option<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Time training steps of a recipe: ms/step, tokens/s, MFU and peak memory.
    Bench {
        /// Recipe file or name.
        recipe: PathBuf,
        /// Override a recipe key: --set data.batch_size=8 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Timed steps.
        #[arg(long, default_value_t = 20, value_parser = positive)]
        steps: usize,
        /// Untimed steps first (allocation, kernel loading, caches).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long)]
        device: Option<String>,
        /// Peak TFLOP/s for MFU (default: 989, the H100/H200 bf16 peak, on CUDA).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also report where the time goes: forward, backward, update and batch per step,
        /// autograd graph size, allocations, and each of kiln's fused ops by pass.
        #[arg(long)]
        profile: bool,
    },
    /// List the recipes with a one-line description.
    Recipes {
        #[arg(long, default_value = "recipes")]
        dir: PathBuf,
    },
    /// Re-run a run's recipe from scratch in a temporary directory ($TMPDIR) up to one of its
    /// checkpoints, and compare the weights, optimizer state and metrics (throughput aside) with
    /// the recorded ones; also reports data files whose sha256 changed since the run, a changed
    /// recipe.toml, and kiln version/commit and device differences. Exits 0 only when identical
    /// (on the CPU a run verifies byte-identical). Relative data paths resolve against the
    /// current directory, as in training.
    Verify {
        run_dir: PathBuf,
        /// Verify at the run's last checkpoint at or before step N (the re-run trains that far;
        /// the schedule keeps the recorded max_steps). Default: its first checkpoint.
        #[arg(long, value_name = "N")]
        steps: Option<usize>,
        /// Re-run on this device (default: the one the run trained on).
        #[arg(long)]
        device: Option<String>,
    },
    /// Plot runs' metrics: one chart per metric, the runs overlaid with a legend.
    Plot {
        /// Run directories.
        #[arg(required = true, value_name = "RUN_DIR")]
        runs: Vec<PathBuf>,
        /// Metrics to chart, comma-separated (default: train/loss and every eval metric).
        #[arg(long, value_delimiter = ',')]
        metric: Vec<String>,
        /// Output file: .png or .svg (default: plot.png, or RUN/plots/plot.png for one run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Exponential-moving-average weight in [0, 1), as TensorBoard's slider (0 = raw).
        #[arg(long, default_value_t = 0.0)]
        smooth: f64,
        /// Horizontal axis: step, tokens (examples for a classifier) or seconds of training.
        #[arg(long, default_value = "step", value_parser = kiln::trainers::history::XAxis::parse)]
        x: kiln::trainers::history::XAxis,
        /// Logarithmic vertical axis.
        #[arg(long)]
        log_y: bool,
    },
    /// List runs: status (running / finished / stopped / crashed), progress, the final and best
    /// value of the recipe's best_metric, time, device and throughput.
    Runs {
        /// A folder of run directories.
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// Order by this metric's final value, best first.
        #[arg(long, value_name = "METRIC")]
        sort: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Compare two runs: the recipe keys that differ and the metric deltas.
        #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"], conflicts_with_all = ["sort", "json"])]
        diff: Option<Vec<PathBuf>>,
    },
    /// (Re)write a run's plots/ and report.html from its files (a finished run gets both when it
    /// ends; this one also works on a running, stopped or crashed run).
    Report { run_dir: PathBuf },
}

/// A count that must be at least 1 (a batch size, a number of steps).
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e} (a whole number of at least 1)")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Val,
    Test,
}

fn main() -> ExitCode {
    keep_freed_memory();
    short_worker_spin();
    let cli = Cli::parse();
    match on_a_worker(|| run(cli)) {
        Ok(Some(signal)) => ExitCode::from(128 + signal as u8),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Names the BLAS that `KILN_BLAS` loaded (when `name_it`), and warns when it runs generic
/// kernels.
fn announce_blas(name: Option<&str>, name_it: bool) {
    let Some(name) = name else { return };
    if name_it {
        eprintln!("CPU matmul: {name}");
    }
    if name.contains("Prescott") && std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        eprintln!(
            "warning: this OpenBLAS did not recognize the CPU and runs generic kernels, slower \
             than kiln's own; set OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2), or \
             unset KILN_BLAS"
        );
    }
}

/// Ok(Some(signal)) when training stopped early on a signal.
fn run(cli: Cli) -> Result<Option<usize>> {
    // KILN_BLAS=openblas: refused up front when the library does not load; `kiln bench` names
    // it, and training warns when it runs generic kernels.
    let blas = kiln::kernels::blas::init().map_err(anyhow::Error::msg)?;
    match &cli.command {
        Command::Bench { .. } => announce_blas(blas.as_deref(), true),
        Command::Train { .. } => announce_blas(blas.as_deref(), false),
        _ => {}
    }
    match cli.command {
        Command::Train {
            recipe,
            resume,
            set,
            run_dir,
            device,
            quiet,
        } => {
            // Under mpirun (or srun) this process is one rank of a data-parallel job.
            let world = std::rc::Rc::new(kiln::trainers::distributed::World::from_launcher()?);
            let opts = TrainOptions {
                run_dir,
                runs_root: None,
                device,
                quiet,
                stop: Some(stop_on_signals()?),
                world: Some(world.clone()),
                ..Default::default()
            };
            let run = || match (resume, recipe) {
                (Some(dir), _) => kiln::trainers::trainer::resume(&dir, &set, &opts),
                (None, Some(recipe)) => Recipe::load(resolve_recipe_path(recipe), &set)
                    .map_err(anyhow::Error::from)
                    .and_then(|r| train(&r, &opts)),
                (None, None) => Err(anyhow::anyhow!("give a recipe, or --resume RUN_DIR")),
            };
            // A panic must not unwind into MPI_Finalize, which waits for ranks that wait in a
            // collective for this one: the hook has printed it, so end the job.
            let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                Ok(outcome) => outcome,
                Err(panic) => {
                    if world.size() > 1 {
                        eprintln!(
                            "error: rank {} of {} panicked (above); ending the job",
                            world.rank(),
                            world.size()
                        );
                        world.abort(101);
                    }
                    std::panic::resume_unwind(panic)
                }
            };
            let outcome = match outcome {
                Ok(o) => o,
                // The other ranks would wait for this one forever: end the job, error first.
                Err(e) if world.size() > 1 => {
                    kiln::trainers::distributed::say(&format!(
                        "error: rank {} of {}: {e:#}",
                        world.rank(),
                        world.size()
                    ));
                    world.abort(1);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if !world.is_main() {
                return Ok(outcome.interrupted);
            }
            if outcome.interrupted.is_none() {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome.summary["final"])?
                );
            }
            Ok(outcome.interrupted)
        }
        Command::Eval {
            run_dir,
            split,
            checkpoint,
            device,
        } => {
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let run = load_run_at(&run_dir, &checkpoint, &device)?;
            let data = kiln::core::data::load(&run.recipe)?;
            let (examples, prefix) = match split {
                Split::Val => (data.val, "eval"),
                Split::Test => (
                    data.test
                        .context("this data set has no test split; use --split val")?,
                    "test",
                ),
            };
            let metrics = kiln::trainers::task::evaluate(
                run.model.as_ref(),
                run.recipe.task,
                examples.as_ref(),
                run.recipe.data.batch_size,
                None,
                &device,
                prefix,
                None,
            )?;
            let mut out = serde_json::Map::new();
            out.insert(
                "checkpoint".into(),
                run.checkpoint.display().to_string().into(),
            );
            for (k, v) in metrics {
                out.insert(k, kiln::core::metrics::json_number(v));
            }
            println!("{}", serde_json::Value::Object(out));
            Ok(None)
        }
        Command::Generate {
            run_dir,
            model,
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
        } => {
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let spec = run_dir.or(model).expect("clap requires one");
            let lm = load_language_model(&spec, checkpoint.as_deref(), &device)?;
            let ids = lm.codec.encode(&prompt)?;
            let sampling = Sampling {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                stop: lm.codec.end_of_text(),
            };
            // Every option is checked before the prompt is echoed: an error prints nothing.
            sampling.check()?;
            anyhow::ensure!(
                !ids.is_empty(),
                "--prompt is empty: give at least one character"
            );
            anyhow::ensure!(
                lm.context() > 0,
                "this model has a context of 0 tokens: it cannot generate"
            );
            let mut out = std::io::stdout().lock();
            write!(out, "{prompt}")?;
            out.flush()?;
            let mut stream = StreamDecoder::new(&ids);
            let mut failed = None;
            let generated = generate(
                lm.model.as_ref(),
                &ids,
                lm.context(),
                &sampling,
                &device,
                |t| match stream.push(&lm.codec, t) {
                    Ok(piece) => {
                        let _ = write!(out, "{piece}");
                        let _ = out.flush();
                    }
                    Err(e) => failed = Some(e),
                },
            );
            // The text so far ends its line either way, so an error starts on its own.
            writeln!(out)?;
            generated?;
            failed.map_or(Ok(None), Err)
        }
        Command::Export {
            run_dir,
            checkpoint,
            out,
            dtype,
            force,
            adapter,
            max_shard_size,
        } => {
            let dtype = match dtype {
                ExportDtype::F32 => DType::F32,
                ExportDtype::Bf16 => DType::BF16,
                ExportDtype::F16 => DType::F16,
            };
            let opts = ExportOptions {
                checkpoint,
                dtype,
                force,
                adapter,
                max_shard_size,
            };
            export(&run_dir, &out, &opts)?;
            eprintln!("exported {} → {}", run_dir.display(), out.display());
            Ok(None)
        }
        Command::Embed {
            model,
            texts,
            batch_size,
            device,
        } => {
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let rows = kiln::trainers::infer::embed(&model, &texts, batch_size, &device)?;
            let mut out = std::io::stdout().lock();
            for r in rows {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            }
            Ok(None)
        }
        Command::Predict {
            model,
            input,
            output,
            text_column,
            label_column,
            batch_size,
            device,
            quiet,
        } => {
            use std::io::IsTerminal;
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let opts = kiln::trainers::infer::PredictOptions {
                text_column: text_column.as_deref(),
                label_column: label_column.as_deref(),
                batch_size,
                progress: !quiet && std::io::stderr().is_terminal(),
            };
            let s = kiln::trainers::infer::predict(&model, &input, &output, &opts, &device)?;
            match s.accuracy {
                Some(a) => eprintln!("{} rows → {} (accuracy {a:.4})", s.rows, output.display()),
                None => eprintln!("{} rows → {}", s.rows, output.display()),
            }
            if let Some(first) = &s.first_unknown {
                eprintln!(
                    "warning: {} rows have a label the model does not know (first: {first:?}); \
                     they are predicted but left out of the accuracy",
                    s.unknown_labels
                );
            }
            Ok(None)
        }
        Command::Bench {
            recipe,
            set,
            steps,
            warmup,
            device,
            peak_tflops,
            json,
            profile,
        } => {
            let recipe = Recipe::load(resolve_recipe_path(recipe), &set)?;
            let report = kiln::trainers::bench::bench(
                &recipe,
                &kiln::trainers::bench::BenchOptions {
                    steps,
                    warmup,
                    device,
                    peak_tflops,
                    profile,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for line in report.lines() {
                    println!("{line}");
                }
            }
            Ok(None)
        }
        Command::Recipes { dir } => {
            let recipes = list_recipes(&dir)
                .with_context(|| format!("cannot list recipes in {}; pass --dir", dir.display()))?;
            let width = recipes.iter().map(|r| r.name.len()).max().unwrap_or(0);
            for r in recipes {
                println!("{:width$}  {}", r.name, r.description);
            }
            Ok(None)
        }
        Command::Plot {
            runs,
            metric,
            out,
            smooth,
            x,
            log_y,
        } => {
            use kiln::trainers::{history::History, plot};
            let histories = runs
                .iter()
                .map(|r| History::read(r))
                .collect::<Result<Vec<_>>>()?;
            let opts = plot::PlotOptions {
                metrics: metric,
                smooth,
                x,
                log_y,
            };
            let charts = plot::charts(&histories, &opts)?;
            let out = out.unwrap_or_else(|| match runs.as_slice() {
                [one] => one.join(kiln::trainers::report::PLOTS_DIR).join("plot.png"),
                _ => PathBuf::from("plot.png"),
            });
            if let Some(dir) = out.parent().filter(|d| d.ends_with("plots")) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            plot::write(&charts, &opts, &out)?;
            println!("wrote {}", out.display());
            Ok(None)
        }
        Command::Runs {
            dir,
            sort,
            json,
            diff,
        } => {
            use kiln::trainers::runs;
            if let Some([a, b]) = diff.as_deref() {
                print!("{}", runs::diff(a, b)?);
                return Ok(None);
            }
            let runs::Listing {
                runs: mut list,
                unreadable,
            } = runs::list(&dir)?;
            for (d, e) in &unreadable {
                eprintln!("warning: skipped {}: {e:#}", d.display());
            }
            if let Some(m) = sort {
                runs::sort(&mut list, &m)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&runs::to_json(&list))?);
            } else if list.is_empty() {
                println!("no runs in {}", dir.display());
            } else {
                print!("{}", runs::table(&list));
            }
            Ok(None)
        }
        Command::Report { run_dir } => {
            use kiln::trainers::report;
            kiln::trainers::history::History::read(&run_dir)?;
            let plots = report::write_plots(&run_dir)?;
            let file = report::write_report(&run_dir)?;
            println!(
                "wrote {} and {} plot files in {}",
                file.display(),
                plots.len(),
                run_dir.join(report::PLOTS_DIR).display()
            );
            Ok(None)
        }
        Command::Verify {
            run_dir,
            steps,
            device,
        } => {
            let opts = kiln::trainers::verify::VerifyOptions { steps, device };
            let report = kiln::trainers::verify::verify(&run_dir, &opts)?;
            for check in &report.checks {
                println!("{check}");
            }
            anyhow::ensure!(
                report.verified(),
                "{} did not verify at step {}: {} (see above)",
                run_dir.display(),
                report.step,
                report.failed()
            );
            println!(
                "verified: {} reproduces at step {}",
                run_dir.display(),
                report.step
            );
            Ok(None)
        }
    }
}

/// The first SIGINT or SIGTERM sets the returned flag to its number (the trainer checkpoints and
/// stops after the current step); a second one exits at once with the conventional 128 + signal.
/// A thread takes the signals, so each can say what happens next.
fn stop_on_signals() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(AtomicUsize::new(0));
    // SIGUSR1: Slurm's warning before a time limit (`--signal=USR1@120`), which mpirun forwards.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])
        .context("cannot install the SIGINT/SIGTERM/SIGUSR1 handlers")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("kiln-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = match sig {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGUSR1",
                };
                if flag.swap(sig as usize, Ordering::SeqCst) == 0 {
                    eprintln!(
                        "\n{name}: finishing this step and writing a checkpoint, then stopping \
                         (a second signal exits at once)"
                    );
                } else {
                    eprintln!(
                        "\n{name} again: exiting now; the steps since the newest checkpoint are \
                         lost (`kiln train --resume RUN_DIR` continues from it)"
                    );
                    std::process::exit(128 + sig);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(stop)
}

/// `kiln train shakespeare-char` finds `recipes/shakespeare-char.toml`.
fn resolve_recipe_path(p: PathBuf) -> PathBuf {
    if p.exists() || p.extension().is_some() {
        return p;
    }
    let candidate = PathBuf::from("recipes").join(&p).with_extension("toml");
    if candidate.exists() {
        candidate
    } else {
        p
    }
}
