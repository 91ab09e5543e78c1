//! Data-parallel training under `mpirun -np 2`: the job trains what one process trains (weights
//! within 1e-6 relative), resumes with another number of ranks, ends when a rank is killed, and a
//! kiln built without the `distributed` feature refuses to run as N copies.
//!
//! Needs OpenMPI's `mpirun` (apt-get install openmpi-bin libopenmpi-dev libclang-dev); the
//! data-parallel tests need `cargo test --features distributed`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
#[cfg(feature = "distributed")]
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

/// `mpirun` when it is installed; otherwise says why the test skips (or fails under CI).
fn mpirun() -> Option<&'static str> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("mpirun");
    }
    assert!(
        std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
        "mpirun is missing: apt-get install openmpi-bin libopenmpi-dev"
    );
    println!("skipping: no mpirun on this machine (apt-get install openmpi-bin libopenmpi-dev)");
    None
}

/// `mpirun -np N kiln ARGS…`, run in `dir`.
fn mpi_kiln(np: usize, args: &[&str], dir: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir);
    c
}

/// `mpirun -np N kiln train RECIPE --quiet --run-dir RUN ARGS…` as a command to run.
fn mpi_train(np: usize, recipe: &Path, run: &Path, extra: &[&str]) -> Command {
    let head = ["train", recipe.to_str().unwrap(), "--quiet", "--run-dir"];
    let args = [&head[..], &[run.to_str().unwrap()], extra].concat();
    mpi_kiln(np, &args, recipe.parent().unwrap())
}

/// A short, gentle schedule for the tiny GPT: rounding differences (2 ranks sum a batch's
/// gradient in another order than 1 process) stay at rounding level. At the fixture's lr 3e-3
/// they grow ~10× every 10 steps after step 20, in one process too (the same batch as 2
/// accumulated micro-batches drifts as far): chaos, not a fault.
#[cfg(feature = "distributed")]
const GENTLE: [&str; 12] = [
    "--set",
    "optim.lr=5e-4",
    "--set",
    "trainer.max_steps=20",
    "--set",
    "trainer.checkpoint_every=10",
    "--set",
    "trainer.eval_every=10",
    "--set",
    "trainer.log_every=5",
    "--set",
    "trainer.keep_last=5",
];

/// `mpirun -np N kiln train --resume RUN --quiet --set trainer.max_steps=STEPS`, run in `dir`.
#[cfg(feature = "distributed")]
fn mpi_resume(np: usize, run: &Path, steps: usize, dir: &Path) -> Command {
    let steps = format!("trainer.max_steps={steps}");
    let args = [
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        &steps,
    ];
    mpi_kiln(np, &args, dir)
}

fn run(mut c: Command) -> Output {
    c.output().expect("mpirun runs")
}

#[cfg(not(feature = "distributed"))]
#[test]
fn a_kiln_without_mpi_refuses_to_run_as_copies() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let o = run(mpi_train(2, &recipe, &dir.path().join("run"), &[]));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("built without MPI"), "{err}");
    assert!(err.contains("--features distributed"), "{err}");
    assert!(
        !dir.path().join("run/checkpoints").exists(),
        "nothing was trained"
    );
}

