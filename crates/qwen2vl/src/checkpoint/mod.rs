//! Checkpoint directories as published on the hub: `config.json` plus `model.safetensors` or
//! sharded `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.

mod adapter;
mod export;
mod files;
mod source;

pub use adapter::{
    load_adapter, read_adapter_config, save_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
pub(crate) use export::host_f32;
pub use export::{named_tensors, save_model, SaveDtype};
pub use files::{CheckpointFiles, KeyLayout, StoredTensor};
pub use source::CheckpointSource;

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::config::Qwen2VLConfig;
use crate::error::Qwen2VLError;
use crate::model::Qwen2VL;

/// What was found on disk while loading.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    pub files: Vec<String>,
    pub layout: KeyLayout,
    /// Storage dtypes found, with tensor counts (e.g. `BF16: 729`).
    pub dtypes: Vec<(String, usize)>,
    pub tensors: usize,
    /// Keys present in the files that the model did not use.
    pub unused: Vec<String>,
}

/// Loads `config.json` and the weights of a checkpoint directory onto `device`, converting
/// bf16/f16/f32 on disk to the backend's float type.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Qwen2VL<B>, CheckpointInfo), Qwen2VLError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Qwen2VLError::Checkpoint {
            dir: dir.to_path_buf(),
            message: "no config.json: expected a Qwen2-VL checkpoint directory as published (config.json + *.safetensors)".into(),
        });
    }
    let config = Qwen2VLConfig::from_file(&config_path)?;
    load_model_with_config(dir, &config, device)
}

/// As [`load_model`], with a config given by the caller (e.g. a flat hub config stored apart).
pub fn load_model_with_config<B: Backend>(
    dir: &Path,
    config: &Qwen2VLConfig,
    device: &B::Device,
) -> Result<(Qwen2VL<B>, CheckpointInfo), Qwen2VLError> {
    let files = CheckpointFiles::open(dir)?;
    load_from_files(files, config, device)
}

/// Loads from explicitly chosen safetensors files (all of them together hold the weights).
pub fn load_from_files<B: Backend>(
    files: CheckpointFiles,
    config: &Qwen2VLConfig,
    device: &B::Device,
) -> Result<(Qwen2VL<B>, CheckpointInfo), Qwen2VLError> {
    let mut src = CheckpointSource::new(files, device.clone(), config.tie_word_embeddings);
    let model = Qwen2VL::load_from(&mut src, config)?;
    let info = src.info();
    Ok((model, info))
}
