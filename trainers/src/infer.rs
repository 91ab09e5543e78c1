//! Batch inference: sentence embeddings (`kiln embed`) and classification predictions over a
//! file of texts or a folder of images (`kiln predict`), the paths a deployment pipeline calls.

use crate::run::load_run_at;
use crate::weights::{self, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_core::data::text_classification::{encoder_tokenizer, read_rows};
use kiln_core::data::ImageInfo;
use kiln_models::bert::{self, Bert};
use kiln_models::{hf, Model, ModelConfig};
use std::io::Write;
use std::path::Path;
use tokenizers::Tokenizer;

/// Token ids and mask (B, T) of `texts`, padded to the longest and cut at `max_len`.
fn batch_inputs(
    tokenizer: &Tokenizer,
    texts: &[&str],
    max_len: usize,
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut seqs = Vec::with_capacity(texts.len());
    for t in texts {
        let mut ids = tokenizer
            .encode(*t, true)
            .map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?
            .get_ids()
            .to_vec();
        if ids.len() > max_len {
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_len);
            ids[max_len - 1] = last;
        }
        seqs.push(ids);
    }
    let t = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in &seqs {
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - s.len())),
        );
        mask.extend((0..t).map(|j| u32::from(j < s.len())));
    }
    let shape = (seqs.len(), t);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

fn pad_id(t: &Tokenizer) -> u32 {
    t.token_to_id("[PAD]").unwrap_or(0)
}

/// Mean-pooled, L2-normalized sentence embeddings (sentence-transformers' pipeline) of `texts`
/// from the BERT model in `spec` (a folder or a hub id).
pub fn embed(
    spec: &str,
    texts: &[String],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let folder = kiln_core::hub::resolve(spec)?;
    let ModelConfig::Bert(mut cfg) = hf::read_hf_config(&folder)? else {
        bail!("{spec} is not a BERT model: kiln embed needs an encoder");
    };
    // Embeddings come from the encoder; a classifier head, if the folder has one, is unused.
    cfg.num_labels = 0;
    let model_cfg = ModelConfig::Bert(cfg.clone());
    let varmap = weights::load(
        &model_cfg,
        Weights::Pretrained(&folder),
        0,
        DType::F32,
        device,
    )?;
    // The encoder itself (not the boxed model) over the loaded parameters, for `encode`.
    let vb = kiln_core::rng::seeded_var_builder(&varmap, 0, DType::F32, device);
    let model = Bert::new(
        &cfg,
        vb,
        kiln_models::SharedRng::new(0, "unused"),
        DType::F32,
    )?;
    let tokenizer = encoder_tokenizer(&folder.join("tokenizer.json"))?;
    let pad = pad_id(&tokenizer);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) =
            batch_inputs(&tokenizer, &refs, cfg.max_position_embeddings, pad, device)?;
        let hidden = model.encode(&ids, &mask, false)?;
        let e = bert::l2_normalize(&bert::mean_pooled(&hidden, &mask)?)?;
        out.extend(e.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// A text classifier with its tokenizer and label names.
struct Classifier {
    model: Box<dyn Model>,
    tokenizer: Tokenizer,
    labels: Vec<String>,
    max_len: usize,
    /// The training data's (text, label) column names, for a run.
    columns: Option<(String, String)>,
}

fn load_classifier(spec: &Path, device: &Device) -> Result<Classifier> {
    if spec.join("recipe.toml").is_file() {
        let run = load_run_at(spec, "latest", device)?;
        let ModelConfig::Bert(c) = &run.model_cfg else {
            bail!("{} is not a text-classification run", spec.display());
        };
        let labels: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(spec.join("labels.json"))
                .with_context(|| format!("{} has no labels.json", spec.display()))?,
        )?;
        let d = (run.recipe.data.text_classification())
            .with_context(|| format!("{} is not a text-classification run", spec.display()))?;
        return Ok(Classifier {
            columns: Some((d.text_column.clone(), d.label_column.clone())),
            max_len: d.max_length.min(c.max_position_embeddings),
            model: run.model,
            tokenizer: encoder_tokenizer(&spec.join("tokenizer.json"))?,
            labels,
        });
    }
    let folder = kiln_core::hub::resolve(&spec.to_string_lossy())?;
    let cfg = hf::read_hf_config(&folder)?;
    let ModelConfig::Bert(c) = &cfg else {
        bail!("{} is not a BERT classifier", folder.display());
    };
    anyhow::ensure!(
        c.num_labels > 0,
        "{} has no classification head (num_labels / id2label in config.json)",
        folder.display()
    );
    let (model, labels) = load_folder_classifier(&cfg, c.num_labels, &folder, device)?;
    Ok(Classifier {
        columns: None,
        max_len: c.max_position_embeddings,
        model,
        tokenizer: encoder_tokenizer(&folder.join("tokenizer.json"))?,
        labels,
    })
}

