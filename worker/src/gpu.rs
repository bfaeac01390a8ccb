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

/// Makes the device's stream-ordered memory pool (what candle allocates from, through
/// `cuMemAllocAsync`) keep freed memory for reuse. Its default release threshold is 0: at every
/// synchronisation (a training step has several) the pool hands all free memory back to the
/// driver, and the next step's allocations map it again. PyTorch's caching allocator keeps it;
/// so do we. Devices without memory pools are left as they are.
pub fn keep_freed_memory(device: &candle_core::cuda_backend::CudaDevice) -> anyhow::Result<()> {
    use cudarc::driver::{result, sys};
    let ctx = device.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
    let mut threshold = u64::MAX;
    // SAFETY: the device comes from a live context; the release threshold attribute is a u64.
    #[allow(unsafe_code)]
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(|e| anyhow!("cuDeviceGetDefaultMemPool: {e:?}"))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| anyhow!("cuMemPoolSetAttribute(release threshold): {e:?}"))?;
    }
    Ok(())
}

/// Hands the memory the device's pool keeps back to the driver when dropped (a training run's
/// end, error paths included), so a long-lived worker does not hold a finished job's peak.
pub struct TrimPoolOnDrop(pub Device);

impl Drop for TrimPoolOnDrop {
    fn drop(&mut self) {
        if let Device::Cuda(d) = &self.0 {
            let ctx = d.cuda_stream().context().clone();
            if !ctx.has_async_alloc() || d.cuda_stream().synchronize().is_err() || ctx.bind_to_thread().is_err() {
                return;
            }
            // SAFETY: the device comes from a live context; trimming only releases unused memory.
            #[allow(unsafe_code)]
            unsafe {
                if let Ok(pool) = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) {
                    let _ = cudarc::driver::result::mem_pool::trim_to(pool, 0);
                }
            }
        }
    }
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

/// The high-water mark of device memory in use by stream-ordered allocations (the pool every
/// candle/cudarc allocation on `device` comes from): the true peak, not a sample.
pub struct PoolPeak {
    pool: cudarc::driver::sys::CUmemoryPool,
    /// Keeps the context (and so the pool handle) alive and current.
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

// The FFI calls below read and reset two attributes of the device's default memory pool; the
// pool handle stays valid while the context lives (held in `PoolPeak`).
#[allow(unsafe_code)]
impl PoolPeak {
    pub fn new(device: &Device) -> anyhow::Result<PoolPeak> {
        use cudarc::driver::sys;
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: pool is a valid out-pointer; cu_device is this context's device.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("cuDeviceGetDefaultMemPool: {r:?}");
        }
        Ok(PoolPeak { pool, ctx })
    }

    /// Bytes currently allocated from the pool.
    pub fn used(&self) -> anyhow::Result<u64> {
        self.get(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes allocated at once since the last [`PoolPeak::reset`].
    pub fn peak(&self) -> anyhow::Result<u64> {
        self.get(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    pub fn reset(&self) -> anyhow::Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut zero: u64 = 0;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: USED_MEM_HIGH takes a cuuint64_t; resetting it to 0 is the documented use.
        let r = unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, (&mut zero as *mut u64).cast()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("cuMemPoolSetAttribute: {r:?}");
        }
        Ok(())
    }

    fn get(&self, attr: cudarc::driver::sys::CUmemPool_attribute) -> anyhow::Result<u64> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut v: u64 = 0;
        // SAFETY: both attributes read take a cuuint64_t out-pointer.
        let r = unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut v as *mut u64).cast()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("cuMemPoolGetAttribute: {r:?}");
        }
        Ok(v)
    }
}

/// Device-to-device copy bandwidth of `device` in GB/s, counting bytes read plus bytes written
/// (`cuMemcpyDtoDAsync` of `bytes`, median of `reps` after a warm-up). The ceiling that
/// memory-bound kernels are measured against.
pub fn copy_bandwidth(device: &Device, bytes: usize, reps: usize) -> anyhow::Result<f64> {
    let stream = device.as_cuda_device()?.cuda_stream();
    let n = bytes / 4;
    let host: Vec<f32> = (0..n).map(|i| (i % 9973) as f32 * 0.5 - 1.0).collect();
    let src = stream.clone_htod(&host).map_err(|e| anyhow!("{e:?}"))?;
    let mut dst = stream.alloc_zeros::<f32>(n).map_err(|e| anyhow!("{e:?}"))?;
    let mut times = Vec::new();
    for i in 0..reps + 3 {
        stream.synchronize().map_err(|e| anyhow!("{e:?}"))?;
        let t = Instant::now();
        stream.memcpy_dtod(&src, &mut dst).map_err(|e| anyhow!("{e:?}"))?;
        stream.synchronize().map_err(|e| anyhow!("{e:?}"))?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * 4) as f64 / times[times.len() / 2] / 1e9)
}
