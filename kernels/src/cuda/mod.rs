//! Launch code for the kernels in `kernels/cuda/*.cu`: one module per op, each entry point
//! taking the same arguments as its CPU twin (see README.md).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
pub mod layer_norm;
pub mod rms_norm;
pub mod softmax;

/// One `&str` of PTX per `cuda/<op>.cu`, e.g. `ptx::LAYER_NORM`.
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}
