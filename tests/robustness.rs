//! Hostile input, end to end: every case gets one clear error naming the problem and the fix,
//! a non-zero exit, no panic, and leaves saved work as it was. The table in
//! `hostile_inputs_are_refused_before_anything_is_built` lists what was tried; the README's
//! reliability section points here.

mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Fails with exit 1 and an `error:` line holding every `want` fragment, without a panic.
fn refused(o: &std::process::Output, what: &str, want: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("error: "), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!err.contains("Some("), "{what}: Rust debug text in {err}");
    for w in want {
        assert!(err.contains(w), "{what}: expected {w:?} in {err}");
    }
}

#[test]
fn hostile_inputs_are_refused_before_anything_is_built() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let r = recipe.to_str().unwrap();
    let run = dir.path().join("run");
    let a_file = write_file(dir.path(), "a-file", "not a directory");
    #[rustfmt::skip]
    let table: &[(&[&str], &[&str])] = &[
        // Sizes no machine has: refused from the parameter count, before any allocation.
        (&["--set", "model.n_embd=1000000000"],
            &["parameters", "available on cpu", "make the [model] smaller"]),
        (&["--set", "model.n_layer=100000", "--set", "model.n_embd=4096", "--set", "model.n_head=32"],
            &["parameters", "available on cpu"]),
        // Activations for a batch no machine holds: the estimate, by part, and the key to lower.
        (&["--set", "data.batch_size=100000000"],
            &["this recipe needs about", "activations for data.batch_size = 100000000", "lower data.batch_size"]),
        // A batch larger than the training split (fits in memory, but no batch can be drawn).
        (&["--set", "data.batch_size=5000"],
            &["data.batch_size = 5000 is larger than the training split", "lower data.batch_size to at most"]),
        (&["--set", "model.kind=transformerx"], &["transformerx"]),
    ];
    for (args, want) in table {
        let o = train_in(&recipe, &run, args, dir.path());
        refused(&o, &format!("{args:?}"), want);
        assert!(!run.exists(), "{args:?} left {}", run.display());
    }
    let o = kiln(
        &["train", r, "--run-dir", a_file.to_str().unwrap()],
        dir.path(),
    );
    refused(
        &o,
        "--run-dir FILE",
        &["a-file", "is a file, not a directory"],
    );
    assert_eq!(std::fs::read_to_string(&a_file).unwrap(), "not a directory");
    // A pretrained config that asks for the impossible: refused before its weights are read.
    let hf = dir.path().join("huge-gpt2");
    std::fs::create_dir(&hf).unwrap();
    let config = r#"{"model_type": "gpt2", "n_embd": 1000000000, "n_layer": 1, "n_head": 2,
        "vocab_size": 50257, "n_positions": 1024, "layer_norm_epsilon": 1e-5}"#;
    write_file(&hf, "config.json", config);
    let header = br#"{"__metadata__":{"format":"pt"}}"#;
    let mut empty = (header.len() as u64).to_le_bytes().to_vec();
    empty.extend_from_slice(header);
    write_file(&hf, "model.safetensors", empty);
    let tokenizer = repo().join("data/gpt2-tokenizer/tokenizer.json");
    let pretrained = write_file(
        dir.path(),
        "huge.toml",
        format!(
            "description = \"init_from a huge config\"\ntask = \"language-model\"\n\
             init_from = \"{}\"\n[model]\nkind = \"gpt\"\n[data]\ndataset = \"text-bpe\"\n\
             path = \"tiny.txt\"\ntokenizer = \"{}\"\nseq_len = 16\nbatch_size = 2\n\
             [optim]\nname = \"adamw\"\nlr = 1e-4\n[trainer]\nmax_steps = 2\n",
            hf.display(),
            tokenizer.display()
        ),
    );
    let o = train_in(&pretrained, &run, &[], dir.path());
    refused(&o, "huge init_from", &["parameters", "smaller init_from"]);
    assert!(!run.exists());

    // Counts of zero are refused by the option parser (exit 2), naming the option.
    for args in [
        &["bench", r, "--steps", "0"][..],
        &["embed", "--model", "x", "--batch-size", "0", "hi"],
    ] {
        let o = kiln(args, dir.path());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("must be at least 1"), "{}", stderr(&o));
    }
}

#[test]
fn a_run_that_fails_to_start_can_be_retried_in_the_same_directory() {
    let (dir, recipe) = tiny_gpt_fixture("");
    // A directory kiln makes is removed again; one the user made empty is left empty.
    let made = dir.path().join("made");
    let given = dir.path().join("given");
    std::fs::create_dir(&given).unwrap();
    for run in [&made, &given] {
        let o = train_in(&recipe, run, &["--set", "model.n_head=3"], dir.path());
        refused(&o, "n_head 3", &["model.n_head", "not divisible"]);
        match run == &made {
            true => assert!(!run.exists()),
            false => assert_eq!(std::fs::read_dir(run).unwrap().count(), 0),
        }
        let o = train_in(&recipe, run, &["--set", "trainer.max_steps=2"], dir.path());
        assert!(o.status.success(), "retry: {}", stderr(&o));
        assert!(run.join("checkpoints/step-2").is_dir());
    }
}

