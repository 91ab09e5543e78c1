//! TensorBoard event files: `RUN/tb/events.out.tfevents.<unix seconds>.<host>`, holding every
//! scalar of `metrics.jsonl` at its step and the resolved recipe as a text summary.
//!
//! An event file is a sequence of records, each
//! `u64 LE length | masked crc32c(length bytes) | data | masked crc32c(data)`, whose data is one
//! protobuf `Event` (TensorFlow's `event.proto`, `summary.proto`, `tensor.proto`; only the fields
//! kiln writes are declared here, and a reader skips the others). The first event of a file
//! carries `file_version: "brain.Event:2"`.
//!
//! A resumed run writes a new file; [`truncate_after`] first drops from the earlier files the
//! steps after the resumed checkpoint, so that no step is written twice.

use crate::fs::{at, write_atomic};
use anyhow::{Context, Result};
use prost::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `file_version` of the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// What every event file's name starts with.
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// `event.proto`'s `Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "event::What", tags = "3, 5")]
    pub what: Option<event::What>,
}

pub mod event {
    /// The `what` of an [`super::Event`]: kiln writes a file version or a summary.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(super::Summary),
    }
}

/// `summary.proto`'s `Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<summary::Value>,
}

pub mod summary {
    /// `Summary.Value`: a tag and a scalar (`simple_value`) or a tensor.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<super::SummaryMetadata>,
        #[prost(oneof = "Kind", tags = "2, 8")]
        pub value: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "8")]
        Tensor(super::TensorProto),
    }
}

