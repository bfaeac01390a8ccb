//! Device detection and measurement: what this machine can offer a job.

use candle_core::{Device, Tensor};
use std::time::Instant;
use swarm_sharding::{DeviceInfo, DeviceKind};

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// f32 matmul throughput of the CPU through candle, in TFLOP/s (a short measurement).
pub fn measure_cpu_tflops() -> f64 {
    let n = 384;
    let run = || -> candle_core::Result<f64> {
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        a.matmul(&b)?; // warm up
        let reps = 8;
        let t = Instant::now();
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        Ok(2.0 * (n * n * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e12)
    };
    run().unwrap_or(0.0)
}

/// NVIDIA GPUs the kernel driver knows about (names only; a CPU build does not load CUDA).
pub fn nvidia_gpus() -> Vec<DeviceInfo> {
    let Ok(dirs) = std::fs::read_dir("/proc/driver/nvidia/gpus") else { return Vec::new() };
    let mut names: Vec<String> = dirs
        .filter_map(|d| std::fs::read_to_string(d.ok()?.path().join("information")).ok())
        .filter_map(|info| {
            info.lines().find(|l| l.starts_with("Model:")).map(|l| l["Model:".len()..].trim().to_string())
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| DeviceInfo {
            kind: DeviceKind::Cuda,
            name,
            ordinal: i as u32,
            memory_bytes: 0,
            free_bytes: 0,
            measured_tflops: 0.0,
            cores: 0,
        })
        .collect()
}

/// CUDA devices: measured through CUDA in a `cuda` build, else only named from the driver's
/// /proc entries (a CPU build cannot use them).
fn cuda_devices() -> Vec<DeviceInfo> {
    #[cfg(feature = "cuda")]
    match crate::gpu::detect() {
        Ok(d) => return d,
        Err(e) => tracing::warn!("CUDA detection failed, listing GPUs by name only: {e:#}"),
    }
    nvidia_gpus()
}

/// Which device a worker trains on: `auto` (the first CUDA device in a `cuda` build, else the
/// CPU), `cpu`, `cuda` or `cuda:N`.
pub fn select(spec: &str) -> anyhow::Result<Device> {
    let cuda = |ordinal: usize| -> anyhow::Result<Device> {
        #[cfg(feature = "cuda")]
        {
            let n = crate::gpu::device_count()?;
            if ordinal >= n {
                anyhow::bail!("--device cuda:{ordinal}: this machine has {n} CUDA device(s)");
            }
            let device = Device::new_cuda(ordinal)?;
            if let Device::Cuda(d) = &device {
                crate::gpu::keep_freed_memory(d)?;
            }
            Ok(device)
        }
        #[cfg(not(feature = "cuda"))]
        {
            anyhow::bail!(
                "--device cuda:{ordinal}: this swarm was built without CUDA; rebuild with `cargo build --release --features cuda` (needs nvcc), or use --device cpu"
            )
        }
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        "auto" => {
            #[cfg(feature = "cuda")]
            if crate::gpu::device_count().unwrap_or(0) > 0 {
                return cuda(0);
            }
            Ok(Device::Cpu)
        }
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => anyhow::bail!("--device {s}: use auto, cpu, cuda or cuda:N"),
        },
    }
}

/// The `--device` of local worker `i` of a one-machine cluster when the machine has several
/// CUDA devices: GPU `i mod n` (on `auto` every worker would take GPU 0). `None` otherwise,
/// and when `SWARM_DEVICE` chooses for every worker.
pub fn local_worker_device(i: usize) -> Option<String> {
    if std::env::var_os("SWARM_DEVICE").is_some() {
        return None;
    }
    #[cfg(feature = "cuda")]
    if let Ok(n) = crate::gpu::device_count()
        && n > 1
    {
        return Some(format!("cuda:{}", i % n));
    }
    let _ = i;
    None
}

/// This machine's devices: the CPU (measured) and any CUDA GPUs.
pub fn detect() -> Vec<DeviceInfo> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut out = vec![DeviceInfo {
        kind: DeviceKind::Cpu,
        name: cpu_name(),
        ordinal: 0,
        memory_bytes: meminfo("MemTotal:"),
        free_bytes: meminfo("MemAvailable:"),
        measured_tflops: measure_cpu_tflops(),
        cores,
    }];
    out.extend(cuda_devices());
    out
}
