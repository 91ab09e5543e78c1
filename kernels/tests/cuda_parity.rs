//! CUDA against CPU for every public op: the same inputs (generated in f32 on the CPU, cast to
//! the dtype there, then copied), forward and backward (autograd through `sum(out · probe)`),
//! in f32, bf16 and f16, at shapes that are not multiples of any block size. Each comparison is
//! ‖gpu − cpu‖ / ‖cpu‖ over a whole tensor; every result is printed, then the test fails on
//! any over its tolerance (or containing NaN/inf).
//!
//! Needs a GPU: without one each test prints why it skipped and passes.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use kiln_kernels::{AdamWHyper, AdamWTensor, IGNORE_INDEX};
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
/// f32 kernels differ from the CPU only in summation order: element-wise ops and short
/// reductions stay within a few ulps.
const F32_TOL: f64 = 1e-5;
/// Attention (tiled online softmax: rescaling in a different order, T-long dot products and
/// sums accumulated per tile) and cross-entropy (50k-term exp sums, block-tree vs sequential
/// order, feeding exp(x − lse) for every element) reorder long reductions whose rounding then
/// passes through exp; 1e-4 leaves room for that and still catches any real indexing error.
const F32_TOL_LONG: f64 = 1e-4;
/// bf16 has an 8-bit mantissa: one rounding of a value computed slightly differently in f32
/// is up to 2^-8 ≈ 4e-3 relative.
const HALF_TOL: f64 = 1e-2;

fn gpu() -> Option<Device> {
    // Without libcuda, cudarc panics instead of returning an error.
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
        Err(_) => {
            eprintln!("skipping: no CUDA device (the CUDA driver library could not be loaded)");
            None
        }
    }
}

/// A CPU f32 tensor with values uniform in [-scale, scale).
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// ‖a − b‖ / ‖b‖ in f64 (‖a − b‖ when b is zero); infinite when either holds a NaN or an
/// infinity, so a broken kernel can never pass.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
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
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Collects every comparison of one test and fails at the end, listing the failures.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
        let e = if gpu.dims() != cpu.dims() {
            eprintln!(
                "{what}: shapes differ, gpu {:?} vs cpu {:?}",
                gpu.dims(),
                cpu.dims()
            );
            f64::INFINITY
        } else {
            rel_err(gpu, cpu)
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

    fn error(&mut self, what: &str, e: candle_core::Error) {
        eprintln!("FAIL {what}: {e}");
        self.failures.push(format!("{what}: error {e}"));
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} comparisons failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// An op's input: floats are cast to the tested dtype and differentiated; ids are passed as is.
enum Input {
    Float(Tensor),
    Ids(Tensor),
}

/// Runs `f` on `dev` and returns its output and the gradients of sum(out · probe) w.r.t. each
/// float input, all on the CPU. The probe multiplies in f32, so its rounding is the same on
/// both devices.
fn run(
    dev: &Device,
    dtype: DType,
    inputs: &[Input],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut vars = Vec::new();
    let mut args = Vec::new();
    for input in inputs {
        match input {
            Input::Float(t) => {
                let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?;
                args.push(var.as_tensor().clone());
                vars.push(var);
            }
            Input::Ids(t) => args.push(t.to_device(dev)?),
        }
    }
    let out = f(&args)?;
    let probe = rand(out.dims(), 4242, 1.0).to_device(dev)?;
    let grads = out
        .to_dtype(DType::F32)?
        .mul(&probe)?
        .sum_all()?
        .backward()?;
    let mut g = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        let gi = grads
            .get(var)
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        g.push(gi.to_device(&Device::Cpu)?);
    }
    Ok((out.to_device(&Device::Cpu)?, g))
}

