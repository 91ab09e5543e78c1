//! The image pipeline every image data set (Fashion-MNIST, image folders) goes through.
//!
//! Decoded pixels stay in memory as bytes, channel-major (`C×H×W` per image). A batch becomes
//! `(B, C, H, W)` f32, each pixel scaled to [0, 1] and normalized per channel:
//! `(p / 255 − mean[c]) / std[c]`.
//!
//! Training batches ([`Examples::collate_train`]) may be augmented (`[data] augment`):
//! - per example, a random crop after zero padding (`crop_padding = p`: the image is padded with
//!   black by `p` on each side and cropped back to `H×W` at a uniform offset, like torchvision's
//!   `RandomCrop(size, padding=p)`; the padding, pixel value 0, normalizes to `−mean/std`), then
//!   a horizontal flip with probability 0.5 (`hflip`), then normalization;
//! - per batch, with probability `mix_prob`, Mixup (`λ ~ Beta(α, α)`,
//!   `x = λ·x + (1 − λ)·x_partner`) or CutMix (a box of area `≈ (1 − λ)·H·W` pasted from the
//!   partner, `λ` then recomputed from the clipped box, as timm does); when both alphas are set,
//!   each mixed batch picks one of the two 50/50. The partner of example `i` is example
//!   `B − 1 − i` (the batch reversed, as timm's `Mixup` does), so the second targets are the
//!   targets reversed ([`Mix`]).
//!
//! Randomness: the batch-level draws come from `ChaCha8(seed)` stream 0, example `i`'s from
//! stream `i + 1`, where `seed` is the batch seed the loader derives from the run seed and the
//! global batch index. The examples are processed in parallel, but no draw depends on which
//! thread runs first, so a batch is a pure function of `(ids, seed)`. Evaluation batches
//! ([`Examples::collate`]) are never augmented.

use super::{Examples, HostBatch, HostTensor, Mix};
use crate::recipe::{AugmentConfig, DataConfig, NormalizeConfig};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use rayon::prelude::*;
use std::sync::Arc;

/// What the recipe says about turning pixels into inputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageOptions {
    /// Absent: the data set's own statistics.
    pub normalize: Option<NormalizeConfig>,
    /// Absent: no augmentation. Applies to the training split only.
    pub augment: Option<AugmentConfig>,
}

impl ImageOptions {
    pub fn of(d: &DataConfig) -> Self {
        ImageOptions {
            normalize: d.normalize.clone(),
            augment: d.augment.clone(),
        }
    }

    /// The normalizer: the recipe's values, else `default` (the data set's statistics).
    pub fn normalizer(&self, default: (Vec<f32>, Vec<f32>)) -> Normalizer {
        match &self.normalize {
            Some(n) => Normalizer::new(
                n.mean.iter().map(|&m| m as f32).collect(),
                n.std.iter().map(|&s| s as f32).collect(),
            ),
            None => Normalizer::new(default.0, default.1),
        }
    }
}

/// Per-channel normalization of byte pixels, as a lookup table (the same values, bit for bit,
/// as computing `(p as f32 / 255.0 - mean) / std` for each pixel).
#[derive(Debug, Clone)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    lut: Vec<[f32; 256]>,
}

