//! Causal self-attention as one op: o = softmax(q·kᵀ·scale + causal mask)·v for q, k, v of
//! shape (B, H, T, D), with scale = 1/√D.
//!
//! Forward, per query row i: scores against keys 0..=i, their max m and sum l of exp(s − m),
//! then o_i = Σ_j exp(s_ij − m)·v_j / l. Only lse_i = m + ln l is kept (B·H·T floats), never the
//! (T, T) probabilities the composition stores for its backward.
//! Backward recomputes p_ij = exp(s_ij − lse_i) and, with Δ_i = do_i·o_i:
//!   dv_j += p_ij·do_i,  ds_ij = p_ij·(do_i·v_j − Δ_i),  dq_i += scale·ds_ij·k_j,
//!   dk_j += scale·ds_ij·q_i.
//! On the CPU each (batch, head) is one parallel task, so the scatter into dk/dv needs no
//! synchronization, and its queries go in tiles of 64: a tile's scores against the keys it
//! sees are one matmul, as are P·V forward and the four products of the backward, so the
//! work runs in the gemm's vector kernels instead of dot products of length D (GPT-2 124M at
//! T = 1024: forward 1.9 → 0.7 s, backward 3.9 → 1.1 s a step on this project's 2-core host).
//! The CUDA version tiles the same loops (flash attention).
//!
//! Dropout on the probabilities (GPT-2's `attn_pdrop`, nanoGPT's attention dropout) is drawn
//! inside the op from stream positions reserved for the (B, H, T, T) probabilities (a
//! [`Draw`]): o_i = Σ_j p_ij·z_ij·v_j with z the multiplier `dropout_mask` gives element
//! (b, h, i, j), recomputed in the backward, where dv_j += p_ij·z_ij·do_i and
//! ds_ij = p_ij·(z_ij·(do_i·v_j) − Δ_i) (Δ_i = do_i·o_i still holds: o already carries z).

mod bidirectional;

pub use bidirectional::bidirectional_attention;

use crate::dropout::{Draw, MaskSpec};
use crate::gemm::{matmul, GemmElem, Mat};
use crate::vexp::{wide, Exp};
use crate::{dot, out, slice, with_float, Elem, Kernel, Op};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use num_traits::Float;
use rayon::prelude::*;
use std::ops::{AddAssign, MulAssign};

pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    causal_self_attention_dropout(q, k, v, None)
}

/// [`causal_self_attention`] with dropout `drop` on the probabilities: its positions cover the
/// B·H·T² of them, element (b, h, i, j) at `drop.start + ((b·H + h)·T + i)·T + j`.
pub fn causal_self_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    drop: Option<&Draw>,
) -> Result<Tensor> {
    let (_, _, _, d) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} must have the same shape",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let params = Params::new(d, drop)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, ATTENTION.with(params))
}

/// An attention call's constants: the scores' scale and the probabilities' dropout.
#[derive(Clone, Copy)]
struct Params {
    scale: f64,
    drop: Option<MaskSpec>,
}

impl Params {
    fn new(head_dim: usize, drop: Option<&Draw>) -> Result<Self> {
        Ok(Params {
            scale: 1.0 / (head_dim as f64).sqrt(),
            drop: drop.map(Draw::spec).transpose()?,
        })
    }
}

static ATTENTION: Op<Params> = Op {
    forward: Kernel {
        name: "kiln-causal-attention",
        cpu: forward,
        #[cfg(feature = "cuda")]
        cuda: |args, p| crate::cuda::attention::forward(args, p.scale as f32, p.drop),
    },
    backward: |g| {
        let lse = &g.saved.get()[0];
        let [q, k, v] = [g.inputs[0], g.inputs[1], g.inputs[2]];
        BACKWARD.run(g.param, &[q, k, v, g.y, lse, g.dy])
    },
};

static BACKWARD: Kernel<Params> = Kernel {
    name: "kiln-causal-attention-backward",
    cpu: backward,
    #[cfg(feature = "cuda")]
    cuda: |args, p| crate::cuda::attention::backward(args, p.scale as f32, p.drop),
};

