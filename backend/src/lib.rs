//! Choosing the Burn backend at run time.

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
            other => Err(format!("unknown device '{other}' (flex, ndarray, wgpu)")),
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

    /// The Burn device for this backend.
    #[allow(deprecated)]
    pub fn device(self) -> Device {
        match self {
            BackendKind::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        }
    }
}
