use super::*;
use crate::gpt::GptConfig;
use crate::llama::LlamaConfig;
use serde_json::json;

fn tiny_gpt(bias: bool) -> ModelConfig {
    ModelConfig::Gpt(GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 16,
        vocab_size: 11,
        dropout: 0.1,
        bias,
        checkpoint_activations: false,
    })
}

#[test]
fn configs_round_trip_through_config_json() {
    let llama = ModelConfig::Llama(LlamaConfig {
        hidden_size: 16,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 11,
        max_position_embeddings: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        tie_word_embeddings: false,
        dropout: 0.0,
        checkpoint_activations: false,
    });
    let gpt = tiny_gpt(true);
    for cfg in [gpt, llama] {
        let v = hf_config(&cfg, DType::BF16, SpecialTokens::default()).unwrap();
        assert_eq!(v["torch_dtype"], "bfloat16");
        let mut back = from_hf_config(&v, Path::new("config.json")).unwrap();
        if let (ModelConfig::Gpt(b), ModelConfig::Gpt(a)) = (&mut back, &cfg) {
            b.dropout = a.dropout; // training-only
        }
        assert_eq!(back, cfg);
    }
}

#[test]
fn unsupported_configs_are_refused_by_key() {
    let mut v = hf_config(&tiny_gpt(true), DType::F32, SpecialTokens::default()).unwrap();
    v["activation_function"] = "relu".into();
    let e = from_hf_config(&v, Path::new("m/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m/config.json") && e.contains("activation_function"),
        "{e}"
    );
    let e = from_hf_config(&json!({"model_type": "t5"}), Path::new("c.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"t5\""), "{e}");
    let e = from_hf_config(&json!({"model_type": "gpt2"}), Path::new("c.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`n_embd` is missing"), "{e}");
}

#[test]
fn recipe_keys_over_a_pretrained_config() {
    let pre = tiny_gpt(true);
    let t: toml::Table = toml::from_str("dropout = 0.2\nn_layer = 2").unwrap();
    let m = merge_recipe_model(&pre, &t, "x").unwrap();
    assert_eq!(m["dropout"].as_float(), Some(0.2));
    let t: toml::Table = toml::from_str("n_layer = 3").unwrap();
    let (k, msg) = merge_recipe_model(&pre, &t, "hub:x").unwrap_err();
    assert_eq!(k, "model.n_layer");
    assert!(msg.contains("differs") && msg.contains("hub:x"), "{msg}");
    let t: toml::Table = toml::from_str("n_layers = 3").unwrap();
    assert_eq!(
        merge_recipe_model(&pre, &t, "x").unwrap_err().0,
        "model.n_layers"
    );
}

