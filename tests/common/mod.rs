//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether a file from ../shared (or an installed data set) is present. Absent: the test is
/// skipped with a printed reason, unless `KILN_REQUIRE_SHARED=1` (as in CI), which fails it.
pub fn require(path: &Path, what: &str) -> bool {
    if path.exists() {
        return true;
    }
    if std::env::var("KILN_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!(
            "{what} is missing at {} and KILN_REQUIRE_SHARED=1",
            path.display()
        );
    }
    eprintln!("skipping: {what} not found at {}", path.display());
    false
}

/// Runs the kiln binary with `args` in `cwd`.
pub fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("kiln runs")
}

/// The stdout of a run that must have succeeded (its stderr is the failure message).
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout(o)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// A small repetitive text: learnable in a few dozen steps.
pub fn write_text(dir: &Path) -> PathBuf {
    let line = "to be, or not to be, that is the question.\n";
    write_file(dir, "tiny.txt", line.repeat(60))
}

/// Writes `contents` to `dir/name` and returns that path.
pub fn write_file(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// A temporary folder holding [`write_text`]'s text and a [`tiny_gpt_recipe`] over it (with
/// `extra` top-level lines); returns the folder and the recipe.
pub fn tiny_gpt_fixture(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let recipe = tiny_gpt_recipe(dir.path(), &text, extra);
    (dir, recipe)
}

/// A temporary folder holding a [`write_image_fixture`] of 400 train and 100 test images and an
/// [`mlp_recipe`] over it (with `extra_trainer` lines); returns the folder and the recipe.
pub fn mlp_fixture(extra_trainer: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_image_fixture(dir.path(), 400, 100);
    let recipe = mlp_recipe(dir.path(), dir.path(), extra_trainer);
    (dir, recipe)
}

/// A tiny character-level GPT recipe over `text`.
pub fn tiny_gpt_recipe(dir: &Path, text: &Path, extra: &str) -> PathBuf {
    write_file(
        dir,
        "tiny-gpt.toml",
        format!(
            r#"description = "tiny gpt for tests"
task = "language-model"
seed = 7
device = "cpu"
{extra}
[model]
kind = "gpt"
n_layer = 1
n_head = 2
n_embd = 32

[data]
dataset = "text-char"
path = "{}"
seq_len = 16
batch_size = 8

[optim]
name = "adamw"
lr = 3e-3
weight_decay = 0.1

[schedule]
name = "cosine"
warmup_steps = 5

[trainer]
max_steps = 60
log_every = 10
eval_every = 30
eval_batches = 4
checkpoint_every = 30
clip_grad_norm = 1.0
"#,
            text.display()
        ),
    )
}

/// Writes IDX files shaped like Fashion-MNIST: `n` train and `m` test 8×8 images; class `c`
/// lights row `c % 8` (plus noise), so classes are separable.
pub fn write_image_fixture(dir: &Path, n: usize, m: usize) {
    let mut state = 12345u32;
    let mut noise = move || {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        (state >> 27) as u8
    };
    for (name, count) in [("train", n), ("t10k", m)] {
        let labels: Vec<u8> = (0..count).map(|i| (i * 7 % 10) as u8).collect();
        let mut images = Vec::new();
        for &l in &labels {
            for r in 0..8 {
                for c in 0..8 {
                    let on = r == (l as usize % 8) && (l < 8 || c < 4);
                    images.push(if on { 200 } else { noise() });
                }
            }
        }
        kiln::core::data::fashion_mnist::write_split(dir, name, &images, &labels, (8, 8)).unwrap();
    }
}

/// An MLP recipe over an image fixture folder.
pub fn mlp_recipe(dir: &Path, data: &Path, extra_trainer: &str) -> PathBuf {
    write_file(
        dir,
        "tiny-mlp.toml",
        format!(
            r#"description = "tiny mlp for tests"
task = "classification"
seed = 3
device = "cpu"

[model]
kind = "mlp"
hidden = [32]

[data]
dataset = "fashion-mnist"
path = "{}"
val_size = 40
batch_size = 16

[optim]
name = "adamw"
lr = 1e-2

[trainer]
log_every = 5
{extra_trainer}
"#,
            data.display()
        ),
    )
}

/// A `kiln train <recipe> --quiet --run-dir <run>` command, to add arguments to and run.
pub fn kiln_train(recipe: &Path, run: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(["train", recipe.to_str().unwrap(), "--quiet", "--run-dir"])
        .arg(run);
    c
}

/// Runs [`kiln_train`] with `extra` arguments in `cwd`.
pub fn train_in(recipe: &Path, run: &Path, extra: &[&str], cwd: &Path) -> Output {
    kiln_train(recipe, run)
        .args(extra)
        .current_dir(cwd)
        .output()
        .expect("kiln runs")
}

/// The `train/loss` values of a run's metrics, in order.
pub fn train_losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter_map(|m| m["train/loss"].as_f64())
        .collect()
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `step-N` folders in a checkpoint folder, sorted by name.
pub fn step_dirs(ck: &Path) -> Vec<String> {
    let mut steps: Vec<String> = std::fs::read_dir(ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    steps
}

/// Reads metrics.jsonl as JSON values.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// metrics.jsonl without the keys that time the machine (throughput, seconds): what two runs
/// of one recipe must agree on exactly.
#[allow(dead_code)]
pub fn metrics_without_timing(run: &Path) -> Vec<serde_json::Value> {
    metrics(run)
        .into_iter()
        .map(|mut m| {
            for k in kiln::core::metrics::TIMING_KEYS {
                m.as_object_mut().unwrap().remove(*k);
            }
            m
        })
        .collect()
}

pub fn summary(run: &Path) -> serde_json::Value {
    read_json(&run.join("summary.json"))
}

/// The Python interpreter that imports `modules` (e.g. "transformers, torch"), if there is one:
/// `KILN_PYTHON`, else `python3`. None, with the reason printed, when it cannot.
pub fn python_with(modules: &str) -> Option<String> {
    let py = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        eprintln!(
            "skipping: `{py} -c 'import {modules}'` fails; set KILN_PYTHON to a Python that has \
             them to run this check"
        );
        None
    }
}

/// Runs `py` with `args` (a script path, or `-c` and the script's text, then its arguments)
/// and reads the one JSON value it prints; a failure shows the script's stderr.
pub fn python_json(py: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> serde_json::Value {
    let o = Command::new(py)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `kiln train` of `recipe` into `run` for (nearly) ever, returned once it has started writing
/// the run (its metrics file exists).
#[allow(dead_code)]
pub fn long_training(
    recipe: &Path,
    run: &Path,
    extra: &[&str],
    stderr: std::process::Stdio,
) -> std::process::Child {
    let child = kiln_train(recipe, run)
        .args([
            "--set",
            "trainer.max_steps=100000",
            "--set",
            "data.batch_size=64",
        ])
        .args(extra)
        .current_dir(recipe.parent().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !run.join("metrics.jsonl").exists() && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// The MiniLM folder and the BANKING77 folder, or None (the test skips) when one is missing.
#[allow(dead_code)]
pub fn minilm_and_banking77() -> Option<(PathBuf, PathBuf)> {
    let folder = repo().join("../shared/data/all-MiniLM-L6-v2");
    let b77 = repo().join("../shared/data/banking77");
    (require(&folder, "all-MiniLM-L6-v2") && require(&b77, "BANKING77")).then_some((folder, b77))
}

/// Every `step`-th row of BANKING77's train.csv written to `d/train.csv`, with its
/// categories.json; returns the header and the rows.
#[allow(dead_code)]
pub fn banking77_slice(b77: &Path, d: &Path, step: usize) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(b77.join("train.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let rows: Vec<String> = lines.step_by(step).map(String::from).collect();
    write_file(d, "train.csv", format!("{header}\n{}\n", rows.join("\n")));
    std::fs::copy(b77.join("categories.json"), d.join("categories.json")).unwrap();
    (header, rows)
}

/// A recipe `d/<name>.toml` that fine-tunes the pretrained BERT in `folder` on
/// [`banking77_slice`]: `model` adds to [model], `val` says how the data is split, and `rest`
/// continues [optim] after its name (the lr, then the [trainer] table).
#[allow(dead_code)]
pub fn minilm_recipe(
    d: &Path,
    folder: &Path,
    name: &str,
    model: &str,
    val: &str,
    rest: &str,
) -> PathBuf {
    write_file(
        d,
        &format!("{name}.toml"),
        format!(
            r#"description = "minilm {name} slice"
task = "classification"
device = "cpu"
init_from = "{}"
[model]
kind = "bert"
{model}
[data]
dataset = "text-classification"
path = "{}"
train = "train.csv"
{val}
text_column = "text"
label_column = "category"
labels = "categories.json"
max_length = 32
batch_size = 32
[optim]
name = "adamw"
{rest}
"#,
            folder.display(),
            d.display()
        ),
    )
}
