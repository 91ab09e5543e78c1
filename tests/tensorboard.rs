//! TensorBoard event files: every run's `tb/` holds every scalar of metrics.jsonl at its step
//! and the resolved recipe as text; a run killed and resumed still shows each step once. Read
//! back by kiln's reader, and by TensorBoard's own `EventAccumulator` where Python has it.

mod common;

use common::*;
use kiln::core::tensorboard::{self, event_files, read_scalars, read_texts};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `(step, value)` per tag, a value that is not finite as `None` (metrics.jsonl writes those as
/// null), every other value as the f32 TensorBoard stores.
type Curves = BTreeMap<String, Vec<(u64, Option<u32>)>>;

fn as_f32(v: f64) -> Option<u32> {
    v.is_finite().then(|| (v as f32).to_bits())
}

/// metrics.jsonl's curves, in the order of its lines.
fn jsonl_curves(run: &Path) -> Curves {
    let mut out = Curves::new();
    for m in metrics(run) {
        let step = m["step"].as_u64().unwrap();
        for (k, v) in m.as_object().unwrap() {
            if k != "step" {
                let v = v.as_f64().and_then(as_f32);
                out.entry(k.clone()).or_default().push((step, v));
            }
        }
    }
    out
}

/// The curves of `RUN/tb` as kiln's reader reads them.
fn tb_curves(run: &Path) -> Curves {
    read_scalars(&run.join("tb"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(|(s, x)| (s, as_f32(x))).collect()))
        .collect()
}

/// Each tag's steps strictly increase: no step written twice, none out of order.
fn assert_one_value_per_step(curves: &Curves) {
    for (tag, points) in curves {
        assert!(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            "{tag}: steps {:?}",
            points.iter().map(|p| p.0).collect::<Vec<_>>()
        );
    }
}

/// The recipe text summary: once, at step 0, the run's recipe.toml in a markdown code block.
fn assert_recipe_text(run: &Path, texts: &BTreeMap<String, Vec<(u64, String)>>) {
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    let recipe_texts = &texts["recipe"];
    assert_eq!(recipe_texts.len(), 1, "{recipe_texts:?}");
    let (step, text) = &recipe_texts[0];
    assert_eq!(*step, 0);
    assert_eq!(text, &format!("```toml\n{}\n```", recipe.trim_end()));
}

#[test]
fn a_finished_run_has_every_metric_in_tensorboard() {
    // f16 (loss scale, skipped steps), a test split (test/*) and periodic evaluations (eval/*).
    let (dir, recipe) = mlp_fixture("epochs = 2\neval_every = 10");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cpu\"\nprecision = \"f16\"");
    std::fs::write(&recipe, text).unwrap();
    let run = dir.path().join("run");
    ok(&train_in(&recipe, &run, &[], dir.path()));

    let want = jsonl_curves(&run);
    for tag in [
        "train/loss",
        "lr",
        "grad_norm",
        "throughput",
        "epoch",
        "loss_scale",
        "skipped_steps",
        "eval/loss",
        "eval/accuracy",
        "test/loss",
        "test/accuracy",
    ] {
        assert!(want.contains_key(tag), "metrics.jsonl has no {tag}");
    }
    let got = tb_curves(&run);
    assert_one_value_per_step(&got);
    assert_eq!(got, want);
    assert_eq!(event_files(&run.join("tb")).unwrap().len(), 1);
    assert_recipe_text(&run, &read_texts(&run.join("tb")).unwrap());
    if let Some(py) = python_with_tensorboard() {
        let (scalars, texts) = tensorboard_reads(&py, &run);
        assert_eq!(scalars, want);
        assert_recipe_text(&run, &texts);
    }
}

/// The newest checkpoint's step, once there is one.
fn latest_checkpoint_step(run: &Path) -> Option<u64> {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

fn last_logged_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    let last = text.lines().rfind(|l| l.ends_with('}'))?;
    serde_json::from_str::<serde_json::Value>(last).ok()?["step"].as_u64()
}

