//! Character-level text: the vocabulary is the sorted set of characters in the file, the first
//! `1 - val_fraction` of the characters train and the rest validate (nanoGPT's
//! `shakespeare_char` split). Training samples windows at random offsets; evaluation walks
//! non-overlapping windows so every validation token is scored exactly once.

use super::{DataSplits, Examples, HostBatch, HostTensor};
use crate::fs::sha256_file;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;

/// Token ids of one split, cut into windows of `seq_len` inputs and `seq_len` targets.
pub struct TokenWindows {
    pub tokens: Arc<Vec<u32>>,
    pub seq_len: usize,
}

impl TokenWindows {
    /// Offsets a window can start at: one starting at `s` reads tokens `s..=s + seq_len`.
    fn starts(&self) -> usize {
        self.tokens.len().saturating_sub(self.seq_len)
    }

    /// Windows that fit side by side.
    fn side_by_side(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.seq_len
    }
}

impl Examples for TokenWindows {
    /// One epoch = as many windows as fit side by side, each at a random offset when shuffled.
    fn train_order(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> Vec<usize> {
        if shuffle {
            let n = self.side_by_side();
            (0..n).map(|_| rng.random_range(0..self.starts())).collect()
        } else {
            self.eval_order()
        }
    }

    fn eval_order(&self) -> Vec<usize> {
        (0..self.side_by_side()).map(|i| i * self.seq_len).collect()
    }

    fn collate(&self, ids: &[usize]) -> HostBatch {
        let t = self.seq_len;
        let mut x = Vec::with_capacity(ids.len() * t);
        let mut y = Vec::with_capacity(ids.len() * t);
        for &s in ids {
            x.extend_from_slice(&self.tokens[s..s + t]);
            y.extend_from_slice(&self.tokens[s + 1..s + t + 1]);
        }
        HostBatch {
            inputs: HostTensor::U32(x, vec![ids.len(), t]),
            targets: y,
            target_shape: vec![ids.len(), t],
            mix: None,
        }
    }

    fn items_per_example(&self) -> usize {
        self.seq_len
    }
}

/// A character vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct CharVocab {
    pub chars: Vec<char>,
}

impl CharVocab {
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        CharVocab { chars }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, char> {
        text.chars()
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .map(|i| i as u32)
                    .map_err(|_| c)
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }
}

/// Loads a text file as character tokens and splits it.
pub fn load(path: &Path, seq_len: usize, val_fraction: f64) -> anyhow::Result<DataSplits> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the text data set {}: {e}; set data.path to a UTF-8 text file",
            path.display()
        )
    })?;
    let vocab = CharVocab::from_text(&text);
    let tokens = vocab
        .encode(&text)
        .expect("every character is in the vocabulary");
    let (train, val) = split_windows(&tokens, seq_len, val_fraction, path, "characters")?;
    Ok(DataSplits {
        train,
        val,
        test: None,
        num_classes: vocab.chars.len(),
        files: vec![(path.display().to_string(), sha256_file(path)?)],
        vocab: Some(vocab.chars),
        tokenizer: None,
        labels: None,
        image: None,
    })
}

/// Splits a token stream into training and validation windows of `seq_len` (the last
/// `val_fraction` is held out); each split must hold more than `seq_len` tokens (`unit` names
/// them in the error).
pub(crate) fn split_windows(
    tokens: &[u32],
    seq_len: usize,
    val_fraction: f64,
    path: &Path,
    unit: &str,
) -> anyhow::Result<(Arc<dyn Examples>, Arc<dyn Examples>)> {
    let n_train = (tokens.len() as f64 * (1.0 - val_fraction)) as usize;
    let (train, val) = tokens.split_at(n_train);
    for (name, part) in [("training", train), ("validation", val)] {
        anyhow::ensure!(
            part.len() > seq_len,
            "{}: the {name} split has {} {unit}, too few for data.seq_len = {seq_len}",
            path.display(),
            part.len()
        );
    }
    let windows = |t: &[u32]| -> Arc<dyn Examples> {
        Arc::new(TokenWindows {
            tokens: Arc::new(t.to_vec()),
            seq_len,
        })
    };
    Ok((windows(train), windows(val)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn vocab_round_trips() {
        let v = CharVocab::from_text("hello world");
        assert_eq!(v.chars, vec![' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        let ids = v.encode("world hello").unwrap();
        assert_eq!(v.decode(&ids), "world hello");
        assert_eq!(v.encode("hi"), Err('i'));
    }

    #[test]
    fn splits_ninety_ten_and_shifts_targets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        let text: String = (0..100).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        std::fs::write(&p, &text).unwrap();
        let d = load(&p, 4, 0.1).unwrap();
        assert_eq!(d.num_classes, 26);
        assert_eq!(d.files[0].1.len(), 64);
        // val = the last 10 characters → two non-overlapping windows of 4 (+1 target).
        assert_eq!(d.val.eval_order(), vec![0, 4]);
        let b = d.train.collate(&[0, 5]);
        let HostTensor::U32(x, shape) = b.inputs else {
            panic!("tokens are u32")
        };
        assert_eq!(shape, vec![2, 4]);
        assert_eq!(x, vec![0, 1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(b.targets, vec![1, 2, 3, 4, 6, 7, 8, 9]);
        // Random windows stay in range.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let order = d.train.train_order(&mut rng, true);
        assert_eq!(order.len(), 89 / 4);
        assert!(order.iter().all(|&s| s + 4 < 90));
    }

    #[test]
    fn too_short_text_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "abcdefghij").unwrap();
        let err = load(&p, 8, 0.1).err().unwrap().to_string();
        assert!(err.contains("too few"), "{err}");
        let err = load(&dir.path().join("missing.txt"), 8, 0.1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("data.path"), "{err}");
    }
}
