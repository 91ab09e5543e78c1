//! File helpers shared by data loading, checkpoints and run directories: atomic writes, content
//! hashes, and where a path really points (so that no output overwrites an input).

use std::path::Path;

/// Puts `path` in an io error's message: "Not a directory (os error 20)" alone names nothing.
/// For `.map_err(at(path))`.
pub fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Replaces `path` with `bytes` via a synced temporary file and a rename. The temporary file is
/// this write's own (process id and a counter), so writers racing for one path (the ranks of a
/// job filling the token cache) each rename a whole file, and the last one wins.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.{}-{n}.tmp",
        name.unwrap_or_default(),
        std::process::id()
    ));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(bytes).map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(at(path))
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(at(path))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` made absolute with symbolic links and `..` resolved as far as it exists (the rest
/// appended as written): where a file would be written, to compare with other paths before
/// anything is created.
pub fn resolved(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize()?;
    out.extend(rest.into_iter().rev());
    Ok(out)
}

/// Refuses to write `output` where it would overwrite `input` (the same file, through any
/// path); `what` names the options in the message.
pub fn ensure_not_same_file(input: &Path, output: &Path, what: &str) -> anyhow::Result<()> {
    let resolve =
        |p: &Path| resolved(p).map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", p.display()));
    anyhow::ensure!(
        resolve(input)? != resolve(output)?,
        "{what}: {} is the input itself; writing it would destroy the input. Pick another \
         output path",
        output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_atomic_writes_each_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 16]).collect();
        std::thread::scope(|s| {
            for p in &payloads {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..10 {
                        write_atomic(path, p).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(payloads.contains(&got), "one writer's bytes, whole");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file stays");
    }
}
