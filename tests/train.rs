//! The trainer end to end on tiny models: loss falls, runs are reproducible, the run directory
//! holds what it promises, and bad training states are refused.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use kiln::core::recipe::Recipe;
use kiln::trainers::optim::Param;
use kiln::trainers::trainer::check_gradients;
use kiln::trainers::{train, TrainOptions};
use std::path::Path;

fn run(recipe: &Path, dir: &Path, name: &str, sets: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let recipe = Recipe::load(recipe, &sets)?;
    let opts = TrainOptions {
        run_dir: Some(dir.join(name)),
        quiet: true,
        ..Default::default()
    };
    Ok(train(&recipe, &opts)?.run_dir)
}

#[test]
fn gpt_loss_falls_and_run_dir_is_complete() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let run = run(&recipe, dir.path(), "run", &[]).unwrap();

    let losses = train_losses(&run);
    assert_eq!(losses.len(), 6, "a train/loss line every 10 of 60 steps");
    let vocab = 16f64; // distinct characters in the text
    assert!(
        (losses[0] - vocab.ln()).abs() < 0.6,
        "starts near ln(V): {}",
        losses[0]
    );
    assert!(losses[5] < 0.6 * losses[0], "loss must fall: {losses:?}");

    // Periodic eval at step 30 and the final one at 60.
    let evals: Vec<u64> = metrics(&run)
        .iter()
        .filter(|m| m.get("eval/loss").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![30, 60]);

    let s = summary(&run);
    assert_eq!(s["steps"], 60);
    assert_eq!(s["seed"], 7);
    assert!(s["final"]["eval/loss"].as_f64().unwrap() < losses[0]);
    assert!(s["best"]["eval/loss"].as_f64().unwrap() <= s["final"]["eval/loss"].as_f64().unwrap());
    assert!(s["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(s["data_files"][0]["sha256"].as_str().unwrap().len(), 64);
    for key in ["kiln_version", "git_commit", "wall_seconds", "parameters"] {
        assert!(!s[key].is_null(), "summary lacks {key}");
    }

    // Checkpoints at 30 and at the end; `latest` names the last.
    for step in [30, 60] {
        let ck = run.join(format!("checkpoints/step-{step}"));
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(ck.join(f).is_file(), "{} missing", ck.join(f).display());
        }
    }
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
        "step-60"
    );
    let state = read_json(&run.join("checkpoints/step-60/trainer_state.json"));
    assert_eq!(state["optimizer_steps"], 60);
    let opt = candle_core::safetensors::load(
        run.join("checkpoints/step-60/optimizer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        opt.contains_key("transformer.wte.weight.exp_avg")
            && opt.contains_key("transformer.wte.weight.exp_avg_sq")
    );

    // The resolved recipe re-parses, with the data-derived fields filled in.
    let resolved = Recipe::load(run.join("recipe.toml"), &[]).unwrap();
    assert_eq!(resolved.model["vocab_size"].as_integer(), Some(16));
    assert_eq!(resolved.model["block_size"].as_integer(), Some(16));
    assert_eq!(resolved.trainer.max_steps, Some(60));
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let sets = [
        "trainer.max_steps=20",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=10",
    ];
    let a = run(&recipe, dir.path(), "a", &sets).unwrap();
    let b = run(&recipe, dir.path(), "b", &sets).unwrap();
    let mut other = sets.to_vec();
    other.push("seed=8");
    let c = run(&recipe, dir.path(), "c", &other).unwrap();

    // Everything but wall-clock timing must match exactly.
    let strip = metrics_without_timing;
    assert_eq!(strip(&a), strip(&b));
    let weights =
        |run: &Path| std::fs::read(run.join("checkpoints/step-20/model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b), "identical weights, byte for byte");
    assert_ne!(strip(&a), strip(&c), "another seed trains another model");
}

#[test]
fn mlp_learns_a_separable_image_task() {
    let (dir, recipe) = mlp_fixture("epochs = 4\ngrad_accum = 2\nclip_grad_norm = 5.0");
    let run = run(&recipe, dir.path(), "run", &[]).unwrap();
    let s = summary(&run);
    // 360 training images / (16 × 2 accumulation) = 11 steps per epoch.
    assert_eq!(s["steps"], 44);
    assert!(s["final"]["eval/accuracy"].as_f64().unwrap() >= 0.95, "{s}");
    assert!(s["final"]["test/accuracy"].as_f64().unwrap() >= 0.95, "{s}");
    assert!(s["samples_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn sgd_nesterov_trains_too() {
    let (dir, recipe) = mlp_fixture("epochs = 3");
    let run = run(
        &recipe,
        dir.path(),
        "run",
        &[
            "optim.name=sgd",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "optim.nesterov=true",
            "schedule.name=linear",
        ],
    )
    .unwrap();
    assert!(summary(&run)["final"]["test/accuracy"].as_f64().unwrap() >= 0.9);
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let (dir, recipe) = mlp_fixture("max_steps = 20\ncheckpoint_every = 1");
    // An absurd learning rate blows the weights up to infinity within a few steps.
    let err = run(
        &recipe,
        dir.path(),
        "run",
        &["optim.lr=1e30", "optim.name=sgd"],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("training diverged at step"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let ck = kiln::core::checkpoint::latest(&dir.path().join("run/checkpoints")).unwrap();
    assert!(
        err.contains(&ck.display().to_string()),
        "the error names {}: {err}",
        ck.display()
    );
    let weights =
        kiln::core::checkpoint::load_tensors(&ck.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in weights {
        let s = t
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s.is_finite(), "{name} in the kept checkpoint is not finite");
    }
    assert!(!dir.path().join("run/summary.json").exists());
}

#[test]
fn a_parameter_without_gradient_is_refused_by_name() {
    let varmap = candle_nn::VarMap::new();
    let vb = kiln::core::rng::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    let used = vb
        .get_with_hints((3, 2), "used.weight", candle_nn::Init::Const(0.5))
        .unwrap();
    let cut = vb
        .get_with_hints((2, 2), "cut.weight", candle_nn::Init::Const(0.5))
        .unwrap();
    // `cut` enters the model through a detached copy, as it would after a no-backward op.
    let x = Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap();
    let y = x.matmul(&used).unwrap().matmul(&cut.detach()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let params = kiln::trainers::trainer::params_where(&varmap, |_| true);
    let collected: Vec<Option<Tensor>> = params
        .iter()
        .map(|p: &Param| grads.get(p.var.as_tensor()).cloned())
        .collect();
    let err = check_gradients(&params, &collected)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing to train")
            && err.contains("cut.weight")
            && !err.contains("used.weight"),
        "{err}"
    );

    // A non-finite gradient is refused too.
    let nan = Tensor::new(&[[f32::NAN, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let ones = Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
    let err = check_gradients(&params, &[Some(nan), Some(ones)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite") && err.contains("cut.weight"),
        "{err}"
    );
}

#[test]
fn an_existing_run_directory_is_never_overwritten() {
    let (dir, recipe) = tiny_gpt_fixture("");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::write(dir.path().join("run/keep.txt"), "precious").unwrap();
    let err = run(&recipe, dir.path(), "run", &["trainer.max_steps=2"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run/keep.txt")).unwrap(),
        "precious"
    );
}

#[test]
fn keep_last_and_keep_best_prune_checkpoints() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let sets = [
        "trainer.checkpoint_every=5",
        "trainer.eval_every=10",
        "trainer.keep_last=1",
        "trainer.keep_best=true",
    ];
    let run = run(&recipe, dir.path(), "run", &sets).unwrap();
    let ck = run.join("checkpoints");
    let left = step_dirs(&ck);
    let best = std::fs::read_to_string(ck.join("best")).unwrap();
    let best_step = summary(&run)["best_step"]["eval/loss"].as_u64().unwrap();
    assert_eq!(best, format!("step-{best_step}"));
    assert!(
        left.contains(&best) && left.contains(&"step-60".to_string()),
        "{left:?}"
    );
    assert!(left.len() <= 2, "only latest and best survive: {left:?}");
}

/// bf16 and f16 (with loss scaling) train the tiny GPT along the f32 run's loss curve.
#[test]
fn mixed_precision_tracks_f32() {
    let (dir, recipe) = tiny_gpt_fixture("");
    let f32_run = run(&recipe, dir.path(), "f32", &[]).unwrap();
    let reference = train_losses(&f32_run);
    for precision in ["bf16", "f16"] {
        let set = format!("precision={precision}");
        let low = run(&recipe, dir.path(), precision, &[&set]).unwrap();
        let losses = train_losses(&low);
        assert_eq!(losses.len(), reference.len());
        for (a, b) in losses.iter().zip(&reference) {
            assert!(
                (a - b).abs() < 0.05 * b.max(1.0),
                "{precision}: {losses:?} strays from f32's {reference:?}"
            );
        }
        let last = metrics(&low)
            .into_iter()
            .rfind(|m| m.get("train/loss").is_some())
            .unwrap();
        // Only f16 scales the loss, and says so in the metrics.
        assert_eq!(
            last.get("loss_scale").is_some(),
            precision == "f16",
            "{last}"
        );
    }
}

/// An f16 step whose scaled gradients overflow is skipped: no update, and a smaller scale.
#[test]
fn an_overflowing_f16_step_is_skipped_and_the_scale_backs_off() {
    use kiln::core::recipe::{OptimConfig, OptimizerName, Precision};
    use kiln::models::gpt::GptConfig;
    use kiln::models::ModelConfig;
    use kiln::trainers::amp::LossScaler;
    use kiln::trainers::{optim, trainer};
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = kiln::core::rng::seeded_var_builder(&varmap, 0, DType::F32, &device);
    let cfg = ModelConfig::Gpt(GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        vocab_size: 11,
        dropout: 0.0,
        bias: true,
        checkpoint_activations: false,
    });
    let model = cfg
        .build(vb, kiln::models::SharedRng::new(0, "d"), DType::F16)
        .unwrap();
    let params = trainer::params_of(&varmap, &cfg);
    let mut opt = optim::build(&OptimConfig {
        name: OptimizerName::Adamw,
        lr: 1e-3,
        weight_decay: 0.0,
        betas: [0.9, 0.99],
        eps: 1e-8,
        momentum: 0.0,
        nesterov: false,
    });
    let ids: Vec<u32> = (0..16).map(|i| i % 11).collect();
    let batch = kiln::core::data::Batch {
        inputs: Tensor::from_slice(&ids, (2, 8), &device).unwrap(),
        targets: Tensor::from_slice(&ids, (2, 8), &device).unwrap(),
        mix: None,
    };
    let before: Vec<f32> = params[0].var.flatten_all().unwrap().to_vec1().unwrap();
    let mut scaler = LossScaler::for_precision(Precision::F16).unwrap();
    scaler.scale = 1e30; // far past f16's range: the gradients become inf
    let out = trainer::train_step(
        model.as_ref(),
        &params,
        opt.as_mut(),
        std::slice::from_ref(&batch),
        1e-3,
        1.0,
        true,
        Some(&mut scaler),
    )
    .unwrap();
    assert!(out.diverged.is_none(), "an overflow is not a divergence");
    assert_eq!((scaler.scale, scaler.skipped_steps), (5e29, 1));
    assert_eq!(opt.steps(), 0, "no update was applied");
    let after: Vec<f32> = params[0].var.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(before, after);
    // A sane scale then trains normally.
    scaler.scale = 1024.0;
    let out = trainer::train_step(
        model.as_ref(),
        &params,
        opt.as_mut(),
        std::slice::from_ref(&batch),
        1e-3,
        1.0,
        false,
        Some(&mut scaler),
    )
    .unwrap();
    assert!(out.grad_norm.is_finite() && out.diverged.is_none());
    assert_eq!(opt.steps(), 1);
}
