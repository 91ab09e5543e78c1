//! 2-D max pooling with a k×k window and stride k over (B, C, H, W).
//!
//! candle 0.11's own `max_pool2d` backward multiplies the gradient by the fraction of window
//! elements equal to the max (¼ for a 2×2 window) instead of routing it whole to the max, so its
//! gradients are wrong by a factor k². This version reshapes the windows onto their own axis and
//! takes a max reduction, whose backward routes the gradient to the maximum.
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
}
