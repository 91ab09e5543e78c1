use super::*;
use crate::testing::{max_abs_diff, rand, GradCheck};
use crate::ModelConfig;
use candle_core::{Device, Shape};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// 4×4 images of 2 channels in 2×2 patches (4 patches + CLS = 5 tokens).
pub(crate) fn tiny() -> ViTConfig {
    ViTConfig {
        image_size: 4,
        patch_size: 2,
        num_channels: 2,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        layer_norm_eps: 1e-12,
        qkv_bias: true,
        hidden_act: "gelu".into(),
        num_labels: 3,
        checkpoint_activations: false,
    }
}

fn build(cfg: &ViTConfig, dtype: DType) -> (VarMap, ViT) {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
    let m = ViT::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
    (vm, m)
}

#[test]
fn gradients_match_finite_differences() {
    let x = rand(&[2, 2, 4, 4], 1);
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    for qkv_bias in [true, false] {
        let cfg = ModelConfig::Vit(ViTConfig { qkv_bias, ..tiny() });
        GradCheck::default().finite_differences(&cfg, &x, &y);
    }
}

/// bf16/f16 matmuls against f32. Without the query/key/value biases: the key bias's true
/// gradient is 0 (q·(k_j + b) shifts every score of a query by the same q·b, which the
/// softmax ignores), so its mixed-precision gradient is pure rounding noise, and a relative
/// comparison against 0 means nothing. The f64 check above covers it.
#[test]
fn mixed_precision_matches_f32() {
    let cfg = ModelConfig::Vit(ViTConfig {
        qkv_bias: false,
        ..tiny()
    });
    let x = rand(&[2, 2, 4, 4], 1);
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    GradCheck::default().mixed_precision(&cfg, &x, &y);
}

/// The patch projection against the convolution with kernel = stride = P written out as
/// loops, on a non-square image (so that rows and columns of the patch grid cannot be
/// confused) with several channels and a batch of 2.
#[test]
fn patch_embedding_is_the_strided_convolution() {
    let (b, c, h, w, p, d) = (2, 3, 6, 9, 3, 4);
    let x = rand(&[b, c, h, w], 11);
    let weight = rand(&[d, c, p, p], 12);
    let bias = rand(&[d], 13);
    let pe = PatchEmbeddings {
        weight: weight.clone(),
        bias: bias.clone(),
        patch: p,
    };
    let got = pe.forward(&x, DType::F64).unwrap();
    let (nh, nw) = (h / p, w / p);
    assert_eq!(got.dims(), [b, nh * nw, d]);
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let wv: Vec<f64> = weight.flatten_all().unwrap().to_vec1().unwrap();
    let bv: Vec<f64> = bias.to_vec1().unwrap();
    let mut want = vec![0f64; b * nh * nw * d];
    for bi in 0..b {
        for i in 0..nh {
            for j in 0..nw {
                for o in 0..d {
                    let mut s = bv[o];
                    for ch in 0..c {
                        for u in 0..p {
                            for v in 0..p {
                                let xi = ((bi * c + ch) * h + i * p + u) * w + j * p + v;
                                let wi = ((o * c + ch) * p + u) * p + v;
                                s += wv[wi] * xv[xi];
                            }
                        }
                    }
                    // Conv2d's output (B, D, nh, nw), flatten(2).transpose(1, 2).
                    want[(bi * nh * nw + i * nw + j) * d + o] = s;
                }
            }
        }
    }
    let want = Tensor::from_vec(want, (b, nh * nw, d), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-12, "patch embedding vs convolution: {diff}");
    // A bad cut is an error, not a silently wrong reshape.
    assert!(pe.forward(&rand(&[1, c, 7, 9], 1), DType::F64).is_err());
    assert!(pe.forward(&rand(&[1, 2, 6, 9], 1), DType::F64).is_err());
}

