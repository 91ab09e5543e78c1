use super::*;
use crate::data::{batch_seed, HostBatch, HostTensor};
use crate::recipe::{AugmentConfig, NormalizeConfig};
use image::{GrayImage, Luma, Rgb, RgbImage};

/// An `w×h` PNG of one colour.
fn png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(w, h, Rgb(rgb)).save(path).unwrap();
}

fn spec(root: &Path, hw: [usize; 2], channels: usize, val_size: usize) -> Spec<'_> {
    Spec {
        root,
        height: hw[0],
        width: hw[1],
        channels,
        val_size,
        seed: 1,
        options: ImageOptions::default(),
    }
}

fn load_err(s: &Spec) -> String {
    match load(s) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn pixels(b: &HostBatch) -> (&[f32], &[usize]) {
    match &b.inputs {
        HostTensor::F32(x, s) => (x, s),
        HostTensor::U32(..) => panic!("images are f32"),
    }
}

/// train/{cat,dog,emu}, val/{cat,dog}, test/{emu}: class k's images are all
/// `(10(k+1), 100, 200 − k)`, of assorted sizes.
fn split_fixture(root: &Path) {
    let colour = |k: u8| [10 * (k + 1), 100, 200 - k];
    for (k, class) in ["cat", "dog", "emu"].iter().enumerate() {
        for i in 0..3u32 {
            png(
                &root.join(format!("train/{class}/{i}.png")),
                3 + i,
                5 + 2 * i,
                colour(k as u8),
            );
        }
    }
    png(&root.join("val/cat/a.PNG"), 4, 4, colour(0));
    png(&root.join("val/dog/sub/b.png"), 9, 2, colour(1));
    png(&root.join("test/emu/c.png"), 1, 1, colour(2));
    // Not images, or hidden: skipped.
    std::fs::write(root.join("train/cat/notes.txt"), "x").unwrap();
    std::fs::create_dir_all(root.join("train/.cache")).unwrap();
    std::fs::write(root.join("train/dog/.hidden.png"), "not a png").unwrap();
}

#[test]
fn split_folders_give_classes_labels_and_resized_rgb() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let d = load(&spec(dir.path(), [4, 6], 3, 0)).unwrap();
    assert_eq!(d.labels.as_deref().unwrap(), ["cat", "dog", "emu"]);
    assert_eq!(d.num_classes, 3);
    assert_eq!(d.train.eval_order().len(), 9);
    assert_eq!(d.val.eval_order().len(), 2);
    let test = d.test.as_ref().unwrap();
    assert_eq!(test.eval_order().len(), 1);
    let info = d.image.clone().unwrap();
    assert_eq!((info.channels, info.height, info.width), (3, 4, 6));
    // Default normalization: the training images' statistics (three images per class).
    let want_mean = [20.0 / 255.0, 100.0 / 255.0, 199.0 / 255.0];
    for (m, w) in info.mean.iter().zip(want_mean) {
        assert!((m - w).abs() < 1e-6, "{:?}", info.mean);
    }
    assert!((info.std[0] - (200.0f32 / 3.0).sqrt() / 255.0).abs() < 1e-6);
    assert_eq!(info.std[1], 1.0, "a constant channel gets std 1");

    let b = d.train.collate(&[0, 3, 8]);
    assert_eq!(b.targets, vec![0, 1, 2]);
    let (x, shape) = pixels(&b);
    assert_eq!(shape, [3, 3, 4, 6]);
    // Channel-major: the second example's planes hold 20, 100 and 199 (normalized).
    let plane = 24;
    for (ch, raw) in [20.0f32, 100.0, 199.0].iter().enumerate() {
        let want = (raw / 255.0 - info.mean[ch]) / info.std[ch];
        let got = &x[(3 + ch) * plane..(4 + ch) * plane];
        assert!(got.iter().all(|v| (v - want).abs() < 1e-5), "{ch}: {got:?}");
    }
    assert_eq!(d.val.collate(&[0, 1]).targets, vec![0, 1]);
    assert_eq!(test.collate(&[0]).targets, vec![2]);
    // The folder is recorded as one entry.
    assert_eq!(d.files.len(), 1);
    assert_eq!(d.files[0].0, dir.path().display().to_string());
}

