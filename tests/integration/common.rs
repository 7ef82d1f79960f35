//! Shared by the integration tests.

use std::path::PathBuf;

pub type Flex = burn::backend::Flex;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl-tiny-seed0")
}
