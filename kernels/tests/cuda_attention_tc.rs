//! The tensor-core attention kernels (cuda/attention_tc.cu) against the CPU op and against the
//! f32 FMA kernels (cuda/attention.cu), forward and backward (o, dq, dk, dv through autograd of
//! sum(o · probe)), in bf16 and f16, at shapes that are not multiples of the 64-row tiles.
//! Each comparison is ‖a − b‖ / ‖b‖ over a whole tensor; every result is printed, then the
//! test fails on any over 1e-2 (or containing NaN/inf).
//!
//! The kernel is chosen once per process (`KILN_ATTENTION_KERNEL=fma` forces the FMA one), so
//! the FMA results come from a child process: this test binary run again with that variable
//! set, on the ignored helper `fma_reference_dump`, which writes them to a safetensors file.
//! `attention_timing` (ignored; `--ignored --nocapture`) prints ms and TFLOP/s of both kernels.
//!
//! Needs a GPU: without one each test prints why it skipped and passes.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

mod common;

use common::{gpu, rand, Report};

const SHAPES: [[usize; 4]; 5] = [
    [1, 2, 200, 64],
    [2, 2, 150, 128],
    [2, 3, 67, 64],
    [1, 1, 1, 64],
    [2, 12, 1024, 64],
];
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];
/// bf16 keeps 8 mantissa bits (one rounding is up to 2^-8 ≈ 4e-3 relative); the tensor-core
/// kernels also round P and dS to the input dtype before their products.
const TOL: f64 = 1e-2;
const OUTPUTS: [&str; 4] = ["o", "dq", "dk", "dv"];
/// Environment variable naming the file the FMA child writes.
const DUMP_VAR: &str = "KILN_ATTENTION_TC_TEST_DUMP";

/// Whether this process runs the FMA kernels (`KILN_ATTENTION_KERNEL=fma`, as the library
/// reads it).
fn fma_forced() -> bool {
    std::env::var("KILN_ATTENTION_KERNEL").is_ok_and(|v| v.trim().eq_ignore_ascii_case("fma"))
}

/// q, k, v for `shape` (f32, on the CPU): the same in every process.
fn inputs(shape: &[usize; 4]) -> [Tensor; 3] {
    [
        rand(shape, 31, 1.5),
        rand(shape, 32, 1.5),
        rand(shape, 33, 1.0),
    ]
}

/// o, dq, dk, dv (f32, on the CPU) of the op on `dev` in `dtype`, the gradients those of
/// sum(o · probe) with a fixed f32 probe.
fn run(dev: &Device, dtype: DType, shape: &[usize; 4]) -> Result<[Tensor; 4]> {
    let vars = inputs(shape)
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let o = kiln_kernels::causal_self_attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let probe = rand(o.dims(), 4242, 1.0).to_device(dev)?;
    let grads = kiln_kernels::compare::probe_grads(&o.to_dtype(DType::F32)?, &probe)?;
    let grad = |i: usize| -> Result<Tensor> {
        let g = grads
            .get(&vars[i])
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        g.to_dtype(DType::F32)?.to_device(&Device::Cpu)
    };
    Ok([
        o.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        grad(0)?,
        grad(1)?,
        grad(2)?,
    ])
}

fn key(shape: &[usize; 4], dtype: DType, output: &str) -> String {
    let [b, h, t, d] = shape;
    format!("{b}x{h}x{t}x{d}_{dtype:?}_{output}")
}

/// Runs `test` of this test binary in a child process with KILN_ATTENTION_KERNEL=fma and the
/// extra environment `env`; its output goes to this process's stdout/stderr.
fn run_fma_child(test: &str, env: &[(&str, &Path)]) -> std::result::Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("KILN_ATTENTION_KERNEL", "fma");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("spawning the FMA child: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the FMA child exited with {status}"))
    }
}

/// The FMA kernel's o, dq, dk, dv for every shape and dtype, computed in a child process.
fn fma_reference() -> std::result::Result<HashMap<String, Tensor>, String> {
    let path = std::env::temp_dir().join(format!(
        "kiln_attention_fma_{}.safetensors",
        std::process::id()
    ));
    run_fma_child("fma_reference_dump", &[(DUMP_VAR, path.as_path())])?;
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format!("reading {}: {e}", path.display()));
    let _ = std::fs::remove_file(&path);
    loaded
}

/// Child side of `fma_reference` (run by it with KILN_ATTENTION_KERNEL=fma): writes the FMA
/// results to the file named by KILN_ATTENTION_TC_TEST_DUMP.
#[test]
#[ignore = "helper: run by tensor_core_kernels_match_cpu_and_fma in a child process"]
fn fma_reference_dump() {
    let Some(path) = std::env::var_os(DUMP_VAR) else {
        eprintln!("skipping: {DUMP_VAR} not set (this helper runs in a child process)");
        return;
    };
    assert!(
        fma_forced(),
        "fma_reference_dump needs KILN_ATTENTION_KERNEL=fma"
    );
    let gpu = gpu().expect("the FMA child found no CUDA device");
    let mut out = HashMap::new();
    for shape in &SHAPES {
        for dtype in DTYPES {
            let r = run(&gpu, dtype, shape).expect("FMA kernel run");
            for (name, t) in OUTPUTS.iter().zip(r) {
                out.insert(key(shape, dtype, name), t);
            }
        }
    }
    candle_core::safetensors::save(&out, &path).expect("writing the FMA results");
}

