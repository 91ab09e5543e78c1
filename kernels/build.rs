//! Under the `cuda` feature, compiles every `cuda/*.cu` to PTX (loaded at run time through
//! candle's CUDA device) and writes `ptx.rs` with one `&str` constant per file.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("cuda")
            .watch(["cuda/common.cuh", "cuda/philox.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--expt-relaxed-constexpr")
            .build_ptx()
            .expect("compiling kernels/cuda/*.cu with nvcc (see ../shared/cuda/README.md)");
        ptx.write(out.join("ptx.rs")).expect("writing ptx.rs");
    }
}
