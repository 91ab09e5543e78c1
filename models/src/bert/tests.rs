use super::*;
use crate::testing::{max_abs_diff, GradCheck};
use crate::ModelConfig;
use candle_core::Device;
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(crate) fn tiny(num_labels: usize) -> BertConfig {
    BertConfig {
        vocab_size: 11,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 6,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        num_labels,
        checkpoint_activations: false,
        lora: None,
    }
}

fn with_lora(num_labels: usize) -> BertConfig {
    BertConfig {
        lora: Some(LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["query".into(), "value".into(), "output.dense".into()],
        }),
        ..tiny(num_labels)
    }
}

fn logits_of(m: &Bert, x: &Tensor) -> Vec<f64> {
    m.forward(x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn lora_input() -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 0], [3, 4, 9, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    pack_inputs(&ids, &mask).unwrap()
}

/// Adapters sit where PEFT puts them, train alone (with the head), and start as a no-op.
#[test]
fn lora_adapters_are_peft_named_trainable_and_start_as_the_base() {
    let cfg = with_lora(3);
    let (vm, m) = build(&cfg, DType::F64);
    let data = vm.data().lock().unwrap();
    let q = "bert.encoder.layer.1.attention.self.query";
    assert_eq!(data[&format!("{q}.lora_A.weight")].dims(), [2, 8]);
    assert_eq!(data[&format!("{q}.lora_B.weight")].dims(), [8, 2]);
    // `output.dense` matches the layer output and the attention output, not `intermediate`.
    assert!(data.contains_key("bert.encoder.layer.0.output.dense.lora_A.weight"));
    assert!(data.contains_key("bert.encoder.layer.0.attention.output.dense.lora_A.weight"));
    assert!(!data.contains_key("bert.encoder.layer.0.intermediate.dense.lora_A.weight"));
    assert!(!data
        .keys()
        .any(|k| k.starts_with("bert.encoder.layer.0.attention.self.key.lora")));
    let mc = crate::ModelConfig::Bert(cfg.clone());
    let trainable: Vec<&String> = data.keys().filter(|k| mc.trainable(k)).collect();
    assert_eq!(
        trainable.len(),
        2 * 4 * 2 + 2,
        "A and B of 4 layers (query, value, 2 × output.dense) × 2 blocks, + head"
    );
    assert!(!mc.trainable("bert.encoder.layer.0.attention.self.query.weight"));
    drop(data);
    // B = 0: the adapted model computes the base model's function.
    let (_, base) = build(&tiny(3), DType::F64);
    assert_eq!(
        logits_of(&m, &lora_input()),
        logits_of(&base, &lora_input())
    );
}

/// Merging the adapters into the weights gives the adapter-applied forward.
#[test]
fn lora_merge_equals_the_adapter_forward() {
    let cfg = with_lora(3);
    let (vm, m) = build(&cfg, DType::F64);
    for (name, v) in vm.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            let r = crate::testing::rand(v.dims(), name.len() as u64);
            v.set(&(r * 0.5).unwrap()).unwrap();
        }
    }
    let (_, base) = build(&tiny(3), DType::F64);
    let want = logits_of(&m, &lora_input());
    assert_ne!(
        want,
        logits_of(&base, &lora_input()),
        "the adapters change the function"
    );
    let mut tensors: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let merged = crate::lora::merge(&mut tensors, cfg.lora.as_ref().unwrap()).unwrap();
    assert_eq!(merged, 8);
    assert!(!tensors.keys().any(|k| k.contains("lora_")));
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
    let plain = Bert::new(&tiny(3), vb, SharedRng::new(0, "d"), DType::F64).unwrap();
    let got = logits_of(&plain, &lora_input());
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-12, "merged vs adapted: {diff}");
}

#[test]
fn lora_gradients_match_finite_differences() {
    let cfg = crate::ModelConfig::Bert(with_lora(3));
    let x = lora_input();
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    GradCheck::default().finite_differences(&cfg, &x, &y);
}

fn build(cfg: &BertConfig, dtype: DType) -> (VarMap, Bert) {
    let vm = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
    let m = Bert::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
    (vm, m)
}