#[test]
fn tensor_core_kernels_match_cpu_and_fma() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    let fma = if fma_forced() {
        eprintln!(
            "note: KILN_ATTENTION_KERNEL=fma is set, so the GPU results below are the FMA \
             kernel's and the comparison with it is skipped"
        );
        None
    } else {
        match fma_reference() {
            Ok(m) => Some(m),
            Err(e) => {
                report.fail("FMA reference", &e);
                None
            }
        }
    };
    let label = if fma_forced() { "fma" } else { "tc" };
    for shape in &SHAPES {
        for dtype in DTYPES {
            let what = format!("attention {shape:?} {dtype:?}");
            let cpu = match run(&Device::Cpu, dtype, shape) {
                Ok(r) => r,
                Err(e) => {
                    report.fail(&format!("{what} (cpu)"), &e.to_string());
                    continue;
                }
            };
            let dev = match run(&gpu, dtype, shape) {
                Ok(r) => r,
                Err(e) => {
                    report.fail(&format!("{what} (cuda)"), &e.to_string());
                    continue;
                }
            };
            for (i, name) in OUTPUTS.iter().enumerate() {
                report.check(
                    &format!("{what} {name}: {label} vs cpu"),
                    &dev[i],
                    &cpu[i],
                    TOL,
                );
                if let Some(fma) = &fma {
                    match fma.get(&key(shape, dtype, name)) {
                        Some(f) => {
                            report.check(
                                &format!("{what} {name}: {label} vs fma"),
                                &dev[i],
                                f,
                                TOL,
                            );
                            report.check(&format!("{what} {name}: fma vs cpu"), f, &cpu[i], TOL);
                        }
                        None => report.fail(&format!("{what} {name}"), "no FMA result"),
                    }
                }
            }
        }
    }
    report.finish();
}

/// Useful FLOPs of causal attention (half of the T×T products): forward 2 matmuls, backward 5.
fn flops(shape: &[usize; 4]) -> (f64, f64) {
    let [b, h, t, d] = shape.map(|x| x as f64);
    let fwd = 2.0 * 2.0 * b * h * t * t * d / 2.0;
    (fwd, fwd * 3.5)
}

/// Mean milliseconds of `f` over `iters` runs after `warmup` runs, synchronizing the device
/// before and after.
fn time_ms(dev: &Device, warmup: usize, iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let start = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// Forward and forward+backward times of this process's kernel in bf16; then, unless the FMA
/// kernel is already forced, the same in a child process with KILN_ATTENTION_KERNEL=fma.
/// forward+backward includes candle's autograd around the op (a cast, a sum, gradient
/// bookkeeping), small beside attention at these sizes.
#[test]
#[ignore = "timing: run with --ignored --nocapture on a GPU"]
fn attention_timing() {
    let Some(gpu) = gpu() else { return };
    let label = if fma_forced() { "fma" } else { "tensor-core" };
    for shape in [[16, 12, 1024, 64], [64, 6, 256, 64]] {
        let make = |seed: u64| -> Result<Var> {
            let t = rand(&shape, seed, 1.0).to_dtype(DType::BF16)?;
            Var::from_tensor(&t.to_device(&gpu)?)
        };
        let (q, k, v) = (make(1).unwrap(), make(2).unwrap(), make(3).unwrap());
        // Without dropout, then with nanoGPT's 0.2 on the probabilities (the `_drop` kernels).
        let draw = kiln_kernels::dropout::Draw {
            p: 0.2,
            key: [1, 2],
            start: 0,
        };
        for (drop, what) in [(None, ""), (Some(&draw), " dropout 0.2")] {
            let fwd = || -> Result<Tensor> {
                let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                kiln_kernels::causal_self_attention_dropout(q, k, v, drop)
            };
            let f_ms = time_ms(&gpu, 3, 20, &|| fwd().map(|_| ())).unwrap();
            let fb_ms = time_ms(&gpu, 2, 10, &|| {
                fwd()?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .backward()
                    .map(|_| ())
            })
            .unwrap();
            let (ff, fbf) = flops(&shape);
            eprintln!(
                "{label:>11} bf16 {shape:?}{what}: forward {f_ms:8.3} ms {:7.2} TFLOP/s, \
                 forward+backward {fb_ms:8.3} ms {:7.2} TFLOP/s",
                ff / f_ms * 1e-9,
                fbf / fb_ms * 1e-9,
            );
        }
    }
    if !fma_forced() {
        if let Err(e) = run_fma_child("attention_timing", &[]) {
            panic!("{e}");
        }
    }
}
