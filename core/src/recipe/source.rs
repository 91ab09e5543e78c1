//! The recipe's text and its errors: `--set` overrides applied to the document, and every error
//! located at its file and line or at the `--set` argument that caused it.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// An error in a recipe: where it is, which key, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeError {
    /// `recipes/x.toml:12` or `--set optim.lr=-1`.
    pub location: String,
    /// Dotted key path, e.g. `optim.lr` (empty for syntax errors).
    pub key: String,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "recipe error at {}: {}", self.location, self.message)
        } else {
            write!(
                f,
                "recipe error at {}: key `{}`: {}",
                self.location, self.key, self.message
            )
        }
    }
}

impl std::error::Error for RecipeError {}

/// The recipe text after overrides, with enough bookkeeping to point errors at their source.
#[derive(Debug, Clone)]
pub struct RecipeSource {
    pub path: PathBuf,
    /// Text after overrides (this is what was parsed).
    pub text: String,
    /// Text as written in the file: line numbers in errors refer to it (overrides may add lines
    /// to `text`).
    original: String,
    /// `key.path` → the raw `--set` argument that changed it.
    overrides: Vec<(String, String)>,
}

impl RecipeSource {
    /// `text` as read from `path`, with the `--set` arguments `sets` applied.
    pub(super) fn new(path: &Path, text: &str, sets: &[String]) -> Result<Self, RecipeError> {
        let original = text;
        let (text, overrides) = apply_overrides(path, text, sets)?;
        Ok(RecipeSource {
            path: path.to_path_buf(),
            text,
            original: original.to_string(),
            overrides,
        })
    }

    /// Turns a key path and a message into an error located in the file or at the `--set` flag.
    pub fn error(&self, key: &str, message: impl Into<String>) -> RecipeError {
        let message = message.into();
        if let Some((_, arg)) = self
            .overrides
            .iter()
            .rev()
            .find(|(k, _)| key == k || key.starts_with(&format!("{k}.")))
        {
            return RecipeError {
                location: format!("--set {arg}"),
                key: key.to_string(),
                message,
            };
        }
        let (line, in_file) = key_line(&self.original, key);
        // A table that only an override created (e.g. `--set data.batch_size=2` without a
        // `[data]` in the file): point at the flag that created it.
        if !in_file {
            if let Some((_, arg)) = self
                .overrides
                .iter()
                .find(|(k, _)| k.starts_with(&format!("{key}.")))
            {
                return RecipeError {
                    location: format!("--set {arg}"),
                    key: key.to_string(),
                    message,
                };
            }
        }
        let location = match line {
            Some(l) => format!("{}:{}", self.path.display(), l),
            None => self.path.display().to_string(),
        };
        RecipeError {
            location,
            key: key.to_string(),
            message,
        }
    }

    /// Deserializes `value` (found at `prefix` in the recipe) into `T`, reporting unknown keys and
    /// wrong types by their full dotted path.
    pub fn decode<T: DeserializeOwned>(
        &self,
        prefix: &str,
        value: toml::Value,
    ) -> Result<T, RecipeError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            let mut key = join_key(prefix, if inner == "." { "" } else { &inner });
            let message = e.into_inner().message().to_string();
            // For an unknown field the path may be the table's; name the offending key (once).
            if let Some(field) = unknown_field_name(&message) {
                if key.rsplit('.').next() != Some(field.as_str()) {
                    key = join_key(&key, &field);
                }
            }
            self.error(&key, message)
        })
    }
}

fn join_key(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}.{b}"),
    }
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// 1-based line of the key at `path` in `text` (the deepest segment that exists), and whether
/// the whole path exists.
fn key_line(text: &str, path: &str) -> (Option<usize>, bool) {
    let Ok(doc) = toml_edit::Document::parse(text) else {
        return (None, false);
    };
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    // Array elements (`optim.betas[1]`) are located at their array's key.
    let segs: Vec<&str> = path
        .split('.')
        .map(|s| s.split('[').next().unwrap_or(s))
        .collect();
    let mut found = 0;
    for seg in &segs {
        let Some((key, item)) = table.get_key_value(seg) else {
            break;
        };
        found += 1;
        span = key.span().or(item.span()).or(span);
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    let line = span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    (line, found == segs.len())
}

/// Applies `key.path=value` overrides to TOML text. Values parse as TOML (`3e-4`, `true`,
/// `[1, 2]`, `"x"`); anything that is not valid TOML is taken as a plain string. An empty value
/// (`key.path=`) removes the key, so that its default applies.
fn apply_overrides(
    path: &Path,
    text: &str,
    sets: &[String],
) -> Result<(String, Vec<(String, String)>), RecipeError> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| syntax_error(path, text, &e))?;
    let mut applied = Vec::new();
    for arg in sets {
        let bad = |message: String| RecipeError {
            location: format!("--set {arg}"),
            key: String::new(),
            message,
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected key.path=value, e.g. --set optim.lr=3e-4".into()))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(bad(format!("`{key}` is not a dotted key path")));
        }
        let segs: Vec<&str> = key.split('.').collect();
        let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
        for seg in &segs[..segs.len() - 1] {
            let item = table
                .entry(seg)
                .or_insert(toml_edit::Item::Table(toml_edit::Table::new()));
            table = item.as_table_like_mut().ok_or_else(|| {
                bad(format!(
                    "`{seg}` in `{key}` is a value, not a table of keys"
                ))
            })?;
        }
        let last = segs[segs.len() - 1];
        if raw.trim().is_empty() {
            table.remove(last);
        } else {
            let value: toml_edit::Value = raw
                .trim()
                .parse()
                .unwrap_or_else(|_| toml_edit::Value::from(raw.trim()));
            table.insert(last, toml_edit::Item::Value(value));
        }
        applied.push((key.to_string(), arg.clone()));
    }
    Ok((doc.to_string(), applied))
}

fn syntax_error(path: &Path, text: &str, e: &toml_edit::TomlError) -> RecipeError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    RecipeError {
        location: match line {
            Some(l) => format!("{}:{}", path.display(), l),
            None => path.display().to_string(),
        },
        key: String::new(),
        message: format!("TOML syntax error: {}", e.message()),
    }
}