/// An exported classifier's weights (f32, inference) and its `num_labels` label names from
/// `config.json`'s `id2label` (`LABEL_i` where it has none).
fn load_folder_classifier(
    cfg: &ModelConfig,
    num_labels: usize,
    folder: &Path,
    device: &Device,
) -> Result<(Box<dyn Model>, Vec<String>)> {
    let p = folder.join("config.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("{} is not JSON", p.display()))?;
    let labels = (0..num_labels)
        .map(|i| {
            v["id2label"][i.to_string()]
                .as_str()
                .map_or_else(|| format!("LABEL_{i}"), str::to_string)
        })
        .collect();
    let model = weights::load_model(cfg, Weights::Pretrained(folder), 0, DType::F32, device)?;
    Ok((model, labels))
}

/// Each row's label probabilities, in f32, from a batch's logits (B, labels).
fn probabilities(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(p.to_vec2()?)
}

/// The most probable label's index and probability.
fn top1(probs: &[f32]) -> (usize, &f32) {
    probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("at least two labels")
}

pub struct PredictOptions<'a> {
    /// Default: the run's `data.text_column`, else "text".
    pub text_column: Option<&'a str>,
    /// Column with true labels: when the input has it, accuracy is reported. Default: the run's
    /// `data.label_column`, else "label".
    pub label_column: Option<&'a str>,
    pub batch_size: usize,
    pub progress: bool,
}

/// What `predict` saw: rows written, and the accuracy when the input had labels.
pub struct PredictSummary {
    pub rows: usize,
    /// Over the rows whose true label is one the model knows.
    pub accuracy: Option<f64>,
    /// Rows whose true label is not among the model's labels (left out of the accuracy), and
    /// the first such label.
    pub unknown_labels: usize,
    pub first_unknown: Option<String>,
}

/// Batches [`predict`] groups by length at a time: the probabilities it holds before writing.
const PREDICT_WINDOW_BATCHES: usize = 64;