#[test]
fn gpt2_names_from_hf_checkpoints() {
    let cfg = tiny_gpt(true);
    let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let expected = vec![
        "transformer.wte.weight".to_string(),
        "transformer.h.0.attn.c_attn.bias".into(),
    ];
    // openai-community/gpt2 stores names without the prefix, plus mask buffers.
    let hf: HashMap<String, Tensor> = [
        "wte.weight",
        "h.0.attn.c_attn.bias",
        "h.0.attn.bias",
        "h.0.attn.masked_bias",
        "lm_head.weight",
    ]
    .iter()
    .map(|n| (n.to_string(), t.clone()))
    .collect();
    let got = from_hf_tensors(&cfg, hf.clone(), &expected, Path::new("m")).unwrap();
    let mut names: Vec<_> = got.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        ["transformer.h.0.attn.c_attn.bias", "transformer.wte.weight"]
    );
    let mut extra = hf.clone();
    extra.insert("h.0.mlp.gate.weight".into(), t.clone());
    let e = from_hf_tensors(&cfg, extra, &expected, Path::new("m"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("transformer.h.0.mlp.gate.weight"), "{e}");
    let mut short = hf;
    short.remove("wte.weight");
    let e = from_hf_tensors(&cfg, short, &expected, Path::new("m"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lacks") && e.contains("transformer.wte.weight"),
        "{e}"
    );
}

#[test]
fn bias_free_gpt_exports_zero_biases() {
    let cfg = tiny_gpt(false);
    let w = Tensor::ones((11, 8), DType::F32, &Device::Cpu).unwrap();
    let out = to_hf_tensors(
        &cfg,
        HashMap::from([("transformer.wte.weight".to_string(), w)]),
        DType::F16,
    )
    .unwrap();
    assert_eq!(out["transformer.wte.weight"].dtype(), DType::F16);
    assert_eq!(out["transformer.h.1.attn.c_attn.bias"].dims(), [24]);
    assert_eq!(out["transformer.ln_f.bias"].dims(), [8]);
    assert_eq!(out.len(), 1 + 2 * 6 + 1);
}

/// `cfg`'s parameters (seeded by `seed`), saved as a `model.safetensors`: its bytes.
fn weights_of(cfg: &ModelConfig, seed: u64) -> (VarMap, Vec<u8>) {
    let varmap = VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
    cfg.build(vb, crate::SharedRng::new(seed, "dropout"), DType::F32)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    varmap.save(&file).unwrap();
    (varmap, std::fs::read(file).unwrap())
}

#[test]
fn pretrained_weights_are_checked_before_the_model_is_built() {
    let text = hf_config(&tiny_gpt(true), DType::F32, SpecialTokens::default())
        .unwrap()
        .to_string();
    let cfg = parse_hf_config(&text, Path::new("m/config.json")).unwrap();
    let (saved, bytes) = weights_of(&cfg, 1);
    let file = Path::new("m/model.safetensors");
    let pretrained = parse_pretrained(&cfg, &bytes, file).unwrap();
    let (varmap, _) = weights_of(&cfg, 2);
    set_pretrained(&varmap, &cfg, pretrained).unwrap();
    let name = "transformer.h.1.mlp.c_fc.weight";
    let value = |vm: &VarMap| {
        let data = vm.data().lock().unwrap();
        data[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(value(&varmap), value(&saved));

    // A config asking for a billion-wide model over these few weights is refused before any
    // parameter is allocated.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["n_embd"] = 1_000_000_000u64.into();
    let huge = parse_hf_config(&v.to_string(), Path::new("m/config.json")).unwrap();
    let e = parse_pretrained(&huge, &bytes, file)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("m/model.safetensors") && e.contains("does not fit these weights"),
        "{e}"
    );
    // A longer context than the weights have: the tensor is named with both shapes.
    v["n_embd"] = 8.into();
    v["n_positions"] = 32.into();
    let longer = parse_hf_config(&v.to_string(), Path::new("m/config.json")).unwrap();
    let e = parse_pretrained(&longer, &bytes, file)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("transformer.wpe.weight has shape [16, 8]") && e.contains("[32, 8]"),
        "{e}"
    );
    // Not safetensors at all.
    let e = parse_pretrained(&cfg, b"{}", file)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot load m/model.safetensors"), "{e}");
}

#[test]
fn rope_tables_count_against_the_weights() {
    let text = json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 5,
        "max_position_embeddings": 4,
    });
    let cfg = parse_hf_config(&text.to_string(), Path::new("config.json")).unwrap();
    let (_, bytes) = weights_of(&cfg, 1);
    parse_pretrained(&cfg, &bytes, Path::new("model.safetensors")).unwrap();
    let mut v = text;
    v["max_position_embeddings"] = 1_000_000_000_000u64.into();
    let long = parse_hf_config(&v.to_string(), Path::new("config.json")).unwrap();
    let e = parse_pretrained(&long, &bytes, Path::new("model.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("RoPE"), "{e}");
}

/// The fuzz target's seeds: valid GPT-2, Llama and BERT folders load; the billion-wide GPT-2
/// is refused with its message alone (no backtrace, even under `RUST_BACKTRACE`).
#[test]
fn fuzz_seed_folders() {
    for name in ["gpt2", "llama", "bert", "bert-encoder", "gpt2-huge"] {
        let path = format!(
            "{}/../fuzz/corpus/hf_folder/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let data = std::fs::read(path).unwrap();
        let (config, weights) = data.split_at(data.iter().position(|&b| b == 0).unwrap());
        let cfg = parse_hf_config(std::str::from_utf8(config).unwrap(), Path::new("c")).unwrap();
        let loaded = parse_pretrained(&cfg, &weights[1..], Path::new("m"));
        match loaded {
            Err(e) if name == "gpt2-huge" => {
                let e = e.to_string();
                assert!(
                    e.contains("does not fit") && !e.contains("backtrace"),
                    "{e}"
                );
                assert!(e.lines().count() == 1, "{e}");
            }
            r => assert!(r.is_ok(), "{name}: {:?}", r.err()),
        }
    }
}
