//! 2-D convolution (zero padding, any stride) as im2col + one matmul.
//!
//! The input is unfolded into columns (C·k², B·Ho·Wo), row (c, i, j) holding, image after
//! image, the input that kernel tap (i, j) of channel c sees at each output position, and the
//! kernel reshaped to (Cout, C·k²) multiplies them in one matmul for the whole batch. Putting
//! the batch inside the columns (rather than a batched matmul over B images) gives one large
//! well-parallelised product forward and backward, and the kernel's gradient comes out of one
//! product instead of B per-image (Cout, C·k²) products summed afterwards. candle's own conv2d
//! backward goes through a naive CPU conv_transpose2d and was the bulk of a CNN step.
//!
//! On the CPU the unfold is one kernel ([`unfold`]) whose backward is its adjoint, the fold
//! (col2im: each column entry added back to the pixel it came from), again one pass. The
//! reference and the path on other devices ([`unfold_composed`]) builds the same columns from
//! k² narrowed views of the padded input stacked together; autograd then runs the backward of
//! every narrow as a zero-padded copy of the whole input, 2·k² full-size copies per layer.

use crate::{out, slice, with_float};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` (B, C, H, W), `w` (Cout, C, k, k), optional `b` (Cout) → (B, Cout, H + 2p − k + 1, …).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    conv2d_strided(x, w, b, 1, padding)
}

/// [`conv2d`] with a stride: output (B, Cout, (H + 2p − k) / s + 1, (W + 2p − k) / s + 1), as
/// PyTorch's `Conv2d(stride = s, padding = p)` (rows and columns past the last full window are
/// dropped).
pub fn conv2d_strided(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (bsz, c, h, wd) = x.dims4()?;
    let (cout, cin, k, k2) = w.dims4()?;
    if cin != c || k != k2 {
        candle_core::bail!("conv2d: input has {c} channels, kernel is {:?}", w.dims());
    }
    if stride == 0 || h + 2 * padding < k || wd + 2 * padding < k {
        candle_core::bail!(
            "conv2d: a {k}×{k} kernel with stride {stride}, padding {padding} does not fit a \
             {h}×{wd} input"
        );
    }
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (wd + 2 * padding - k) / stride + 1,
    );
    let geometry = Unfold {
        k,
        stride,
        padding,
        ho,
        wo,
    };
    let cols = if x.device().is_cpu() {
        unfold(x, geometry)?
    } else {
        unfold_composed(x, geometry)?
    };
    // The column order (c, i, j) matches w's layout: (Cout, C·k²) · (C·k², B·Ho·Wo).
    let y = w.reshape((cout, c * k * k))?.matmul(&cols)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((cout, 1))?)?,
        None => y,
    };
    // (Cout, B, Ho, Wo) → (B, Cout, Ho, Wo), laid out for the next layer.
    y.reshape((cout, bsz, ho, wo))?
        .transpose(0, 1)?
        .contiguous()
}

/// The window of a convolution: a k×k kernel with `stride` over an input zero-padded by
/// `padding` on every side, giving Ho × Wo outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unfold {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub ho: usize,
    pub wo: usize,
}

/// im2col: `x` (B, C, H, W) → (C·k², B·Ho·Wo), row (c, i, j) row-major, each row the B images'
/// Ho × Wo windows one after another, zero outside `x`.
pub fn unfold(x: &Tensor, geometry: Unfold) -> Result<Tensor> {
    x.contiguous()?.apply_op1(geometry)
}

/// [`unfold`] from candle ops: the k² views of the padded input, stacked.
pub fn unfold_composed(x: &Tensor, g: Unfold) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let p = g.padding;
    let x = if p > 0 {
        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
    } else {
        x.clone()
    };
    let shifted = windows(&x, g.k, g.stride, g.ho, g.wo)?;
    // (B, C, k², Ho, Wo) → (C, k², B, Ho, Wo) → (C·k², B·Ho·Wo).
    Tensor::stack(&shifted, 2)?
        .permute((1, 2, 0, 3, 4))?
        .reshape((c * g.k * g.k, b * g.ho * g.wo))
}

impl Unfold {
    /// The input row (or column) that output row `o` reads at tap `i`, if inside the input.
    #[inline(always)]
    fn source(&self, o: usize, i: usize, len: usize) -> Option<usize> {
        (o * self.stride + i)
            .checked_sub(self.padding)
            .filter(|&v| v < len)
    }

    /// Tap (i, j) of one channel of one image: `src` (H, W) → `dst` (Ho·Wo).
    fn unfold_tap<T: Copy + Default>(
        &self,
        src: &[T],
        (h, w): (usize, usize),
        (i, j): (usize, usize),
        dst: &mut [T],
    ) {
        let wo = self.wo;
        for (oy, row) in dst.chunks_exact_mut(wo).enumerate() {
            let Some(y) = self.source(oy, i, h) else {
                row.fill(T::default());
                continue;
            };
            for (ox, d) in row.iter_mut().enumerate() {
                *d = self
                    .source(ox, j, w)
                    .map_or(T::default(), |x| src[y * w + x]);
            }
        }
    }

    /// The adjoint of [`Self::unfold_tap`] over all k² taps of one channel of one image:
    /// `tap(i, j)` is that tap's Ho·Wo columns; every entry is added to the pixel it read.
    fn fold_plane<'a, T: Copy + std::ops::AddAssign + Default + 'a>(
        &self,
        tap: impl Fn(usize, usize) -> &'a [T],
        (h, w): (usize, usize),
        dst: &mut [T],
    ) {
        let (k, wo) = (self.k, self.wo);
        dst.fill(T::default());
        for i in 0..k {
            for j in 0..k {
                for (oy, row) in tap(i, j).chunks_exact(wo).enumerate() {
                    let Some(y) = self.source(oy, i, h) else {
                        continue;
                    };
                    for (ox, v) in row.iter().enumerate() {
                        if let Some(x) = self.source(ox, j, w) {
                            dst[y * w + x] += *v;
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "kiln-unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (k, window) = (self.k, self.ho * self.wo);
        with_float!(s, self.name(), |T| {
            let x = slice::<T>((s, l))?;
            let mut cols = vec![T::default(); c * k * k * b * window];
            // One task per column row (c, i, j): the B images' windows for that tap.
            cols.par_chunks_mut(b * window)
                .enumerate()
                .for_each(|(row, dst)| {
                    let (ch, i, j) = (row / (k * k), row / k % k, row % k);
                    for (img, d) in dst.chunks_exact_mut(window).enumerate() {
                        let src = &x[(img * c + ch) * h * w..][..h * w];
                        self.unfold_tap(src, (h, w), (i, j), d);
                    }
                });
            Ok(out(cols, (c * k * k, b * window)))
        })
    }

    fn bwd(&self, x: &Tensor, _cols: &Tensor, dcols: &Tensor) -> Result<Option<Tensor>> {
        let (b, _, h, w) = x.dims4()?;
        Ok(Some(dcols.contiguous()?.apply_op1_no_bwd(&Fold {
            unfold: *self,
            b,
            h,
            w,
        })?))
    }
}

/// col2im, [`Unfold`]'s backward: (C·k², B·Ho·Wo) → (B, C, H, W).
struct Fold {
    unfold: Unfold,
    b: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "kiln-fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = l.shape().dims2()?;
        let g = self.unfold;
        let (k, window) = (g.k, g.ho * g.wo);
        let (b, c, h, w) = (self.b, rows / (k * k), self.h, self.w);
        with_float!(s, self.name(), |T| {
            let cols = slice::<T>((s, l))?;
            let mut dx = vec![T::default(); b * c * h * w];
            // One task per (image, channel) plane, gathering its k² taps' windows.
            dx.par_chunks_mut(h * w)
                .enumerate()
                .for_each(|(plane, dst)| {
                    let (img, ch) = (plane / c, plane % c);
                    let tap = |i: usize, j: usize| {
                        &cols[(((ch * k + i) * k + j) * b + img) * window..][..window]
                    };
                    g.fold_plane(tap, (h, w), dst)
                });
            Ok(out(dx, (b, c, h, w)))
        })
    }
}

/// The k² views (B, C, Ho, Wo) of `x` (B, C, H, W, already padded) that a k×k window with
/// stride `s` sees, in row-major (i, j) order: view (i, j) holds x[.., i + s·r, j + s·q].
pub(crate) fn windows(x: &Tensor, k: usize, s: usize, ho: usize, wo: usize) -> Result<Vec<Tensor>> {
    let mut views = Vec::with_capacity(k * k);
    if s == 1 {
        for i in 0..k {
            for j in 0..k {
                views.push(x.narrow(2, i, ho)?.narrow(3, j, wo)?);
            }
        }
        return Ok(views);
    }
    // Split rows and columns into s phases each: x[.., q·s + r, ..] is phase r's row q. Offset
    // i = qi·s + ri then reads phase ri's rows qi..qi + Ho, a plain narrow. The input is padded
    // (never read: the last window ends inside x) to whole phases long enough for every offset.
    let (b, c, h, w) = x.dims4()?;
    let hq = h.div_ceil(s).max((k - 1) / s + ho);
    let wq = w.div_ceil(s).max((k - 1) / s + wo);
    let x = x
        .pad_with_zeros(2, 0, hq * s - h)?
        .pad_with_zeros(3, 0, wq * s - w)?
        .reshape((b, c, hq, s, wq, s))?;
    // Only the phases some offset reads (all of them once k ≥ s): one copy of the input in all.
    let used = k.min(s);
    let mut phases = Vec::with_capacity(used * used);
    for ri in 0..used {
        for rj in 0..used {
            phases.push(
                x.narrow(3, ri, 1)?
                    .narrow(5, rj, 1)?
                    .reshape((b, c, hq, wq))?,
            );
        }
    }
    for i in 0..k {
        for j in 0..k {
            let phase = &phases[(i % s) * used + j % s];
            views.push(phase.narrow(2, i / s, ho)?.narrow(3, j / s, wo)?);
        }
    }
    Ok(views)
}

#[cfg(test)]
mod tests;