/// Causal self-attention on GPT-2's packed projections: `qkv` (B, T, 3·C) holds each
/// position's q, k and v side by side (`c_attn`'s output), in heads of C / `n_head` features;
/// the result (B, T, C) holds each position's heads side by side, ready for the output
/// projection. On the CPU this is one graph node: splitting the heads around
/// [`causal_self_attention`] and merging them after takes fourteen (narrows, reshapes,
/// transposes and their copies), each with a zero-filled gradient and an add in candle's
/// backward. On other devices it is that composition. `drop`: dropout on the probabilities, as
/// in [`causal_self_attention_dropout`].
pub fn causal_attention_packed(qkv: &Tensor, n_head: usize, drop: Option<&Draw>) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    if n_head == 0 || c3 % (3 * n_head) != 0 {
        candle_core::bail!(
            "attention: {c3} packed features are not q, k and v of {n_head} equal heads"
        )
    }
    let (c, d) = (c3 / 3, c3 / 3 / n_head);
    if !qkv.device().is_cpu() {
        let heads = |i: usize| {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, n_head, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let y = causal_self_attention_dropout(&heads(0)?, &heads(1)?, &heads(2)?, drop)?;
        return y.transpose(1, 2)?.reshape((b, t, c));
    }
    let params = Params::new(d, drop)?;
    qkv.contiguous()?.apply_op1(PACKED.with((params, n_head)))
}

static PACKED: Op<(Params, usize)> = Op {
    forward: Kernel {
        name: "kiln-causal-attention-packed",
        cpu: |args, (params, h)| {
            let (b, t, c3) = args[0].1.shape().dims3()?;
            let d = c3 / 3 / h;
            let qkv = |part| Heads::packed(part, 3, (b, h, t, d));
            let o = Heads::packed(0, 1, (b, h, t, d));
            let args = [args[0], args[0], args[0]];
            forward_with(
                &args,
                [qkv(0), qkv(1), qkv(2)],
                o,
                (b, t, h * d).into(),
                params,
            )
        },
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| {
        let lse = &g.saved.get()[0];
        PACKED_BACKWARD.run(g.param, &[g.inputs[0], g.y, lse, g.dy])
    },
};

static PACKED_BACKWARD: Kernel<(Params, usize)> = Kernel {
    name: "kiln-causal-attention-packed-backward",
    cpu: |args, (params, h)| {
        let (b, t, c3) = args[0].1.shape().dims3()?;
        let d = c3 / 3 / h;
        let qkv = |part| Heads::packed(part, 3, (b, h, t, d));
        let o = Heads::packed(0, 1, (b, h, t, d));
        // q, k, v and o, do: two buffers read through four layouts.
        let args = [args[0], args[0], args[0], args[1], args[2], args[3]];
        backward_with(&args, [qkv(0), qkv(1), qkv(2)], o, params, Grads::Packed)
    },
    #[cfg(feature = "cuda")]
    cuda: crate::op::cpu_only,
};

/// Where each (batch, head)'s (T, D) block lies in a buffer: element (b, h, t, j) is at
/// `start + b·batch + h·head + t·row + j`.
#[derive(Clone, Copy)]
struct Heads {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
    /// (B, H, T, D).
    dims: (usize, usize, usize, usize),
}

impl Heads {
    /// A contiguous (B, H, T, D) tensor.
    fn split(dims: (usize, usize, usize, usize)) -> Self {
        let (_, h, t, d) = dims;
        Heads {
            start: 0,
            batch: h * t * d,
            head: t * d,
            row: d,
            dims,
        }
    }

    /// Part `part` of `parts` per position in a (B, T, parts·H·D) tensor.
    fn packed(part: usize, parts: usize, dims: (usize, usize, usize, usize)) -> Self {
        let (_, h, t, d) = dims;
        Heads {
            start: part * h * d,
            batch: t * parts * h * d,
            head: d,
            row: parts * h * d,
            dims,
        }
    }

    fn offset(&self, bh: usize) -> usize {
        let h = self.dims.1;
        self.start + (bh / h) * self.batch + (bh % h) * self.head
    }

    /// Block `bh` (= b·H + h), widened to the accumulation type.
    fn gather<T: Elem>(&self, x: &[T], bh: usize) -> Vec<T::Acc> {
        let (_, _, t, d) = self.dims;
        let base = self.offset(bh);
        let mut out = Vec::with_capacity(t * d);
        for i in 0..t {
            out.extend(x[base + i * self.row..][..d].iter().map(|v| v.acc()));
        }
        out
    }

    /// Writes block `bh` from `src`.
    fn scatter<T: Elem>(&self, x: &mut [T], bh: usize, src: &[T::Acc]) {
        let (_, _, t, d) = self.dims;
        let base = self.offset(bh);
        for (i, src) in src.chunks_exact(d).take(t).enumerate() {
            for (x, a) in x[base + i * self.row..][..d].iter_mut().zip(src) {
                *x = T::from_acc(*a);
            }
        }
    }
}

fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// Queries per tile: each tile's scores against the keys it sees are one matmul.
const TILE: usize = 64;

/// The tiles of `t` queries: (first query, queries in the tile). A tile of queries i0…i1 sees
/// keys 0…i1 (the causal mask inside the last `TILE` of them is applied row by row).
fn tiles(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(TILE).map(move |i0| (i0, TILE.min(t - i0)))
}

/// `s` ← scale · Q[i0…i0+rows] · K[0…n]ᵀ, a (rows, n) block with n = i0 + rows.
fn scores<A: GemmElem + Float>(
    s: &mut [A],
    q: &[A],
    k: &[A],
    (i0, rows): (usize, usize),
    d: usize,
    scale: A,
) {
    let n = i0 + rows;
    matmul(
        s,
        false,
        Mat::new(&q[i0 * d..], rows, d),
        Mat::new(k, n, d).t(),
        Parallelism::None,
    );
    s[..rows * n].iter_mut().for_each(|x| *x = *x * scale);
}

/// The dropout multipliers of one head's (T, T) probabilities.
#[derive(Clone, Copy)]
struct HeadDrop<'a> {
    spec: &'a MaskSpec,
    /// The call's element index of the head's (0, 0).
    first: u64,
    t: usize,
}

