//! Vision end to end on a generated image folder: ResNet (BatchNorm running statistics in
//! checkpoints, exact across a stop and resume) and ViT train, export as HF folders that kiln
//! reloads with identical logits and that transformers, when installed, loads with kiln's
//! predictions; `kiln predict` classifies the folder from the run or the export alike.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::*;
use kiln::core::checkpoint;
use kiln::core::data::{eval_batches, HostBatch};
use kiln::core::recipe::Recipe;
use kiln::models::{hf, ModelConfig, SharedRng};
use kiln::trainers::export::{export, ExportOptions};
use kiln::trainers::infer::{predict, PredictOptions};
use kiln::trainers::trainer::resume;
use kiln::trainers::{train, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const SIDE: u32 = 8;

/// `root/{train,test}/{dark,light}/NN.png`: 8×8 RGB noise, dark (0–99) or light (156–255), so
/// that a few steps learn it. A fixed LCG keeps the files identical from run to run.
fn write_folder(root: &Path) -> Vec<PathBuf> {
    let mut state = 12345u32;
    let mut next = move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 24) as u8
    };
    let mut test_files = Vec::new();
    for (split, n) in [("train", 16), ("test", 4)] {
        for (class, base) in [("dark", 0u8), ("light", 156)] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(SIDE, SIDE, |_, _| {
                    image::Rgb([
                        base + next() % 100,
                        base + next() % 100,
                        base + next() % 100,
                    ])
                });
                let p = dir.join(format!("{i:02}.png"));
                img.save(&p).unwrap();
                if split == "test" {
                    test_files.push(p);
                }
            }
        }
    }
    // The loader's order: classes by name, then files by path.
    test_files
}

const RESNET: &str = "kind = \"resnet\"\nembedding_size = 4\nhidden_sizes = [4, 8]\n\
                      depths = [1, 1]\nlayer_type = \"basic\"";
const RESNET_SMALL: &str = "kind = \"resnet\"\nstem = \"small\"\nembedding_size = 4\n\
                            hidden_sizes = [4, 8]\ndepths = [1, 1]\nlayer_type = \"basic\"";
const VIT: &str = "kind = \"vit\"\npatch_size = 4\nhidden_size = 16\nnum_hidden_layers = 2\n\
                   num_attention_heads = 2\nintermediate_size = 32";

fn recipe(dir: &Path, name: &str, model: &str, root: &Path, steps: usize) -> PathBuf {
    write_file(
        dir,
        &format!("{name}.toml"),
        format!(
            r#"description = "vision test"
task = "classification"
seed = 5
device = "cpu"

[model]
{model}

[data]
dataset = "image-folder"
path = "{}"
image_size = [{SIDE}, {SIDE}]
val_size = 4
batch_size = 4
augment = {{ crop_padding = 1, hflip = true }}

[optim]
name = "adamw"
lr = 3e-3

[trainer]
max_steps = {steps}
log_every = 2
eval_every = 4
checkpoint_every = 4
"#,
            root.display()
        ),
    )
}

fn opts(run: PathBuf) -> TrainOptions {
    TrainOptions {
        run_dir: Some(run),
        quiet: true,
        ..Default::default()
    }
}

fn latest_weights(run: &Path) -> PathBuf {
    checkpoint::by_name(&run.join("checkpoints"), "latest")
        .unwrap()
        .join(checkpoint::MODEL_FILE)
}

/// The test split as evaluation sees it.
fn test_batch(recipe: &Recipe) -> HostBatch {
    let splits = kiln::core::data::load(recipe).unwrap();
    let test = splits.test.expect("the folder has a test/ split");
    let batch = eval_batches(test.as_ref(), 64, None).next().unwrap();
    batch
}

