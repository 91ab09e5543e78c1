//! `KILN_BLAS=openblas`: the CPU's products on OpenBLAS train what the built-in gemm trains (to
//! rounding), byte for byte the same on every run, and a bad choice is refused by name.
//!
//! Needs Debian's `libopenblas0-pthread` (the tests skip without it, or fail under CI).

mod common;

use common::*;
use std::path::Path;

fn openblas_installed() -> bool {
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .any(|d| Path::new(d).join("libopenblas.so.0").exists());
    if !found {
        assert!(
            std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
            "libopenblas.so.0 is missing: apt-get install libopenblas0-pthread"
        );
        println!("skipping: no libopenblas.so.0 (apt-get install libopenblas0-pthread)");
    }
    found
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/step-20/model.safetensors")).unwrap()
}

#[test]
fn openblas_trains_what_gemm_trains_and_repeats_itself() {
    if !openblas_installed() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let args = [
        "--set",
        "trainer.max_steps=20",
        "--set",
        "trainer.checkpoint_every=20",
    ];
    let train = |name: &str, blas: Option<&str>| {
        let mut c = kiln_train(&recipe, &d.join(name));
        c.args(args).current_dir(d).env_remove("KILN_BLAS");
        if let Some(b) = blas {
            c.env("KILN_BLAS", b);
        }
        c.output().unwrap()
    };
    ok(&train("gemm", None));
    ok(&train("blas", Some("openblas")));
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    bench
        .args([
            "bench",
            recipe.to_str().unwrap(),
            "--steps",
            "2",
            "--warmup",
            "1",
        ])
        .env("KILN_BLAS", "openblas")
        .current_dir(d);
    let o = bench.output().unwrap();
    ok(&o);
    assert!(
        stderr(&o).contains("CPU matmul: OpenBLAS"),
        "{}",
        stderr(&o)
    );
    ok(&train("again", Some("openblas")));
    assert!(
        weights(&d.join("blas")) == weights(&d.join("again")),
        "two OpenBLAS runs differ"
    );
    let (a, b) = (train_losses(&d.join("gemm")), train_losses(&d.join("blas")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        println!("train/loss gemm {x:.6} openblas {y:.6}");
        assert!((x - y).abs() <= 1e-3 * x.abs(), "{x} vs {y}");
    }

    let o = train("bad", Some("mkl"));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("KILN_BLAS=mkl") && err.contains("openblas"),
        "{err}"
    );
}