impl<'a> HeadDrop<'a> {
    fn of(spec: Option<&'a MaskSpec>, bh: usize, t: usize) -> Option<Self> {
        spec.map(|spec| HeadDrop {
            spec,
            first: (bh * t * t) as u64,
            t,
        })
    }

    /// The multipliers of query row i, keys 0, 1, … into `out`.
    fn row<A: Float>(&self, i: usize, out: &mut [A]) {
        self.spec.fill(self.first + (i * self.t) as u64, out)
    }
}

/// q, k, v → o, lse.
fn forward(args: &[(&CpuStorage, &Layout)], params: Params) -> Result<Vec<(CpuStorage, Shape)>> {
    let split = Heads::split(dims(args[0].1)?);
    forward_with(args, [split; 3], split, args[0].1.shape().clone(), params)
}

/// q, k, v read through `qkv`, o (of shape `shape`) written as `o` says, and lse (B, H, T).
fn forward_with(
    args: &[(&CpuStorage, &Layout)],
    qkv: [Heads; 3],
    o: Heads,
    shape: Shape,
    params: Params,
) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, h, t, d) = o.dims;
    with_float!(args[0].0, "attention", |T| {
        type A = <T as Elem>::Acc;
        let inputs: Vec<&[T]> = (0..3).map(|i| slice::<T>(args[i])).collect::<Result<_>>()?;
        let scale: A = crate::k(params.scale);
        let heads: Vec<(Vec<A>, Vec<A>)> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let [q, k, v] = [0, 1, 2].map(|i| qkv[i].gather(inputs[i], bh));
                let drop = HeadDrop::of(params.drop.as_ref(), bh, t);
                forward_head(&q, &k, &v, (t, d), scale, drop)
            })
            .collect();
        let mut y = crate::zeros::<T>(b * h * t * d);
        let mut lse = Vec::with_capacity(b * h * t);
        for (bh, (o_bh, lse_bh)) in heads.into_iter().enumerate() {
            o.scatter(&mut y, bh, &o_bh);
            lse.extend(lse_bh);
        }
        Ok(vec![out(y, shape), out(lse, (b, h, t))])
    })
}

