//! Helpers shared by the CUDA test binaries: the GPU (or why there is none), seeded inputs, the
//! relative error every comparison uses (`kiln_kernels::compare`), and a report that lists every failure at the end.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{Device, Tensor};
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

pub use kiln_kernels::compare::rel_err;

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
