//! Encoders end to end: embeddings against the pretrained reference, a BERT classifier trained,
//! evaluated, exported and used for batch prediction (in kiln and, when installed, in Python
//! `transformers`), and fine-tuning the real MiniLM.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};

const MINILM: &str = "../shared/data/all-MiniLM-L6-v2";

#[test]
fn embeddings_match_the_sentence_transformers_reference() {
    let folder = repo().join(MINILM);
    if !require(&folder, "all-MiniLM-L6-v2") {
        return;
    }
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("reference_embeddings.json")).unwrap(),
    )
    .unwrap();
    let sentences = r["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let mut args = vec![
        "embed",
        "--model",
        folder.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend(&texts);
    let out = ok(&kiln(&args, &repo()));
    let rows: Vec<Vec<f64>> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), texts.len());
    for (s, got) in sentences.iter().zip(&rows) {
        let want: Vec<f64> = s["embedding_normalized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), 384);
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(got) * norm(&want));
        assert!(cos >= 0.9999, "{}: cosine {cos}", s["text"]);
    }
}

/// A sentiment-like fixture a tiny BERT learns in a few dozen steps, with a character tokenizer.
fn fixture(dir: &Path) {
    let good = ["good", "great fun", "so good", "loved it", "great"];
    let bad = ["bad", "awful", "so bad", "dull mess", "boring"];
    let mut train = String::from("sentence\tlabel\n");
    for i in 0..200 {
        let (t, l) = if i % 2 == 0 {
            (good[i / 2 % 5], "positive")
        } else {
            (bad[i / 2 % 5], "negative")
        };
        train.push_str(&format!("{t}{}\t{l}\n", " !".repeat(i % 3)));
    }
    std::fs::write(dir.join("train.tsv"), train).unwrap();
    std::fs::write(
        dir.join("dev.tsv"),
        "sentence\tlabel\nso great\tpositive\nawful !\tnegative\ngood fun\tpositive\nbad mess\tnegative\n",
    )
    .unwrap();
    let vocab = kiln::core::data::text::CharVocab::from_text("abcdefghijklmnopqrstuvwxyz !");
    std::fs::write(
        dir.join("tokenizer.json"),
        vocab.tokenizer_json().to_string(),
    )
    .unwrap();
}

fn tiny_bert_recipe(dir: &Path) -> PathBuf {
    write_file(
        dir,
        "tiny-bert.toml",
        format!(
            r#"description = "tiny bert"
task = "classification"
seed = 5
device = "cpu"

[model]
kind = "bert"
vocab_size = 28
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32
max_position_embeddings = 32
hidden_dropout_prob = 0.0
attention_probs_dropout_prob = 0.0

[data]
dataset = "text-classification"
path = "{d}"
train = "train.tsv"
val = "dev.tsv"
text_column = "sentence"
tokenizer = "{d}/tokenizer.json"
max_length = 32
bucket_by_length = true
batch_size = 16

[optim]
name = "adamw"
lr = 3e-3

[trainer]
max_steps = 80
log_every = 10
checkpoint_every = 40
"#,
            d = dir.display()
        ),
    )
}

