use super::*;
use crate::testing::{check_grad, max_abs_diff, rand};

/// The unfold kernel and its fold backward against the composition they replace, over
/// strides, paddings and kernel sizes (including windows that skip input rows, taps that only
/// ever see padding, and 'same' paddings, whose taps are copied and added as whole planes), in
/// every float dtype.
#[test]
fn unfold_kernel_matches_the_composition() {
    use candle_core::DType;
    let x = rand(&[2, 3, 7, 6], 11);
    for (k, s, p) in [
        (1, 1, 0),
        (3, 1, 1),
        (3, 2, 1),
        (2, 3, 0),
        (7, 2, 3),
        (3, 1, 4),
        (5, 1, 2),
        (13, 1, 6),
    ] {
        let (ho, wo) = ((7 + 2 * p - k) / s + 1, (6 + 2 * p - k) / s + 1);
        let g = Unfold {
            k,
            stride: s,
            padding: p,
            ho,
            wo,
        };
        let r = rand(&[3 * k * k, 2 * ho * wo], 12);
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let x = candle_core::Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let r = r.to_dtype(dtype).unwrap();
            let ours = unfold(&x, g).unwrap();
            let want = unfold_composed(&x, g).unwrap();
            // A pure gather: bit-identical values.
            assert_eq!(max_abs_diff(&ours, &want), 0.0, "{g:?} {dtype:?}");
            let dx = |y: Tensor| {
                let loss = (y * &r).unwrap().sum_all().unwrap();
                loss.backward().unwrap().get(&x).unwrap().clone()
            };
            let e = max_abs_diff(&dx(ours), &dx(want));
            // Sums of up to k² terms, in another order (bf16: 8 bits, so the bound grows with
            // the 169 terms of the 13 × 13 kernel).
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-5,
                _ => 0.1 * (k as f64 / 7.0).powi(2).max(1.0),
            };
            assert!(e <= tol, "{g:?} {dtype:?}: fold differs by {e}");
        }
    }
}

#[test]
fn matches_candle_conv2d_and_gradients() {
    let (x, w, b) = (
        rand(&[2, 3, 6, 5], 1),
        rand(&[4, 3, 3, 3], 2),
        rand(&[4], 3),
    );
    for p in [0, 1] {
        let ours = conv2d(&x, &w, Some(&b), p).unwrap();
        // candle's forward is a direct convolution: an independent reference.
        let want = x
            .conv2d(&w, p, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), want.dims());
        assert!(max_abs_diff(&ours, &want) < 1e-12);
    }
    check_grad(&x, |x| conv2d(x, &w, Some(&b), 1));
    check_grad(&w, |w| conv2d(&x, w, Some(&b), 1));
    check_grad(&b, |b| conv2d(&x, &w, Some(b), 1));
}

#[test]
fn strided_matches_candle_conv2d_and_gradients() {
    // Odd and even sizes, kernels smaller than, equal to and larger than the stride (a
    // ResNet's 1×1 stride-2 shortcut, 3×3 stride-2 convs, the 7×7 stride-2 stem).
    let x = rand(&[2, 3, 9, 8], 4);
    for (k, s, p) in [
        (1, 2, 0),
        (3, 2, 1),
        (3, 2, 0),
        (7, 2, 3),
        (3, 3, 1),
        (2, 3, 0),
    ] {
        let w = rand(&[4, 3, k, k], 5);
        let b = rand(&[4], 6);
        let ours = conv2d_strided(&x, &w, Some(&b), s, p).unwrap();
        let want = x
            .conv2d(&w, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), want.dims(), "k {k} s {s} p {p}");
        assert!(
            max_abs_diff(&ours, &want) < 1e-12,
            "k {k} s {s} p {p}: {}",
            max_abs_diff(&ours, &want)
        );
    }
    let x = rand(&[2, 2, 7, 6], 7);
    for (k, s, p) in [(1, 2, 0), (3, 2, 1)] {
        let w = rand(&[3, 2, k, k], 8);
        check_grad(&x, |x| conv2d_strided(x, &w, None, s, p));
        check_grad(&w, |w| conv2d_strided(&x, w, None, s, p));
    }
}

/// The fused op (f32 and f64 on the CPU) against the unfold + batch matmul graph: values and
/// both gradients, with more images than one dW partial holds, fewer images than threads, a
/// stride, and windows small enough that images share a product (8 of 42 positions, 3 of 100,
/// with a smaller group left over), or not (400), and more stride-1 geometries: valid and a 5×5
/// kernel padded by 1 (not whole-plane shifts), and a 1×1 (one).
#[test]
fn fused_matches_the_unfolded_graph() {
    use candle_core::{DType, Var};
    let cases = [
        (19, (7, 6), 3, 1, 1),
        (1, (7, 6), 3, 2, 1),
        (10, (7, 6), 1, 2, 0),
        (11, (10, 10), 3, 1, 1),
        (3, (20, 20), 3, 1, 1),
        (4, (9, 8), 3, 1, 0),
        (2, (7, 6), 5, 1, 1),
        (2, (6, 5), 1, 1, 0),
    ];
    for (b, (hi, wi), k, s, p) in cases {
        let x = rand(&[b, 3, hi, wi], 21);
        let w = rand(&[5, 3, k, k], 22);
        let (ho, wo) = ((hi + 2 * p - k) / s + 1, (wi + 2 * p - k) / s + 1);
        let g = Unfold {
            k,
            stride: s,
            padding: p,
            ho,
            wo,
        };
        let up = rand(&[b, 5, ho, wo], 23);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let wv = Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap();
            let up = up.to_dtype(dtype).unwrap();
            let run = |y: Tensor| {
                let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(xv.as_tensor()).unwrap().clone();
                (y, dx, grads.get(wv.as_tensor()).unwrap().clone())
            };
            let fused = run(conv2d_strided(xv.as_tensor(), wv.as_tensor(), None, s, p).unwrap());
            let graph = run(conv2d_unfolded(xv.as_tensor(), wv.as_tensor(), None, g).unwrap());
            for (what, a, b_) in [
                ("y", &fused.0, &graph.0),
                ("dx", &fused.1, &graph.1),
                ("dw", &fused.2, &graph.2),
            ] {
                let e = max_abs_diff(a, b_);
                assert!(e < tol, "{what} b {b} k {k} s {s} {dtype:?}: {e}");
            }
        }
    }
}
