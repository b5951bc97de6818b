//! Choosing the Burn backend at run time, and the allocator the binaries use
//! ([`allocator`]).

pub mod allocator;

use std::str::FromStr;

use burn::tensor::Device;

/// The compute backends moecast can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// burn-flex, Burn's CPU backend (the default).
    #[default]
    Flex,
    /// burn-ndarray (deprecated upstream in favour of flex; kept for comparison; builds
    /// with the `ndarray` feature).
    #[cfg(feature = "ndarray")]
    Ndarray,
    /// burn-wgpu on the default GPU adapter (builds with the `wgpu` feature).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// burn-cuda (CubeCL) on NVIDIA GPU `index` (builds with the `cuda` feature).
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" | "cpu" => Ok(BackendKind::Flex),
            #[cfg(feature = "ndarray")]
            "ndarray" => Ok(BackendKind::Ndarray),
            #[cfg(not(feature = "ndarray"))]
            "ndarray" => Err("this build has no ndarray backend (deprecated upstream; flex is faster): \
                 rebuild with `cargo build --release --features ndarray`"
                .into()),
            #[cfg(feature = "wgpu")]
            "wgpu" => Ok(BackendKind::Wgpu),
            #[cfg(not(feature = "wgpu"))]
            "wgpu" => Err("this build has no GPU backend: rebuild with `cargo build --release --features wgpu` \
                 (needs a Vulkan, Metal or DX12 driver; Mesa's lavapipe works on CPU-only machines)"
                .into()),
            #[cfg(feature = "cuda")]
            "cuda" => Ok(BackendKind::Cuda(0)),
            #[cfg(feature = "cuda")]
            cuda if cuda.starts_with("cuda:") => cuda["cuda:".len()..]
                .parse()
                .map(BackendKind::Cuda)
                .map_err(|_| format!("device '{cuda}': expected cuda or cuda:N (N the GPU index)")),
            #[cfg(not(feature = "cuda"))]
            cuda if cuda == "cuda" || cuda.starts_with("cuda:") => Err(
                "this build has no CUDA backend: rebuild with `cargo build --release --features cuda` \
                 (needs an NVIDIA driver and NVRTC at run time; tools/gpu_check.sh does it all)"
                    .into(),
            ),
            other => Err(format!(
                "unknown device '{other}' (flex, ndarray, wgpu, cuda, cuda:N)"
            )),
        }
    }
}

impl BackendKind {
    /// The backend named by the environment variable `MOECAST_TEST_DEVICE` (flex when
    /// unset): how the test suites pick the backend they run on.
    pub fn from_test_env() -> Self {
        match std::env::var("MOECAST_TEST_DEVICE") {
            Ok(d) => d
                .parse()
                .unwrap_or_else(|e| panic!("MOECAST_TEST_DEVICE: {e}")),
            Err(_) => BackendKind::default(),
        }
    }

    /// Whether the backend computes on the CPU, with rayon's threads.
    pub fn is_cpu(self) -> bool {
        match self {
            BackendKind::Flex => true,
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The Burn device for this backend.
    #[allow(deprecated)]
    pub fn device(self) -> Device {
        match self {
            BackendKind::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda(index) => Device::cuda(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BackendKind;

    #[test]
    fn devices_are_parsed_and_unbuilt_ones_refused_naming_the_feature() {
        assert_eq!("flex".parse::<BackendKind>(), Ok(BackendKind::Flex));
        assert_eq!("cpu".parse::<BackendKind>(), Ok(BackendKind::Flex));
        #[cfg(not(feature = "cuda"))]
        for d in ["cuda", "cuda:1"] {
            let e = d.parse::<BackendKind>().unwrap_err();
            assert!(e.contains("--features cuda"), "{e}");
        }
        #[cfg(feature = "cuda")]
        {
            assert_eq!("cuda:1".parse::<BackendKind>(), Ok(BackendKind::Cuda(1)));
            assert!("cuda:x".parse::<BackendKind>().is_err());
        }
        let e = "tpu".parse::<BackendKind>().unwrap_err();
        assert!(e.contains("unknown device 'tpu'"), "{e}");
    }
}
