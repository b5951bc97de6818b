//! Choosing the Burn backend at run time.

use std::str::FromStr;

use burn::tensor::Device;

/// The compute backends moecast can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// burn-flex, Burn's CPU backend (the default).
    #[default]
    Flex,
    /// burn-ndarray (deprecated upstream in favour of flex; kept for comparison).
    Ndarray,
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" | "cpu" => Ok(BackendKind::Flex),
            "ndarray" => Ok(BackendKind::Ndarray),
            "wgpu" => {
                Err("this build has no wgpu backend yet; use --device flex or ndarray".into())
            }
            other => Err(format!("unknown device '{other}' (flex, ndarray)")),
        }
    }
}

impl BackendKind {
    /// The Burn device for this backend.
    #[allow(deprecated)]
    pub fn device(self) -> Device {
        match self {
            BackendKind::Flex => Device::flex(),
            BackendKind::Ndarray => Device::ndarray(),
        }
    }
}
