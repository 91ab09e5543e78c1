//! 2-D max pooling over (B, C, H, W): a k×k window with stride k ([`max_pool2d`]), or any
//! stride and padding ([`max_pool2d_strided`], e.g. a ResNet stem's 3×3 stride-2 padding-1 pool).
//!
//! candle 0.11's own `max_pool2d` backward multiplies the gradient by the fraction of window
//! elements equal to the max (¼ for a 2×2 window) instead of routing it whole to the max, so its
//! gradients are wrong by a factor k². This version puts the windows on their own axis and
//! takes a max reduction, whose backward routes the gradient to the maximum (to each of them
//! on an exact tie, as candle's max does).
//! Rows and columns that do not fill a window are dropped (floor mode, as PyTorch).

use candle_core::{Result, Tensor, D};

pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / k, w / k);
    let x = if h % k != 0 || w % k != 0 {
        x.narrow(2, 0, ho * k)?.narrow(3, 0, wo * k)?
    } else {
        x.clone()
    };
    x.reshape((b, c, ho, k, wo, k))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((b, c, ho, wo, k * k))?
        .max(D::Minus1)
}

/// PyTorch's `MaxPool2d(k, stride, padding)`: output (B, C, (H + 2p − k) / s + 1, …). Padding
/// counts as −∞, so it is never the maximum; as in PyTorch it may be at most k / 2, which leaves
/// every window at least one input element.
pub fn max_pool2d_strided(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if stride == 0 || k == 0 || 2 * padding > k || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!(
            "max_pool2d: a {k}×{k} window with stride {stride}, padding {padding} does not fit a \
             {h}×{w} input (padding may be at most half the window)"
        );
    }
    if stride == k && padding == 0 {
        return max_pool2d(x, k);
    }
    let x = if padding > 0 {
        let fill = |shape: (usize, usize, usize, usize)| {
            Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
        };
        let rows = fill((b, c, padding, w))?;
        let x = Tensor::cat(&[&rows, x, &rows], 2)?;
        let cols = fill((b, c, h + 2 * padding, padding))?;
        Tensor::cat(&[&cols, &x, &cols], 3)?
    } else {
        x.clone()
    };
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (w + 2 * padding - k) / stride + 1,
    );
    let views = crate::conv2d::windows(&x, k, stride, ho, wo)?;
    Tensor::stack(&views, 4)?.max(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, rand};

    #[test]
    fn matches_reference_and_gradients() {
        let x = rand(&[2, 3, 5, 7], 4);
        let got: Vec<f64> = max_pool2d(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut want = Vec::new();
        for bc in 0..6 {
            for i in 0..2 {
                for j in 0..3 {
                    let at = |di: usize, dj: usize| xs[bc * 35 + (2 * i + di) * 7 + 2 * j + dj];
                    want.push(at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)));
                }
            }
        }
        assert_eq!(got, want);
        check_grad(&x, |x| max_pool2d(x, 2));
    }

    /// PyTorch's MaxPool2d by definition: the max over the window's positions inside the input.
    fn reference(x: &Tensor, k: usize, s: usize, p: usize) -> Vec<f64> {
        let (b, c, h, w) = x.dims4().unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut out = Vec::new();
        for bc in 0..b * c {
            for i in 0..ho {
                for j in 0..wo {
                    let mut m = f64::NEG_INFINITY;
                    for di in 0..k {
                        for dj in 0..k {
                            let (r, q) = (
                                (i * s + di) as isize - p as isize,
                                (j * s + dj) as isize - p as isize,
                            );
                            if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < w {
                                m = m.max(xs[bc * h * w + r as usize * w + q as usize]);
                            }
                        }
                    }
                    out.push(m);
                }
            }
        }
        out
    }

    #[test]
    fn strided_matches_reference_and_gradients() {
        // Odd and even sizes; all-negative inputs show that the padding is not a zero.
        for (shape, seed) in [([2, 3, 7, 8], 5), ([1, 2, 6, 5], 6)] {
            let x = rand(&shape, seed);
            for (k, s, p) in [(3, 2, 1), (3, 2, 0), (2, 2, 0), (3, 1, 1), (2, 3, 1)] {
                for x in [x.clone(), (x.abs().unwrap() + 0.1).unwrap().neg().unwrap()] {
                    let got = max_pool2d_strided(&x, k, s, p).unwrap();
                    let (_, _, h, w) = x.dims4().unwrap();
                    assert_eq!(
                        got.dims(),
                        &[
                            shape[0],
                            shape[1],
                            (h + 2 * p - k) / s + 1,
                            (w + 2 * p - k) / s + 1
                        ]
                    );
                    let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(got, reference(&x, k, s, p), "k {k} s {s} p {p}");
                }
            }
            check_grad(&x, |x| max_pool2d_strided(x, 3, 2, 1));
            check_grad(&x, |x| max_pool2d_strided(x, 3, 1, 1));
        }
        assert!(max_pool2d_strided(&rand(&[1, 1, 4, 4], 1), 3, 2, 2).is_err());
    }
}