#[test]
fn train_eval_predict_export_a_bert_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let run = d.join("run");
    let recipe = tiny_bert_recipe(d);
    ok(&train_in(&recipe, &run, &[], d));
    let losses = train_losses(&run);
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.5),
        "loss falls: {losses:?}"
    );
    assert_eq!(
        read_json(&run.join("labels.json")),
        json!(["negative", "positive"])
    );

    let eval: serde_json::Value =
        serde_json::from_str(ok(&kiln(&["eval", run.to_str().unwrap()], d)).trim()).unwrap();
    assert!(eval["eval/f1"].as_f64().is_some());

    // Batch prediction over the dev file agrees with kiln eval's accuracy.
    let preds = d.join("preds.jsonl");
    let o = kiln(
        &[
            "predict",
            run.to_str().unwrap(),
            "--input",
            d.join("dev.tsv").to_str().unwrap(),
            "--output",
            preds.to_str().unwrap(),
            "--batch-size",
            "3",
        ],
        d,
    );
    ok(&o);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    // Batched by length ("awful !" is shortest), written in the input's order.
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["so great", "awful !", "good fun", "bad mess"]);
    let dev_truth = ["positive", "negative", "positive", "negative"];
    let correct = lines
        .iter()
        .zip(dev_truth)
        .filter(|(l, t)| l["label"] == *t)
        .count();
    assert_eq!(
        correct as f64 / 4.0,
        eval["eval/accuracy"].as_f64().unwrap()
    );
    let p = &lines[0]["probs"];
    let total = p["negative"].as_f64().unwrap() + p["positive"].as_f64().unwrap();
    assert!((total - 1.0).abs() < 1e-5);
    assert!(String::from_utf8_lossy(&o.stderr).contains("accuracy"));

    // Rows whose label the model never saw are predicted, named once, and left out of the
    // accuracy (counting them wrong would understate it without a word).
    let unknown = d.join("unknown.tsv");
    let dev = std::fs::read_to_string(d.join("dev.tsv")).unwrap();
    std::fs::write(&unknown, format!("{dev}so so\tneutral\nmeh\tneutral\n")).unwrap();
    let predict_unknown = |batch: &str| {
        kiln(
            &[
                "predict",
                run.to_str().unwrap(),
                "--input",
                unknown.to_str().unwrap(),
                "--output",
                d.join("unknown.jsonl").to_str().unwrap(),
                "--batch-size",
                batch,
            ],
            d,
        )
    };
    let o = predict_unknown("2");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(&o);
    let accuracy = eval["eval/accuracy"].as_f64().unwrap();
    assert!(
        err.contains("6 rows")
            && err.contains(&format!("(accuracy {accuracy:.4})"))
            && err.contains("2 rows have a label the model does not know (first: \"neutral\")"),
        "{err}"
    );
    // A batch of no rows is refused by the option parser, before anything runs.
    let o = predict_unknown("0");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("must be at least 1"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The exported folder predicts the same labels with the same probabilities.
    let out = d.join("hf");
    export_run(&run, &out, d);
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["id2label"]["1"], "positive");
    let preds2 = d.join("preds2.jsonl");
    ok(&kiln(
        &[
            "predict",
            out.to_str().unwrap(),
            "--input",
            d.join("dev.tsv").to_str().unwrap(),
            "--output",
            preds2.to_str().unwrap(),
            "--text-column",
            "sentence",
        ],
        d,
    ));
    assert_eq!(
        std::fs::read_to_string(&preds).unwrap(),
        std::fs::read_to_string(&preds2).unwrap()
    );
    transformers_agrees(&out, &d.join("dev.tsv"), &lines);
}