/// One head's o (T, D) and lse (T). Per tile of queries: the scores as one matmul, a row-wise
/// softmax over the keys each query sees (then the dropout multipliers), and o = P·V as
/// another.
fn forward_head<A: GemmElem + Float + AddAssign + MulAssign + Exp>(
    q: &[A],
    k: &[A],
    v: &[A],
    (t, d): (usize, usize),
    scale: A,
    drop: Option<HeadDrop>,
) -> (Vec<A>, Vec<A>) {
    let mut o = vec![A::zero(); t * d];
    let mut lse = vec![A::zero(); t];
    let mut p = vec![A::zero(); TILE * t];
    let mut z = vec![A::zero(); if drop.is_some() { t } else { 0 }];
    for (i0, rows) in tiles(t) {
        let n = i0 + rows;
        scores(&mut p, q, k, (i0, rows), d, scale);
        wide(|| {
            for (r, row) in p.chunks_exact_mut(n).take(rows).enumerate() {
                let seen = i0 + r + 1;
                let m = row[..seen].iter().fold(A::neg_infinity(), |m, &x| m.max(x));
                row[..seen].iter_mut().for_each(|x| *x = (*x - m).vexp());
                let mut l = A::zero();
                row[..seen].iter().for_each(|&x| l += x);
                let r_l = l.recip();
                row[..seen].iter_mut().for_each(|x| *x *= r_l);
                row[seen..].fill(A::zero());
                lse[i0 + r] = m + l.ln();
                if let Some(drop) = drop {
                    drop.row(i0 + r, &mut z[..seen]);
                    row[..seen].iter_mut().zip(&z).for_each(|(x, &z)| *x *= z);
                }
            }
        });
        matmul(
            &mut o[i0 * d..],
            false,
            Mat::new(&p, rows, n),
            Mat::new(v, n, d),
            Parallelism::None,
        );
    }
    (o, lse)
}

/// Where the backward writes dq, dk and dv.
#[derive(Clone, Copy, PartialEq)]
enum Grads {
    /// Three (B, H, T, D) tensors.
    Split,
    /// One (B, T, 3·C) tensor laid out as the packed input.
    Packed,
}

/// q, k, v, o, lse, do → dq, dk, dv.
fn backward(args: &[(&CpuStorage, &Layout)], params: Params) -> Result<Vec<(CpuStorage, Shape)>> {
    let split = Heads::split(dims(args[0].1)?);
    backward_with(args, [split; 3], split, params, Grads::Split)
}

/// q, k, v read through `qkv`, o and do through `o`, lse (B, H, T) → the gradients of q, k, v
/// as `grads` says.
fn backward_with(
    args: &[(&CpuStorage, &Layout)],
    qkv: [Heads; 3],
    o: Heads,
    params: Params,
    grads: Grads,
) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, h, t, d) = o.dims;
    with_float!(args[0].0, "attention backward", |T| {
        type A = <T as Elem>::Acc;
        let [q, k, v, y] = [0, 1, 2, 3].map(|i| slice::<T>(args[i]));
        let (q, k, v, y) = (q?, k?, v?, y?);
        let lse = slice::<A>(args[4])?;
        let d_o = slice::<T>(args[5])?;
        let scale: A = crate::k(params.scale);
        let heads: Vec<[Vec<A>; 3]> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let [q, k, v] = [(q, 0), (k, 1), (v, 2)].map(|(x, i)| qkv[i].gather(x, bh));
                let (y, d_o) = (o.gather(y, bh), o.gather(d_o, bh));
                let lse = &lse[bh * t..][..t];
                let drop = HeadDrop::of(params.drop.as_ref(), bh, t);
                backward_head(&q, &k, &v, &y, &d_o, lse, (t, d), scale, drop)
            })
            .collect();
        let n = b * h * t * d;
        Ok(match grads {
            Grads::Split => {
                let mut g = [0, 1, 2].map(|_| crate::zeros::<T>(n));
                for (bh, head) in heads.iter().enumerate() {
                    for (g, src) in g.iter_mut().zip(head) {
                        qkv[0].scatter(g, bh, src);
                    }
                }
                let shape = (b, h, t, d);
                g.map(|g| out(g, shape)).into()
            }
            Grads::Packed => {
                let mut g = crate::zeros::<T>(3 * n);
                for (bh, head) in heads.iter().enumerate() {
                    for (part, src) in qkv.iter().zip(head) {
                        part.scatter(&mut g, bh, src);
                    }
                }
                vec![out(g, (b, t, 3 * h * d))]
            }
        })
    })
}

