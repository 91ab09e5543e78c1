use super::*;
use crate::testing::{rand, GradCheck};
use crate::ModelConfig;
use candle_core::{Device, Shape};
use candle_nn::VarMap;
use std::collections::HashMap;

fn tiny(layer_type: LayerType, stem: Stem, hidden: Vec<usize>, depths: Vec<usize>) -> ResNetConfig {
    ResNetConfig {
        preset: None,
        stem,
        embedding_size: Some(3),
        hidden_sizes: Some(hidden),
        depths: Some(depths),
        layer_type: Some(layer_type),
        ..ResNetConfig::preset(Preset::Resnet18)
    }
}

fn resolved(mut c: ResNetConfig, classes: usize, input: &[usize]) -> ModelConfig {
    c.resolve(&DataFacts::images(classes, input)).unwrap();
    ModelConfig::Resnet(c)
}

/// Every trainable tensor against finite differences, with batch statistics and with
/// running ones, on tiny configs that have identity residuals and downsampling shortcuts.
#[test]
fn gradients_match_finite_differences() {
    let cases = [
        // Small stem; stage 0 keeps 3 channels (identity residual), stage 1 downsamples
        // 3 → 4 through a 1×1 stride-2 shortcut, then an identity layer.
        (
            tiny(LayerType::Basic, Stem::Small, vec![3, 4], vec![1, 2]),
            [2, 2, 6, 6],
        ),
        // ImageNet stem (7×7 stride 2, max-pool), downsampling in the first stage as well.
        (
            ResNetConfig {
                downsample_in_first_stage: true,
                ..tiny(LayerType::Basic, Stem::Imagenet, vec![2, 3], vec![1, 1])
            },
            [3, 1, 13, 12],
        ),
        // Bottlenecks: a projection shortcut at stride 1 (3 → 4 channels), then stride 2
        // in the 3×3 (v1.5) and in the first 1×1 (v1).
        (
            tiny(
                LayerType::Bottleneck,
                Stem::Imagenet,
                vec![4, 8],
                vec![1, 2],
            ),
            [2, 2, 12, 12],
        ),
        (
            ResNetConfig {
                downsample_in_bottleneck: true,
                ..tiny(LayerType::Bottleneck, Stem::Small, vec![4, 8], vec![1, 1])
            },
            [2, 1, 6, 5],
        ),
    ];
    for (i, (c, shape)) in cases.into_iter().enumerate() {
        let cfg = resolved(c, 3, &shape[1..]);
        let x = rand(&shape, 10 + i as u64);
        let y = Tensor::from_vec(
            (0..shape[0] as u32).map(|b| b % 3).collect::<Vec<_>>(),
            shape[0],
            x.device(),
        )
        .unwrap();
        for train in [true, false] {
            let check = GradCheck {
                train,
                ..GradCheck::default()
            };
            check.finite_differences(&cfg, &x, &y);
        }
    }
}

#[test]
fn mixed_precision_matches_f32() {
    // Wide enough that each BN averages over several bf16 products.
    let cfg = resolved(
        ResNetConfig {
            embedding_size: Some(8),
            ..tiny(
                LayerType::Bottleneck,
                Stem::Imagenet,
                vec![16, 32],
                vec![1, 1],
            )
        },
        3,
        &[2, 16, 16],
    );
    let x = rand(&[4, 2, 16, 16], 3);
    let y = Tensor::new(&[0u32, 2, 1, 1], x.device()).unwrap();
    // The whole model's gradients are a poor measure of precision. In f32 alone, a 0.4%
    // (bf16-sized) relative perturbation of this model's conv weights moves them by 2-50%
    // (ReLU and max-pool switches), and with batch statistics some are ~0 analytically (a
    // BN bias whose output only reaches convolutions followed by batch-statistic BNs, which
    // remove any shift): measured while writing this test. So the model is held to 0.3 in
    // evaluation mode (a cut gradient is 1), and in training mode to close logits and an f32
    // gradient for every parameter; the precision of the conv + BN path, in both modes, is
    // checked sharply and switch-free in `conv_layer_mixed_precision` below.
    for (train, grad_tol) in [(false, 0.3), (true, f64::INFINITY)] {
        let check = GradCheck {
            train,
            grad_tol,
            ..GradCheck::default()
        };
        check.mixed_precision(&cfg, &x, &y);
    }
}

