//! `kiln verify`: a fresh run re-runs byte-identical; an edited data file and a tampered
//! recipe are named, with a non-zero exit.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A 20-step tiny GPT run with checkpoints at steps 8, 16 and 20; returns the fixture folder
/// (which holds the data file `tiny.txt`) and the run.
fn trained() -> (tempfile::TempDir, PathBuf) {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    let sets = [
        "trainer.max_steps=20",
        "trainer.checkpoint_every=8",
        "trainer.eval_every=8",
        "trainer.log_every=4",
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    ok(&train_in(&recipe, &run, &args, dir.path()));
    (dir, run)
}

fn verify(run: &Path, extra: &[&str], cwd: &Path) -> std::process::Output {
    kiln(&[&["verify", run.to_str().unwrap()], extra].concat(), cwd)
}

/// Every file of the run with its bytes: verify must leave the run as it found it.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_fresh_run_verifies_identical() {
    let (dir, run) = trained();
    let record = read_json(&run.join("run.json"));
    assert_eq!(record["device"], "cpu");
    assert_eq!(record["seed"], 7);
    assert_eq!(
        record["data_files"][0]["path"],
        summary(&run)["data_files"][0]["path"]
    );
    assert_eq!(record["recipe_sha256"].as_str().unwrap().len(), 64);
    let before = snapshot(&run);

    let out = ok(&verify(&run, &[], dir.path()));
    for line in [
        "weights: identical at step 8 (",
        "optimizer: identical at step 8 (",
        "metrics: identical up to step 8 (3 lines, throughput, seconds, all_reduce_ms aside)",
        "data: 1 file unchanged since the run",
        "recipe: recipe.toml unchanged since the run started",
        "kiln: same version ",
        "device: cpu, as the run",
        "verified: ",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert_eq!(snapshot(&run), before, "verify changed the run");

    // --steps picks the last checkpoint at or before it. At the last step the re-run also makes
    // the final evaluation: train lines at 4..=20, evaluations at 8, 16 and 20.
    let out = ok(&verify(&run, &["--steps", "17"], dir.path()));
    assert!(out.contains("weights: identical at step 16 ("), "{out}");
    let out = ok(&verify(&run, &["--steps", "20"], dir.path()));
    assert!(out.contains("weights: identical at step 20 ("), "{out}");
    assert!(
        out.contains("metrics: identical up to step 20 (8 lines"),
        "{out}"
    );
    let o = verify(&run, &["--steps", "5"], dir.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no checkpoint at or before step 5; its first is step-8"),
        "{}",
        stderr(&o)
    );

    // A run from before run.json: summary.json and the checkpoint's recipe copy stand in.
    std::fs::remove_file(run.join("run.json")).unwrap();
    let out = ok(&verify(&run, &[], dir.path()));
    assert!(
        out.contains("recipe: recipe.toml is checkpoint step-8's copy (the run has no run.json)"),
        "{out}"
    );
    assert!(out.contains("data: 1 file unchanged"), "{out}");
}

#[test]
fn an_edited_data_file_is_named() {
    let (dir, run) = trained();
    let text = dir.path().join("tiny.txt");
    let edited = std::fs::read_to_string(&text)
        .unwrap()
        .replacen("question", "quest on", 3);
    std::fs::write(&text, edited).unwrap();

    let o = verify(&run, &[], dir.path());
    assert!(!o.status.success(), "an edited data file verified");
    let out = stdout(&o);
    let line = format!("data: {} changed since the run (sha256 ", text.display());
    assert!(out.contains(&line), "{line:?} missing from:\n{out}");
    assert!(
        out.contains("weights: differ at step 8: largest |difference| "),
        "{out}"
    );
    assert!(out.contains("recipe: recipe.toml unchanged"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("did not verify at step 8: weights, optimizer, metrics, data"),
        "{err}"
    );

    // A missing data file is named too (the re-run cannot start).
    std::fs::remove_file(&text).unwrap();
    let o = verify(&run, &[], dir.path());
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains(&format!("data: {} is missing", text.display())),
        "{out}"
    );
    assert!(
        out.contains("weights: cannot re-run the recipe to step 8: "),
        "{out}"
    );
}

#[test]
fn a_tampered_recipe_is_named() {
    let (dir, run) = trained();
    let recipe = run.join("recipe.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    assert!(text.contains("lr = 0.003\n"), "{text}");
    std::fs::write(&recipe, text.replace("lr = 0.003\n", "lr = 0.002\n")).unwrap();

    let o = verify(&run, &[], dir.path());
    assert!(!o.status.success(), "a tampered recipe verified");
    let out = stdout(&o);
    assert!(
        out.contains("recipe: recipe.toml changed since the run started (sha256 "),
        "{out}"
    );
    assert!(
        out.contains("; changed from checkpoint step-8's copy: optim.lr"),
        "{out}"
    );
    assert!(
        out.contains("weights: differ at step 8: largest |difference| "),
        "{out}"
    );
    assert!(out.contains("data: 1 file unchanged"), "{out}");
    assert!(
        stderr(&o).contains("did not verify at step 8: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_run_extended_by_resume_still_verifies() {
    let (dir, run) = trained();
    // `--resume --set trainer.max_steps=28` rewrites recipe.toml; the re-run to step 8 must
    // follow the schedule of the 20 steps in force then (the checkpoint's copy), or every weight
    // would differ.
    let o = kiln(
        &[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--quiet",
            "--set",
            "trainer.max_steps=28",
        ],
        dir.path(),
    );
    ok(&o);
    let out = ok(&verify(&run, &[], dir.path()));
    assert!(out.contains("weights: identical at step 8 ("), "{out}");
    assert!(
        out.contains("in [trainer] only, as a --resume may; changed from checkpoint step-8's copy: trainer.max_steps"),
        "{out}"
    );
    // A key outside [trainer] still fails, even beside a legitimate change.
    let recipe = run.join("recipe.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, text.replace("lr = 0.003\n", "lr = 0.002\n")).unwrap();
    let o = verify(&run, &[], dir.path());
    assert!(!o.status.success());
    assert!(stdout(&o).contains("optim.lr"), "{}", stdout(&o));
}
