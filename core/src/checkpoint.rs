//! Checkpoint io: `checkpoints/step-<N>/` holds `model.safetensors`, `optimizer.safetensors` and
//! `trainer_state.json`. A checkpoint is written into a temporary folder and renamed into place,
//! then `checkpoints/latest` is rewritten the same way, so a crash leaves the previous
//! checkpoint whole.

use crate::fs::{at, sha256_file, write_atomic};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const LATEST: &str = "latest";
const BEST: &str = "best";

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
    std::fs::create_dir_all(checkpoints).map_err(at(checkpoints))?;
    let name = step_dir_name(step);
    let tmp = checkpoints.join(format!(".{name}.tmp"));
    let dst = checkpoints.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(at(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(at(&tmp))?;
    fill(&tmp)?;
    write_manifest(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(at(&tmp))? {
        let p = entry.map_err(at(&tmp))?.path();
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(at(&p))?;
    }
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(at(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(at(&dst))?;
    write_atomic(&checkpoints.join(LATEST), name.as_bytes())?;
    Ok(dst)
}

/// Records the sha256 of every file in `dir` in `dir/manifest.json`.
fn write_manifest(dir: &Path) -> anyhow::Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        if name != MANIFEST_FILE {
            files.insert(name, sha256_file(&p)?);
        }
    }
    let json = serde_json::json!({ "sha256": files });
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> anyhow::Result<()> {
    let p = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&p)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", p.display()))?;
    let files = manifest["sha256"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("{} lists no files", p.display()))?;
    for (name, want) in files {
        let f = dir.join(name);
        let got = sha256_file(&f)
            .map_err(|e| anyhow::anyhow!("{} is missing or unreadable: {e}", f.display()))?;
        anyhow::ensure!(
            want.as_str() == Some(got.as_str()),
            "{} is damaged: its sha256 does not match {}",
            f.display(),
            p.display()
        );
    }
    Ok(())
}

/// The newest checkpoint that passes [`verify`]: `latest` first, then older `step-N` folders.
/// Returns it with a warning for each damaged one skipped.
pub fn newest_valid(checkpoints: &Path) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let mut candidates = step_dirs(checkpoints)
        .map_err(|e| anyhow::anyhow!("no checkpoints in {}: {e}", checkpoints.display()))?;
    if let Ok(l) = latest(checkpoints) {
        candidates.retain(|(_, p)| p != &l);
        candidates.insert(0, (0, l));
    }
    let mut warnings = Vec::new();
    for (_, dir) in candidates {
        match verify(&dir) {
            Ok(()) => return Ok((dir, warnings)),
            Err(e) => warnings.push(format!("skipping checkpoint {}: {e:#}", dir.display())),
        }
    }
    anyhow::bail!(
        "no intact checkpoint in {}{}",
        checkpoints.display(),
        warnings
            .iter()
            .map(|w| format!("\n  {w}"))
            .collect::<String>()
    )
}

/// Whether `checkpoints` holds any `step-N` folder, intact or not.
pub fn any(checkpoints: &Path) -> bool {
    step_dirs(checkpoints).is_ok_and(|dirs| !dirs.is_empty())
}

/// The `step-N` folders with their steps, newest first, intact or not (temporary `.step-N.tmp`
/// folders are not among them).
pub fn step_dirs(checkpoints: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints)
        .map_err(at(checkpoints))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(steps)
}

/// Records the checkpoint at `step` as the best one (`checkpoints/best`).
pub fn mark_best(checkpoints: &Path, step: usize) -> std::io::Result<()> {
    write_atomic(&checkpoints.join(BEST), step_dir_name(step).as_bytes())
}

/// Deletes all but the `keep_last` newest checkpoints (0 = keep all), never one that `latest` or
/// `best` names. Returns the folders removed.
pub fn prune(checkpoints: &Path, keep_last: usize) -> anyhow::Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let named: Vec<String> = [LATEST, BEST]
        .iter()
        .filter_map(|f| std::fs::read_to_string(checkpoints.join(f)).ok())
        .map(|s| s.trim().to_string())
        .collect();
    let mut removed = Vec::new();
    for (step, dir) in step_dirs(checkpoints)?.into_iter().skip(keep_last) {
        if !named.contains(&step_dir_name(step)) {
            std::fs::remove_dir_all(&dir).map_err(at(&dir))?;
            removed.push(dir);
        }
    }
    Ok(removed)
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
    named_dir(checkpoints, &p, &name)
}