/// One strided conv + BN (no ReLU) in bf16/f16 against f32 on the same weights: outputs and
/// every gradient (input, conv weight, BN weight and bias) close, with batch statistics and
/// with running ones.
#[test]
fn conv_layer_mixed_precision() {
    use candle_core::Var;
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 5, DType::F32, &Device::Cpu);
    let layer = ConvLayer::new(8, 16, 3, 2, false, vb.pp("l")).unwrap();
    // A non-trivial affine part.
    for (name, seed) in [("l.normalization.weight", 1), ("l.normalization.bias", 2)] {
        let v = vm.data().lock().unwrap()[name].clone();
        v.set(
            &(rand(&[16], seed) + 1.5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
    }
    let x = Var::from_tensor(&rand(&[4, 8, 9, 9], 3).to_dtype(DType::F32).unwrap()).unwrap();
    let probe = rand(&[4, 16, 5, 5], 4).to_dtype(DType::F32).unwrap();
    for train in [true, false] {
        let run = |compute: DType| {
            let y = layer.forward(x.as_tensor(), train, compute).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            let grads = kiln_kernels::compare::probe_grads(&y, &probe).unwrap();
            let mut g = vec![grads.get(&x).unwrap().clone()];
            for n in [
                "l.convolution.weight",
                "l.normalization.weight",
                "l.normalization.bias",
            ] {
                let v = vm.data().lock().unwrap()[n].clone();
                g.push(grads.get(&v).unwrap().clone());
            }
            (y, g)
        };
        let (want, want_g) = run(DType::F32);
        for compute in [DType::BF16, DType::F16] {
            let (got, got_g) = run(compute);
            let e = crate::testing::rel_err(&got, &want);
            assert!(
                e > 0.0 && e < 1e-2,
                "{compute:?} train {train}: output error {e}"
            );
            for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
                let e = crate::testing::rel_err(g, w);
                assert!(
                    e < 1e-2,
                    "{compute:?} train {train}: gradient {i} error {e}"
                );
            }
        }
    }
}

fn build(cfg: &ModelConfig, dtype: DType) -> (VarMap, Box<dyn Model>) {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 7, dtype, &Device::Cpu);
    let model = cfg.build(vb, SharedRng::new(0, "d"), dtype).unwrap();
    (vm, model)
}

fn shapes(vm: &VarMap) -> HashMap<String, Vec<usize>> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

/// Elements of the parameters (buffers excluded).
fn parameters(cfg: &ModelConfig, vm: &VarMap) -> usize {
    shapes(vm)
        .iter()
        .filter(|(k, _)| !cfg.is_buffer(k))
        .map(|(_, d)| Shape::from(d.clone()).elem_count())
        .sum()
}