/// The classifier reads the final-LayerNormed CLS token, which sees every patch (the
/// attention is bidirectional: the last pixel reaches the CLS token); images in a batch do
/// not mix.
#[test]
fn classifier_reads_the_normed_cls_token() {
    let (vm, m) = build(&tiny(), DType::F64);
    // Weights away from their initialization, so the check is not about zero biases.
    for (name, v) in vm.data().lock().unwrap().iter() {
        let r = rand(v.dims(), name.len() as u64);
        v.set(&(v.as_tensor() + (r * 0.3).unwrap()).unwrap())
            .unwrap();
    }
    let x = rand(&[2, 2, 4, 4], 5);
    let hidden = m.last_hidden_state(&x, false).unwrap();
    assert_eq!(hidden.dims(), [2, 5, 8]);
    let cls = hidden.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let want = m.classifier.forward(&cls, DType::F64, false).unwrap();
    let logits = m.forward(&x, false).unwrap();
    assert_eq!(logits.dims(), [2, 3]);
    assert!(max_abs_diff(&logits, &want) < 1e-12);
    // The last pixel (image 1, bottom-right patch) changes image 1's logits, not image 0's.
    let mut v: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    *v.last_mut().unwrap() += 1.0;
    let x2 = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
    let logits2 = m.forward(&x2, false).unwrap();
    let first = |t: &Tensor| t.get(0).unwrap();
    assert_eq!(max_abs_diff(&first(&logits), &first(&logits2)), 0.0);
    assert!(max_abs_diff(&logits.get(1).unwrap(), &logits2.get(1).unwrap()) > 1e-6);
    // Images of the wrong size are refused.
    let err = m.forward(&rand(&[2, 2, 6, 6], 1), false).unwrap_err();
    assert!(err.to_string().contains("(batch, 2, 4, 4)"), "{err}");
    assert!(m.forward(&rand(&[2, 3, 4, 4], 1), false).is_err());
}

#[test]
fn parameter_names_are_hugging_face_vit() {
    let names = |cfg: &ViTConfig| {
        let (vm, _) = build(cfg, DType::F32);
        let data = vm.data().lock().unwrap();
        let v: HashMap<String, Vec<usize>> = data
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        v
    };
    let all = names(&tiny());
    let shape = |n: &str| all.get(n).unwrap_or_else(|| panic!("missing {n}")).clone();
    let e = "vit.embeddings";
    assert_eq!(shape(&format!("{e}.cls_token")), [1, 1, 8]);
    assert_eq!(shape(&format!("{e}.position_embeddings")), [1, 5, 8]);
    let proj = format!("{e}.patch_embeddings.projection");
    assert_eq!(shape(&format!("{proj}.weight")), [8, 2, 2, 2]);
    assert_eq!(shape(&format!("{proj}.bias")), [8]);
    for i in 0..2 {
        let l = format!("vit.encoder.layer.{i}");
        for ln in ["layernorm_before", "layernorm_after"] {
            assert_eq!(shape(&format!("{l}.{ln}.weight")), [8]);
            assert_eq!(shape(&format!("{l}.{ln}.bias")), [8]);
        }
        for qkv in ["query", "key", "value"] {
            let p = format!("{l}.attention.attention.{qkv}");
            assert_eq!(shape(&format!("{p}.weight")), [8, 8]);
            assert_eq!(shape(&format!("{p}.bias")), [8]);
        }
        assert_eq!(shape(&format!("{l}.attention.output.dense.weight")), [8, 8]);
        assert_eq!(shape(&format!("{l}.attention.output.dense.bias")), [8]);
        // (out, in)
        assert_eq!(shape(&format!("{l}.intermediate.dense.weight")), [12, 8]);
        assert_eq!(shape(&format!("{l}.intermediate.dense.bias")), [12]);
        assert_eq!(shape(&format!("{l}.output.dense.weight")), [8, 12]);
        assert_eq!(shape(&format!("{l}.output.dense.bias")), [8]);
    }
    assert_eq!(shape("vit.layernorm.weight"), [8]);
    assert_eq!(shape("vit.layernorm.bias"), [8]);
    assert_eq!(shape("classifier.weight"), [3, 8]);
    assert_eq!(shape("classifier.bias"), [3]);
    // 4 embedding tensors, 16 per layer, the final norm's 2, the classifier's 2: no pooler.
    assert_eq!(all.len(), 4 + 16 * 2 + 2 + 2);
    assert!(!all.keys().any(|k| k.contains("pooler")));

    let no_bias = names(&ViTConfig {
        qkv_bias: false,
        ..tiny()
    });
    assert_eq!(no_bias.len(), all.len() - 3 * 2);
    assert!(!no_bias.contains_key("vit.encoder.layer.0.attention.attention.key.bias"));
    assert!(no_bias.contains_key("vit.encoder.layer.0.attention.output.dense.bias"));
}

