use super::*;
use crate::testing::{check_cached_decoding, check_gradients};
use crate::ModelConfig;
use candle_core::Device;

/// Grouped-query attention: 4 query heads share 2 key/value heads, head size 4.
pub(crate) fn tiny() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 7,
        max_position_embeddings: 5,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        dropout: 0.0,
        checkpoint_activations: false,
    }
}

/// Tied head, and 0 key/value heads meaning one per query head (plain multi-head).
fn tiny_tied() -> LlamaConfig {
    LlamaConfig {
        num_key_value_heads: 0,
        tie_word_embeddings: true,
        ..tiny()
    }
}

fn build(cfg: &LlamaConfig, dtype: DType) -> (candle_nn::VarMap, Llama) {
    let vm = candle_nn::VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, dtype, &Device::Cpu);
    let m = Llama::new(cfg, vb, SharedRng::new(0, "dropout"), dtype).unwrap();
    (vm, m)
}

#[test]
fn gradients_match_finite_differences() {
    let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
    for cfg in [tiny(), tiny_tied()] {
        check_gradients(&ModelConfig::Llama(cfg), &x, &y);
    }
}

#[test]
fn parameter_names_are_hugging_face_llama() {
    let shapes = |cfg: &LlamaConfig| {
        let (vm, _) = build(cfg, DType::F32);
        let data = vm.data().lock().unwrap();
        let mut v: Vec<(String, Vec<usize>)> = data
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        v.sort();
        v
    };
    let untied = shapes(&tiny());
    let shape = |n: &str| {
        let found = untied.iter().find(|(name, _)| name == n);
        found.unwrap_or_else(|| panic!("missing {n}")).1.clone()
    };
    assert_eq!(shape("model.embed_tokens.weight"), [7, 16]);
    assert_eq!(shape("model.layers.1.input_layernorm.weight"), [16]);
    assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [16, 16]); // (out, in)
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [8, 16]); // 2 kv heads of 4
    assert_eq!(shape("model.layers.1.self_attn.v_proj.weight"), [8, 16]);
    assert_eq!(shape("model.layers.1.self_attn.o_proj.weight"), [16, 16]);
    assert_eq!(
        shape("model.layers.1.post_attention_layernorm.weight"),
        [16]
    );
    assert_eq!(shape("model.layers.1.mlp.gate_proj.weight"), [24, 16]);
    assert_eq!(shape("model.layers.1.mlp.up_proj.weight"), [24, 16]);
    assert_eq!(shape("model.layers.1.mlp.down_proj.weight"), [16, 24]);
    assert_eq!(shape("model.norm.weight"), [16]);
    assert_eq!(shape("lm_head.weight"), [7, 16]);
    // 3 tensors outside the layers, 9 per layer; tied: no lm_head.
    assert_eq!(untied.len(), 3 + 9 * 2);
    let tied = shapes(&tiny_tied());
    assert_eq!(tied.len(), 2 + 9 * 2);
    assert!(tied.iter().all(|(n, _)| n != "lm_head.weight"));
    assert!(tied
        .iter()
        .any(|(n, s)| n == "model.layers.0.self_attn.k_proj.weight" && s == &[16, 16]));
}

#[test]
fn initialization() {
    let cfg = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        vocab_size: 256,
        ..tiny()
    };
    let (vm, _) = build(&cfg, DType::F64);
    let data = vm.data().lock().unwrap();
    let std = |n: &str| {
        let t = data[n].as_tensor();
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
    };
    let near = |got: f64, want: f64| (got / want - 1.0).abs() < 0.1;
    assert!(near(std("model.embed_tokens.weight"), 0.02));
    assert!(near(std("model.layers.0.mlp.up_proj.weight"), 0.02));
    assert!(near(std("model.layers.0.self_attn.o_proj.weight"), 0.01)); // 0.02 / √(2·2)
    assert!(near(std("model.layers.0.mlp.down_proj.weight"), 0.01));
    let norm: Vec<f64> = data["model.norm.weight"].as_tensor().to_vec1().unwrap();
    assert!(norm.iter().all(|&w| w == 1.0));
}