#[test]
fn resize_keeps_orientation_and_grey_averages_colour() {
    let dir = tempfile::tempdir().unwrap();
    // 8 wide, 4 high: the left half black, the right half white.
    let halves = GrayImage::from_fn(8, 4, |x, _| Luma([if x < 4 { 0 } else { 255 }]));
    for class in ["a", "b"] {
        let p = dir.path().join(class).join("x.png");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        halves.save(&p).unwrap();
        png(&dir.path().join(class).join("red.png"), 3, 3, [255, 0, 0]);
    }
    let mut s = spec(dir.path(), [2, 4], 1, 1);
    s.options.normalize = Some(NormalizeConfig {
        mean: vec![0.0],
        std: vec![1.0],
    });
    let d = load(&s).unwrap();
    let all = d.train.eval_order();
    let b = d.train.collate(&all);
    let (x, shape) = pixels(&b);
    assert_eq!(shape, [all.len(), 1, 2, 4]);
    let px: Vec<Vec<u8>> = x
        .chunks(8)
        .map(|c| c.iter().map(|v| (v * 255.0).round() as u8).collect())
        .collect();
    let halves_seen = px.iter().filter(|p| p[0] < 40 && p[3] > 215).count();
    let red = px.iter().filter(|p| p.iter().all(|&v| v == p[0])).count();
    assert_eq!(halves_seen + red, all.len(), "{px:?}");
    assert!(halves_seen >= 1 && red >= 1);
    // Grey of pure red: the luma of (255, 0, 0), well below 255 and above 0.
    let grey = px.iter().find(|p| p.iter().all(|&v| v == p[0])).unwrap()[0];
    assert!((40..90).contains(&grey), "{grey}");
    assert_eq!(d.image.unwrap().mean, vec![0.0]);
}

#[test]
fn grey_and_rgb_of_the_same_folder() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let grey = load(&spec(dir.path(), [2, 2], 1, 0)).unwrap();
    let rgb = load(&spec(dir.path(), [2, 2], 3, 0)).unwrap();
    let g = grey.train.collate(&[0, 1]);
    let c = rgb.train.collate(&[0, 1]);
    assert_eq!(pixels(&g).1, [2, 1, 2, 2]);
    assert_eq!(pixels(&c).1, [2, 3, 2, 2]);
    assert_eq!(grey.image.unwrap().channels, 1);
    // A JPEG reads too (lossy: near its colour).
    let jpg = dir.path().join("train/dog/photo.jpg");
    RgbImage::from_pixel(8, 8, Rgb([20, 100, 199]))
        .save(&jpg)
        .unwrap();
    let mut s = spec(dir.path(), [8, 8], 3, 0);
    s.options.normalize = Some(NormalizeConfig {
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    });
    let d = load(&s).unwrap();
    // dog's images: 0.png 1.png 2.png photo.jpg → the JPEG is the 7th training image.
    let b = d.train.collate(&[6]);
    let (x, _) = pixels(&b);
    for (ch, want) in [20.0f32, 100.0, 199.0].iter().enumerate() {
        let v = x[ch * 64] * 255.0;
        assert!((v - want).abs() < 6.0, "channel {ch}: {v}");
    }
}

