//! Comparing a tensor with a reference, for tests and benches: the two measures every kiln
//! test uses, and [`vars_and_args`] and [`probe_grads`] for differentiating a function of
//! several inputs. Both read the tensors on any device and in any dtype (they are copied to the CPU
//! in f64), panic when the tensors differ in size or cannot be read, and return infinity when
//! either tensor holds a NaN or an infinity, so that a broken kernel can never pass a
//! `measure <= tolerance` check.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// The arguments of a function whose first `n_vars` inputs are differentiated: those as
/// variables, and every input as an argument (the variables' tensors, then the rest).
pub fn vars_and_args(inputs: &[Tensor], n_vars: usize) -> (Vec<Var>, Vec<Tensor>) {
    let vars: Vec<Var> = (inputs[..n_vars].iter())
        .map(|t| Var::from_tensor(t).expect("a float tensor"))
        .collect();
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[n_vars..].iter().cloned());
    (vars, args)
}

/// The gradients of `sum(out · probe)`: a fixed probe turns any output into a scalar whose
/// gradient reaches every element of it.
pub fn probe_grads(out: &Tensor, probe: &Tensor) -> candle_core::Result<GradStore> {
    (out * probe)?.sum_all()?.backward()
}

/// The elements of `t`, on the CPU, in f64.
fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64")
}

/// `a` and `b` as f64 vectors of the same length, or None when either holds a non-finite
/// value.
fn finite_pair(a: &Tensor, b: &Tensor, what: &str) -> Option<(Vec<f64>, Vec<f64>)> {
    let (a, b) = (f64s(a), f64s(b));
    assert_eq!(a.len(), b.len(), "{what} of tensors of different sizes");
    if a.iter().chain(&b).any(|x| !x.is_finite()) {
        return None;
    }
    Some((a, b))
}

/// max |a − b| over all elements, computed in f64 (0 for empty tensors); infinite when either
/// tensor holds a NaN or an infinity.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let Some((a, b)) = finite_pair(a, b, "max_abs_diff") else {
        return f64::INFINITY;
    };
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The relative error ‖a − b‖ / ‖b‖ (Euclidean norms over all elements, in f64), with `b` the
/// reference. When ‖b‖ ≤ 1e-6 (a reference that is zero up to rounding, such as the gradient
/// of a one-token attention's queries) it is the absolute ‖a − b‖ instead, so the comparison
/// is not against the reference's noise. Infinite when either tensor holds a NaN or an
/// infinity.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let Some((a, b)) = finite_pair(a, b, "rel_err") else {
        return f64::INFINITY;
    };
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    if norm.sqrt() <= 1e-6 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    type Measure = fn(&Tensor, &Tensor) -> f64;

    #[test]
    fn measures() {
        let (a, b) = (t(&[1.0, 2.0, 2.0]), t(&[1.0, 0.0, 0.0]));
        let nan = t(&[1.0, f32::NAN, 2.0]);
        let zero = t(&[0.0; 3]);
        // (measure, got, want, expected)
        let cases: [(Measure, &Tensor, &Tensor, f64); 7] = [
            (max_abs_diff, &a, &b, 2.0),
            (max_abs_diff, &a, &a, 0.0),
            (max_abs_diff, &nan, &a, f64::INFINITY),
            (rel_err, &a, &b, 8f64.sqrt()),
            (rel_err, &a, &a, 0.0),
            (rel_err, &a, &zero, 3.0),
            (rel_err, &a, &nan, f64::INFINITY),
        ];
        for (i, (measure, got, want, expected)) in cases.into_iter().enumerate() {
            let m = measure(got, want);
            assert!(
                m == expected || (m - expected).abs() < 1e-12,
                "case {i}: {m}"
            );
        }
    }
}