/// `kiln export RUN --out OUT`, which must succeed.
fn export_run(run: &Path, out: &Path, cwd: &Path) {
    ok(&kiln(
        &[
            "export",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        cwd,
    ));
}

/// transformers' `pipeline("text-classification")` on the exported folder gives kiln's labels
/// (from the folder's id2label) with kiln's probabilities.
fn transformers_agrees(folder: &Path, dev: &Path, kiln_preds: &[serde_json::Value]) {
    let Some(py) = python_with("transformers, torch") else {
        return;
    };
    // The pipeline a serving script calls: it reads the folder's tokenizer and id2label.
    let script = r#"
import sys, csv, json
from transformers import pipeline
folder, dev = sys.argv[1], sys.argv[2]
pipe = pipeline("text-classification", model=folder, device="cpu")
rows = list(csv.DictReader(open(dev), delimiter="\t"))
# One row at a time (the pipeline's default): the fixture's character tokenizer has no padding token.
out = pipe([r["sentence"] for r in rows], top_k=None)
print(json.dumps({"class": type(pipe.model).__name__,
                  "labels": [o[0]["label"] for o in out],
                  "probs": [[o[0]["score"]] for o in out]}))
"#;
    let hf = python_json(&py, &[&"-c", &script, &folder, &dev]);
    assert_eq!(hf["class"], "BertForSequenceClassification");
    let mut max_diff = 0f64;
    for (i, k) in kiln_preds.iter().enumerate() {
        assert_eq!(hf["labels"][i], k["label"], "row {i}");
        let p = k["probs"][hf["labels"][i].as_str().unwrap()]
            .as_f64()
            .unwrap();
        let q = hf["probs"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .fold(0.0, f64::max);
        max_diff = max_diff.max((p - q).abs());
    }
    eprintln!("transformers agrees on every row; max |Δ probability| = {max_diff:.2e}");
    assert!(max_diff < 1e-4);
}

/// A BERT-style character tokenizer: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, then the
/// fixture's characters, with `[CLS] … [SEP]` around each text.
fn bert_char_tokenizer() -> serde_json::Value {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for (i, c) in "abcdefghijklmnopqrstuvwxyz !".chars().enumerate() {
        vocab.insert(c.to_string(), json!(i + specials.len()));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                          "behavior": "Isolated", "invert": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), seq("A"), special("[SEP]")],
            "pair": [special("[CLS]"), seq("A"), special("[SEP]"), seq("B"), special("[SEP]")],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// A BERT export is also a sentence-transformers model (the encoder, mean pooling, L2
/// normalization): `SentenceTransformer(DIR)` gives `kiln embed`'s embeddings.
#[test]
fn bert_exports_load_in_sentence_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    std::fs::write(d.join("tokenizer.json"), bert_char_tokenizer().to_string()).unwrap();
    let recipe = tiny_bert_recipe(d);
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("vocab_size = 28", "vocab_size = 32")
        .replace("max_steps = 80", "max_steps = 20");
    std::fs::write(&recipe, text).unwrap();
    let run = d.join("run");
    ok(&train_in(&recipe, &run, &[], d));
    let out = d.join("hf");
    export_run(&run, &out, d);
    let modules = read_json(&out.join("modules.json"));
    let types: Vec<&str> = (modules.as_array().unwrap().iter())
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "sentence_transformers.models.Transformer",
            "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Normalize"
        ]
    );
    let pooling = read_json(&out.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_mean_tokens"], true);
    assert_eq!(pooling["word_embedding_dimension"], 16);
    assert_eq!(
        read_json(&out.join("sentence_bert_config.json"))["max_seq_length"],
        32
    );
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(
        read_json(&out.join("special_tokens_map.json"))["pad_token"],
        "[PAD]"
    );

    // Texts of different lengths in one batch: padding and the attention mask count.
    let texts = ["so great", "awful !", "good fun and a great time", "bad"];
    let mut args = vec!["embed", "--model", out.to_str().unwrap(), "--device", "cpu"];
    args.extend(texts);
    let kiln_rows: Vec<Vec<f64>> = ok(&kiln(&args, d))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kiln_rows.len(), texts.len());

    let Some(py) = python_with("sentence_transformers") else {
        return;
    };
    let script = r#"
import sys, json
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
print(json.dumps(model.encode(sys.argv[2:], batch_size=4).tolist()))
"#;
    let mut py_args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"-c", &script, &out];
    py_args.extend(texts.iter().map(|t| t as &dyn AsRef<std::ffi::OsStr>));
    let st: Vec<Vec<f64>> = serde_json::from_value(python_json(&py, &py_args)).unwrap();
    for ((t, a), b) in texts.iter().zip(&kiln_rows).zip(&st) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(a) * norm(b));
        eprintln!("{t:?}: cosine kiln embed vs SentenceTransformer = {cos:.7}");
        assert!(cos >= 0.9999, "{t:?}: cosine {cos}");
        assert!((norm(b) - 1.0).abs() < 1e-4, "normalized");
    }
}

/// The real pretrained MiniLM, fine-tuned briefly on a slice of BANKING77: the loss falls.
#[test]
fn fine_tuning_minilm_lowers_the_loss() {
    let Some((folder, b77)) = minilm_and_banking77() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every 20th row: ~500 examples over all 77 intents.
    banking77_slice(&b77, d, 20);
    let recipe = minilm_recipe(
        d,
        &folder,
        "ft",
        "",
        "val_size = 64",
        "lr = 2e-4\n[trainer]\nmax_steps = 24\nlog_every = 4",
    );
    let run = d.join("run");
    let o = train_in(&recipe, &run, &[], d);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("classifier.weight"),
        "the fresh head is reported"
    );
    let losses = train_losses(&run);
    assert!(losses[0] > 4.0, "77-way chance is ln 77 ≈ 4.34: {losses:?}");
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.3),
        "loss falls: {losses:?}"
    );
}

