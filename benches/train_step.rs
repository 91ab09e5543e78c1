//! One full training step (forward, loss, backward, clipping, AdamW) of the two CPU reference
//! workloads, the same ones ../shared/bench/torch_cpu_bench.py times in PyTorch:
//! - nanoGPT's CPU shakespeare-char config: GPT 4 layers, 4 heads, 128 dims, context 64,
//!   vocab 65, batch 12;
//! - the Fashion-MNIST MLP 784-512-256-10 at batch 128.
//!
//! Run: `cargo bench --bench train_step`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use kiln::core::data::Batch;
use kiln::core::recipe::{OptimConfig, OptimizerName};
use kiln::models::{gpt::GptConfig, mlp::MlpConfig, ModelConfig};
use kiln::trainers::{optim, trainer};
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn adamw() -> OptimConfig {
    OptimConfig {
        name: OptimizerName::Adamw,
        lr: 1e-3,
        weight_decay: 0.1,
        betas: [0.9, 0.99],
        eps: 1e-8,
        momentum: 0.0,
        nesterov: false,
    }
}

fn bench_step(c: &mut Criterion, name: &str, cfg: ModelConfig, batch: Batch) {
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = kiln::core::rng::seeded_var_builder(&varmap, 0, DType::F32, &device);
    let model = cfg
        .build(vb, kiln::models::SharedRng::new(0, "dropout"), DType::F32)
        .unwrap();
    let params = trainer::params_of(&varmap, &cfg);
    let mut opt = optim::build(&adamw());
    let batches = [batch];
    c.bench_function(name, |b| {
        b.iter(|| {
            trainer::train_step(
                model.as_ref(),
                &params,
                opt.as_mut(),
                &batches,
                1e-3,
                1.0,
                false,
                None,
            )
            .unwrap()
        })
    });
}

fn benches(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let dev = Device::Cpu;

    let tokens: Vec<u32> = (0..12 * 64 + 1).map(|_| rng.random_range(0..65)).collect();
    let gpt = ModelConfig::Gpt(GptConfig {
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        block_size: 64,
        vocab_size: 65,
        dropout: 0.0,
        bias: true,
        checkpoint_activations: false,
    });
    let batch = Batch {
        inputs: Tensor::from_slice(&tokens[..12 * 64], (12, 64), &dev).unwrap(),
        targets: Tensor::from_slice(&tokens[1..12 * 64 + 1], (12, 64), &dev).unwrap(),
        mix: None,
    };
    bench_step(c, "shakespeare_char_cpu_step", gpt, batch);

    let pixels: Vec<f32> = (0..128 * 784)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let labels: Vec<u32> = (0..128).map(|_| rng.random_range(0..10)).collect();
    let mlp = ModelConfig::Mlp(MlpConfig {
        hidden: vec![512, 256],
        dropout: 0.0,
        input_dim: 784,
        num_classes: 10,
    });
    let batch = Batch {
        inputs: Tensor::from_slice(&pixels, (128, 784), &dev).unwrap(),
        targets: Tensor::from_slice(&labels, 128, &dev).unwrap(),
        mix: None,
    };
    bench_step(c, "mlp_b128_step", mlp, batch);
}

criterion_group! {
    name = train_step;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(8));
    targets = benches
}
criterion_main!(train_step);