/// The checkpoint folder `name` that the pointer file `p` (`latest`, `best`) holds: a `step-N`
/// folder of `checkpoints`, never a path elsewhere.
fn named_dir(checkpoints: &Path, p: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let name = name.trim();
    anyhow::ensure!(
        name.strip_prefix("step-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        "{} names '{name}', which is not a checkpoint folder (step-N) of {}",
        p.display(),
        checkpoints.display()
    );
    let dir = checkpoints.join(name);
    anyhow::ensure!(
        dir.is_dir(),
        "{} names {}, which does not exist",
        p.display(),
        dir.display()
    );
    Ok(dir)
}

/// The checkpoint a user names: `latest`, `best` (kept by `trainer.keep_best`) or `step-N`,
/// after checking its files against its sha256 manifest (eval, generate, predict and export
/// read nothing damaged).
pub fn by_name(checkpoints: &Path, which: &str) -> anyhow::Result<PathBuf> {
    let dir = find(checkpoints, which)?;
    verify(&dir).map_err(|e| {
        anyhow::anyhow!(
            "checkpoint {} failed its integrity check: {e:#}; name an intact one with \
             --checkpoint (available: latest, {})",
            dir.display(),
            available(checkpoints)
        )
    })?;
    Ok(dir)
}

/// The `step-N` folders by name, newest first, comma-separated.
fn available(checkpoints: &Path) -> String {
    let names: Vec<String> = step_dirs(checkpoints)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, d)| Some(d.file_name()?.to_string_lossy().into_owned()))
        .collect();
    names.join(", ")
}

/// The folder [`by_name`] names, unverified.
fn find(checkpoints: &Path, which: &str) -> anyhow::Result<PathBuf> {
    let available = || available(checkpoints);
    match which {
        "latest" => latest(checkpoints),
        "best" => {
            let p = checkpoints.join(BEST);
            let name = std::fs::read_to_string(&p).map_err(|_| {
                anyhow::anyhow!(
                    "this run kept no best checkpoint (set trainer.keep_best = true when \
                     training); available: latest, {}",
                    available()
                )
            })?;
            named_dir(checkpoints, &p, &name)
        }
        step if step.starts_with("step-") && step[5..].parse::<usize>().is_ok() => {
            let dir = checkpoints.join(step);
            anyhow::ensure!(
                dir.is_dir(),
                "there is no checkpoint {step}; available: latest, {}",
                available()
            );
            Ok(dir)
        }
        other => anyhow::bail!(
            "--checkpoint '{other}': use latest, best or step-N (available: {})",
            available()
        ),
    }
}

/// Saves named tensors as safetensors.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Loads safetensors, naming the file when it is missing or corrupt.
pub fn load_tensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e}; pick another checkpoint",
            path.display()
        )
    })?;
    parse_tensors(&bytes, device).map_err(|e| {
        anyhow::anyhow!(
            "cannot load {}: {e}; the file is corrupt — pick another checkpoint",
            path.display()
        )
    })
}

/// Parses safetensors bytes (the part of [`load_tensors`] that sees untrusted input).
pub fn parse_tensors(
    bytes: &[u8],
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, device)
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
    fn manifest_catches_damage_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        for step in [1, 2] {
            write_checkpoint(&ck, step, |d| {
                std::fs::write(d.join("a.bin"), vec![step as u8; 100])?;
                Ok(())
            })
            .unwrap();
        }
        assert!(verify(&ck.join("step-2")).is_ok());
        assert_eq!(newest_valid(&ck).unwrap().0, ck.join("step-2"));
        // Flip one byte of the newest checkpoint.
        let f = ck.join("step-2/a.bin");
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let err = verify(&ck.join("step-2")).unwrap_err().to_string();
        assert!(err.contains("a.bin is damaged"), "{err}");
        let (dir1, warnings) = newest_valid(&ck).unwrap();
        assert_eq!(dir1, ck.join("step-1"));
        assert!(warnings[0].contains("step-2"), "{warnings:?}");
        // Truncating the older one too leaves nothing to resume from.
        std::fs::write(ck.join("step-1/a.bin"), b"").unwrap();
        assert!(newest_valid(&ck)
            .unwrap_err()
            .to_string()
            .contains("no intact checkpoint"));
    }

    #[test]
    fn prune_keeps_the_newest_and_the_named() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        for step in 1..=6 {
            write_checkpoint(&ck, step, |_| Ok(())).unwrap();
        }
        mark_best(&ck, 2).unwrap();
        std::fs::write(ck.join(LATEST), "step-4").unwrap(); // e.g. after a fallback
        let removed = prune(&ck, 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        left.sort();
        assert_eq!(left, ["step-2", "step-4", "step-5", "step-6"]);
        assert_eq!(removed.len(), 2);
        assert!(prune(&ck, 0).unwrap().is_empty(), "0 keeps everything");
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
