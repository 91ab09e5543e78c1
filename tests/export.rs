//! Hugging Face folders out and in: `kiln export` → load (kiln and, when it is installed,
//! Python `transformers`) gives the same logits and the same greedy tokens; `init_from` and
//! `kiln generate --model` read folders and the hub cache with clear errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use kiln::trainers::export::{export, load_language_model, ExportOptions};
use kiln::trainers::generate::{generate, Sampling};
use kiln::trainers::{train, TrainOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny language-model recipe: `model` is the [model] table, `data` the [data] table.
fn lm_recipe(dir: &Path, name: &str, model: &str, data: &str, steps: usize) -> PathBuf {
    write_file(
        dir,
        &format!("{name}.toml"),
        format!(
            r#"description = "export test"
task = "language-model"
seed = 3
device = "cpu"

[model]
{model}

[data]
{data}
seq_len = 32
batch_size = 8

[optim]
name = "adamw"
lr = 3e-3

[trainer]
max_steps = {steps}
log_every = 5
checkpoint_every = 10
"#
        ),
    )
}

/// Copies `files` into the folder `to`, creating it.
fn copy_into(to: &Path, files: impl IntoIterator<Item = PathBuf>) {
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

fn char_data(dir: &Path) -> String {
    format!(
        "dataset = \"text-char\"\npath = \"{}\"",
        write_text(dir).display()
    )
}

fn bpe_data(dir: &Path) -> String {
    let text = dir.join("bpe.txt");
    let shakespeare =
        std::fs::read_to_string(repo().join("data/tinyshakespeare/input.txt")).unwrap();
    std::fs::write(&text, &shakespeare[..20_000]).unwrap();
    format!(
        "dataset = \"text-bpe\"\npath = \"{}\"\ntokenizer = \"{}\"\ncache_dir = \"{}\"",
        text.display(),
        repo().join("data/gpt2-tokenizer/tokenizer.json").display(),
        dir.join("cache").display()
    )
}

const GPT: &str = "kind = \"gpt\"\nn_layer = 2\nn_head = 2\nn_embd = 32\nbias = false";
const LLAMA: &str = "kind = \"llama\"\nhidden_size = 32\nintermediate_size = 64\n\
                     num_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2";

fn train_run(dir: &Path, recipe: &Path) -> PathBuf {
    let run = dir.join(format!(
        "run-{}",
        recipe.file_stem().unwrap().to_string_lossy()
    ));
    let r = kiln::core::Recipe::load(recipe, &[]).unwrap();
    train(
        &r,
        &TrainOptions {
            run_dir: Some(run.clone()),
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    run
}

fn opts(checkpoint: &str, dtype: DType, force: bool) -> ExportOptions {
    ExportOptions {
        checkpoint: checkpoint.into(),
        dtype,
        force,
        ..Default::default()
    }
}

fn logits(spec: &Path, checkpoint: Option<&str>, ids: &[u32]) -> Vec<f32> {
    let lm = load_language_model(spec, checkpoint, &Device::Cpu).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    lm.model
        .forward(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const IDS: [u32; 10] = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3];

#[test]
fn export_then_import_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, model, data) in [
        ("gpt-char", GPT, char_data(d)),
        ("llama-char", LLAMA, char_data(d)),
        ("gpt-bpe", GPT, bpe_data(d)),
    ] {
        let run = train_run(d, &lm_recipe(d, name, model, &data, 20));
        let out = d.join(format!("{name}-hf"));
        export(&run, &out, &opts("latest", DType::F32, false)).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{name}: no {f}");
        }
        let want = logits(&run, None, &IDS);
        assert_eq!(logits(&out, None, &IDS), want, "{name}: f32 round trip");

        // bf16 weights: close, not equal.
        let half = d.join(format!("{name}-bf16"));
        export(&run, &half, &opts("latest", DType::BF16, false)).unwrap();
        let cfg = read_json(&half.join("config.json"));
        assert_eq!(cfg["torch_dtype"], "bfloat16");
        let got = logits(&half, None, &IDS);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let e = max_diff(&got, &want);
        assert!(
            e > 0.0 && e < 0.05 * scale,
            "{name}: bf16 differs by {e} (scale {scale})"
        );

        // An older checkpoint, chosen by name.
        let old = d.join(format!("{name}-step10"));
        export(&run, &old, &opts("step-10", DType::F32, false)).unwrap();
        assert_eq!(
            logits(&old, None, &IDS),
            logits(&run, Some("step-10"), &IDS)
        );
        assert_ne!(logits(&old, None, &IDS), want);
    }
}

#[test]
fn export_refuses_to_overwrite_and_names_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = train_run(d, &lm_recipe(d, "gpt", GPT, &char_data(d), 20));
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = export(&run, &out, &opts("latest", DType::F32, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing written"
    );
    // --force replaces the folder whole: no file of the old one is left to be mistaken for
    // part of the export (a stale model.safetensors beside a new sharded index).
    export(&run, &out, &opts("latest", DType::F32, true)).unwrap();
    assert!(out.join("config.json").is_file());
    assert!(!out.join("keep.txt").exists());
    // Nor may it replace a folder that holds the run.
    let e = export(&run, d, &opts("latest", DType::F32, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds the run being exported"), "{e}");

    let e = export(&run, &d.join("x"), &opts("step-7", DType::F32, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no checkpoint step-7") && e.contains("step-20, step-10"),
        "{e}"
    );
    let e = export(&run, &d.join("y"), &opts("best", DType::F32, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("keep_best"), "{e}");
}

/// The files the serving stacks read beyond transformers: every config.json key they need with
/// the model's own values, generation_config.json's eos, the special-token files.
#[test]
fn folders_carry_what_serving_stacks_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, model, data, arch, context_key) in [
        (
            "gpt-bpe",
            GPT,
            bpe_data(d),
            "GPT2LMHeadModel",
            "n_positions",
        ),
        (
            "llama-char",
            LLAMA,
            char_data(d),
            "LlamaForCausalLM",
            "max_position_embeddings",
        ),
    ] {
        let recipe = lm_recipe(d, name, model, &data, 2);
        if name == "gpt-bpe" {
            let text = std::fs::read_to_string(&recipe).unwrap().replace(
                "device = \"cpu\"",
                &format!("device = \"cpu\"\nchat_template = '{CHAT}'"),
            );
            std::fs::write(&recipe, text).unwrap();
        }
        let run = train_run(d, &recipe);
        let out = d.join(format!("{name}-hf"));
        export(&run, &out, &opts("latest", DType::BF16, false)).unwrap();
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["architectures"][0], arch, "{name}");
        assert_eq!(cfg["torch_dtype"], "bfloat16", "{name}");
        assert!(cfg["model_type"].is_string(), "{name}");
        // The recipe's context (block_size / max_position_embeddings defaults to seq_len).
        let context = cfg[context_key].as_u64().unwrap();
        assert_eq!(
            cfg["max_position_embeddings"].as_u64(),
            Some(context),
            "{name}"
        );
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            assert!(cfg.get(k).is_some(), "{name}: config.json has no {k}");
        }
        let gen = read_json(&out.join("generation_config.json"));
        let tok = read_json(&out.join("tokenizer_config.json"));
        let map = read_json(&out.join("special_tokens_map.json"));
        if name == "gpt-bpe" {
            // GPT-2's vocabulary: <|endoftext|> (50256) ends a text.
            assert_eq!(cfg["eos_token_id"], 50256);
            assert_eq!(gen["eos_token_id"], 50256);
            assert_eq!(map["eos_token"], "<|endoftext|>");
            assert_eq!(tok["eos_token"], "<|endoftext|>");
            assert_eq!(tok["chat_template"], CHAT);
            chat_template_applies(&out);
        } else {
            assert!(tok.get("chat_template").is_none());
            // A character vocabulary has no special tokens: null ids, none made up.
            assert!(cfg["eos_token_id"].is_null() && gen.get("eos_token_id").is_none());
            assert_eq!(map, serde_json::json!({}));
        }
        assert_eq!(tok["model_max_length"].as_u64(), Some(context), "{name}");
        assert!(!out.join("modules.json").exists(), "{name}: not an encoder");
    }
}

/// The recipe's chat template of `folders_carry_what_serving_stacks_read`.
const CHAT: &str =
    "{% for m in messages %}{{ m[\"role\"] }}: {{ m[\"content\"] }}<|endoftext|>{% endfor %}";

/// transformers formats a chat with the exported tokenizer's template (when it is installed).
fn chat_template_applies(folder: &Path) {
    let Some(py) = python_with("transformers") else {
        return;
    };
    let script = r#"
import sys, json
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
chat = [{"role": "user", "content": "to be"}, {"role": "assistant", "content": "or not"}]
print(json.dumps(tok.apply_chat_template(chat, tokenize=False)))
"#;
    let got = python_json(&py, &[&"-c", &script, &folder]);
    assert_eq!(
        got,
        "user: to be<|endoftext|>assistant: or not<|endoftext|>"
    );
}

/// Above --max-shard-size the weights are split into shards in name order with an index that
/// maps every tensor; kiln reads such folders back (and refuses broken ones naming both files);
/// a shard size below the largest tensor is refused naming it, and a failed export leaves
/// nothing behind: no partial folder, and the folder it would have replaced intact.
#[test]
fn sharded_exports_round_trip_and_failures_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = train_run(d, &lm_recipe(d, "llama", LLAMA, &char_data(d), 20));
    let whole = d.join("whole");
    export(&run, &whole, &opts("latest", DType::F32, false)).unwrap();
    let sharded = d.join("sharded");
    let o = ExportOptions {
        max_shard_size: 20_000,
        ..opts("latest", DType::F32, false)
    };
    export(&run, &sharded, &o).unwrap();
    assert!(!sharded.join("model.safetensors").exists());
    let index = read_json(&sharded.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let whole_w =
        candle_core::safetensors::load(whole.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = whole_w.keys().collect();
    names.sort();
    assert_eq!(map.keys().collect::<Vec<_>>(), names, "every tensor, once");
    let files: Vec<&str> = names.iter().map(|n| map[*n].as_str().unwrap()).collect();
    let count = files.last().unwrap()[15..20].parse::<usize>().unwrap();
    assert!(count > 2, "{files:?}");
    assert!(
        files.windows(2).all(|w| w[0] <= w[1]),
        "name order: {files:?}"
    );
    let mut total = 0;
    for i in 1..=count {
        let f = sharded.join(format!("model-{i:05}-of-{count:05}.safetensors"));
        let bytes = std::fs::metadata(&f).unwrap().len();
        let shard = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
        let data: usize = shard.values().map(|t| t.elem_count() * 4).sum();
        assert!(data <= 20_000 && bytes > data as u64, "{}", f.display());
        total += data;
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    assert_eq!(logits(&sharded, None, &IDS), logits(&run, None, &IDS));

    // A missing shard, and a shard without a tensor the index puts there: both files named.
    let broken = d.join("broken");
    copy_into(
        &broken,
        std::fs::read_dir(&sharded)
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    let second = format!("model-00002-of-{count:05}.safetensors");
    std::fs::remove_file(broken.join(&second)).unwrap();
    let e = load_language_model(&broken, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors.index.json") && e.contains(&second),
        "{e}"
    );
    let first = broken.join(format!("model-00001-of-{count:05}.safetensors"));
    let mut w = candle_core::safetensors::load(&first, &Device::Cpu).unwrap();
    let dropped = names
        .iter()
        .find(|n| map[**n] == format!("model-00001-of-{count:05}.safetensors"))
        .unwrap()
        .to_string();
    w.remove(&dropped);
    candle_core::safetensors::save(&w, &first).unwrap();
    std::fs::copy(sharded.join(&second), broken.join(&second)).unwrap();
    let e = load_language_model(&broken, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("index.json") && e.contains(&dropped) && e.contains("model-00001-of"),
        "{e}"
    );

    // A shard size below the largest tensor fails after config.json and the tokenizer are
    // written: the temporary folder goes, and the --force target keeps its old contents.
    let tiny = ExportOptions {
        max_shard_size: 1000,
        force: true,
        ..opts("latest", DType::F32, false)
    };
    let before = std::fs::read(whole.join("model.safetensors")).unwrap();
    let e = export(&run, &whole, &tiny).unwrap_err().to_string();
    assert!(
        e.contains("--max-shard-size 1000") && e.contains("largest tensor, model."),
        "{e}"
    );
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        before
    );
    let leftovers = |parent: &Path| -> Vec<String> {
        std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-") || n.contains(".old-"))
            .collect()
    };
    assert_eq!(leftovers(d), Vec::<String>::new());
    let fresh = d.join("fresh");
    assert!(export(&run, &fresh, &tiny).is_err());
    assert!(!fresh.exists(), "nothing half-written");
    assert_eq!(leftovers(d), Vec::<String>::new());
    // A --out that cannot be created (its parent is a file): refused, nothing written.
    let e = export(
        &run,
        &d.join("tiny.txt/out"),
        &opts("latest", DType::F32, false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tiny.txt"), "{e}");

    // From the command line: sizes in units, and the refusal as one line, no panic.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", run.to_str().unwrap(), "--out"])
        .arg(d.join("cli"))
        .args(["--max-shard-size", "1kB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("largest tensor") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!d.join("cli").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", run.to_str().unwrap(), "--out"])
        .arg(d.join("cli"))
        .args(["--max-shard-size", "20kB"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        read_json(&d.join("cli/model.safetensors.index.json")),
        index
    );
}

/// Fine-tuning from an exported folder starts from its weights; the recipe may not change the
/// architecture; missing tensors and hub ids that are not cached are named.
#[test]
fn init_from_folders_and_the_hub_cache() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = char_data(d);
    let run = train_run(d, &lm_recipe(d, "base", LLAMA, &data, 20));
    let folder = d.join("base-hf");
    export(&run, &folder, &opts("latest", DType::F32, false)).unwrap();

    // lr ≈ 0: after one step the fine-tuned weights are still the pretrained ones.
    let ft = lm_recipe(d, "ft", "kind = \"llama\"\ndropout = 0.1", &data, 1);
    let text = std::fs::read_to_string(&ft).unwrap().replace(
        "device = \"cpu\"",
        &format!("device = \"cpu\"\ninit_from = \"{}\"", folder.display()),
    );
    let text = text.replace("lr = 3e-3", "lr = 1e-30");
    std::fs::write(&ft, &text).unwrap();
    let ft_run = train_run(d, &ft);
    let e = max_diff(&logits(&ft_run, None, &IDS), &logits(&run, None, &IDS));
    assert!(
        e < 1e-6,
        "fine-tuning did not start from the pretrained weights: {e}"
    );
    let resolved = std::fs::read_to_string(ft_run.join("recipe.toml")).unwrap();
    assert!(resolved.contains("num_key_value_heads = 2"), "{resolved}");

    // An architecture key that disagrees with config.json.
    std::fs::write(&ft, text.replace("dropout = 0.1", "num_hidden_layers = 3")).unwrap();
    let e = kiln::core::Recipe::load(&ft, &[])
        .map_err(anyhow::Error::from)
        .and_then(|r| {
            train(
                &r,
                &TrainOptions {
                    run_dir: Some(d.join("bad")),
                    quiet: true,
                    ..Default::default()
                },
            )
            .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.num_hidden_layers") && e.contains("differs"),
        "{e}"
    );

    // A folder whose weights lack a tensor.
    let broken = d.join("broken");
    copy_into(
        &broken,
        ["config.json", "tokenizer.json"].map(|f| folder.join(f)),
    );
    let mut w =
        candle_core::safetensors::load(folder.join("model.safetensors"), &Device::Cpu).unwrap();
    w.remove("model.norm.weight");
    candle_core::safetensors::save(&w, broken.join("model.safetensors")).unwrap();
    let e = load_language_model(&broken, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lacks") && e.contains("model.norm.weight"),
        "{e}"
    );

    // The hub cache, offline: found when cached, a clear error when not.
    let snap = d.join("hf/hub/models--acme--tiny-llama/snapshots/abc123");
    copy_into(
        &snap,
        std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    std::fs::create_dir_all(d.join("hf/hub/models--acme--tiny-llama/refs")).unwrap();
    std::fs::write(
        d.join("hf/hub/models--acme--tiny-llama/refs/main"),
        "abc123",
    )
    .unwrap();
    let gen = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "generate",
                "--model",
                id,
                "--prompt",
                "to be",
                "--max-new-tokens",
                "12",
            ])
            .args(["--temperature", "0", "--device", "cpu"])
            .env("HF_HOME", d.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let from_hub = gen("acme/tiny-llama");
    assert!(
        from_hub.status.success(),
        "{}",
        String::from_utf8_lossy(&from_hub.stderr)
    );
    let from_folder = gen(folder.to_str().unwrap());
    assert_eq!(from_hub.stdout, from_folder.stdout);
    assert!(String::from_utf8_lossy(&from_hub.stdout).starts_with("to be"));
    let missing = gen("acme/not-cached");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("acme/not-cached") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

/// transformers loads each exported folder as the right class, its tokenizer gives kiln's ids,
/// its logits match kiln's, and its greedy generation matches kiln's token for token.
#[test]
fn transformers_loads_exports_and_agrees() {
    let Some(py) = python_with("transformers, torch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = repo().join("tests/python/hf_causal_lm.py");
    for (name, model, data, class) in [
        ("gpt-char", GPT, char_data(d), "GPT2LMHeadModel"),
        ("llama-char", LLAMA, char_data(d), "LlamaForCausalLM"),
        ("gpt-bpe", GPT, bpe_data(d), "GPT2LMHeadModel"),
    ] {
        let run = train_run(d, &lm_recipe(d, name, model, &data, 40));
        let out = d.join(format!("{name}-hf"));
        // The Llama goes out sharded: transformers reads it through its index.
        let o = ExportOptions {
            max_shard_size: if class == "LlamaForCausalLM" {
                20_000
            } else {
                u64::MAX
            },
            ..opts("latest", DType::F32, false)
        };
        export(&run, &out, &o).unwrap();
        let sharded = out.join("model.safetensors.index.json").is_file();
        assert_eq!(sharded, class == "LlamaForCausalLM", "{name}");

        let lm = load_language_model(&run, None, &Device::Cpu).unwrap();
        let prompt = "to be, or";
        let prompt_ids = lm.codec.encode(prompt).unwrap();
        let sampling = Sampling {
            max_new_tokens: 12,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: lm.codec.end_of_text(),
        };
        let greedy = generate(
            lm.model.as_ref(),
            &prompt_ids,
            lm.context(),
            &sampling,
            &Device::Cpu,
            |_| {},
        )
        .unwrap()[prompt_ids.len()..]
            .to_vec();

        let request = d.join(format!("{name}-request.json"));
        let req = serde_json::json!({"prompt": prompt, "ids": IDS, "max_new_tokens": 12});
        std::fs::write(&request, req.to_string()).unwrap();
        let o = Command::new(&py)
            .arg(&script)
            .arg(&out)
            .arg(&request)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let hf: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(hf["architecture"], class, "{name}");
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        assert_eq!(ids(&hf["prompt_ids"]), prompt_ids, "{name}: tokenizer ids");
        let hf_logits: Vec<f32> = hf["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let e = max_diff(&hf_logits, &logits(&run, None, &IDS));
        eprintln!("{name}: max |logit difference| kiln vs transformers = {e:.3e}");
        assert!(e < 1e-4, "{name}: logits differ by {e}");
        assert_eq!(ids(&hf["generated"]), greedy, "{name}: greedy tokens");
    }
}
