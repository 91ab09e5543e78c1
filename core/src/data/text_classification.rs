//! Labelled text in TSV or CSV files (SST-2, BANKING77, one's own), tokenized with a Hugging Face
//! `tokenizer.json` for an encoder such as BERT.
//!
//! Each file has a header row; `data.text_column` and `data.label_column` name the columns.
//! Labels are mapped to ids by `data.labels` (an explicit list, or a JSON file holding one), or
//! else by the sorted set of training labels; a label outside the map is an error naming the
//! file, line and label. Texts are tokenized once, in parallel, truncated to `data.max_length`.
//! Batches are padded to their longest example only (dynamic padding); with
//! `data.bucket_by_length`, each epoch groups examples of similar length into batches, so little
//! is padded, and then shuffles the batches; evaluation batches are grouped by length as well.
//!
//! A batch's input is (B, 2, T) u32: row 0 the token ids, row 1 the attention mask.

use super::{DataSplits, Examples, HostBatch, HostTensor};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// What `[data]` says about a text-classification data set.
pub struct Spec<'a> {
    pub folder: &'a Path,
    pub train: &'a str,
    /// None: hold out `val_size` training examples.
    pub val: Option<&'a str>,
    pub test: Option<&'a str>,
    pub val_size: usize,
    pub text_column: &'a str,
    pub label_column: &'a str,
    pub labels: Option<Vec<String>>,
    pub max_length: usize,
    pub bucket_by_length: bool,
    pub tokenizer: &'a Path,
    pub seed: u64,
}

/// Tokenized, labelled examples of one split.
pub struct TextExamples {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    pub pad_id: u32,
    pub batch_size: usize,
    pub bucket_by_length: bool,
}

impl Examples for TextExamples {
    fn train_order(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        if !shuffle {
            return order;
        }
        order.shuffle(rng);
        if self.bucket_by_length {
            // Sort windows of 50 batches by length, cut them into batches, shuffle the batches:
            // similar lengths share a batch while the epoch stays random.
            let b = self.batch_size.max(1);
            for window in order.chunks_mut(50 * b) {
                window.sort_by_key(|&i| self.ids[i].len());
            }
            let mut batches: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
            // Keep a short last batch last: the loader drops it.
            let tail = (batches.last().map(Vec::len) != Some(b))
                .then(|| batches.pop())
                .flatten();
            batches.shuffle(rng);
            order = batches.into_iter().chain(tail).flatten().collect();
        }
        order
    }

    fn eval_order(&self) -> Vec<usize> {
        (0..self.ids.len()).collect()
    }

    /// With `bucket_by_length`, evaluation batches hold examples of similar length too (as the
    /// transformers Trainer's `group_by_length` does): BANKING77's validation rows average 16
    /// tokens but batches of 32 in file order are padded to 46.
    fn group_for_eval(&self, order: &mut [usize]) {
        if self.bucket_by_length {
            order.sort_by_key(|&i| self.ids[i].len());
        }
    }

    fn collate(&self, ids: &[usize]) -> HostBatch {
        let t = ids
            .iter()
            .map(|&i| self.ids[i].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut x = Vec::with_capacity(ids.len() * 2 * t);
        for &i in ids {
            let seq = &self.ids[i];
            x.extend(
                seq.iter()
                    .copied()
                    .chain(std::iter::repeat_n(self.pad_id, t - seq.len())),
            );
            x.extend((0..t).map(|j| u32::from(j < seq.len())));
        }
        HostBatch {
            inputs: HostTensor::U32(x, vec![ids.len(), 2, t]),
            targets: ids.iter().map(|&i| self.labels[i]).collect(),
            target_shape: vec![ids.len()],
            mix: None,
        }
    }
}

/// Rows of (line number, text, label) from a TSV/CSV file with a header.
pub fn read_rows(
    path: &Path,
    text_column: &str,
    label_column: &str,
) -> Result<Vec<(u64, String, String)>> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {}; check data.path and the file names",
            path.display()
        )
    })?;
    parse_rows(&bytes, path, text_column, label_column)
}

