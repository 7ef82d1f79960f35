//! Shared by the integration tests.

use std::path::PathBuf;

pub type Flex = burn::backend::Flex;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl-tiny-seed0")
}

#[cfg(feature = "wgpu")]
#[path = "../../src/wgpu_probe.rs"]
mod wgpu_probe;

/// WGPU's default device, after checking that it has an adapter: without one the test fails
/// with one line naming the driver to install, instead of CubeCL's panic on a background
/// thread.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    if let Err(why) = wgpu_probe::wgpu_adapter() {
        panic!("{why}");
    }
    Default::default()
}