/// Classifies every row of `input` (TSV/CSV with a header) and writes one JSON object per line
/// to `output`: the text, the predicted label, its probability and all label probabilities.
pub fn predict(
    spec: &Path,
    input: &Path,
    output: &Path,
    o: &PredictOptions,
    device: &Device,
) -> Result<PredictSummary> {
    kiln_core::fs::ensure_not_same_file(input, output, "--output")?;
    if let Some(clf) = load_image_classifier(spec, device)? {
        return predict_images(&clf, input, output, o, device);
    }
    let clf = load_classifier(spec, device)?;
    let (run_text, run_label) = clf
        .columns
        .clone()
        .unwrap_or_else(|| ("text".into(), "label".into()));
    let text_column = o.text_column.unwrap_or(&run_text);
    let label_column = o.label_column.unwrap_or(&run_label);
    let has_labels = {
        let mut r = csv::ReaderBuilder::new()
            .delimiter(if input.extension().is_some_and(|e| e == "tsv") {
                b'\t'
            } else {
                b','
            })
            .from_path(input)
            .with_context(|| format!("cannot read {}", input.display()))?;
        r.headers()?.iter().any(|h| h == label_column)
    };
    let rows = if has_labels {
        read_rows(input, text_column, label_column)?
    } else {
        // No label column: read the text column alone (the label slot stays empty).
        read_rows(input, text_column, text_column)?
            .into_iter()
            .map(|(l, t, _)| (l, t, String::new()))
            .collect()
    };
    let mut w = Predictions::create(output)?;
    let bar = progress_bar(rows.len(), o.progress);
    let pad = pad_id(&clf.tokenizer);
    let (mut correct, mut known, mut unknown) = (0usize, 0usize, 0usize);
    let mut first_unknown = None;
    let batch = o.batch_size.max(1);
    // Within each window of rows, batches hold rows of similar length (by characters, a close
    // stand-in for tokens), so they pad little, as `data.bucket_by_length` does; the window is
    // written back in input order. BANKING77's test rows in file order pad to twice their length.
    for window in rows.chunks(PREDICT_WINDOW_BATCHES * batch) {
        let mut order: Vec<usize> = (0..window.len()).collect();
        order.sort_by_key(|&i| window[i].1.len());
        let mut probs = vec![Vec::new(); window.len()];
        for ids in order.chunks(batch) {
            let texts: Vec<&str> = ids.iter().map(|&i| window[i].1.as_str()).collect();
            let (x, mask) = batch_inputs(&clf.tokenizer, &texts, clf.max_len, pad, device)?;
            let p = probabilities(&clf.model.forward(&bert::pack_inputs(&x, &mask)?, false)?)?;
            for (&i, p) in ids.iter().zip(p) {
                probs[i] = p;
            }
            bar.inc(ids.len() as u64);
        }
        for ((_, text, truth), p) in window.iter().zip(&probs) {
            let (best, score) = top1(p);
            let label = &clf.labels[best];
            if has_labels && clf.labels.contains(truth) {
                known += 1;
                correct += usize::from(label == truth);
            } else if has_labels {
                // A label the model never saw (or an empty cell) cannot be predicted right:
                // counting it as wrong would understate the accuracy without saying why.
                unknown += 1;
                first_unknown.get_or_insert_with(|| truth.clone());
            }
            w.write("text", text, label, *score, &clf.labels, p)?;
        }
    }
    bar.finish_and_clear();
    w.finish()?;
    Ok(PredictSummary {
        rows: rows.len(),
        accuracy: (has_labels && known > 0).then(|| correct as f64 / known as f64),
        unknown_labels: unknown,
        first_unknown,
    })
}

fn progress_bar(n: usize, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::hidden());
    }
    let b = ProgressBar::new(n as u64);
    b.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  eta {eta}")
            .expect("a valid template"),
    );
    b
}

