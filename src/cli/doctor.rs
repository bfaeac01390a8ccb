//! `swarm doctor`: what this machine can do for a swarm, in plain words, with the fix for
//! whatever is missing. Never panics when a library or device is absent.

use clap::Args;

#[derive(Args)]
pub struct DoctorArgs {
    #[arg(long)]
    pub json: bool,
}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: String,
}

fn check(name: &'static str, r: anyhow::Result<String>, fix: &str) -> Check {
    match r {
        Ok(detail) => Check { name, ok: true, detail, fix: String::new() },
        Err(e) => Check { name, ok: false, detail: format!("{e:#}"), fix: fix.to_string() },
    }
}

fn cpu_check() -> anyhow::Result<String> {
    let d = swarm_worker::device::detect().into_iter().next().ok_or_else(|| anyhow::anyhow!("no CPU found"))?;
    Ok(format!(
        "{} ({} cores, {:.1} GiB, {:.3} TFLOP/s f32)",
        d.name,
        d.cores,
        d.memory_bytes as f64 / (1u64 << 30) as f64,
        d.measured_tflops
    ))
}

/// RMSNorm forward and backward on `device` against the fused CPU kernel on the same inputs
/// (on the CPU itself: the fused kernel against its unfused reference).
fn kernel_check(device: &candle_core::Device) -> anyhow::Result<String> {
    use candle_core::{Device, Tensor, Var};
    let cpu = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64, 384), &cpu)?;
    let w = Tensor::randn(1f32, 0.1, 384, &cpu)?;
    let r = Tensor::randn(0f32, 1.0, (64, 384), &cpu)?;
    // (output, input gradient) of `op` computed on `dev`, brought back to the CPU.
    let run = |dev: &Device, fused: bool| -> anyhow::Result<(Tensor, Tensor)> {
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let wd = w.to_device(dev)?;
        let y = if fused {
            swarm_kernels::rms_norm(xv.as_tensor(), &wd, 1e-5)?
        } else {
            swarm_kernels::reference::rms_norm(xv.as_tensor(), &wd, 1e-5)?
        };
        let g = (&y * r.to_device(dev)?)?.sum_all()?.backward()?;
        let gx = g.get(xv.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient reached rms_norm's input"))?;
        Ok((y.to_device(&cpu)?, gx.to_device(&cpu)?))
    };
    let rel = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
        let num = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        Ok(num / den.max(f32::MIN_POSITIVE))
    };
    let (want_y, want_g) = run(&cpu, !device.is_cpu())?;
    let (y, g) = run(device, true)?;
    let (fwd, bwd) = (rel(&y, &want_y)?, rel(&g, &want_g)?);
    let against = if device.is_cpu() { "its unfused reference" } else { "the fused CPU kernel" };
    if !(fwd < 1e-4 && bwd < 1e-3) {
        anyhow::bail!("rms_norm differs from {against}: forward {fwd:.1e}, backward {bwd:.1e}");
    }
    Ok(format!("rms_norm forward {fwd:.1e}, backward {bwd:.1e} relative to {against}"))
}

pub async fn run(a: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = vec![
        check("cpu", cpu_check(), "none"),
        check("kernels on cpu", kernel_check(&candle_core::Device::Cpu), "a bug: please report it with this output"),
    ];
    gpu_checks(&mut checks);
    if a.json {
        let v: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for c in &checks {
            println!("{} {:<16} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
            if !c.ok {
                println!("     {:<16} fix: {}", "", c.fix);
            }
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_checks(checks: &mut Vec<Check>) {
    let gpus = swarm_worker::device::nvidia_gpus();
    if gpus.is_empty() {
        checks.push(Check {
            name: "gpu",
            ok: true,
            detail: "no NVIDIA GPU found; this machine trains on its CPU".into(),
            fix: String::new(),
        });
    } else {
        let names: Vec<_> = gpus.iter().map(|g| g.name.as_str()).collect();
        checks.push(Check {
            name: "gpu",
            ok: false,
            detail: format!(
                "{} NVIDIA GPU(s) ({}) but this swarm was built without CUDA",
                gpus.len(),
                names.join(", ")
            ),
            fix:
                "rebuild with `cargo build --release --features cuda` (needs nvcc and the CUDA libraries at build time)"
                    .into(),
        });
    }
}

#[cfg(feature = "cuda")]
fn gpu_checks(checks: &mut Vec<Check>) {
    use swarm_worker::gpu;
    let count = gpu::device_count();
    let n = *count.as_ref().unwrap_or(&0);
    checks.push(check(
        "cuda driver",
        count.map(|n| format!("{n} CUDA device(s)")),
        "install the NVIDIA driver (nvidia-smi must work) and check that libcuda.so.1 is on the library path",
    ));
    if n == 0 {
        return;
    }
    checks.push(check(
        "cuda devices",
        gpu::detect().map(|ds| {
            ds.iter()
                .map(|d| {
                    format!(
                        "cuda:{} {} {:.1} GiB, {:.0} TFLOP/s bf16",
                        d.ordinal,
                        d.name,
                        d.memory_bytes as f64 / (1u64 << 30) as f64,
                        d.measured_tflops
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }),
        "check `nvidia-smi`; another process may hold the GPU",
    ));
    let device = candle_core::Device::new_cuda(0).map_err(anyhow::Error::from);
    checks.push(check(
        "kernels on cuda",
        device.and_then(|d| kernel_check(&d)),
        "the CUDA libraries (cublas, nvrtc) may be missing or too old for this driver",
    ));
    checks.push(check(
        "nccl",
        gpu::nccl_self_check(0),
        "install NCCL (libnccl.so.2) or put it on LD_LIBRARY_PATH; without it, GPU workers use the TCP ring",
    ));
}
