//! The `[data]` section by data set: each data set takes its own keys and no others (one error
//! naming the key, the data set and its keys, at the key's line), the resolved recipe is the
//! same flat table again, and run directories written before the split still load.

use kiln_core::recipe::{DataSource, Dataset, Recipe, RecipeError};
use std::path::Path;

const FILE: &str = "recipes/d.toml";

/// A recipe for `task` whose `[data]` table is `data` (one key a line; `[data]` is line 4, so
/// `data`'s first line is line 5).
fn recipe(task: &str, data: &str) -> String {
    format!(
        "task = \"{task}\"\n[model]\nkind = \"x\"\n[data]\n{data}\n\
         [optim]\nname = \"adamw\"\nlr = 1e-3\n[trainer]\nmax_steps = 1\n"
    )
}

fn parse(text: &str) -> Result<Recipe, RecipeError> {
    Recipe::parse(Path::new(FILE), text, &[])
}

/// The error `text` fails with, which must be at file line `line` and `key`; its message.
#[track_caller]
fn error_at(text: &str, line: usize, key: &str) -> String {
    let e = parse(text).unwrap_err();
    assert_eq!(
        (e.location, e.key.as_str()),
        (format!("{FILE}:{line}"), key)
    );
    e.message
}

/// Parses, writes the resolved recipe, parses that, and checks both agree.
#[track_caller]
fn round_trip(text: &str) -> Recipe {
    let r = parse(text).unwrap_or_else(|e| panic!("{e}\n--- text ---\n{text}"));
    let resolved = r.to_toml(&r.model);
    let again = Recipe::parse(Path::new("run/recipe.toml"), &resolved, &[])
        .unwrap_or_else(|e| panic!("{e}\n--- resolved ---\n{resolved}"));
    assert_eq!(again.data, r.data, "{resolved}");
    assert_eq!(again.to_toml(&again.model), resolved, "stable");
    r
}

/// One valid `[data]` table per data set, with its task.
fn each_data_set() -> [(Dataset, &'static str, &'static str); 5] {
    [
        (
            Dataset::FashionMnist,
            "classification",
            "dataset = \"fashion-mnist\"\nbatch_size = 8\nval_size = 10\n\
             normalize = { mean = [0.5], std = [0.25] }\naugment = { hflip = true }",
        ),
        (
            Dataset::TextChar,
            "language-model",
            "dataset = \"text-char\"\npath = \"x.txt\"\nbatch_size = 8\nseq_len = 16\n\
             val_fraction = 0.2",
        ),
        (
            Dataset::TextBpe,
            "language-model",
            "dataset = \"text-bpe\"\npath = \"x.txt\"\nbatch_size = 8\nseq_len = 16\n\
             tokenizer = \"tok.json\"\ncache_dir = \"cache\"",
        ),
        (
            Dataset::TextClassification,
            "classification",
            "dataset = \"text-classification\"\npath = \"sst2\"\nbatch_size = 8\n\
             train = \"train.tsv\"\nval = \"dev.tsv\"\ntext_column = \"sentence\"\n\
             labels = [\"0\", \"1\"]\nmax_length = 66\nbucket_by_length = true",
        ),
        (
            Dataset::ImageFolder,
            "classification",
            "dataset = \"image-folder\"\npath = \"pets\"\nbatch_size = 8\n\
             image_size = [32, 24]\nchannels = 1\nval_size = 4\n\
             normalize = { mean = [0.5], std = [0.25] }",
        ),
    ]
}

#[test]
fn every_data_set_round_trips_through_the_resolved_recipe() {
    for (dataset, task, data) in each_data_set() {
        let r = round_trip(&recipe(task, data));
        assert_eq!(r.data.dataset(), dataset);
        assert_eq!(r.data.batch_size, 8);
        let resolved = r.to_toml(&r.model);
        // The resolved section is the flat table a recipe holds: its own keys and no others.
        let table: toml::Table = toml::from_str(&resolved).unwrap();
        let data = table["data"].as_table().unwrap();
        assert_eq!(data["dataset"].as_str(), Some(dataset.name()));
        for key in data.keys() {
            assert!(
                dataset.keys().contains(&key.as_str()),
                "{key} in {resolved}"
            );
        }
    }
}

