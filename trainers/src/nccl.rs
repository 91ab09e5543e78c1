//! NCCL, NVIDIA's collective library: the gradient all-reduce between the GPUs of a
//! data-parallel job. MPI starts the ranks and carries NCCL's unique id from rank 0 to the others
//! (as llm.c does); NCCL then moves the gradients GPU to GPU, over NVLink where there is one.
//!
//! The library is loaded at run time, not linked. candle links its CUDA libraries at build time,
//! so cudarc's own `nccl` module would make every CUDA build need libnccl to link and to start,
//! single-GPU runs included; loaded here, it is needed only by a job that all-reduces on GPUs, and
//! its absence is one error saying how to install it. The library is `KILN_NCCL` when set, else
//! `libnccl.so.2` on the loader's path: the `nvidia-nccl-cu13` wheel PyTorch installs
//! (`site-packages/nvidia/nccl/lib`) or Debian's `libnccl2`.
//!
//! Only the few entry points a data-parallel step needs are bound, with the signatures of NCCL
//! 2.x's `nccl.h`.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// The variable naming the NCCL library to load.
pub const ENV: &str = "KILN_NCCL";
const DEFAULT: &str = "libnccl.so.2";

/// The size of an `ncclUniqueId`: what rank 0 makes and sends, and every rank joins with.
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

/// `ncclResult_t`.
type Status = c_int;
const SUCCESS: Status = 0;
/// `ncclComm_t`.
type RawComm = *mut c_void;
/// `ncclFloat32` and `ncclSum`.
#[cfg(feature = "cuda")]
const FLOAT32: c_int = 7;
#[cfg(feature = "cuda")]
const SUM: c_int = 0;

// The entry points' signatures, as nccl.h declares them.
type GetVersion = unsafe extern "C" fn(*mut c_int) -> Status;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> Status;
type GetErrorString = unsafe extern "C" fn(Status) -> *const c_char;
type GetLastError = unsafe extern "C" fn(RawComm) -> *const c_char;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Status;
type CommDestroy = unsafe extern "C" fn(RawComm) -> Status;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void, // send buffer
    *mut c_void,   // receive buffer
    usize,         // elements
    c_int,         // ncclDataType_t
    c_int,         // ncclRedOp_t
    RawComm,
    *mut c_void, // cudaStream_t
) -> Status;

/// The loaded library: its entry points.
pub struct Library {
    path: String,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    get_error_string: GetErrorString,
    get_last_error: GetLastError,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    comm_init_rank: CommInitRank,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    comm_destroy: CommDestroy,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    all_reduce: AllReduceFn,
}

/// The NCCL of `KILN_NCCL` (or `libnccl.so.2`), loaded once per process.
pub fn library() -> Result<&'static Library> {
    static LOADED: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    let path = std::env::var(ENV).unwrap_or_else(|_| DEFAULT.into());
    LOADED
        .get_or_init(|| Library::open(&path))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

