//! The `kiln` command line: train, eval, generate, recipes.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kiln::core::data::text::CharVocab;
use kiln::core::recipe::{list_recipes, Recipe};
use kiln::trainers::generate::{generate, Sampling};
use kiln::trainers::run::{load_run, load_vocab};
use kiln::trainers::{train, TrainOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

// candle allocates a fresh buffer for every op; glibc hands large ones back to the kernel and
// page-faults them in again on the next step. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        #[arg(long)]
        device: Option<String>,
    },
    /// Sample text from a language-model run.
    Generate {
        run_dir: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        device: Option<String>,
    },
    /// List the recipes with a one-line description.
    Recipes {
        #[arg(long, default_value = "recipes")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Val,
    Test,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(Some(signal)) => ExitCode::from(128 + signal as u8),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(Some(signal)) when training stopped early on a signal.
fn run(cli: Cli) -> Result<Option<usize>> {
    match cli.command {
        Command::Train {
            recipe,
            resume,
            set,
            run_dir,
            device,
            quiet,
        } => {
            let opts = TrainOptions {
                run_dir,
                runs_root: None,
                device,
                quiet,
                stop: Some(stop_on_signals()?),
            };
            let outcome = match (resume, recipe) {
                (Some(dir), _) => kiln::trainers::trainer::resume(&dir, &set, &opts)?,
                (None, Some(recipe)) => {
                    train(&Recipe::load(resolve_recipe_path(recipe), &set)?, &opts)?
                }
                (None, None) => bail!("give a recipe, or --resume RUN_DIR"),
            };
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
            device,
        } => {
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let run = load_run(&run_dir, &device)?;
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
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            device,
        } => {
            let device = kiln::core::device::open_device(device.as_deref().unwrap_or("auto"))?;
            let vocab = CharVocab {
                chars: load_vocab(&run_dir)?,
            };
            let run = load_run(&run_dir, &device)?;
            let kiln::models::ModelConfig::Gpt(cfg) = &run.model_cfg else {
                bail!("{} is not a language-model run", run_dir.display());
            };
            let ids = vocab.encode(&prompt).map_err(|c| {
                anyhow::anyhow!("the prompt has {c:?}, which is not in the model's vocabulary")
            })?;
            let sampling = Sampling {
                max_new_tokens,
                temperature,
                top_k,
                seed,
            };
            let mut out = std::io::stdout().lock();
            write!(out, "{prompt}")?;
            generate(
                run.model.as_ref(),
                &ids,
                cfg.block_size,
                &sampling,
                &device,
                |t| {
                    let _ = write!(out, "{}", vocab.decode(&[t]));
                    let _ = out.flush();
                },
            )?;
            writeln!(out)?;
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
    }
}

/// The first SIGINT or SIGTERM sets the returned flag to its number (the trainer checkpoints and
/// stops after the current step); a second one exits at once with the conventional 128 + signal.
fn stop_on_signals() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())?;
        signal_hook::flag::register(sig, armed.clone())?;
        signal_hook::flag::register_usize(sig, stop.clone(), sig as usize)?;
    }
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
