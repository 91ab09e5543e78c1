//! kiln-kernels: the ops kiln trains with, each with a backward pass.
//!
//! candle-nn's fused norm/softmax/attention ops are applied without a backward, so gradients
//! silently stop at them (see DEVELOPERS.md). Every op here is differentiable. Today each one is
//! a composition of plain candle tensor ops, whose backward candle derives; these compositions
//! are also the readable references that fused CPU/CUDA kernels are checked against.
//!
//! Each op lives in its own file with a test against a scalar reference (values and, through
//! finite differences, gradients).

pub mod attention;
pub mod conv2d;
pub mod cross_entropy;
pub mod dropout;
pub mod gelu;
pub mod layer_norm;
pub mod max_pool;
pub mod softmax;

pub use attention::causal_self_attention;
pub use conv2d::conv2d;
pub use cross_entropy::cross_entropy;
pub use dropout::dropout;
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use max_pool::max_pool2d;
pub use softmax::softmax;

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::{Rng, SeedableRng};

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
        let grads = (out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}
