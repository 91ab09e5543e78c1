//! Fashion-MNIST (Zalando, MIT): 60,000 training and 10,000 test 28×28 grey images in 10
//! classes, read from IDX files as installed by Debian's `dataset-fashion-mnist`.

use super::idx::read_idx;
use super::{sha256_file, DataSplits, Examples, HostBatch, HostTensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_PATH: &str = "/usr/share/datasets/fashion-mnist";
pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
// Per-pixel mean and standard deviation of the training images (scaled to [0, 1]).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;

/// Images (one byte per pixel) with their labels.
pub struct ImageSet {
    pub images: Arc<Vec<u8>>,
    pub labels: Arc<Vec<u8>>,
    pub rows: usize,
    pub cols: usize,
    /// Which examples of `images` belong to this split.
    pub ids: Vec<usize>,
}

impl Examples for ImageSet {
    fn train_order(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        if shuffle {
            order.shuffle(rng);
        }
        order
    }

    fn eval_order(&self) -> Vec<usize> {
        (0..self.ids.len()).collect()
    }

    fn collate(&self, ids: &[usize]) -> HostBatch {
        let px = self.rows * self.cols;
        let mut x = vec![0f32; ids.len() * px];
        x.par_chunks_mut(px).zip(ids).for_each(|(dst, &i)| {
            let j = self.ids[i];
            for (d, &s) in dst.iter_mut().zip(&self.images[j * px..(j + 1) * px]) {
                *d = (s as f32 / 255.0 - MEAN) / STD;
            }
        });
        HostBatch {
            inputs: HostTensor::F32(x, vec![ids.len(), 1, self.rows, self.cols]),
            targets: ids
                .iter()
                .map(|&i| self.labels[self.ids[i]] as u32)
                .collect(),
            target_shape: vec![ids.len()],
        }
    }
}

fn find(dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "Fashion-MNIST file `{stem}(.gz)` not found in {}. Install the data set with \
         `apt-get install -y dataset-fashion-mnist` (it goes to {DEFAULT_PATH}), or point \
         data.path at a folder holding the four IDX files",
        dir.display()
    )
}

fn load_pair(
    dir: &Path,
    images: &str,
    labels: &str,
    files: &mut Vec<(String, String)>,
) -> anyhow::Result<(Vec<u8>, Vec<u8>, usize, usize)> {
    let ip = find(dir, images)?;
    let lp = find(dir, labels)?;
    let im = read_idx(&ip)?;
    let lb = read_idx(&lp)?;
    anyhow::ensure!(
        im.dims.len() == 3 && lb.dims.len() == 1 && im.dims[0] == lb.dims[0],
        "{} and {} do not fit together: image dims {:?}, label dims {:?}",
        ip.display(),
        lp.display(),
        im.dims,
        lb.dims
    );
    if let Some(bad) = lb.data.iter().find(|&&l| l as usize >= CLASSES.len()) {
        anyhow::bail!("{}: label {bad} is outside 0..10", lp.display());
    }
    for p in [&ip, &lp] {
        files.push((p.display().to_string(), sha256_file(p)?));
    }
    Ok((im.data, lb.data, im.dims[1], im.dims[2]))
}

/// Loads the train split (minus the last `val_size` examples, held out for validation), the
/// validation split, and the test split.
pub fn load(dir: Option<&Path>, val_size: usize) -> anyhow::Result<DataSplits> {
    let dir = dir.unwrap_or(Path::new(DEFAULT_PATH));
    let mut files = Vec::new();
    let (tr_x, tr_y, rows, cols) = load_pair(
        dir,
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        &mut files,
    )?;
    let (te_x, te_y, te_rows, te_cols) = load_pair(
        dir,
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        &mut files,
    )?;
    anyhow::ensure!(
        (rows, cols) == (te_rows, te_cols),
        "train images are {rows}×{cols} but test images {te_rows}×{te_cols}"
    );
    let n = tr_y.len();
    anyhow::ensure!(
        val_size < n,
        "data.val_size = {val_size} leaves no training examples (the train split has {n})"
    );
    let (tr_x, tr_y) = (Arc::new(tr_x), Arc::new(tr_y));
    let split = |ids: Vec<usize>| ImageSet {
        images: tr_x.clone(),
        labels: tr_y.clone(),
        rows,
        cols,
        ids,
    };
    let train = split((0..n - val_size).collect());
    let test = ImageSet {
        ids: (0..te_y.len()).collect(),
        images: Arc::new(te_x),
        labels: Arc::new(te_y),
        rows,
        cols,
    };
    let test: Arc<dyn Examples> = Arc::new(test);
    // With no held-out examples, validation runs on the test split.
    let val: Arc<dyn Examples> = if val_size > 0 {
        Arc::new(split((n - val_size..n).collect()))
    } else {
        test.clone()
    };
    Ok(DataSplits {
        train: Arc::new(train),
        val,
        test: Some(test),
        num_classes: CLASSES.len(),
        files,
        vocab: None,
        tokenizer: None,
        labels: Some(CLASSES.iter().map(|s| s.to_string()).collect()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::idx::encode_idx;

    /// Writes a tiny Fashion-MNIST-shaped data set: `n` train and `m` test 4×4 images whose
    /// pixels all equal the label × 20.
    pub fn write_fixture(dir: &Path, n: usize, m: usize) {
        let write = |name: &str, count: usize| {
            let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            let images: Vec<u8> = labels.iter().flat_map(|&l| [l * 20; 16]).collect();
            std::fs::write(
                dir.join(format!("{name}-images-idx3-ubyte")),
                encode_idx(&[count, 4, 4], &images),
            )
            .unwrap();
            std::fs::write(
                dir.join(format!("{name}-labels-idx1-ubyte")),
                encode_idx(&[count], &labels),
            )
            .unwrap();
        };
        write("train", n);
        write("t10k", m);
    }

    #[test]
    fn loads_splits_and_normalizes() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), 30, 12);
        let d = load(Some(dir.path()), 5).unwrap();
        assert_eq!(d.num_classes, 10);
        assert_eq!(d.files.len(), 4);
        assert_eq!(d.train.eval_order().len(), 25);
        assert_eq!(d.val.eval_order().len(), 5);
        assert_eq!(d.test.as_ref().unwrap().eval_order().len(), 12);
        // Validation is the tail of the train file: examples 25..30, labels 5..9.
        let b = d.val.collate(&[0, 4]);
        assert_eq!(b.targets, vec![5, 9]);
        let HostTensor::F32(x, shape) = b.inputs else {
            panic!("images are f32")
        };
        assert_eq!(shape, vec![2, 1, 4, 4]);
        let want = (5.0 * 20.0 / 255.0 - MEAN) / STD;
        assert!((x[0] - want).abs() < 1e-6);
    }

    #[test]
    fn missing_data_says_how_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(Some(dir.path()), 0).err().unwrap().to_string();
        assert!(
            err.contains("apt-get install -y dataset-fashion-mnist"),
            "{err}"
        );
    }
}
