//! `swarm bench kernels`: time of each fused kernel, its achieved bandwidth against a measured
//! device-to-device copy, and the peak memory of the fused LM-head cross-entropy against the
//! unfused path.

use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::time::Instant;
use swarm_kernels as k;

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// `auto` (a GPU when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Timed repetitions per kernel (the median of batches is reported).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// Work sizes divided by this (CPU runs use 16 unless set).
    #[arg(long)]
    pub shrink: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

struct Row {
    name: String,
    shape: String,
    ms: f64,
    bytes: f64,
    flops: f64,
}

/// Median seconds of `f` per call, timed in batches with the device synchronised around each.
fn time<T>(dev: &Device, reps: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    for _ in 0..3 {
        drop(f()?);
    }
    dev.synchronize()?;
    let per_batch = 5.max(reps / 5);
    let mut samples = Vec::new();
    for _ in 0..reps.div_ceil(per_batch).max(3) {
        let t = Instant::now();
        for _ in 0..per_batch {
            drop(f()?);
        }
        dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() / per_batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn randn(shape: &[usize], dtype: DType, dev: &Device) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)?)
}

pub fn run(a: BenchKernelsArgs) -> anyhow::Result<()> {
    let dev = swarm_worker::device::select(&a.device)?;
    let shrink = a.shrink.unwrap_or(if dev.is_cpu() { 16 } else { 1 }).max(1);
    let bf = DType::BF16;
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |name: &str, shape: String, s: f64, bytes: f64, flops: f64| {
        rows.push(Row { name: name.to_string(), shape, ms: s * 1e3, bytes, flops });
    };

    // Device-to-device copy: the bandwidth ceiling (bytes read + bytes written).
    let n = (256 << 20) / shrink;
    let x = randn(&[n], DType::F32, &dev)?;
    let s = time(&dev, a.reps, || Ok(x.copy()?))?;
    #[allow(unused_mut)]
    let mut copy_gbs = 8.0 * n as f64 / s / 1e9;
    push("copy f32 (candle)", format!("[{n}]"), s, 8.0 * n as f64, 0.0);
    // On a GPU the ceiling is the driver's device-to-device copy, faster than candle's kernel.
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        copy_gbs = swarm_worker::gpu::copy_bandwidth(&dev, 4 * n, a.reps)?;
        push("copy (cuMemcpyDtoD)", format!("[{n}] f32"), 8.0 * n as f64 / copy_gbs / 1e9, 8.0 * n as f64, 0.0);
    }
    drop(x);

    // RMSNorm forward, bf16, Llama-3.2-1B's hidden size.
    let (r, d) = (131_072 / shrink, 2048);
    let x = randn(&[r, d], bf, &dev)?;
    let w = randn(&[d], bf, &dev)?;
    let s = time(&dev, a.reps, || Ok(k::rms_norm(&x, &w, 1e-5)?))?;
    push("rms_norm fwd bf16", format!("[{r}, {d}]"), s, (4 * r * d + 2 * d) as f64, 0.0);
    let s = time(&dev, a.reps, || Ok(k::reference::rms_norm(&x, &w, 1e-5)?))?;
    push("rms_norm fwd bf16 (unfused)", format!("[{r}, {d}]"), s, (4 * r * d + 2 * d) as f64, 0.0);

    // SwiGLU forward at the MLP width.
    let (r, i) = (32768 / shrink, 8192);
    let g = randn(&[r, i], bf, &dev)?;
    let u = randn(&[r, i], bf, &dev)?;
    let s = time(&dev, a.reps, || Ok(k::swiglu(&g, &u)?))?;
    push("swiglu fwd bf16", format!("[{r}, {i}]"), s, (6 * r * i) as f64, 0.0);
    drop((g, u));

    // RoPE on queries [b, h, s, d].
    let (b, h, sq, hd) = (16, 32, 2048 / shrink.min(16), 64);
    let q = randn(&[b, h, sq, hd], bf, &dev)?;
    let ang = Tensor::rand(0f32, 6.0, (sq, hd / 2), &dev)?;
    let (cos, sin) = (ang.cos()?.to_dtype(bf)?, ang.sin()?.to_dtype(bf)?);
    let s = time(&dev, a.reps, || Ok(k::rope(&q, &cos, &sin)?))?;
    push("rope fwd bf16", format!("[{b}, {h}, {sq}, {hd}]"), s, (4 * b * h * sq * hd) as f64, 0.0);
    drop(q);

    // Cross-entropy forward over a Llama-3 vocabulary.
    let (r, v) = (4096 / shrink, 128_256);
    let logits = randn(&[r, v], bf, &dev)?;
    let t = Tensor::arange(0u32, r as u32, &dev)?;
    let s = time(&dev, a.reps, || Ok(k::cross_entropy(&logits, &t)?))?;
    push("cross_entropy fwd bf16", format!("[{r}, {v}]"), s, (2 * r * v) as f64, 0.0);
    drop(logits);

    // AdamW over f32 master weights and moments with a bf16 parameter copy: 30 bytes/param.
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let n = (256 << 20) / shrink;
        let zeros = vec![0f32; n];
        let p: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
        let mut adam = k::DeviceAdamW::new(&dev, &p, &zeros, &zeros)?;
        let grads = randn(&[n], DType::F32, &dev)?;
        let out = Tensor::zeros(n, bf, &dev)?;
        let cfg = k::AdamW::default();
        let mut step = 0;
        let s = time(&dev, a.reps, || {
            step += 1;
            Ok(adam.step(&cfg, step, 0..n, 1.0, &grads, Some(&out))?)
        })?;
        push("adamw f32+bf16 copy", format!("[{n}]"), s, 30.0 * n as f64, 0.0);
    }
    if dev.is_cpu() {
        let n = (256 << 20) / shrink;
        let mut p: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
        let (mut m, mut vv) = (vec![0f32; n], vec![0f32; n]);
        let g: Vec<f32> = (0..n).map(|i| ((i % 777) as f32 - 388.0) * 1e-4).collect();
        let cfg = k::AdamW::default();
        let mut step = 0;
        let s = time(&dev, a.reps, || {
            step += 1;
            k::adamw_step(&cfg, step, &mut p, &g, &mut m, &mut vv);
            Ok(())
        })?;
        push("adamw f32", format!("[{n}]"), s, 28.0 * n as f64, 0.0);
    }

    let memory = ce_memory(&dev, shrink)?;
    print(&a, &dev, copy_gbs, &rows, memory)
}

