//! TensorBoard event files, written directly: each record is a TFRecord frame (length,
//! masked CRC-32C of the length, an `Event` protocol buffer, masked CRC-32C of the data) and
//! the `Event`s are encoded here field by field (`tensorflow/core/util/event.proto`,
//! `summary.proto`, `tensor.proto`). Only what a run writes: scalars, text (the text plugin's
//! string tensors) and the session restart a resumed run announces so that TensorBoard drops
//! the points a crashed run logged past the checkpoint it resumes from.
//!
//! Why not a crate: `tensorboard-rs` (last release 2022, "not active" by its README) pulls in a
//! generated protobuf tree and image codecs; `syntaxdot-summary` writes scalars only. The
//! format is small and stable; a test reads the records back, CRCs included.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crc::{Crc, CRC_32_ISCSI};

const CASTAGNOLI: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CASTAGNOLI.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event file under a log directory (TensorBoard's "run").
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), named as TensorBoard expects
    /// (`events.out.tfevents.<seconds>.<host>`), opening with the file-version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let secs = now();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "medr1".into());
        // A second writer in the same second gets its own file.
        let mut n = 0;
        let path = loop {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}{suffix}",
                secs as u64
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = Self { file, path };
        let mut event = event_head(secs, 0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step, one `Summary.Value` each.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, tag.as_bytes());
            // simple_value = 2, a float (wire type 5).
            key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        self.summary(step, &summary)
    }

    /// A text (markdown) at `step` under `tag`, as the text plugin reads it: a string tensor
    /// with the plugin named in the value's metadata.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> std::io::Result<()> {
        let mut tensor = Vec::new();
        // dtype = 1: DT_STRING (7); tensor_shape = 2: a scalar (no dims); string_val = 8.
        key(&mut tensor, 1, 0);
        varint(&mut tensor, 7);
        field_bytes(&mut tensor, 2, &[]);
        field_bytes(&mut tensor, 8, text.as_bytes());
        let mut plugin = Vec::new();
        field_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        field_bytes(&mut metadata, 1, &plugin);
        let mut value = Vec::new();
        field_bytes(&mut value, 1, tag.as_bytes());
        field_bytes(&mut value, 9, &metadata);
        field_bytes(&mut value, 8, &tensor);
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, &value);
        self.summary(step, &summary)
    }

    /// A `SessionLog` START at `step`: TensorBoard then purges the points of earlier files at
    /// or after `step` (what a run that crashed after its last checkpoint had logged).
    pub fn restart(&mut self, step: u64) -> std::io::Result<()> {
        let mut session = Vec::new();
        key(&mut session, 1, 0);
        varint(&mut session, 1);
        let mut event = event_head(now(), step);
        field_bytes(&mut event, 7, &session);
        self.record(&event)
    }

    fn summary(&mut self, step: u64, summary: &[u8]) -> std::io::Result<()> {
        let mut event = event_head(now(), step);
        field_bytes(&mut event, 5, summary);
        self.record(&event)
    }

    /// One TFRecord frame, flushed.
    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&frame)?;
        self.file.flush()
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `wall_time = 1` (a double) and `step = 2` of an `Event`.
fn event_head(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step);
    e
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

/// A length-delimited field (strings, bytes, nested messages).
fn field_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The records of an event file, their frames checked: the `Event` bytes of each.
pub fn read_records(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("a record cut short"))?;
        let len_bytes = &head[..8];
        let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err(bad("a record length's CRC does not match"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("a record cut short"))?;
        let tail = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("a record cut short"))?;
        if u32::from_le_bytes(tail.try_into().expect("4 bytes")) != masked_crc(data) {
            return Err(bad("a record's CRC does not match"));
        }
        out.push(data.to_vec());
        at += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value ("123456789" -> 0xE3069283) and TFRecord's mask of it,
    /// worked by hand: 0xE3069283 rotated right by 15 is 0x2507C60D, plus 0xA282EAD8.
    #[test]
    fn castagnoli_and_its_mask() {
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varints_by_hand() {
        let mut v = Vec::new();
        varint(&mut v, 1);
        varint(&mut v, 300);
        assert_eq!(v, [0x01, 0xAC, 0x02]);
    }

    #[test]
    fn records_read_back_with_their_fields() {
        let dir = std::env::temp_dir().join(format!("medr1-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(3, &[("train/loss", 0.5)]).unwrap();
        w.text(3, "completions", "| a | b |").unwrap();
        w.restart(2).unwrap();
        let records = read_records(w.path()).unwrap();
        assert_eq!(records.len(), 4);
        let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(contains(&records[0], b"brain.Event:2"));
        // step = 2 holds 3; the scalar's tag and its float.
        assert!(contains(&records[1], &[0x10, 3]));
        assert!(contains(&records[1], b"train/loss"));
        assert!(contains(&records[1], &0.5f32.to_le_bytes()));
        assert!(contains(&records[2], b"text") && contains(&records[2], b"| a | b |"));
        // session_log = 7 holding status START (field 1 = 1).
        assert!(
            records[3].ends_with(&[0x3A, 2, 0x08, 1]),
            "{:?}",
            records[3]
        );
        // A flipped byte is caught.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_records(w.path()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
