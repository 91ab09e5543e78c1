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
//!
//! In f32 and f64 on the CPU the whole convolution is one op ([`CONV`]) instead: per image
//! (or per group of images, side by side, when a window is too small to make a wide product:
//! 7 × 7 at a ResNet's last stage), unfold into a (C·k², n·Ho·Wo) buffer and one matmul,
//! written straight into the output's (Cout, Ho·Wo) plane when n = 1; the backward unfolds
//! again (the columns are cheaper to recompute than to keep: 9× the input for a 3×3 kernel),
//! accumulates dWᵀ = cols·dYᵀ (C·k² rows: faster than Cout rows) and folds Wᵀ·dY into dx. No
//! batch-sized column buffer, and one graph node whose backward hands autograd two gradients,
//! instead of a matmul, reshapes and a copy, each of whose gradients candle zero-fills and
//! adds. With stride 1 and 'same' padding each tap's plane is one shifted run of the input, so
//! the unfold is a copy and the fold a vectorized add per tap rather than a call per row.

use crate::gemm::{matmul, Mat};
use crate::{out, slice, slices, with_float, Kernel, Op};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
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
    let (_, c, h, wd) = x.dims4()?;
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
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = x
            .contiguous()?
            .apply_op2(&w.to_dtype(x.dtype())?.contiguous()?, CONV.with(geometry))?;
        return match b {
            Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?),
            None => Ok(y),
        };
    }
    conv2d_unfolded(x, w, b, geometry)
}

