use super::*;
use crate::testing::rand;
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;

fn vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn var_of(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// Per-channel mean and biased variance of (N, C, H, W) values, by hand.
fn channel_stats(x: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let (n, c, h, w) = x.dims4().unwrap();
    let xs = vec(x);
    let at = |b: usize, ch: usize, i: usize| xs[(b * c + ch) * h * w + i];
    let m = (n * h * w) as f64;
    let mut means = Vec::new();
    let mut vars = Vec::new();
    for ch in 0..c {
        let mean = (0..n)
            .flat_map(|b| (0..h * w).map(move |i| (b, i)))
            .map(|(b, i)| at(b, ch, i))
            .sum::<f64>()
            / m;
        let var = (0..n)
            .flat_map(|b| (0..h * w).map(move |i| (b, i)))
            .map(|(b, i)| (at(b, ch, i) - mean).powi(2))
            .sum::<f64>()
            / m;
        means.push(mean);
        vars.push(var);
    }
    (means, vars)
}

/// Channel ch of `x` scaled by ch + 1 and shifted by ch: statistics that differ per channel.
fn input(shape: &[usize], seed: u64) -> Tensor {
    let c = shape[1];
    let scale: Vec<f64> = (0..c).map(|ch| ch as f64 + 1.0).collect();
    let shift: Vec<f64> = (0..c).map(|ch| ch as f64).collect();
    let per = |v: Vec<f64>| Tensor::from_vec(v, (1, c, 1, 1), &Device::Cpu).unwrap();
    rand(shape, seed)
        .broadcast_mul(&per(scale))
        .unwrap()
        .broadcast_add(&per(shift))
        .unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn training_normalizes_with_batch_stats_and_updates_running_stats() {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 1, DType::F64, &Device::Cpu);
    let bn = BatchNorm2d::new(3, vb.pp("bn")).unwrap();
    let x = input(&[4, 3, 5, 6], 2);
    let (mean, var) = channel_stats(&x);
    let y = bn.forward(&x, true).unwrap();
    assert_eq!(y.dims(), x.dims());
    // Affine at init (weight 1, bias 0): each channel comes out with mean 0, variance 1.
    let (ym, yv) = channel_stats(&y);
    close(&ym, &[0.0; 3], 1e-12, "output mean");
    let want_v: Vec<f64> = var.iter().map(|v| v / (v + EPS)).collect();
    close(&yv, &want_v, 1e-12, "output variance");
    assert!(want_v.iter().all(|v| (v - 1.0).abs() < 1e-4));

    // Running statistics: 0.9 · init + 0.1 · batch, with the unbiased variance.
    let m = (4 * 5 * 6) as f64;
    let unbiased: Vec<f64> = var.iter().map(|v| v * m / (m - 1.0)).collect();
    let rm1: Vec<f64> = mean.iter().map(|m| 0.1 * m).collect();
    let rv1: Vec<f64> = unbiased.iter().map(|v| 0.9 + 0.1 * v).collect();
    // Read through the VarMap's Var: the update is in place.
    close(
        &vec(var_of(&vm, "bn.running_mean").as_tensor()),
        &rm1,
        1e-12,
        "running_mean",
    );
    close(
        &vec(var_of(&vm, "bn.running_var").as_tensor()),
        &rv1,
        1e-12,
        "running_var",
    );
    assert_eq!(
        vec(var_of(&vm, "bn.num_batches_tracked").as_tensor()),
        [1.0]
    );
    assert_eq!(
        var_of(&vm, "bn.num_batches_tracked").dims(),
        &[] as &[usize]
    );

    // A second batch moves them again from where they are.
    let x2 = input(&[2, 3, 4, 4], 3);
    let (mean2, var2) = channel_stats(&x2);
    bn.forward(&x2, true).unwrap();
    let m2 = 32.0;
    let rm2: Vec<f64> = rm1
        .iter()
        .zip(&mean2)
        .map(|(r, b)| 0.9 * r + 0.1 * b)
        .collect();
    let rv2: Vec<f64> = rv1
        .iter()
        .zip(&var2)
        .map(|(r, v)| 0.9 * r + 0.1 * v * m2 / (m2 - 1.0))
        .collect();
    let (rm, rv, count) = bn.running_stats();
    close(&vec(rm), &rm2, 1e-12, "running_mean after 2");
    close(&vec(rv), &rv2, 1e-12, "running_var after 2");
    assert_eq!(vec(count), [2.0]);
    assert_eq!(
        vec(var_of(&vm, "bn.num_batches_tracked").as_tensor()),
        [2.0]
    );

    // The update records no graph: a loss over the output reaches weight and bias only.
    let grads = bn
        .forward(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = grads.backward().unwrap();
    assert!(grads.get(&var_of(&vm, "bn.weight")).is_some());
    for b in ["running_mean", "running_var", "num_batches_tracked"] {
        assert!(grads.get(&var_of(&vm, &format!("bn.{b}"))).is_none(), "{b}");
    }
    assert!(bn.forward(&rand(&[1, 3, 1, 1], 1), true).is_err());
}

#[test]
fn eval_uses_running_stats_also_in_a_model_built_from_detached_copies() {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 1, DType::F64, &Device::Cpu);
    let bn = BatchNorm2d::new(3, vb.pp("bn")).unwrap();
    // A non-trivial affine part.
    var_of(&vm, "bn.weight").set(&rand(&[3], 4)).unwrap();
    var_of(&vm, "bn.bias").set(&rand(&[3], 5)).unwrap();
    // What the trainer's evaluation does: a model over detached copies of the VarMap, here
    // made before the training steps (it shares their storage, so it sees them anyway).
    let detached_bn = || {
        let vb = kiln_core::rng::detached_var_builder(&vm, DType::F64, &Device::Cpu);
        BatchNorm2d::new(3, vb.pp("bn")).unwrap()
    };
    let eval_bn = detached_bn();
    let x = input(&[3, 3, 4, 5], 6);
    for seed in [7, 8] {
        bn.forward(&input(&[4, 3, 3, 3], seed), true).unwrap();
    }
    let train_y = bn.forward(&x, true).unwrap();
    let rm = vec(var_of(&vm, "bn.running_mean").as_tensor());
    let rv = vec(var_of(&vm, "bn.running_var").as_tensor());
    let (w, b) = (
        vec(var_of(&vm, "bn.weight").as_tensor()),
        vec(var_of(&vm, "bn.bias").as_tensor()),
    );
    assert!(
        rm.iter().all(|m| m.abs() > 1e-3),
        "running_mean moved: {rm:?}"
    );
    let xs = vec(&x);
    let want: Vec<f64> = xs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = (i / 20) % 3;
            (v - rm[ch]) / (rv[ch] + EPS).sqrt() * w[ch] + b[ch]
        })
        .collect();
    for (what, model) in [("same model", &bn), ("detached model", &eval_bn)] {
        let got = vec(&model.forward(&x, false).unwrap());
        close(&got, &want, 1e-12, what);
        let diff = got
            .iter()
            .zip(vec(&train_y))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff > 1e-2,
            "{what}: eval output equals the training output"
        );
    }
    // Rebuilt after the steps, too; and evaluation leaves the statistics alone.
    let late = detached_bn();
    close(
        &vec(&late.forward(&x, false).unwrap()),
        &want,
        1e-12,
        "rebuilt",
    );
    assert_eq!(vec(&bn.running_stats().0.clone()), rm);
    assert_eq!(
        vec(var_of(&vm, "bn.num_batches_tracked").as_tensor()),
        [3.0]
    );
}

