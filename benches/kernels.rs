//! Each fused op, forward + backward, against the same op composed of plain candle ops
//! (`kiln::kernels::reference`), on the CPU at GPT-2-small shapes: B·T = 4096 rows, C = 768,
//! 12 heads of 64 over T = 1024, vocabulary 50304.
//!
//!     cargo bench --bench kernels              # all ops
//!     cargo bench --bench kernels -- layer_norm

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kiln::kernels::{self as k, reference as r, AdamWHyper, AdamWTensor};
use rand::{Rng, SeedableRng};

const ROWS: usize = 4096;
const C: usize = 768;
const VOCAB: usize = 50304;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn ids(n: usize, below: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..below as u32)).collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

type Op = fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Benchmarks forward + backward of `fused` and `composed` on the same inputs; the first
/// `n_vars` inputs get gradients.
fn pair(
    c: &mut Criterion,
    name: &str,
    inputs: Vec<Tensor>,
    n_vars: usize,
    fused: Op,
    composed: Op,
) {
    let (vars, args) = kiln_kernels::compare::vars_and_args(&inputs, n_vars);
    let probe = fused(&args).unwrap().ones_like().unwrap();
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for (label, op) in [("fused", fused), ("composed", composed)] {
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                let out = op(&args).unwrap();
                let grads = kiln_kernels::compare::probe_grads(&out, &probe).unwrap();
                assert!(grads.get(vars[0].as_tensor()).is_some());
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    pair(
        c,
        "layer_norm",
        vec![rand(&[ROWS, C], 1), rand(&[C], 2), rand(&[C], 3)],
        3,
        |t| k::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
        |t| r::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
    );
    pair(
        c,
        "rms_norm",
        vec![rand(&[ROWS, C], 1), rand(&[C], 2)],
        2,
        |t| k::rms_norm(&t[0], &t[1], 1e-6),
        |t| r::rms_norm(&t[0], &t[1], 1e-6),
    );
    pair(
        c,
        "softmax",
        vec![rand(&[ROWS, 1024], 4)],
        1,
        |t| k::softmax(&t[0]),
        |t| r::softmax(&t[0]),
    );
    pair(
        c,
        "bias_gelu",
        vec![rand(&[ROWS, 4 * C], 5), rand(&[4 * C], 6)],
        2,
        |t| k::bias_gelu(&t[0], &t[1]),
        |t| r::bias_gelu(&t[0], &t[1]),
    );
    pair(
        c,
        "gelu",
        vec![rand(&[ROWS, 4 * C], 5)],
        1,
        |t| k::gelu(&t[0]),
        |t| r::gelu(&t[0]),
    );
    let qkv = |s| rand(&[4, 12, 1024, 64], s);
    pair(
        c,
        "attention",
        vec![qkv(7), qkv(8), qkv(9)],
        3,
        |t| k::causal_self_attention(&t[0], &t[1], &t[2]),
        |t| r::causal_self_attention(&t[0], &t[1], &t[2]),
    );
    pair(
        c,
        "cross_entropy",
        vec![rand(&[ROWS, VOCAB], 10), ids(ROWS, VOCAB)],
        1,
        |t| k::cross_entropy(&t[0], &t[1]),
        |t| r::cross_entropy(&t[0], &t[1]),
    );
    pair(
        c,
        "embedding",
        vec![rand(&[VOCAB, C], 11), ids(ROWS, VOCAB)],
        1,
        |t| k::embedding(&t[1], &t[0]),
        |t| r::embedding(&t[1], &t[0]),
    );

    // AdamW over GPT-2 small's block matrices of one layer (7.1M parameters).
    let shapes = [[C, 3 * C], [C, C], [C, 4 * C], [4 * C, C]];
    let tensors: Vec<[Tensor; 4]> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let z = Tensor::zeros(&s[..], DType::F32, &Device::Cpu).unwrap();
            [
                rand(s, i as u64),
                rand(s, 10 + i as u64),
                z.clone(),
                z.copy().unwrap(),
            ]
        })
        .collect();
    let h = AdamWHyper {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        grad_scale: 1.0,
    };
    let mut group = c.benchmark_group("adamw");
    group.sample_size(10);
    group.bench_function(BenchmarkId::from_parameter("fused"), |b| {
        b.iter(|| {
            let ts: Vec<AdamWTensor> = tensors
                .iter()
                .map(|[p, g, m, v]| AdamWTensor {
                    param: p,
                    grad: g,
                    m,
                    v,
                    weight_decay: 0.1,
                    copy: None,
                })
                .collect();
            k::adamw_step(&ts, &h).unwrap()
        })
    });
    group.bench_function(BenchmarkId::from_parameter("composed"), |b| {
        b.iter(|| {
            for [p, g, m, v] in &tensors {
                r::adamw_step(p, g, m, v, 0.1, &h).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