/// Records the name and shape of each parameter a model asks for, handing out a
/// broadcast scalar (no storage) instead of initializing it.
struct Shapes(Arc<Mutex<Vec<(String, Shape)>>>);

impl candle_nn::var_builder::SimpleBackend for Shapes {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.lock().unwrap().push((name.into(), s.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: shapes only")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// HF's google/vit-base-patch16-224 config: image 224, patch 16, 3 channels, D = 768,
/// 12 layers of 12 heads, MLP 3072, 1000 labels. By hand, with N = (224/16)² = 196:
///   patch projection  768·3·16·16 + 768                 =    590,592
///   CLS + positions   768 + 197·768                     =    152,064
///   one layer         2·768 (LN before)
///                   + 3·(768·768 + 768) (q, k, v)       =  1,771,776
///                   + 768·768 + 768 (attention output)  =    590,592
///                   + 2·768 (LN after)
///                   + 768·3072 + 3072 (intermediate)    =  2,362,368
///                   + 3072·768 + 768 (output)           =  2,360,064
///                                                total  =  7,087,872
///   12 layers                                           = 85,054,464
///   final LayerNorm   2·768                             =      1,536
///   classifier        768·1000 + 1000                   =    769,000
///   sum: 590,592 + 152,064 + 85,054,464 + 1,536 + 769,000 = 86,567,656.
#[test]
fn vit_base_patch16_224_has_86_567_656_parameters() {
    let mut cfg: ViTConfig = toml::from_str(
        "patch_size = 16\nhidden_size = 768\nnum_hidden_layers = 12\n\
         num_attention_heads = 12\nintermediate_size = 3072\nnum_labels = 1000",
    )
    .unwrap();
    cfg.resolve(&DataFacts::images(1000, &[3, 224, 224]))
        .unwrap();
    assert_eq!((cfg.image_size, cfg.num_channels), (224, 3));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Shapes(seen.clone())), DType::F32, Device::Cpu);
    ViT::new(&cfg, vb, SharedRng::new(0, "d"), DType::F32).unwrap();
    let seen = seen.lock().unwrap();
    let total: usize = seen.iter().map(|(_, s)| s.elem_count()).sum();
    assert_eq!(total, 86_567_656);
    assert_eq!(seen.len(), 4 + 16 * 12 + 2 + 2);
    let shape = |n: &str| {
        let (_, s) = seen.iter().find(|(k, _)| k == n).unwrap();
        s.dims().to_vec()
    };
    assert_eq!(shape("vit.embeddings.position_embeddings"), [1, 197, 768]);
    assert_eq!(
        shape("vit.embeddings.patch_embeddings.projection.weight"),
        [768, 3, 16, 16]
    );
}

#[test]
fn resolve_fills_from_the_data_and_names_bad_keys() {
    let mut cfg: ViTConfig = toml::from_str(
        "patch_size = 7\nhidden_size = 8\nnum_hidden_layers = 2\nnum_attention_heads = 2\n\
         intermediate_size = 12",
    )
    .unwrap();
    assert_eq!(
        (
            cfg.layer_norm_eps,
            cfg.qkv_bias,
            cfg.hidden_act.as_str(),
            cfg.hidden_dropout_prob,
            cfg.attention_probs_dropout_prob,
            cfg.checkpoint_activations
        ),
        (1e-12, true, "gelu", 0.0, 0.0, false)
    );
    cfg.resolve(&DataFacts::images(10, &[1, 28, 28])).unwrap();
    assert_eq!(
        (cfg.image_size, cfg.num_channels, cfg.num_labels),
        (28, 1, 10)
    );
    assert_eq!(cfg.num_patches(), 16);

    let fails = |f: fn(&mut ViTConfig), input: &[usize], key: &str| {
        let mut c = tiny();
        f(&mut c);
        let (k, msg) = c.resolve(&DataFacts::images(3, input)).unwrap_err();
        assert_eq!(k, key, "{msg}");
        msg
    };
    let ok = [2, 4, 4];
    let msg = fails(|_| {}, &[2, 4, 6], "model.image_size");
    assert!(msg.contains("4×6") && msg.contains("square"), "{msg}");
    fails(|c| c.image_size = 8, &ok, "model.image_size");
    fails(|c| c.num_channels = 3, &ok, "model.num_channels");
    fails(|c| c.patch_size = 3, &ok, "model.patch_size");
    fails(|c| c.patch_size = 0, &ok, "model.patch_size");
    fails(|_| {}, &[16], "model.kind");
    fails(
        |c| c.num_attention_heads = 3,
        &ok,
        "model.num_attention_heads",
    );
    fails(|c| c.hidden_size = 0, &ok, "model.hidden_size");
    fails(|c| c.num_hidden_layers = 0, &ok, "model.num_hidden_layers");
    fails(|c| c.intermediate_size = 0, &ok, "model.intermediate_size");
    let msg = fails(
        |c| c.hidden_act = "gelu_new".into(),
        &ok,
        "model.hidden_act",
    );
    assert!(msg.contains("gelu_new"), "{msg}");
    fails(
        |c| c.hidden_dropout_prob = 1.0,
        &ok,
        "model.hidden_dropout_prob",
    );
    fails(
        |c| c.attention_probs_dropout_prob = -0.1,
        &ok,
        "model.attention_probs_dropout_prob",
    );
    fails(|c| c.layer_norm_eps = 0.0, &ok, "model.layer_norm_eps");
    fails(|c| c.num_labels = 1, &ok, "model.num_labels");
    fails(|c| c.num_labels = 2, &ok, "model.num_labels");
    // Given values that agree with the data pass.
    tiny().resolve(&DataFacts::images(3, &ok)).unwrap();
    assert!(toml::from_str::<ViTConfig>("patch_size = 2\nhidden_size = 8\nn_head = 2").is_err());
}

/// The model against HF's computation written out independently in plain f64 candle ops,
/// on weights moved away from their initialization (non-zero biases, non-unit norms): the
/// patch embedding as a strided `conv2d` + flatten(2) + transpose(1, 2), the CLS token
/// first, pre-LN layers, softmax(q·kᵀ/√d), the exact erf GELU, the final LayerNorm and the
/// classifier on the CLS token.
#[test]
fn forward_matches_a_plain_reference() {
    let cfg = tiny();
    let (vm, m) = build(&cfg, DType::F64);
    let data = vm.data().lock().unwrap();
    for (name, v) in data.iter() {
        let r = rand(v.dims(), name.len() as u64 + 7);
        v.set(&(v.as_tensor() + (r * 0.5).unwrap()).unwrap())
            .unwrap();
    }
    let w = |n: &str| data[n].as_tensor().clone();
    let x = rand(&[2, 2, 4, 4], 9);

    let ln = |x: &Tensor, p: &str| {
        let mu = x.mean_keepdim(2).unwrap();
        let xc = x.broadcast_sub(&mu).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        let y = xc
            .broadcast_div(&(var + cfg.layer_norm_eps).unwrap().sqrt().unwrap())
            .unwrap();
        y.broadcast_mul(&w(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&w(&format!("{p}.bias")))
            .unwrap()
    };
    let linear = |x: &Tensor, p: &str| {
        x.broadcast_matmul(&w(&format!("{p}.weight")).t().unwrap())
            .unwrap()
            .broadcast_add(&w(&format!("{p}.bias")))
            .unwrap()
    };
    let proj = "vit.embeddings.patch_embeddings.projection";
    let patches = x
        .conv2d(&w(&format!("{proj}.weight")), 0, cfg.patch_size, 1, 1)
        .unwrap()
        .broadcast_add(&w(&format!("{proj}.bias")).reshape((1, (), 1, 1)).unwrap())
        .unwrap()
        .flatten_from(2)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let cls = w("vit.embeddings.cls_token")
        .broadcast_as((2, 1, 8))
        .unwrap()
        .contiguous()
        .unwrap();
    let mut h = Tensor::cat(&[&cls, &patches], 1)
        .unwrap()
        .broadcast_add(&w("vit.embeddings.position_embeddings"))
        .unwrap();
    let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim());
    for i in 0..cfg.num_hidden_layers {
        let l = format!("vit.encoder.layer.{i}");
        let a = ln(&h, &format!("{l}.layernorm_before"));
        let heads = |n: &str| {
            linear(&a, &format!("{l}.attention.attention.{n}"))
                .reshape((2, 5, nh, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (heads("query"), heads("key"), heads("value"));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(3).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
        let ctx = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((2, 5, 8))
            .unwrap();
        h = (h + linear(&ctx, &format!("{l}.attention.output.dense"))).unwrap();
        let u = linear(
            &ln(&h, &format!("{l}.layernorm_after")),
            &format!("{l}.intermediate.dense"),
        );
        // 0.5·u·(1 + erf(u/√2)).
        let g = ((u.clone() * 0.5).unwrap()
            * ((u / std::f64::consts::SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap())
        .unwrap();
        h = (h + linear(&g, &format!("{l}.output.dense"))).unwrap();
    }
    let h = ln(&h, "vit.layernorm");
    let want = linear(
        &h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
        "classifier",
    );
    drop(data);
    let got = m.forward(&x, false).unwrap();
    assert_eq!(got.dims(), [2, 3]);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-10, "ViT vs the plain reference: {diff}");
    let hidden = m.last_hidden_state(&x, false).unwrap();
    assert!(max_abs_diff(&hidden, &h) < 1e-10);
}

#[test]
fn a_recipe_builds_a_vit() {
    let model = "[model]\nkind = \"vit\"\npatch_size = 7\nhidden_size = 16\n\
                 num_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 32\n";
    let (path, text) = crate::testing::recipe_with_model("fashion-mnist-cnn", model);
    let recipe = kiln_core::recipe::Recipe::parse(&path, &text, &[]).unwrap();
    let cfg = ModelConfig::from_recipe(&recipe, 10, &[1, 28, 28]).unwrap();
    assert_eq!(cfg.kind(), "vit");
    let ModelConfig::Vit(c) = &cfg else {
        panic!("{cfg:?}")
    };
    assert_eq!((c.image_size, c.num_channels, c.num_labels), (28, 1, 10));
    let model = crate::testing::check_table_round_trip(&cfg);
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.forward(&x, false).unwrap().dims(), [2, 10]);

    // Non-square images are refused at the key that would have to change.
    let err = ModelConfig::from_recipe(&recipe, 10, &[1, 28, 32])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image_size") && err.contains("square"),
        "{err}"
    );

    let bad = text.replace("kind = \"vit\"", "kind = \"vti\"");
    let recipe = kiln_core::recipe::Recipe::parse(&path, &bad, &[]).unwrap();
    let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
    assert!(err.contains("\"vit\""), "{err}");
}