/// The JSON-lines output, written beside the target and renamed over it when complete, so a
/// failed run never leaves half a file under the requested name.
struct Predictions {
    tmp: std::path::PathBuf,
    output: std::path::PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl Predictions {
    fn create(output: &Path) -> Result<Self> {
        let tmp = output.with_extension("partial");
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(Predictions {
            tmp,
            output: output.to_path_buf(),
            w: std::io::BufWriter::new(f),
        })
    }

    /// One row: the input (`key`: its text or file), the label, its probability, all of them.
    fn write(
        &mut self,
        key: &str,
        input: &str,
        label: &str,
        score: f32,
        labels: &[String],
        probs: &[f32],
    ) -> Result<()> {
        let probs: serde_json::Map<_, _> = labels
            .iter()
            .zip(probs)
            .map(|(l, x)| (l.clone(), serde_json::json!(x)))
            .collect();
        let line = serde_json::json!({key: input, "label": label, "score": score, "probs": probs});
        Ok(writeln!(self.w, "{line}")?)
    }

    fn finish(self) -> Result<()> {
        self.w
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        std::fs::rename(&self.tmp, &self.output).map_err(kiln_core::fs::at(&self.output))?;
        Ok(())
    }
}

/// An image classifier (ResNet, ViT) with its label names and input geometry.
struct ImageClassifier {
    model: Box<dyn Model>,
    labels: Vec<String>,
    image: ImageInfo,
}

/// The image classifier in `spec` (a run with `image.json`, or a folder or hub id with
/// `preprocessor_config.json`); `None` for any other model.
fn load_image_classifier(spec: &Path, device: &Device) -> Result<Option<ImageClassifier>> {
    let json = |p: &Path| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
    };
    if spec.join("recipe.toml").is_file() {
        let info = spec.join(crate::run::IMAGE_FILE);
        if !info.is_file() {
            return Ok(None);
        }
        let image: ImageInfo = serde_json::from_value(json(&info)?)
            .with_context(|| format!("{} is corrupt", info.display()))?;
        let labels: Vec<String> = serde_json::from_value(json(&spec.join("labels.json"))?)
            .with_context(|| format!("{}/labels.json is corrupt", spec.display()))?;
        let run = load_run_at(spec, "latest", device)?;
        return Ok(Some(ImageClassifier {
            model: run.model,
            labels,
            image,
        }));
    }
    let folder = kiln_core::hub::resolve(&spec.to_string_lossy())?;
    let cfg = hf::read_hf_config(&folder)?;
    let Some((channels, num_labels)) = cfg.image_classifier() else {
        return Ok(None);
    };
    let pre_path = folder.join("preprocessor_config.json");
    let pre = json(&pre_path)?;
    let floats = |key: &str| -> Result<Vec<f32>> {
        let v = &pre[key];
        let values: Option<Vec<f32>> = match v.as_array() {
            Some(a) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
            None => v.as_f64().map(|x| vec![x as f32; channels]),
        };
        values
            .filter(|v| v.len() == channels)
            .with_context(|| format!("{}: `{key}` needs {channels} numbers", pre_path.display()))
    };
    let size = |key: &str| -> Result<usize> {
        pre["size"][key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{}: no size.{key}", pre_path.display()))
    };
    let image = ImageInfo {
        channels,
        height: size("height")?,
        width: size("width")?,
        mean: floats("image_mean")?,
        std: floats("image_std")?,
    };
    let (model, labels) = load_folder_classifier(&cfg, num_labels, &folder, device)?;
    Ok(Some(ImageClassifier {
        model,
        labels,
        image,
    }))
}

/// Classifies `input` (an image, or every image below a folder, in path order). When every
/// image sits in a folder named after a label (`<class>/x.png`), accuracy is reported.
fn predict_images(
    clf: &ImageClassifier,
    input: &Path,
    output: &Path,
    o: &PredictOptions,
    device: &Device,
) -> Result<PredictSummary> {
    use kiln_core::data::image_folder;
    use rayon::prelude::*;
    let files = if input.is_dir() {
        let mut files = Vec::new();
        image_folder::images_below(input, &mut files)?;
        if files.is_empty() {
            bail!("{} holds no images (.png, .jpg or .jpeg)", input.display());
        }
        files
    } else {
        vec![input.to_path_buf()]
    };
    let truth: Vec<Option<&str>> = files
        .iter()
        .map(|f| {
            let class = f.parent()?.file_name()?.to_str()?;
            clf.labels.iter().any(|l| l == class).then_some(class)
        })
        .collect();
    let has_labels = truth.iter().all(Option::is_some);
    let ImageInfo {
        channels: c,
        height: h,
        width: w,
        ..
    } = clf.image;
    let norm =
        kiln_core::data::vision::Normalizer::new(clf.image.mean.clone(), clf.image.std.clone());
    let mut out = Predictions::create(output)?;
    let bar = progress_bar(files.len(), o.progress);
    let mut correct = 0usize;
    let batch = o.batch_size.max(1);
    for (b, chunk) in files.chunks(batch).enumerate() {
        let mut bytes = vec![0u8; chunk.len() * c * h * w];
        bytes
            .par_chunks_mut(c * h * w)
            .zip(chunk)
            .try_for_each(|(dst, f)| image_folder::decode(f, [c, h, w], dst).map(|_| ()))?;
        let pixels: Vec<f32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &p)| norm.value(i / (h * w) % c, p))
            .collect();
        let x = Tensor::from_vec(pixels, (chunk.len(), c, h, w), device)?;
        let probs = probabilities(&clf.model.forward(&x, false)?)?;
        for (i, (f, p)) in chunk.iter().zip(&probs).enumerate() {
            let (best, score) = top1(p);
            let label = &clf.labels[best];
            correct += usize::from(truth[b * batch + i] == Some(label.as_str()));
            out.write("file", &f.to_string_lossy(), label, *score, &clf.labels, p)?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    out.finish()?;
    Ok(PredictSummary {
        rows: files.len(),
        accuracy: has_labels.then(|| correct as f64 / files.len() as f64),
        unknown_labels: 0,
        first_unknown: None,
    })
}