impl Normalizer {
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Self {
        assert_eq!(mean.len(), std.len(), "one mean and one std per channel");
        let lut = mean
            .iter()
            .zip(&std)
            .map(|(&m, &s)| std::array::from_fn(|p| (p as f32 / 255.0 - m) / s))
            .collect();
        Normalizer { mean, std, lut }
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// The normalized value of pixel `p` in channel `c`.
    #[inline]
    pub fn value(&self, c: usize, p: u8) -> f32 {
        self.lut[c][p as usize]
    }
}

/// Per-channel mean and standard deviation of byte images (scaled to [0, 1]) over the images
/// `ids` of `pixels` (`C×H×W` each). A channel without any variation gets std 1.
pub fn channel_stats(pixels: &[u8], shape: [usize; 3], ids: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let [c, h, w] = shape;
    let plane = h * w;
    let hist = ids
        .par_iter()
        .fold(
            || vec![[0u64; 256]; c],
            |mut hist, &k| {
                let img = &pixels[k * c * plane..(k + 1) * c * plane];
                for (ch, hc) in hist.iter_mut().enumerate() {
                    for &p in &img[ch * plane..(ch + 1) * plane] {
                        hc[p as usize] += 1;
                    }
                }
                hist
            },
        )
        .reduce(
            || vec![[0u64; 256]; c],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    for (u, v) in x.iter_mut().zip(y) {
                        *u += v;
                    }
                }
                a
            },
        );
    let mut mean = Vec::with_capacity(c);
    let mut std = Vec::with_capacity(c);
    for hc in &hist {
        let n: u64 = hc.iter().sum();
        let n = n.max(1) as f64;
        let m = hc
            .iter()
            .enumerate()
            .map(|(p, &k)| p as f64 / 255.0 * k as f64)
            .sum::<f64>()
            / n;
        let var = hc
            .iter()
            .enumerate()
            .map(|(p, &k)| (p as f64 / 255.0 - m).powi(2) * k as f64)
            .sum::<f64>()
            / n;
        let s = var.sqrt();
        mean.push(m as f32);
        std.push(if s > 1e-6 { s as f32 } else { 1.0 });
    }
    (mean, std)
}

/// Byte images with their labels: one split of an image data set.
pub struct ImageSet {
    /// Every image of the data set (this split's and others'), `C×H×W` bytes each.
    pub pixels: Arc<Vec<u8>>,
    pub labels: Arc<Vec<u32>>,
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Which images of `pixels` belong to this split.
    pub ids: Vec<usize>,
    pub normalizer: Arc<Normalizer>,
    /// Training-time augmentation (the training split only).
    pub augment: Option<AugmentConfig>,
}

impl ImageSet {
    fn batch(&self, ids: &[usize], augment: Option<(&AugmentConfig, u64)>) -> HostBatch {
        let [c, h, w] = self.shape;
        let px = c * h * w;
        let mut x = vec![0f32; ids.len() * px];
        x.par_chunks_mut(px)
            .zip(ids)
            .enumerate()
            .for_each(|(pos, (dst, &i))| {
                let j = self.ids[i];
                let src = &self.pixels[j * px..(j + 1) * px];
                match augment {
                    None => normalize_into(src, self.shape, &self.normalizer, dst),
                    Some((a, seed)) => {
                        let g = Geometry::draw(a, &mut example_rng(seed, pos));
                        g.apply(src, self.shape, &self.normalizer, dst);
                    }
                }
            });
        let targets: Vec<u32> = ids.iter().map(|&i| self.labels[self.ids[i]]).collect();
        let mix = augment
            .and_then(|(a, seed)| mix_batch(&mut x, &targets, self.shape, a, &mut batch_rng(seed)));
        HostBatch {
            inputs: HostTensor::F32(x, vec![ids.len(), c, h, w]),
            target_shape: vec![targets.len()],
            targets,
            mix,
        }
    }
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
        self.batch(ids, None)
    }

    fn collate_train(&self, ids: &[usize], seed: u64) -> HostBatch {
        self.batch(ids, self.augment.as_ref().map(|a| (a, seed)))
    }
}

/// The generator of batch-level draws (mixing).
fn batch_rng(seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0);
    rng
}

/// The generator of example `pos`'s draws (crop, flip).
fn example_rng(seed: u64, pos: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(pos as u64 + 1);
    rng
}

fn normalize_into(src: &[u8], [c, h, w]: [usize; 3], norm: &Normalizer, dst: &mut [f32]) {
    let plane = h * w;
    for ch in 0..c {
        let s = &src[ch * plane..(ch + 1) * plane];
        for (d, &p) in dst[ch * plane..(ch + 1) * plane].iter_mut().zip(s) {
            *d = norm.value(ch, p);
        }
    }
}

/// Where one augmented example's pixels come from: output `(y, x)` is source
/// `(y + dy, x' + dx)` with `x' = W − 1 − x` when flipped, else `x`; outside the source is
/// padding (pixel 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub dy: isize,
    pub dx: isize,
    pub flip: bool,
}