/// How far two checkpoints' weights are apart: `‖a − b‖ / ‖a‖` over all the model's weights
/// together, and the largest per-tensor value with its tensor (biases start at 0, so theirs is
/// the noisiest).
#[cfg(feature = "distributed")]
fn difference(a: &Path, b: &Path) -> (f64, f64, String) {
    use candle_core::{DType, Device, Tensor};
    let load = |p: &Path| {
        kiln::core::checkpoint::load_tensors(
            &p.join(kiln::core::checkpoint::MODEL_FILE),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    let sq = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (mut diff, mut norm) = (0.0, 0.0);
    let mut worst = (0.0, String::new());
    for (name, x) in &a {
        let d = sq(&(x - &b[name]).unwrap());
        let n = sq(x);
        (diff, norm) = (diff + d, norm + n);
        let rel = (d / n.max(1e-30)).sqrt();
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    ((diff / norm).sqrt(), worst.0, worst.1)
}

#[cfg(feature = "distributed")]
fn assert_same_training(single: &Path, job: &Path, step: usize, what: &str) {
    let ck = |r: &Path| r.join(format!("checkpoints/step-{step}"));
    let (diff, worst, name) = difference(&ck(single), &ck(job));
    println!(
        "{what}: 2 ranks vs 1 process at step {step}: ‖a−b‖/‖a‖ {diff:.2e} over all weights, \
         largest per tensor {worst:.2e} ({name})"
    );
    assert!(diff <= 1e-6, "{what}: the weights differ by {diff:e}");
    // The loss curves agree too (rank 0's metrics are the job's).
    let losses = |r: &Path| train_losses(r);
    for (x, y) in losses(single).iter().zip(losses(job)) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: loss {x} vs {y}");
    }
    assert_eq!(losses(single).len(), losses(job).len());
}

#[cfg(feature = "distributed")]
#[test]
fn two_ranks_train_what_one_process_trains() {
    if mpirun().is_none() {
        return;
    }
    // A language model (the global batch of 8 split 4 + 4) and a classifier (16 → 8 + 8, whose
    // evaluation is sharded and its confusion matrix summed).
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    ok(&train_in(&recipe, &d.join("single"), &GENTLE, d));
    let o = run(mpi_train(2, &recipe, &d.join("job"), &GENTLE));
    let out = ok(&o);
    assert!(out.contains("× 2 processes (MPI)"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("rank 0/2: data sha256") && err.contains("rank 1/2: data sha256"),
        "{err}"
    );
    assert_same_training(&d.join("single"), &d.join("job"), 20, "tiny GPT");
    // Rank 0 alone wrote the run: one line per log step, one summary.
    let steps: Vec<u64> = metrics(&d.join("job"))
        .iter()
        .filter(|m| m["train/loss"].is_number())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 10, 15, 20]);
    let (a, b) = (summary(&d.join("single")), summary(&d.join("job")));
    let (ea, eb) = (
        a["final"]["eval/loss"].as_f64().unwrap(),
        b["final"]["eval/loss"].as_f64().unwrap(),
    );
    assert!((ea - eb).abs() < 1e-5 * ea, "eval/loss {ea} vs {eb}");

    let (dir, recipe) = mlp_fixture("max_steps = 40\neval_every = 20\ncheckpoint_every = 20");
    let d = dir.path();
    ok(&train_in(&recipe, &d.join("single"), &[], d));
    ok(&run(mpi_train(2, &recipe, &d.join("job"), &[])));
    assert_same_training(&d.join("single"), &d.join("job"), 40, "MLP");
    let (a, b) = (summary(&d.join("single")), summary(&d.join("job")));
    assert_eq!(
        a["final"]["eval/accuracy"], b["final"]["eval/accuracy"],
        "the sharded evaluation counts every example once"
    );
    let cm = |r: &Path| read_json(&r.join("confusion.json"));
    assert_eq!(cm(&d.join("single")), cm(&d.join("job")));
}

#[cfg(feature = "distributed")]
#[test]
fn a_job_resumes_with_another_number_of_ranks() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let mut first_half = GENTLE.to_vec();
    first_half.extend(["--set", "trainer.max_steps=10"]);
    let resume_alone = |run: &Path| {
        ok(&kiln(
            &[
                "train",
                "--resume",
                run.to_str().unwrap(),
                "--quiet",
                "--set",
                "trainer.max_steps=20",
            ],
            d,
        ))
    };
    // The reference: one process to step 10, resumed alone to 20.
    let alone = d.join("alone");
    ok(&train_in(&recipe, &alone, &first_half, d));
    resume_alone(&alone);
    // Two ranks to step 10, then one process.
    let job = d.join("job");
    ok(&run(mpi_train(2, &recipe, &job, &first_half)));
    resume_alone(&job);
    assert_same_training(&alone, &job, 20, "2 ranks, then 1 process");
    // One process to step 10, then two ranks.
    let half = d.join("half");
    ok(&train_in(&recipe, &half, &first_half, d));
    let resume = mpi_resume(2, &half, 20, d);
    ok(&run(resume));
    assert_same_training(&alone, &half, 20, "1 process, then 2 ranks");
}

