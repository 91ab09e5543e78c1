//! Text ↔ token ids for a language model: a character vocabulary or a Hugging Face tokenizer.
//! Also writes a character vocabulary as a `tokenizer.json`, so an exported character model
//! loads in `tokenizers`/`transformers` with the same ids.

use super::text::CharVocab;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;
use tokenizers::Tokenizer;

/// GPT-2's end-of-text token, used as BOS/EOS when a tokenizer has it.
pub const END_OF_TEXT: &str = "<|endoftext|>";

pub enum Codec {
    Chars(CharVocab),
    Tokenizer(Box<Tokenizer>),
}

impl Codec {
    /// A run directory's codec: `vocab.json` (characters) or `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Codec> {
        let tok = dir.join("tokenizer.json");
        if tok.is_file() {
            return Ok(Codec::Tokenizer(Box::new(super::bpe::load_tokenizer(
                &tok,
            )?)));
        }
        let vocab = dir.join("vocab.json");
        if vocab.is_file() {
            return Ok(Codec::Chars(CharVocab::from_json_file(&vocab)?));
        }
        anyhow::bail!(
            "{} has neither tokenizer.json nor vocab.json: it is not a language model",
            dir.display()
        )
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Codec::Chars(v) => v.encode(text).map_err(|c| {
                anyhow::anyhow!("the text has {c:?}, which is not in the model's vocabulary")
            }),
            Codec::Tokenizer(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Codec::Chars(v) => Ok(v.decode(ids)),
            Codec::Tokenizer(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
        }
    }

    /// The end-of-text id, when the vocabulary has one.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Codec::Chars(_) => None,
            Codec::Tokenizer(t) => t.token_to_id(END_OF_TEXT),
        }
    }

    /// Whether the vocabulary has this (special) token.
    pub fn has_token(&self, token: &str) -> bool {
        self.token_id(token).is_some()
    }

    /// The id of this (special) token, when the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Codec::Chars(_) => None,
            Codec::Tokenizer(t) => t.token_to_id(token),
        }
    }

    /// `tokenizer.json` contents for this codec.
    pub fn tokenizer_json(&self) -> Result<String> {
        match self {
            Codec::Chars(v) => Ok(serde_json::to_string_pretty(&v.tokenizer_json())?),
            Codec::Tokenizer(t) => t
                .to_string(true)
                .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}")),
        }
    }
}

/// Turns a growing id sequence into text pieces to print: the decoded suffix is emitted only
/// once it is whole (a byte-level token may end inside a multi-byte character).
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    pub fn new(prompt: &[u32]) -> Self {
        StreamDecoder {
            ids: prompt.to_vec(),
            printed: usize::MAX,
        }
    }

    /// Adds `id`; returns the newly complete text, if any.
    pub fn push(&mut self, codec: &Codec, id: u32) -> Result<String> {
        if self.printed == usize::MAX {
            self.printed = codec.decode(&self.ids)?.len();
        }
        self.ids.push(id);
        let text = codec.decode(&self.ids)?;
        if text.ends_with('\u{fffd}')
            || text.len() < self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}

impl CharVocab {
    /// Reads a run's `vocab.json` (a JSON list of one-character strings, in id order).
    pub fn from_json_file(p: &Path) -> Result<CharVocab> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let chars: Vec<String> =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))?;
        let chars = chars
            .iter()
            .map(|s| {
                let mut it = s.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => Ok(c),
                    _ => anyhow::bail!("{}: entry {s:?} is not one character", p.display()),
                }
            })
            .collect::<Result<Vec<char>>>()?;
        Ok(CharVocab { chars })
    }

    /// The vocabulary as a Hugging Face `tokenizer.json`: every character is its own piece
    /// (a Split pre-tokenizer on any one character), looked up in a word-level vocabulary with
    /// kiln's ids, and decoding fuses the pieces back without separators. The decoder starts
    /// with a ByteFallback, which changes nothing here (no piece is a `<0xNN>` byte token) but is
    /// what servers that read a tokenizer's bytes per token through toktrie (mistral.rs) accept
    /// besides ByteLevel: a bare Fuse decoder makes them refuse the model.
    pub fn tokenizer_json(&self) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> = self
            .chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"Regex": "[\\s\\S]"},
                "behavior": "Isolated",
                "invert": false
            },
            "post_processor": null,
            "decoder": {
                "type": "Sequence",
                "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]
            },
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "\u{fffd}"}
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated tokenizer.json encodes and decodes exactly as the character vocabulary.
    #[test]
    fn char_vocab_as_tokenizer_json() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tinyshakespeare/input.txt");
        let text = std::fs::read_to_string(path).unwrap();
        let text = &text[..20_000];
        let vocab = CharVocab::from_text(text);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, Codec::Chars(vocab.clone()).tokenizer_json().unwrap()).unwrap();
        let tok = Codec::Tokenizer(Box::new(super::super::bpe::load_tokenizer(&p).unwrap()));
        let want = vocab.encode(text).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want);
        assert_eq!(tok.decode(&want).unwrap(), text);
        assert_eq!(
            tok.encode(" \n\nA b\n").unwrap(),
            vocab.encode(" \n\nA b\n").unwrap()
        );
        // The byte fallback (for mistral.rs) leaves text that spells a byte token as it is.
        let spelled = "ABC<0x41>x";
        let vocab = CharVocab::from_text(spelled);
        let json = Codec::Chars(vocab.clone()).tokenizer_json().unwrap();
        assert!(json.contains("ByteFallback"), "{json}");
        std::fs::write(&p, json).unwrap();
        let tok = Codec::Tokenizer(Box::new(super::super::bpe::load_tokenizer(&p).unwrap()));
        assert_eq!(
            tok.decode(&vocab.encode(spelled).unwrap()).unwrap(),
            spelled
        );
    }

    #[test]
    fn streaming_waits_for_whole_characters() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt2-tokenizer/tokenizer.json");
        let codec = Codec::Tokenizer(Box::new(super::super::bpe::load_tokenizer(&p).unwrap()));
        let ids = codec.encode("Hi 日本語 🤖 there").unwrap();
        let mut s = StreamDecoder::new(&ids[..1]);
        let mut out = String::new();
        for &id in &ids[1..] {
            let piece = s.push(&codec, id).unwrap();
            assert!(!piece.contains('\u{fffd}'), "{piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, " 日本語 🤖 there");
    }
}