#[test]
fn one_run_has_one_writer() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    let mut first = long_training(&recipe, &run, &[], Stdio::null());
    let o = kiln(&["train", "--resume", run.to_str().unwrap()], dir.path());
    first.kill().unwrap();
    first.wait().unwrap();
    refused(
        &o,
        "second writer",
        &["is in use by another kiln process", "wait for it to finish"],
    );
    // Once the first process is gone (even killed), its lock goes with it.
    let o = kiln(
        &[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--quiet",
            "--set",
            "trainer.max_steps=2",
        ],
        dir.path(),
    );
    assert!(!stderr(&o).contains("in use"), "{}", stderr(&o));
}

#[test]
fn a_second_signal_exits_at_once_and_says_so() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    // Steps of about a second, so that both signals land within one.
    let slow = ["--set", "model.n_embd=512", "--set", "model.n_layer=6"];
    let child = long_training(&recipe, &run, &slow, Stdio::piped());
    let pid = child.id() as i32;
    // SAFETY: signals a child this test spawned and has not reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(50));
    unsafe { libc::kill(pid, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT: finishing this step"), "{err}");
    assert!(err.contains("SIGINT again: exiting now"), "{err}");
}

/// Rewrites `checkpoint`'s manifest for its files as they are now: content that is wrong but
/// intact as files, so the loaders' own checks are what must catch it.
fn reseal(checkpoint: &Path) {
    let manifest = checkpoint.join("manifest.json");
    let mut m = read_json(&manifest);
    for (name, sha) in m["sha256"].as_object_mut().unwrap() {
        *sha = kiln::core::fs::sha256_file(&checkpoint.join(name))
            .unwrap()
            .into();
    }
    std::fs::write(&manifest, m.to_string()).unwrap();
}

/// Loads `file`, lets `edit` change its tensors, saves it and reseals its checkpoint.
fn edit_tensors(
    file: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let mut t = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, file).unwrap();
    reseal(file.parent().unwrap());
}

#[test]
fn weights_that_are_not_finite_or_not_the_models_are_refused() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    let o = train_in(&recipe, &run, &["--set", "trainer.max_steps=3"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let r = run.to_str().unwrap();
    let ck = run.join("checkpoints/step-3");
    let model = ck.join("model.safetensors");
    let intact = std::fs::read(&model).unwrap();
    let out = dir.path().join("hf");
    let o_ = out.to_str().unwrap();

    // NaN in one tensor: eval and export name it instead of printing `null` metrics.
    edit_tensors(&model, |t| {
        let w = &t["transformer.wpe.weight"];
        let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
        t.insert("transformer.wpe.weight".into(), nan);
    });
    for args in [vec!["eval", r], vec!["export", r, "--out", o_]] {
        let o = kiln(&args, dir.path());
        refused(
            &o,
            "NaN weights",
            &["transformer.wpe.weight", "NaN or infinite"],
        );
    }
    assert!(!out.exists(), "a refused export wrote {}", out.display());

    // A tensor the model does not have: export would write a folder no loader accepts.
    std::fs::write(&model, &intact).unwrap();
    edit_tensors(&model, |t| {
        let extra =
            candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu);
        t.insert("transformer.h.7.stray.weight".into(), extra.unwrap());
    });
    let o = kiln(&["export", r, "--out", o_], dir.path());
    refused(
        &o,
        "extra tensor",
        &["transformer.h.7.stray.weight", "does not"],
    );
    assert!(!out.exists());

    // Optimizer moments of another shape: --resume refuses, naming the moment and both shapes.
    std::fs::write(&model, &intact).unwrap();
    reseal(&ck);
    let optimizer = ck.join("optimizer.safetensors");
    edit_tensors(&optimizer, |t| {
        let bad =
            candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu);
        t.insert("transformer.wpe.weight.exp_avg".into(), bad.unwrap());
    });
    let o = kiln(
        &[
            "train",
            "--resume",
            r,
            "--quiet",
            "--set",
            "trainer.max_steps=6",
        ],
        dir.path(),
    );
    refused(
        &o,
        "misshapen moment",
        &["transformer.wpe.weight.exp_avg", "[2, 2]", "[16, 32]"],
    );
    // Refusing changed nothing on disk: the run still evaluates.
    assert_eq!(std::fs::read(&model).unwrap(), intact);
    let o = kiln(&["eval", r], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
}
