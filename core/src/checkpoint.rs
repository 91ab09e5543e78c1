//! Checkpoint io: `checkpoints/step-<N>/` holds `model.safetensors`, `optimizer.safetensors` and
//! `trainer_state.json`. A checkpoint is written into a temporary folder and renamed into place,
//! then `checkpoints/latest` is rewritten the same way, so a crash leaves the previous
//! checkpoint whole.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
const LATEST: &str = "latest";

/// Folder name of the checkpoint at `step`.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step}")
}

/// Writes a checkpoint folder atomically: `fill` writes files into a temporary folder, which is
/// then renamed to `checkpoints/step-<step>` and recorded as `latest`.
pub fn write_checkpoint(
    checkpoints: &Path,
    step: usize,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(checkpoints)?;
    let name = step_dir_name(step);
    let tmp = checkpoints.join(format!(".{name}.tmp"));
    let dst = checkpoints.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    for entry in std::fs::read_dir(&tmp)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst)?;
    write_atomic(&checkpoints.join(LATEST), name.as_bytes())?;
    Ok(dst)
}

/// Replaces `path` with `bytes` via a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

/// The checkpoint folder named by `checkpoints/latest`.
pub fn latest(checkpoints: &Path) -> anyhow::Result<PathBuf> {
    let p = checkpoints.join(LATEST);
    let name = std::fs::read_to_string(&p).map_err(|e| {
        anyhow::anyhow!(
            "no checkpoint found: cannot read {} ({e}); was the run trained to its first checkpoint?",
            p.display()
        )
    })?;
    let dir = checkpoints.join(name.trim());
    anyhow::ensure!(
        dir.is_dir(),
        "{} names {}, which does not exist",
        p.display(),
        dir.display()
    );
    Ok(dir)
}

/// Saves named tensors as safetensors.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Loads safetensors, naming the file when it is missing or corrupt.
pub fn load_tensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| {
        anyhow::anyhow!(
            "cannot load {}: {e}; the file is missing or corrupt — pick another checkpoint",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_points_latest() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        for step in [10, 20] {
            write_checkpoint(&ck, step, |d| {
                save_tensors(
                    &d.join(MODEL_FILE),
                    &HashMap::from([("w".to_string(), t.clone())]),
                )
            })
            .unwrap();
        }
        let l = latest(&ck).unwrap();
        assert!(l.ends_with("step-20"));
        let back = load_tensors(&l.join(MODEL_FILE), &Device::Cpu).unwrap();
        assert_eq!(back["w"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
        // A failing writer leaves the previous checkpoint and `latest` untouched.
        let err = write_checkpoint(&ck, 30, |_| anyhow::bail!("disk full"));
        assert!(err.is_err());
        assert!(latest(&ck).unwrap().ends_with("step-20"));
        assert!(!ck.join("step-30").exists());
    }

    #[test]
    fn corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MODEL_FILE);
        std::fs::write(&p, b"garbage").unwrap();
        let err = load_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("corrupt"),
            "{err}"
        );
    }
}
