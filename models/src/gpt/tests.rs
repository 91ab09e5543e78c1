use super::*;
use crate::testing::check_gradients;
use crate::{Model, ModelConfig};
use candle_core::{DType, Device};

#[test]
fn cached_decoding_matches_the_full_forward() {
    let cfg = GptConfig {
        block_size: 7,
        ..tiny()
    };
    crate::testing::check_cached_decoding(&ModelConfig::Gpt(cfg));
}

pub(crate) fn tiny() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 5,
        vocab_size: 7,
        dropout: 0.0,
        bias: true,
        checkpoint_activations: false,
    }
}

#[test]
fn gradients_match_finite_differences() {
    let x = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
    check_gradients(&ModelConfig::Gpt(tiny()), &x, &y);
}

#[test]
fn parameter_names_are_hugging_face_gpt2() {
    let vm = candle_nn::VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout"), DType::F32).unwrap();
    let data = vm.data().lock().unwrap();
    let shape = |n: &str| {
        data.get(n)
            .unwrap_or_else(|| panic!("missing {n}"))
            .dims()
            .to_vec()
    };
    assert_eq!(shape("transformer.wte.weight"), [7, 8]);
    assert_eq!(shape("transformer.wpe.weight"), [5, 8]);
    assert_eq!(shape("transformer.h.1.attn.c_attn.weight"), [8, 24]); // Conv1D: (in, out)
    assert_eq!(shape("transformer.h.1.mlp.c_proj.weight"), [32, 8]);
    assert_eq!(shape("transformer.ln_f.bias"), [8]);
    // 4 tensors outside the blocks, 12 per block, no separate head.
    assert_eq!(data.len(), 4 + 12 * 2);
}

#[test]
fn attention_is_causal() {
    // Changing a later token must not change earlier logits.
    let vm = candle_nn::VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
    let m = Gpt::new(&tiny(), vb, SharedRng::new(0, "dropout"), DType::F64).unwrap();
    crate::testing::check_causal(&m);
}

#[test]
fn dropout_reaches_the_attention_probabilities() {
    // As nanoGPT: a training forward of (B, T) tokens drops the embeddings (B·T·C draws), and
    // in each block the attention probabilities (B·H·T², drawn inside the attention kernel)
    // and the two branches' outputs (B·T·C each); a call reserves whole Philox blocks of 4.
    let cfg = GptConfig {
        dropout: 0.1,
        ..tiny()
    };
    let vm = candle_nn::VarMap::new();
    let vb = kiln_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let rng = SharedRng::new(0, "dropout");
    let m = Gpt::new(&cfg, vb, rng.clone(), DType::F32).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 5, 0, 1, 2]], &Device::Cpu).unwrap();
    let (b, t, c, h) = (2u64, 5u64, 8u64, 2u64);
    let blocks = |n: u64| n.next_multiple_of(4);
    let per_block = blocks(b * h * t * t) + 2 * blocks(b * t * c);
    let trained = m.forward(&ids, true).unwrap();
    assert_eq!(rng.position(), blocks(b * t * c) + 2 * per_block);
    // Evaluation draws nothing and differs from the dropped forward.
    let eval = m.forward(&ids, false).unwrap();
    assert_eq!(rng.position(), blocks(b * t * c) + 2 * per_block);
    assert!(crate::testing::max_abs_diff(&trained, &eval) > 0.0);
    // The exported config names the same probability for all three (GPT-2's three keys).
    let hf = cfg.to_hf().unwrap();
    for key in ["embd_pdrop", "resid_pdrop", "attn_pdrop"] {
        assert_eq!(hf[key], 0.1, "{key}");
    }
}