#[test]
fn half_precision_inputs_keep_f32_statistics() {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu);
    let bn = BatchNorm2d::new(2, vb.pp("bn")).unwrap();
    // A large common offset: a variance in bf16 arithmetic would lose it all.
    let x = (input(&[4, 2, 6, 6], 9) + 100.0).unwrap();
    let xh = x.to_dtype(DType::BF16).unwrap();
    let y = bn.forward(&xh, true).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let (mean, var) = channel_stats(&xh.to_dtype(DType::F64).unwrap());
    let rm = vec(bn.running_stats().0);
    let want: Vec<f64> = mean.iter().map(|m| 0.1 * m).collect();
    close(&rm, &want, 1e-4, "running_mean from bf16 inputs");
    let (ym, yv) = channel_stats(&y);
    close(&ym, &[0.0; 2], 2e-2, "bf16 output mean");
    close(&yv, &[1.0; 2], 2e-2, "bf16 output variance");
    assert!(var.iter().all(|v| *v > 0.1));
    assert_eq!(bn.running_stats().1.dtype(), DType::F32);
}

#[test]
fn buffer_names() {
    assert!(is_buffer(
        "resnet.embedder.embedder.normalization.running_mean"
    ));
    assert!(is_buffer("a.running_var") && is_buffer("a.num_batches_tracked"));
    assert!(!is_buffer("a.normalization.weight") && !is_buffer("running_mean_x"));
}
