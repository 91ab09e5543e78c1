//! The `kiln` binary end to end: recipes, train, eval, generate, and its errors.

mod common;

use common::*;

#[test]
fn recipes_lists_every_shipped_recipe() {
    let o = kiln(&["recipes"], &repo());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for name in ["shakespeare-char", "fashion-mnist-mlp", "fashion-mnist-cnn"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        assert!(
            line.len() > name.len() + 10,
            "{name} has a description: {line}"
        );
    }
}

#[test]
fn train_eval_generate() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    let o = train_in(
        &recipe,
        &run,
        &["--set", "trainer.max_steps=40", "--device", "cpu"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stdout(&o);
    assert!(
        log.contains("step 10/40 |") && log.contains("train/loss"),
        "--quiet prints log lines:\n{log}"
    );
    let final_metrics: serde_json::Value =
        serde_json::from_str(&log[log.find("{\n").expect("final metrics JSON")..]).unwrap();
    let final_loss = final_metrics["eval/loss"].as_f64().unwrap();

    // eval reproduces the final validation loss from the saved checkpoint.
    let o = kiln(
        &["eval", run.to_str().unwrap(), "--device", "cpu"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(
        (m["eval/loss"].as_f64().unwrap() - final_loss).abs() < 1e-5,
        "{m} vs {final_loss}"
    );
    assert!(m["checkpoint"].as_str().unwrap().ends_with("step-40"));
    let o = kiln(
        &["eval", run.to_str().unwrap(), "--split", "test"],
        dir.path(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("no test split"),
        "{}",
        stderr(&o)
    );

    // Greedy generation is deterministic and extends the prompt; sampling depends on the seed.
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            run.to_str().unwrap(),
            "--prompt",
            "to be",
            "--max-new-tokens",
            "30",
        ];
        args.extend_from_slice(extra);
        let o = kiln(&args, dir.path());
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim_end_matches('\n').to_string()
    };
    let greedy = gen(&["--temperature", "0"]);
    assert!(
        greedy.starts_with("to be") && greedy.chars().count() == 35,
        "{greedy:?}"
    );
    assert_eq!(greedy, gen(&["--temperature", "0"]));
    assert_eq!(gen(&["--seed", "1"]), gen(&["--seed", "1"]));
    let o = kiln(
        &[
            "generate",
            run.to_str().unwrap(),
            "--prompt",
            "Zebra",
            "--max-new-tokens",
            "3",
        ],
        dir.path(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("not in the model's vocabulary"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_input_gets_one_clear_error_and_a_nonzero_exit() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let r = recipe.to_str().unwrap();
    let fails = |args: &[&str], want: &[&str]| {
        let o = kiln(args, dir.path());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: expected {w:?} in {err}");
        }
    };
    fails(
        &["train", r, "--set", "optim.lrr=1"],
        &["--set optim.lrr=1", "optim.lrr", "expected one of"],
    );
    fails(
        &["train", r, "--set", "data.batch_size=big"],
        &["data.batch_size", "invalid type"],
    );
    fails(
        &["train", r, "--set", "precision=fp8"],
        &["precision", "fp8", "bf16"],
    );
    fails(
        &["train", r, "--set", "data.path=/nonexistent/x.txt"],
        &["/nonexistent/x.txt", "data.path"],
    );
    fails(
        &["train", r, "--device", "tpu"],
        &["unknown device `tpu`", "cuda:N"],
    );
    fails(
        &["train", "no-such-recipe.toml"],
        &["no-such-recipe.toml", "kiln recipes"],
    );
    fails(
        &["eval", dir.path().to_str().unwrap()],
        &["not a kiln run directory"],
    );
    // A model config error points at the model key in the file.
    std::fs::write(
        &recipe,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("n_head = 2", "n_head = 3"),
    )
    .unwrap();
    fails(
        &["train", r],
        &["tiny-gpt.toml:", "model.n_head", "not divisible"],
    );
}

/// A tiny GPT trained for `steps` steps by the binary: (its temp dir, the run directory).
fn trained_tiny_gpt(steps: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = dir.path().join("run");
    let max_steps = format!("trainer.max_steps={steps}");
    let o = train_in(&recipe, &run, &["--set", &max_steps], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    (dir, run)
}

#[test]
fn corrupt_checkpoint_is_named_and_refused() {
    let (dir, run) = trained_tiny_gpt(5);
    std::fs::write(
        run.join("checkpoints/step-5/model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let o = kiln(&["eval", run.to_str().unwrap()], dir.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("step-5/model.safetensors") && stderr(&o).contains("sha256"),
        "{}",
        stderr(&o)
    );
    // Past the integrity check (a manifest made for the broken file), the parse names it too.
    reseal(&run.join("checkpoints/step-5"));
    let o = kiln(&["eval", run.to_str().unwrap()], dir.path());
    assert!(
        stderr(&o).contains("step-5/model.safetensors") && stderr(&o).contains("corrupt"),
        "{}",
        stderr(&o)
    );
}

/// Rewrites a checkpoint's sha256 manifest for its files as they are now: a checkpoint that is
/// intact as a file set but wrong in content (another recipe's, or edited and resealed).
fn reseal(checkpoint: &std::path::Path) {
    let manifest = checkpoint.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for (name, sha) in m["sha256"].as_object_mut().unwrap() {
        let f = checkpoint.join(name);
        *sha = kiln::core::fs::sha256_file(&f).unwrap().into();
    }
    std::fs::write(&manifest, m.to_string()).unwrap();
}

#[test]
fn options_are_checked_before_anything_is_written() {
    let (dir, run) = trained_tiny_gpt(3);
    let r = run.to_str().unwrap();
    // generate echoes its prompt only once every option is known to be usable.
    for (option, want) in [
        ("--top-p=2", "--top-p must be in (0, 1]"),
        ("--temperature=-1", "--temperature must be ≥ 0"),
    ] {
        let o = kiln(&["generate", r, "--prompt", "hi", option], dir.path());
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
        assert_eq!(stdout(&o), "", "printed before the error");
    }
    // A warmup longer than the run is trained, with a warning.
    let (dir, recipe) = tiny_gpt_fixture("");
    let o = train_in(
        &recipe,
        &dir.path().join("warm"),
        &[
            "--set",
            "trainer.max_steps=3",
            "--set",
            "schedule.warmup_steps=50",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warmup_steps = 50 covers the whole run of 3 steps"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn damaged_checkpoints_and_overwriting_outputs_are_refused() {
    let (dir, run) = trained_tiny_gpt(5);
    let r = run.to_str().unwrap();
    let fails = |args: &[&str], want: &[&str]| {
        let o = kiln(args, dir.path());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: expected {w:?} in {err}");
        }
    };
    let model = run.join("checkpoints/step-5/model.safetensors");
    let intact = std::fs::read(&model).unwrap();

    // Exports into the run's checkpoints or over the run directory, --force or not.
    let inside = run.join("checkpoints/step-5");
    let inside = inside.to_str().unwrap();
    fails(
        &["export", r, "--out", inside, "--force"],
        &["inside the checkpoints", "pick a folder outside"],
    );
    fails(&["export", r, "--out", r, "--force"], &["the directory"]);
    assert_eq!(std::fs::read(&model).unwrap(), intact);

    // predict never writes over its input, whatever the path says.
    let rows = dir.path().join("rows.csv");
    std::fs::write(&rows, "text,label\nhello,0\n").unwrap();
    let same = dir.path().join("sub/../rows.csv");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    fails(
        &[
            "predict",
            r,
            "--input",
            rows.to_str().unwrap(),
            "--output",
            same.to_str().unwrap(),
        ],
        &["--output", "is the input itself"],
    );
    assert_eq!(
        std::fs::read_to_string(&rows).unwrap(),
        "text,label\nhello,0\n"
    );

    // A `latest` that points out of the checkpoints folder.
    let latest = run.join("checkpoints/latest");
    std::fs::write(&latest, "../../sub").unwrap();
    fails(&["eval", r], &["not a checkpoint folder (step-N)"]);
    std::fs::write(&latest, "step-5").unwrap();

    // One flipped bit in the weights: every command that reads them refuses, naming the file.
    let mut flipped = intact.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    std::fs::write(&model, flipped).unwrap();
    let out = dir.path().join("exported");
    for args in [
        vec!["eval", r],
        vec!["eval", r, "--checkpoint", "step-5"],
        vec!["generate", r, "--prompt", "hi", "--max-new-tokens", "2"],
        vec!["export", r, "--out", out.to_str().unwrap()],
    ] {
        fails(&args, &["step-5", "failed its integrity check", "sha256"]);
    }
    assert!(!out.exists(), "a refused export left {}", out.display());
}

#[test]
fn misshapen_weights_are_named_with_both_shapes() {
    let (dir, run) = trained_tiny_gpt(3);
    let path = run.join("checkpoints/step-3/model.safetensors");
    let mut weights = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let bad =
        candle_core::Tensor::zeros((5, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    weights.insert("transformer.wpe.weight".to_string(), bad);
    candle_core::safetensors::save(&weights, &path).unwrap();
    reseal(&run.join("checkpoints/step-3"));
    let o = kiln(&["eval", run.to_str().unwrap()], dir.path());
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("transformer.wpe.weight")
            && err.contains("[5, 32]")
            && err.contains("[16, 32]"),
        "{err}"
    );
}

/// `kiln bench` times the recipe's real training step and derives throughput and FLOPs from it.
#[test]
fn bench_reports_step_time_throughput_mfu_and_memory() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let o = kiln(
        &[
            "bench",
            recipe.to_str().unwrap(),
            "--steps",
            "4",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--peak-tflops",
            "1.5",
            "--json",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["steps"], 4);
    assert_eq!(r["items_per_step"], 8 * 16, "batch 8 × seq_len 16 tokens");
    assert_eq!(r["item"], "tokens");
    let ms = r["ms_per_step_median"].as_f64().unwrap();
    assert!(ms > 0.0 && ms <= r["ms_per_step_mean"].as_f64().unwrap() * 4.0);
    assert!(r["ms_per_step_min"].as_f64().unwrap() <= ms);
    let tps = r["items_per_second"].as_f64().unwrap();
    assert!((tps - 128.0 / (ms / 1e3)).abs() / tps < 1e-9);
    // nanoGPT's estimate: 6 N (N without the position table) + 12 L C T, per token.
    let n = r["parameters"].as_f64().unwrap() - 16.0 * 32.0;
    let per_token = 6.0 * n + 12.0 * 32.0 * 16.0;
    assert!((r["flops_per_step"].as_f64().unwrap() - per_token * 128.0).abs() < 1.0);
    let mfu = r["mfu"].as_f64().unwrap();
    assert!((mfu - r["achieved_tflops"].as_f64().unwrap() / 1.5).abs() < 1e-12);
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(r["final_loss"].as_f64().unwrap().is_finite());

    // Without a peak (CPU), MFU is reported as unavailable, not invented.
    let o = kiln(
        &[
            "bench",
            recipe.to_str().unwrap(),
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("MFU          n/a"), "{}", stdout(&o));
}

/// `kiln bench --profile` splits the step into its parts, counts the graph and the allocations,
/// and times each fused op per pass.
#[test]
fn bench_profile_accounts_for_the_step() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let args = [
        "bench",
        recipe.to_str().unwrap(),
        "--steps",
        "3",
        "--warmup",
        "1",
    ];
    let o = kiln(&[&args[..], &["--profile", "--json"]].concat(), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let p = &r["profile"];
    let ms = |k: &str| p[k].as_f64().unwrap();
    for part in ["forward_ms", "backward_ms", "update_ms"] {
        assert!(ms(part) > 0.0, "{part}: {p}");
    }
    // The parts are timed inside the step: together they fit in it.
    let parts = ms("forward_ms") + ms("backward_ms") + ms("update_ms");
    let mean = r["ms_per_step_mean"].as_f64().unwrap();
    assert!(
        parts <= mean * (1.0 + 1e-9) && ms("data_ms") >= 0.0,
        "{parts} vs {mean}"
    );
    // Every step builds the same graph; the binary counts its allocations.
    let ops = ms("graph_ops");
    assert!(ops > 10.0 && ops.fract() == 0.0, "{ops}");
    assert!(
        ms("allocations") > 0.0 && ms("allocated_bytes") > 0.0,
        "{p}"
    );
    // The forward keeps activations and the backward makes gradients: both grow the heap.
    for part in ["heap_peak_forward_bytes", "heap_peak_backward_bytes"] {
        assert!(ms(part) > 0.0, "{part}: {p}");
    }
    // One layer: ln_1, ln_2 and ln_f, each once forward and once backward per step.
    let op = |name: &str, pass: &str| {
        let ops = p["fused_ops"].as_array().unwrap();
        (ops.iter())
            .find(|o| o["op"] == name && o["pass"] == pass)
            .unwrap_or_else(|| panic!("{name} {pass} missing: {p}"))
            .clone()
    };
    for pass in ["forward", "backward"] {
        assert_eq!(op("kiln-layer-norm", pass)["calls"], 3.0);
        assert_eq!(op("kiln-causal-attention-packed", pass)["calls"], 1.0);
    }
    assert_eq!(op("kiln-adamw", "update")["calls"], 1.0);
    // The text report names the parts.
    let o = kiln(&[&args[..], &["--profile"]].concat(), dir.path());
    let text = stdout(&o);
    assert!(text.contains("profile      forward"), "{text}");
    assert!(text.contains("kiln-layer-norm"), "{text}");
}