#[test]
fn rope_matches_hugging_face() {
    // HF: inv_freq = θ^(−[0, 2]/4) = [1, 0.01]; q·cos + rotate_half(q)·sin at position 1.
    let rope = Rope::new(3, 4, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let x = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
    let x = x.reshape((1, 1, 1, 4)).unwrap();
    let got: Vec<f64> = rope
        .apply(&x, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let want = [
        c1 - 3.0 * s1,
        2.0 * c2 - 4.0 * s2,
        3.0 * c1 + s1,
        4.0 * c2 + 2.0 * s2,
    ];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
    // Position 0 is the identity.
    let at0 = rope.apply(&x, 0).unwrap();
    assert_eq!(
        at0.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn attention_is_causal() {
    // Changing a later token must not change earlier logits.
    let (_, m) = build(&tiny(), DType::F64);
    crate::testing::check_causal(&m);
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    for cfg in [tiny(), tiny_tied()] {
        let cfg = LlamaConfig {
            max_position_embeddings: 7,
            ..cfg
        };
        check_cached_decoding(&ModelConfig::Llama(cfg));
    }
}

#[test]
fn resolve_fills_defaults_and_validates() {
    let mut cfg: LlamaConfig = toml::from_str(
        "hidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 2\n\
         num_attention_heads = 4",
    )
    .unwrap();
    assert_eq!((cfg.rms_norm_eps, cfg.rope_theta), (1e-5, 10000.0));
    cfg.resolve(&DataFacts::text(65, 32)).unwrap();
    assert_eq!(
        (
            cfg.num_key_value_heads,
            cfg.vocab_size,
            cfg.max_position_embeddings
        ),
        (4, 65, 32)
    );
    let fails = |f: fn(&mut LlamaConfig), key: &str| {
        let mut c = tiny();
        f(&mut c);
        assert_eq!(c.resolve(&DataFacts::text(7, 5)).unwrap_err().0, key);
    };
    fails(|c| c.num_key_value_heads = 3, "model.num_key_value_heads");
    fails(|c| c.num_key_value_heads = 8, "model.num_key_value_heads");
    fails(|c| c.num_attention_heads = 3, "model.num_attention_heads");
    fails(|c| c.hidden_size = 12, "model.num_attention_heads"); // head size 3 is odd
    fails(
        |c| c.max_position_embeddings = 4,
        "model.max_position_embeddings",
    );
    fails(|c| c.vocab_size = 6, "model.vocab_size");
    fails(|c| c.dropout = 1.0, "model.dropout");
    fails(|c| c.rope_theta = 0.0, "model.rope_theta");
    fails(|c| c.intermediate_size = 0, "model.intermediate_size");
    assert!(toml::from_str::<LlamaConfig>("hidden_size = 16\nn_head = 2").is_err());
}

#[test]
fn a_recipe_builds_a_llama() {
    let model = "[model]\nkind = \"llama\"\nhidden_size = 16\nintermediate_size = 24\n\
                 num_hidden_layers = 1\nnum_attention_heads = 4\nnum_key_value_heads = 1\n";
    let (path, text) = crate::testing::recipe_with_model("shakespeare-char", model);
    let recipe = kiln_core::recipe::Recipe::parse(&path, &text, &[]).unwrap();
    let cfg = ModelConfig::from_recipe(&recipe, 65, &[64]).unwrap();
    assert_eq!(cfg.kind(), "llama");
    let ModelConfig::Llama(c) = &cfg else {
        panic!("{cfg:?}")
    };
    assert_eq!(
        (
            c.vocab_size,
            c.max_position_embeddings,
            c.num_key_value_heads
        ),
        (65, 64, 1)
    );
    crate::testing::check_table_round_trip(&cfg);

    let bad = text.replace("kind = \"llama\"", "kind = \"lama\"");
    let recipe = kiln_core::recipe::Recipe::parse(&path, &bad, &[]).unwrap();
    let err = ModelConfig::decode(&recipe).unwrap_err().to_string();
    assert!(err.contains("unknown model kind \"lama\""), "{err}");
    // The choices come from the registry: every kind is named, also when `kind` is missing
    // (reported at the `[model]` table's line).
    let none = text.replace("kind = \"llama\"\n", "");
    let recipe = kiln_core::recipe::Recipe::parse(&path, &none, &[]).unwrap();
    let missing = ModelConfig::decode(&recipe).unwrap_err();
    let line = 1 + none.lines().position(|l| l == "[model]").unwrap();
    assert_eq!(missing.key, "model.kind");
    assert!(missing.location.ends_with(&format!(":{line}")), "{missing}");
    assert!(
        missing.message.starts_with("missing; valid choices"),
        "{missing}"
    );
    assert!(ModelConfig::KINDS.len() >= 7);
    for kind in ModelConfig::KINDS {
        assert!(err.contains(&format!("{kind:?}")), "{err}");
        assert!(missing.message.contains(&format!("{kind:?}")), "{missing}");
    }
}