/// The convolution as an unfold, a matmul over the whole batch and a transpose, each a node of
/// the graph (other devices, other dtypes, and the fused op's reference).
pub fn conv2d_unfolded(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: Unfold) -> Result<Tensor> {
    let (bsz, c, _, _) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let cols = if x.device().is_cpu() {
        unfold(x, g)?
    } else {
        unfold_composed(x, g)?
    };
    // The column order (c, i, j) matches w's layout: (Cout, C·k²) · (C·k², B·Ho·Wo).
    let y = w.reshape((cout, c * k * k))?.matmul(&cols)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((cout, 1))?)?,
        None => y,
    };
    // (Cout, B, Ho, Wo) → (B, Cout, Ho, Wo), laid out for the next layer.
    y.reshape((cout, bsz, g.ho, g.wo))?
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

    /// The outputs `lo..hi` of a row of `n` whose tap `j` reads inside an input row of `len`
    /// (the others read padding), and the input column output `lo` reads.
    #[inline(always)]
    fn inside(&self, j: usize, len: usize, n: usize) -> (usize, usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // Stride 1 spelled out: this runs for every tap of every channel of every image, and a
        // division (even by 1) costs more than the rest.
        let steps = |v: usize| if s == 1 { v } else { v.div_ceil(s) };
        let lo = steps(p.saturating_sub(j)).min(n);
        let hi = steps((len + p).saturating_sub(j)).clamp(lo, n);
        (lo, hi, lo * s + j - p.min(lo * s + j))
    }

    /// Whether output position `d` of a plane reads input `d + shift` for every tap (stride 1,
    /// input rows as wide as output rows: 'same' padding), so that a tap's whole plane is one
    /// run of the input, apart from the columns it reads from the padding.
    fn plane_is_a_shift(&self, w: usize) -> bool {
        self.stride == 1 && self.wo == w
    }

    /// For a [`Self::plane_is_a_shift`] geometry, the run of tap (i, j)'s plane that reads
    /// inside the input; `None` if the tap reads only padding.
    fn shifted_run(&self, (h, w): (usize, usize), (i, j): (usize, usize)) -> Option<Run> {
        let (ylo, yhi, y0) = self.inside(i, h, self.ho);
        let (lo, hi, x0) = self.inside(j, w, w);
        (ylo < yhi && lo < hi).then(|| Run {
            start: ylo * w + lo,
            end: (yhi - 1) * w + hi,
            from: y0 * w + x0,
            cols: (lo, hi),
            w,
        })
    }

    /// Tap (i, j) of one channel of one image: `src` (H, W) → `dst` (Ho·Wo). Each output row
    /// is zeros, a (strided) run of one input row, zeros; with 'same' padding and stride 1 the
    /// rows join into one copy, and the columns it brought over the row ends are zeroed after.
    fn unfold_tap<T: Copy + Default>(
        &self,
        src: &[T],
        (h, w): (usize, usize),
        (i, j): (usize, usize),
        dst: &mut [T],
    ) {
        if self.plane_is_a_shift(w) {
            let Some(run) = self.shifted_run((h, w), (i, j)) else {
                return dst.fill(T::default());
            };
            dst[..run.start].fill(T::default());
            dst[run.end..].fill(T::default());
            let inside = &mut dst[run.start..run.end];
            inside.copy_from_slice(&src[run.from..][..inside.len()]);
            return run.zero_between_rows(inside);
        }
        let (lo, hi, x0) = self.inside(j, w, self.wo);
        for (oy, row) in dst.chunks_exact_mut(self.wo).enumerate() {
            let Some(y) = self.source(oy, i, h) else {
                row.fill(T::default());
                continue;
            };
            row[..lo].fill(T::default());
            row[hi..].fill(T::default());
            if lo == hi {
                continue;
            }
            let src = &src[y * w + x0..];
            if self.stride == 1 {
                row[lo..hi].copy_from_slice(&src[..hi - lo]);
            } else {
                for (d, v) in row[lo..hi].iter_mut().zip(src.iter().step_by(self.stride)) {
                    *d = *v;
                }
            }
        }
    }

    /// The adjoint of [`Self::unfold_tap`] over all k² taps of one channel of one image: tap
    /// (i, j)'s Ho·Wo columns are `taps[at(i, j)..]`; every entry is added to the pixel it
    /// read, in tap order, so each pixel's sum runs in a fixed order. With 'same' padding and
    /// stride 1 a tap's plane is added as one run: its entries that read padding are zeroed
    /// first (they are scratch), and adding +0 to a sum that started at +0 changes no bits.
    /// `dst` comes zeroed (both callers allocate it so): the sums start from it.
    #[inline(always)] // into `vexp::wide`'s AVX-512 function
    fn fold_plane<T: Copy + std::ops::AddAssign + Default>(
        &self,
        taps: &mut [T],
        at: impl Fn(usize, usize) -> usize,
        (h, w): (usize, usize),
        dst: &mut [T],
    ) {
        let (k, wo, window) = (self.k, self.wo, self.ho * self.wo);
        for i in 0..k {
            for j in 0..k {
                let tap = &mut taps[at(i, j)..][..window];
                if self.plane_is_a_shift(w) {
                    let Some(run) = self.shifted_run((h, w), (i, j)) else {
                        continue;
                    };
                    let inside = &mut tap[run.start..run.end];
                    run.zero_between_rows(inside);
                    for (d, v) in dst[run.from..][..inside.len()].iter_mut().zip(&*inside) {
                        *d += *v;
                    }
                    continue;
                }
                let (lo, hi, x0) = self.inside(j, w, wo);
                if lo == hi {
                    continue;
                }
                for (oy, row) in tap.chunks_exact(wo).enumerate() {
                    let Some(y) = self.source(oy, i, h) else {
                        continue;
                    };
                    let (dst, row) = (&mut dst[y * w + x0..], &row[lo..hi]);
                    if self.stride == 1 {
                        for (d, v) in dst[..row.len()].iter_mut().zip(row) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst.iter_mut().step_by(self.stride).zip(row) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// The output positions `start..end` of a tap's plane (rows of `w`) that a 'same' stride-1
/// convolution reads as one run of the input from position `from`; within each row only the
/// columns `cols` read inside it.
struct Run {
    start: usize,
    end: usize,
    from: usize,
    cols: (usize, usize),
    w: usize,
}

impl Run {
    /// In the run's slice, zero the entries between one row's last inside column and the next
    /// row's first: those the whole-plane shift carried over a row end (they read padding).
    fn zero_between_rows<T: Copy + Default>(&self, inside: &mut [T]) {
        let ((lo, hi), w) = (self.cols, self.w);
        if hi - lo < w {
            for row_end in (hi - lo..inside.len()).step_by(w) {
                inside[row_end..row_end + w - (hi - lo)].fill(T::default());
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
            // One task per (image, channel) plane, its k² taps' windows gathered into scratch
            // (the fold zeroes their padding entries).
            dx.par_chunks_mut(h * w)
                .enumerate()
                .for_each_init(Vec::new, |taps, (plane, dst)| {
                    let (img, ch) = (plane / c, plane % c);
                    taps.clear();
                    for tap in 0..k * k {
                        taps.extend_from_slice(
                            &cols[((ch * k * k + tap) * b + img) * window..][..window],
                        );
                    }
                    g.fold_plane(taps, |i, j| (i * k + j) * window, (h, w), dst)
                });
            Ok(out(dx, (b, c, h, w)))
        })
    }
}

/// x (B, C, H, W), w (Cout, C, k, k) → y (B, Cout, Ho, Wo); backward: dx and dw.
static CONV: Op<Unfold> = Op {
    forward: Kernel {
        name: "kiln-conv2d",
        cpu: conv_forward,
        #[cfg(feature = "cuda")]
        cuda: crate::op::cpu_only,
    },
    backward: |g| CONV_BACKWARD.run(g.param, &[g.inputs[0], g.inputs[1], g.dy]),
};

static CONV_BACKWARD: Kernel<Unfold> = Kernel {
    name: "kiln-conv2d-backward",
    cpu: conv_backward,
    #[cfg(feature = "cuda")]
    cuda: crate::op::cpu_only,
};

/// The columns a product should have at least: below a few hundred the gemm kernels spend
/// more time packing and storing than multiplying (a 128 × 1,152 by 1,152 × 49 product runs at
/// ~80 GFLOP/s on one core here, × 392 at ~105).
const MIN_PRODUCT_COLUMNS: usize = 384;

/// The fixed number of images each backward task sums dW over: the partial sums (and so the
/// bits of dW) do not depend on the thread count.
const IMAGES_PER_DW_PARTIAL: usize = 8;

/// How a convolution over `b` images of `window` output positions is cut into products.
#[derive(Clone, Copy)]
struct Plan {
    /// Images unfolded side by side into one product, so that small windows (7 × 7 at a
    /// ResNet's last stage) still give wide products; at most one dW partial.
    group: usize,
    /// One task per group, each product on one thread; or, with fewer tasks than threads,
    /// tasks in turn with each product on all of them.
    par: Parallelism,
}

impl Plan {
    fn new(b: usize, window: usize, images_per_task: usize) -> Plan {
        let group = (MIN_PRODUCT_COLUMNS / window.max(1)).clamp(1, IMAGES_PER_DW_PARTIAL);
        let tasks = b.div_ceil(images_per_task.max(group));
        let threads = rayon::current_num_threads();
        let par = if tasks >= threads {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        };
        Plan { group, par }
    }

    /// One task's scratch: the columns of a group, (C·k², group·P), and, for groups of more
    /// than one image, a (Cout, group·P) product to regroup through.
    fn buffers<T: Copy + Default>(self, kk: usize, cout: usize, window: usize) -> [Vec<T>; 2] {
        let product = if self.group > 1 {
            cout * self.group * window
        } else {
            0
        };
        [
            vec![T::default(); kk * self.group * window],
            vec![T::default(); product],
        ]
    }
}

impl Unfold {
    /// `n` images `x` (n, C, H, W) → `cols` (C·k², n·Ho·Wo): row (c, i, j) holds image after
    /// image the Ho·Wo inputs that tap sees.
    fn unfold_images<T: Copy + Default>(
        &self,
        x: &[T],
        n: usize,
        (c, h, w): (usize, usize, usize),
        cols: &mut [T],
    ) {
        let (k, window) = (self.k, self.ho * self.wo);
        for (row, dst) in cols[..c * k * k * n * window]
            .chunks_exact_mut(n * window)
            .enumerate()
        {
            let (ch, i, j) = (row / (k * k), row / k % k, row % k);
            for (img, dst) in dst.chunks_exact_mut(window).enumerate() {
                let src = &x[(img * c + ch) * h * w..][..h * w];
                self.unfold_tap(src, (h, w), (i, j), dst);
            }
        }
    }
}

/// n images' planes (n, Cout, P) → one product's layout (Cout, n·P).
fn to_product<T: Copy>(images: &[T], product: &mut [T], n: usize, cout: usize, plane: usize) {
    for (img, planes) in images.chunks_exact(cout * plane).take(n).enumerate() {
        for (co, p) in planes.chunks_exact(plane).enumerate() {
            product[(co * n + img) * plane..][..plane].copy_from_slice(p);
        }
    }
}

/// The inverse of [`to_product`]: (Cout, n·P) → (n, Cout, P).
fn to_images<T: Copy>(product: &[T], images: &mut [T], n: usize, cout: usize, plane: usize) {
    for (img, planes) in images.chunks_exact_mut(cout * plane).take(n).enumerate() {
        for (co, p) in planes.chunks_exact_mut(plane).enumerate() {
            p.copy_from_slice(&product[(co * n + img) * plane..][..plane]);
        }
    }
}

/// x, w → y: per group of images, unfold then Y = W·cols.
fn conv_forward(args: &[(&CpuStorage, &Layout)], g: Unfold) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, c, h, wd) = args[0].1.shape().dims4()?;
    let cout = args[1].1.shape().dims()[0];
    let (kk, window) = (c * g.k * g.k, g.ho * g.wo);
    let plan = Plan::new(b, window, 1);
    let group = plan.group;
    crate::match_dtype!(candle_core::backend::BackendStorage::dtype(args[0].0),
        [F32 => f32, F64 => f64],
        |T| {
            let [x, w] = slices::<T, 2>(args)?;
            let w = Mat::new(w, cout, kk);
            let mut y = crate::zeros::<T>(b * cout * window);
            y.par_chunks_mut(group * cout * window)
                .zip(x.par_chunks(group * c * h * wd))
                .for_each_init(|| plan.buffers(kk, cout, window), |[cols, product], (y, x)| {
                    let n = x.len() / (c * h * wd);
                    g.unfold_images(x, n, (c, h, wd), cols);
                    let cols = Mat::new(cols, kk, n * window);
                    if n == 1 {
                        matmul(y, false, w, cols, plan.par);
                    } else {
                        matmul(product, false, w, cols, plan.par);
                        to_images(product, y, n, cout, window);
                    }
                });
            Ok(vec![out(y, (b, cout, g.ho, g.wo))])
        },
        other => candle_core::bail!("kiln-conv2d: unsupported dtype {other:?}")
    )
}

/// x, w, dy → dx, dw: per group of images, dWᵀ += cols·dYᵀ and dx = fold(Wᵀ·dY). dW is summed
/// transposed: with Cout rows (32 at a ResNet's first stage) the product dY·colsᵀ runs at
/// two thirds of the speed of cols·dYᵀ, which has C·k² rows.
fn conv_backward(args: &[(&CpuStorage, &Layout)], g: Unfold) -> Result<Vec<(CpuStorage, Shape)>> {
    let (b, c, h, wd) = args[0].1.shape().dims4()?;
    let w_shape = args[1].1.shape().clone();
    let cout = w_shape.dims()[0];
    let (k, kk, window) = (g.k, c * g.k * g.k, g.ho * g.wo);
    let plan = Plan::new(b, window, IMAGES_PER_DW_PARTIAL);
    let group = plan.group;
    crate::match_dtype!(candle_core::backend::BackendStorage::dtype(args[0].0),
        [F32 => f32, F64 => f64],
        |T| {
            let [x, w, dy] = slices::<T, 3>(args)?;
            let w = Mat::new(w, cout, kk);
            let mut dx = crate::zeros::<T>(x.len());
            let per_task = IMAGES_PER_DW_PARTIAL;
            let partials: Vec<Vec<T>> = dx
                .par_chunks_mut(per_task * c * h * wd)
                .zip(x.par_chunks(per_task * c * h * wd))
                .zip(dy.par_chunks(per_task * cout * window))
                .map(|((dx, x), dy)| {
                    let [mut cols, mut product] = plan.buffers(kk, cout, window);
                    let mut dwt = vec![T::default(); kk * cout];
                    let groups = dx
                        .chunks_mut(group * c * h * wd)
                        .zip(x.chunks(group * c * h * wd))
                        .zip(dy.chunks(group * cout * window));
                    for (first, ((dx, x), dy)) in groups.enumerate() {
                        let n = x.len() / (c * h * wd);
                        let cols_n = n * window;
                        g.unfold_images(x, n, (c, h, wd), &mut cols);
                        let dy = if n == 1 {
                            Mat::new(dy, cout, window)
                        } else {
                            to_product(dy, &mut product, n, cout, window);
                            Mat::new(&product, cout, cols_n)
                        };
                        let cols_mat = Mat::new(&cols, kk, cols_n);
                        matmul(&mut dwt, first > 0, cols_mat, dy.t(), plan.par);
                        // The columns' gradient reuses their buffer, then folds into dx.
                        matmul(&mut cols, false, w.t(), dy, plan.par);
                        crate::vexp::wide(|| {
                            for (img, dx) in dx.chunks_mut(c * h * wd).enumerate() {
                                for (ch, plane) in dx.chunks_mut(h * wd).enumerate() {
                                    let at = |i, j| ((ch * k + i) * k + j) * cols_n + img * window;
                                    g.fold_plane(&mut cols, at, (h, wd), plane);
                                }
                            }
                        });
                    }
                    dwt
                })
                .collect();
            let mut dwt = partials[0].clone();
            for p in &partials[1..] {
                for (a, v) in dwt.iter_mut().zip(p) {
                    *a += *v;
                }
            }
            let mut dw = vec![T::default(); cout * kk];
            for (r, row) in dwt.chunks_exact(cout).enumerate() {
                for (co, v) in row.iter().enumerate() {
                    dw[co * kk + r] = *v;
                }
            }
            Ok(vec![out(dx, (b, c, h, wd)), out(dw, w_shape)])
        },
        other => candle_core::bail!("kiln-conv2d backward: unsupported dtype {other:?}")
    )
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