/// Compares `f` on the GPU and on the CPU in every dtype; `f32_tol` is the f32 tolerance.
fn parity(
    report: &mut Report,
    gpu: &Device,
    name: &str,
    inputs: &[Input],
    f32_tol: f64,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    for dtype in DTYPES {
        let what = format!("{name} {dtype:?}");
        let tol = if dtype == DType::F32 {
            f32_tol
        } else {
            HALF_TOL
        };
        let cpu = match run(&Device::Cpu, dtype, inputs, f) {
            Ok(r) => r,
            Err(e) => {
                report.error(&format!("{what} (cpu)"), e);
                continue;
            }
        };
        let gpu = match run(gpu, dtype, inputs, f) {
            Ok(r) => r,
            Err(e) => {
                report.error(&format!("{what} (cuda)"), e);
                continue;
            }
        };
        report.check(&format!("{what} forward"), &gpu.0, &cpu.0, tol);
        for (i, (g, c)) in gpu.1.iter().zip(&cpu.1).enumerate() {
            report.check(&format!("{what} grad of input {i}"), g, c, tol);
        }
    }
}

fn float(shape: &[usize], seed: u64, scale: f32) -> Input {
    Input::Float(rand(shape, seed, scale))
}

#[test]
fn layer_norm() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for (n, c) in [(37, 75), (37, 771), (5, 4099)] {
        let inputs = [
            Input::Float((rand(&[n, c], 1, 2.0) + 0.5).unwrap()),
            Input::Float((rand(&[c], 2, 0.5) + 1.0).unwrap()),
            float(&[c], 3, 0.5),
        ];
        parity(
            &mut report,
            &gpu,
            &format!("layer_norm [{n},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
        );
        parity(
            &mut report,
            &gpu,
            &format!("layer_norm without bias [{n},{c}]"),
            &inputs[..2],
            F32_TOL,
            &|t| kiln_kernels::layer_norm(&t[0], &t[1], None, 1e-5),
        );
    }
    // A 3-D input: the op normalizes the last dimension over all leading ones.
    let inputs = [
        float(&[3, 13, 75], 4, 1.0),
        float(&[75], 5, 1.0),
        float(&[75], 6, 1.0),
    ];
    parity(
        &mut report,
        &gpu,
        "layer_norm [3,13,75]",
        &inputs,
        F32_TOL,
        &|t| kiln_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
    );
    report.finish();
}

#[test]
fn rms_norm() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for (n, c) in [(37, 75), (37, 771), (5, 4099)] {
        let inputs = [
            float(&[n, c], 11, 2.0),
            Input::Float((rand(&[c], 12, 0.5) + 1.0).unwrap()),
        ];
        parity(
            &mut report,
            &gpu,
            &format!("rms_norm [{n},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::rms_norm(&t[0], &t[1], 1e-5),
        );
    }
    report.finish();
}

#[test]
fn softmax() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for shape in [vec![37, 75], vec![37, 771], vec![3, 5, 130], vec![2, 5003]] {
        let inputs = [float(&shape, 21, 4.0)];
        parity(
            &mut report,
            &gpu,
            &format!("softmax {shape:?}"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::softmax(&t[0]),
        );
    }
    report.finish();
}

#[test]
fn causal_self_attention() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for shape in [
        [2, 3, 67, 64],
        [1, 2, 130, 40],
        [1, 1, 1, 64],
        [2, 1, 33, 16],
    ] {
        let inputs = [
            float(&shape, 31, 1.5),
            float(&shape, 32, 1.5),
            float(&shape, 33, 1.0),
        ];
        parity(
            &mut report,
            &gpu,
            &format!("attention {shape:?}"),
            &inputs,
            F32_TOL_LONG,
            &|t| kiln_kernels::causal_self_attention(&t[0], &t[1], &t[2]),
        );
    }
    report.finish();
}

