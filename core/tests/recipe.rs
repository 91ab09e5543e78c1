//! Integration tests for the recipe loader (`kiln_core::recipe`): parsing, `--set` overrides,
//! error locations (file:line or the `--set` argument), validation and the resolved-TOML round
//! trip.

use kiln_core::recipe::{
    list_recipes, DataSource, Dataset, OptimizerName, Precision, Recipe, RecipeError,
    ScheduleConfig, ScheduleName, Task,
};
use std::path::{Path, PathBuf};

const FILE: &str = "recipes/t.toml";

/// A minimal valid language-model recipe. Line numbers (1-based) are noted on the right.
fn base() -> String {
    [
        r#"description = "test recipe""#, //  1
        r#"task = "language-model""#,     //  2
        r#"seed = 1"#,                    //  3
        r#"[model]"#,                     //  4
        r#"kind = "gpt""#,                //  5
        r#"n_layer = 2"#,                 //  6
        r#"[data]"#,                      //  7
        r#"dataset = "text-char""#,       //  8
        r#"path = "x.txt""#,              //  9
        r#"batch_size = 4"#,              // 10
        r#"seq_len = 8"#,                 // 11
        r#"[optim]"#,                     // 12
        r#"name = "adamw""#,              // 13
        r#"lr = 1e-3"#,                   // 14
        r#"[trainer]"#,                   // 15
        r#"max_steps = 10"#,              // 16
    ]
    .join("\n")
        + "\n"
}

/// A valid classification recipe (fashion-mnist, no seq_len).
fn base_classification() -> String {
    [
        r#"description = "mlp""#,       //  1
        r#"task = "classification""#,   //  2
        r#"[model]"#,                   //  3
        r#"kind = "mlp""#,              //  4
        r#"[data]"#,                    //  5
        r#"dataset = "fashion-mnist""#, //  6
        r#"batch_size = 32"#,           //  7
        r#"[optim]"#,                   //  8
        r#"name = "sgd""#,              //  9
        r#"lr = 0.1"#,                  // 10
        r#"momentum = 0.9"#,            // 11
        r#"nesterov = true"#,           // 12
        r#"[trainer]"#,                 // 13
        r#"epochs = 2"#,                // 14
    ]
    .join("\n")
        + "\n"
}

/// Replaces the exact line `from` (which must occur once) with `to` (may be several lines, or
/// empty to delete the line).
fn replace_line(text: &str, from: &str, to: &str) -> String {
    let mut hits = 0;
    let mut out = Vec::new();
    for line in text.lines() {
        if line == from {
            hits += 1;
            if !to.is_empty() {
                out.push(to.to_string());
            }
        } else {
            out.push(line.to_string());
        }
    }
    assert_eq!(hits, 1, "line `{from}` must occur exactly once in:\n{text}");
    out.join("\n") + "\n"
}

/// Inserts `new` right after the exact line `after`.
fn insert_after(text: &str, after: &str, new: &str) -> String {
    replace_line(text, after, &format!("{after}\n{new}"))
}

