//! Text tokenized with a Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, or any other).
//!
//! Tokenizing a corpus is slow next to training on it, so it happens once: the text is cut into
//! chunks at places no token can span, the chunks are encoded in parallel, and the flat token
//! array is cached on disk under the sha256 of the text and of the tokenizer file. A later run
//! on the same pair maps the cache back in a few milliseconds; changing either file (or the
//! tokenizer's settings) changes the key. Splits and windows are those of the character data
//! set: the first `1 - val_fraction` of the tokens train.

use super::text::split_windows;
use super::DataSplits;
use crate::fs::{hex, write_atomic};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

const MAGIC: &[u8; 8] = b"KILNTOK1";

/// Loads a tokenizer file with an error that names it.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot load the tokenizer {}: {e}; set data.tokenizer to a Hugging Face \
             tokenizer.json (e.g. data/gpt2-tokenizer/tokenizer.json)",
            path.display()
        )
    })
}

/// Where token arrays are cached: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
/// `~/.cache/kiln`, else `.kiln-cache` in the current directory.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("KILN_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("kiln")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/kiln")))
        .unwrap_or_else(|| PathBuf::from(".kiln-cache"))
}

/// The tokens of `text_path` under `tokenizer_path`, from the cache when it holds them.
/// Returns the tokens and the cache file they live in.
pub fn tokens_cached(
    text_path: &Path,
    tokenizer_path: &Path,
    cache_dir: &Path,
) -> Result<(Vec<u32>, PathBuf)> {
    let text_bytes = std::fs::read(text_path).with_context(|| {
        format!(
            "cannot read the text data set {}; set data.path to a UTF-8 text file",
            text_path.display()
        )
    })?;
    let tok_bytes = std::fs::read(tokenizer_path).with_context(|| {
        format!(
            "cannot read the tokenizer {}; set data.tokenizer to a tokenizer.json",
            tokenizer_path.display()
        )
    })?;
    let mut key = Sha256::new();
    key.update(Sha256::digest(&text_bytes));
    key.update(Sha256::digest(&tok_bytes));
    let file = cache_dir
        .join("tokens")
        .join(format!("{}.bin", hex(&key.finalize())));
    match read_cache(&file) {
        Ok(Some(tokens)) => return Ok((tokens, file)),
        Ok(None) => {}
        Err(e) => eprintln!(
            "warning: ignoring the damaged token cache {} ({e}); tokenizing again",
            file.display()
        ),
    }
    let text = String::from_utf8(text_bytes)
        .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", text_path.display()))?;
    let tokenizer = load_tokenizer(tokenizer_path)?;
    let tokens = encode_parallel(&tokenizer, &text)?;
    std::fs::create_dir_all(file.parent().expect("a cache file has a folder")).with_context(
        || {
            format!(
                "creating the token cache folder under {}",
                cache_dir.display()
            )
        },
    )?;
    let mut bytes = Vec::with_capacity(16 + 4 * tokens.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in &tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    // A cache is an optimisation: failing to write one (read-only home, full disk) is not an
    // error for the run.
    if let Err(e) = write_atomic(&file, &bytes) {
        eprintln!("warning: could not cache tokens in {}: {e}", file.display());
    }
    Ok((tokens, file))
}

/// Ok(None) when there is no cache file; Err when there is one but it is not a whole array.
fn read_cache(file: &Path) -> Result<Option<Vec<u32>>> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        bail!("not a kiln token array");
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    if bytes.len() != 16 + 4 * n {
        bail!(
            "{} bytes for {n} tokens: the file was cut short",
            bytes.len()
        );
    }
    Ok(Some(
        bytes[16..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
    ))
}

/// Encodes `text` as one sequence (no special tokens added), in parallel over chunks.
pub fn encode_parallel(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let parts: Vec<Vec<u32>> = chunks(text, 64 * 1024)
        .par_iter()
        .map(|c| {
            tokenizer
                .encode(*c, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
        })
        .collect::<Result<_>>()?;
    Ok(parts.concat())
}

/// Cuts `text` into pieces of about `target` bytes, each cut just before a `\n` that follows a
/// non-whitespace character. GPT-2's pre-tokenizer never joins such a pair into one piece
/// (letters, digits and punctuation pieces stop at whitespace; whitespace pieces start at it),
/// so encoding the chunks separately gives exactly the tokens of the whole text.
fn chunks(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let mut cut = (start + target).min(bytes.len());
        let safe = |i: usize| bytes[i] == b'\n' && !bytes[i - 1].is_ascii_whitespace();
        while cut < bytes.len() && !safe(cut) {
            cut += 1;
        }
        out.push(&text[start..cut]);
        start = cut;
    }
    out
}

/// Loads a text file as BPE tokens and splits it.
pub fn load(
    path: &Path,
    tokenizer_path: &Path,
    seq_len: usize,
    val_fraction: f64,
    cache_dir: &Path,
) -> Result<DataSplits> {
    let (tokens, _) = tokens_cached(path, tokenizer_path, cache_dir)?;
    let vocab = load_tokenizer(tokenizer_path)?.get_vocab_size(true);
    let (train, val) = split_windows(&tokens, seq_len, val_fraction, path, "tokens")?;
    Ok(DataSplits {
        train,
        val,
        test: None,
        num_classes: vocab,
        files: vec![
            (path.display().to_string(), crate::fs::sha256_file(path)?),
            (
                tokenizer_path.display().to_string(),
                crate::fs::sha256_file(tokenizer_path)?,
            ),
        ],
        vocab: None,
        tokenizer: Some(tokenizer_path.to_path_buf()),
        labels: None,
        image: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> Tokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt2-tokenizer/tokenizer.json");
        load_tokenizer(&p).unwrap()
    }

    /// The shipped tokenizer gives the ids that HF tokenizers and tiktoken gave for each sample.
    #[test]
    fn gpt2_matches_reference_encodings() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/gpt2-tokenizer/reference_encodings.json");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let tok = gpt2();
        let samples = r["samples"].as_array().unwrap();
        assert!(samples.len() >= 5);
        for s in samples {
            let text = s["text"].as_str().unwrap();
            let want: Vec<u32> = s["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(encode_parallel(&tok, text).unwrap(), want, "{text:?}");
            assert_eq!(tok.decode(&want, false).unwrap(), text);
        }
    }

    /// Chunked, parallel encoding gives the tokens of encoding the whole text at once.
    #[test]
    fn chunked_encoding_equals_whole_encoding() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tinyshakespeare/input.txt");
        let text = std::fs::read_to_string(path).unwrap();
        let text = &text[..200_000];
        let tok = gpt2();
        let whole = tok.encode(text, false).unwrap().get_ids().to_vec();
        let pieces = chunks(text, 1000);
        assert!(pieces.len() > 100, "{} chunks", pieces.len());
        assert_eq!(pieces.concat(), text);
        let chunked: Vec<u32> = pieces
            .iter()
            .flat_map(|c| tok.encode(*c, false).unwrap().get_ids().to_vec())
            .collect();
        assert_eq!(chunked, whole);
        // Awkward whitespace around the cuts.
        let odd = "a \n\nb\r\n c  \n\t\nd\n\n\n  e\n";
        let want = tok.encode(odd, false).unwrap().get_ids().to_vec();
        for target in 1..odd.len() {
            let got: Vec<u32> = chunks(odd, target)
                .iter()
                .flat_map(|c| tok.encode(*c, false).unwrap().get_ids().to_vec())
                .collect();
            assert_eq!(got, want, "target {target}");
        }
    }

    #[test]
    fn tokens_are_cached_and_a_damaged_cache_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "Hello world.\nHello again, world!\n".repeat(50)).unwrap();
        let tok =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt2-tokenizer/tokenizer.json");
        let cache = dir.path().join("cache");
        let (a, file) = tokens_cached(&text, &tok, &cache).unwrap();
        assert!(file.exists());
        assert_eq!(a[..2], [15496, 995]);
        // Served from the cache: a planted array comes back as is.
        let mut planted = std::fs::read(&file).unwrap();
        planted[16..20].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&file, &planted).unwrap();
        assert_eq!(tokens_cached(&text, &tok, &cache).unwrap().0[0], 7);
        // Cut short: ignored, rebuilt, rewritten.
        std::fs::write(&file, &planted[..planted.len() - 3]).unwrap();
        let (b, _) = tokens_cached(&text, &tok, &cache).unwrap();
        assert_eq!(a, b);
        assert_eq!(read_cache(&file).unwrap().unwrap(), a);
        // Another text, another key.
        std::fs::write(&text, "Other text\n").unwrap();
        let (c, other) = tokens_cached(&text, &tok, &cache).unwrap();
        assert_ne!(other, file);
        assert_eq!(c, tok_ids("Other text\n"));
    }

    fn tok_ids(s: &str) -> Vec<u32> {
        gpt2().encode(s, false).unwrap().get_ids().to_vec()
    }
}
