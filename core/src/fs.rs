//! File helpers shared by data loading, checkpoints and run directories: atomic writes, content
//! hashes, and where a path really points (so that no output overwrites an input).

use std::path::Path;

/// Puts `path` in an io error's message: "Not a directory (os error 20)" alone names nothing.
/// For `.map_err(at(path))`.
pub fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Replaces `path` with `bytes` via a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
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
