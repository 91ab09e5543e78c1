//! Seeing a run: the report, plots and closing lines a finished run leaves, `kiln plot`,
//! `kiln report` and `kiln runs` (status, --sort, --json, --diff), and their refusals.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn runs_json(dir: &Path) -> Vec<serde_json::Value> {
    let o = kiln(&["runs", dir.to_str().unwrap(), "--json"], dir);
    serde_json::from_str::<serde_json::Value>(&ok(&o))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn status_of(dir: &Path, name: &str) -> serde_json::Value {
    runs_json(dir)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no run {name} in kiln runs"))
}

#[test]
fn a_finished_language_model_run_leaves_a_report_plots_and_the_next_commands() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("lm");
    let out = ok(&train_in(&recipe, &run, &[], dir.path()));
    for line in [
        "final: eval/loss ",
        "report: ",
        "plots:  ",
        "kiln generate ",
        "kiln plot ",
        "tensorboard --logdir ",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    // Training lines say how far the run came: 8 sequences of 16 tokens a step.
    for m in metrics(&run).iter().filter(|m| m["train/loss"].is_number()) {
        let step = m["step"].as_u64().unwrap();
        assert_eq!(m["tokens"].as_f64(), Some((step * 8 * 16) as f64), "{m}");
        assert!(m["seconds"].as_f64().unwrap() > 0.0);
    }
    // Log lines carry units.
    assert!(out.contains(" tok/s"), "{out}");

    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    for part in [
        "<svg",
        "train/loss",
        "eval/perplexity",
        "Samples",
        "n_embd = 32",
    ] {
        assert!(html.contains(part), "report.html lacks {part}");
    }
    let samples = read_json(&run.join("samples.json"));
    assert_eq!(samples.as_array().unwrap().len(), 3);
    assert!(!samples[0]["prompt"].as_str().unwrap().is_empty());
    assert!(!samples[0]["continuation"].as_str().unwrap().is_empty());
    let png = std::fs::read(run.join("plots/train_loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(std::fs::read_to_string(run.join("plots/eval_loss.svg"))
        .unwrap()
        .contains("eval/loss"));

    // kiln plot: every option, SVG and PNG.
    let svg = dir.path().join("curves.svg");
    ok(&kiln(
        &[
            "plot",
            run.to_str().unwrap(),
            "--metric",
            "train/loss,eval/loss",
            "--smooth",
            "0.6",
            "--x",
            "tokens",
            "--log-y",
            "--out",
            svg.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let text = std::fs::read_to_string(&svg).unwrap();
    for part in [
        "train/loss",
        "eval/loss",
        "tokens trained on",
        "log scale",
        "\nlm\n",
    ] {
        assert!(text.contains(part), "the SVG lacks {part}");
    }
    ok(&kiln(
        &["plot", run.to_str().unwrap(), "--x", "seconds"],
        dir.path(),
    ));
    assert!(run.join("plots/plot.png").is_file());

    // kiln report rebuilds the report from the files alone.
    std::fs::remove_file(run.join("report.html")).unwrap();
    ok(&kiln(&["report", run.to_str().unwrap()], dir.path()));
    assert!(run.join("report.html").is_file());
}

#[test]
fn kiln_runs_tells_running_stopped_crashed_and_finished_apart() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let root = dir.path().join("runs");
    let run = root.join("long");

    let mut child = long_training(&recipe, &run, &[], Stdio::null());
    let r = status_of(&root, "long");
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["pid"].as_u64(), Some(child.id() as u64), "{r}");
    assert_eq!(r["total_steps"], 100000, "{r}");

    // SIGTERM: a checkpoint and a clean stop.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    child.wait().unwrap();
    assert_eq!(status_of(&root, "long")["status"], "stopped");

    // A resume refused (its data is gone) leaves the run stopped.
    let text = dir.path().join("tiny.txt");
    let moved = dir.path().join("moved.txt");
    std::fs::rename(&text, &moved).unwrap();
    let o = kiln(
        &["train", "--resume", run.to_str().unwrap(), "--quiet"],
        dir.path(),
    );
    assert!(!o.status.success());
    assert_eq!(status_of(&root, "long")["status"], "stopped");
    std::fs::rename(&moved, &text).unwrap();

    // Resumed, then SIGKILL: the process died.
    let mut resumed = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--resume", run.to_str().unwrap(), "--quiet"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while run.join("stopped.json").exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_of(&root, "long")["status"], "running");
    resumed.kill().unwrap();
    resumed.wait().unwrap();
    assert_eq!(status_of(&root, "long")["status"], "crashed");

    // A finished run beside it, with another learning rate.
    ok(&train_in(
        &recipe,
        &root.join("done"),
        &["--set", "optim.lr=0.001", "--set", "trainer.max_steps=30"],
        dir.path(),
    ));
    let done = status_of(&root, "done");
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["step"], 30);
    assert!(done["final"]["eval/loss"].as_f64().unwrap() > 0.0);

    let table = ok(&kiln(
        &["runs", root.to_str().unwrap(), "--sort", "eval/loss"],
        dir.path(),
    ));
    assert!(table.starts_with("run "), "{table}");
    assert!(
        table.contains("crashed") && table.contains("finished"),
        "{table}"
    );
    assert!(table.contains("tok/s"), "{table}");

    let diff = ok(&kiln(
        &[
            "runs",
            "--diff",
            run.to_str().unwrap(),
            root.join("done").to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(diff.contains("optim.lr: 0.003 → 0.001"), "{diff}");
    assert!(diff.contains("trainer.max_steps: 100000 → 30"), "{diff}");
    assert!(diff.contains("eval/loss: "), "{diff}");
}

#[test]
fn a_classifier_report_has_its_confusion_matrix() {
    let (dir, recipe) = mlp_fixture("max_steps = 40\neval_every = 20");
    let run = dir.path().join("clf");
    let out = ok(&train_in(&recipe, &run, &[], dir.path()));
    assert!(out.contains("kiln predict "), "{out}");
    assert!(out.contains(" ex/s"), "{out}");
    let matrices = read_json(&run.join("confusion.json"));
    let eval = &matrices[0];
    assert_eq!(eval["split"], "eval");
    let total: u64 = eval["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 40, "every validation example counted once");
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("Confusion matrix (eval split)"));
    assert!(html.contains("eval/accuracy"));
    assert!(run.join("plots/eval_accuracy.png").is_file());
    // `kiln runs` sorts accuracy highest first.
    ok(&kiln(
        &[
            "runs",
            dir.path().to_str().unwrap(),
            "--sort",
            "eval/accuracy",
        ],
        dir.path(),
    ));

    // The page renders in a browser, where there is one.
    let script = repo().join("tests/render-report.sh");
    let shot = dir.path().join("report.png");
    let o = Command::new("bash")
        .arg(&script)
        .arg(&run)
        .arg(&shot)
        .output()
        .unwrap();
    let said = ok(&o);
    if said.starts_with("skipping") {
        println!("{said}");
    } else {
        assert!(shot.is_file(), "{said}");
    }
}

#[test]
fn plots_runs_and_reports_refuse_what_they_cannot_show() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let run = d.join("r");
    ok(&train_in(
        &recipe,
        &run,
        &[
            "--set",
            "trainer.max_steps=10",
            "--set",
            "trainer.eval_every=0",
        ],
        d,
    ));
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::copy(run.join("recipe.toml"), empty.join("recipe.toml")).unwrap();
    let (r, e) = (run.to_str().unwrap(), empty.to_str().unwrap());
    let missing = d.join("nowhere/plot.png");
    let no_runs = d.join("none");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["plot", d.to_str().unwrap()],
            "is not a kiln run directory",
        ),
        (vec!["plot", e], "has no metrics yet"),
        (vec!["plot", r, "--metric", "eval/acc"], "train/loss"),
        (
            vec!["plot", r, "--out", missing.to_str().unwrap()],
            "does not exist",
        ),
        (vec!["plot", r, "--out", "x.jpg"], "a .png or a .svg"),
        (
            vec!["plot", r, "--smooth", "1.5"],
            "--smooth must be in [0, 1)",
        ),
        (vec!["plot", r, "--x", "epochs"], "use step, tokens"),
        (
            vec!["runs", "--diff", r, d.to_str().unwrap()],
            "is not a kiln run",
        ),
        (
            vec!["runs", no_runs.to_str().unwrap()],
            "is not a folder of runs",
        ),
        (
            vec!["runs", d.to_str().unwrap(), "--sort", "eval/nope"],
            "train/loss",
        ),
        (vec!["report", e], "has no metrics yet"),
    ];
    for (args, want) in cases {
        let o = kiln(&args, d);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: wanted `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
    // The unknown metric's message lists the ones the run has.
    let err = stderr(&kiln(&["plot", r, "--metric", "eval/acc"], d));
    assert!(err.contains("lr") && err.contains("grad_norm"), "{err}");
}
