//! Data sets and the batch pipeline.
//!
//! A data set is a [`Examples`] implementation: it says which example ids an epoch visits and
//! how to collate a list of ids into a host-side batch. The [`Loader`] turns that into a stream
//! of batches prepared on a background thread (collation itself is parallel with rayon), so the
//! training step never waits on data. Batch `b` of the stream is a pure function of
//! `(seed, b)`: the same recipe and seed give the same batches whatever the thread timing, and a
//! resumed run can restart the stream at any batch. That holds for training-time augmentation
//! too: the loader hands each training batch the seed [`batch_seed`]`(seed, b)`
//! ([`Examples::collate_train`]), and the image pipeline ([`vision`]) draws every random choice
//! from generators derived from it.

pub mod bpe;
pub mod codec;
pub mod fashion_mnist;
pub mod idx;
pub mod image_folder;
pub mod text;
pub mod text_classification;
pub mod vision;

/// Kept here for callers that hash data files (`crate::fs` has it).
pub use crate::fs::sha256_file;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// A batch in host memory, ready to move to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub inputs: HostTensor,
    /// Class ids (classification) or next-token ids (language models).
    pub targets: Vec<u32>,
    pub target_shape: Vec<usize>,
    /// Mixup/CutMix: the inputs are a blend of two examples, so the loss is
    /// `λ·CE(targets) + (1 − λ)·CE(mix.targets)`. `None` for unmixed batches.
    pub mix: Option<Mix>,
}

/// The second targets of a mixed batch (same shape as `targets`) and the weight `λ` of the first.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub targets: Vec<u32>,
    pub lambda: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    F32(Vec<f32>, Vec<usize>),
    U32(Vec<u32>, Vec<usize>),
}

/// A batch on a device.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    /// Mixed batches: the partner targets (shaped like `targets`) and `λ`, the weight of
    /// `targets` in the loss (see [`HostBatch::mix`]).
    pub mix: Option<(Tensor, f64)>,
}

impl HostBatch {
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Batch> {
        let inputs = match &self.inputs {
            HostTensor::F32(v, s) => Tensor::from_slice(v, s.as_slice(), device)?,
            HostTensor::U32(v, s) => Tensor::from_slice(v, s.as_slice(), device)?,
        };
        let targets = Tensor::from_slice(&self.targets, self.target_shape.as_slice(), device)?;
        let mix = match &self.mix {
            Some(m) => Some((
                Tensor::from_slice(&m.targets, self.target_shape.as_slice(), device)?,
                m.lambda as f64,
            )),
            None => None,
        };
        Ok(Batch {
            inputs,
            targets,
            mix,
        })
    }

