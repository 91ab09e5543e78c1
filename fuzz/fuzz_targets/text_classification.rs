//! The text-classification reader on arbitrary bytes: a malformed CSV/TSV file is an error
//! naming it, never a panic.
//! Input: one byte of options (bit 0: `.tsv` rather than `.csv`; bit 1: columns
//! `sentence`/`label` rather than `text`/`label`), then the file's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&options, file)) = data.split_first() else {
        return;
    };
    let path = Path::new(if options & 1 == 1 {
        "train.tsv"
    } else {
        "train.csv"
    });
    let text_column = if options & 2 == 2 { "sentence" } else { "text" };
    if let Ok(rows) =
        kiln_core::data::text_classification::parse_rows(file, path, text_column, "label")
    {
        assert!(!rows.is_empty(), "a file that reads has examples");
    }
});
