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

/// The largest absolute difference between two equally long lists.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
