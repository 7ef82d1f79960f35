//! Checkpoints of a hosted run. burn-train's checkpointer hands the model, optimizer and
//! scheduler records to [`AtomicRecorder`], which writes each to a temporary name, checks every
//! write, fsyncs, renames it into place and reports its length and CRC-32 to a [`WriteLog`].
//! The loop waits for the three, then writes `state-<step>.json` (step, data position, seed and
//! the three files' digests) and only then deletes checkpoints that fall out of
//! `checkpoint.keep`: a complete checkpoint exists at every instant, whatever `keep` is. On
//! resume the newest checkpoint whose files match their digests is used; damaged ones are
//! named and passed over.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use burn::record::{BinFileRecorder, FileRecorder, FullPrecisionSettings, Recorder, RecorderError};
use burn::tensor::backend::Backend;
use burn::train::checkpoint::{CheckpointingAction, CheckpointingStrategy};
use burn::train::metric::store::EventStoreClient;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The record files of one checkpoint, by the names burn-train's checkpointer gives them.
pub const RECORD_KINDS: [&str; 3] = ["model", "optim", "scheduler"];

/// Length and CRC-32 of a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub crc32: u32,
}

/// One record file the recorder finished: its final name, and its digest or why it failed.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub outcome: Result<FileDigest, String>,
}

/// Where [`AtomicRecorder`] reports each file it finishes (burn-train's checkpointer threads
/// write in the background; the loop waits here for a checkpoint's files).
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    shared: Arc<(Mutex<Vec<Written>>, Condvar)>,
}

impl WriteLog {
    fn push(&self, w: Written) {
        let (lock, cvar) = &*self.shared;
        lock.lock().expect("write log").push(w);
        cvar.notify_all();
    }

    /// Waits until the three record files of `step` are reported and returns their digests
    /// by file name, or the first failure.
    pub fn wait_for(&self, step: usize) -> Result<BTreeMap<String, FileDigest>, String> {
        let names: Vec<String> = RECORD_KINDS
            .iter()
            .map(|k| format!("{k}-{step}.{EXTENSION}"))
            .collect();
        let name_of = |w: &Written| w.path.file_name().map(|n| n.to_string_lossy().into_owned());
        let (lock, cvar) = &*self.shared;
        let mut done = lock.lock().expect("write log");
        loop {
            let mine = done
                .iter()
                .filter(|w| name_of(w).is_some_and(|n| names.contains(&n)))
                .count();
            if mine == names.len() {
                break;
            }
            done = cvar.wait(done).expect("write log");
        }
        let (mine, rest): (Vec<Written>, Vec<Written>) = done
            .drain(..)
            .partition(|w| name_of(w).is_some_and(|n| names.contains(&n)));
        *done = rest;
        let mut files = BTreeMap::new();
        for w in mine {
            match w.outcome {
                Ok(d) => {
                    files.insert(name_of(&w).unwrap_or_default(), d);
                }
                Err(why) => return Err(format!("{}: {why}", w.path.display())),
            }
        }
        Ok(files)
    }
}

/// Full-precision binary records (the encoding of burn's `BinFileRecorder`, which reads them
/// back), written to a temporary name with every write checked, fsynced, then renamed; each
/// finished file is reported to the [`WriteLog`].
#[derive(Debug, Default, Clone)]
pub struct AtomicRecorder {
    inner: BinFileRecorder<FullPrecisionSettings>,
    log: WriteLog,
}

impl AtomicRecorder {
    /// A recorder reporting to `log`.
    pub fn new(log: WriteLog) -> Self {
        Self {
            inner: BinFileRecorder::default(),
            log,
        }
    }
}

const EXTENSION: &str = "bin";

/// Environment variable read by fault-injection tests only: milliseconds to wait between a
/// record's complete temporary file and its rename, so that a kill can land in between.
pub const RENAME_DELAY_ENV: &str = "MEDR1_FAULT_RENAME_DELAY_MS";

