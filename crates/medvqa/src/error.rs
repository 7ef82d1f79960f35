//! Data errors name the file, the record and the field to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: record {index}: {message}")]
    Record {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}
