//! The CPU matrix product the fused kernels call inside their loops (convolution, attention):
//! the `gemm` crate on row-major slices, optionally transposed, writing or accumulating into a
//! row-major destination.

use gemm::Parallelism;

/// The element types the CPU matmul ([`gemm`](::gemm)) takes here.
pub(crate) trait GemmElem:
    Copy + Default + std::ops::AddAssign + Send + Sync + 'static
{
    const ONE: Self;
}
impl GemmElem for f32 {
    const ONE: f32 = 1.0;
}
impl GemmElem for f64 {
    const ONE: f64 = 1.0;
}

/// A row-major view of an `m × n` matrix, or (`t`) of the transpose of one stored `n × m`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    t: bool,
}

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "matrix of {rows}×{cols} over {}",
            data.len()
        );
        Mat {
            data,
            rows,
            cols,
            t: false,
        }
    }
    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            t: !self.t,
            ..self
        }
    }
    /// (row stride, column stride) in elements.
    fn strides(&self) -> (isize, isize) {
        if self.t {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `dst` (a.rows × b.cols, row-major) = a·b, or += a·b when `accumulate`.
pub(crate) fn matmul<T: GemmElem>(
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && dst.len() >= m * n,
        "matmul: {m}×{k} · {}×{n}",
        b.rows
    );
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
    // SAFETY: the asserts above and in `Mat::new` keep every index gemm forms (row·rs + col·cs
    // over the shapes given) inside the three slices; dst is borrowed mutably, alone.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}