#[cfg(feature = "distributed")]
#[test]
fn a_killed_rank_ends_the_job_and_resume_continues() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let run_dir = d.join("job");
    let mut job = mpi_train(
        2,
        &recipe,
        &run_dir,
        &[
            "--set",
            "trainer.max_steps=100000",
            "--set",
            "trainer.checkpoint_every=20",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !run_dir.join("checkpoints/latest").exists() && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rank 0's pid is in the run's lock; kill the other rank, as an OOM killer would.
    let rank0: u32 = std::fs::read_to_string(run_dir.join(".lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let children = Command::new("pgrep")
        .args(["-P", &job.id().to_string()])
        .output()
        .unwrap();
    let other: u32 = String::from_utf8_lossy(&children.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|&p| p != rank0)
        .expect("mpirun's other rank");
    Command::new("kill")
        .args(["-KILL", &other.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    println!(
        "the job ended {:.1} s after rank 1 was killed",
        killed.elapsed().as_secs_f64()
    );
    // The run is intact: resumed alone, 20 steps past its newest checkpoint.
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    let o = kiln(
        &[
            "train",
            "--resume",
            run_dir.to_str().unwrap(),
            "--quiet",
            "--set",
            &format!("trainer.max_steps={}", step + 20),
        ],
        d,
    );
    ok(&o);
    assert!(run_dir.join("summary.json").is_file());
}

#[cfg(feature = "distributed")]
#[test]
fn two_ranks_fine_tune_minilm_as_one_process_does() {
    if mpirun().is_none() {
        return;
    }
    let Some((folder, b77)) = minilm_and_banking77() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every 40th row of BANKING77 (~250 examples); dropout off, so both runs draw nothing.
    banking77_slice(&b77, d, 40);
    let recipe = minilm_recipe(
        d,
        &folder,
        "ft",
        "hidden_dropout_prob = 0.0\nattention_probs_dropout_prob = 0.0",
        "val_size = 32",
        "lr = 1e-4\n[trainer]\nmax_steps = 8\nlog_every = 2",
    );
    ok(&train_in(&recipe, &d.join("single"), &[], d));
    ok(&run(mpi_train(2, &recipe, &d.join("job"), &[])));
    assert_same_training(&d.join("single"), &d.join("job"), 8, "MiniLM on BANKING77");
}

/// BatchNorm normalizes with each rank's own slice of the batch, so its running statistics move
/// apart; after every step they are averaged over the ranks. Every rank then holds the model rank
/// 0 saves: the job's sharded final evaluation equals one process evaluating its checkpoint.
#[cfg(feature = "distributed")]
#[test]
fn batch_norm_statistics_agree_across_ranks() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = mlp_fixture("max_steps = 30\neval_every = 0\ncheckpoint_every = 30");
    let d = dir.path();
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "kind = \"mlp\"\nhidden = [32]",
        "kind = \"resnet\"\nstem = \"small\"\nembedding_size = 4\nhidden_sizes = [4, 8]\n\
         depths = [1, 1]\nlayer_type = \"basic\"",
    );
    assert!(text.contains("resnet"));
    std::fs::write(&recipe, text).unwrap();
    let job = d.join("job");
    ok(&run(mpi_train(2, &recipe, &job, &[])));

    let weights = kiln::core::checkpoint::load_tensors(
        &job.join("checkpoints/step-30")
            .join(kiln::core::checkpoint::MODEL_FILE),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mean = &weights["resnet.embedder.embedder.normalization.running_mean"];
    let moved = mean.to_vec1::<f32>().unwrap().iter().any(|v| *v != 0.0);
    assert!(moved, "the running mean was updated");

    let single: serde_json::Value = serde_json::from_str(&ok(&kiln(
        &["eval", job.to_str().unwrap(), "--device", "cpu"],
        d,
    )))
    .unwrap();
    let sharded = summary(&job)["final"].clone();
    for key in ["eval/loss", "eval/accuracy"] {
        let (a, b) = (
            single[key].as_f64().unwrap(),
            sharded[key].as_f64().unwrap(),
        );
        println!("{key}: 1 process on the checkpoint {a}, 2 ranks' sharded evaluation {b}");
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "{key}: {a} vs {b}"
        );
    }
}

/// With dropout, each rank draws masks from its own stream, and ranks with fewer rows (8 rows
/// over 3 ranks: 3 + 3 + 2) draw fewer words: a checkpoint keeps every rank's position, so a job
/// stopped and resumed with as many ranks ends byte for byte where the uninterrupted job does.
#[cfg(feature = "distributed")]
#[test]
fn a_resumed_job_continues_every_ranks_dropout_stream() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("n_embd = 32", "n_embd = 32\ndropout = 0.1");
    std::fs::write(&recipe, text).unwrap();
    // A constant learning rate: the first half's schedule must not depend on max_steps.
    let mut full = GENTLE.to_vec();
    full.extend(["--set", "schedule.name=constant"]);
    let mut first_half = full.clone();
    first_half.extend(["--set", "trainer.max_steps=10"]);
    ok(&run(mpi_train(3, &recipe, &d.join("full"), &full)));
    let job = d.join("job");
    ok(&run(mpi_train(3, &recipe, &job, &first_half)));
    let state = read_json(&job.join("checkpoints/step-10/trainer_state.json"));
    let others = state["dropout_rng_other_ranks"].as_array().unwrap();
    assert_eq!(others.len(), 2, "{state}");
    assert_ne!(
        others[1], state["dropout_rng_position"],
        "the rank with fewer rows drew fewer words"
    );
    let resume = mpi_resume(3, &job, 20, d);
    ok(&run(resume));
    let weights =
        |r: &Path| std::fs::read(r.join("checkpoints/step-20/model.safetensors")).unwrap();
    assert!(
        weights(&job) == weights(&d.join("full")),
        "the resumed job's weights differ from the uninterrupted job's"
    );
}

/// The bytes of checkpoint file `file` at `step` of `run`.
#[cfg(feature = "distributed")]
fn checkpoint_bytes(run: &Path, step: usize, file: &str) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step}/{file}"))).unwrap()
}

