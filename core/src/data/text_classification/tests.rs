use super::*;
use crate::data::text::CharVocab;
use rand::SeedableRng;

/// A folder with train.tsv / dev.tsv / test.csv and a character tokenizer.
fn fixture(dir: &Path) -> PathBuf {
    let mut train = String::from("sentence\tlabel\n");
    for i in 0..40 {
        let (text, label) = if i % 2 == 0 {
            ("good film", "pos")
        } else {
            ("bad", "neg")
        };
        train.push_str(&format!("{}{}\t{label}\n", text, "!".repeat(i % 7)));
    }
    std::fs::write(dir.join("train.tsv"), train).unwrap();
    std::fs::write(
        dir.join("dev.tsv"),
        "sentence\tlabel\nit 's \"good\t pos\nbad\tneg\n",
    )
    .unwrap();
    std::fs::write(dir.join("test.csv"), "text,label\n\"good, really\",pos\n").unwrap();
    let vocab = CharVocab::from_text("goodfilmbad!'s\", ry itnxe");
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, vocab.tokenizer_json().to_string()).unwrap();
    tok
}

fn spec<'a>(dir: &'a Path, tok: &'a Path) -> Spec<'a> {
    Spec {
        folder: dir,
        train: "train.tsv",
        val: Some("dev.tsv"),
        test: None,
        val_size: 0,
        text_column: "sentence",
        label_column: "label",
        labels: None,
        max_length: 8,
        bucket_by_length: true,
        tokenizer: tok,
        seed: 1,
    }
}

#[test]
fn pads_per_batch_masks_and_maps_labels() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixture(dir.path());
    let d = load(&spec(dir.path(), &tok), 4).unwrap();
    assert_eq!(
        d.labels.as_deref(),
        Some(&["neg".to_string(), "pos".to_string()][..])
    );
    // dev.tsv: the quote is text (TSV does not quote), truncated to max_length.
    let b = d.val.collate(&[0, 1]);
    let HostTensor::U32(x, shape) = &b.inputs else {
        panic!("u32 inputs")
    };
    assert_eq!(
        shape,
        &[2, 2, 8],
        "padded to the longest, which was cut to 8"
    );
    assert_eq!(&x[8..16], &[1; 8], "row 0 mask: all real");
    assert_eq!(&x[24..32], &[1, 1, 1, 0, 0, 0, 0, 0], "`bad` then padding");
    assert_eq!(b.targets, vec![1, 0]);
    // Bucketed epochs: every example once, batches of similar length, seeded.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let order = d.train.train_order(&mut rng, true);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..40).collect::<Vec<_>>());
    assert_eq!(
        order,
        d.train.train_order(&mut ChaCha8Rng::seed_from_u64(3), true)
    );
    let spread: usize = order
        .chunks(4)
        .map(|c| {
            let b = d.train.collate(c);
            let HostTensor::U32(_, s) = b.inputs else {
                unreachable!()
            };
            let lens: Vec<usize> = c
                .iter()
                .map(|&i| {
                    let HostTensor::U32(x, s) = d.train.collate(&[i]).inputs else {
                        unreachable!()
                    };
                    s[2].min(x.len())
                })
                .collect();
            s[2] - lens.iter().min().unwrap()
        })
        .sum();
    assert!(spread <= 10, "bucketed batches pad little: {spread}");
}

#[test]
fn held_out_validation_and_csv_quoting() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixture(dir.path());
    let mut s = spec(dir.path(), &tok);
    s.val = None;
    s.val_size = 10;
    s.test = Some("test.csv");
    s.text_column = "sentence";
    let e = load(&s, 4).err().unwrap().to_string();
    assert!(
        e.contains("test.csv has no column \"sentence\"") && e.contains("text, label"),
        "{e}"
    );
    std::fs::write(
        dir.path().join("test.csv"),
        "sentence,label\n\"good, really\",pos\n",
    )
    .unwrap();
    let d = load(&s, 4).unwrap();
    assert_eq!(d.val.eval_order().len(), 10);
    assert_eq!(d.train.eval_order().len(), 30);
    let t = d.test.unwrap().collate(&[0]);
    assert_eq!(t.target_shape, vec![1]);
    let HostTensor::U32(_, shape) = t.inputs else {
        unreachable!()
    };
    assert_eq!(
        shape[2], 8,
        "\"good, really\" is one field, cut to 8 tokens"
    );
}

