//! Images in class folders (`dataset = "image-folder"`), PNG or JPEG.
//!
//! Two layouts under `data.path` (the root):
//! - `root/train/<class>/…`, with optional `root/val/<class>/…` and `root/test/<class>/…`
//!   (chosen whenever `root/train` is a folder);
//! - `root/<class>/…` directly: everything is training data.
//!
//! Class names are the sorted names of the training class folders (ids in that order); `val/`
//! and `test/` may lack classes but not add any. Images are the `.png`, `.jpg` and `.jpeg` files
//! (any case) anywhere below a class folder; hidden files and folders (`.name`) are skipped.
//! Without a `val/` folder, `data.val_size` training images are held out for validation: a
//! seeded, stratified split (each class gives its proportional share, largest remainders
//! rounding up, the images picked at random with the recipe seed). With `val_size = 0` and no
//! `val/`, validation runs on `test/`.
//!
//! Every image is decoded once, in parallel, converted to grey (`channels = 1`) or RGB
//! (`channels = 3`; alpha is dropped), resized to `image_size = [H, W]` (bilinear, skipped when
//! it already has that size) and kept in memory as bytes: `N·C·H·W` bytes for `N` images.
//! Normalization defaults to the per-channel mean and standard deviation of the training
//! images (after the hold-out).
//!
//! The run records the folder as one `(root, sha256)` entry in `DataSplits::files`: the sha256
//! of the `sha256sum`-style listing `"<file sha256>  <path relative to root>\n"` of every image
//! read, sorted by path (byte order). In a shell, from the root:
//! `find . -type f -not -path '*/.*' \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \)
//! -printf '%P\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum` (for the layout with
//! split folders, the images in `train/`, `val/` and `test/` only).

use super::vision::{channel_stats, ImageOptions, ImageSet};
use super::{DataSplits, Examples, ImageInfo};
use crate::fs::hex;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `[data]` says about an image folder.
pub struct Spec<'a> {
    pub root: &'a Path,
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Training images held out for validation when there is no `val/` folder.
    pub val_size: usize,
    pub seed: u64,
    pub options: ImageOptions,
}

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if !hidden(&e.file_name()) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The class folders of `dir`, sorted by name.
fn class_folders(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, p)
        })
        .collect())
}

/// The images anywhere below `dir`, sorted by path.
pub fn images_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in entries(dir)? {
        if p.is_dir() {
            images_below(&p, out)?;
        } else if p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Adds the images of a split folder's class folders to `files`, with their class ids.
/// `classes`: the training classes, which a `val/` or `test/` folder must not go beyond.
fn add_split(
    dir: &Path,
    classes: &[String],
    train_dir: &Path,
    files: &mut Vec<(PathBuf, u32)>,
) -> Result<usize> {
    let folders = class_folders(dir)?;
    if folders.is_empty() {
        bail!(
            "{} holds no class folders: put its images in {}/<class>/, or remove the folder",
            dir.display(),
            dir.display()
        );
    }
    let before = files.len();
    for (name, folder) in folders {
        let Some(label) = classes.iter().position(|c| *c == name) else {
            bail!(
                "{}: class `{name}` is not among the training classes in {} ({}); every class in \
                 val/ and test/ needs a folder in train/ too",
                folder.display(),
                train_dir.display(),
                classes.join(", ")
            );
        };
        let mut images = Vec::new();
        images_below(&folder, &mut images)?;
        if images.is_empty() {
            bail!(
                "class folder {} holds no images (.png, .jpg or .jpeg): add some, or remove the \
                 folder",
                folder.display()
            );
        }
        files.extend(images.into_iter().map(|p| (p, label as u32)));
    }
    Ok(files.len() - before)
}

/// Reads, hashes and decodes one image into `dst` (`C×H×W` bytes); returns the file's sha256.
pub fn decode(path: &Path, [c, h, w]: [usize; 3], dst: &mut [u8]) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let hash = hex(&Sha256::digest(&bytes));
    let img = image::load_from_memory(&bytes).map_err(|e| {
        anyhow!(
            "cannot decode image {}: {e}. The file is corrupt or not a PNG/JPEG: re-save it as \
             PNG or JPEG, or delete it",
            path.display()
        )
    })?;
    use image::imageops::{resize, FilterType};
    let size = (w as u32, h as u32);
    if c == 1 {
        let mut g = img.to_luma8();
        if g.dimensions() != size {
            g = resize(&g, size.0, size.1, FilterType::Triangle);
        }
        dst.copy_from_slice(g.as_raw());
    } else {
        let mut g = img.to_rgb8();
        if g.dimensions() != size {
            g = resize(&g, size.0, size.1, FilterType::Triangle);
        }
        let plane = h * w;
        for (i, p) in g.as_raw().chunks_exact(3).enumerate() {
            for (ch, &v) in p.iter().enumerate() {
                dst[ch * plane + i] = v;
            }
        }
    }
    Ok(hash)
}