/// Counts and checksums what passes through.
struct Digesting<W> {
    inner: W,
    bytes: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_record<I: Serialize>(item: &I, tmp: &Path) -> Result<FileDigest, String> {
    let file = fs::File::create(tmp).map_err(|e| e.to_string())?;
    let mut out = Digesting {
        inner: BufWriter::with_capacity(1 << 20, file),
        bytes: 0,
        crc: crc32fast::Hasher::new(),
    };
    bincode::serde::encode_into_std_write(item, &mut out, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    let digest = FileDigest {
        bytes: out.bytes,
        crc32: out.crc.clone().finalize(),
    };
    let file = out.inner.into_inner().map_err(|e| e.error().to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(digest)
}

/// Makes a rename or deletion in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl<B: Backend> Recorder<B> for AtomicRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let final_path = file.with_extension(EXTENSION);
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = final_path.with_file_name(format!(".tmp-{name}"));
        let outcome = write_record(&item, &tmp).and_then(|digest| {
            if let Some(ms) = std::env::var(RENAME_DELAY_ENV)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            fs::rename(&tmp, &final_path).map_err(|e| e.to_string())?;
            if let Some(dir) = final_path.parent() {
                sync_dir(dir);
            }
            Ok(digest)
        });
        if outcome.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let failed = outcome.as_ref().err().cloned();
        self.log.push(Written {
            path: final_path.clone(),
            outcome,
        });
        match failed {
            None => Ok(()),
            Some(why) => Err(RecorderError::Unknown(format!(
                "{}: {why}",
                final_path.display()
            ))),
        }
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        Recorder::<B>::load_item(&self.inner, file)
    }
}

impl<B: Backend> FileRecorder<B> for AtomicRecorder {
    fn file_extension() -> &'static str {
        EXTENSION
    }
}

/// burn-train's checkpointing strategy for a hosted run: save at every call, delete nothing
/// (the loop deletes old checkpoints itself, once the new one is complete).
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveOnly;

impl CheckpointingStrategy for SaveOnly {
    fn checkpointing(&mut self, _: usize, _: &EventStoreClient) -> Vec<CheckpointingAction> {
        vec![CheckpointingAction::Save]
    }
}

/// Which checkpoints to keep: the newest `keep`. The loop deletes what it names only once the
/// new checkpoint is complete (it is not burn-train's strategy: that would delete first).
pub struct KeepLast {
    keep: usize,
    saved: Vec<usize>,
}

impl KeepLast {
    /// `existing`: checkpoints already on disk (a resumed run keeps pruning them).
    pub fn new(keep: usize, mut existing: Vec<usize>) -> Self {
        existing.sort_unstable();
        Self {
            keep: keep.max(1),
            saved: existing,
        }
    }
}

impl KeepLast {
    /// Save `step`, delete what falls out of the newest `keep`.
    pub fn actions(&mut self, step: usize) -> Vec<CheckpointingAction> {
        let mut actions = vec![CheckpointingAction::Save];
        self.saved.retain(|&s| s != step);
        self.saved.push(step);
        while self.saved.len() > self.keep {
            actions.push(CheckpointingAction::Delete(self.saved.remove(0)));
        }
        actions
    }
}

/// What burn-train's records do not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed from the data plan.
    pub data_position: usize,
    /// The run's seed; rollout seeds derive from it and the rollout number.
    pub seed: u64,
    /// Data-parallel workers (devices): each rolls out its shard with its own seed, so a run
    /// continues the same only with as many. Absent in states written before: one.
    #[serde(default = "one_worker")]
    pub workers: usize,
}

fn one_worker() -> usize {
    1
}

/// The folder burn-train's checkpointer writes to under a run's training directory.
pub fn checkpoint_dir(train_dir: &Path) -> PathBuf {
    train_dir.join("checkpoint")
}

/// `state-<step>.json` of a run's training directory.
pub(super) fn state_path(train_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(train_dir).join(format!("state-{step}.json"))
}

/// `state-<step>.json`: the run state and the digests of the checkpoint's record files
/// (absent in checkpoints written before digests were recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    state: RunState,
    #[serde(default)]
    files: BTreeMap<String, FileDigest>,
}

/// Writes `state-<step>.json` atomically, with the digests of the record files it completes.
pub fn write_state(
    train_dir: &Path,
    state: &RunState,
    files: &BTreeMap<String, FileDigest>,
) -> std::io::Result<()> {
    let path = state_path(train_dir, state.step);
    let tmp = path.with_extension("json.tmp");
    let body = StateFile {
        state: *state,
        files: files.clone(),
    };
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&body)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Deletes the checkpoint of `step`: its state file first (so that it stops counting), then
/// its record files.
pub fn remove_checkpoint(train_dir: &Path, step: usize) -> std::io::Result<()> {
    let dir = checkpoint_dir(train_dir);
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    gone(fs::remove_file(state_path(train_dir, step)))?;
    for kind in RECORD_KINDS {
        gone(fs::remove_file(
            dir.join(format!("{kind}-{step}.{EXTENSION}")),
        ))?;
    }
    sync_dir(&dir);
    Ok(())
}