/// Two sequences of 5 positions, the second with 2 padded ones.
pub(crate) fn padded_batch(pad_id: u32) -> Tensor {
    let ids = Tensor::new(
        &[[1u32, 2, 3, 4, 5], [6, 5, 10, pad_id, pad_id]],
        &Device::Cpu,
    );
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu);
    pack_inputs(&ids.unwrap(), &mask.unwrap()).unwrap()
}

/// The shared gradient checks, with BERT's particulars: the encoder alone leaves its pooler
/// unused; the key biases' true gradient is 0 (a bias on every key shifts all of a query's
/// scores alike, which the softmax ignores), so in bf16/f16 they are held to the scale of the
/// same layer's query bias gradient; f16's backward is loss-scaled, as the trainer's is (the
/// query and key gradients of this tiny, nearly uniform attention are ~1e-7, which f16 flushes
/// to subnormals).
fn check_gradients(cfg: &BertConfig, input: &Tensor, targets: &Tensor) {
    let head = cfg.num_labels > 0;
    let unused = |name: &str| !head && name.starts_with("pooler.");
    let zero = |name: &str| {
        let layer = name.strip_suffix("key.bias")?;
        Some(format!("{layer}query.bias"))
    };
    let check = GradCheck {
        f16_loss_scale: 65536.0,
        unused: &unused,
        zero_gradient: &zero,
        ..GradCheck::default()
    };
    let cfg = ModelConfig::Bert(cfg.clone());
    check.finite_differences(&cfg, input, targets);
    check.mixed_precision(&cfg, input, targets);
}

#[test]
fn gradients_match_finite_differences() {
    let input = padded_batch(0);
    // With a head: the shared check, then BERT's (which adds mixed precision).
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    GradCheck::default().finite_differences(&ModelConfig::Bert(tiny(3)), &input, &y);
    check_gradients(&tiny(3), &input, &y);
    // The encoder alone: a target feature per position.
    let y = Tensor::new(&[[1u32, 7, 3, 0, 5], [2, 2, 6, 4, 1]], &Device::Cpu).unwrap();
    check_gradients(&tiny(0), &input, &y);
}

