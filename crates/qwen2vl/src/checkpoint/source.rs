//! A [`ParamSource`] reading a checkpoint: checks shapes, converts dtypes, records what was used.

use std::collections::BTreeSet;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::files::CheckpointFiles;
use super::CheckpointInfo;
use crate::error::Qwen2VLError;
use crate::params::{ParamKind, ParamSource};

pub struct CheckpointSource<B: Backend> {
    files: CheckpointFiles,
    device: B::Device,
    used: BTreeSet<String>,
    tied: bool,
}

impl<B: Backend> CheckpointSource<B> {
    pub fn new(files: CheckpointFiles, device: B::Device, tied: bool) -> Self {
        Self {
            files,
            device,
            used: BTreeSet::new(),
            tied,
        }
    }

    /// What was found, with the keys no parameter asked for. A stored `lm_head.weight` next to
    /// tied embeddings is expected (transformers writes it in the runtime layout) and not listed.
    pub fn info(&self) -> CheckpointInfo {
        let unused = self
            .files
            .index
            .keys()
            .filter(|k| !(self.used.contains(*k) || self.tied && k.as_str() == "lm_head.weight"))
            .cloned()
            .collect();
        CheckpointInfo {
            files: self
                .files
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            layout: self.files.layout,
            dtypes: self.files.dtype_counts(),
            tensors: self.files.index.len(),
            unused,
        }
    }
}

impl<B: Backend> ParamSource<B> for CheckpointSource<B> {
    fn take(
        &mut self,
        key: &str,
        shape: &[usize],
        _kind: ParamKind,
    ) -> Result<Tensor<B, 1>, Qwen2VLError> {
        let Some(stored) = self.files.index.get(key) else {
            return Err(Qwen2VLError::MissingTensor {
                dir: self.files.dir.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
            });
        };
        if stored.shape != shape {
            return Err(Qwen2VLError::Shape {
                key: stored.key.clone(),
                expected: shape.to_vec(),
                found: stored.shape.clone(),
                file: self.files.paths[stored.file].clone(),
            });
        }
        let values = self.files.read_f32(stored)?;
        self.used.insert(key.to_string());
        let n = values.len();
        Ok(Tensor::from_data(
            TensorData::new(values, [n]),
            &self.device,
        ))
    }

    fn device(&self) -> &B::Device {
        &self.device
    }
}