/// Tensor names and shapes of HF's microsoft/resnet-* with 1000 labels, and their parameter
/// counts (HF's model card / torchvision: ResNet-18 11,689,512; -34 21,797,672; -50
/// 25,557,032; for ResNet-18 also counted by hand below).
#[test]
fn presets_have_hf_names_shapes_and_parameter_counts() {
    let cfg = resolved(ResNetConfig::preset(Preset::Resnet18), 1000, &[3, 224, 224]);
    let (vm, model) = build(&cfg, DType::F32);
    let s = shapes(&vm);
    for (name, want) in [
        (
            "resnet.embedder.embedder.convolution.weight",
            vec![64, 3, 7, 7],
        ),
        ("resnet.embedder.embedder.normalization.weight", vec![64]),
        (
            "resnet.embedder.embedder.normalization.running_mean",
            vec![64],
        ),
        (
            "resnet.embedder.embedder.normalization.num_batches_tracked",
            vec![],
        ),
        (
            "resnet.encoder.stages.0.layers.1.layer.1.convolution.weight",
            vec![64, 64, 3, 3],
        ),
        (
            "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight",
            vec![128, 64, 3, 3],
        ),
        (
            "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
            vec![128, 64, 1, 1],
        ),
        (
            "resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var",
            vec![128],
        ),
        (
            "resnet.encoder.stages.3.layers.1.layer.1.normalization.bias",
            vec![512],
        ),
        ("classifier.1.weight", vec![1000, 512]),
        ("classifier.1.bias", vec![1000]),
    ] {
        assert_eq!(s.get(name), Some(&want), "{name}");
    }
    // The first stage keeps 64 channels at stride 1: no shortcut; no conv has a bias.
    assert!(!s
        .keys()
        .any(|k| k.starts_with("resnet.encoder.stages.0.layers.0.shortcut")));
    assert!(!s.keys().any(|k| k.ends_with("convolution.bias")));
    // 20 BatchNorms (stem, 16 in the layers, 3 shortcuts), 5 tensors each; 2 convs per
    // layer + stem + 3 shortcuts = 20 convs; the classifier's 2.
    assert_eq!(s.len(), 20 * 5 + 20 + 2);

    // By hand: conv c_in·c_out·k², BN 2·c, classifier 512·1000 + 1000.
    let conv = |i: usize, o: usize, k: usize| i * o * k * k + 2 * o;
    let mut by_hand = conv(3, 64, 7);
    let mut c_in = 64;
    for (s, c) in [64, 128, 256, 512].into_iter().enumerate() {
        for l in 0..2 {
            let i = if l == 0 { c_in } else { c };
            by_hand += conv(i, c, 3) + conv(c, c, 3);
            if l == 0 && (i != c || s > 0) {
                by_hand += conv(i, c, 1);
            }
        }
        c_in = c;
    }
    by_hand += 512 * 1000 + 1000;
    assert_eq!(by_hand, 11_689_512);
    assert_eq!(parameters(&cfg, &vm), 11_689_512);
    // HF's microsoft/resnet-18 on a small image still runs (the pool is adaptive).
    let logits = model.forward(
        &rand(&[2, 3, 32, 32], 1).to_dtype(DType::F32).unwrap(),
        false,
    );
    assert_eq!(logits.unwrap().dims(), &[2, 1000]);

    for (preset, want) in [
        (Preset::Resnet34, 21_797_672),
        (Preset::Resnet50, 25_557_032),
    ] {
        let cfg = resolved(ResNetConfig::preset(preset), 1000, &[3, 224, 224]);
        let (vm, _) = build(&cfg, DType::F32);
        assert_eq!(parameters(&cfg, &vm), want, "{preset:?}");
        if preset == Preset::Resnet50 {
            let s = shapes(&vm);
            for (name, want) in [
                // Bottleneck v1.5: 1×1 reduce, 3×3 (strided), 1×1 expand; a shortcut already
                // in stage 0 (64 → 256 channels).
                (
                    "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight",
                    vec![256, 64, 1, 1],
                ),
                (
                    "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight",
                    vec![128, 256, 1, 1],
                ),
                (
                    "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight",
                    vec![128, 128, 3, 3],
                ),
                (
                    "resnet.encoder.stages.1.layers.0.layer.2.convolution.weight",
                    vec![512, 128, 1, 1],
                ),
                ("classifier.1.weight", vec![1000, 2048]),
            ] {
                assert_eq!(s.get(name), Some(&want), "{name}");
            }
        }
    }
}

/// A stride-2 layer halves the resolution where HF puts the stride: the 7×7 stem and the
/// pool each halve, stage 1 on halves again.
#[test]
fn downsampling_follows_hf() {
    for (first, bottleneck_1x1) in [(false, false), (true, false), (false, true)] {
        let c = ResNetConfig {
            downsample_in_first_stage: first,
            downsample_in_bottleneck: bottleneck_1x1,
            ..tiny(
                LayerType::Bottleneck,
                Stem::Imagenet,
                vec![4, 8],
                vec![1, 1],
            )
        };
        let ModelConfig::Resnet(c) = resolved(c, 2, &[1, 32, 32]) else {
            unreachable!()
        };
        let vm = VarMap::new();
        let vb = kiln_core::rng::seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu);
        let m = ResNet::new(&c, vb, SharedRng::new(0, "d"), DType::F32).unwrap();
        let x = rand(&[2, 1, 32, 32], 2).to_dtype(DType::F32).unwrap();
        let mut h = m.stem.forward(&x, false, DType::F32).unwrap();
        assert_eq!(h.dims(), &[2, 3, 16, 16]);
        h = kiln_kernels::max_pool2d_strided(&h, 3, 2, 1).unwrap();
        assert_eq!(h.dims(), &[2, 3, 8, 8]);
        let after0 = m.layers[0].forward(&h, false, DType::F32).unwrap();
        let s0 = if first { 4 } else { 8 };
        assert_eq!(after0.dims(), &[2, 4, s0, s0]);
        let after1 = m.layers[1].forward(&after0, false, DType::F32).unwrap();
        assert_eq!(after1.dims(), &[2, 8, s0 / 2, s0 / 2]);
        // Where the stride sits in the bottleneck (same shapes either way).
        let strides: Vec<usize> = m.layers[1].layer.iter().map(|c| c.stride).collect();
        assert_eq!(strides, if bottleneck_1x1 { [2, 1, 1] } else { [1, 2, 1] });
        assert_eq!(m.layers[1].shortcut.as_ref().unwrap().stride, 2);
    }
}