/// Targets for `n` rows of `v` classes, every fifth row ignored.
fn targets(n: usize, v: usize, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t: Vec<u32> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                IGNORE_INDEX
            } else {
                rng.random_range(0..v as u32)
            }
        })
        .collect();
    Tensor::new(t, &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    // Odd V: row starts are not 16-byte aligned, so the vector loads' scalar heads are used.
    for (n, v) in [(37, 50257), (37, 75), (4, 3), (9, 5003), (1, 65536)] {
        let inputs = [float(&[n, v], 41, 4.0), Input::Ids(targets(n, v, 42))];
        parity(
            &mut report,
            &gpu,
            &format!("cross_entropy [{n},{v}]"),
            &inputs,
            F32_TOL_LONG,
            &|t| kiln_kernels::cross_entropy(&t[0], &t[1]),
        );
    }
    // Logits that start at an offset in their buffer: rows 3.. of a contiguous matrix are a
    // contiguous view, passed to the kernel as is.
    let inputs = [float(&[12, 771], 43, 4.0), Input::Ids(targets(9, 771, 44))];
    parity(
        &mut report,
        &gpu,
        "cross_entropy rows 3.. of [12,771]",
        &inputs,
        F32_TOL_LONG,
        &|t| kiln_kernels::cross_entropy(&t[0].narrow(0, 3, 9)?, &t[1]),
    );
    // One logit dominating each row: the loss is ~1e-9 and must not round to 0 (log1p path).
    let (n, v) = (6, 1001);
    let t = targets(n, v, 45);
    let ids = t.to_vec1::<u32>().unwrap();
    let mut logits = rand(&[n, v], 46, 1.0).to_vec2::<f32>().unwrap();
    for (row, &id) in logits.iter_mut().zip(&ids) {
        if id != IGNORE_INDEX {
            row[id as usize] += 30.0;
        }
    }
    let inputs = [
        Input::Float(Tensor::new(logits, &Device::Cpu).unwrap()),
        Input::Ids(t),
    ];
    parity(
        &mut report,
        &gpu,
        "cross_entropy dominant logits",
        &inputs,
        F32_TOL_LONG,
        &|t| kiln_kernels::cross_entropy(&t[0], &t[1]),
    );
    // Every row ignored: loss 0, gradient 0 on both devices.
    let inputs = [
        float(&[5, 77], 47, 1.0),
        Input::Ids(Tensor::new(&[IGNORE_INDEX; 5], &Device::Cpu).unwrap()),
    ];
    parity(
        &mut report,
        &gpu,
        "cross_entropy all ignored",
        &inputs,
        F32_TOL_LONG,
        &|t| kiln_kernels::cross_entropy(&t[0], &t[1]),
    );
    report.finish();
}