/// Shape, fused and unfused peak bytes, fused and unfused seconds.
type CeMemory = (String, f64, f64, f64, f64);

/// Peak memory of the fused chunked LM-head cross-entropy and of the unfused path (logits
/// materialised, then the fused cross-entropy), forward and backward, above what the inputs
/// take. `None` where the device has no allocation high-water mark (CPU).
fn ce_memory(dev: &Device, shrink: usize) -> anyhow::Result<Option<CeMemory>> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let (n, h, v) = (8192 / shrink, 2048, 128_256);
        let peak = swarm_worker::gpu::PoolPeak::new(dev)?;
        let x = candle_core::Var::from_tensor(&randn(&[n, h], DType::BF16, dev)?)?;
        let w = candle_core::Var::from_tensor(&(randn(&[v, h], DType::BF16, dev)? * 0.02)?.to_dtype(DType::BF16)?)?;
        let t = Tensor::arange(0u32, n as u32, dev)?;
        let measure = |fused: bool| -> anyhow::Result<(f64, f64)> {
            dev.synchronize()?;
            let base = peak.used()?;
            peak.reset()?;
            let t0 = Instant::now();
            let loss = if fused {
                k::linear_cross_entropy(x.as_tensor(), w.as_tensor(), &t, k::chunk_rows(v, DType::BF16))?
            } else {
                k::cross_entropy(&x.as_tensor().matmul(&w.as_tensor().t()?)?, &t)?
            };
            let grads = loss.backward()?;
            dev.synchronize()?;
            let secs = t0.elapsed().as_secs_f64();
            let top = peak.peak()?;
            drop(grads);
            Ok(((top.saturating_sub(base)) as f64, secs))
        };
        measure(true)?; // warm-up: kernels load, the pool grows
        measure(false)?;
        let (fused, fused_s) = measure(true)?;
        let (unfused, unfused_s) = measure(false)?;
        return Ok(Some((format!("[{n}, {h}] x [{v}, {h}]"), fused, unfused, fused_s, unfused_s)));
    }
    let _ = (dev, shrink);
    Ok(None)
}

fn print(
    a: &BenchKernelsArgs,
    dev: &Device,
    copy_gbs: f64,
    rows: &[Row],
    memory: Option<CeMemory>,
) -> anyhow::Result<()> {
    let device = format!("{dev:?}");
    if a.json {
        let kernels: Vec<_> = rows
            .iter()
            .map(|r| {
                let gbs = r.bytes / (r.ms / 1e3) / 1e9;
                serde_json::json!({"kernel": r.name, "shape": r.shape, "ms": r.ms, "gb_per_s": gbs,
                    "fraction_of_copy": gbs / copy_gbs, "tflops": r.flops / (r.ms / 1e3) / 1e12})
            })
            .collect();
        let mem = memory.map(|(shape, f, u, fs, us)| {
            serde_json::json!({"shape": shape, "fused_peak_bytes": f, "unfused_peak_bytes": u,
                "ratio": f / u, "fused_s": fs, "unfused_s": us})
        });
        println!(
            "{}",
            serde_json::json!({"device": device, "copy_gb_per_s": copy_gbs, "kernels": kernels, "lm_head_cross_entropy": mem})
        );
        return Ok(());
    }
    println!("device {device}; device-to-device copy {copy_gbs:.0} GB/s (read + write)");
    println!("{:<30} | {:<22} | {:>9} | {:>9} | {:>7}", "kernel", "shape", "ms", "GB/s", "of copy");
    println!("{:-<30}-+-{:-<22}-+-{:->9}-+-{:->9}-+-{:->7}", "", "", "", "", "");
    for r in rows {
        let gbs = r.bytes / (r.ms / 1e3) / 1e9;
        println!("{:<30} | {:<22} | {:>9.3} | {:>9.0} | {:>6.0}%", r.name, r.shape, r.ms, gbs, 100.0 * gbs / copy_gbs);
    }
    match memory {
        Some((shape, f, u, fs, us)) => println!(
            "LM head + cross-entropy {shape}, forward + backward: fused peak {:.2} GiB ({:.0} ms), unfused {:.2} GiB ({:.0} ms): fused uses {:.0}%",
            f / (1u64 << 30) as f64,
            fs * 1e3,
            u / (1u64 << 30) as f64,
            us * 1e3,
            100.0 * f / u
        ),
        None => println!("LM head + cross-entropy peak memory: measured on CUDA devices only"),
    }
    Ok(())
}
