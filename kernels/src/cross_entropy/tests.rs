use super::*;
use crate::reference;
use crate::testing::{check_grad, check_parity, rand};
use candle_core::Device;

fn targets(n: usize, v: usize) -> Tensor {
    let t: Vec<u32> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                IGNORE_INDEX
            } else {
                (i * 7919 % v) as u32
            }
        })
        .collect();
    Tensor::new(t, &Device::Cpu).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let logits = (rand(&[6, 5], 11) * 5.0).unwrap();
    let t = targets(6, 5);
    check_grad(&logits, |l| cross_entropy(l, &t));
}

#[test]
fn matches_the_composition_in_every_dtype() {
    for (n, v) in [(1, 2), (37, 75), (9, 5003)] {
        let inputs = [(rand(&[n, v], 4) * 6.0).unwrap(), targets(n, v)];
        check_parity(
            &inputs,
            1,
            |t| cross_entropy(&t[0], &t[1]),
            |t| reference::cross_entropy(&t[0], &t[1]),
        );
    }
}

#[test]
fn all_ignored_gives_zero_loss_and_gradient() {
    let logits = candle_core::Var::from_tensor(&rand(&[3, 4], 1)).unwrap();
    let t = Tensor::new(&[IGNORE_INDEX; 3], &Device::Cpu).unwrap();
    let loss = cross_entropy(&logits, &t).unwrap();
    assert_eq!(loss.to_scalar::<f64>().unwrap(), 0.0);
    let g = loss.backward().unwrap();
    let g = g.get(&logits).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(g.to_scalar::<f64>().unwrap(), 0.0);
}

#[test]
fn half_precision_gradients_do_not_underflow() {
    // 4096 rows, class 1's probability ≈ 4.8e-5: (p − onehot)/count ≈ 1.2e-8 is below half
    // f16's smallest subnormal (6e-8), so a gradient stored that way before the loss scale
    // was applied would be 0. With the scale (1024) applied with 1/count it is 1.2e-5.
    let (n, v) = (4096, 8);
    let mut x = vec![0f64; n * v];
    for row in x.chunks_mut(v) {
        row[1] = -8.0;
    }
    let logits = Tensor::from_vec(x, (n, v), &Device::Cpu).unwrap();
    let t = Tensor::new(vec![0u32; n], &Device::Cpu).unwrap();
    let grad_of = |dtype| -> Vec<f64> {
        let var = candle_core::Var::from_tensor(&logits.to_dtype(dtype).unwrap()).unwrap();
        let loss = (cross_entropy(var.as_tensor(), &t).unwrap() * 1024.0).unwrap();
        let g = loss.backward().unwrap();
        g.get(&var)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let want = grad_of(candle_core::DType::F64);
    let got = grad_of(candle_core::DType::F16);
    assert!(want[1] > 1.1e-5 && want[1] < 1.3e-5, "{}", want[1]);
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-2 * w.abs(),
            "class {j}: f16 {g:e} vs f64 {w:e}"
        );
    }
}

#[test]
fn logits_outside_a_graph_give_the_same_loss_without_a_gradient() {
    let logits = (rand(&[37, 75], 4) * 6.0).unwrap();
    let t = targets(37, 75);
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        let x = logits.to_dtype(dtype).unwrap();
        let plain = cross_entropy(&x, &t).unwrap();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let tracked = cross_entropy(var.as_tensor(), &t).unwrap();
        assert!(!plain.track_op() && tracked.track_op());
        assert_eq!(
            plain.to_scalar::<f32>().unwrap(),
            tracked.to_scalar::<f32>().unwrap()
        );
    }
}

#[test]
fn a_second_backward_through_one_forward_is_an_error() {
    let var = candle_core::Var::from_tensor(&rand(&[3, 4], 1)).unwrap();
    let loss = cross_entropy(var.as_tensor(), &targets(3, 4)).unwrap();
    loss.backward().unwrap();
    let err = loss.backward().unwrap_err();
    assert!(err.to_string().contains("second backward"), "{err}");
}

#[test]
fn out_of_range_target_is_an_error() {
    let err = cross_entropy(
        &rand(&[2, 4], 1),
        &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("target 4 of row 1"), "{err}");
}
