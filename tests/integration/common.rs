//! Shared by the integration tests.

use std::path::PathBuf;

pub type Flex = burn::backend::Flex;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl-tiny-seed0")
}

/// The tiny Qwen2.5-VL fixture (`tests/fixtures/make_qwen25vl_fixture.py`).
pub fn qwen25vl_fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen25vl-tiny-seed0")
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

/// A fresh directory under the system's temp dir, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`Scratch`] `medr1-{group}-{pid}-{name}`, emptied first.
pub fn scratch(group: &str, name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("medr1-{group}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}
