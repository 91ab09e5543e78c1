//! Checks several models share, run over each one's tiny test config.

use crate::testing::{check_checkpointing, check_gradients, rand};
use crate::{bert, cnn, gpt, llama, mlp, vit, ModelConfig};
use candle_core::{Device, Tensor};

/// Recomputing the layers in the backward (with dropout on) gives the stored-activation run's
/// logits and gradients, in every model that can checkpoint its activations.
#[test]
fn checkpointed_activations_give_identical_gradients() {
    let tokens = Tensor::new(&[[1u32, 2, 3, 4], [6, 5, 0, 1]], &Device::Cpu).unwrap();
    let next = Tensor::new(&[[2u32, 3, 4, 5], [5, 0, 1, 2]], &Device::Cpu).unwrap();
    let classes = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let (p, q) = (0.3, 0.2);
    let cases = [
        (
            ModelConfig::Gpt(gpt::GptConfig {
                dropout: p,
                ..gpt::tests::tiny()
            }),
            tokens.clone(),
            &next,
        ),
        (
            ModelConfig::Llama(llama::LlamaConfig {
                dropout: p,
                ..llama::tests::tiny()
            }),
            tokens,
            &next,
        ),
        (
            ModelConfig::Bert(bert::BertConfig {
                hidden_dropout_prob: p,
                attention_probs_dropout_prob: q,
                ..bert::tests::tiny(3)
            }),
            bert::tests::padded_batch(0),
            &classes,
        ),
        (
            ModelConfig::Vit(vit::ViTConfig {
                hidden_dropout_prob: p,
                attention_probs_dropout_prob: q,
                ..vit::tests::tiny()
            }),
            rand(&[2, 2, 4, 4], 1),
            &classes,
        ),
    ];
    for (cfg, input, targets) in &cases {
        check_checkpointing(cfg, input, targets);
    }
}

/// The MLP's and the CNN's gradients against finite differences, and in bf16/f16 against f32.
#[test]
fn small_classifiers_gradients_match_finite_differences() {
    let mlp = ModelConfig::Mlp(mlp::MlpConfig {
        hidden: vec![5, 4],
        dropout: 0.0,
        input_dim: 6,
        num_classes: 3,
    });
    let cnn = ModelConfig::Cnn(cnn::CnnConfig {
        channels: vec![2, 3],
        hidden: 5,
        dropout: 0.0,
        input_shape: vec![1, 6, 6],
        num_classes: 3,
    });
    let cases = [
        (mlp, rand(&[4, 1, 2, 3], 1), vec![0u32, 2, 1, 2]),
        (cnn, rand(&[2, 1, 6, 6], 1), vec![0, 2]),
    ];
    for (cfg, x, labels) in &cases {
        let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        check_gradients(cfg, x, &y);
    }
}
