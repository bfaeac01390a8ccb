//! What a worker has: its devices with their measured speed and memory.

use serde::{Deserialize, Serialize};

/// The kind of compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceKind> {
        match s {
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            "metal" => Some(DeviceKind::Metal),
            _ => None,
        }
    }
}

/// One device of a worker, as detected and measured by the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub name: String,
    pub ordinal: u32,
    pub memory_bytes: u64,
    pub free_bytes: u64,
    /// Measured matmul throughput (f32 on CPUs, bf16 on GPUs); 0 when not measured.
    pub measured_tflops: f64,
    pub cores: u32,
}
