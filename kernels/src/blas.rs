//! OpenBLAS for the CPU's f32 and f64 matrix products, when `KILN_BLAS=openblas` asks for it.
//!
//! It is loaded at run time (`libopenblas.so.0`: Debian's `libopenblas0-pthread`), so building
//! kiln needs no BLAS and a machine without one runs the `gemm` crate, as by default. Opt-in
//! rather than automatic: the two sum in different orders, and the same recipe and seed must
//! give the same bytes on a machine whether or not a package was installed since. Each product
//! runs on the BLAS's own threads, as many as candle's; an OpenBLAS that does not know the CPU
//! falls back to slow generic kernels (`OPENBLAS_CORETYPE` picks one, e.g. `SkylakeX` on an
//! AVX-512 machine), and [`init`] names the kernel it chose.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `cblas_?gemm` (row-major order, transposes, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc).
type Gemm<T> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    T,
    *const T,
    c_int,
    *const T,
    c_int,
    T,
    *mut T,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The loaded library's entry points.
pub struct Blas {
    sgemm: Gemm<f32>,
    dgemm: Gemm<f64>,
    /// "OpenBLAS <version> (<kernel>)", for logs.
    pub name: String,
}

/// The environment variable that selects the CPU matmul.
pub const ENV: &str = "KILN_BLAS";
const LIBRARY: &CStr = c"libopenblas.so.0";

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// The BLAS the CPU's products run on, if one was asked for and loaded.
pub fn active() -> Option<&'static Blas> {
    BLAS.get_or_init(|| load().ok().flatten()).as_ref()
}

/// Reads `KILN_BLAS` and loads the library it names; returns its description (`None`: the
/// built-in gemm). An unknown value or a library that does not load is an error saying what to
/// install or set, so that a run never silently computes with another matmul than asked.
pub fn init() -> Result<Option<String>, String> {
    let loaded = load()?;
    let name = loaded.as_ref().map(|b| b.name.clone());
    let _ = BLAS.set(loaded);
    Ok(name)
}

fn load() -> Result<Option<Blas>, String> {
    choose(std::env::var(ENV).ok().as_deref())
}

fn choose(value: Option<&str>) -> Result<Option<Blas>, String> {
    match value {
        None | Some("") | Some("gemm") => Ok(None),
        Some("openblas") => open().map(Some),
        Some(other) => Err(format!(
            "{ENV}={other} is not a CPU matmul kiln knows: set {ENV}=openblas, or unset it for \
             the built-in gemm"
        )),
    }
}

fn open() -> Result<Blas, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the signature the
    // CBLAS and OpenBLAS headers give it, and the library stays loaded for the process.
    unsafe {
        let lib = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err(format!(
                "{ENV}=openblas, but {} does not load: apt-get install libopenblas0-pthread, or \
                 unset {ENV}",
                LIBRARY.to_string_lossy()
            ));
        }
        let symbol = |name: &CStr| -> Result<*mut c_void, String> {
            let p = libc::dlsym(lib, name.as_ptr());
            match p.is_null() {
                true => Err(format!(
                    "{} has no {}: not an OpenBLAS with CBLAS",
                    LIBRARY.to_string_lossy(),
                    name.to_string_lossy()
                )),
                false => Ok(p),
            }
        };
        let sgemm: Gemm<f32> = std::mem::transmute(symbol(c"cblas_sgemm")?);
        let dgemm: Gemm<f64> = std::mem::transmute(symbol(c"cblas_dgemm")?);
        let set_threads: unsafe extern "C" fn(c_int) =
            std::mem::transmute(symbol(c"openblas_set_num_threads")?);
        let text = |name: &CStr| -> String {
            match symbol(name) {
                Ok(p) => {
                    let f: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(p);
                    CStr::from_ptr(f()).to_string_lossy().trim().to_string()
                }
                Err(_) => "?".into(),
            }
        };
        set_threads(candle_core::utils::get_num_threads() as c_int);
        let name = format!(
            "{} ({} kernels)",
            text(c"openblas_get_config"),
            text(c"openblas_get_corename")
        );
        Ok(Blas { sgemm, dgemm, name })
    }
}

/// One operand for [`Blas::gemm`]: row-major `data` with leading dimension `ld`, transposed
/// or not.
pub(crate) struct Operand<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub trans: bool,
}