#[test]
fn flat_layout_holds_out_a_seeded_stratified_split() {
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("a", 10), ("b", 20), ("c", 30)] {
        for i in 0..n {
            png(
                &dir.path().join(format!("{class}/{i:02}.png")),
                2,
                2,
                [i as u8; 3],
            );
        }
    }
    let d = load(&spec(dir.path(), [2, 2], 3, 12)).unwrap();
    assert_eq!(d.labels.as_deref().unwrap(), ["a", "b", "c"]);
    assert!(d.test.is_none());
    let val = d.val.collate(&d.val.eval_order());
    let train = d.train.collate(&d.train.eval_order());
    assert_eq!(val.targets.len(), 12);
    assert_eq!(train.targets.len(), 48);
    for (class, want) in [(0, 2), (1, 4), (2, 6)] {
        assert_eq!(val.targets.iter().filter(|&&t| t == class).count(), want);
    }
    // Reproducible with the seed, different with another.
    let again = load(&spec(dir.path(), [2, 2], 3, 12)).unwrap();
    assert_eq!(again.val.collate(&again.val.eval_order()), val);
    let mut other = spec(dir.path(), [2, 2], 3, 12);
    other.seed = 2;
    let other = load(&other).unwrap();
    assert_ne!(other.val.collate(&other.val.eval_order()), val);

    let labels: Vec<u32> = (0..60).map(|i| (i / 20) as u32).collect();
    let (t, v) = stratified_split(&labels, 3, 7, 5);
    assert_eq!((t.len(), v.len()), (53, 7));
    let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
    all.sort();
    assert_eq!(all, (0..60).collect::<Vec<_>>(), "a partition");
    // 7/3 each: 2, 2, 2 and one more for the first of the tied remainders.
    let per: Vec<usize> = (0..3)
        .map(|c| v.iter().filter(|&&i| labels[i] == c).count())
        .collect();
    assert_eq!(per.iter().sum::<usize>(), 7);
    assert!(per.iter().all(|&k| k == 2 || k == 3), "{per:?}");
}

#[test]
fn without_val_folder_or_val_size_validation_is_test_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    std::fs::remove_dir_all(dir.path().join("val")).unwrap();
    let d = load(&spec(dir.path(), [2, 2], 3, 0)).unwrap();
    assert_eq!(d.val.collate(&[0]), d.test.as_ref().unwrap().collate(&[0]));
    let held = load(&spec(dir.path(), [2, 2], 3, 3)).unwrap();
    assert_eq!(held.train.eval_order().len(), 6);
    assert_eq!(held.val.eval_order().len(), 3);

    std::fs::remove_dir_all(dir.path().join("test")).unwrap();
    let e = load_err(&spec(dir.path(), [2, 2], 3, 0));
    assert!(
        e.contains("no validation split") && e.contains("data.val_size"),
        "{e}"
    );
    let e = load_err(&spec(dir.path(), [2, 2], 3, 9));
    assert!(e.contains("leaves no training images"), "{e}");
}

#[test]
fn only_the_training_split_is_augmented() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    // Different pixels within each image, so crops and flips show.
    for i in 0..3 {
        let img = RgbImage::from_fn(6, 6, |x, y| Rgb([(x * 40) as u8, (y * 40) as u8, 7]));
        img.save(dir.path().join(format!("train/emu/{i}.png")))
            .unwrap();
    }
    let mut s = spec(dir.path(), [6, 6], 3, 0);
    s.options.augment = Some(AugmentConfig {
        crop_padding: 2,
        hflip: true,
        ..AugmentConfig::default()
    });
    let d = load(&s).unwrap();
    let ids = [6, 7, 8];
    let changed =
        (0..8).any(|b| d.train.collate_train(&ids, batch_seed(1, b)) != d.train.collate(&ids));
    assert!(changed, "training batches are augmented");
    for split in [&d.val, d.test.as_ref().unwrap()] {
        let all = split.eval_order();
        assert_eq!(
            split.collate_train(&all, batch_seed(1, 0)),
            split.collate(&all)
        );
    }
}

#[test]
fn a_corrupt_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let bad = dir.path().join("train/dog/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n but then garbage").unwrap();
    let e = load_err(&spec(dir.path(), [2, 2], 3, 0));
    assert!(e.contains(&bad.display().to_string()), "{e}");
    assert!(e.contains("re-save it") || e.contains("delete it"), "{e}");
}

#[test]
fn an_empty_class_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let empty = dir.path().join("train/fox");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), "no images here").unwrap();
    let e = load_err(&spec(dir.path(), [2, 2], 3, 0));
    assert!(
        e.contains(&empty.display().to_string()) && e.contains("no images"),
        "{e}"
    );
}

#[test]
fn missing_class_folders_name_the_root() {
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("loose.png"), 2, 2, [1, 2, 3]);
    let e = load_err(&spec(dir.path(), [2, 2], 3, 1));
    assert!(
        e.contains("no class folders") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    std::fs::create_dir_all(dir.path().join("train")).unwrap();
    let e = load_err(&spec(dir.path(), [2, 2], 3, 1));
    assert!(e.contains("no class folders"), "{e}");
}

