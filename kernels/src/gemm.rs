//! The CPU matrix product the fused kernels call inside their loops (convolution, attention,
//! linear): the `gemm` crate on row-major slices, optionally transposed, writing or
//! accumulating into a row-major destination; OpenBLAS instead, for the products that may use
//! every thread, when `KILN_BLAS=openblas` ([`crate::blas`]).

use candle_core::{DType, Layout, Result, Storage, Tensor, WithDType};
use gemm::Parallelism;

/// The element types the CPU matmul ([`gemm`](::gemm)) takes here.
pub(crate) trait GemmElem:
    Copy + Default + std::ops::AddAssign + Send + Sync + crate::blas::BlasElem + 'static
{
}
impl GemmElem for f32 {}
impl GemmElem for f64 {}

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
    /// The same matrix as a BLAS operand: row-major storage and whether to transpose it.
    pub(crate) fn operand(&self) -> crate::blas::Operand<'a, T> {
        crate::blas::Operand {
            data: self.data,
            // The stored matrix is rows × cols, or cols × rows when transposed.
            ld: if self.t { self.rows } else { self.cols },
            trans: self.t,
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
    // The BLAS threads its own products: a product called from inside a parallel loop (`None`)
    // stays on one thread of the gemm crate rather than start more threads than cores.
    match (crate::blas::active(), par) {
        (Some(blas), Parallelism::Rayon(_)) => {
            blas.gemm((m, n, k), a.operand(), b.operand(), dst, accumulate)
        }
        _ => builtin(dst, accumulate, a, b, par),
    }
}

/// [`matmul`] on the `gemm` crate, whatever `KILN_BLAS` says.
pub(crate) fn builtin<T: GemmElem>(
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
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
            <T as crate::blas::BlasElem>::ONE,
            <T as crate::blas::BlasElem>::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// `a · b` for 2-D tensors: through [`matmul`] (so on the BLAS) when one is active and both are
/// f32 or f64 CPU tensors, each contiguous or a transposed contiguous view; otherwise candle's
/// matmul, as without a BLAS.
pub(crate) fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if crate::blas::active().is_some() && a.device().is_cpu() && a.dtype() == b.dtype() {
        let product = match a.dtype() {
            DType::F32 => mm_cpu::<f32>(a, b)?,
            DType::F64 => mm_cpu::<f64>(a, b)?,
            _ => None,
        };
        if let Some(p) = product {
            return Ok(p);
        }
    }
    a.matmul(b)
}

fn mm_cpu<T: GemmElem + WithDType>(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        return Ok(None); // candle's matmul names the mismatch
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return Ok(None);
    };
    let (Some(ma), Some(mb)) = (
        view(ca.as_slice::<T>()?, la, m, k),
        view(cb.as_slice::<T>()?, lb, k, n),
    ) else {
        return Ok(None);
    };
    let mut out = vec![T::default(); m * n];
    matmul(&mut out, false, ma, mb, all_threads());
    Ok(Some(Tensor::from_vec(out, (m, n), a.device())?))
}

/// A `rows × cols` tensor's storage as a [`Mat`]: row-major, or the transpose of a row-major
/// `cols × rows` (what `.t()` gives); `None` for other strides.
pub(crate) fn view<'a, T>(
    data: &'a [T],
    l: &Layout,
    rows: usize,
    cols: usize,
) -> Option<Mat<'a, T>> {
    let data = data.get(l.start_offset()..)?;
    let stride = l.stride();
    if rows * cols == 0 || data.len() < rows * cols {
        return None;
    }
    if stride == [cols, 1] || (rows == 1 && stride[1] == 1) {
        Some(Mat::new(data, rows, cols))
    } else if stride == [1, rows] || (cols == 1 && stride[0] == 1) {
        Some(Mat::new(data, cols, rows).t())
    } else {
        None
    }
}

/// A product that may use every thread.
pub(crate) fn all_threads() -> Parallelism {
    Parallelism::Rayon(candle_core::utils::get_num_threads())
}
