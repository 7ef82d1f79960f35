//! Checkpoints of a hosted run: burn-train's checkpointer writes the model, optimizer and
//! scheduler records through [`AtomicRecorder`] (temp file + rename, so a file either exists
//! whole or not at all); after them a `state-<step>.json` records the step, the data position
//! and the sampling seed. A checkpoint counts only when all four files exist.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::record::{BinFileRecorder, FileRecorder, FullPrecisionSettings, Recorder, RecorderError};
use burn::tensor::backend::Backend;
use burn::train::checkpoint::{CheckpointingAction, CheckpointingStrategy};
use burn::train::metric::store::EventStoreClient;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Full-precision binary records, written to a temporary name, flushed, then renamed.
#[derive(Debug, Default, Clone)]
pub struct AtomicRecorder {
    inner: BinFileRecorder<FullPrecisionSettings>,
}

const EXTENSION: &str = "bin";

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
        let tmp_base = final_path.with_file_name(format!(".tmp-{name}"));
        Recorder::<B>::save_item(&self.inner, item, tmp_base.clone())?;
        let tmp = tmp_base.with_extension(EXTENSION);
        let io = |e: std::io::Error| RecorderError::Unknown(format!("{}: {e}", tmp.display()));
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        fs::rename(&tmp, &final_path).map_err(io)
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

/// Save at every call, keep the newest `keep` checkpoints.
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

impl CheckpointingStrategy for KeepLast {
    fn checkpointing(&mut self, step: usize, _: &EventStoreClient) -> Vec<CheckpointingAction> {
        self.actions(step)
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
}

/// The folder burn-train's checkpointer writes to under a run's training directory.
pub fn checkpoint_dir(train_dir: &Path) -> PathBuf {
    train_dir.join("checkpoint")
}

/// `state-<step>.json` of a run's training directory.
pub(super) fn state_path(train_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(train_dir).join(format!("state-{step}.json"))
}

/// Writes `state-<step>.json` atomically.
pub fn write_state(train_dir: &Path, state: &RunState) -> std::io::Result<()> {
    let path = state_path(train_dir, state.step);
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)
}

/// Steps with a complete checkpoint (state, model, optimizer and scheduler files), ascending.
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
            ["model", "optim", "scheduler"]
                .iter()
                .all(|kind| dir.join(format!("{kind}-{s}.{EXTENSION}")).is_file())
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// The state of the newest complete checkpoint.
pub fn latest_state(train_dir: &Path) -> Option<RunState> {
    let step = *complete_checkpoints(train_dir).last()?;
    let text = fs::read_to_string(state_path(train_dir, step)).ok()?;
    serde_json::from_str(&text).ok()
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
                },
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
}
