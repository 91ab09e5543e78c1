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
mod common;

use common::{gpu, rand, Report};
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
    let grads = kiln_kernels::compare::probe_grads(&out.to_dtype(DType::F32)?, &probe)?;
    let mut g = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        let gi = grads
            .get(var)
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        g.push(gi.to_device(&Device::Cpu)?);
    }
    Ok((out.to_device(&Device::Cpu)?, g))
}

/// Compares `f` on the GPU and on the CPU in each of `dtypes` (all of [`DTYPES`], or e.g. a
/// large shape in bf16 only, the training dtype); `f32_tol` is the f32 tolerance.
fn parity(
    dtypes: &[DType],
    report: &mut Report,
    gpu: &Device,
    name: &str,
    inputs: &[Input],
    f32_tol: f64,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    for &dtype in dtypes {
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

/// A norm's weight of C elements, in [0.5, 1.5).
fn norm_weight(c: usize, seed: u64) -> Input {
    Input::Float((rand(&[c], seed, 0.5) + 1.0).unwrap())
}

/// [N, C] of the norm tests: warp rows, block rows (C > 1024), and (1000, 771) with more rows
/// than 8·gridDim.y of the dw(/db) kernel (cols_config gives 82 block rows), so its threads go
/// round the row loop more than once.
const NORM_SHAPES: [(usize, usize); 4] = [(37, 75), (37, 771), (5, 4099), (1000, 771)];

#[test]
fn layer_norm() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for (n, c) in NORM_SHAPES {
        let inputs = [
            Input::Float((rand(&[n, c], 1, 2.0) + 0.5).unwrap()),
            norm_weight(c, 2),
            float(&[c], 3, 0.5),
        ];
        parity(
            &DTYPES,
            &mut report,
            &gpu,
            &format!("layer_norm [{n},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
        );
        parity(
            &DTYPES,
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
        &DTYPES,
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
    for (n, c) in NORM_SHAPES {
        let inputs = [float(&[n, c], 11, 2.0), norm_weight(c, 12)];
        parity(
            &DTYPES,
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
            &DTYPES,
            &mut report,
            &gpu,
            &format!("softmax {shape:?}"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::softmax(&t[0]),
        );
    }
    // A decoding-style causal mask: row i has −inf at every column after i (row 0 a single
    // finite entry, the last row none). Masked entries must give exactly 0 and no NaN (which
    // `rel_err` turns into a failure); 77 wide for warp rows, 1100 for block rows.
    for t in [77, 1100] {
        let mut x = rand(&[t, t], 22, 4.0).to_vec2::<f32>().unwrap();
        for (i, row) in x.iter_mut().enumerate() {
            for v in &mut row[i + 1..] {
                *v = f32::NEG_INFINITY;
            }
        }
        let inputs = [Input::Float(Tensor::new(x, &Device::Cpu).unwrap())];
        parity(
            &DTYPES,
            &mut report,
            &gpu,
            &format!("softmax causal-masked [{t},{t}]"),
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
    let every = &DTYPES[..];
    attention_parity(
        &gpu,
        &[
            ([2, 3, 67, 64], every, 31),
            ([1, 2, 130, 40], every, 31),
            ([1, 1, 1, 64], every, 31),
            ([2, 1, 33, 16], every, 31),
            // Several 64-wide key tiles at head dim 32 (the d32 kernels).
            ([1, 2, 200, 32], every, 31),
            // Head dim 80, padded to 128 (the d128 kernels with zero lanes).
            ([1, 2, 77, 80], every, 31),
            ([2, 2, 150, 128], every, 31),
            // A GPT-2-sized layer (T = 1024, 12 heads of 64), in bf16 only: the training dtype,
            // and the CPU reference is slow in f32/f16 at this size.
            ([2, 12, 1024, 64], &[DType::BF16], 34),
        ],
        None,
    );
}

/// Dropout on the probabilities drawn inside the kernels (the `_drop` instances): the same
/// multipliers as the CPU op, so the same tolerance as without dropout; an element indexed
/// differently would drop other probabilities and miss it by far. (Named so that gpu-check's
/// memcheck filter `causal_self_attention` leaves its large case out.)
#[test]
fn attention_dropout_inside_the_kernels() {
    let Some(gpu) = gpu() else { return };
    let every = &DTYPES[..];
    let drop = kiln_kernels::dropout::Draw {
        p: 0.2,
        key: [0x1234_5678, 0x9abc_def0],
        start: 4 * 1_000_003,
    };
    attention_parity(
        &gpu,
        &[
            // Tensor cores in bf16/f16 (head dim 64, and 128), the FMA kernels in f32.
            ([2, 3, 67, 64], every, 41),
            ([2, 2, 150, 128], every, 41),
            // FMA kernels in every dtype: head dims 40 (d64 padded) and 32, T not a multiple
            // of 4.
            ([1, 2, 130, 40], every, 41),
            ([1, 2, 201, 32], every, 41),
            ([1, 1, 1, 64], every, 41),
            ([2, 12, 1024, 64], &[DType::BF16], 44),
        ],
        Some(&drop),
    );
}

/// Causal attention (with dropout `drop`) against the CPU op at each (shape, dtypes, seed).
fn attention_parity(
    gpu: &Device,
    cases: &[([usize; 4], &[DType], u64)],
    drop: Option<&kiln_kernels::dropout::Draw>,
) {
    let mut report = Report::default();
    let label = if drop.is_some() {
        "attention dropout"
    } else {
        "attention"
    };
    for &(shape, dtypes, seed) in cases {
        let inputs = [
            float(&shape, seed, 1.5),
            float(&shape, seed + 1, 1.5),
            float(&shape, seed + 2, 1.0),
        ];
        parity(
            dtypes,
            &mut report,
            gpu,
            &format!("{label} {shape:?}"),
            &inputs,
            F32_TOL_LONG,
            &|t| kiln_kernels::causal_self_attention_dropout(&t[0], &t[1], &t[2], drop),
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
            &DTYPES,
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
        &DTYPES,
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
        &DTYPES,
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
        &DTYPES,
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
            &DTYPES,
            &mut report,
            &gpu,
            &format!("gelu {shape:?}"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::gelu(&t[0]),
        );
    }
    // (1000, 771): the db kernel's threads go round the row loop more than once.
    for (n, c) in [(37, 771), (37, 75), (1, 3), (1000, 771)] {
        let inputs = [float(&[n, c], 52, 3.0), float(&[c], 53, 1.0)];
        parity(
            &DTYPES,
            &mut report,
            &gpu,
            &format!("bias_gelu [{n},{c}]"),
            &inputs,
            F32_TOL,
            &|t| kiln_kernels::bias_gelu(&t[0], &t[1]),
        );
    }
    // Inputs whose data does not start on a 16-byte boundary take the scalar fallback of the
    // element-wise kernels (`aligned16` in gelu.cu): a contiguous view one element into its
    // buffer, and rows 1.. of a matrix with an odd row length (bias_gelu's forward).
    let inputs = [float(&[37, 771], 54, 4.0)];
    parity(
        &DTYPES,
        &mut report,
        &gpu,
        "gelu misaligned (elements 1.. of [37,771])",
        &inputs,
        F32_TOL,
        &|t| {
            let x = t[0].flatten_all()?;
            kiln_kernels::gelu(&x.narrow(0, 1, x.elem_count() - 1)?)
        },
    );
    let inputs = [float(&[38, 771], 55, 3.0), float(&[771], 56, 1.0)];
    parity(
        &DTYPES,
        &mut report,
        &gpu,
        "bias_gelu misaligned (rows 1.. of [38,771])",
        &inputs,
        F32_TOL,
        &|t| kiln_kernels::bias_gelu(&t[0].narrow(0, 1, 37)?, &t[1]),
    );
    report.finish();
}

/// The bits of a float tensor, read as f32 (which holds bf16 and f16 exactly).
fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor to f32")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The column reductions (layer_norm dw/db, rms_norm dw, bias_gelu db) sum fixed partials in a
/// fixed order, without atomics: two runs on the same inputs give the same bits, at a shape
/// where the reduction kernels loop over rows and sum 82 partials per column.
#[test]
fn column_reductions_are_deterministic() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    let (n, c) = (1000, 771);
    type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let cases: [(&str, Vec<Input>, Op); 3] = [
        (
            "layer_norm",
            vec![
                float(&[n, c], 71, 2.0),
                float(&[c], 72, 1.0),
                float(&[c], 73, 1.0),
            ],
            Box::new(|t: &[Tensor]| kiln_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5)),
        ),
        (
            "rms_norm",
            vec![float(&[n, c], 74, 2.0), float(&[c], 75, 1.0)],
            Box::new(|t: &[Tensor]| kiln_kernels::rms_norm(&t[0], &t[1], 1e-5)),
        ),
        (
            "bias_gelu",
            vec![float(&[n, c], 76, 3.0), float(&[c], 77, 1.0)],
            Box::new(|t: &[Tensor]| kiln_kernels::bias_gelu(&t[0], &t[1])),
        ),
    ];
    for (name, inputs, f) in &cases {
        for dtype in DTYPES {
            let what = format!("{name} [{n},{c}] {dtype:?}");
            let (a, b) = match (run(&gpu, dtype, inputs, f), run(&gpu, dtype, inputs, f)) {
                (Ok(a), Ok(b)) => (a, b),
                (a, b) => {
                    for e in [a.err(), b.err()].into_iter().flatten() {
                        report.error(&what, e);
                    }
                    continue;
                }
            };
            for (i, (ga, gb)) in a.1.iter().zip(&b.1).enumerate() {
                let (ba, bb) = (bits(ga), bits(gb));
                let differ = ba.iter().zip(&bb).filter(|(x, y)| x != y).count();
                let ok = differ == 0 && ba.len() == bb.len();
                eprintln!(
                    "{} {what} grad of input {i}: {differ} of {} elements differ between runs",
                    if ok { "ok  " } else { "FAIL" },
                    ba.len()
                );
                if !ok {
                    report.failures.push(format!(
                        "{what} grad of input {i}: {differ} elements differ between two runs"
                    ));
                }
            }
        }
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
            &DTYPES,
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

/// The dropout mask is drawn on the device from the same counter-based generator as on the
/// CPU: equal bit for bit, in every dtype, at an odd size and a nonzero stream position.
#[test]
fn dropout_mask_is_the_cpu_mask() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    let shape = candle_core::Shape::from((3, 12_345));
    for dtype in DTYPES {
        for (p, start) in [(0.1, 0u64), (0.5, 4 * 1_000_003)] {
            let what = format!("dropout mask {dtype:?} p={p} start={start}");
            let mask = |dev: &Device| {
                kiln_kernels::dropout::dropout_mask(&shape, dtype, dev, p, [0x1234, 0xabcd], start)
                    .and_then(|m| m.to_device(&Device::Cpu))
            };
            match (mask(&Device::Cpu), mask(&gpu)) {
                (Ok(c), Ok(g)) => report.check(&what, &g, &c, 0.0),
                (c, g) => {
                    for e in [c.err(), g.err()].into_iter().flatten() {
                        report.error(&what, e);
                    }
                }
            }
        }
    }
    report.finish();
}

/// The language model head fused with its loss (`linear_cross_entropy`): the CPU takes these
/// rows in several chunks (8 Mi logits each), the GPU in one, so the sums of dW differ in order
/// only. (Named so that gpu-check's memcheck filter `cross_entropy` leaves its large case out.)
#[test]
fn lm_head_fused_with_its_loss() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    for (n, c, v, dtypes) in [
        (300, 64, 50257, &DTYPES[..]),
        (37, 48, 75, &DTYPES[..]),
        // GPT-2's head on two sequences, in the training dtype.
        (2048, 768, 50304, &[DType::BF16][..]),
    ] {
        let inputs = [
            float(&[n, c], 51, 1.0),
            float(&[v, c], 52, 0.05),
            Input::Ids(targets(n, v, 53)),
        ];
        parity(
            dtypes,
            &mut report,
            &gpu,
            &format!("linear_cross_entropy [{n},{c}]x[{v},{c}]"),
            &inputs,
            F32_TOL_LONG,
            &|t| kiln_kernels::linear_cross_entropy(&t[0], &t[1], &t[2], t[0].dtype()),
        );
    }
    report.finish();
}

/// A target that is neither a class id nor ignored fails on the GPU with the CPU's error.
#[test]
fn cross_entropy_rejects_an_out_of_range_target() {
    let Some(gpu) = gpu() else { return };
    let logits = rand(&[4, 10], 61, 1.0);
    let targets = Tensor::new(&[1u32, IGNORE_INDEX, 10, 12], &Device::Cpu).unwrap();
    let err = |dev: &Device| {
        let l = Var::from_tensor(&logits.to_device(dev).unwrap()).unwrap();
        kiln_kernels::cross_entropy(l.as_tensor(), &targets.to_device(dev).unwrap())
            .unwrap_err()
            .to_string()
    };
    let (cpu, cuda) = (err(&Device::Cpu), err(&gpu));
    eprintln!("cpu: {cpu}\ncuda: {cuda}");
    assert!(
        cuda.contains("target 10 of row 2 is not a class id (< 10)"),
        "{cuda}"
    );
    assert!(cpu.contains("target 10 of row 2"), "{cpu}");
}

/// f16 gradients at a large row count keep the small probabilities (the 1/count is applied
/// with the loss scale, in f32), and logits outside a graph give the same loss.
#[test]
fn cross_entropy_f16_gradient_and_loss_only() {
    let Some(gpu) = gpu() else { return };
    let mut report = Report::default();
    let (n, v) = (4096, 8);
    let mut x = vec![0f32; n * v];
    for row in x.chunks_mut(v) {
        row[1] = -8.0;
    }
    let logits = Tensor::from_vec(x, (n, v), &Device::Cpu).unwrap();
    let targets = Tensor::new(vec![0u32; n], &Device::Cpu).unwrap();
    let grad = |dev: &Device, dtype: DType| -> Result<Tensor> {
        let var = Var::from_tensor(&logits.to_dtype(dtype)?.to_device(dev)?)?;
        let loss =
            (kiln_kernels::cross_entropy(var.as_tensor(), &targets.to_device(dev)?)? * 1024.0)?;
        let g = loss.backward()?;
        g.get(&var)
            .unwrap()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)
    };
    match (grad(&Device::Cpu, DType::F32), grad(&gpu, DType::F16)) {
        (Ok(want), Ok(got)) => report.check(
            "cross_entropy f16 gradient, 4096 rows",
            &got,
            &want,
            HALF_TOL,
        ),
        (w, g) => {
            for e in [w.err(), g.err()].into_iter().flatten() {
                report.error("cross_entropy f16 gradient", e);
            }
        }
    }
    for dtype in DTYPES {
        let loss = |tracked: bool| -> Result<Tensor> {
            let x = logits.to_dtype(dtype)?.to_device(&gpu)?;
            let x = if tracked {
                Var::from_tensor(&x)?.as_tensor().clone()
            } else {
                x
            };
            kiln_kernels::cross_entropy(&x, &targets.to_device(&gpu)?)?.to_device(&Device::Cpu)
        };
        match (loss(false), loss(true)) {
            (Ok(plain), Ok(tracked)) => report.check(
                &format!("cross_entropy loss only {dtype:?}"),
                &plain,
                &tracked,
                0.0,
            ),
            (a, b) => {
                for e in [a.err(), b.err()].into_iter().flatten() {
                    report.error("cross_entropy loss only", e);
                }
            }
        }
    }
    report.finish();
}