#[test]
fn example_len_is_the_tokens_per_example() {
    let lens: Vec<usize> = each_data_set()
        .iter()
        .map(|(_, task, data)| parse(&recipe(task, data)).unwrap().data.example_len())
        .collect();
    assert_eq!(lens, [0, 16, 16, 66, 0]);
}

#[test]
fn a_key_of_another_data_set_is_named_with_the_keys_that_apply() {
    // `max_length = 64` (line 8) belongs to text-classification only.
    let text = recipe(
        "language-model",
        "dataset = \"text-char\"\npath = \"x.txt\"\nseq_len = 8\nmax_length = 64\nbatch_size = 2",
    );
    let message = error_at(&text, 8, "data.max_length");
    assert_eq!(
        message,
        "data.max_length does not apply to dataset \"text-char\"; its keys: `dataset`, `path`, \
         `batch_size`, `shuffle`, `prefetch`, `seq_len`, `val_fraction`"
    );
    // Every key of every data set is refused by every data set that does not take it.
    for (dataset, task, data) in each_data_set() {
        for other in Dataset::ALL {
            for key in other.keys() {
                if dataset.keys().contains(&key) {
                    continue;
                }
                let e = Recipe::parse(
                    Path::new(FILE),
                    &recipe(task, data),
                    &[format!("data.{key}=\"x\"")],
                )
                .unwrap_err();
                assert_eq!(e.key, format!("data.{key}"), "{e}");
                assert!(e.location.starts_with("--set "), "{e}");
                assert!(
                    e.message
                        .contains(&format!("\"{}\"; its keys: `dataset`", dataset.name())),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn an_unknown_key_is_named_with_the_keys_that_apply() {
    let text = recipe(
        "classification",
        "dataset = \"fashion-mnist\"\nbatch_size = 2\nbatchsize = 3",
    );
    let message = error_at(&text, 7, "data.batchsize");
    assert!(
        message.starts_with("unknown field `batchsize` for dataset \"fashion-mnist\""),
        "{message}"
    );
    assert!(
        message.contains("`batch_size`, `shuffle`, `prefetch`, `val_size`"),
        "{message}"
    );
}

#[test]
fn a_mismatched_task_is_reported_before_the_keys() {
    // text-char's keys on an image data set: the data set itself is what is wrong.
    let text = recipe(
        "language-model",
        "dataset = \"fashion-mnist\"\nbatch_size = 2\nseq_len = 8",
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "data.dataset");
    assert!(e.message.contains("does not fit task"), "{e}");
}

#[test]
fn required_keys_of_a_data_set_are_named() {
    for (task, data, key) in [
        (
            "language-model",
            "dataset = \"text-bpe\"\nbatch_size = 2",
            "data.seq_len",
        ),
        (
            "classification",
            "dataset = \"text-classification\"\nbatch_size = 2",
            "data.train",
        ),
        (
            "classification",
            "dataset = \"image-folder\"\npath = \"p\"\nbatch_size = 2",
            "data.image_size",
        ),
    ] {
        let message = error_at(&recipe(task, data), 4, key);
        assert!(message.starts_with("missing: "), "{message}");
    }
}

/// `[data]` exactly as the flat struct before the split wrote it into a run's `recipe.toml`:
/// every key with a default, for every data set.
const OLD_FASHION_MNIST: &str = r#"dataset = "fashion-mnist"
path = "/usr/share/datasets/fashion-mnist"
batch_size = 128
shuffle = true
val_size = 5000
val_fraction = 0.1
prefetch = 4
text_column = "text"
label_column = "label"
max_length = 128
bucket_by_length = false

[data.augment]
crop_padding = 2
hflip = true
mixup_alpha = 0.0
cutmix_alpha = 0.0
mix_prob = 1.0
"#;

const OLD_TEXT_BPE: &str = r#"dataset = "text-bpe"
path = "data/tinyshakespeare/input.txt"
batch_size = 16
shuffle = true
val_size = 0
val_fraction = 0.1
seq_len = 1024
prefetch = 4
tokenizer = "data/gpt2-tokenizer/tokenizer.json"
text_column = "text"
label_column = "label"
max_length = 128
bucket_by_length = false"#;

const OLD_TEXT_CLASSIFICATION: &str = r#"dataset = "text-classification"
path = "../shared/data/sst2"
batch_size = 32
shuffle = true
val_size = 0
val_fraction = 0.1
prefetch = 4
train = "train.tsv"
val = "dev.tsv"
text_column = "sentence"
label_column = "label"
labels = ["0", "1"]
max_length = 66
bucket_by_length = true"#;

#[test]
fn run_recipes_written_before_the_split_still_load() {
    // The old table and the same settings written as today's recipe agree.
    let old = round_trip(&recipe("classification", OLD_FASHION_MNIST));
    let DataSource::FashionMnist(f) = &old.data.source else {
        panic!("{:?}", old.data)
    };
    assert_eq!(f.val_size, 5000);
    assert_eq!(
        f.augment.as_ref().map(|a| (a.crop_padding, a.hflip)),
        Some((2, true))
    );
    let new = parse(&recipe(
        "classification",
        "dataset = \"fashion-mnist\"\npath = \"/usr/share/datasets/fashion-mnist\"\n\
         batch_size = 128\nval_size = 5000\naugment = { crop_padding = 2, hflip = true }",
    ))
    .unwrap();
    assert_eq!(old.data, new.data);
    // Written again, the inapplicable keys are gone.
    let resolved = old.to_toml(&old.model);
    for gone in [
        "val_fraction",
        "text_column",
        "label_column",
        "max_length",
        "bucket_by",
    ] {
        assert!(!resolved.contains(gone), "{gone} in {resolved}");
    }

    let old = round_trip(&recipe("language-model", OLD_TEXT_BPE));
    let DataSource::TextBpe(t) = &old.data.source else {
        panic!("{:?}", old.data)
    };
    assert_eq!((t.seq_len, t.val_fraction), (1024, 0.1));
    assert!(!old.to_toml(&old.model).contains("val_size"));

    let old = round_trip(&recipe("classification", OLD_TEXT_CLASSIFICATION));
    let t = old.data.text_classification().unwrap();
    assert_eq!(
        (t.max_length, t.val_size, t.bucket_by_length),
        (66, 0, true)
    );
    assert!(!old.to_toml(&old.model).contains("val_fraction"));
}

#[test]
fn only_the_old_default_value_of_an_inapplicable_key_is_let_through() {
    // The old version wrote `val_fraction = 0.1` everywhere; any other value was set on purpose
    // and does not apply to Fashion-MNIST (line 10).
    let text = recipe(
        "classification",
        &OLD_FASHION_MNIST.replace("val_fraction = 0.1", "val_fraction = 0.2"),
    );
    let message = error_at(&text, 10, "data.val_fraction");
    assert!(
        message.starts_with("data.val_fraction does not apply to dataset \"fashion-mnist\""),
        "{message}"
    );
    let text = recipe(
        "language-model",
        &OLD_TEXT_BPE.replace("val_size = 0", "val_size = 3"),
    );
    assert_eq!(parse(&text).unwrap_err().key, "data.val_size");
    // Keys that never had a written default are not tolerated at all.
    let text = recipe(
        "classification",
        &format!("{OLD_FASHION_MNIST}\n[data.x]\ny = 1"),
    );
    assert_eq!(parse(&text).unwrap_err().key, "data.x");
}