#[test]
fn gelu() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for shape in [vec![37, 771], vec![3, 5, 75], vec![1]] {
        let inputs = [float(&shape, 51, 4.0)];
        parity(
            &mut report,
            &gpu,
            &format!("gelu {shape:?}"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::gelu(&t[0]),
        );
    }
    for (n, c) in [(37, 771), (37, 75), (1, 3)] {
        let inputs = [float(&[n, c], 52, 3.0), float(&[c], 53, 1.0)];
        parity(
            &mut report,
            &gpu,
            &format!("bias_gelu [{n},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::bias_gelu(&t[0], &t[1]),
        );
    }
    report.finish();
}

#[test]
fn embedding() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for (ids_shape, vocab, c) in [
        (vec![37], 1000, 75),
        (vec![3, 13], 50, 771),
        (vec![67], 7, 40),
    ] {
        let n: usize = ids_shape.iter().product();
        // Few distinct ids for the small vocabularies: many rows are summed into one.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(61);
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let ids = Tensor::from_vec(ids, ids_shape.as_slice(), &Device::Cpu).unwrap();
        let inputs = [Input::Ids(ids), float(&[vocab, c], 62, 1.0)];
        parity(
            &mut report,
            &gpu,
            &format!("embedding ids {ids_shape:?} of [{vocab},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::embedding(&t[0], &t[1]),
        );
    }
    report.finish();
}

/// The tensors of one AdamW parameter on one device, with the buffer `param` is a view of.
struct AdamWState {
    buffer: Tensor,
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    copy: Option<Tensor>,
    weight_decay: f32,
}

#[test]
fn adamw_step() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    // (elements, grad dtype, copy dtype, weight decay, offset of the param in its buffer):
    // sizes around the 4096-element chunk and single elements, every grad dtype, copies of
    // both 16-bit types and none, and params that start inside a larger buffer.
    let specs: [(usize, DType, Option<DType>, f32, usize); 7] = [
        (37 * 75, DType::BF16, Some(DType::BF16), 0.1, 0),
        (771, DType::F32, Some(DType::BF16), 0.0, 3),
        (1, DType::F16, Some(DType::F16), 0.1, 0),
        (4096 * 2 + 3, DType::BF16, Some(DType::BF16), 0.1, 5),
        (4095, DType::F32, None, 0.01, 0),
        (75, DType::F16, None, 0.0, 1),
        (4097, DType::BF16, Some(DType::F16), 0.1, 0),
    ];
    let make = |dev: &Device| -> Result<Vec<AdamWState>> {
        let mut states = Vec::new();
        for (i, &(n, _, copy, wd, offset)) in specs.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let buffer = rand(&[n + offset + 2], seed, 1.0).to_device(dev)?;
            let param = buffer.narrow(0, offset, n)?;
            let m = (rand(&[n], seed + 1, 0.01).to_device(dev))?;
            let v = (rand(&[n], seed + 2, 1e-4).abs()?.to_device(dev))?;
            let copy = match copy {
                Some(dt) => Some(param.to_dtype(dt)?),
                None => None,
            };
            // A placeholder: each step sets the gradient.
            let grad = param.zeros_like()?;
            states.push(AdamWState {
                buffer,
                param,
                grad,
                m,
                v,
                copy,
                weight_decay: wd,
            });
        }
        Ok(states)
    };
    let step = |states: &mut [AdamWState], dev: &Device, t: i32| -> Result<()> {
        for (i, (s, &(n, gdt, ..))) in states.iter_mut().zip(&specs).enumerate() {
            // Offset the gradient as well: a view one element into a larger buffer.
            let g = rand(&[n + 1], 1000 * t as u64 + i as u64, 2.0).to_dtype(gdt)?;
            s.grad = g.to_device(dev)?.narrow(0, 1, n)?;
        }
        let (b1, b2) = (0.9f32, 0.95f32);
        let hyper = AdamWHyper {
            lr: 1e-2,
            beta1: b1,
            beta2: b2,
            eps: 1e-8,
            bias_correction1: 1.0 - b1.powi(t),
            bias_correction2: 1.0 - b2.powi(t),
            grad_scale: 0.5,
        };
        let tensors: Vec<AdamWTensor> = states
            .iter()
            .map(|s| AdamWTensor {
                param: &s.param,
                grad: &s.grad,
                m: &s.m,
                v: &s.v,
                weight_decay: s.weight_decay,
                copy: s.copy.as_ref(),
            })
            .collect();
        kiln_kernels::adamw_step(&tensors, &hyper)
    };
    let run = |dev: &Device| -> Result<Vec<AdamWState>> {
        let mut states = make(dev)?;
        for t in 1..=3 {
            step(&mut states, dev, t)?;
        }
        Ok(states)
    };
    let (cpu, gpu) = match (run(&Device::Cpu), run(&gpu)) {
        (Ok(c), Ok(g)) => (c, g),
        (c, g) => {
            for e in [c.err(), g.err()].into_iter().flatten() {
                report.error("adamw", e);
            }
            report.finish();
            return;
        }
    };
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let (n, gdt, cdt, ..) = specs[i];
        let what = format!("adamw tensor {i} ({n} elements, grad {gdt:?}, copy {cdt:?})");
        // The buffer around the param must be untouched, the param itself updated alike.
        report.check(
            &format!("{what} param buffer"),
            &g.buffer,
            &c.buffer,
            F32_TOL,
        );
        report.check(&format!("{what} exp_avg"), &g.m, &c.m, F32_TOL);
        report.check(&format!("{what} exp_avg_sq"), &g.v, &c.v, F32_TOL);
        if let (Some(gc), Some(cc)) = (&g.copy, &c.copy) {
            report.check(&format!("{what} copy"), gc, cc, HALF_TOL);
            // The copy is exactly the new param, rounded.
            let want = g.param.to_dtype(gc.dtype()).unwrap();
            report.check(&format!("{what} copy = param (gpu)"), gc, &want, 0.0);
        }
    }
    report.finish();
}