#[test]
fn padding_does_not_reach_the_real_positions() {
    for num_labels in [0, 3] {
        let (_, m) = build(&tiny(num_labels), DType::F64);
        let out = |x: &Tensor| m.forward(x, false).unwrap();
        let real = |y: Tensor| match num_labels {
            0 => y.get(1).unwrap().narrow(0, 0, 3).unwrap(),
            _ => y.get(1).unwrap(),
        };
        let (a, b) = (out(&padded_batch(0)), out(&padded_batch(9)));
        // Exactly: padded keys get a weight of exactly 0.
        assert_eq!(max_abs_diff(&real(a.clone()), &real(b.clone())), 0.0);
        // The unpadded sequence alone gives the same outputs (up to summation order).
        let alone = pack_inputs(
            &Tensor::new(&[[6u32, 5, 10]], &Device::Cpu).unwrap(),
            &Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let c = out(&alone).get(0).unwrap();
        assert!(max_abs_diff(&real(a.clone()), &c) < 1e-12);
        // …while the padded positions' own outputs (encoder) do change.
        if num_labels == 0 {
            let pad = |y: &Tensor| y.get(1).unwrap().narrow(0, 3, 2).unwrap();
            assert!(max_abs_diff(&pad(&a), &pad(&b)) > 0.0);
        }
    }
}

#[test]
fn parameter_names_are_hugging_face_bert() {
    let names = |cfg: &BertConfig| {
        let (vm, _) = build(cfg, DType::F32);
        let data = vm.data().lock().unwrap();
        let v: HashMap<String, Vec<usize>> = data
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        v
    };
    let enc = names(&tiny(0));
    let shape = |n: &str| enc.get(n).unwrap_or_else(|| panic!("missing {n}")).clone();
    assert_eq!(shape("embeddings.word_embeddings.weight"), [11, 8]);
    assert_eq!(shape("embeddings.position_embeddings.weight"), [6, 8]);
    assert_eq!(shape("embeddings.token_type_embeddings.weight"), [2, 8]);
    assert_eq!(shape("embeddings.LayerNorm.bias"), [8]);
    let l = "encoder.layer.1";
    assert_eq!(shape(&format!("{l}.attention.self.query.weight")), [8, 8]);
    assert_eq!(shape(&format!("{l}.attention.self.key.bias")), [8]);
    assert_eq!(shape(&format!("{l}.attention.self.value.weight")), [8, 8]);
    assert_eq!(shape(&format!("{l}.attention.output.dense.weight")), [8, 8]);
    assert_eq!(
        shape(&format!("{l}.attention.output.LayerNorm.weight")),
        [8]
    );
    assert_eq!(shape(&format!("{l}.intermediate.dense.weight")), [12, 8]); // (out, in)
    assert_eq!(shape(&format!("{l}.output.dense.weight")), [8, 12]);
    assert_eq!(shape(&format!("{l}.output.LayerNorm.bias")), [8]);
    assert_eq!(shape("pooler.dense.weight"), [8, 8]);
    // 5 embedding tensors, 16 per layer, 2 in the pooler.
    assert_eq!(enc.len(), 5 + 16 * 2 + 2);

    let cls = names(&tiny(3));
    assert_eq!(cls.len(), enc.len() + 2);
    for (n, s) in &enc {
        assert_eq!(cls.get(&format!("bert.{n}")), Some(s), "bert.{n}");
    }
    assert_eq!(cls["classifier.weight"], [3, 8]);
    assert_eq!(cls["classifier.bias"], [3]);
}

#[test]
fn resolve_fills_defaults_and_validates() {
    let mut cfg: BertConfig = toml::from_str(
        "vocab_size = 11\nhidden_size = 8\nnum_hidden_layers = 2\nnum_attention_heads = 2\n\
         intermediate_size = 12",
    )
    .unwrap();
    assert_eq!(
        (
            cfg.type_vocab_size,
            cfg.layer_norm_eps,
            cfg.hidden_dropout_prob,
            cfg.attention_probs_dropout_prob,
            cfg.num_labels,
            cfg.checkpoint_activations
        ),
        (2, 1e-12, 0.1, 0.1, 0, false)
    );
    cfg.resolve(&DataFacts::text(2, 32)).unwrap();
    assert_eq!(cfg.max_position_embeddings, 32);
    let fails = |f: fn(&mut BertConfig), key: &str| {
        let mut c = tiny(3);
        f(&mut c);
        assert_eq!(c.resolve(&DataFacts::text(3, 6)).unwrap_err().0, key);
    };
    fails(|c| c.num_attention_heads = 3, "model.num_attention_heads");
    fails(
        |c| c.max_position_embeddings = 5,
        "model.max_position_embeddings",
    );
    fails(|c| c.hidden_dropout_prob = 1.0, "model.hidden_dropout_prob");
    fails(
        |c| c.attention_probs_dropout_prob = -0.1,
        "model.attention_probs_dropout_prob",
    );
    fails(|c| c.num_labels = 2, "model.num_labels");
    fails(|c| c.num_labels = 1, "model.num_labels");
    fails(|c| c.layer_norm_eps = 0.0, "model.layer_norm_eps");
    fails(|c| c.vocab_size = 0, "model.vocab_size");
    fails(|c| c.type_vocab_size = 0, "model.type_vocab_size");
    assert!(toml::from_str::<BertConfig>("vocab_size = 3\nn_head = 2").is_err());
    // The encoder alone takes any number of classes.
    tiny(0).resolve(&DataFacts::text(100, 6)).unwrap();
}

#[test]
fn configs_round_trip_through_config_json() {
    for num_labels in [0, 5] {
        let cfg = BertConfig {
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.05,
            ..tiny(num_labels)
        };
        let v = cfg.to_hf().unwrap();
        let arch = ["BertModel", "BertForSequenceClassification"][(num_labels > 0) as usize];
        assert_eq!(v["architectures"][0], arch);
        assert_eq!(config_from_hf(&v).unwrap(), cfg);
    }
    // HF writes id2label, not num_labels.
    let mut v = tiny(3).to_hf().unwrap();
    v.as_object_mut().unwrap().remove("num_labels");
    v["id2label"] = json!({"0": "neg", "1": "neu", "2": "pos"});
    assert_eq!(config_from_hf(&v).unwrap().num_labels, 3);
    // Another architecture's encoder: no head.
    v["architectures"] = json!(["BertForMaskedLM"]);
    assert_eq!(config_from_hf(&v).unwrap().num_labels, 0);

    let refused = |key: &str, value: Value| {
        let mut v = tiny(0).to_hf().unwrap();
        v[key] = value;
        let e = config_from_hf(&v).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    };
    refused("hidden_act", "gelu_new".into());
    refused("position_embedding_type", "relative_key".into());
    refused("is_decoder", true.into());
    refused("model_type", "roberta".into());
    refused("hidden_size", Value::Null);
    let mut v = tiny(2).to_hf().unwrap();
    v["problem_type"] = "regression".into();
    assert!(config_from_hf(&v)
        .unwrap_err()
        .to_string()
        .contains("problem_type"));
}

#[test]
fn a_recipe_builds_a_bert() {
    let model = "[model]\nkind = \"bert\"\nvocab_size = 65\nhidden_size = 16\n\
                 num_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 32\n";
    let (path, text) = crate::testing::recipe_with_model("shakespeare-char", model);
    let recipe = kiln_core::recipe::Recipe::parse(&path, &text, &[]).unwrap();
    let cfg = ModelConfig::from_recipe(&recipe, 65, &[64]).unwrap();
    assert_eq!(cfg.kind(), "bert");
    let ModelConfig::Bert(c) = &cfg else {
        panic!("{cfg:?}")
    };
    assert_eq!((c.max_position_embeddings, c.num_labels), (64, 0));
    let model = crate::testing::check_table_round_trip(&cfg);
    let x = pack_inputs(
        &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
        &Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(model.forward(&x, false).unwrap().dims(), [1, 3, 16]);
    let err = model.forward(&x.get(0).unwrap(), false).unwrap_err();
    assert!(err.to_string().contains("(batch, 2, seq)"), "{err}");

    let bad = text.replace("kind = \"bert\"", "kind = \"bret\"");
    let recipe = kiln_core::recipe::Recipe::parse(&path, &bad, &[]).unwrap();
    let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
    assert!(err.contains("\"bert\""), "{err}");
}

/// The shared folder, or None (the test skips) unless KILN_REQUIRE_SHARED=1.
fn shared(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("KILN_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and KILN_REQUIRE_SHARED=1", p.display());
    }
    eprintln!("skipping: {} not found", p.display());
    None
}

/// The pretrained sentence-transformers/all-MiniLM-L6-v2 against the outputs of HF
/// transformers (reference_embeddings.json): token ids, last hidden state, and the
/// mean-pooled normalized embeddings, one sentence at a time and as a padded batch.
#[test]
fn matches_pretrained_all_minilm_l6_v2() {
    let Some(dir) = shared("all-MiniLM-L6-v2") else {
        return;
    };
    let read_json = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let cfg = config_from_hf(&read_json("config.json")).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_labels),
        (384, 6, 0)
    );
    assert_eq!(cfg.layer_norm_eps, 1e-12);

    let (vm, model) = build(&cfg, DType::F32);
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    // A buffer (arange of positions), not a parameter.
    assert!(tensors.remove("embeddings.position_ids").is_some());
    {
        let data = vm.data().lock().unwrap();
        let mut ours: Vec<&String> = data.keys().collect();
        let mut theirs: Vec<&String> = tensors.keys().collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "parameter names differ from the checkpoint's");
        for (name, var) in data.iter() {
            assert_eq!(var.dims(), tensors[name].dims(), "{name}");
            var.set(&tensors[name]).unwrap();
        }
    }

    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // tokenizer.json pads and truncates to 128 by default.
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    let dev = Device::Cpu;
    let reference = read_json("reference_embeddings.json");
    let sentences = reference["sentences"].as_array().unwrap();
    let floats = |v: &Value| -> Vec<f32> {
        let a = v.as_array().unwrap();
        a.iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let (mut max_hidden_diff, mut min_cos) = (0f64, 1f64);
    let mut all_ids = Vec::new();
    let mut singles = Vec::new();
    for s in sentences {
        let text = s["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        let want: Vec<u32> = (s["input_ids"].as_array().unwrap().iter())
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "{text}");
        let t = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = t.ones_like().unwrap();
        let hidden = model.encode(&t, &mask, false).unwrap();
        // Model::forward on the packed input is the same computation.
        let packed = model
            .forward(&pack_inputs(&t, &mask).unwrap(), false)
            .unwrap();
        assert_eq!(max_abs_diff(&packed, &hidden), 0.0);

        let first8 = hidden
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap();
        let want8 = Tensor::new(floats(&s["last_hidden_state_token0_first8"]), &dev).unwrap();
        let d = max_abs_diff(&first8, &want8);
        assert!(d <= 1e-4, "{text}: token 0 hidden state differs by {d}");
        max_hidden_diff = max_hidden_diff.max(d);

        let emb = l2_normalize(&mean_pooled(&hidden, &mask).unwrap()).unwrap();
        let emb: Vec<f32> = emb.get(0).unwrap().to_vec1().unwrap();
        let want = floats(&s["embedding_normalized"]);
        assert_eq!(emb.len(), 384);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
        };
        let cos = dot(&emb, &want) / (dot(&emb, &emb) * dot(&want, &want)).sqrt();
        assert!(cos >= 0.9999, "{text}: cosine {cos}");
        min_cos = min_cos.min(cos);
        all_ids.push(ids);
        singles.push(emb);
    }

    // Cosine similarities between the sentences, against the reference matrix.
    let mut max_sim_diff = 0f64;
    for (i, row) in reference["cosine_similarity_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (j, want) in floats(row).into_iter().enumerate() {
            let got: f32 = singles[i].iter().zip(&singles[j]).map(|(a, b)| a * b).sum();
            max_sim_diff = max_sim_diff.max((got - want).abs() as f64);
        }
    }
    assert!(
        max_sim_diff <= 1e-4,
        "similarities differ by {max_sim_diff}"
    );

    // All sentences as one padded batch give the one-at-a-time embeddings.
    let t = all_ids.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for s in &all_ids {
        ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())));
        mask.extend((0..t).map(|i| (i < s.len()) as u32));
    }
    let n = all_ids.len();
    let ids = Tensor::from_vec(ids, (n, t), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (n, t), &dev).unwrap();
    let hidden = model
        .forward(&pack_inputs(&ids, &mask).unwrap(), false)
        .unwrap();
    let batched = l2_normalize(&mean_pooled(&hidden, &mask).unwrap()).unwrap();
    let mut max_batch_diff = 0f64;
    for (i, single) in singles.iter().enumerate() {
        let single = Tensor::new(single.as_slice(), &dev).unwrap();
        max_batch_diff = max_batch_diff.max(max_abs_diff(&batched.get(i).unwrap(), &single));
    }
    // HF's pooler_output (BertModel, transformers 5.24.0 on this folder, the same two
    // sentences padded to 11 tokens), first 6 values, for the classification head's input.
    let pooled = model.pooled(&hidden).unwrap();
    let want_pooled = [
        [
            0.0134286f32,
            0.0400362,
            0.0030797,
            0.0077095,
            -0.0857406,
            -0.0328736,
        ],
        [
            0.0625217, -0.0569555, 0.0113349, 0.0263086, -0.1301868, -0.0593565,
        ],
    ];
    let mut max_pooled_diff = 0f64;
    for (row, want) in [0, 3].into_iter().zip(want_pooled) {
        let got = pooled.get(row).unwrap().narrow(0, 0, 6).unwrap();
        let want = Tensor::new(&want, &dev).unwrap();
        max_pooled_diff = max_pooled_diff.max(max_abs_diff(&got, &want));
    }
    assert!(
        max_pooled_diff <= 1e-5,
        "pooler output differs by {max_pooled_diff}"
    );
    assert!(
        max_batch_diff <= 1e-5,
        "batched embeddings differ by {max_batch_diff}"
    );
    println!(
        "all-MiniLM-L6-v2: token-0 hidden state max |diff| {max_hidden_diff:.2e}, min cosine \
         1 - {:.1e}, similarity matrix max |diff| {max_sim_diff:.2e}, padded batch vs \
         single max |diff| {max_batch_diff:.2e}, pooler max |diff| {max_pooled_diff:.2e}",
        1.0 - min_cos
    );
}