#[test]
fn unknown_labels_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixture(dir.path());
    std::fs::write(
        dir.path().join("dev.tsv"),
        "sentence\tlabel\ngood\tpos\nbad\tmeh\n",
    )
    .unwrap();
    let e = load(&spec(dir.path(), &tok), 4).err().unwrap().to_string();
    assert!(e.contains("dev.tsv:3") && e.contains("\"meh\""), "{e}");
    let mut s = spec(dir.path(), &tok);
    s.labels = Some(vec!["pos".into()]);
    let e = load(&s, 4).err().unwrap().to_string();
    assert!(e.contains("only 1 label"), "{e}");
}

#[test]
fn parse_rows_quotes_empty_fields_and_bad_bytes() {
    let csv = Path::new("d/train.csv");
    let rows = parse_rows(
        b"text,label\n\"good, \"\"really\"\"\",pos\n,\n",
        csv,
        "text",
        "label",
    )
    .unwrap();
    assert_eq!(rows[0].1, "good, \"really\"");
    assert_eq!((rows[1].1.as_str(), rows[1].2.as_str()), ("", ""));
    let tsv = Path::new("d/train.tsv");
    let rows = parse_rows(
        b"sentence\tlabel\nit 's \"x\t pos \n",
        tsv,
        "sentence",
        "label",
    );
    assert_eq!(rows.unwrap()[0].2, "pos");
    let err = |bytes: &[u8], path| {
        parse_rows(bytes, path, "text", "label")
            .unwrap_err()
            .to_string()
    };
    let e = err(b"text,label\nonly-one\n", csv);
    assert!(
        e.contains("d/train.csv") && e.contains("malformed row"),
        "{e}"
    );
    let e = err(b"text\tlabel\ncaf\xe9\tpos\n", tsv);
    assert!(e.contains("d/train.tsv: malformed row"), "{e}");
    let e = err(b"", csv);
    assert!(e.contains("d/train.csv has no column \"text\""), "{e}");
    let e = err(b"text,label\n", csv);
    assert!(e.contains("d/train.csv has no examples"), "{e}");
}

/// Each row of an evaluation batch without its padding, and the batch's padded length.
fn rows_of(b: &HostBatch) -> (usize, Vec<(Vec<u32>, u32)>) {
    let HostTensor::U32(x, s) = &b.inputs else {
        unreachable!()
    };
    let t = s[2];
    let rows = x
        .chunks(2 * t)
        .zip(&b.targets)
        .map(|(r, &label)| {
            let real = r[t..].iter().filter(|&&m| m == 1).count();
            (r[..real].to_vec(), label)
        })
        .collect();
    (t, rows)
}

#[test]
fn evaluation_batches_are_grouped_by_length_when_bucketing() {
    use crate::data::eval_batches;
    let dir = tempfile::tempdir().unwrap();
    let tok = fixture(dir.path());
    let bucketed = load(&spec(dir.path(), &tok), 4).unwrap();
    let plain = load(
        &Spec {
            bucket_by_length: false,
            ..spec(dir.path(), &tok)
        },
        4,
    )
    .unwrap();
    let pass = |d: &DataSplits, cap| -> (Vec<usize>, Vec<(Vec<u32>, u32)>) {
        let (lens, rows): (Vec<usize>, Vec<_>) = eval_batches(d.train.as_ref(), 4, cap)
            .map(|b| rows_of(&b))
            .unzip();
        (lens, rows.concat())
    };
    let (file_lens, file_rows) = pass(&plain, None);
    let (lens, mut rows) = pass(&bucketed, None);
    assert!(lens.windows(2).all(|w| w[0] <= w[1]), "sorted: {lens:?}");
    let padded = |l: &[usize]| l.iter().sum::<usize>();
    assert!(
        padded(&lens) < padded(&file_lens),
        "{lens:?} pads less than {file_lens:?}"
    );
    let mut expected = file_rows.clone();
    rows.sort();
    expected.sort();
    assert_eq!(rows, expected, "every example once, with its label");
    // A capped pass groups the examples the cap chose, the same as in file order.
    let (_, mut capped) = pass(&bucketed, Some(3));
    let mut first = pass(&plain, Some(3)).1;
    assert_eq!(first.len(), 12);
    capped.sort();
    first.sort();
    assert_eq!(capped, first);
    // The validation split (dev.tsv: 8 then 3 tokens) is grouped as well.
    let (val_lens, _) = rows_of(&eval_batches(bucketed.val.as_ref(), 1, None).next().unwrap());
    assert_eq!(val_lens, 3, "the shorter row first");
}