#[test]
fn a_run_killed_and_resumed_shows_one_clean_curve() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("max_steps = 60", "max_steps = 200")
        .replace("log_every = 10", "log_every = 2")
        .replace("eval_every = 30", "eval_every = 10")
        .replace("checkpoint_every = 30", "checkpoint_every = 20");
    std::fs::write(&recipe, text).unwrap();
    let run = dir.path().join("run");

    // SIGKILL once the run has logged steps past its first checkpoint: those are in the event
    // file, and the resume writes them again.
    let mut child = kiln_train(&recipe, &run).spawn().unwrap();
    let t = Instant::now();
    loop {
        let past = latest_checkpoint_step(&run)
            .zip(last_logged_step(&run))
            .is_some_and(|(ck, logged)| logged > ck);
        if past {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before the kill; make it longer"
        );
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!run.join("summary.json").exists());
    let checkpoint = latest_checkpoint_step(&run).unwrap();
    let before = tb_curves(&run);
    let past: Vec<u64> = before["train/loss"]
        .iter()
        .map(|p| p.0)
        .filter(|&s| s > checkpoint)
        .collect();
    eprintln!("killed with checkpoint step-{checkpoint}; event steps after it: {past:?}");
    // And a record torn by the kill at the end of the file.
    let files = event_files(&run.join("tb")).unwrap();
    assert_eq!(files.len(), 1);
    let record = tensorboard::frame(b"a record the kill cut short");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes.extend_from_slice(&record[..record.len() - 7]);
    std::fs::write(&files[0], bytes).unwrap();

    ok(&kiln(
        &["train", "--quiet", "--resume", run.to_str().unwrap()],
        dir.path(),
    ));
    assert!(run.join("summary.json").exists());

    let want = jsonl_curves(&run);
    assert_one_value_per_step(&want);
    let got = tb_curves(&run);
    assert_one_value_per_step(&got);
    assert_eq!(got, want);
    assert_eq!(
        got["train/loss"].last().unwrap().0,
        200,
        "the curve reaches the last step"
    );
    let files = event_files(&run.join("tb")).unwrap();
    assert!(files.len() >= 2, "{files:?}");
    // The first file now ends at the checkpoint; the resumed run's file starts after it.
    let first = tensorboard::read_events(&files[0]).unwrap();
    assert!(first.iter().all(|e| e.step as u64 <= checkpoint));
    let resumed = tensorboard::read_events(&files[1]).unwrap();
    assert!(resumed.iter().skip(1).all(|e| e.step as u64 > checkpoint));
    let texts = read_texts(&run.join("tb")).unwrap();
    assert_recipe_text(&run, &texts);

    let Some(py) = python_with_tensorboard() else {
        return;
    };
    let (scalars, texts) = tensorboard_reads(&py, &run);
    assert_eq!(
        scalars, want,
        "TensorBoard's EventAccumulator reads other scalars"
    );
    assert_recipe_text(&run, &texts);
}

/// A Python that imports `tensorboard`: `KILN_PYTHON`, `python3`, or CI's `/opt/kiln-py`. None,
/// with the reason printed, when there is none; with `KILN_REQUIRE_SHARED=1` (CI, which
/// installs it) that fails the test instead.
fn python_with_tensorboard() -> Option<String> {
    let candidates = [
        std::env::var("KILN_PYTHON").ok(),
        Some("python3".into()),
        Some("/opt/kiln-py/bin/python".into()),
    ];
    for py in candidates.into_iter().flatten() {
        let ok = Command::new(&py)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            eprintln!("TensorBoard's own reader: {py}");
            return Some(py);
        }
    }
    let why = "no python with tensorboard; pip install tensorboard, or set KILN_PYTHON";
    if std::env::var("KILN_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{why} (KILN_REQUIRE_SHARED=1, and .ci/run installs it in /opt/kiln-py)");
    }
    eprintln!("skipping: TensorBoard's own reader ({why})");
    None
}

/// What TensorBoard's `EventAccumulator` reads from `RUN/tb`: the scalars and the texts.
fn tensorboard_reads(py: &str, run: &Path) -> (Curves, BTreeMap<String, Vec<(u64, String)>>) {
    let script = repo().join("tests/python/tb_scalars.py");
    let out = python_json(py, &[&script, &run.join("tb")]);
    let scalars = out["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points.as_array().unwrap().iter().map(|p| {
                let step = p[0].as_u64().unwrap();
                (step, p[1].as_f64().and_then(as_f32))
            });
            (tag.clone(), points.collect())
        })
        .collect();
    let texts = out["texts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().to_string()));
            (tag.clone(), points.collect())
        })
        .collect();
    (scalars, texts)
}