fn sets(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn parse(text: &str) -> Result<Recipe, RecipeError> {
    Recipe::parse(Path::new(FILE), text, &[])
}

fn parse_with(text: &str, args: &[&str]) -> Result<Recipe, RecipeError> {
    Recipe::parse(Path::new(FILE), text, &sets(args))
}

fn ok(text: &str, args: &[&str]) -> Recipe {
    match parse_with(text, args) {
        Ok(r) => r,
        Err(e) => panic!("expected the recipe to parse, got: {e}\n--- text ---\n{text}"),
    }
}

fn err(text: &str, args: &[&str]) -> RecipeError {
    match parse_with(text, args) {
        Ok(r) => panic!("expected an error, the recipe parsed: {r:?}\n--- text ---\n{text}"),
        Err(e) => e,
    }
}

/// The `[data]` settings of data set `$variant` (a [`DataSource`] variant) in recipe `$r`.
macro_rules! source {
    ($r:expr, $variant:ident) => {
        match &$r.data.source {
            DataSource::$variant(d) => d,
            other => panic!("expected {} data, got {other:?}", stringify!($variant)),
        }
    };
}

fn at(line: usize) -> String {
    format!("{FILE}:{line}")
}

/// Asserts location, key, and that the message contains every one of `parts`.
#[track_caller]
fn check(e: &RecipeError, location: &str, key: &str, parts: &[&str]) {
    assert_eq!(e.location, location, "location of {e:?}");
    assert_eq!(e.key, key, "key of {e:?}");
    for p in parts {
        assert!(
            e.message.contains(p),
            "message of {e:?} should contain {p:?}"
        );
    }
}

/// Shorthand: the error of `text` must be at file line `line`, at `key`, with `parts` in the
/// message.
#[track_caller]
fn file_error(text: &str, line: usize, key: &str, parts: &[&str]) {
    let e = err(text, &[]);
    check(&e, &at(line), key, parts);
}

/// Shorthand: the error after `--set arg` on the base recipe must point at the flag.
#[track_caller]
fn set_error(text: &str, arg: &str, key: &str, parts: &[&str]) {
    let e = err(text, &[arg]);
    check(&e, &format!("--set {arg}"), key, parts);
}

/// Shorthand: `--set key=value` on `text` must fail at the flag and at that `key`, with `parts`
/// in the message.
#[track_caller]
fn set_rejects(text: &str, arg: &str, parts: &[&str]) {
    let key = arg.split('=').next().unwrap_or(arg);
    set_error(text, arg, key, parts);
}

// ---------------------------------------------------------------------------------------------
// Valid recipes and defaults
// ---------------------------------------------------------------------------------------------

#[test]
fn base_recipe_parses_with_defaults() {
    let r = ok(&base(), &[]);
    assert_eq!(r.name, "t");
    assert_eq!(r.description, "test recipe");
    assert_eq!(r.task, Task::LanguageModel);
    assert_eq!(r.seed, 1);
    assert_eq!(r.device, "auto");
    assert_eq!(r.precision, Precision::F32);
    assert_eq!(r.model_kind(), "gpt");
    assert_eq!(r.model.get("n_layer").and_then(|v| v.as_integer()), Some(2));

    assert_eq!(r.data.dataset(), Dataset::TextChar);
    assert_eq!(r.data.path, Some(PathBuf::from("x.txt")));
    assert_eq!(r.data.batch_size, 4);
    assert_eq!(source!(r, TextChar).seq_len, 8);
    assert!(r.data.shuffle);
    // val_size is not a text-char key; where it is one, it defaults to 0.
    assert!(!Dataset::TextChar.keys().contains(&"val_size"));
    assert_eq!(
        source!(ok(&base_classification(), &[]), FashionMnist).val_size,
        0
    );
    assert_eq!(source!(r, TextChar).val_fraction, 0.1);
    assert_eq!(r.data.prefetch, 4);

    assert_eq!(r.optim.name, OptimizerName::Adamw);
    assert_eq!(r.optim.lr, 1e-3);
    assert_eq!(r.optim.weight_decay, 0.0);
    assert_eq!(r.optim.betas, [0.9, 0.999]);
    assert_eq!(r.optim.eps, 1e-8);
    assert_eq!(r.optim.momentum, 0.0);
    assert!(!r.optim.nesterov);

    assert_eq!(r.schedule, ScheduleConfig::default());
    assert_eq!(r.schedule.name, ScheduleName::Constant);
    assert_eq!(r.schedule.warmup_steps, 0);
    assert_eq!(r.schedule.decay_steps, None);

    assert_eq!(r.trainer.max_steps, Some(10));
    assert_eq!(r.trainer.epochs, None);
    assert_eq!(r.trainer.grad_accum, 1);
    assert_eq!(r.trainer.clip_grad_norm, 0.0);
    assert_eq!(r.trainer.log_every, 10);
    assert_eq!(r.trainer.eval_every, 0);
    assert_eq!(r.trainer.eval_batches, 0);
    assert_eq!(r.trainer.checkpoint_every, 0);

    assert_eq!(r.source.path, PathBuf::from(FILE));
}

#[test]
fn seed_and_description_default_when_absent() {
    let text = replace_line(&base(), "seed = 1", "");
    let text = replace_line(&text, r#"description = "test recipe""#, "");
    let r = ok(&text, &[]);
    assert_eq!(r.seed, 1337);
    assert_eq!(r.description, "");
}

#[test]
fn full_recipe_parses() {
    let text = r#"
description = "everything set"
task = "language-model"
seed = 7
device = "cpu"
precision = "f32"

[model]
kind = "gpt"
n_layer = 4
n_head = 4
n_embd = 128

[data]
dataset = "text-char"
path = "data/shakespeare.txt"
batch_size = 16
shuffle = false
val_fraction = 0.05
seq_len = 64
prefetch = 2

[optim]
name = "adamw"
lr = 6e-4
weight_decay = 0.1
betas = [0.9, 0.95]
eps = 1e-6

[schedule]
name = "cosine"
warmup_steps = 100
min_lr_ratio = 0.1
decay_steps = 900

[trainer]
max_steps = 1000
grad_accum = 2
clip_grad_norm = 1.0
log_every = 5
eval_every = 100
eval_batches = 20
checkpoint_every = 500
"#;
    let r = ok(text, &[]);
    assert_eq!(r.seed, 7);
    assert_eq!(r.device, "cpu");
    assert_eq!(
        r.model.get("n_embd").and_then(|v| v.as_integer()),
        Some(128)
    );
    assert!(!r.data.shuffle);
    assert_eq!(source!(r, TextChar).val_fraction, 0.05);
    assert_eq!(source!(r, TextChar).seq_len, 64);
    assert_eq!(r.data.prefetch, 2);
    assert_eq!(r.optim.lr, 6e-4);
    assert_eq!(r.optim.weight_decay, 0.1);
    assert_eq!(r.optim.betas, [0.9, 0.95]);
    assert_eq!(r.optim.eps, 1e-6);
    assert_eq!(
        r.schedule,
        ScheduleConfig {
            name: ScheduleName::Cosine,
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            decay_steps: Some(900),
        }
    );
    assert_eq!(r.trainer.max_steps, Some(1000));
    assert_eq!(r.trainer.grad_accum, 2);
    assert_eq!(r.trainer.clip_grad_norm, 1.0);
    assert_eq!(r.trainer.log_every, 5);
    assert_eq!(r.trainer.eval_every, 100);
    assert_eq!(r.trainer.eval_batches, 20);
    assert_eq!(r.trainer.checkpoint_every, 500);
}

#[test]
fn classification_recipe_with_sgd_nesterov_and_epochs_parses() {
    let r = ok(&base_classification(), &[]);
    assert_eq!(r.task, Task::Classification);
    assert_eq!(r.data.dataset(), Dataset::FashionMnist);
    assert_eq!(r.data.path, None);
    // No seq_len: images are not token sequences.
    assert!(!Dataset::FashionMnist.keys().contains(&"seq_len"));
    assert_eq!(r.data.example_len(), 0);
    assert_eq!(r.optim.name, OptimizerName::Sgd);
    assert!(r.optim.nesterov);
    assert_eq!(r.trainer.epochs, Some(2));
    assert_eq!(r.trainer.max_steps, None);
}

#[test]
fn valid_devices_are_accepted() {
    for dev in ["auto", "cpu", "cuda", "cuda:0", "cuda:3"] {
        let r = ok(&base(), &[&format!("device={dev}")]);
        assert_eq!(r.device, dev);
    }
}

#[test]
fn boundary_values_are_accepted() {
    // Closed ends of every range check.
    let r = ok(
        &base(),
        &[
            "data.val_fraction=0",
            "optim.weight_decay=0",
            "optim.betas=[0.0, 0.0]",
            "schedule.min_lr_ratio=1",
            "trainer.clip_grad_norm=0",
        ],
    );
    assert_eq!(source!(r, TextChar).val_fraction, 0.0);
    assert_eq!(r.optim.betas, [0.0, 0.0]);
    assert_eq!(r.schedule.min_lr_ratio, 1.0);
    let r = ok(&base(), &["schedule.min_lr_ratio=0.0"]);
    assert_eq!(r.schedule.min_lr_ratio, 0.0);
}

// ---------------------------------------------------------------------------------------------
// --set overrides
// ---------------------------------------------------------------------------------------------

#[test]
fn set_float() {
    let r = ok(&base(), &["optim.lr=3e-4"]);
    assert_eq!(r.optim.lr, 3e-4);
    // An integer where a float is expected is accepted too.
    let r = ok(&base(), &["optim.lr=1"]);
    assert_eq!(r.optim.lr, 1.0);
}

#[test]
fn set_int() {
    let r = ok(&base(), &["data.batch_size=64", "seed=42"]);
    assert_eq!(r.data.batch_size, 64);
    assert_eq!(r.seed, 42);
}

#[test]
fn set_bool() {
    let r = ok(&base(), &["data.shuffle=false"]);
    assert!(!r.data.shuffle);
    let r = ok(&base(), &["data.shuffle=true"]);
    assert!(r.data.shuffle);
}

#[test]
fn set_string_without_quotes() {
    let r = ok(&base(), &["data.path=/tmp/x"]);
    assert_eq!(r.data.path, Some(PathBuf::from("/tmp/x")));
    let r = ok(&base(), &["device=cpu"]);
    assert_eq!(r.device, "cpu");
}

#[test]
fn set_string_with_quotes() {
    let r = ok(&base(), &[r#"data.path="/tmp/with space.txt""#]);
    assert_eq!(r.data.path, Some(PathBuf::from("/tmp/with space.txt")));
}

#[test]
fn set_array() {
    let r = ok(&base(), &["optim.betas=[0.8,0.9]"]);
    assert_eq!(r.optim.betas, [0.8, 0.9]);
}

#[test]
fn set_enum() {
    let r = ok(&base(), &["optim.name=sgd", "optim.momentum=0.9"]);
    assert_eq!(r.optim.name, OptimizerName::Sgd);
    assert_eq!(r.optim.momentum, 0.9);
}

#[test]
fn set_model_key_lands_in_model_table() {
    let r = ok(&base(), &["model.n_layer=3", "model.n_embd=64"]);
    assert_eq!(r.model.get("n_layer").and_then(|v| v.as_integer()), Some(3));
    assert_eq!(r.model.get("n_embd").and_then(|v| v.as_integer()), Some(64));
    assert_eq!(r.model_kind(), "gpt");
}

#[test]
fn set_creates_missing_optional_key() {
    // A key absent from its (existing) table.
    let r = ok(&base(), &["trainer.grad_accum=4"]);
    assert_eq!(r.trainer.grad_accum, 4);
    // A key in an absent table: the table is created, the rest of it defaults.
    let r = ok(&base(), &["schedule.warmup_steps=10"]);
    assert_eq!(r.schedule.warmup_steps, 10);
    assert_eq!(r.schedule.name, ScheduleName::Constant);
    let r = ok(
        &base(),
        &["schedule.name=linear", "schedule.warmup_steps=10"],
    );
    assert_eq!(r.schedule.name, ScheduleName::Linear);
    assert_eq!(r.schedule.warmup_steps, 10);
}

#[test]
fn schedule_table_with_only_warmup_is_constant() {
    let text = base() + "[schedule]\nwarmup_steps = 5\n";
    let r = ok(&text, &[]);
    assert_eq!(r.schedule.name, ScheduleName::Constant);
    assert_eq!(r.schedule.warmup_steps, 5);
}

#[test]
fn errors_in_tables_created_by_set_point_at_the_flag() {
    // `[data]` exists only because of the flag: the missing `dataset` is the flag's doing.
    let data_lines = [
        "[data]",
        "dataset = \"text-char\"",
        "path = \"x.txt\"",
        "batch_size = 4",
    ];
    let text = base()
        .lines()
        .filter(|l| !data_lines.contains(l) && *l != "seq_len = 8")
        .collect::<Vec<_>>()
        .join("\n");
    let e = err(&text, &["data.batch_size=2"]);
    check(
        &e,
        "--set data.batch_size=2",
        "data",
        &["missing field `dataset`"],
    );
    // A sub-table created under an existing section.
    set_error(
        &base(),
        "trainer.x.y=1",
        "trainer.x",
        &["unknown field `x`"],
    );
    // A new top-level table.
    set_error(&base(), "colour.x=1", "colour", &["unknown field `colour`"]);
}

#[test]
fn set_trims_whitespace_and_last_set_wins() {
    let r = ok(&base(), &[" optim.lr = 0.5 ", "optim.lr=0.25"]);
    assert_eq!(r.optim.lr, 0.25);
}

#[test]
fn set_value_may_contain_equals_sign() {
    let r = ok(&base(), &["data.path=/tmp/a=b"]);
    assert_eq!(r.data.path, Some(PathBuf::from("/tmp/a=b")));
}

#[test]
fn set_can_fix_an_invalid_file() {
    // The file alone fails validation; the override makes it valid.
    let text = replace_line(&base(), "batch_size = 4", "batch_size = 0");
    assert!(parse(&text).is_err());
    let r = ok(&text, &["data.batch_size=2"]);
    assert_eq!(r.data.batch_size, 2);
}

#[test]
fn set_does_not_shift_file_line_numbers() {
    // Overrides that add lines to the document (a new key in [data], a new [schedule] table)
    // must not move the line reported for an error further down in the file.
    let text = insert_after(&base(), "lr = 1e-3", "lrr = 0.1"); // line 15
    let e = err(&text, &["data.shuffle=false", "data.val_size=3"]);
    check(&e, &at(15), "optim.lrr", &["unknown field `lrr`"]);
    let e = err(&text, &["schedule.warmup_steps=3", "model.n_embd=8"]);
    check(&e, &at(15), "optim.lrr", &["unknown field `lrr`"]);
    let text = replace_line(&base(), "max_steps = 10", "max_steps = 0"); // line 16
    let e = err(&text, &["optim.betas=[0.5, 0.5]", "data.prefetch=2"]);
    check(&e, &at(16), "trainer.max_steps", &["must be at least 1"]);
}

#[test]
fn set_malformed_without_equals() {
    let e = err(&base(), &["optim.lr"]);
    check(&e, "--set optim.lr", "", &["expected key.path=value"]);
}

#[test]
fn set_malformed_empty_segment() {
    let e = err(&base(), &["optim..lr=1"]);
    check(
        &e,
        "--set optim..lr=1",
        "",
        &["`optim..lr` is not a dotted key path"],
    );
    let e = err(&base(), &[".lr=1"]);
    check(&e, "--set .lr=1", "", &["not a dotted key path"]);
    let e = err(&base(), &["optim.=1"]);
    check(&e, "--set optim.=1", "", &["not a dotted key path"]);
    let e = err(&base(), &["=1"]);
    check(&e, "--set =1", "", &["not a dotted key path"]);
}

#[test]
fn set_sub_key_of_a_scalar() {
    let e = err(&base(), &["seed.x=1"]);
    check(
        &e,
        "--set seed.x=1",
        "",
        &["`seed` in `seed.x` is a value, not a table of keys"],
    );
    let e = err(&base(), &["optim.lr.x=1"]);
    check(
        &e,
        "--set optim.lr.x=1",
        "",
        &["`lr` in `optim.lr.x` is a value"],
    );
}

#[test]
fn set_malformed_is_reported_even_after_good_sets() {
    let e = err(&base(), &["optim.lr=3e-4", "bad"]);
    check(&e, "--set bad", "", &["expected key.path=value"]);
}

// ---------------------------------------------------------------------------------------------
// Deserialization errors: unknown keys, wrong types, bad enum values
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_key_in_section() {
    let text = insert_after(&base(), "lr = 1e-3", "lrr = 0.1"); // line 15
    let e = err(&text, &[]);
    check(
        &e,
        &at(15),
        "optim.lrr",
        &[
            "unknown field `lrr`",
            "expected one of",
            "`lr`",
            "`betas`",
            "`nesterov`",
        ],
    );
}

#[test]
fn unknown_key_in_each_section_gets_its_line() {
    let text = insert_after(&base(), "path = \"x.txt\"", "shufle = true"); // line 10
    file_error(
        &text,
        10,
        "data.shufle",
        &["unknown field `shufle`", "`shuffle`"],
    );
    let text = insert_after(&base(), "max_steps = 10", "max_step = 3"); // line 17
    file_error(
        &text,
        17,
        "trainer.max_step",
        &["unknown field `max_step`", "`max_steps`"],
    );
    let text = base() + "[schedule]\nname = \"cosine\"\nwarmup = 5\n"; // lines 17-19
    file_error(
        &text,
        19,
        "schedule.warmup",
        &["unknown field `warmup`", "`warmup_steps`"],
    );
}

#[test]
fn unknown_top_level_key() {
    let text = insert_after(&base(), "seed = 1", "colour = \"red\""); // line 4
    let e = err(&text, &[]);
    check(
        &e,
        &at(4),
        "colour",
        &[
            "unknown field `colour`",
            "expected one of",
            "`seed`",
            "`trainer`",
        ],
    );
}

#[test]
fn unknown_top_level_table() {
    let text = base() + "[optimizer]\nname = \"sgd\"\n"; // line 17
    file_error(
        &text,
        17,
        "optimizer",
        &["unknown field `optimizer`", "`optim`"],
    );
}

#[test]
fn unknown_key_via_set() {
    set_rejects(
        &base(),
        "optim.lrr=1",
        &["unknown field `lrr`", "expected one of"],
    );
    set_rejects(&base(), "colour=red", &["unknown field `colour`"]);
}

#[test]
fn model_table_accepts_any_key() {
    // `[model]` is decoded by kiln-models; the recipe loader keeps it as raw TOML.
    let text = insert_after(&base(), "n_layer = 2", "whatever = [1, 2]");
    let r = ok(&text, &["model.other=true"]);
    assert!(r.model.contains_key("whatever"));
    assert!(r.model.contains_key("other"));
}

#[test]
fn wrong_type_in_file() {
    let text = replace_line(&base(), "batch_size = 4", r#"batch_size = "big""#); // line 10
    file_error(
        &text,
        10,
        "data.batch_size",
        &["invalid type", "\"big\"", "usize"],
    );
}

#[test]
fn wrong_type_via_set() {
    set_rejects(&base(), "data.batch_size=big", &["invalid type", "\"big\""]);
    set_rejects(&base(), "optim.lr=fast", &["invalid type", "\"fast\""]);
    set_rejects(&base(), "data.shuffle=1", &["invalid type", "bool"]);
}

#[test]
fn negative_value_for_unsigned_field() {
    let text = replace_line(&base(), "max_steps = 10", "max_steps = -5"); // line 16
    file_error(&text, 16, "trainer.max_steps", &["-5"]);
}

#[test]
fn wrong_type_in_array() {
    let text = insert_after(&base(), "lr = 1e-3", r#"betas = [0.9, "x"]"#); // line 15
                                                                            // The element's path is the key; the line is the array's.
    file_error(
        &text,
        15,
        "optim.betas[1]",
        &["invalid type: string \"x\", expected f64"],
    );
}

#[test]
fn wrong_array_length() {
    set_rejects(&base(), "optim.betas=[0.9]", &["invalid length 1"]);
}

#[test]
fn section_given_as_a_value() {
    let text = replace_line(&base(), "seed = 1", "seed = 1\nschedule = \"cosine\""); // line 4
    file_error(&text, 4, "schedule", &["invalid type", "\"cosine\""]);
}

#[test]
fn bad_enum_value() {
    let text = replace_line(&base(), r#"name = "adamw""#, r#"name = "adam""#); // line 13
    file_error(
        &text,
        13,
        "optim.name",
        &["unknown variant `adam`", "`adamw`", "`sgd`"],
    );
}

#[test]
fn bad_enum_values_elsewhere() {
    set_rejects(
        &base(),
        "task=regression",
        &[
            "unknown variant `regression`",
            "`classification`",
            "`language-model`",
        ],
    );
    set_rejects(
        &base(),
        "data.dataset=mnist",
        &["unknown variant `mnist`", "`fashion-mnist`", "`text-char`"],
    );
    set_rejects(
        &base(),
        "schedule.name=step",
        &[
            "unknown variant `step`",
            "`constant`",
            "`linear`",
            "`cosine`",
        ],
    );
    set_rejects(
        &base(),
        "precision=f64",
        &["unknown variant `f64`", "`f32`", "`bf16`", "`f16`"],
    );
}

#[test]
fn missing_required_fields() {
    // Missing required key in a section: reported at the section header.
    let text = replace_line(&base(), "lr = 1e-3", ""); // [optim] is line 12
    file_error(&text, 12, "optim", &["missing field `lr`"]);
    let text = replace_line(&base(), "batch_size = 4", ""); // [data] is line 7
    file_error(&text, 7, "data", &["missing field `batch_size`"]);
    // Missing required top-level key / table: no line to point at.
    let text = replace_line(&base(), r#"task = "language-model""#, "");
    let e = err(&text, &[]);
    check(&e, FILE, "", &["missing field `task`"]);
    let text = replace_line(&base(), "[trainer]", "");
    let text = replace_line(&text, "max_steps = 10", "");
    let e = err(&text, &[]);
    check(&e, FILE, "", &["missing field `trainer`"]);
}

// ---------------------------------------------------------------------------------------------
// Validation (every branch of Recipe::validate)
// ---------------------------------------------------------------------------------------------

#[test]
fn precision_is_f32_bf16_or_f16() {
    let text = insert_after(&base(), "seed = 1", r#"precision = "bf16""#);
    assert_eq!(ok(&text, &[]).precision, Precision::Bf16);
    assert_eq!(ok(&base(), &["precision=f16"]).precision, Precision::F16);
    let text = insert_after(&base(), "seed = 1", r#"precision = "fp8""#); // line 4
    file_error(&text, 4, "precision", &["fp8", "f32", "bf16", "f16"]);
}

#[test]
fn bad_device() {
    let text = insert_after(&base(), "seed = 1", r#"device = "tpu""#); // line 4
    file_error(
        &text,
        4,
        "device",
        &["unknown device `tpu`", "\"cpu\"", "\"cuda:N\""],
    );
    set_rejects(&base(), "device=cuda:x", &["unknown device `cuda:x`"]);
}

#[test]
fn batch_size_zero() {
    let text = replace_line(&base(), "batch_size = 4", "batch_size = 0"); // line 10
    file_error(&text, 10, "data.batch_size", &["must be at least 1"]);
    set_rejects(&base(), "data.batch_size=0", &["must be at least 1"]);
}

#[test]
fn val_fraction_out_of_range() {
    let text = insert_after(&base(), "seq_len = 8", "val_fraction = 1.0"); // line 12
    file_error(
        &text,
        12,
        "data.val_fraction",
        &["must be in [0, 1)", "got 1"],
    );
    set_rejects(&base(), "data.val_fraction=-0.1", &["got -0.1"]);
    set_rejects(&base(), "data.val_fraction=nan", &["got NaN"]);
}

#[test]
fn prefetch_zero() {
    let text = insert_after(&base(), "seq_len = 8", "prefetch = 0"); // line 12
    file_error(&text, 12, "data.prefetch", &["must be at least 1"]);
}

#[test]
fn seq_len_on_fashion_mnist() {
    let text = insert_after(&base_classification(), "batch_size = 32", "seq_len = 16"); // line 8
    file_error(
        &text,
        8,
        "data.seq_len",
        &[
            "data.seq_len does not apply to dataset \"fashion-mnist\"",
            "`val_size`",
        ],
    );
}

#[test]
fn text_char_needs_seq_len() {
    let text = replace_line(&base(), "seq_len = 8", ""); // [data] is line 7
    file_error(&text, 7, "data.seq_len", &["missing", "seq_len = 64"]);
    let text = replace_line(&base(), "seq_len = 8", "seq_len = 0"); // line 11
    file_error(&text, 11, "data.seq_len", &["must be at least 1"]);
}

#[test]
fn dataset_task_mismatch() {
    let text = replace_line(
        &base(),
        r#"task = "language-model""#,
        r#"task = "classification""#,
    );
    file_error(
        &text,
        8,
        "data.dataset",
        &[
            "does not fit task",
            "fashion-mnist, image-folder and text-classification are for",
        ],
    );
    // The other way round, the task changed by --set: the error names the dataset key, which is
    // still the file's (line 6 of the classification recipe).
    let e = err(&base_classification(), &["task=language-model"]);
    check(
        &e,
        &at(6),
        "data.dataset",
        &["does not fit task", "text-bpe for \"language-model\""],
    );
}

#[test]
fn dataset_task_mismatch_via_set_dataset() {
    // The mismatch is named at the dataset key, which here came from --set.
    set_rejects(
        &base(),
        "data.dataset=fashion-mnist",
        &["does not fit task"],
    );
}

#[test]
fn lr_must_be_positive() {
    let text = replace_line(&base(), "lr = 1e-3", "lr = 0.0"); // line 14
    file_error(
        &text,
        14,
        "optim.lr",
        &["must be a positive number", "got 0"],
    );
    set_rejects(
        &base(),
        "optim.lr=-1",
        &["must be a positive number", "got -1"],
    );
    set_rejects(&base(), "optim.lr=nan", &["got NaN"]);
    set_rejects(&base(), "optim.lr=inf", &["got inf"]);
}

#[test]
fn weight_decay_negative() {
    let text = insert_after(&base(), "lr = 1e-3", "weight_decay = -0.1"); // line 15
    file_error(
        &text,
        15,
        "optim.weight_decay",
        &["must be ≥ 0", "got -0.1"],
    );
    set_rejects(&base(), "optim.weight_decay=nan", &["got NaN"]);
}

#[test]
fn betas_out_of_range() {
    let text = insert_after(&base(), "lr = 1e-3", "betas = [0.9, 1.0]"); // line 15
    file_error(
        &text,
        15,
        "optim.betas",
        &["betas[1] must be in [0, 1)", "got 1"],
    );
    set_error(
        &base(),
        "optim.betas=[-0.1, 0.9]",
        "optim.betas",
        &["betas[0]", "got -0.1"],
    );
}

#[test]
fn eps_not_positive() {
    let text = insert_after(&base(), "lr = 1e-3", "eps = 0.0"); // line 15
    file_error(&text, 15, "optim.eps", &["must be > 0", "got 0"]);
    set_rejects(&base(), "optim.eps=-1e-8", &["must be > 0"]);
    set_rejects(&base(), "optim.eps=nan", &["got NaN"]);
}

#[test]
fn momentum_out_of_range() {
    let text = replace_line(&base_classification(), "momentum = 0.9", "momentum = 1.0"); // 11
    file_error(&text, 11, "optim.momentum", &["must be in [0, 1)", "got 1"]);
    set_rejects(&base(), "optim.momentum=-0.5", &["got -0.5"]);
}

#[test]
fn nesterov_needs_sgd_with_momentum() {
    // Nesterov with AdamW.
    let text = insert_after(&base(), "lr = 1e-3", "nesterov = true"); // line 15
    file_error(
        &text,
        15,
        "optim.nesterov",
        &["needs name = \"sgd\" and momentum > 0"],
    );
    // Nesterov with SGD but no momentum.
    let text = replace_line(&base_classification(), "momentum = 0.9", ""); // nesterov: line 11
    file_error(&text, 11, "optim.nesterov", &["momentum > 0"]);
    // Momentum removed by --set: the error names nesterov, still at its file line (12).
    let e = err(&base_classification(), &["optim.momentum=0"]);
    check(&e, &at(12), "optim.nesterov", &["momentum > 0"]);
}

#[test]
fn min_lr_ratio_out_of_range() {
    let text = base() + "[schedule]\nname = \"cosine\"\nmin_lr_ratio = 1.5\n"; // line 19
    file_error(
        &text,
        19,
        "schedule.min_lr_ratio",
        &["must be in [0, 1]", "got 1.5"],
    );
    set_rejects(&base(), "schedule.min_lr_ratio=-0.1", &["got -0.1"]);
}

#[test]
fn decay_steps_zero() {
    let text = base() + "[schedule]\nname = \"linear\"\ndecay_steps = 0\n"; // line 19
    file_error(&text, 19, "schedule.decay_steps", &["must be at least 1"]);
}

#[test]
fn both_max_steps_and_epochs() {
    let text = insert_after(&base(), "max_steps = 10", "epochs = 3"); // line 17
    file_error(
        &text,
        17,
        "trainer.epochs",
        &["either trainer.max_steps or trainer.epochs"],
    );
    set_rejects(&base(), "trainer.epochs=1", &["not both"]);
}

#[test]
fn neither_max_steps_nor_epochs() {
    let text = replace_line(&base(), "max_steps = 10", ""); // [trainer] is line 15
    file_error(
        &text,
        15,
        "trainer.max_steps",
        &["missing", "trainer.epochs"],
    );
}

#[test]
fn max_steps_zero() {
    let text = replace_line(&base(), "max_steps = 10", "max_steps = 0"); // line 16
    file_error(&text, 16, "trainer.max_steps", &["must be at least 1"]);
}

#[test]
fn epochs_zero() {
    let text = replace_line(&base(), "max_steps = 10", "epochs = 0"); // line 16
    file_error(&text, 16, "trainer.epochs", &["must be at least 1"]);
    set_rejects(&base_classification(), "trainer.epochs=0", &["at least 1"]);
}

#[test]
fn grad_accum_zero() {
    let text = insert_after(&base(), "max_steps = 10", "grad_accum = 0"); // line 17
    file_error(&text, 17, "trainer.grad_accum", &["must be at least 1"]);
}

#[test]
fn clip_grad_norm_negative() {
    let text = insert_after(&base(), "max_steps = 10", "clip_grad_norm = -1.0"); // line 17
    file_error(
        &text,
        17,
        "trainer.clip_grad_norm",
        &["must be ≥ 0 (0 = off)", "got -1"],
    );
    set_rejects(&base(), "trainer.clip_grad_norm=inf", &["got inf"]);
}

#[test]
fn zero_stage_is_0_or_1() {
    assert_eq!(ok(&base(), &[]).trainer.zero_stage, 0);
    assert_eq!(ok(&base(), &["trainer.zero_stage=1"]).trainer.zero_stage, 1);
    set_rejects(
        &base(),
        "trainer.zero_stage=2",
        &[
            "stage 2 is not built",
            "1 (the state sharded over the ranks)",
        ],
    );
}

#[test]
fn log_every_zero() {
    let text = insert_after(&base(), "max_steps = 10", "log_every = 0"); // line 17
    file_error(&text, 17, "trainer.log_every", &["must be at least 1"]);
}

#[test]
fn dotted_keys_and_inline_tables_get_lines() {
    // Keys written as `optim.lr = ...` at top level or inside an inline table are located too.
    let text = [
        r#"task = "language-model""#,                                       // 1
        r#"model = { kind = "gpt" }"#,                                      // 2
        r#"data = { dataset = "text-char", batch_size = 0, seq_len = 8 }"#, // 3
        r#"optim.name = "adamw""#,                                          // 4
        r#"optim.lr = 1e-3"#,                                               // 5
        r#"trainer.max_steps = 10"#,                                        // 6
    ]
    .join("\n");
    file_error(&text, 3, "data.batch_size", &["must be at least 1"]);
    let text = text.replace("batch_size = 0", "batch_size = 2");
    let text = text.replace("optim.lr = 1e-3", "optim.lr = -1.0");
    file_error(&text, 5, "optim.lr", &["must be a positive number"]);
}

// ---------------------------------------------------------------------------------------------
// Syntax errors, files, display
// ---------------------------------------------------------------------------------------------

#[test]
fn syntax_error_reports_line() {
    let text = replace_line(&base(), "lr = 1e-3", "lr = "); // line 14
    let e = err(&text, &[]);
    check(&e, &at(14), "", &["TOML syntax error"]);
    let text = replace_line(&base(), "[trainer]", "[trainer"); // line 15
    let e = err(&text, &[]);
    check(&e, &at(15), "", &["TOML syntax error"]);
    // A duplicate key is a syntax error too.
    let text = insert_after(&base(), "lr = 1e-3", "lr = 2e-3"); // line 15
    let e = err(&text, &[]);
    check(&e, &at(15), "", &["TOML syntax error"]);
}

#[test]
fn syntax_error_wins_over_set() {
    let text = replace_line(&base(), "seed = 1", "seed = = 1"); // line 3
    let e = err(&text, &["optim.lr=1"]);
    check(&e, &at(3), "", &["TOML syntax error"]);
}

#[test]
fn error_display_names_location_and_key() {
    let e = err(&base(), &["optim.lr=-1"]);
    let shown = e.to_string();
    assert!(
        shown.starts_with("recipe error at --set optim.lr=-1: key `optim.lr`: "),
        "{shown}"
    );
    let e = err(&base(), &["optim.lr"]);
    let shown = e.to_string();
    assert!(
        shown.starts_with("recipe error at --set optim.lr: expected"),
        "{shown}"
    );
}

#[test]
fn load_reads_a_file_and_applies_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-gpt.toml");
    std::fs::write(&path, base()).unwrap();
    let r = Recipe::load(&path, &sets(&["optim.lr=0.5"])).unwrap();
    assert_eq!(r.name, "tiny-gpt");
    assert_eq!(r.optim.lr, 0.5);
    assert_eq!(r.source.path, path);

    // Errors from a loaded file name that file.
    std::fs::write(&path, replace_line(&base(), "lr = 1e-3", "lr = -1.0")).unwrap();
    let e = Recipe::load(&path, &[]).unwrap_err();
    check(
        &e,
        &format!("{}:14", path.display()),
        "optim.lr",
        &["positive"],
    );
}

#[test]
fn load_missing_file_mentions_kiln_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let e = Recipe::load(&path, &[]).unwrap_err();
    check(
        &e,
        &path.display().to_string(),
        "",
        &["cannot read the recipe", "kiln recipes"],
    );
}

// ---------------------------------------------------------------------------------------------
// to_toml round trip
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_same_sections(a: &Recipe, b: &Recipe) {
    assert_eq!(a.description, b.description);
    assert_eq!(a.task, b.task);
    assert_eq!(a.seed, b.seed);
    assert_eq!(a.device, b.device);
    assert_eq!(a.precision, b.precision);
    assert_eq!(a.model, b.model);
    assert_eq!(a.data, b.data);
    assert_eq!(a.optim, b.optim);
    assert_eq!(a.schedule, b.schedule);
    assert_eq!(a.trainer, b.trainer);
}

#[test]
fn to_toml_round_trip() {
    let first = ok(
        &base(),
        &[
            "optim.lr=3e-4",
            "optim.betas=[0.8,0.9]",
            "schedule.name=cosine",
            "schedule.warmup_steps=10",
            "schedule.decay_steps=100",
            "schedule.min_lr_ratio=0.1",
            "trainer.clip_grad_norm=1.0",
            "data.path=/tmp/x",
            "model.n_embd=32",
        ],
    );
    let resolved = first.to_toml(&first.model);
    let second = ok(&resolved, &[]);
    assert_same_sections(&first, &second);
    // Defaults are written out explicitly.
    for key in [
        "betas",
        "eps",
        "grad_accum",
        "log_every",
        "prefetch",
        "val_fraction",
    ] {
        assert!(
            resolved.contains(key),
            "`{key}` missing from resolved recipe:\n{resolved}"
        );
    }
    // Resolving again is stable.
    assert_eq!(second.to_toml(&second.model), resolved);
}

#[test]
fn to_toml_round_trip_defaults_and_classification() {
    for text in [base(), base_classification()] {
        let first = ok(&text, &[]);
        let resolved = first.to_toml(&first.model);
        let second = ok(&resolved, &[]);
        assert_same_sections(&first, &second);
    }
}

#[test]
fn to_toml_uses_the_supplied_model_table() {
    let r = ok(&base(), &[]);
    let mut model = r.model.clone();
    model.insert("n_head".into(), toml::Value::Integer(4));
    let again = ok(&r.to_toml(&model), &[]);
    assert_eq!(again.model, model);
}

// ---------------------------------------------------------------------------------------------
// list_recipes
// ---------------------------------------------------------------------------------------------

#[test]
fn list_recipes_sorted_with_descriptions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zeta.toml"), base()).unwrap();
    std::fs::write(
        dir.path().join("alpha.toml"),
        replace_line(
            &base(),
            r#"description = "test recipe""#,
            r#"description = "first one""#,
        ),
    )
    .unwrap();
    // Not recipes: another extension, and a subfolder.
    std::fs::write(dir.path().join("notes.txt"), "description = \"no\"").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();

    let list = list_recipes(dir.path()).unwrap();
    let names: Vec<&str> = list.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    assert_eq!(list[0].description, "first one");
    assert_eq!(list[1].description, "test recipe");
    assert_eq!(list[0].path, dir.path().join("alpha.toml"));
    assert_eq!(list[1].path, dir.path().join("zeta.toml"));
}

#[test]
fn list_recipes_marks_unreadable_recipes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.toml"), "description = \n").unwrap();
    std::fs::write(
        dir.path().join("nodesc.toml"),
        "task = \"classification\"\n",
    )
    .unwrap();
    let list = list_recipes(dir.path()).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, "broken");
    assert_eq!(list[0].description, "(unreadable recipe)");
    assert_eq!(list[1].name, "nodesc");
    assert_eq!(list[1].description, "(unreadable recipe)");
}

#[test]
fn list_recipes_empty_and_missing_dir() {
    let dir = tempfile::tempdir().unwrap();
    assert!(list_recipes(dir.path()).unwrap().is_empty());
    assert!(list_recipes(&dir.path().join("missing")).is_err());
}

#[test]
fn set_empty_value_removes_a_key() {
    // max_steps → epochs: the empty value drops the old key so the two do not clash.
    let r = ok(&base(), &["trainer.max_steps=", "trainer.epochs=3"]);
    assert_eq!((r.trainer.max_steps, r.trainer.epochs), (None, Some(3)));
    // Removing an optional key restores its default.
    let with_seed = ok(&base(), &["seed="]);
    assert_eq!(with_seed.seed, 1337);
    // Removing a required key is reported like a missing one.
    let e = err(&base(), &["optim.lr="]);
    assert!(e.message.contains("missing field `lr`"), "{e}");
}

#[test]
fn best_metric_must_be_an_eval_metric() {
    let e = err(&base(), &["trainer.best_metric=train/loss"]);
    check(
        &e,
        "--set trainer.best_metric=train/loss",
        "trainer.best_metric",
        &["not an evaluation metric"],
    );
    let r = ok(
        &base(),
        &[
            "trainer.keep_best=true",
            "trainer.best_metric=eval/accuracy",
            "trainer.keep_last=3",
        ],
    );
    assert!(r.trainer.keep_best);
    assert_eq!(
        (r.trainer.keep_last, r.trainer.best_metric.as_str()),
        (3, "eval/accuracy")
    );
}

#[test]
fn tokenizer_keys_belong_to_text_bpe() {
    set_rejects(
        &base(),
        "data.tokenizer=data/gpt2-tokenizer/tokenizer.json",
        &[
            "data.tokenizer does not apply to dataset \"text-char\"",
            "`seq_len`",
        ],
    );
    let r = Recipe::parse(
        Path::new("recipes/t.toml"),
        &base(),
        &[
            "data.dataset=text-bpe".into(),
            "data.tokenizer=tok.json".into(),
            "init_from=openai-community/gpt2".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        source!(r, TextBpe).tokenizer.as_deref(),
        Some(Path::new("tok.json"))
    );
    assert_eq!(r.init_from.as_deref(), Some("openai-community/gpt2"));
    // Both survive into the run's resolved recipe.
    let again = Recipe::parse(Path::new("run/recipe.toml"), &r.to_toml(&r.model), &[]).unwrap();
    assert_eq!(again.data, r.data);
    assert_eq!(again.init_from, r.init_from);
}

#[test]
fn text_classification_keys() {
    set_rejects(
        &base(),
        "data.text_column=sentence",
        &["data.text_column does not apply to dataset \"text-char\""],
    );
    let cls = |sets: &[&str]| {
        let mut all = vec![
            "task=classification".to_string(),
            "data.dataset=text-classification".into(),
            "data.seq_len=".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        Recipe::parse(Path::new("recipes/t.toml"), &base(), &all)
    };
    let e = cls(&[]).unwrap_err();
    assert_eq!(e.key, "data.train");
    let r = cls(&[
        "data.train=train.csv",
        "data.labels=[\"neg\",\"pos\"]",
        "data.bucket_by_length=true",
    ])
    .unwrap();
    assert_eq!(
        source!(r, TextClassification).labels,
        Some(kiln_core::recipe::Labels::List(vec![
            "neg".into(),
            "pos".into()
        ]))
    );
    let r = cls(&["data.train=train.csv", "data.labels=categories.json"]).unwrap();
    assert_eq!(
        source!(r, TextClassification).labels,
        Some(kiln_core::recipe::Labels::File("categories.json".into()))
    );
    assert_eq!(
        cls(&["data.train=t.csv", "data.max_length=1"])
            .unwrap_err()
            .key,
        "data.max_length"
    );
}

// ---------------------------------------------------------------------------------------------
// Image data: image-folder, normalize, augment
// ---------------------------------------------------------------------------------------------

/// The classification recipe with `line` added after `batch_size = 32` (so `line` is line 8).
fn with_data_line(line: &str) -> String {
    insert_after(&base_classification(), "batch_size = 32", line)
}

#[test]
fn augment_keys_parse_with_defaults_and_round_trip() {
    let r = ok(
        &with_data_line("augment = { crop_padding = 4, hflip = true, cutmix_alpha = 1.0 }"),
        &[],
    );
    let a = source!(r, FashionMnist).augment.clone().unwrap();
    assert_eq!(a.crop_padding, 4);
    assert!(a.hflip);
    assert_eq!((a.mixup_alpha, a.cutmix_alpha, a.mix_prob), (0.0, 1.0, 1.0));
    assert!(a.mixes());
    // Absent: no augmentation.
    assert!(source!(ok(&base_classification(), &[]), FashionMnist)
        .augment
        .is_none());
    // Survives the resolved recipe, and --set reaches inside the table.
    let again = Recipe::parse(Path::new("run/recipe.toml"), &r.to_toml(&r.model), &[]).unwrap();
    assert_eq!(again.data, r.data);
    let r = ok(&base_classification(), &["data.augment.mixup_alpha=0.2"]);
    assert_eq!(
        source!(r, FashionMnist)
            .augment
            .as_ref()
            .unwrap()
            .mixup_alpha,
        0.2
    );
}

#[test]
fn bad_augment_keys_are_named() {
    file_error(
        &with_data_line("augment = { crop_padding = -1 }"),
        8,
        "data.augment.crop_padding",
        &["must be a whole number ≥ 0", "got -1"],
    );
    file_error(
        &with_data_line("augment = { crop_padding = 4, flip = true }"),
        8,
        "data.augment.flip",
        &["unknown field `flip`", "`hflip`"],
    );
    file_error(
        &with_data_line("augment = { mixup_alpha = -0.5 }"),
        8,
        "data.augment.mixup_alpha",
        &["must be ≥ 0", "got -0.5"],
    );
    file_error(
        &with_data_line("augment = { cutmix_alpha = nan }"),
        8,
        "data.augment.cutmix_alpha",
        &["must be ≥ 0"],
    );
    file_error(
        &with_data_line("augment = { mix_prob = 1.5 }"),
        8,
        "data.augment.mix_prob",
        &["must be in [0, 1]", "got 1.5"],
    );
    file_error(
        &with_data_line("augment = { hflip = \"yes\" }"),
        8,
        "data.augment.hflip",
        &["invalid type"],
    );
    set_rejects(
        &base_classification(),
        "data.augment.crop_padding=100000",
        &["at most 4096"],
    );
    // Image keys on a text data set.
    set_error(
        &base(),
        "data.augment.hflip=true",
        "data.augment",
        &["data.augment does not apply to dataset \"text-char\""],
    );
}

#[test]
fn normalize_needs_one_value_per_channel() {
    let r = ok(
        &with_data_line("normalize = { mean = [0.5], std = [0.25] }"),
        &[],
    );
    let n = source!(r, FashionMnist).normalize.clone().unwrap();
    assert_eq!((n.mean, n.std), (vec![0.5], vec![0.25]));
    file_error(
        &with_data_line("normalize = { mean = [0.5, 0.5, 0.5], std = [0.2, 0.2, 0.2] }"),
        8,
        "data.normalize.mean",
        &["one value per channel", "1 for these images, got 3"],
    );
    file_error(
        &with_data_line("normalize = { mean = [0.5], std = [0.0] }"),
        8,
        "data.normalize.std",
        &["positive"],
    );
    file_error(
        &with_data_line("normalize = { mean = [0.5] }"),
        8,
        "data.normalize",
        &["missing field `std`"],
    );
}

#[test]
fn image_folder_keys() {
    let folder = |sets: &[&str]| {
        let mut all = vec![
            "data.dataset=image-folder".to_string(),
            "data.path=pets".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        Recipe::parse(Path::new(FILE), &base_classification(), &all)
    };
    let e = folder(&[]).unwrap_err();
    assert_eq!(e.key, "data.image_size");
    assert!(e.message.contains("missing"), "{e}");
    let r = folder(&["data.image_size=[32, 24]"]).unwrap();
    assert_eq!(r.data.dataset(), Dataset::ImageFolder);
    assert_eq!(source!(r, ImageFolder).image_size, [32, 24]);
    assert_eq!(source!(r, ImageFolder).channels, None, "3 by default");
    let r = folder(&[
        "data.image_size=[8, 8]",
        "data.channels=3",
        "data.normalize.mean=[0.1, 0.2, 0.3]",
        "data.normalize.std=[1.0, 1.0, 1.0]",
    ])
    .unwrap();
    assert_eq!(
        source!(r, ImageFolder)
            .normalize
            .as_ref()
            .unwrap()
            .mean
            .len(),
        3
    );
    let e = folder(&["data.image_size=[8, 8]", "data.channels=2"]).unwrap_err();
    assert_eq!(e.key, "data.channels");
    assert!(e.message.contains("1 (grey) or 3 (RGB)"), "{e}");
    let e = folder(&["data.image_size=[0, 8]"]).unwrap_err();
    assert_eq!(e.key, "data.image_size");
    let e = folder(&["data.image_size=[8, 8]", "data.path="]).unwrap_err();
    assert_eq!(e.key, "data.path");
    let e = folder(&[
        "data.image_size=[8, 8]",
        "data.normalize.mean=[0.5]",
        "data.normalize.std=[0.5]",
    ])
    .unwrap_err();
    assert_eq!(e.key, "data.normalize.mean");
    assert!(e.message.contains("3 for these images"), "{e}");
    // image_size belongs to image-folder.
    file_error(
        &with_data_line("image_size = [28, 28]"),
        8,
        "data.image_size",
        &["data.image_size does not apply to dataset \"fashion-mnist\""],
    );
    // A language model cannot read images.
    let e = err(&base(), &["data.dataset=image-folder"]);
    assert_eq!(e.key, "data.dataset");
}

/// A language model's chat template is kept (and written back into the resolved recipe);
/// elsewhere, or empty, it is refused at its line.
#[test]
fn chat_template_for_language_models_only() {
    let t = r#"chat_template = '{% for m in messages %}{{ m["content"] }}{% endfor %}'"#;
    let text = insert_after(&base(), r#"seed = 1"#, t);
    let r = ok(&text, &[]);
    assert_eq!(
        r.chat_template.as_deref(),
        Some(r#"{% for m in messages %}{{ m["content"] }}{% endfor %}"#)
    );
    let again = Recipe::parse(Path::new(FILE), &r.to_toml(&r.model), &[]).unwrap();
    assert_eq!(again.chat_template, r.chat_template);
    let empty = insert_after(&base(), r#"seed = 1"#, "chat_template = ' '");
    file_error(&empty, 4, "chat_template", &["is empty"]);
    let cls = insert_after(&base_classification(), r#"description = "mlp""#, t);
    file_error(&cls, 2, "chat_template", &["language-model recipes only"]);
}
