use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

pub use crate::compare::{max_abs_diff, rel_err};

/// A random f64 tensor with values in [-1, 1).
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks the autograd gradient of `sum(f(x) * probe)` w.r.t. `x` against central finite
/// differences, in f64.
pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
    assert_eq!(x.dtype(), DType::F64);
    let var = Var::from_tensor(x).unwrap();
    let out = f(var.as_tensor()).unwrap();
    let probe = rand(out.dims(), 99);
    let loss = |t: &Tensor| -> f64 {
        (f(t).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = crate::compare::probe_grads(&out, &probe).unwrap();
    let g: Vec<f64> = grads
        .get(&var)
        .expect("x has a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-5;
    for i in 0..xs.len() {
        let mut p = xs.clone();
        p[i] += h;
        let mut m = xs.clone();
        m[i] -= h;
        let tp = Tensor::from_vec(p, x.dims(), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(m, x.dims(), &Device::Cpu).unwrap();
        let fd = (loss(&tp) - loss(&tm)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "gradient mismatch at {i}: autograd {} vs finite differences {fd}",
            g[i]
        );
    }
}

/// The relative-error bound for an op's outputs and gradients in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Checks a fused op against its reference composition: for each float dtype, the inputs
/// (f64; non-float inputs such as ids pass through) are rounded to the dtype, the fused op
/// runs in that dtype, the reference in f64 on the same rounded values, and the output and
/// the gradients of the first `n_grads` inputs must agree within [`tolerance`].
pub fn check_parity(
    inputs: &[Tensor],
    n_grads: usize,
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        let cast = |t: &Tensor, d: DType| -> Tensor {
            if t.dtype().is_float() {
                t.to_dtype(d).unwrap()
            } else {
                t.clone()
            }
        };
        let rounded: Vec<Tensor> = inputs
            .iter()
            .map(|t| cast(&cast(t, dtype), DType::F64))
            .collect();
        // The gradient of sum(out · probe), with the probe rounded to `dtype` for both runs.
        let run = |ts: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let (vars, args) = crate::compare::vars_and_args(ts, n_grads);
            let out = f(&args).unwrap();
            let probe = cast(&cast(&rand(out.dims(), 77), dtype), out.dtype());
            let grads = crate::compare::probe_grads(&out, &probe).unwrap();
            let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
            (out, g)
        };
        let in_dtype: Vec<Tensor> = rounded.iter().map(|t| cast(t, dtype)).collect();
        let (got, got_g) = run(&in_dtype, &fused);
        let (want, want_g) = run(&rounded, &reference);
        let tol = tolerance(dtype);
        let e = rel_err(&got, &want);
        assert!(e <= tol, "{dtype:?} output: relative error {e:e} > {tol:e}");
        for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
            let e = rel_err(g, w);
            assert!(
                e <= tol,
                "{dtype:?} gradient of input {i}: relative error {e:e} > {tol:e}"
            );
        }
    }
}