/// [`read_rows`] on the file's contents: `path` names the file in errors and, by its extension,
/// picks the format (`.tsv`: tab-separated, unquoted; anything else: CSV).
pub fn parse_rows(
    bytes: &[u8],
    path: &Path,
    text_column: &str,
    label_column: &str,
) -> Result<Vec<(u64, String, String)>> {
    let tab = path.extension().is_some_and(|e| e == "tsv");
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(if tab { b'\t' } else { b',' })
        // SST-2's TSV has unbalanced quotes inside sentences: only CSV quotes fields.
        .quoting(!tab)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .clone();
    let column = |name: &str, key: &str| -> Result<usize> {
        headers.iter().position(|h| h == name).with_context(|| {
            format!(
                "{} has no column {name:?} (columns: {}); set data.{key}",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })
    };
    let (ti, li) = (
        column(text_column, "text_column")?,
        column(label_column, "label_column")?,
    );
    let mut rows = Vec::new();
    for r in reader.records() {
        let r = r.with_context(|| format!("{}: malformed row", path.display()))?;
        let line = r.position().map_or(0, |p| p.line());
        let (Some(text), Some(label)) = (r.get(ti), r.get(li)) else {
            bail!("{}:{line}: the row has too few columns", path.display());
        };
        rows.push((line, text.to_string(), label.trim().to_string()));
    }
    if rows.is_empty() {
        bail!("{} has no examples", path.display());
    }
    Ok(rows)
}

/// The label list: explicit (`labels`), or the sorted labels of the training rows.
fn label_map(spec: &Spec, train: &[(u64, String, String)]) -> Vec<String> {
    match &spec.labels {
        Some(l) => l.clone(),
        None => {
            let set: BTreeSet<&String> = train.iter().map(|r| &r.2).collect();
            set.into_iter().cloned().collect()
        }
    }
}

fn encode(
    tokenizer: &Tokenizer,
    rows: &[(u64, String, String)],
    labels: &[String],
    max_length: usize,
    file: &Path,
) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
    let label_ids =
        rows.iter()
            .map(|(line, _, l)| {
                labels
                    .iter()
                    .position(|x| x == l)
                    .map(|i| i as u32)
                    .with_context(|| {
                        format!(
                    "{}:{line}: label {l:?} is not one of the {} labels ({}…); fix the row or \
                     set data.labels",
                    file.display(),
                    labels.len(),
                    labels.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
    let ids = rows
        .par_iter()
        .map(|(_, text, _)| {
            let e = tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", file.display()))?;
            let mut ids = e.get_ids().to_vec();
            if let (true, Some(&last)) = (ids.len() > max_length, ids.last()) {
                // Keep the closing special token ([SEP]) of a truncated sequence.
                ids.truncate(max_length);
                if let Some(end) = ids.last_mut() {
                    *end = last;
                }
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ids, label_ids))
}

/// Loads a tokenizer for encoder inputs: without the padding and truncation a `tokenizer.json`
/// may carry (kiln pads per batch and truncates itself).
pub fn encoder_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut t = super::bpe::load_tokenizer(path)?;
    t.with_padding(None);
    t.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(t)
}

/// The pad id of a tokenizer (`[PAD]`, `<pad>`), or 0.
fn pad_id(t: &Tokenizer) -> u32 {
    ["[PAD]", "<pad>", "<|endoftext|>"]
        .iter()
        .find_map(|p| t.token_to_id(p))
        .unwrap_or(0)
}

pub fn load(spec: &Spec, batch_size: usize) -> Result<DataSplits> {
    let tokenizer = encoder_tokenizer(spec.tokenizer)?;
    let file = |name: &str| -> PathBuf { spec.folder.join(name) };
    let train_file = file(spec.train);
    let mut train_rows = read_rows(&train_file, spec.text_column, spec.label_column)?;
    let labels = label_map(spec, &train_rows);
    if labels.len() < 2 {
        bail!(
            "{}: only {} label(s); a classifier needs two or more",
            train_file.display(),
            labels.len()
        );
    }
    let pad = pad_id(&tokenizer);
    // Every split groups by length: training batches within windows, evaluation passes whole.
    let examples = |ids, labels| -> Arc<dyn Examples> {
        Arc::new(TextExamples {
            ids,
            labels,
            pad_id: pad,
            batch_size,
            bucket_by_length: spec.bucket_by_length,
        })
    };
    let mut files = vec![(
        train_file.display().to_string(),
        crate::fs::sha256_file(&train_file)?,
    )];
    // A separate split file: hashed, read and encoded.
    let mut read_split = |name: &str| -> Result<Arc<dyn Examples>> {
        let f = file(name);
        files.push((f.display().to_string(), crate::fs::sha256_file(&f)?));
        let rows = read_rows(&f, spec.text_column, spec.label_column)?;
        let (ids, l) = encode(&tokenizer, &rows, &labels, spec.max_length, &f)?;
        Ok(examples(ids, l))
    };
    let val = match spec.val {
        Some(v) => read_split(v)?,
        None => {
            anyhow::ensure!(
                spec.val_size > 0 && spec.val_size < train_rows.len(),
                "data.val_size = {} must be between 1 and the {} training examples (or set data.val \
                 to a validation file)",
                spec.val_size,
                train_rows.len()
            );
            // A seeded shuffle before holding out, so the validation rows are not one class.
            use rand::SeedableRng;
            train_rows.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5eed));
            let held = train_rows.split_off(train_rows.len() - spec.val_size);
            let (ids, l) = encode(&tokenizer, &held, &labels, spec.max_length, &train_file)?;
            examples(ids, l)
        }
    };
    let (ids, l) = encode(
        &tokenizer,
        &train_rows,
        &labels,
        spec.max_length,
        &train_file,
    )?;
    let train = examples(ids, l);
    let test = match spec.test {
        Some(t) => Some(read_split(t)?),
        None => None,
    };
    files.push((
        spec.tokenizer.display().to_string(),
        crate::fs::sha256_file(spec.tokenizer)?,
    ));
    Ok(DataSplits {
        train,
        val,
        test,
        num_classes: labels.len(),
        files,
        vocab: None,
        tokenizer: Some(spec.tokenizer.to_path_buf()),
        labels: Some(labels),
        image: None,
    })
}

#[cfg(test)]
mod tests;