impl Geometry {
    /// Draws a crop offset in `[−p, p]²` (uniform over the `(2p + 1)²` crops of the padded
    /// image) and, with `hflip`, a flip with probability 0.5.
    pub fn draw(a: &AugmentConfig, rng: &mut ChaCha8Rng) -> Self {
        let p = a.crop_padding as i64;
        let (dy, dx) = if p > 0 {
            let dy = rng.random_range(-p..=p) as isize;
            (dy, rng.random_range(-p..=p) as isize)
        } else {
            (0, 0)
        };
        let flip = a.hflip && rng.random_bool(0.5);
        Geometry { dy, dx, flip }
    }

    /// Writes the transformed, normalized image.
    pub fn apply(&self, src: &[u8], [c, h, w]: [usize; 3], norm: &Normalizer, dst: &mut [f32]) {
        let plane = h * w;
        let (hi, wi) = (h as isize, w as isize);
        for ch in 0..c {
            let s = &src[ch * plane..(ch + 1) * plane];
            let pad = norm.value(ch, 0);
            for y in 0..h {
                let row = &mut dst[ch * plane + y * w..ch * plane + (y + 1) * w];
                let sy = y as isize + self.dy;
                if !(0..hi).contains(&sy) {
                    row.fill(pad);
                    continue;
                }
                let srow = &s[sy as usize * w..(sy as usize + 1) * w];
                for (x, d) in row.iter_mut().enumerate() {
                    let xf = if self.flip { w - 1 - x } else { x };
                    let sx = xf as isize + self.dx;
                    *d = if (0..wi).contains(&sx) {
                        norm.value(ch, srow[sx as usize])
                    } else {
                        pad
                    };
                }
            }
        }
    }
}

/// Mixup or CutMix of a normalized batch `x` (`B×C×H×W`) with its reverse, with probability
/// `mix_prob`; `None` when the batch stays unmixed.
fn mix_batch(
    x: &mut [f32],
    targets: &[u32],
    [c, h, w]: [usize; 3],
    a: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) -> Option<Mix> {
    let n = targets.len();
    if !a.mixes() || n < 2 || rng.random::<f64>() >= a.mix_prob {
        return None;
    }
    let cutmix = match (a.mixup_alpha > 0.0, a.cutmix_alpha > 0.0) {
        (true, true) => rng.random_bool(0.5),
        (false, true) => true,
        _ => false,
    };
    let alpha = if cutmix {
        a.cutmix_alpha
    } else {
        a.mixup_alpha
    };
    let beta = Beta::new(alpha, alpha).expect("validated: alpha > 0");
    let lam: f64 = beta.sample(rng).clamp(0.0, 1.0);
    let px = c * h * w;
    let orig = x.to_vec();
    let lambda = if cutmix {
        let b = cutmix_box(lam, h, w, rng);
        x.par_chunks_mut(px).enumerate().for_each(|(i, dst)| {
            let p = &orig[(n - 1 - i) * px..(n - i) * px];
            for ch in 0..c {
                for y in b.y0..b.y1 {
                    let r = ch * h * w + y * w;
                    dst[r + b.x0..r + b.x1].copy_from_slice(&p[r + b.x0..r + b.x1]);
                }
            }
        });
        (1.0 - (b.area() as f64) / ((h * w) as f64)) as f32
    } else {
        let l = lam as f32;
        x.par_chunks_mut(px).enumerate().for_each(|(i, dst)| {
            let p = &orig[(n - 1 - i) * px..(n - i) * px];
            for (d, &s) in dst.iter_mut().zip(p) {
                *d = l * *d + (1.0 - l) * s;
            }
        });
        l
    };
    Some(Mix {
        targets: targets.iter().rev().copied().collect(),
        lambda,
    })
}

/// A CutMix box, rows `y0..y1`, columns `x0..x1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CutBox {
    y0: usize,
    y1: usize,
    x0: usize,
    x1: usize,
}

impl CutBox {
    fn area(&self) -> usize {
        (self.y1 - self.y0) * (self.x1 - self.x0)
    }
}