fn logits(model: &dyn kiln::models::Model, batch: &HostBatch) -> Vec<Vec<f32>> {
    let b = batch.to_device(&Device::Cpu).unwrap();
    model
        .forward(&b.inputs, false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// An exported folder loaded back the way `init_from` loads it.
fn folder_logits(folder: &Path, batch: &HostBatch) -> Vec<Vec<f32>> {
    let cfg: ModelConfig = hf::read_hf_config(folder).unwrap();
    let varmap = VarMap::new();
    let vb = kiln::core::rng::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    let model = cfg
        .build(vb, SharedRng::new(0, "unused"), DType::F32)
        .unwrap();
    hf::load_pretrained(&varmap, &cfg, folder).unwrap();
    logits(model.as_ref(), batch)
}

fn export_latest(run: &Path, out: &Path) -> anyhow::Result<()> {
    export(run, out, &ExportOptions::default())
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn resnet_and_vit_train_export_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = d.join("images");
    let test_files = write_folder(&root);
    for (name, model, class) in [
        ("resnet", RESNET, "ResNetForImageClassification"),
        ("vit", VIT, "ViTForImageClassification"),
    ] {
        let r = Recipe::load(recipe(d, name, model, &root, 8), &[]).unwrap();
        let run = train(&r, &opts(d.join(name))).unwrap().run_dir;
        let s = summary(&run);
        assert!(
            s["final"]["test/accuracy"].as_f64().is_some(),
            "{name}: no test accuracy in {s}"
        );

        if name == "resnet" {
            // BatchNorm's running statistics moved with training and are in the checkpoint.
            let w = candle_core::safetensors::load(latest_weights(&run), &Device::Cpu).unwrap();
            let bn = "resnet.embedder.embedder.normalization";
            let mean = w[&format!("{bn}.running_mean")]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(mean.iter().all(|m| *m != 0.0), "{mean:?}");
            let var = w[&format!("{bn}.running_var")]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(var.iter().all(|v| *v != 1.0 && *v > 0.0), "{var:?}");
            let seen = w[&format!("{bn}.num_batches_tracked")]
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(seen, 8.0, "one update per training step");
        }

        let out = d.join(format!("{name}-hf"));
        export_latest(&run, &out).unwrap();
        let cfg = json(&out.join("config.json"));
        assert_eq!(cfg["architectures"][0], class, "{cfg}");
        assert_eq!(cfg["id2label"]["0"], "dark");
        assert_eq!(cfg["id2label"]["1"], "light");
        assert_eq!(cfg["label2id"]["light"], 1);
        let pre = json(&out.join("preprocessor_config.json"));
        assert_eq!(pre["size"]["height"], SIDE);
        assert_eq!(pre["size"]["width"], SIDE);
        assert_eq!(pre["image_mean"].as_array().unwrap().len(), 3);
        let image = json(&run.join("image.json"));
        assert_eq!(pre["image_mean"], image["mean"]);
        assert_eq!(pre["image_std"], image["std"]);
        if name == "resnet" {
            let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            let t = &w["resnet.embedder.embedder.normalization.num_batches_tracked"];
            assert_eq!(t.dtype(), DType::I64, "PyTorch keeps the count as int64");
        }

        // The folder reloads with the run's logits, exactly.
        let batch = test_batch(&r);
        let trained = kiln::trainers::run::load_run(&run, &Device::Cpu).unwrap();
        let want = logits(trained.model.as_ref(), &batch);
        assert_eq!(want.len(), test_files.len());
        assert_eq!(folder_logits(&out, &batch), want, "{name}: round trip");

        transformers_agrees(&out, &test_files, &batch, &want, class);

        // Batch prediction over the test folder: the run and its export write the same file,
        // and the class folders give the accuracy the run reported.
        let predict = |model: &Path, output: &Path| {
            let o = PredictOptions {
                text_column: None,
                label_column: None,
                batch_size: 3,
                progress: false,
            };
            predict(model, &root.join("test"), output, &o, &Device::Cpu).unwrap()
        };
        let (from_run, from_folder) = (d.join("run.jsonl"), d.join("folder.jsonl"));
        let summary_run = predict(&run, &from_run);
        let summary_folder = predict(&out, &from_folder);
        assert_eq!(summary_run.rows, test_files.len());
        assert_eq!(summary_run.accuracy, s["final"]["test/accuracy"].as_f64());
        assert_eq!(summary_folder.accuracy, summary_run.accuracy);
        let lines = std::fs::read_to_string(&from_run).unwrap();
        assert_eq!(lines, std::fs::read_to_string(&from_folder).unwrap());
        for ((line, file), row) in lines.lines().zip(&test_files).zip(&want) {
            let p: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(p["file"], file.to_str().unwrap());
            let top = if row[1] > row[0] { "light" } else { "dark" };
            assert_eq!(p["label"], top, "{line}");
        }
    }

    // kiln's small-image stem has no transformers counterpart: export says so before writing.
    let r = Recipe::load(recipe(d, "small", RESNET_SMALL, &root, 2), &[]).unwrap();
    let run = train(&r, &opts(d.join("small"))).unwrap().run_dir;
    let out = d.join("small-hf");
    let e = export_latest(&run, &out).unwrap_err().to_string();
    assert!(e.contains("small") && e.contains("stem"), "{e}");
    assert!(
        !out.join("model.safetensors").exists(),
        "nothing exported on error"
    );
}

/// A ResNet stopped mid-run and resumed ends with the same bytes, running statistics and step
/// count included, as one that ran through.
#[test]
fn batchnorm_state_survives_stop_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = d.join("images");
    write_folder(&root);
    let r = Recipe::load(recipe(d, "resnet", RESNET, &root, 8), &[]).unwrap();
    let full = train(&r, &opts(d.join("full"))).unwrap().run_dir;

    let stop = Arc::new(AtomicUsize::new(15));
    let mut o = opts(d.join("stopped"));
    o.stop = Some(stop.clone());
    let out = train(&r, &o).unwrap();
    assert_eq!(out.interrupted, Some(15));
    stop.store(0, Ordering::SeqCst);
    resume(&out.run_dir, &[], &o).unwrap();
    assert_eq!(
        std::fs::read(latest_weights(&out.run_dir)).unwrap(),
        std::fs::read(latest_weights(&full)).unwrap()
    );
}

/// transformers' Auto classes on the exported folder: the processor turns the PNGs into kiln's
/// pixels, and the model gives kiln's logits.
fn transformers_agrees(
    folder: &Path,
    files: &[PathBuf],
    batch: &HostBatch,
    want: &[Vec<f32>],
    class: &str,
) {
    let Some(py) = python_with("transformers, torch, PIL") else {
        return;
    };
    let script = repo().join("tests/python/hf_image_classifier.py");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&script, &folder];
    args.extend(files.iter().map(|f| f as &dyn AsRef<std::ffi::OsStr>));
    let hf = python_json(&py, &args);
    assert_eq!(hf["architecture"], class);
    let kiln::core::data::HostTensor::F32(pixels, _) = &batch.inputs else {
        panic!("image batches are f32");
    };
    let hf_pixels: Vec<f32> = hf["pixel_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let max_diff = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let e = max_diff(&hf_pixels, pixels);
    assert!(e < 1e-5, "{class}: preprocessing differs by {e}");
    let hf_logits: Vec<f32> = hf["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let e = max_diff(&hf_logits, &want.concat());
    eprintln!("{class}: max |logit difference| kiln vs transformers = {e:.3e}");
    assert!(e < 1e-4, "{class}: logits differ by {e}");
    for (i, row) in want.iter().enumerate() {
        let top = if row[1] > row[0] { "light" } else { "dark" };
        assert_eq!(hf["labels"][i], top, "{class}: image {i}");
    }
}