    /// Examples `start..end` of the batch (a data-parallel rank's share).
    pub fn rows(&self, start: usize, end: usize) -> HostBatch {
        fn cut<T: Clone>(
            v: &[T],
            shape: &[usize],
            start: usize,
            end: usize,
        ) -> (Vec<T>, Vec<usize>) {
            let per: usize = shape[1..].iter().product();
            let mut s = shape.to_vec();
            s[0] = end - start;
            (v[start * per..end * per].to_vec(), s)
        }
        let inputs = match &self.inputs {
            HostTensor::F32(v, s) => {
                let (v, s) = cut(v, s, start, end);
                HostTensor::F32(v, s)
            }
            HostTensor::U32(v, s) => {
                let (v, s) = cut(v, s, start, end);
                HostTensor::U32(v, s)
            }
        };
        let (targets, target_shape) = cut(&self.targets, &self.target_shape, start, end);
        let mix = self.mix.as_ref().map(|m| Mix {
            targets: cut(&m.targets, &self.target_shape, start, end).0,
            lambda: m.lambda,
        });
        HostBatch {
            inputs,
            targets,
            target_shape,
            mix,
        }
    }

    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.target_shape.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One split of a data set.
pub trait Examples: Send + Sync {
    /// Ids visited by one training epoch, in order (`rng` is seeded per epoch).
    fn train_order(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> Vec<usize>;
    /// Ids visited by one evaluation pass, in order; every example exactly once.
    fn eval_order(&self) -> Vec<usize>;
    /// Reorders the examples one evaluation pass has chosen (a prefix of [`eval_order`]) before
    /// they are cut into batches, so that batches waste less on padding; the metrics do not
    /// depend on the order. By default they stay as they are.
    ///
    /// [`eval_order`]: Examples::eval_order
    fn group_for_eval(&self, order: &mut [usize]) {
        let _ = order;
    }
    /// Builds a batch from example ids, as evaluation sees them (never augmented).
    fn collate(&self, ids: &[usize]) -> HostBatch;
    /// Builds a training batch: with training-time augmentation where the data set has it,
    /// every random choice drawn from `seed` (the [`Loader`] passes [`batch_seed`]), so the batch
    /// is a pure function of `(ids, seed)`.
    fn collate_train(&self, ids: &[usize], seed: u64) -> HostBatch {
        let _ = seed;
        self.collate(ids)
    }
    /// Items a batch of `n` examples counts for throughput (examples, or tokens).
    fn items_per_example(&self) -> usize {
        1
    }
}

/// The splits a task trains and evaluates on, plus what the run directory records about them.
pub struct DataSplits {
    pub train: Arc<dyn Examples>,
    pub val: Arc<dyn Examples>,
    /// Held-out split reported at the end of training, when the data set has one.
    pub test: Option<Arc<dyn Examples>>,
    /// Number of classes (classification) or vocabulary size (language models).
    pub num_classes: usize,
    /// `(path, sha256)` of every file read.
    pub files: Vec<(String, String)>,
    /// Characters of a character-level vocabulary, in id order.
    pub vocab: Option<Vec<char>>,
    /// The `tokenizer.json` of a BPE or text-classification data set.
    pub tokenizer: Option<std::path::PathBuf>,
    /// Class names in id order (classification).
    pub labels: Option<Vec<String>>,
    /// Image data sets: the input geometry and normalization (for `preprocessor_config.json`).
    pub image: Option<ImageInfo>,
}

/// What an image model's inputs are: `channels × height × width`, each pixel scaled to [0, 1]
/// then normalized per channel as `(x − mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// The augmentation seed of global training batch `batch` of a run seeded `seed`.
pub fn batch_seed(seed: u64, batch: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"kiln/train-batch");
    h.update(seed.to_le_bytes());
    h.update(batch.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Batches per training epoch (the last incomplete batch is dropped so shapes stay fixed).
pub fn batches_per_epoch(examples: &dyn Examples, batch_size: usize, seed: u64) -> usize {
    let order = examples.train_order(&mut epoch_rng(seed, 0), false);
    order.len() / batch_size
}

fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    rng
}

/// The training batch stream. Iterates forever: batch `b` belongs to epoch
/// `b / batches_per_epoch`; the consumer decides when to stop.
pub struct Loader {
    rx: Receiver<(u64, HostBatch)>,
    pub batches_per_epoch: usize,
}

impl Loader {
    /// Starts the stream at global batch index `start`. Fails when the training split holds
    /// less than one batch.
    pub fn new(
        examples: Arc<dyn Examples>,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        prefetch: usize,
        start: u64,
    ) -> anyhow::Result<Self> {
        let per_epoch = batches_per_epoch(examples.as_ref(), batch_size, seed);
        if per_epoch == 0 {
            let n = examples.train_order(&mut epoch_rng(seed, 0), false).len();
            anyhow::bail!(
                "data.batch_size = {batch_size} is larger than the training split ({n} \
                 examples): lower data.batch_size to at most {n}, or give the run more data"
            );
        }
        let (tx, rx) = sync_channel(prefetch);
        std::thread::Builder::new()
            .name("kiln-data".into())
            .spawn(move || {
                let mut b = start;
                loop {
                    let epoch = b / per_epoch as u64;
                    let order = examples.train_order(&mut epoch_rng(seed, epoch), shuffle);
                    let first = (b % per_epoch as u64) as usize;
                    for i in first..per_epoch {
                        let ids = &order[i * batch_size..(i + 1) * batch_size];
                        let batch = examples.collate_train(ids, batch_seed(seed, b));
                        if tx.send((epoch, batch)).is_err() {
                            return; // the trainer is done
                        }
                        b += 1;
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start the data thread: {e}"))?;
        Ok(Loader {
            rx,
            batches_per_epoch: per_epoch,
        })
    }

    /// The next batch and the epoch it belongs to.
    pub fn next_batch(&self) -> anyhow::Result<(u64, HostBatch)> {
        self.rx.recv().map_err(|_| {
            anyhow::anyhow!("the data thread stopped: a batch could not be prepared (see above)")
        })
    }
}

/// Batches of an evaluation pass, in order (after [`Examples::group_for_eval`]); the last batch
/// may be smaller.
pub fn eval_batches(
    examples: &dyn Examples,
    batch_size: usize,
    max_batches: Option<usize>,
) -> impl Iterator<Item = HostBatch> + '_ {
    eval_shard(examples, batch_size, max_batches, 0, 1)
}

/// The batches of an evaluation pass that rank `rank` of `ranks` evaluates: every `ranks`-th,
/// from the `rank`-th on (only those are collated).
pub fn eval_shard(
    examples: &dyn Examples,
    batch_size: usize,
    max_batches: Option<usize>,
    rank: usize,
    ranks: usize,
) -> impl Iterator<Item = HostBatch> + '_ {
    let mut order = examples.eval_order();
    let n = order.len().div_ceil(batch_size);
    let n = max_batches.map_or(n, |m| m.min(n));
    // Which examples a capped pass sees is settled first; only then are they grouped.
    order.truncate(n * batch_size);
    examples.group_for_eval(&mut order);
    (rank..n).step_by(ranks.max(1)).map(move |i| {
        let end = ((i + 1) * batch_size).min(order.len());
        examples.collate(&order[i * batch_size..end])
    })
}

/// Loads the data set a recipe names.
pub fn load(recipe: &crate::Recipe) -> anyhow::Result<DataSplits> {
    use crate::recipe::DataSource;
    let d = &recipe.data;
    let name = d.dataset().name();
    // The tokenizer: the recipe's, else the pretrained model's.
    let tokenizer = |t: &Option<std::path::PathBuf>| -> anyhow::Result<std::path::PathBuf> {
        match (t, &recipe.init_from) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(from)) => Ok(crate::hub::resolve(from)?.join("tokenizer.json")),
            (None, None) => anyhow::bail!(
                "data.tokenizer is required for {:?} data without init_from: set it to a \
                 tokenizer.json, e.g. data/gpt2-tokenizer/tokenizer.json",
                d.dataset()
            ),
        }
    };
    let path = |what: &str| {
        d.path
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("data.path is required for {name}: {what}"))
    };
    let text_file = "set it to a UTF-8 text file";
    match &d.source {
        DataSource::FashionMnist(f) => {
            fashion_mnist::load_with(d.path.as_deref(), f.val_size, &vision::ImageOptions::of(d))
        }
        DataSource::ImageFolder(f) => {
            let [height, width] = f.image_size;
            image_folder::load(&image_folder::Spec {
                root: path("the folder holding train/<class>/*.png (or <class>/*.png)")?,
                height,
                width,
                channels: f.channels.unwrap_or(3),
                val_size: f.val_size,
                seed: recipe.seed,
                options: vision::ImageOptions::of(d),
            })
        }
        DataSource::TextChar(t) => text::load(path(text_file)?, t.seq_len, t.val_fraction),
        DataSource::TextBpe(t) => {
            let file = path(text_file)?;
            let tokenizer = tokenizer(&t.tokenizer)?;
            let cache = t.cache_dir.clone().unwrap_or_else(bpe::default_cache_dir);
            bpe::load(file, &tokenizer, t.seq_len, t.val_fraction, &cache)
        }
        DataSource::TextClassification(t) => {
            let folder = path("the folder of the TSV/CSV files")?;
            let labels = match &t.labels {
                None => None,
                Some(crate::recipe::Labels::List(l)) => Some(l.clone()),
                Some(crate::recipe::Labels::File(f)) => {
                    let p = folder.join(f);
                    let text = std::fs::read_to_string(&p).map_err(|e| {
                        anyhow::anyhow!("cannot read data.labels file {}: {e}", p.display())
                    })?;
                    Some(serde_json::from_str(&text).map_err(|e| {
                        anyhow::anyhow!("{} is not a JSON list of label names: {e}", p.display())
                    })?)
                }
            };
            let tokenizer = tokenizer(&t.tokenizer)?;
            let spec = text_classification::Spec {
                folder,
                train: &t.train,
                val: t.val.as_deref(),
                test: t.test.as_deref(),
                val_size: t.val_size,
                text_column: &t.text_column,
                label_column: &t.label_column,
                labels,
                max_length: t.max_length,
                bucket_by_length: t.bucket_by_length,
                tokenizer: &tokenizer,
                seed: recipe.seed,
            };
            text_classification::load(&spec, d.batch_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_batch_are_its_examples() {
        let b = HostBatch {
            inputs: HostTensor::F32((0..12).map(|x| x as f32).collect(), vec![3, 2, 2]),
            targets: vec![7, 8, 9],
            target_shape: vec![3],
            mix: Some(Mix {
                targets: vec![1, 2, 3],
                lambda: 0.25,
            }),
        };
        let r = b.rows(1, 3);
        assert_eq!(
            r.inputs,
            HostTensor::F32((4..12).map(|x| x as f32).collect(), vec![2, 2, 2])
        );
        assert_eq!((r.targets, r.target_shape), (vec![8, 9], vec![2]));
        assert_eq!(r.mix.unwrap().targets, vec![2, 3]);
        assert_eq!(b.rows(0, 3), b);
    }

    /// Ten examples whose "image" is the id itself.
    struct Ids(usize);
    impl Examples for Ids {
        fn train_order(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> Vec<usize> {
            let mut v: Vec<usize> = (0..self.0).collect();
            if shuffle {
                rand::seq::SliceRandom::shuffle(v.as_mut_slice(), rng);
            }
            v
        }
        fn eval_order(&self) -> Vec<usize> {
            (0..self.0).collect()
        }
        fn collate(&self, ids: &[usize]) -> HostBatch {
            HostBatch {
                inputs: HostTensor::F32(ids.iter().map(|&i| i as f32).collect(), vec![ids.len()]),
                targets: ids.iter().map(|&i| i as u32).collect(),
                target_shape: vec![ids.len()],
                mix: None,
            }
        }
    }

    fn take(l: &Loader, n: usize) -> Vec<(u64, Vec<u32>)> {
        (0..n)
            .map(|_| {
                let (e, b) = l.next_batch().unwrap();
                (e, b.targets)
            })
            .collect()
    }

    #[test]
    fn epochs_are_permutations_and_reproducible() {
        let ex: Arc<dyn Examples> = Arc::new(Ids(10));
        let a = take(&Loader::new(ex.clone(), 3, true, 7, 2, 0).unwrap(), 6);
        let b = take(&Loader::new(ex.clone(), 3, true, 7, 2, 0).unwrap(), 6);
        assert_eq!(a, b, "same seed, same batches");
        // 10 examples / batch 3 → 3 batches per epoch, the 10th example dropped.
        assert_eq!(
            a.iter().map(|x| x.0).collect::<Vec<_>>(),
            [0, 0, 0, 1, 1, 1]
        );
        let mut first: Vec<u32> = a[..3].iter().flat_map(|x| x.1.clone()).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 9, "no example repeats within an epoch");
        assert_ne!(a[..3], a[3..6], "each epoch is shuffled anew");
        let c = take(&Loader::new(ex.clone(), 3, true, 8, 2, 0).unwrap(), 3);
        assert_ne!(a[..3], c[..], "another seed, another order");
    }

    #[test]
    fn stream_restarts_at_any_batch() {
        let ex: Arc<dyn Examples> = Arc::new(Ids(10));
        let all = take(&Loader::new(ex.clone(), 3, true, 7, 2, 0).unwrap(), 7);
        let tail = take(&Loader::new(ex, 3, true, 7, 2, 4).unwrap(), 3);
        assert_eq!(all[4..], tail[..]);
    }

    #[test]
    fn eval_visits_every_example_once() {
        let ex = Ids(10);
        let got: Vec<u32> = eval_batches(&ex, 4, None).flat_map(|b| b.targets).collect();
        assert_eq!(got, (0..10).collect::<Vec<u32>>());
        assert_eq!(eval_batches(&ex, 4, Some(2)).count(), 2);
    }
}