/// LoRA on the real MiniLM: only the adapters and the head train and are checkpointed; the
/// merged export predicts what the run does; the PEFT adapter loads in Python `peft` (when
/// installed) and predicts the same.
#[test]
fn lora_trains_adapters_only_and_exports_merged_or_as_peft() {
    let Some((folder, b77)) = minilm_and_banking77() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (header, rows) = banking77_slice(&b77, d, 40);
    write_file(
        d,
        "dev.csv",
        format!("{header}\n{}\n", rows[..24].join("\n")),
    );
    let recipe = minilm_recipe(
        d,
        &folder,
        "lora",
        "lora = { rank = 4, alpha = 8, dropout = 0.1, targets = [\"query\", \"value\"] }",
        "val = \"dev.csv\"",
        "lr = 2e-3\n[trainer]\nmax_steps = 10\nlog_every = 2",
    );
    let run = d.join("run");
    let o = train_in(&recipe, &run, &[], d);
    let log = ok(&o);
    // 2 × 4 × 384 per adapted layer, 12 layers (query and value in 6 blocks), + the 77-way head.
    let trainable = 12 * 2 * 4 * 384 + 77 * 384 + 77;
    let summary = summary(&run);
    assert_eq!(summary["trainable_parameters"], trainable);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("{trainable} trainable"))
            || log.contains(&format!("{trainable} trainable")),
        "the parameter line names the trainable count"
    );
    let ckpt = candle_core::safetensors::load(
        run.join("checkpoints/step-10/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(ckpt.len(), 12 * 2 + 2, "adapters and head only");
    assert!(ckpt
        .keys()
        .all(|k| k.contains(".lora_") || k.starts_with("classifier.")));
    let losses = train_losses(&run);
    assert!(
        losses.last().unwrap() < &losses[0],
        "loss falls: {losses:?}"
    );

    // Merged export = the run's predictions.
    let dev = d.join("dev.csv");
    let predict = |model: &Path, out: &str| -> String {
        ok(&kiln(
            &[
                "predict",
                model.to_str().unwrap(),
                "--input",
                dev.to_str().unwrap(),
                "--output",
                d.join(out).to_str().unwrap(),
                "--text-column",
                "text",
                "--label-column",
                "category",
            ],
            d,
        ));
        std::fs::read_to_string(d.join(out)).unwrap()
    };
    let from_run = predict(&run, "run.jsonl");
    let merged = d.join("merged");
    ok(&kiln(
        &[
            "export",
            run.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        d,
    ));
    let from_merged = predict(&merged, "merged.jsonl");
    let labels = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["label"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(labels(&from_run), labels(&from_merged));

    // The adapter alone, in PEFT's layout.
    let adapter = d.join("adapter");
    ok(&kiln(
        &[
            "export",
            run.to_str().unwrap(),
            "--adapter",
            "--out",
            adapter.to_str().unwrap(),
        ],
        d,
    ));
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    let w = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        w.contains_key("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight")
    );
    assert!(w.contains_key("base_model.model.classifier.weight"));

    let Some(py) = python_with("peft, transformers, torch") else {
        return;
    };
    let script = r#"
import sys, csv, json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
base, adapter, dev, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(adapter)
model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n)
model = PeftModel.from_pretrained(model, adapter).eval()
rows = list(csv.DictReader(open(dev)))
with torch.no_grad():
    preds = [int(model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1)) for r in rows]
print(json.dumps(preds))
"#;
    let out = python_json(&py, &[&"-c", &script, &folder, &adapter, &dev, &"77"]);
    let peft: Vec<usize> = serde_json::from_value(out).unwrap();
    let names: Vec<String> = serde_json::from_value(read_json(&run.join("labels.json"))).unwrap();
    let peft_labels: Vec<String> = peft.iter().map(|&i| names[i].clone()).collect();
    assert_eq!(
        peft_labels,
        labels(&from_run),
        "PEFT predicts what kiln does"
    );
}