/// Removes what a killed run left half-written (`.tmp-*` records, `*.json.tmp` states).
pub fn remove_partial_writes(train_dir: &Path) {
    let Ok(entries) = fs::read_dir(checkpoint_dir(train_dir)) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") || name.ends_with(".json.tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Steps with a complete checkpoint (state, model, optimizer and scheduler files), ascending.
/// The files are not read: see [`resume_point`] for the check of their contents.
pub fn complete_checkpoints(train_dir: &Path) -> Vec<usize> {
    let dir = checkpoint_dir(train_dir);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut steps: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("state-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .filter(|&s| {
            RECORD_KINDS
                .iter()
                .all(|kind| dir.join(format!("{kind}-{s}.{EXTENSION}")).is_file())
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// Length and CRC-32 of a file as it is on disk.
fn digest_of(path: &Path) -> std::io::Result<FileDigest> {
    let mut f = fs::File::open(path)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        bytes,
        crc32: crc.finalize(),
    })
}

/// Why the checkpoint of `step` cannot be used, or its state when it can: the state file
/// must parse and name this step, and every record file must match its recorded digest (a
/// checkpoint from before digests were recorded needs non-empty files).
pub fn check_checkpoint(train_dir: &Path, step: usize) -> Result<RunState, String> {
    let path = state_path(train_dir, step);
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: StateFile = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a checkpoint state ({e})", path.display()))?;
    if file.state.step != step {
        return Err(format!("{} says step {}", path.display(), file.state.step));
    }
    let dir = checkpoint_dir(train_dir);
    for kind in RECORD_KINDS {
        let name = format!("{kind}-{step}.{EXTENSION}");
        let record = dir.join(&name);
        match file.files.get(&name) {
            Some(want) => {
                let got = digest_of(&record).map_err(|e| format!("{}: {e}", record.display()))?;
                if got.bytes != want.bytes {
                    return Err(format!(
                        "{} has {} bytes, {} were written",
                        record.display(),
                        got.bytes,
                        want.bytes
                    ));
                }
                if got.crc32 != want.crc32 {
                    return Err(format!(
                        "{} does not match its checksum (CRC-32 {:08x}, {:08x} was written)",
                        record.display(),
                        got.crc32,
                        want.crc32
                    ));
                }
            }
            None if file.files.is_empty() => {
                let len = fs::metadata(&record)
                    .map_err(|e| format!("{}: {e}", record.display()))?
                    .len();
                if len == 0 {
                    return Err(format!("{} is empty", record.display()));
                }
            }
            None => return Err(format!("{} lists no digest for {name}", path.display())),
        }
    }
    Ok(file.state)
}

/// Where a resumed run starts: the newest intact checkpoint, and the newer ones passed over
/// with the reason.
#[derive(Debug, Clone, Default)]
pub struct ResumePoint {
    pub state: Option<RunState>,
    pub damaged: Vec<(usize, String)>,
}

/// Checks the complete checkpoints newest first and stops at the first intact one.
pub fn resume_point(train_dir: &Path) -> ResumePoint {
    let mut point = ResumePoint::default();
    for step in complete_checkpoints(train_dir).into_iter().rev() {
        match check_checkpoint(train_dir, step) {
            Ok(state) => {
                point.state = Some(state);
                break;
            }
            Err(why) => point.damaged.push((step, why)),
        }
    }
    point
}

/// The state of the newest complete checkpoint (files not read).
pub fn latest_state(train_dir: &Path) -> Option<RunState> {
    let step = *complete_checkpoints(train_dir).last()?;
    let text = fs::read_to_string(state_path(train_dir, step)).ok()?;
    serde_json::from_str::<StateFile>(&text)
        .ok()
        .map(|f| f.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_last_deletes_the_oldest() {
        let mut k = KeepLast::new(2, vec![10]);
        assert_eq!(k.actions(20), vec![CheckpointingAction::Save]);
        assert_eq!(
            k.actions(30),
            vec![CheckpointingAction::Save, CheckpointingAction::Delete(10)]
        );
    }

    #[test]
    fn only_complete_checkpoints_count() {
        let dir = std::env::temp_dir().join(format!("medr1-store-{}", std::process::id()));
        let ck = checkpoint_dir(&dir);
        fs::create_dir_all(&ck).unwrap();
        for s in [4, 8] {
            write_state(
                &dir,
                &RunState {
                    step: s,
                    data_position: s * 2,
                    seed: 1,
                    workers: 1,
                },
                &BTreeMap::new(),
            )
            .unwrap();
            for kind in ["model", "optim"] {
                fs::write(ck.join(format!("{kind}-{s}.bin")), b"x").unwrap();
            }
        }
        fs::write(ck.join("scheduler-4.bin"), b"x").unwrap();
        assert_eq!(complete_checkpoints(&dir), vec![4]);
        assert_eq!(latest_state(&dir).unwrap().data_position, 8);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("medr1-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(checkpoint_dir(&dir)).unwrap();
        dir
    }

    type Cpu = burn::backend::Flex;

    /// Writes the three records of `step` through the recorder, then its state.
    fn checkpoint(dir: &Path, step: usize, log: &WriteLog) {
        let rec = AtomicRecorder::new(log.clone());
        for kind in RECORD_KINDS {
            let values: Vec<f32> = (0..64).map(|i| (i * step) as f32).collect();
            let path = checkpoint_dir(dir).join(format!("{kind}-{step}"));
            Recorder::<Cpu>::save_item(&rec, values, path).unwrap();
        }
        let files = log.wait_for(step).unwrap();
        assert_eq!(files.len(), 3);
        let state = RunState {
            step,
            data_position: step,
            seed: 3,
            workers: 2,
        };
        write_state(dir, &state, &files).unwrap();
    }

    #[test]
    fn records_read_back_with_burns_recorder_and_match_their_digests() {
        let dir = temp("roundtrip");
        let log = WriteLog::default();
        checkpoint(&dir, 2, &log);
        let mut path = checkpoint_dir(&dir).join("optim-2.bin");
        let back: Vec<f32> =
            Recorder::<Cpu>::load_item(&BinFileRecorder::<FullPrecisionSettings>::new(), &mut path)
                .unwrap();
        assert_eq!(back, (0..64).map(|i| (i * 2) as f32).collect::<Vec<_>>());
        assert_eq!(check_checkpoint(&dir, 2).unwrap().step, 2);
        let names: Vec<String> = fs::read_dir(checkpoint_dir(&dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_passes_over_truncated_and_altered_checkpoints() {
        let dir = temp("damaged");
        let log = WriteLog::default();
        for step in [2, 4, 6] {
            checkpoint(&dir, step, &log);
        }
        let ck = checkpoint_dir(&dir);
        // Step 6: cut short; step 4: one byte changed, same length.
        let model6 = ck.join("model-6.bin");
        let bytes = fs::read(&model6).unwrap();
        fs::write(&model6, &bytes[..bytes.len() / 2]).unwrap();
        let optim4 = ck.join("optim-4.bin");
        let mut bytes = fs::read(&optim4).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&optim4, &bytes).unwrap();
        let point = resume_point(&dir);
        assert_eq!(point.state.map(|s| s.step), Some(2));
        let steps: Vec<usize> = point.damaged.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![6, 4]);
        assert!(point.damaged[0].1.contains("bytes"), "{:?}", point.damaged);
        assert!(
            point.damaged[1].1.contains("checksum"),
            "{:?}",
            point.damaged
        );
        // A state file that is not JSON is damage too, not a panic.
        fs::write(state_path(&dir, 2), b"{").unwrap();
        let point = resume_point(&dir);
        assert_eq!(point.state, None);
        assert_eq!(point.damaged.len(), 3);
        remove_checkpoint(&dir, 6).unwrap();
        assert_eq!(complete_checkpoints(&dir), vec![2, 4]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_is_an_error_and_leaves_no_file() {
        let dir = temp("full");
        let ck = checkpoint_dir(&dir);
        // Writes through a link to /dev/full fail as on a full disk (ENOSPC).
        #[cfg(target_os = "linux")]
        {
            std::os::unix::fs::symlink("/dev/full", ck.join(".tmp-model-2.bin")).unwrap();
            let log = WriteLog::default();
            let rec = AtomicRecorder::new(log.clone());
            let values: Vec<f32> = vec![1.0; 1 << 20];
            let err = Recorder::<Cpu>::save_item(&rec, values, ck.join("model-2")).unwrap_err();
            assert!(err.to_string().contains("model-2.bin"), "{err}");
            assert!(!ck.join("model-2.bin").exists());
            assert!(fs::symlink_metadata(ck.join(".tmp-model-2.bin")).is_err());
            for kind in ["optim", "scheduler"] {
                let values: Vec<f32> = vec![1.0; 4];
                Recorder::<Cpu>::save_item(&rec, values, ck.join(format!("{kind}-2"))).unwrap();
            }
            let why = log.wait_for(2).unwrap_err();
            assert!(why.contains("model-2.bin"), "{why}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn partial_writes_are_cleared() {
        let dir = temp("partial");
        let ck = checkpoint_dir(&dir);
        fs::write(ck.join(".tmp-model-4.bin"), b"half").unwrap();
        fs::write(ck.join("state-4.json.tmp"), b"{").unwrap();
        fs::write(ck.join("model-2.bin"), b"kept").unwrap();
        remove_partial_writes(&dir);
        let names: Vec<String> = fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["model-2.bin".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
