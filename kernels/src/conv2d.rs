//! 2-D convolution (zero padding, any stride) as im2col + one batched matmul.
//!
//! The k² shifted (and, for stride s, subsampled) views of the padded input are stacked into
//! columns (B, C·k², Ho·Wo) and multiplied by the kernel reshaped to (Cout, C·k²). Its backward
//! is that of a matmul and of narrow/reshape/stack, which candle runs as large contiguous ops;
//! candle's own conv2d backward goes through a naive CPU conv_transpose2d and was the bulk of a
//! CNN step on the CPU.

use candle_core::{Result, Tensor};

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
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (wd + 2 * padding - k) / stride + 1,
    );
    let shifted = windows(&x, k, stride, ho, wo)?;
    // (B, C, k², Ho, Wo) → (B, C·k², Ho·Wo); the column order (c, i, j) matches w's layout.
    let cols = Tensor::stack(&shifted, 2)?.reshape((bsz, c * k * k, ho * wo))?;
    let y = w.reshape((cout, c * k * k))?.broadcast_matmul(&cols)?;
    let y = y.reshape((bsz, cout, ho, wo))?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?),
        None => Ok(y),
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
mod tests {
    use super::*;
    use crate::testing::{check_grad, max_abs_diff, rand};

    #[test]
    fn matches_candle_conv2d_and_gradients() {
        let (x, w, b) = (
            rand(&[2, 3, 6, 5], 1),
            rand(&[4, 3, 3, 3], 2),
            rand(&[4], 3),
        );
        for p in [0, 1] {
            let ours = conv2d(&x, &w, Some(&b), p).unwrap();
            // candle's forward is a direct convolution: an independent reference.
            let want = x
                .conv2d(&w, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert!(max_abs_diff(&ours, &want) < 1e-12);
        }
        check_grad(&x, |x| conv2d(x, &w, Some(&b), 1));
        check_grad(&w, |w| conv2d(&x, w, Some(&b), 1));
        check_grad(&b, |b| conv2d(&x, &w, Some(b), 1));
    }

    #[test]
    fn strided_matches_candle_conv2d_and_gradients() {
        // Odd and even sizes, kernels smaller than, equal to and larger than the stride (a
        // ResNet's 1×1 stride-2 shortcut, 3×3 stride-2 convs, the 7×7 stride-2 stem).
        let x = rand(&[2, 3, 9, 8], 4);
        for (k, s, p) in [
            (1, 2, 0),
            (3, 2, 1),
            (3, 2, 0),
            (7, 2, 3),
            (3, 3, 1),
            (2, 3, 0),
        ] {
            let w = rand(&[4, 3, k, k], 5);
            let b = rand(&[4], 6);
            let ours = conv2d_strided(&x, &w, Some(&b), s, p).unwrap();
            let want = x
                .conv2d(&w, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), want.dims(), "k {k} s {s} p {p}");
            assert!(
                max_abs_diff(&ours, &want) < 1e-12,
                "k {k} s {s} p {p}: {}",
                max_abs_diff(&ours, &want)
            );
        }
        let x = rand(&[2, 2, 7, 6], 7);
        for (k, s, p) in [(1, 2, 0), (3, 2, 1)] {
            let w = rand(&[3, 2, k, k], 8);
            check_grad(&x, |x| conv2d_strided(x, &w, None, s, p));
            check_grad(&w, |w| conv2d_strided(&x, w, None, s, p));
        }
    }
}
