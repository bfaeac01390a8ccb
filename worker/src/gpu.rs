//! CUDA devices (feature `cuda`): detection with measured speed and memory, and the checks
//! `swarm doctor` runs. Everything here returns errors; nothing panics when a device is absent.

use anyhow::{Context, anyhow};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use swarm_sharding::{DeviceInfo, DeviceKind};

/// Number of CUDA devices the driver reports.
pub fn device_count() -> anyhow::Result<usize> {
    let n =
        cudarc::driver::CudaContext::device_count().map_err(|e| anyhow!("the CUDA driver did not answer: {e:?}"))?;
    Ok(n.max(0) as usize)
}

/// bf16 matmul throughput of `device` in TFLOP/s (n³ products, timed after a warm-up).
pub fn measure_bf16_tflops(device: &Device, n: usize, iters: usize) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    for _ in 0..3 {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    let t = Instant::now();
    let mut keep = Vec::with_capacity(iters);
    for _ in 0..iters {
        keep.push(a.matmul(&b)?);
    }
    device.synchronize()?;
    Ok(2.0 * (n as f64).powi(3) * iters as f64 / t.elapsed().as_secs_f64() / 1e12)
}

/// Every CUDA device: name, memory, and measured bf16 matmul TFLOP/s.
pub fn detect() -> anyhow::Result<Vec<DeviceInfo>> {
    let mut out = Vec::new();
    for i in 0..device_count()? {
        let ctx = cudarc::driver::CudaContext::new(i).map_err(|e| anyhow!("opening CUDA device {i}: {e:?}"))?;
        let name = ctx.name().map_err(|e| anyhow!("{e:?}"))?;
        let (free, total) = ctx.mem_get_info().map_err(|e| anyhow!("{e:?}"))?;
        let device = Device::new_cuda(i).with_context(|| format!("candle on CUDA device {i}"))?;
        let tflops = measure_bf16_tflops(&device, 2048, 10).unwrap_or(0.0);
        let cores = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(0);
        out.push(DeviceInfo {
            kind: DeviceKind::Cuda,
            name,
            ordinal: i as u32,
            memory_bytes: total as u64,
            free_bytes: free as u64,
            measured_tflops: tflops,
            cores: cores.max(0) as u32,
        });
    }
    Ok(out)
}

/// One rank's NCCL all-reduce on `ordinal`: checks that NCCL loads and computes.
pub fn nccl_self_check(ordinal: usize) -> anyhow::Result<String> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| anyhow!("opening CUDA device {ordinal}: {e:?}"))?;
    let stream = ctx.default_stream();
    let version = cudarc::nccl::result::get_nccl_version().map_err(|e| anyhow!("ncclGetVersion: {:?}", e.0))?;
    let id = cudarc::nccl::Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {:?}", e.0))?;
    let comm =
        cudarc::nccl::Comm::from_rank(stream.clone(), 0, 1, id).map_err(|e| anyhow!("ncclCommInitRank: {:?}", e.0))?;
    let vals: Vec<f32> = (0..4096).map(|i| (i % 7) as f32 + 0.5).collect();
    let send = stream.clone_htod(&vals).map_err(|e| anyhow!("{e:?}"))?;
    let mut recv = stream.alloc_zeros::<f32>(vals.len()).map_err(|e| anyhow!("{e:?}"))?;
    comm.all_reduce(&send, &mut recv, &cudarc::nccl::ReduceOp::Sum).map_err(|e| anyhow!("ncclAllReduce: {:?}", e.0))?;
    let back = stream.clone_dtoh(&recv).map_err(|e| anyhow!("{e:?}"))?;
    if back != vals {
        anyhow::bail!("a 1-rank NCCL all-reduce returned wrong values");
    }
    Ok(format!("NCCL {}.{}.{}", version / 10000, (version / 100) % 100, version % 100))
}