#[cfg(feature = "distributed")]
#[test]
fn zero_1_shards_the_optimizer_state_and_trains_what_ddp_trains() {
    if mpirun().is_none() {
        return;
    }
    let (dir, recipe) = tiny_gpt_fixture("");
    let d = dir.path();
    let zero = ["--set", "trainer.zero_stage=1"];
    ok(&run(mpi_train(2, &recipe, &d.join("ddp"), &GENTLE)));
    let o = run(mpi_train(
        2,
        &recipe,
        &d.join("zero"),
        &[&GENTLE[..], &zero].concat(),
    ));
    ok(&o);
    // Each rank holds part of the state, and the parts cover every parameter once.
    let err = stderr(&o);
    // "rank r/2: ZeRO-1, optimizer state of K of P parameters (E of N elements)"
    let held: Vec<[usize; 4]> = (0..2)
        .map(|r| {
            let line = err
                .lines()
                .find(|l| l.starts_with(&format!("rank {r}/2: ZeRO-1")))
                .unwrap_or_else(|| panic!("no ZeRO-1 line for rank {r}: {err}"));
            let numbers: Vec<usize> = line["rank r/2: ZeRO-1".len()..]
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            numbers
                .try_into()
                .unwrap_or_else(|n| panic!("{line}: {n:?}"))
        })
        .collect();
    let [_, params, _, elements] = held[0];
    assert!(
        held.iter()
            .all(|h| h[0] > 0 && h[1] == params && h[3] == elements),
        "{err}"
    );
    assert_eq!(held.iter().map(|h| h[0]).sum::<usize>(), params, "{err}");
    assert_eq!(held.iter().map(|h| h[2]).sum::<usize>(), elements, "{err}");
    // The same sums, clip and AdamW arithmetic, only shared out: the same bytes as DDP, weights
    // and the gathered optimizer state alike.
    for step in [10, 20] {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                checkpoint_bytes(&d.join("ddp"), step, file)
                    == checkpoint_bytes(&d.join("zero"), step, file),
                "step {step}: {file} differs between DDP and ZeRO-1"
            );
        }
    }
    // A ZeRO-1 checkpoint holds the whole state, so a job resumes from it on another number of
    // ranks (a new partition): jobs stopped at step 10 and resumed on 3 ranks, with and without
    // sharding, end with the same bytes.
    let half = |name: &str, extra: &[&'static str]| {
        let run_dir = d.join(name);
        let args = [&GENTLE[..], &["--set", "trainer.max_steps=10"], extra].concat();
        ok(&run(mpi_train(2, &recipe, &run_dir, &args)));
        let resume = mpi_resume(3, &run_dir, 20, d);
        let o = run(resume);
        ok(&o);
        (run_dir, stderr(&o))
    };
    let (ddp, _) = half("ddp-half", &[]);
    let (sharded, err) = half("zero-half", &zero);
    assert!(err.contains("rank 2/3: ZeRO-1"), "{err}");
    for step in [10, 20] {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                checkpoint_bytes(&ddp, step, file) == checkpoint_bytes(&sharded, step, file),
                "resumed on 3 ranks, step {step}: {file} differs between DDP and ZeRO-1"
            );
        }
    }
}
