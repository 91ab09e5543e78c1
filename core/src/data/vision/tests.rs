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
        let l = Loader::new(ex.clone(), 3, true, 21, 2, start).unwrap();
        (0..n).map(|_| l.next_batch().unwrap()).collect()
    };
    let all = take(0, 8);
    assert_eq!(all[4..], take(4, 4)[..]);
    assert_eq!(all[..], take(0, 8)[..]);
    assert!(all.iter().any(|(_, b)| b.mix.is_some()));
    assert!(all.iter().any(|(_, b)| b.mix.is_none()));
    let other = Loader::new(ex.clone(), 3, true, 22, 2, 0)
        .unwrap()
        .next_batch()
        .unwrap();
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
