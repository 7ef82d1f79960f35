//! Whether WGPU finds a graphics adapter, asked before any work. Without one, CubeCL panics on
//! a background thread with a long backtrace and no hint of the fix; this asks wgpu the same
//! question CubeCL's default device asks (the platform's graphics API, high-performance
//! preference, no forced fallback) and turns the answer into one plain sentence.

use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};

/// The adapter WGPU's default device would use (its name and driver), or why there is none
/// and how to get one.
pub fn wgpu_adapter() -> Result<String, String> {
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
    };
    match futures_lite::future::block_on(instance.request_adapter(&options)) {
        Ok(adapter) => {
            let info = adapter.get_info();
            Ok(format!(
                "{} ({:?}, {})",
                info.name, info.backend, info.driver
            ))
        }
        Err(e) => Err(format!(
            "--device wgpu: no {backend:?} graphics adapter was found ({e}). Install a driver: on \
             Debian/Ubuntu without a GPU, `apt-get install -y mesa-vulkan-drivers` (software \
             Vulkan); with a GPU, its vendor's Vulkan driver; macOS uses Metal, Windows DX12. \
             Or run on the CPU with --device flex"
        )),
    }
}