/// Holds out `val_size` of the training images (`labels[i]` is image `i`'s class): every class
/// gives `val_size · n_c / n` of its images, the classes with the largest remainders one more,
/// picked at random with `seed`. Returns `(train, val)` ids, each sorted.
pub fn stratified_split(
    labels: &[u32],
    num_classes: usize,
    val_size: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let n = labels.len();
    assert!(val_size < n, "val_size < the number of images");
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let share = |c: usize| (val_size as u128 * by_class[c].len() as u128, n as u128);
    let mut quota: Vec<usize> = (0..num_classes)
        .map(|c| {
            let (a, b) = share(c);
            (a / b) as usize
        })
        .collect();
    let mut left = val_size - quota.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..num_classes).collect();
    by_remainder.sort_by_key(|&c| {
        let (a, b) = share(c);
        std::cmp::Reverse(a % b)
    });
    for c in by_remainder {
        if left == 0 {
            break;
        }
        quota[c] += 1;
        left -= 1;
    }
    let mut rng = crate::rng::rng_for(seed, "image-folder/val-split");
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (ids, q) in by_class.iter_mut().zip(quota) {
        ids.shuffle(&mut rng);
        val.extend_from_slice(&ids[..q]);
        train.extend_from_slice(&ids[q..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Loads an image folder.
pub fn load(spec: &Spec) -> Result<DataSplits> {
    let root = spec.root;
    let (c, h, w) = (spec.channels, spec.height, spec.width);
    anyhow::ensure!(c == 1 || c == 3, "data.channels must be 1 or 3, got {c}");
    anyhow::ensure!(h > 0 && w > 0, "data.image_size must be at least [1, 1]");
    if !root.is_dir() {
        bail!(
            "data.path {} is not a folder: image-folder reads <path>/train/<class>/*.png (with \
             optional val/ and test/) or <path>/<class>/*.png",
            root.display()
        );
    }
    let split_dir = |name: &str| Some(root.join(name)).filter(|p| p.is_dir());
    let (train_dir, val_dir, test_dir) = match split_dir("train") {
        Some(t) => (t, split_dir("val"), split_dir("test")),
        None => (root.to_path_buf(), None, None),
    };
    let classes: Vec<String> = class_folders(&train_dir)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    match classes.len() {
        0 => bail!(
            "no class folders in {}: image-folder expects {}/train/<class>/*.png (with optional \
             val/ and test/) or {}/<class>/*.png, one folder per class",
            root.display(),
            root.display(),
            root.display()
        ),
        1 => bail!(
            "{} has one class folder (`{}`): a classifier needs two or more",
            train_dir.display(),
            classes[0]
        ),
        _ => {}
    }
    if val_dir.is_some() && spec.val_size > 0 {
        bail!(
            "data.val_size = {} holds out training images when there is no val/ folder, but {} \
             has one: remove data.val_size",
            spec.val_size,
            root.display()
        );
    }
    let mut files = Vec::new();
    let n_train = add_split(&train_dir, &classes, &train_dir, &mut files)?;
    let n_val = match &val_dir {
        Some(d) => add_split(d, &classes, &train_dir, &mut files)?,
        None => 0,
    };
    let n_test = match &test_dir {
        Some(d) => add_split(d, &classes, &train_dir, &mut files)?,
        None => 0,
    };

    let shape = [c, h, w];
    let px = c * h * w;
    let mut pixels = vec![0u8; files.len() * px];
    let hashes: Vec<Result<String>> = pixels
        .par_chunks_mut(px)
        .zip(&files)
        .map(|(dst, (path, _))| decode(path, shape, dst))
        .collect();
    let mut listing: Vec<(String, String)> = Vec::with_capacity(files.len());
    for ((path, _), hash) in files.iter().zip(hashes) {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        listing.push((rel, hash?));
    }
    listing.sort();
    let mut digest = Sha256::new();
    for (rel, hash) in &listing {
        digest.update(format!("{hash}  {rel}\n").as_bytes());
    }
    let folder_hash = hex(&digest.finalize());

    let labels: Vec<u32> = files.iter().map(|(_, l)| *l).collect();
    let (train_ids, held_out) = if val_dir.is_none() && spec.val_size > 0 {
        anyhow::ensure!(
            spec.val_size < n_train,
            "data.val_size = {} leaves no training images (the training split has {n_train})",
            spec.val_size
        );
        let (t, v) = stratified_split(&labels[..n_train], classes.len(), spec.val_size, spec.seed);
        (t, Some(v))
    } else {
        ((0..n_train).collect(), None)
    };
    let (mean, std) = match &spec.options.normalize {
        Some(_) => (vec![], vec![]),
        None => channel_stats(&pixels, shape, &train_ids),
    };
    let normalizer = Arc::new(spec.options.normalizer((mean, std)));
    anyhow::ensure!(
        normalizer.channels() == c,
        "data.normalize needs {c} values (one per channel) in mean and in std, got {}",
        normalizer.channels()
    );
    let (pixels, labels) = (Arc::new(pixels), Arc::new(labels));
    let split = |ids: Vec<usize>, augment| -> Arc<dyn Examples> {
        Arc::new(ImageSet {
            pixels: pixels.clone(),
            labels: labels.clone(),
            shape,
            ids,
            normalizer: normalizer.clone(),
            augment,
        })
    };
    let test = (n_test > 0).then(|| {
        let start = n_train + n_val;
        split((start..start + n_test).collect(), None)
    });
    let val = match (held_out, &val_dir, &test) {
        (Some(v), _, _) => split(v, None),
        (None, Some(_), _) => split((n_train..n_train + n_val).collect(), None),
        (None, None, Some(t)) => t.clone(),
        (None, None, None) => bail!(
            "no validation split: {} has no val/ folder and data.val_size is 0; set data.val_size \
             (training images held out for validation), or lay the images out as \
             train/<class>/ and val/<class>/ under it",
            root.display()
        ),
    };
    let train = split(train_ids, spec.options.augment.clone());
    Ok(DataSplits {
        train,
        val,
        test,
        num_classes: classes.len(),
        files: vec![(root.display().to_string(), folder_hash)],
        vocab: None,
        tokenizer: None,
        labels: Some(classes),
        image: Some(ImageInfo {
            channels: c,
            height: h,
            width: w,
            mean: normalizer.mean.clone(),
            std: normalizer.std.clone(),
        }),
    })
}

#[cfg(test)]
mod tests;
