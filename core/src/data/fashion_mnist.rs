//! Fashion-MNIST (Zalando, MIT): 60,000 training and 10,000 test 28×28 grey images in 10
//! classes, read from IDX files as installed by Debian's `dataset-fashion-mnist`.

use super::idx::{encode_idx, read_idx};
use super::vision::{ImageOptions, ImageSet};
use super::{DataSplits, Examples, ImageInfo};
use crate::fs::sha256_file;
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
/// Per-pixel mean and standard deviation of the training images (scaled to [0, 1]): the
/// default normalization.
pub const MEAN: f32 = 0.2860;
pub const STD: f32 = 0.3530;

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
/// validation split, and the test split, normalized with [`MEAN`] and [`STD`].
pub fn load(dir: Option<&Path>, val_size: usize) -> anyhow::Result<DataSplits> {
    load_with(dir, val_size, &ImageOptions::default())
}

/// [`load`] with the recipe's normalization and training-time augmentation.
pub fn load_with(
    dir: Option<&Path>,
    val_size: usize,
    options: &ImageOptions,
) -> anyhow::Result<DataSplits> {
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
    let labels = |y: Vec<u8>| Arc::new(y.into_iter().map(u32::from).collect::<Vec<u32>>());
    let normalizer = Arc::new(options.normalizer((vec![MEAN], vec![STD])));
    anyhow::ensure!(
        normalizer.channels() == 1,
        "data.normalize needs one mean and one std for Fashion-MNIST's grey images"
    );
    let shape = [1, rows, cols];
    let (tr_x, tr_y) = (Arc::new(tr_x), labels(tr_y));
    let split = |ids: Vec<usize>, augment| ImageSet {
        pixels: tr_x.clone(),
        labels: tr_y.clone(),
        shape,
        ids,
        normalizer: normalizer.clone(),
        augment,
    };
    let train = split((0..n - val_size).collect(), options.augment.clone());
    let test = ImageSet {
        ids: (0..te_y.len()).collect(),
        pixels: Arc::new(te_x),
        labels: labels(te_y),
        shape,
        normalizer: normalizer.clone(),
        augment: None,
    };
    let test: Arc<dyn Examples> = Arc::new(test);
    // With no held-out examples, validation runs on the test split.
    let val: Arc<dyn Examples> = if val_size > 0 {
        Arc::new(split((n - val_size..n).collect(), None))
    } else {
        test.clone()
    };
    Ok(DataSplits {
        image: Some(ImageInfo {
            channels: 1,
            height: rows,
            width: cols,
            mean: normalizer.mean.clone(),
            std: normalizer.std.clone(),
        }),
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

/// Writes one split in Fashion-MNIST's file layout (`{split}-images-idx3-ubyte` and
/// `{split}-labels-idx1-ubyte`, uncompressed): one `h`×`w` image of bytes per label.
pub fn write_split(
    dir: &Path,
    split: &str,
    images: &[u8],
    labels: &[u8],
    (h, w): (usize, usize),
) -> std::io::Result<()> {
    let n = labels.len();
    if images.len() != n * h * w {
        let msg = format!("{} image bytes are not {n} images of {h}×{w}", images.len());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    }
    let file = |kind: &str, dims: &str| dir.join(format!("{split}-{kind}-idx{dims}-ubyte"));
    std::fs::write(file("images", "3"), encode_idx(&[n, h, w], images))?;
    std::fs::write(file("labels", "1"), encode_idx(&[n], labels))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::HostTensor;

    /// Writes a tiny Fashion-MNIST-shaped data set: `n` train and `m` test 4×4 images whose
    /// pixels all equal the label × 20.
    pub fn write_fixture(dir: &Path, n: usize, m: usize) {
        let write = |name: &str, count: usize| {
            let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            let images: Vec<u8> = labels.iter().flat_map(|&l| [l * 20; 16]).collect();
            write_split(dir, name, &images, &labels, (4, 4)).unwrap();
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
    fn goes_through_the_shared_image_pipeline() {
        use crate::data::batch_seed;
        use crate::recipe::{AugmentConfig, NormalizeConfig};
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), 30, 12);
        // Without augmentation, training batches are the evaluation batches, bit for bit equal
        // to the formula Fashion-MNIST always used.
        let d = load(Some(dir.path()), 5).unwrap();
        let ids: Vec<usize> = (0..20).collect();
        let plain = d.train.collate(&ids);
        assert_eq!(d.train.collate_train(&ids, batch_seed(1, 0)), plain);
        assert!(plain.mix.is_none());
        let HostTensor::F32(x, _) = &plain.inputs else {
            panic!("images are f32")
        };
        for (k, img) in x.chunks(16).enumerate() {
            let want = ((k % 10) as f32 * 20.0 / 255.0 - MEAN) / STD;
            assert!(img.iter().all(|v| v.to_bits() == want.to_bits()));
        }
        let info = d.image.unwrap();
        assert_eq!((info.channels, info.height, info.width), (1, 4, 4));
        assert_eq!((info.mean, info.std), (vec![MEAN], vec![STD]));

        // With it: the training split only.
        let options = ImageOptions {
            normalize: Some(NormalizeConfig {
                mean: vec![0.5],
                std: vec![0.5],
            }),
            augment: Some(AugmentConfig {
                cutmix_alpha: 1.0,
                ..AugmentConfig::default()
            }),
        };
        let d = load_with(Some(dir.path()), 5, &options).unwrap();
        let b = d.train.collate_train(&ids, batch_seed(1, 0));
        assert!(b.mix.is_some());
        let HostTensor::F32(x, _) = d.train.collate(&[1]).inputs else {
            panic!("images are f32")
        };
        assert_eq!(x[0], (20.0 / 255.0 - 0.5) / 0.5);
        let val: Vec<usize> = d.val.eval_order();
        assert_eq!(d.val.collate_train(&val, 3), d.val.collate(&val));
        assert_eq!(d.image.unwrap().mean, vec![0.5]);
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