impl Library {
    /// Loads the NCCL at `path` (a file, or a name the dynamic loader looks up).
    pub fn open(path: &str) -> std::result::Result<Library, String> {
        let install = format!(
            "a data-parallel job on GPUs sums its gradients with NCCL. Install it (pip install \
             nvidia-nccl-cu13, or -cu12 for a CUDA 12 driver, or apt-get install libnccl2) and \
             set {ENV} to its libnccl.so.2 (or put its folder on LD_LIBRARY_PATH); {ENV}=none \
             sums through host memory with MPI instead"
        );
        let c_path = CString::new(path).map_err(|_| format!("{ENV}={path:?} holds a NUL byte"))?;
        // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to its signature in
        // nccl.h, and the library stays loaded for the rest of the process.
        unsafe {
            let lib = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if lib.is_null() {
                let why = libc::dlerror();
                let why = match why.is_null() {
                    true => format!("{path} does not load"),
                    false => CStr::from_ptr(why).to_string_lossy().into_owned(),
                };
                return Err(format!("NCCL could not be loaded ({why}): {install}"));
            }
            let symbol = |name: &CStr| -> std::result::Result<*mut c_void, String> {
                let p = libc::dlsym(lib, name.as_ptr());
                match p.is_null() {
                    true => Err(format!(
                        "{path} has no {}: it is not NCCL 2.13 or later; {install}",
                        name.to_string_lossy()
                    )),
                    false => Ok(p),
                }
            };
            Ok(Library {
                path: path.to_string(),
                get_version: std::mem::transmute::<*mut c_void, GetVersion>(symbol(
                    c"ncclGetVersion",
                )?),
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(symbol(
                    c"ncclGetUniqueId",
                )?),
                get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(symbol(
                    c"ncclGetErrorString",
                )?),
                get_last_error: std::mem::transmute::<*mut c_void, GetLastError>(symbol(
                    c"ncclGetLastError",
                )?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRank>(symbol(
                    c"ncclCommInitRank",
                )?),
                comm_destroy: std::mem::transmute::<*mut c_void, CommDestroy>(symbol(
                    c"ncclCommDestroy",
                )?),
                all_reduce: std::mem::transmute::<*mut c_void, AllReduceFn>(symbol(
                    c"ncclAllReduce",
                )?),
            })
        }
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Its version, e.g. `2.21.5`.
    pub fn version(&self) -> Result<String> {
        let mut code = 0;
        // SAFETY: ncclGetVersion writes one int.
        self.check(
            unsafe { (self.get_version)(&mut code) },
            "ncclGetVersion",
            None,
        )?;
        // NCCL 2.9 on encodes major·10000 + minor·100 + patch.
        Ok(format!(
            "{}.{}.{}",
            code / 10000,
            code % 10000 / 100,
            code % 100
        ))
    }

    /// A fresh unique id, for rank 0 to send to the others.
    pub fn unique_id(&self) -> Result<Vec<u8>> {
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId fills the 128-byte struct.
        self.check(
            unsafe { (self.get_unique_id)(&mut id) },
            "ncclGetUniqueId",
            None,
        )?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// `Ok` for `ncclSuccess`, else an error naming the call, NCCL's name for the failure and its
    /// last message (about the communicator `comm`, or the library's last one).
    fn check(&self, status: Status, call: &str, comm: Option<RawComm>) -> Result<()> {
        if status == SUCCESS {
            return Ok(());
        }
        // SAFETY: both return static, NUL-terminated strings (or null).
        let text = |p: *const c_char| match p.is_null() {
            true => String::new(),
            false => unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned(),
        };
        let what = text(unsafe { (self.get_error_string)(status) });
        let last = text(unsafe { (self.get_last_error)(comm.unwrap_or(std::ptr::null_mut())) });
        match last.is_empty() {
            true => bail!("NCCL {call} failed: {what}"),
            false => bail!("NCCL {call} failed: {what}: {last}"),
        }
    }
}

/// One rank's member of a communicator on one GPU.
#[cfg(feature = "cuda")]
pub struct Comm {
    raw: RawComm,
    lib: &'static Library,
    device: candle_core::CudaDevice,
    size: usize,
}

#[cfg(feature = "cuda")]
impl Comm {
    /// Joins the communicator of `size` ranks that `id` (rank 0's [`Library::unique_id`]) names,
    /// as `rank`, on `device`. Every rank must call it: it returns once all have joined.
    pub fn join(
        device: &candle_core::CudaDevice,
        id: &[u8],
        size: usize,
        rank: usize,
    ) -> Result<Comm> {
        let lib = library()?;
        // Non-blocking communicators launch from NCCL's own thread, where the per-thread default
        // stream candle runs on is another stream: the sum would race the backward.
        anyhow::ensure!(
            std::env::var("NCCL_COMM_BLOCKING").map_or(true, |v| v != "0"),
            "NCCL_COMM_BLOCKING=0 is not supported: kiln queues NCCL on candle's per-thread \
             stream, which needs blocking communicators; unset it"
        );
        anyhow::ensure!(
            id.len() == UNIQUE_ID_BYTES,
            "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {}",
            id.len()
        );
        let mut unique = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (to, &from) in unique.internal.iter_mut().zip(id) {
            *to = from as c_char;
        }
        // NCCL takes the calling thread's current device.
        device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("cannot make the GPU current for NCCL: {e}"))?;
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank writes the new communicator into `raw`.
        let status =
            unsafe { (lib.comm_init_rank)(&mut raw, size as c_int, unique, rank as c_int) };
        lib.check(status, "ncclCommInitRank", None).map_err(|e| {
            e.context(format!(
                "rank {rank} of {size} could not join the NCCL communicator on {}; each rank needs \
                 a GPU of its own (ranks on one machine take the GPU of their local rank)",
                kiln_core::device::device_name(&candle_core::Device::Cuda(device.clone()))
            ))
        })?;
        Ok(Comm {
            raw,
            lib,
            device: device.clone(),
            size,
        })
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The element-wise sum over the ranks of `t` (f32, on this communicator's GPU), queued on
    /// the device's stream behind the kernels that computed `t`.
    pub fn sum(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        anyhow::ensure!(
            t.dtype() == candle_core::DType::F32,
            "the NCCL sum takes f32 tensors, not {:?}",
            t.dtype()
        );
        Ok(t.apply_op1_no_bwd(&AllReduce { comm: self })?)
    }
}

#[cfg(feature = "cuda")]
impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ncclCommInitRank and is destroyed once; errors at teardown are
        // not actionable.
        unsafe { (self.lib.comm_destroy)(self.raw) };
    }
}

/// The sum over the ranks as a candle op: CUDA only, no gradient (it runs after the backward).
#[cfg(feature = "cuda")]
struct AllReduce<'a> {
    comm: &'a Comm,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("the NCCL all-reduce takes tensors on the GPU")
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let comm = self.comm;
        let dev = &storage.device;
        if dev.id() != comm.device.id() {
            candle_core::bail!(
                "the NCCL all-reduce got a tensor on another GPU than its communicator's"
            );
        }
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("the NCCL all-reduce takes contiguous tensors".into())
        })?;
        let n = end - start;
        let input = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: ncclAllReduce writes all n elements before anything reads them.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
        let stream = dev.cuda_stream();
        {
            let (send, _s) = input.device_ptr(&stream);
            let (recv, _r) = out.device_ptr_mut(&stream);
            // SAFETY: both buffers hold n f32 on this communicator's GPU; the call is queued on
            // the stream that produced the input and that every later op runs on.
            let status = unsafe {
                (comm.lib.all_reduce)(
                    send as *const c_void,
                    recv as *mut c_void,
                    n,
                    FLOAT32,
                    SUM,
                    comm.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            comm.lib
                .check(status, "ncclAllReduce", Some(comm.raw))
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            layout.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_error_saying_how_to_install_it() {
        let e = Library::open("/nonexistent/libnccl.so.2").err().unwrap();
        assert!(e.contains("NCCL could not be loaded"), "{e}");
        assert!(e.contains("/nonexistent/libnccl.so.2"), "{e}");
        assert!(
            e.contains("pip install nvidia-nccl-cu13") && e.contains(ENV),
            "{e}"
        );
        // A library that is not NCCL: its first missing entry point is named.
        let e = Library::open("libc.so.6").err().unwrap();
        assert!(e.contains("has no ncclGetVersion"), "{e}");
    }

    /// The bindings against a real NCCL, where one is installed (CI installs the
    /// `nvidia-nccl-cu13` wheel and sets `KILN_NCCL`): the calls that need no GPU.
    #[test]
    fn the_bindings_call_nccl() {
        let named = std::env::var(ENV).ok();
        let lib = match Library::open(named.as_deref().unwrap_or(DEFAULT)) {
            Ok(lib) => lib,
            // Set, it must load.
            Err(e) if named.is_some() => panic!("{e}"),
            Err(e) => {
                println!("skipping: {e}");
                return;
            }
        };
        let version = lib.version().unwrap();
        let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(
            parts.len() == 3 && parts[0] == 2 && parts[1] >= 13,
            "{version}"
        );
        let (a, b) = (lib.unique_id().unwrap(), lib.unique_id().unwrap());
        assert_eq!(a.len(), UNIQUE_ID_BYTES);
        assert_ne!(a, b, "two unique ids are the same");
        // NCCL's own names for failures reach the error.
        let e = lib.check(1, "ncclTest", None).unwrap_err().to_string();
        assert!(
            e.starts_with("NCCL ncclTest failed: unhandled cuda error"),
            "{e}"
        );
        assert!(lib.check(SUCCESS, "ncclTest", None).is_ok());
    }

    /// One rank on the GPU: the communicator forms and its sum is the input. (Two ranks need
    /// two GPUs: NCCL refuses two ranks on one.)
    #[cfg(feature = "cuda")]
    #[test]
    fn one_rank_sums_on_the_gpu() {
        let Ok(device) = candle_core::Device::new_cuda(0) else {
            println!("skipping: no GPU");
            return;
        };
        let candle_core::Device::Cuda(gpu) = &device else {
            unreachable!()
        };
        let lib = match library() {
            Ok(lib) => lib,
            // Named, it must load.
            Err(e) if std::env::var(ENV).is_ok() => panic!("{e:#}"),
            Err(e) => {
                println!("skipping: {e}");
                return;
            }
        };
        let comm = Comm::join(gpu, &lib.unique_id().unwrap(), 1, 0).unwrap();
        let x = candle_core::Tensor::arange(0f32, 1000.0, &device)
            .unwrap()
            .narrow(0, 10, 900)
            .unwrap();
        let s = comm.sum(&x).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), x.to_vec1::<f32>().unwrap());
        let e = comm
            .sum(&x.to_dtype(candle_core::DType::BF16).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("f32"), "{e}");
    }
}