/// A training forward moves every BatchNorm's running statistics, in the VarMap; an
/// evaluation forward leaves them, and a model over detached copies (the trainer's
/// evaluation) computes the same logits as the trained model in evaluation mode.
#[test]
fn training_updates_running_stats_and_evaluation_reads_them() {
    let cfg = resolved(
        tiny(LayerType::Basic, Stem::Small, vec![3, 4], vec![1, 1]),
        3,
        &[1, 8, 8],
    );
    let (vm, model) = build(&cfg, DType::F32);
    let x = rand(&[4, 1, 8, 8], 5).to_dtype(DType::F32).unwrap();
    let snapshot = || -> HashMap<String, Vec<f32>> {
        vm.data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| cfg.is_buffer(k))
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let before = snapshot();
    assert_eq!(before.len(), 3 * 6); // stem, 2 + 2 layer convs, 1 shortcut
    let eval_before = model.forward(&x, false).unwrap();
    assert_eq!(snapshot(), before);
    model.forward(&x, true).unwrap();
    let after = snapshot();
    for (k, v) in &after {
        if k.ends_with(".num_batches_tracked") {
            assert_eq!(v, &[1.0], "{k}");
        } else {
            assert_ne!(v, &before[k], "{k} did not move");
        }
    }
    let eval_after = model.forward(&x, false).unwrap();
    assert_eq!(snapshot(), after);
    let diff = (&eval_after - &eval_before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-4, "evaluation ignores the running statistics");

    let vb = kiln_core::rng::detached_var_builder(&vm, DType::F32, &Device::Cpu);
    let detached = cfg.build(vb, SharedRng::new(0, "e"), DType::F32).unwrap();
    let got: Vec<f32> = detached
        .forward(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = eval_after.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want);
}

fn decode(toml_src: &str) -> std::result::Result<ResNetConfig, String> {
    toml::from_str(toml_src).map_err(|e| e.to_string())
}

#[test]
fn config_presets_overrides_and_errors() {
    let mut c = decode("preset = \"resnet-50\"\nhidden_sizes = [32, 64, 128, 256]").unwrap();
    c.resolve(&DataFacts::images(10, &[3, 32, 32])).unwrap();
    assert_eq!(c.embedding_size, Some(64));
    assert_eq!(c.hidden_sizes, Some(vec![32, 64, 128, 256]));
    assert_eq!(c.depths, Some(vec![3, 4, 6, 3]));
    assert_eq!(c.layer_type, Some(LayerType::Bottleneck));
    assert_eq!((c.num_channels, c.num_labels), (3, 10));
    assert_eq!(c.input_shape, [3, 32, 32]);
    // The resolved config round-trips through TOML and resolves to itself.
    let again = toml::to_string(&c).unwrap();
    let mut d = decode(&again).unwrap();
    d.resolve(&DataFacts::images(10, &[3, 32, 32])).unwrap();
    assert_eq!(c, d);

    let c = decode("preset = \"resnet-18\"\nstem = \"small\"").unwrap();
    assert_eq!(c.stem, Stem::Small);
    assert!(decode("preset = \"resnet-101\"")
        .unwrap_err()
        .contains("resnet-18"));
    assert!(decode("stem = \"tiny\"").unwrap_err().contains("imagenet"));
    assert!(decode("preset = \"resnet-18\"\nwidth = 3")
        .unwrap_err()
        .contains("width"));

    let err = |src: &str, input: &[usize]| {
        let mut c = decode(src).unwrap();
        c.resolve(&DataFacts::images(10, input)).unwrap_err()
    };
    let img = [3, 32, 32];
    assert_eq!(err("", &img).0, "model.embedding_size");
    assert_eq!(
        err("embedding_size = 8\nhidden_sizes = [8]\ndepths = [1]", &img).0,
        "model.layer_type"
    );
    let (k, m) = err("preset = \"resnet-18\"\ndepths = [2, 2]", &img);
    assert_eq!(k, "model.depths");
    assert!(m.contains("4 stages"), "{m}");
    let (k, m) = err("preset = \"resnet-50\"\nhidden_sizes = [2, 8, 8, 8]", &img);
    assert_eq!(k, "model.hidden_sizes");
    assert!(m.contains("at least 4"), "{m}");
    assert_eq!(
        err("preset = \"resnet-18\"\nhidden_act = \"gelu\"", &img).0,
        "model.hidden_act"
    );
    assert_eq!(err("preset = \"resnet-18\"", &[64]).0, "model.kind");
    assert_eq!(
        err("preset = \"resnet-18\"\nnum_channels = 1", &img).0,
        "model.num_channels"
    );
    assert_eq!(
        err("preset = \"resnet-18\"\nnum_labels = 5", &img).0,
        "model.num_labels"
    );
}
