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
use crate::recipe::{AugmentConfig, DataConfig, DataSource, NormalizeConfig};
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
    /// The options of an image data set's recipe (none for text).
    pub fn of(d: &DataConfig) -> Self {
        let (normalize, augment) = match &d.source {
            DataSource::FashionMnist(f) => (&f.normalize, &f.augment),
            DataSource::ImageFolder(f) => (&f.normalize, &f.augment),
            _ => (&None, &None),
        };
        ImageOptions {
            normalize: normalize.clone(),
            augment: augment.clone(),
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
mod tests;