#[test]
fn val_classes_must_be_training_classes() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    png(&dir.path().join("val/yak/1.png"), 2, 2, [0, 0, 0]);
    let e = load_err(&spec(dir.path(), [2, 2], 3, 0));
    let folder = dir.path().join("val/yak").display().to_string();
    assert!(
        e.contains(&folder) && e.contains("not among the training classes"),
        "{e}"
    );
    // And val_size with a val folder is a contradiction.
    std::fs::remove_dir_all(dir.path().join("val/yak")).unwrap();
    let e = load_err(&spec(dir.path(), [2, 2], 3, 2));
    assert!(e.contains("remove data.val_size"), "{e}");
}

#[test]
fn the_folder_hash_is_the_sha256sum_listing() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let hash = |d: &Path| load(&spec(d, [2, 2], 3, 0)).unwrap().files[0].1.clone();
    let first = hash(dir.path());
    let mut lines = vec![];
    for rel in [
        "test/emu/c.png",
        "train/cat/0.png",
        "train/cat/1.png",
        "train/cat/2.png",
        "train/dog/0.png",
        "train/dog/1.png",
        "train/dog/2.png",
        "train/emu/0.png",
        "train/emu/1.png",
        "train/emu/2.png",
        "val/cat/a.PNG",
        "val/dog/sub/b.png",
    ] {
        let h = crate::fs::sha256_file(&dir.path().join(rel)).unwrap();
        lines.push(format!("{h}  {rel}\n"));
    }
    assert_eq!(first, hex(&Sha256::digest(lines.concat().as_bytes())));
    // Any change to an image changes it.
    png(&dir.path().join("train/cat/1.png"), 4, 6, [0, 0, 0]);
    assert_ne!(hash(dir.path()), first);
}

#[test]
fn a_recipe_without_image_size_is_rejected_at_the_key() {
    let text = "task = \"classification\"\n[model]\nkind = \"cnn\"\n[data]\n\
                dataset = \"image-folder\"\npath = \"pets\"\nbatch_size = 8\n[optim]\n\
                name = \"sgd\"\nlr = 0.1\n[trainer]\nmax_steps = 1\n";
    let e = crate::Recipe::parse(Path::new("r.toml"), text, &[]).unwrap_err();
    assert_eq!(e.key, "data.image_size");
    assert_eq!(e.location, "r.toml:4");
    assert!(
        e.message.contains("missing") && e.message.contains("image_size = ["),
        "{e}"
    );
    let ok = text.replace("batch_size = 8", "batch_size = 8\nimage_size = [32, 32]");
    let r = crate::Recipe::parse(Path::new("r.toml"), &ok, &[]).unwrap();
    let crate::recipe::DataSource::ImageFolder(f) = &r.data.source else {
        panic!(
            "an image-folder recipe decodes to image-folder data: {:?}",
            r.data
        )
    };
    assert_eq!(f.image_size, [32, 32]);
}

#[test]
fn the_recipe_path_loads_a_folder_with_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    split_fixture(dir.path());
    let text = format!(
        "task = \"classification\"\nseed = 3\n[model]\nkind = \"cnn\"\n[data]\n\
         dataset = \"image-folder\"\npath = {:?}\nbatch_size = 2\nimage_size = [3, 5]\n\
         channels = 1\nnormalize = {{ mean = [0.5], std = [0.25] }}\n\
         augment = {{ crop_padding = 1, hflip = true, mixup_alpha = 0.2 }}\n[optim]\n\
         name = \"sgd\"\nlr = 0.1\n[trainer]\nmax_steps = 1\n",
        dir.path().display().to_string()
    );
    let r = crate::Recipe::parse(Path::new("r.toml"), &text, &[]).unwrap();
    let d = crate::data::load(&r).unwrap();
    let info = d.image.clone().unwrap();
    assert_eq!((info.channels, info.height, info.width), (1, 3, 5));
    assert_eq!((info.mean, info.std), (vec![0.5], vec![0.25]));
    let b = d.train.collate_train(&[0, 1], batch_seed(3, 0));
    assert!(b.mix.is_some(), "mix_prob defaults to 1");
    assert!(d.val.collate_train(&[0, 1], 5).mix.is_none());
}