/// timm's `rand_bbox`: sides `⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋` centred on a uniform pixel, clipped to
/// the image.
fn cutmix_box(lam: f64, h: usize, w: usize, rng: &mut ChaCha8Rng) -> CutBox {
    let ratio = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
    let cy = rng.random_range(0..h as u64) as usize;
    let cx = rng.random_range(0..w as u64) as usize;
    CutBox {
        y0: cy.saturating_sub(ch / 2),
        y1: (cy + ch / 2).min(h),
        x0: cx.saturating_sub(cw / 2),
        x1: (cx + cw / 2).min(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{batch_seed, Loader};

    /// `n` single-channel `h×w` images; image `k`'s pixel `i` is `k·50 + i + 1` (all distinct
    /// across images at the same position, never 0), label `k % 3`.
    fn set(n: usize, h: usize, w: usize, augment: Option<AugmentConfig>) -> ImageSet {
        assert!(h * w < 50);
        let pixels: Vec<u8> = (0..n)
            .flat_map(|k| (0..h * w).map(move |i| ((k * 50 + i + 1) % 256) as u8))
            .collect();
        ImageSet {
            pixels: Arc::new(pixels),
            labels: Arc::new((0..n as u32).map(|k| k % 3).collect()),
            shape: [1, h, w],
            ids: (0..n).collect(),
            // Identity-like normalization: the output is pixel / 255, padding 0.
            normalizer: Arc::new(Normalizer::new(vec![0.0], vec![1.0])),
            augment,
        }
    }

    fn aug(f: impl FnOnce(&mut AugmentConfig)) -> Option<AugmentConfig> {
        let mut a = AugmentConfig::default();
        f(&mut a);
        Some(a)
    }

    fn pixels(b: &HostBatch) -> &[f32] {
        match &b.inputs {
            HostTensor::F32(x, _) => x,
            HostTensor::U32(..) => panic!("images are f32"),
        }
    }

    fn all_on() -> Option<AugmentConfig> {
        aug(|a| {
            a.crop_padding = 2;
            a.hflip = true;
            a.mixup_alpha = 0.4;
            a.cutmix_alpha = 1.0;
            a.mix_prob = 0.7;
        })
    }

    #[test]
    fn lookup_table_matches_the_formula_bit_for_bit() {
        let (m, s) = (0.2860f32, 0.3530f32);
        let n = Normalizer::new(vec![m], vec![s]);
        for p in 0..=255u8 {
            assert_eq!(
                n.value(0, p).to_bits(),
                ((p as f32 / 255.0 - m) / s).to_bits()
            );
        }
    }

    #[test]
    fn augmentation_is_a_pure_function_of_seed_and_batch_index() {
        let s = set(8, 6, 6, all_on());
        let ids: Vec<usize> = (0..8).collect();
        let a = s.collate_train(&ids, batch_seed(7, 3));
        assert_eq!(a, s.collate_train(&ids, batch_seed(7, 3)));
        assert_ne!(a, s.collate_train(&ids, batch_seed(7, 4)), "another batch");
        assert_ne!(a, s.collate_train(&ids, batch_seed(8, 3)), "another seed");
        assert_ne!(a, s.collate(&ids), "training batches are augmented");
        // Independent of how many threads share the work.
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for b in 0..6 {
                let seed = batch_seed(7, b);
                let here = s.collate_train(&ids, seed);
                assert_eq!(pool.install(|| s.collate_train(&ids, seed)), here);
            }
        }
    }

    #[test]
    fn crop_and_flip_shift_and_mirror_the_image_with_zero_padding() {
        let (h, w, p) = (4, 5, 2);
        let s = set(
            6,
            h,
            w,
            aug(|a| {
                a.crop_padding = p;
                a.hflip = true;
            }),
        );
        let ids: Vec<usize> = (0..6).collect();
        let mut seen = std::collections::BTreeSet::new();
        for b in 0..40 {
            let batch = s.collate_train(&ids, batch_seed(1, b));
            assert!(batch.mix.is_none());
            let x = pixels(&batch);
            for (pos, &k) in ids.iter().enumerate() {
                let out = &x[pos * h * w..(pos + 1) * h * w];
                let src = &s.pixels[k * h * w..(k + 1) * h * w];
                // Exactly one (dy, dx, flip) explains the output.
                let mut fits = vec![];
                for dy in -(p as isize)..=p as isize {
                    for dx in -(p as isize)..=p as isize {
                        for flip in [false, true] {
                            let want = |y: usize, x: usize| -> f32 {
                                let xf = if flip { w - 1 - x } else { x };
                                let (sy, sx) = (y as isize + dy, xf as isize + dx);
                                if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                                    src[sy as usize * w + sx as usize] as f32 / 255.0
                                } else {
                                    0.0
                                }
                            };
                            if (0..h * w).all(|i| out[i] == want(i / w, i % w)) {
                                fits.push((dy, dx, flip));
                            }
                        }
                    }
                }
                assert_eq!(fits.len(), 1, "image {k} of batch {b}: {fits:?}\n{out:?}");
                seen.insert(fits[0]);
            }
        }
        // 240 draws from 50 outcomes: both flips and many offsets, the extremes included.
        assert!(seen.iter().any(|g| g.2) && seen.iter().any(|g| !g.2));
        assert!(seen.len() > 30, "{} distinct crops", seen.len());
        assert!(seen.iter().any(|g| g.0 == -2) && seen.iter().any(|g| g.1 == 2));
    }

    #[test]
    fn eval_batches_are_never_augmented() {
        let plain = set(8, 6, 6, None);
        let augmented = set(8, 6, 6, all_on());
        let ids = [3, 1, 4, 7];
        assert_eq!(augmented.collate(&ids), plain.collate(&ids));
        assert_eq!(plain.collate_train(&ids, 99), plain.collate(&ids));
        let evals: Vec<HostBatch> = crate::data::eval_batches(&augmented, 3, None).collect();
        let want: Vec<HostBatch> = crate::data::eval_batches(&plain, 3, None).collect();
        assert_eq!(evals, want);
        assert!(evals.iter().all(|b| b.mix.is_none()));
    }

    #[test]
    fn mixup_blends_each_example_with_the_reversed_batch() {
        let s = set(5, 6, 6, aug(|a| a.mixup_alpha = 1.0));
        let ids = [4, 0, 2, 1, 3];
        let plain = s.collate(&ids);
        let x0 = pixels(&plain);
        let px = 36;
        let mut lambdas = vec![];
        for b in 0..20 {
            let batch = s.collate_train(&ids, batch_seed(3, b));
            let mix = batch.mix.clone().expect("mix_prob = 1 mixes every batch");
            let l = mix.lambda;
            assert!(l > 0.0 && l < 1.0, "λ = {l}");
            let rev: Vec<u32> = plain.targets.iter().rev().copied().collect();
            assert_eq!(mix.targets, rev);
            assert_eq!(batch.targets, plain.targets);
            let x = pixels(&batch);
            for i in 0..5 {
                for j in 0..px {
                    let want = l * x0[i * px + j] + (1.0 - l) * x0[(4 - i) * px + j];
                    assert_eq!(x[i * px + j], want, "example {i} pixel {j}");
                }
            }
            lambdas.push(l);
        }
        lambdas.sort_by(f32::total_cmp);
        lambdas.dedup();
        assert!(lambdas.len() > 15, "λ is drawn per batch: {lambdas:?}");
    }

    #[test]
    fn cutmix_pastes_a_box_of_area_one_minus_lambda_from_the_partner() {
        let (h, w) = (6, 7);
        let s = set(4, h, w, aug(|a| a.cutmix_alpha = 1.0));
        let ids = [0, 1, 2, 3];
        let x0 = pixels(&s.collate(&ids)).to_vec();
        let px = h * w;
        let mut boxes = 0;
        for b in 0..30 {
            let batch = s.collate_train(&ids, batch_seed(5, b));
            let mix = batch.mix.clone().expect("mixed");
            assert_eq!(mix.targets, vec![0, 2, 1, 0]);
            let x = pixels(&batch);
            // Every pixel differs between partners, so the pasted box is where x changed.
            let changed: Vec<Vec<usize>> = (0..4)
                .map(|i| {
                    (0..px)
                        .filter(|&j| x[i * px + j] != x0[i * px + j])
                        .collect()
                })
                .collect();
            assert!(
                changed.iter().all(|c| *c == changed[0]),
                "one box per batch"
            );
            let inside = &changed[0];
            let want_lambda = 1.0 - inside.len() as f32 / px as f32;
            assert!(
                (mix.lambda - want_lambda).abs() < 1e-6,
                "{} vs {want_lambda}",
                mix.lambda
            );
            if inside.is_empty() {
                continue;
            }
            boxes += 1;
            // The changed pixels form a rectangle...
            let (ys, xs): (Vec<usize>, Vec<usize>) = inside.iter().map(|&j| (j / w, j % w)).unzip();
            let (y0, y1) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap() + 1);
            let (x0b, x1b) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap() + 1);
            assert_eq!((y1 - y0) * (x1b - x0b), inside.len(), "a full rectangle");
            // ...holding the partner's pixels.
            for i in 0..4 {
                for &j in inside {
                    assert_eq!(x[i * px + j], x0[(3 - i) * px + j]);
                }
            }
        }
        assert!(boxes > 10, "{boxes} non-empty boxes");
    }

    #[test]
    fn mix_prob_and_the_choice_between_mixup_and_cutmix() {
        let s = set(
            4,
            6,
            6,
            aug(|a| {
                a.mixup_alpha = 1.0;
                a.cutmix_alpha = 1.0;
                a.mix_prob = 0.5;
            }),
        );
        let ids = [0, 1, 2, 3];
        let x0 = pixels(&s.collate(&ids)).to_vec();
        let (mut none, mut mixup, mut cutmix) = (0, 0, 0);
        for b in 0..200 {
            let batch = s.collate_train(&ids, batch_seed(11, b));
            match batch.mix {
                None => {
                    none += 1;
                    assert_eq!(pixels(&batch), &x0[..]);
                }
                Some(_) => {
                    // Mixup changes every pixel, CutMix only a box (never all of them).
                    let changed = pixels(&batch)
                        .iter()
                        .zip(&x0)
                        .filter(|(a, b)| a != b)
                        .count();
                    if changed == x0.len() {
                        mixup += 1
                    } else {
                        cutmix += 1
                    }
                }
            }
        }
        assert!((60..140).contains(&none), "{none} unmixed of 200");
        assert!(mixup > 25 && cutmix > 25, "mixup {mixup}, cutmix {cutmix}");
    }

    #[test]
    fn loader_restarts_exactly_with_augmentation() {
        let ex: Arc<dyn Examples> = Arc::new(set(10, 6, 6, all_on()));
        let take = |start: u64, n: usize| -> Vec<(u64, HostBatch)> {
            let l = Loader::new(ex.clone(), 3, true, 21, 2, start);
            (0..n).map(|_| l.next_batch()).collect()
        };
        let all = take(0, 8);
        assert_eq!(all[4..], take(4, 4)[..]);
        assert_eq!(all[..], take(0, 8)[..]);
        assert!(all.iter().any(|(_, b)| b.mix.is_some()));
        assert!(all.iter().any(|(_, b)| b.mix.is_none()));
        let other = Loader::new(ex.clone(), 3, true, 22, 2, 0).next_batch();
        assert_ne!(other, all[0]);
    }

    #[test]
    fn channel_stats_of_known_pixels() {
        // Two 1×2 RGB images: channel 0 is {0, 255, 0, 255}, channel 1 constant 51, channel 2
        // {0, 0, 0, 255}.
        let pixels = [0, 255, 51, 51, 0, 0, 0, 255, 51, 51, 0, 255];
        let (m, s) = channel_stats(&pixels, [3, 1, 2], &[0, 1]);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&m, &[0.5, 0.2, 0.25]), "{m:?}");
        assert!(close(&s, &[0.5, 1.0, 0.75f32.sqrt() * 0.5]), "{s:?}");
        let (m, _) = channel_stats(&pixels, [3, 1, 2], &[1]);
        assert!(close(&m[..1], &[0.5]));
    }
}
