//! Run-time backend choice. Each backend is compiled in only when its Cargo feature is on, so
//! generic code is monomorphised only for the backends a build enables.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// Pure-Rust CPU backend (feature `flex`, the default).
    Flex,
    /// WGPU: Vulkan, Metal or DX12 (feature `wgpu`).
    Wgpu,
    /// NVIDIA CUDA (feature `cuda`).
    Cuda,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        feature_name(self)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "flex" => Some(Self::Flex),
            "wgpu" => Some(Self::Wgpu),
            "cuda" => Some(Self::Cuda),
            _ => None,
        }
    }
}

/// Work that runs on whichever backend the user picked.
pub trait BackendTask {
    type Output;
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend `kind`, or says which feature the build lacks.
pub fn dispatch<T: BackendTask>(kind: DeviceKind, task: T) -> anyhow::Result<T::Output> {
    match kind {
        #[cfg(feature = "flex")]
        DeviceKind::Flex => Ok(task.run::<burn::backend::Flex>(Default::default())),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => Ok(task.run::<burn::backend::Wgpu>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(task.run::<burn::backend::Cuda>(Default::default())),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "this medr1 was built without the `{}` backend: rebuild with `--features {}`",
            feature_name(other),
            feature_name(other)
        ),
    }
}

/// [`dispatch`] with the float type: `bf16` runs CUDA's backend on bf16 tensors.
pub fn dispatch_dtype<T: BackendTask>(
    kind: DeviceKind,
    bf16: bool,
    task: T,
) -> anyhow::Result<T::Output> {
    if !bf16 {
        return dispatch(kind, task);
    }
    match kind {
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            Ok(task.run::<burn::backend::Cuda<burn::tensor::bf16>>(Default::default()))
        }
        _ => anyhow::bail!(
            "dtype = \"bf16\" needs the CUDA backend (device = \"cuda\", a `--features cuda` build)"
        ),
    }
}

fn feature_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Flex => "flex",
        DeviceKind::Wgpu => "wgpu",
        DeviceKind::Cuda => "cuda",
    }
}
