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
        DeviceKind::Wgpu => {
            crate::wgpu_probe::wgpu_adapter().map_err(anyhow::Error::msg)?;
            Ok(task.run::<burn::backend::Wgpu>(Default::default()))
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            check_cuda_driver()?;
            Ok(task.run::<burn::backend::Cuda>(Default::default()))
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "this medr1 was built without the `{}` backend: rebuild with `--features {}`",
            feature_name(other),
            feature_name(other)
        ),
    }
}

/// [`dispatch`] with the float type. `bf16` runs CUDA's backend on bf16 tensors, or the Flex
/// CPU backend with bf16 as its device's default float type (slow: for checking bf16 numerics
/// on a machine without a GPU). WGPU has no bf16 arithmetic.
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
            check_cuda_driver()?;
            Ok(task.run::<burn::backend::Cuda<burn::tensor::bf16>>(Default::default()))
        }
        #[cfg(feature = "flex")]
        DeviceKind::Flex => {
            use burn::tensor::{FloatDType, IntDType};
            let device = Default::default();
            // Must come before the device's first tensor; only one setting per process.
            burn::tensor::set_default_dtypes::<burn::backend::Flex>(
                &device,
                FloatDType::BF16,
                IntDType::I32,
            )
            .map_err(|e| anyhow::anyhow!("cannot switch the CPU backend to bf16: {e:?}"))?;
            Ok(task.run::<burn::backend::Flex>(device))
        }
        _ => anyhow::bail!(
            "bf16 runs on device cuda (a `--features cuda` build) or flex (the CPU, slowly); \
             WGPU has no bf16 arithmetic"
        ),
    }
}

/// Fails with a plain message when the NVIDIA driver library cannot be loaded (CubeCL would
/// panic on a background thread instead).
#[cfg(feature = "cuda")]
fn check_cuda_driver() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let found = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
            let name = std::ffi::CString::new(*name).expect("no NUL in a library name");
            // SAFETY: a valid C string; the handle, when there is one, is closed at once.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
            if handle.is_null() {
                return false;
            }
            unsafe { libc::dlclose(handle) };
            true
        });
        if !found {
            anyhow::bail!(
                "--device cuda: the NVIDIA driver library (libcuda.so.1) was not found. Install \
                 the NVIDIA driver or add its directory to LD_LIBRARY_PATH; without a GPU, use \
                 --device flex (or wgpu)"
            );
        }
    }
    Ok(())
}

fn feature_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Flex => "flex",
        DeviceKind::Wgpu => "wgpu",
        DeviceKind::Cuda => "cuda",
    }
}

/// One entry of `devices` (`--devices`): `cuda:N`; `wgpu:N` (discrete GPU N),
/// `wgpu:integrated:N`, `wgpu:cpu`, `wgpu:default`; `flex` (the CPU: listing it twice runs two
/// workers on it). Its backend and Burn's id for it.
pub fn parse_device(spec: &str) -> Result<(DeviceKind, burn::tensor::backend::DeviceId), String> {
    use burn::tensor::backend::DeviceId;
    let bad = || {
        format!(
            "devices: {spec:?} is not a device (cuda:N, wgpu:N, wgpu:integrated:N, wgpu:cpu, \
             wgpu:default, flex)"
        )
    };
    let index = |s: &str| s.parse::<u16>().map_err(|_| bad());
    let parts: Vec<&str> = spec.trim().split(':').collect();
    Ok(match parts.as_slice() {
        ["flex"] | ["flex", "0"] => (DeviceKind::Flex, DeviceId::new(0, 0)),
        ["cuda"] => (DeviceKind::Cuda, DeviceId::new(0, 0)),
        ["cuda", n] => (DeviceKind::Cuda, DeviceId::new(0, index(n)?)),
        ["wgpu"] | ["wgpu", "default"] => (DeviceKind::Wgpu, DeviceId::new(4, 0)),
        ["wgpu", "cpu"] => (DeviceKind::Wgpu, DeviceId::new(3, 0)),
        ["wgpu", "integrated", n] => (DeviceKind::Wgpu, DeviceId::new(1, index(n)?)),
        ["wgpu", n] => (DeviceKind::Wgpu, DeviceId::new(0, index(n)?)),
        _ => return Err(bad()),
    })
}

/// The devices of `specs` on backend `B` (validated by [`parse_device`] when the config was
/// read).
pub fn devices_of<B: burn::tensor::backend::Backend>(specs: &[String]) -> Vec<B::Device> {
    use burn::tensor::backend::Device as _;
    specs
        .iter()
        .map(|s| B::Device::from_id(parse_device(s).expect("validated").1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_to_burn_ids() {
        let id = |s: &str| parse_device(s).map(|(k, d)| (k, d.type_id, d.index_id));
        assert_eq!(id("cuda:1"), Ok((DeviceKind::Cuda, 0, 1)));
        assert_eq!(id("wgpu:cpu"), Ok((DeviceKind::Wgpu, 3, 0)));
        assert_eq!(id("wgpu:integrated:2"), Ok((DeviceKind::Wgpu, 1, 2)));
        assert_eq!(id("wgpu:0"), Ok((DeviceKind::Wgpu, 0, 0)));
        assert_eq!(id("flex"), Ok((DeviceKind::Flex, 0, 0)));
        for bad in ["cuda:x", "tpu:0", "flex:1", "cuda:0:1", ""] {
            assert!(id(bad).unwrap_err().contains("is not a device"), "{bad}");
        }
    }
}
