//! Helpers shared by the CUDA test binaries: the GPU (or why there is none), seeded inputs, the
//! relative error every comparison uses, and a report that lists every failure at the end.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// The first CUDA device, or None after printing why the test skips.
pub fn gpu() -> Option<Device> {
    match kiln_core::device::open_device("cuda") {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// A CPU f32 tensor with values uniform in [-scale, scale).
pub fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// ‖a − b‖ / ‖b‖ in f64 (‖a − b‖ when ‖b‖ ≤ 1e-6); infinite when either holds a NaN or an
/// infinity, so a broken kernel can never pass.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("tensor to f64")
    };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len(), "rel_err of tensors of different sizes");
    if a.iter().chain(&b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    // A reference that is zero up to rounding (the dq, dk of a one-token attention are exactly
    // 0, the FMA kernel's are ~3e-7): compare absolutely, not against its noise.
    if norm.sqrt() <= 1e-6 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Collects every comparison of one test and fails at the end, listing the failures.
#[derive(Default)]
pub struct Report {
    pub failures: Vec<String>,
}

impl Report {
    /// Compares `got` with `want` (‖got − want‖ / ‖want‖ ≤ `tol`), printing the result.
    pub fn check(&mut self, what: &str, got: &Tensor, want: &Tensor, tol: f64) {
        let e = if got.dims() != want.dims() {
            eprintln!(
                "{what}: shapes differ, {:?} vs {:?}",
                got.dims(),
                want.dims()
            );
            f64::INFINITY
        } else {
            rel_err(got, want)
        };
        let ok = e <= tol;
        eprintln!(
            "{} {what}: rel err {e:.3e} (tol {tol:.0e})",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.failures.push(format!("{what}: {e:.3e} > {tol:.0e}"));
        }
    }

    pub fn error(&mut self, what: &str, e: candle_core::Error) {
        self.fail(what, &format!("error {e}"));
    }

    pub fn fail(&mut self, what: &str, why: &str) {
        eprintln!("FAIL {what}: {why}");
        self.failures.push(format!("{what}: {why}"));
    }

    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} comparisons failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}
