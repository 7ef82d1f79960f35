//! Errors of the model crate. Each names the file, tensor or field a user has to fix.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Qwen2VLError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: field `{field}`: {message}")]
    Config {
        file: String,
        field: String,
        message: String,
    },
    #[error("checkpoint {dir}: {message}")]
    Checkpoint { dir: PathBuf, message: String },
    #[error("checkpoint tensor `{key}`: expected shape {expected:?}, found {found:?} in {file}")]
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },
    #[error("checkpoint {dir}: tensor `{key}` (shape {expected:?}) is missing")]
    MissingTensor {
        dir: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    #[error("invalid model input: {0}")]
    Input(String),
    /// Bad LoRA settings (the message names the `lora.*` key).
    #[error("LoRA: {0}")]
    Lora(String),
}

impl Qwen2VLError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