/// `summary.proto`'s `SummaryMetadata`: which plugin shows a value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    /// `DataClass`: 2 is `DATA_CLASS_TENSOR`.
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensor.proto`'s `TensorProto`, as far as a string tensor needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DataType`: [`DT_STRING`] here.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensor_shape.proto`'s `TensorShapeProto`: no dimensions is a scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `types.proto`'s `DT_STRING`.
pub const DT_STRING: i32 = 7;
/// `summary.proto`'s `DATA_CLASS_TENSOR`.
const DATA_CLASS_TENSOR: i32 = 2;

impl Event {
    fn now(step: i64, what: event::What) -> Event {
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Event {
            wall_time,
            step,
            what: Some(what),
        }
    }

    /// The summary values of this event (none for a file-version event).
    pub fn values(&self) -> &[summary::Value] {
        match &self.what {
            Some(event::What::Summary(s)) => &s.value,
            _ => &[],
        }
    }
}

impl summary::Value {
    /// The text of a text-plugin value (a scalar string tensor).
    pub fn text(&self) -> Option<String> {
        match &self.value {
            Some(summary::Kind::Tensor(t)) if t.dtype == DT_STRING => t
                .string_val
                .first()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// TFRecord's masked crc32c: a crc stored next to data that itself holds crcs would otherwise
/// be weak, so it is rotated and offset.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its masked crc, the data, its masked crc.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Writes one event file; every call is flushed, so a crash loses nothing written before it.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Makes `dir` and a new event file in it, `events.out.tfevents.<unix seconds>.<host>`; a
    /// name taken already (a resume within the same second) gets a suffix `.001`, `.002`, … so
    /// no file is overwritten and the names still sort in the order they were written.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("{FILE_PREFIX}{secs}.{}", hostname());
        for n in 0..1000 {
            let name = match n {
                0 => base.clone(),
                n => format!("{base}.{n:03}"),
            };
            let path = dir.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let mut w = EventWriter { path, file };
                    w.write(&Event::now(
                        0,
                        event::What::FileVersion(FILE_VERSION.into()),
                    ))?;
                    return Ok(w);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(at(&path)(e)),
            }
        }
        Err(at(&dir.join(base))(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a thousand event files of this second exist already",
        )))
    }

    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every value of `values` as a scalar (as f32, which is what
    /// TensorBoard stores; NaN and infinities as they are).
    pub fn scalars(&mut self, step: u64, values: &BTreeMap<String, f64>) -> std::io::Result<()> {
        let value = values
            .iter()
            .map(|(tag, &v)| summary::Value {
                tag: tag.clone(),
                metadata: None,
                value: Some(summary::Kind::SimpleValue(v as f32)),
            })
            .collect();
        self.summary(step, Summary { value })
    }

    /// A text summary (TensorBoard's Text tab renders it as markdown).
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        let value = summary::Value {
            tag: tag.into(),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
                data_class: DATA_CLASS_TENSOR,
            }),
            value: Some(summary::Kind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape::default()),
                string_val: vec![text.as_bytes().to_vec()],
            })),
        };
        self.summary(step, Summary { value: vec![value] })
    }

    fn summary(&mut self, step: u64, summary: Summary) -> std::io::Result<()> {
        let step = i64::try_from(step).map_err(|_| {
            at(&self.path)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("step {step} does not fit an event's int64"),
            ))
        })?;
        self.write(&Event::now(step, event::What::Summary(summary)))
    }

    /// One record, in one write: a kill leaves a whole record or a torn tail, never a gap.
    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let record = frame(&event.encode_to_vec());
        self.file.write_all(&record).map_err(at(&self.path))?;
        self.file.flush().map_err(at(&self.path))
    }
}

/// The host's name, for the event file's name (TensorFlow's convention); `localhost` when it
/// cannot be read.
fn hostname() -> String {
    let name = {
        #[cfg(unix)]
        {
            let mut buf = [0u8; 256];
            // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that.
            let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            (rc == 0).then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
        }
        #[cfg(not(unix))]
        {
            std::env::var("COMPUTERNAME").ok()
        }
    };
    // Only characters that are safe in a file name.
    let name: String = name
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// A record's place in its file and its event.
struct Record<'a> {
    /// The whole framed record, as it is in the file.
    bytes: &'a [u8],
    event: Event,
}

/// The records of an event file's bytes; a torn final record (a kill mid-write) ends the file,
/// any other damage is an error naming `path` and the offset.
fn records<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<Record<'a>>> {
    let corrupt = |offset: usize, what: &str| {
        anyhow::anyhow!(
            "{} is corrupt at byte {offset}: {what}; move the file out of the way (the run's \
             metrics.jsonl has the same scalars)",
            path.display()
        )
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < 12 {
            break; // torn header
        }
        let len_bytes = &rest[..8];
        let len_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != len_crc {
            return Err(corrupt(pos, "the record length's crc does not match"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(16))
            .filter(|&end| end <= rest.len());
        let Some(end) = end else {
            break; // torn data or data crc
        };
        let data = &rest[12..end - 4];
        let data_crc = u32::from_le_bytes(rest[end - 4..end].try_into().expect("4 bytes"));
        if masked_crc(data) != data_crc {
            return Err(corrupt(pos, "the record data's crc does not match"));
        }
        let event = Event::decode(data)
            .map_err(|e| corrupt(pos, &format!("the record is not an event ({e})")))?;
        out.push(Record {
            bytes: &rest[..end],
            event,
        });
        pos += end;
    }
    Ok(out)
}

/// The events of one file, checking both crcs of every record; a torn final record is the end
/// of the file.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(at(path))?;
    Ok(records(path, &bytes)?
        .into_iter()
        .map(|r| r.event)
        .collect())
}

/// The event files in `dir`, in name order (the order they were written); none when `dir` does
/// not exist.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(dir)(e).into()),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(at(dir))?.path();
        if is_event_file(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_event_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(FILE_PREFIX) && !n.ends_with(".tmp"))
}

/// Every scalar in `dir`'s event files, by tag: `(step, value)` in the order written.
pub fn read_scalars(dir: &Path) -> Result<BTreeMap<String, Vec<(u64, f64)>>> {
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for file in event_files(dir)? {
        for event in read_events(&file)? {
            for v in event.values() {
                if let Some(summary::Kind::SimpleValue(x)) = v.value {
                    let step = u64::try_from(event.step).unwrap_or(0);
                    out.entry(v.tag.clone())
                        .or_default()
                        .push((step, f64::from(x)));
                }
            }
        }
    }
    Ok(out)
}

/// Every text summary in `dir`'s event files, by tag: `(step, text)` in the order written.
pub fn read_texts(dir: &Path) -> Result<BTreeMap<String, Vec<(u64, String)>>> {
    let mut out: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for file in event_files(dir)? {
        for event in read_events(&file)? {
            for v in event.values() {
                if let Some(text) = v.text() {
                    let step = u64::try_from(event.step).unwrap_or(0);
                    out.entry(v.tag.clone()).or_default().push((step, text));
                }
            }
        }
    }
    Ok(out)
}

/// For a resume from the checkpoint at `step`: rewrites each event file in `dir` (atomically)
/// to keep only its file-version event and its events at steps up to `step`, and drops a torn
/// tail. The resumed run writes the later steps again, into a new file.
pub fn truncate_after(dir: &Path, step: u64) -> Result<()> {
    retain(dir, |s, _| s <= step)
}

/// For a resume from the final checkpoint at `step`, whose final evaluation runs again: drops
/// the events at `step` that hold only `eval/` and `test/` values.
pub fn drop_evaluation_at(dir: &Path, step: u64) -> Result<()> {
    retain(dir, |s, tags| {
        s != step || !tags.iter().all(|t| is_evaluation(t))
    })
}

/// Whether a metric comes from an evaluation (`eval/…`, `test/…`), not from training.
pub fn is_evaluation(tag: &str) -> bool {
    tag.starts_with("eval/") || tag.starts_with("test/")
}

/// Rewrites each event file in `dir` (atomically) to hold its file-version event and the events
/// for which `keep(step, tags)` holds, without a torn tail.
fn retain(dir: &Path, keep: impl Fn(u64, &[&str]) -> bool) -> Result<()> {
    // A rewrite interrupted before its rename leaves a temporary file: the original is intact.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.trim_start_matches('.').starts_with(FILE_PREFIX) && name.ends_with(".tmp") {
                std::fs::remove_file(&p).map_err(at(&p))?;
            }
        }
    }
    for file in event_files(dir)? {
        let bytes = std::fs::read(&file).map_err(at(&file))?;
        let records = records(&file, &bytes)
            .with_context(|| format!("cannot resume: {} is damaged", dir.display()))?;
        let kept: Vec<u8> = records
            .iter()
            .filter(|r| {
                let tags: Vec<&str> = r.event.values().iter().map(|v| v.tag.as_str()).collect();
                matches!(r.event.what, Some(event::What::FileVersion(_)))
                    || u64::try_from(r.event.step).is_ok_and(|s| keep(s, &tags))
            })
            .flat_map(|r| r.bytes.iter().copied())
            .collect();
        if kept.len() != bytes.len() {
            write_atomic(&file, &kept)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn crc32c_and_its_mask_match_known_values() {
        // The standard check value of CRC-32C (Castagnoli).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Masked by hand: rotate right by 15, add 0xa282ead8.
        let crc: u32 = 0xE306_9283;
        let rotated = crc.rotate_right(15);
        assert_eq!(rotated, 0x2507_C60D);
        assert_eq!(
            masked_crc(b"123456789"),
            0x2507_C60Du32.wrapping_add(0xa282_ead8)
        );
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn a_framed_record_is_length_crc_data_crc() {
        let data = b"123456789";
        let r = frame(data);
        assert_eq!(r.len(), 8 + 4 + 9 + 4);
        assert_eq!(&r[..8], &[9, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            &r[8..12],
            &masked_crc(&[9, 0, 0, 0, 0, 0, 0, 0]).to_le_bytes()
        );
        assert_eq!(&r[12..21], data);
        assert_eq!(&r[21..], &0xC78A_B0E5u32.to_le_bytes());
    }

    #[test]
    fn an_event_encodes_as_tensorflow_does() {
        // Event { wall_time: 1.0, step: 2, file_version: "brain.Event:2" }, encoded by hand.
        let e = Event {
            wall_time: 1.0,
            step: 2,
            what: Some(event::What::FileVersion(FILE_VERSION.into())),
        };
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0x02, 0x1a, 13]);
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(e.encode_to_vec(), want);
        // A scalar: Summary { value: [{ tag: "a", simple_value: 0.5 }] } at field 5.
        let e = Event {
            wall_time: 0.0,
            step: 0,
            what: Some(event::What::Summary(Summary {
                value: vec![summary::Value {
                    tag: "a".into(),
                    metadata: None,
                    value: Some(summary::Kind::SimpleValue(0.5)),
                }],
            })),
        };
        let mut value = vec![0x0a, 1, b'a', 0x15];
        value.extend_from_slice(&0.5f32.to_le_bytes());
        let mut want = vec![0x2a, value.len() as u8 + 2, 0x0a, value.len() as u8];
        want.extend_from_slice(&value);
        assert_eq!(e.encode_to_vec(), want);
    }

    #[test]
    fn scalars_and_text_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join("tb");
        let mut w = EventWriter::create(&tb).unwrap();
        assert!(w
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(FILE_PREFIX));
        w.text("recipe", 0, "```toml\nseed = 1\n```").unwrap();
        w.scalars(10, &scalars(&[("train/loss", 2.5), ("lr", 1e-3)]))
            .unwrap();
        w.scalars(
            20,
            &scalars(&[("train/loss", f64::NAN), ("eval/loss", 1.0 / 3.0)]),
        )
        .unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(event::What::FileVersion(FILE_VERSION.into()))
        );
        let s = read_scalars(&tb).unwrap();
        assert_eq!(s["train/loss"][0], (10, 2.5));
        assert_eq!(s["train/loss"][1].0, 20);
        assert!(s["train/loss"][1].1.is_nan());
        assert_eq!(s["lr"], vec![(10, f64::from(1e-3f32))]);
        assert_eq!(s["eval/loss"], vec![(20, f64::from((1.0f64 / 3.0) as f32))]);
        assert_eq!(s.len(), 3);
        let t = read_texts(&tb).unwrap();
        assert_eq!(t["recipe"], vec![(0, "```toml\nseed = 1\n```".to_string())]);
    }

    #[test]
    fn a_second_writer_in_the_same_second_makes_a_later_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path()).unwrap();
        a.scalars(1, &scalars(&[("x", 1.0)])).unwrap();
        let mut b = EventWriter::create(dir.path()).unwrap();
        b.scalars(2, &scalars(&[("x", 2.0)])).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(
            event_files(dir.path()).unwrap(),
            vec![a.path().to_path_buf(), b.path().to_path_buf()]
        );
        assert_eq!(
            read_scalars(dir.path()).unwrap()["x"],
            vec![(1, 1.0), (2, 2.0)]
        );
    }

    #[test]
    fn a_torn_tail_ends_the_file_and_a_flipped_byte_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &scalars(&[("x", 1.0)])).unwrap();
        let whole = std::fs::read(w.path()).unwrap();
        let first = frame(&read_events(w.path()).unwrap()[0].encode_to_vec()).len();
        w.scalars(2, &scalars(&[("x", 2.0)])).unwrap();
        let full = std::fs::read(w.path()).unwrap();
        // Every cut inside the last record reads as the records before it.
        for cut in whole.len()..full.len() {
            std::fs::write(w.path(), &full[..cut]).unwrap();
            let events = read_events(w.path()).unwrap();
            assert_eq!(events.len(), 2, "cut at {cut}");
        }
        // A flipped byte in the second record's data, then in its length.
        for (offset, what) in [(first + 14, "data's crc"), (first + 1, "length's crc")] {
            let mut bad = full.clone();
            bad[offset] ^= 0x10;
            std::fs::write(w.path(), &bad).unwrap();
            let e = read_events(w.path()).unwrap_err().to_string();
            assert!(
                e.contains(&w.path().display().to_string())
                    && e.contains(&format!("byte {first}"))
                    && e.contains(what),
                "{e}"
            );
        }
    }

    #[test]
    fn truncate_after_keeps_the_steps_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.text("recipe", 0, "r").unwrap();
        for step in 1..=6 {
            w.scalars(step, &scalars(&[("x", step as f64)])).unwrap();
        }
        // A torn tail after step 6, and a temporary file of an interrupted rewrite.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let torn = frame(b"torn");
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        std::fs::write(w.path(), &bytes).unwrap();
        let tmp = dir.path().join(format!("{FILE_PREFIX}1.tmp"));
        std::fs::write(&tmp, b"junk").unwrap();

        truncate_after(dir.path(), 4).unwrap();
        assert!(!tmp.exists());
        let events = read_events(w.path()).unwrap();
        assert_eq!(
            events[0].what,
            Some(event::What::FileVersion(FILE_VERSION.into()))
        );
        let x: Vec<(u64, f64)> = (1..=4).map(|s| (s, s as f64)).collect();
        assert_eq!(read_scalars(dir.path()).unwrap()["x"], x);
        assert_eq!(
            read_texts(dir.path()).unwrap()["recipe"],
            vec![(0, "r".into())]
        );
        // Nothing after the checkpoint: the file is left as it is.
        let before = std::fs::read(w.path()).unwrap();
        truncate_after(dir.path(), 4).unwrap();
        assert_eq!(std::fs::read(w.path()).unwrap(), before);
        // The resumed run's file continues the curve.
        let mut resumed = EventWriter::create(dir.path()).unwrap();
        resumed.scalars(5, &scalars(&[("x", 50.0)])).unwrap();
        let x = read_scalars(dir.path()).unwrap()["x"].clone();
        assert_eq!(
            x.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(x[4], (5, 50.0));
        // Step 0 keeps the recipe only.
        truncate_after(dir.path(), 0).unwrap();
        assert!(read_scalars(dir.path()).unwrap().is_empty());
        assert_eq!(read_texts(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_file_stops_a_resume_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &scalars(&[("x", 1.0)])).unwrap();
        let mut bytes = std::fs::read(w.path()).unwrap();
        bytes[3] ^= 1;
        std::fs::write(w.path(), &bytes).unwrap();
        let e = format!("{:#}", truncate_after(dir.path(), 1).unwrap_err());
        assert!(
            e.contains("cannot resume") && e.contains(&w.path().display().to_string()),
            "{e}"
        );
    }
}
