//! The IDX format of MNIST and Fashion-MNIST: a 4-byte magic (`0, 0, dtype, ndims`), `ndims`
//! big-endian u32 dimensions, then the raw data. Files may be gzip-compressed (`.gz`).

use std::io::Read;
use std::path::Path;

/// An unsigned-byte IDX array (the only element type MNIST-style data sets use).
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file, decompressing it when its name ends in `.gz`.
pub fn read_idx(path: &Path) -> anyhow::Result<IdxArray> {
    let raw = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read IDX file {}: {e}", path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| anyhow::anyhow!("{} is not valid gzip: {e}", path.display()))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses IDX bytes.
pub fn parse_idx(bytes: &[u8]) -> anyhow::Result<IdxArray> {
    anyhow::ensure!(
        bytes.len() >= 4,
        "not an IDX file: shorter than its 4-byte header"
    );
    anyhow::ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "not an IDX file: the magic number must start with two zero bytes"
    );
    anyhow::ensure!(
        bytes[2] == 0x08,
        "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
        bytes[2]
    );
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    anyhow::ensure!(bytes.len() >= header, "IDX header truncated");
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    anyhow::ensure!(
        data.len() == expected,
        "IDX data has {} bytes but dimensions {dims:?} need {expected}",
        data.len()
    );
    Ok(IdxArray {
        dims,
        data: data.to_vec(),
    })
}

/// The IDX bytes of an unsigned-byte array of `dims` (uncompressed): what [`parse_idx`] reads.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_plain_and_gzip() {
        let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let want = IdxArray {
            dims: vec![2, 3],
            data: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(parse_idx(&bytes).unwrap(), want);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x-idx2-ubyte.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&p).unwrap(), want);
    }

    #[test]
    fn rejects_bad_files() {
        let err = |b: &[u8]| parse_idx(b).unwrap_err().to_string();
        assert!(err(&[0, 0]).contains("shorter"));
        assert!(err(&[1, 0, 8, 1, 0, 0, 0, 1, 0]).contains("magic"));
        assert!(err(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0]).contains("not supported"));
        let mut short = encode_idx(&[2, 2], &[1, 2, 3, 4]);
        short.pop();
        assert!(err(&short).contains("need 4"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gz");
        std::fs::write(&p, b"definitely not gzip").unwrap();
        assert!(read_idx(&p).unwrap_err().to_string().contains("gzip"));
    }
}