/// One head's dq, dk, dv. Per tile of queries, with P = exp(S − lse) recomputed from the
/// scores' matmul and Δ_i = do_i·o_i:
/// dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − Δ)·scale, dQ = dS·K, dK += dSᵀ·Q;
/// with dropout multipliers Z: dV += (P∘Z)ᵀ·dO and dS = P ∘ (dP∘Z − Δ)·scale.
#[allow(clippy::too_many_arguments)]
fn backward_head<A: GemmElem + Float + Exp>(
    q: &[A],
    k: &[A],
    v: &[A],
    o: &[A],
    d_o: &[A],
    lse: &[A],
    (t, d): (usize, usize),
    scale: A,
    drop: Option<HeadDrop>,
) -> [Vec<A>; 3] {
    let td = t * d;
    let (mut dq, mut dk, mut dv) = (
        vec![A::zero(); td],
        vec![A::zero(); td],
        vec![A::zero(); td],
    );
    let mut p = vec![A::zero(); TILE * t];
    let mut dp = vec![A::zero(); TILE * t];
    let dropped = if drop.is_some() { TILE * t } else { 0 };
    let (mut z, mut pz) = (vec![A::zero(); dropped], vec![A::zero(); dropped]);
    for (i0, rows) in tiles(t) {
        let n = i0 + rows;
        scores(&mut p, q, k, (i0, rows), d, scale);
        wide(|| {
            for (r, row) in p.chunks_exact_mut(n).take(rows).enumerate() {
                let (i, seen) = (i0 + r, i0 + r + 1);
                row[..seen]
                    .iter_mut()
                    .for_each(|x| *x = (*x - lse[i]).vexp());
                row[seen..].fill(A::zero());
            }
        });
        if let Some(drop) = drop {
            for r in 0..rows {
                let (z, pz, p) = (&mut z[r * n..][..n], &mut pz[r * n..][..n], &p[r * n..]);
                drop.row(i0 + r, z);
                pz.iter_mut()
                    .zip(z.iter())
                    .zip(p)
                    .for_each(|((y, &z), &p)| *y = p * z);
            }
        }
        // What multiplied V in the forward: P, or P∘Z.
        let kept = if drop.is_some() { &pz } else { &p };
        let (d_o_tile, q_tile) = (&d_o[i0 * d..], &q[i0 * d..]);
        // dV[0…n] += keptᵀ · dO_tile
        matmul(
            &mut dv,
            true,
            Mat::new(kept, rows, n).t(),
            Mat::new(d_o_tile, rows, d),
            Parallelism::None,
        );
        // dP = dO_tile · V[0…n]ᵀ
        matmul(
            &mut dp,
            false,
            Mat::new(d_o_tile, rows, d),
            Mat::new(v, n, d).t(),
            Parallelism::None,
        );
        // dS = P ∘ (dP − Δ) · scale (dP∘Z with dropout), in place of dP
        for r in 0..rows {
            let i = i0 + r;
            let delta = dot(&d_o[i * d..][..d], &o[i * d..][..d]);
            let (ds, p) = (&mut dp[r * n..][..n], &p[r * n..][..n]);
            if drop.is_some() {
                for ((ds, &p), &z) in ds.iter_mut().zip(p).zip(&z[r * n..][..n]) {
                    *ds = p * (*ds * z - delta) * scale;
                }
            } else {
                for (ds, &p) in ds.iter_mut().zip(p) {
                    *ds = p * (*ds - delta) * scale;
                }
            }
        }
        // dQ_tile = dS · K[0…n];  dK[0…n] += dSᵀ · Q_tile
        matmul(
            &mut dq[i0 * d..],
            false,
            Mat::new(&dp, rows, n),
            Mat::new(k, n, d),
            Parallelism::None,
        );
        matmul(
            &mut dk,
            true,
            Mat::new(&dp, rows, n).t(),
            Mat::new(q_tile, rows, d),
            Parallelism::None,
        );
    }
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};

    #[test]
    fn gradients_match_finite_differences() {
        let shape = [2, 2, 5, 4];
        let (q, k, v) = (rand(&shape, 1), rand(&shape, 2), rand(&shape, 3));
        check_grad(&q, |q| causal_self_attention(q, &k, &v));
        check_grad(&k, |k| causal_self_attention(&q, k, &v));
        check_grad(&v, |v| causal_self_attention(&q, &k, v));
    }

    #[test]
    fn matches_the_composition_in_every_dtype() {
        for shape in [[1, 1, 1, 8], [2, 3, 67, 16], [1, 2, 130, 40]] {
            let inputs = [rand(&shape, 4), rand(&shape, 5), rand(&shape, 6)];
            check_parity(
                &inputs,
                3,
                |t| causal_self_attention(&t[0], &t[1], &t[2]),
                |t| reference::causal_self_attention(&t[0], &t[1], &t[2]),
            );
        }
    }

    /// q, k, v of `n_head` heads split from packed (B, T, 3·C) projections, attended by
    /// `attend`, merged back to (B, T, C): what the packed op replaces.
    fn split_and_merge(
        qkv: &Tensor,
        n_head: usize,
        attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, t, c3) = qkv.dims3()?;
        let (c, d) = (c3 / 3, c3 / 3 / n_head);
        let heads = |i: usize| {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, n_head, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let y = attend(&heads(0)?, &heads(1)?, &heads(2)?)?;
        y.transpose(1, 2)?.reshape((b, t, c))
    }

    #[test]
    fn packed_heads_match_split_heads() {
        check_grad(&rand(&[2, 5, 12], 10), |x| {
            causal_attention_packed(x, 2, None)
        });
        for (shape, n_head) in [([1, 1, 24], 1), ([2, 67, 48], 2), ([1, 130, 126], 3)] {
            let qkv = rand(&shape, 11);
            check_parity(
                std::slice::from_ref(&qkv),
                1,
                |t| causal_attention_packed(&t[0], n_head, None),
                |t| split_and_merge(&t[0], n_head, reference::causal_self_attention),
            );
            // The same per-head arithmetic as the split op: equal to the bit, gradients too.
            let qkv =
                candle_core::Var::from_tensor(&qkv.to_dtype(candle_core::DType::F32).unwrap())
                    .unwrap();
            let probe = rand(&[shape[0], shape[1], shape[2] / 3], 12)
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let run = |y: Tensor| {
                let g = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, g.get(qkv.as_tensor()).unwrap().clone())
            };
            let (y, g) = run(causal_attention_packed(qkv.as_tensor(), n_head, None).unwrap());
            let split = split_and_merge(qkv.as_tensor(), n_head, causal_self_attention);
            let (ys, gs) = run(split.unwrap());
            assert_eq!(
                crate::testing::max_abs_diff(&y, &ys),
                0.0,
                "{shape:?} values"
            );
            assert_eq!(
                crate::testing::max_abs_diff(&g, &gs),
                0.0,
                "{shape:?} gradient"
            );
        }
        let err = causal_attention_packed(&rand(&[1, 2, 10], 13), 2, None).unwrap_err();
        assert!(err.to_string().contains("10 packed features"), "{err}");
    }

    /// A draw at stream position 8 (not 0, so an op indexing from 0 would fail).
    fn draw(p: f64) -> Draw {
        Draw {
            p,
            key: [3, 5],
            start: 8,
        }
    }

    /// The dropout mask (B, H, T, T) in `dtype` that the composition multiplies by.
    fn mask_of(shape: &[usize], drop: &Draw, dtype: candle_core::DType) -> Tensor {
        let probs = candle_core::Shape::from((shape[0], shape[1], shape[2], shape[2]));
        let device = candle_core::Device::Cpu;
        crate::dropout::dropout_mask(&probs, dtype, &device, drop.p, drop.key, drop.start).unwrap()
    }

    #[test]
    fn dropout_matches_the_composition_with_its_mask() {
        for shape in [[1, 1, 3, 8], [2, 3, 67, 16], [1, 2, 130, 40]] {
            let drop = draw(0.3);
            let inputs = [rand(&shape, 21), rand(&shape, 22), rand(&shape, 23)];
            check_parity(
                &inputs,
                3,
                |t| causal_self_attention_dropout(&t[0], &t[1], &t[2], Some(&drop)),
                |t| {
                    let mask = mask_of(&shape, &drop, t[0].dtype());
                    reference::causal_self_attention_dropout(&t[0], &t[1], &t[2], &mask)
                },
            );
        }
        // Finite differences through the fixed mask, and the packed op against the split one
        // bit for bit (the same per-head arithmetic).
        let shape = [2, 2, 9, 4];
        let drop = draw(0.4);
        let (q, k, v) = (rand(&shape, 24), rand(&shape, 25), rand(&shape, 26));
        check_grad(&q, |q| {
            causal_self_attention_dropout(q, &k, &v, Some(&drop))
        });
        check_grad(&k, |k| {
            causal_self_attention_dropout(&q, k, &v, Some(&drop))
        });
        check_grad(&v, |v| {
            causal_self_attention_dropout(&q, &k, v, Some(&drop))
        });
        let qkv = rand(&[2, 67, 48], 27)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let drop = draw(0.2);
        let packed = causal_attention_packed(&qkv, 2, Some(&drop)).unwrap();
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
            causal_self_attention_dropout(q, k, v, Some(&drop))
        };
        let split = split_and_merge(&qkv, 2, attend).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&packed, &split), 0.0);
        // Dropout changes the output, and p = 0 is no dropout at all.
        let plain = causal_attention_packed(&qkv, 2, None).unwrap();
        assert!(crate::testing::max_abs_diff(&packed, &plain) > 0.01);
        let none = causal_attention_packed(&qkv, 2, Some(&Draw { p: 0.0, ..drop })).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&none, &plain), 0.0);
        let bad = Draw { start: 6, ..drop };
        let err = causal_attention_packed(&qkv, 2, Some(&bad)).unwrap_err();
        assert!(err.to_string().contains("multiple of 4"), "{err}");
    }

    #[test]
    fn a_query_never_sees_later_keys() {
        let shape = [1, 1, 6, 4];
        let (q, k, v) = (rand(&shape, 7), rand(&shape, 8), rand(&shape, 9));
        let before = causal_self_attention(&q, &k, &v).unwrap();
        // Changing the last key and value leaves every earlier output unchanged.
        let bump = |x: &Tensor| {
            let last = (x.narrow(2, 5, 1).unwrap() + 3.0).unwrap();
            Tensor::cat(&[&x.narrow(2, 0, 5).unwrap(), &last], 2).unwrap()
        };
        let after = causal_self_attention(&q, &bump(&k), &bump(&v)).unwrap();
        let head = |x: &Tensor| x.narrow(2, 0, 5).unwrap();
        assert_eq!(
            crate::testing::max_abs_diff(&head(&before), &head(&after)),
            0.0
        );
    }
}