/// The element types with a BLAS product.
pub(crate) trait BlasElem: Sized + Copy {
    fn gemm(blas: &Blas) -> Gemm<Self>;
    const ZERO: Self;
    const ONE: Self;
}
impl BlasElem for f32 {
    fn gemm(blas: &Blas) -> Gemm<f32> {
        blas.sgemm
    }
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}
impl BlasElem for f64 {
    fn gemm(blas: &Blas) -> Gemm<f64> {
        blas.dgemm
    }
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

impl Blas {
    /// `c` (m × n, row-major) = a·b, or += a·b when `accumulate`. The caller has checked the
    /// shapes against the slices.
    pub(crate) fn gemm<T: BlasElem>(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand<T>,
        b: Operand<T>,
        c: &mut [T],
        accumulate: bool,
    ) {
        let int = |v: usize| c_int::try_from(v).expect("matrix dimension fits a C int");
        let op = |t: bool| if t { TRANS } else { NO_TRANS };
        let beta = if accumulate { T::ONE } else { T::ZERO };
        // SAFETY: the operands hold m×k, k×n and m×n elements at these leading dimensions
        // (checked by the callers, `gemm::matmul` and the linear op), and c is borrowed alone.
        unsafe {
            T::gemm(self)(
                ROW_MAJOR,
                op(a.trans),
                op(b.trans),
                int(m),
                int(n),
                int(k),
                T::ONE,
                a.data.as_ptr(),
                int(a.ld.max(1)),
                b.data.as_ptr(),
                int(b.ld.max(1)),
                beta,
                c.as_mut_ptr(),
                int(n.max(1)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::{builtin, GemmElem, Mat};

    fn matrix<T: From<f32>>(len: usize, seed: usize) -> Vec<T> {
        (0..len)
            .map(|i| T::from(((i * 7919 + seed) % 101) as f32 / 50.0 - 1.0))
            .collect()
    }

    /// A rows × cols view of `v`, stored transposed when `t`.
    fn view<T>(v: &[T], rows: usize, cols: usize, t: bool) -> Mat<'_, T> {
        match t {
            false => Mat::new(v, rows, cols),
            true => Mat::new(v, cols, rows).t(),
        }
    }

    /// The largest difference between the BLAS and the gemm crate over every transpose,
    /// writing and accumulating, on shapes that are no multiple of any tile.
    fn largest_difference<T>(blas: &Blas) -> f64
    where
        T: GemmElem + From<f32> + Into<f64>,
    {
        let (m, k, n) = (37, 53, 29);
        let (a, b, c) = (
            matrix::<T>(m * k, 1),
            matrix::<T>(k * n, 2),
            matrix::<T>(m * n, 3),
        );
        let mut worst = 0f64;
        for (ta, tb, accumulate) in (0..8).map(|i| (i & 1 == 1, i & 2 == 2, i & 4 == 4)) {
            let (av, bv) = (view(&a, m, k, ta), view(&b, k, n, tb));
            let mut want = c.clone();
            builtin(&mut want, accumulate, av, bv, gemm::Parallelism::None);
            let mut got = c.clone();
            blas.gemm((m, n, k), av.operand(), bv.operand(), &mut got, accumulate);
            for (x, y) in want.into_iter().zip(got) {
                worst = worst.max((x.into() - y.into()).abs());
            }
        }
        worst
    }

    #[test]
    fn openblas_agrees_with_the_builtin_gemm() {
        let blas = match open() {
            Ok(b) => b,
            Err(e) => {
                assert!(
                    std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
                    "{e}"
                );
                println!("skipping: {e}");
                return;
            }
        };
        let (d32, d64) = (
            largest_difference::<f32>(&blas),
            largest_difference::<f64>(&blas),
        );
        println!(
            "{}: largest difference f32 {d32:.1e}, f64 {d64:.1e}",
            blas.name
        );
        assert!(d32 < 1e-4 && d64 < 1e-12);
    }

    #[test]
    fn an_unknown_choice_is_refused_by_name() {
        assert!(choose(None).unwrap().is_none() && choose(Some("gemm")).unwrap().is_none());
        let err = choose(Some("mkl")).err().unwrap();
        assert!(
            err.contains("KILN_BLAS=mkl") && err.contains("openblas"),
            "{err}"
        );
    }
}
