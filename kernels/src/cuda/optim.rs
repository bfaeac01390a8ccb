//! The optimizer's CUDA kernels: one-kernel AdamW over device-resident f32 master weights and
//! moments (`DeviceAdamW`), and the gradient norm's sum of squares.

use super::{Float, func, grid_1d, output, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result};

use crate::error::KernelError;
// ------------------------------------------------------------------------------------ AdamW

/// AdamW state resident on a CUDA device: f32 master weights and both moments for a flat range
/// of parameters. One kernel per call reads the f32 gradients, updates the three buffers and
/// writes the parameters in the compute dtype (bf16 or f32) for the model to use.
pub struct DeviceAdamW {
    master: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    device: CudaDevice,
}

impl std::fmt::Debug for DeviceAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceAdamW({} params)", self.master.len())
    }
}

impl DeviceAdamW {
    /// Uploads master weights and moments (all the same length).
    pub fn new(device: &candle_core::Device, master: &[f32], m: &[f32], v: &[f32]) -> Result<Self> {
        let device = device.as_cuda_device()?.clone();
        if m.len() != master.len() || v.len() != master.len() {
            candle_core::bail!("DeviceAdamW: master {}, m {}, v {} elements differ", master.len(), m.len(), v.len());
        }
        let stream = device.cuda_stream();
        let up = |h: &[f32]| stream.clone_htod(h).w();
        Ok(Self { master: up(master)?, m: up(m)?, v: up(v)?, device })
    }

    pub fn len(&self) -> usize {
        self.master.len()
    }

    pub fn is_empty(&self) -> bool {
        self.master.is_empty()
    }

    /// One AdamW step (`step` 1-based) over `range` of the buffers. `grads` is f32 or bf16,
    /// flat, as long as the buffers; it is multiplied by `grad_scale` first (clipping). `out`, when given, is a
    /// flat f32 or bf16 tensor as long as the buffers whose `range` receives the new weights.
    pub fn step(
        &mut self,
        cfg: &crate::AdamW,
        step: u64,
        range: std::ops::Range<usize>,
        grad_scale: f32,
        grads: &candle_core::Tensor,
        out: Option<&candle_core::Tensor>,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let n = self.len();
        if range.end > n || range.start > range.end {
            candle_core::bail!("DeviceAdamW: range {range:?} outside {n} parameters");
        }
        if grads.dims() != [n] || !matches!(grads.dtype(), DType::F32 | DType::BF16) {
            candle_core::bail!(
                "DeviceAdamW: grads must be f32 or bf16 [{n}], got {:?} {:?}",
                grads.dtype(),
                grads.dims()
            );
        }
        if range.is_empty() {
            return Ok(());
        }
        let k = crate::adamw::Scalars::new(cfg, step);
        let (gs, gl) = grads.storage_and_layout();
        let candle_core::Storage::Cuda(gs) = &*gs else { candle_core::bail!("DeviceAdamW: grads are not on CUDA") };
        let bf16_grads = grads.dtype() == DType::BF16;
        let g_bf16 =
            if bf16_grads { Some(view::<half::bf16>(OP, "grads", (gs, gl))?.slice(range.clone())) } else { None };
        let g_f32 = if bf16_grads { None } else { Some(view::<f32>(OP, "grads", (gs, gl))?.slice(range.clone())) };
        let g_suffix = if bf16_grads { "_gbf16" } else { "" };
        let len = range.len() as i64;
        let null = 0u64;
        let out_guard = out.map(|o| o.storage_and_layout());
        let suffix = match out {
            Some(o) if o.dims() != [n] => candle_core::bail!("DeviceAdamW: out must be [{n}], got {:?}", o.dims()),
            Some(o) => match o.dtype() {
                DType::BF16 => "bf16",
                DType::F32 => "f32",
                dtype => return Err(KernelError::UnsupportedDType { op: OP, what: "out", dtype }.into()),
            },
            None => "f32",
        };
        let f = func(&self.device, &format!("adamw_{suffix}{g_suffix}"))?;
        let stream = self.device.cuda_stream();
        let mut p = self.master.slice_mut(range.clone());
        let mut m = self.m.slice_mut(range.clone());
        let mut v = self.v.slice_mut(range.clone());
        let mut b = stream.launch_builder(&f);
        b.arg(&mut p).arg(&mut m).arg(&mut v);
        if let Some(g) = &g_f32 {
            b.arg(g);
        }
        if let Some(g) = &g_bf16 {
            b.arg(g);
        }
        // `out` is written through a shared borrow: candle exposes no mutable storage of a
        // tensor, so this is the one place a kernel writes a tensor it does not own. The caller
        // owns `out` (a flat buffer no autograd graph holds), and every op runs on the device's
        // one stream, so nothing reads it concurrently.
        let out_bf16;
        let out_f32;
        match &out_guard {
            Some((s, l)) => {
                let candle_core::Storage::Cuda(s) = &**s else { candle_core::bail!("DeviceAdamW: out is not on CUDA") };
                if suffix == "bf16" {
                    out_bf16 = view::<half::bf16>(OP, "out", (s, l))?.slice(range.clone());
                    b.arg(&out_bf16);
                } else {
                    out_f32 = view::<f32>(OP, "out", (s, l))?.slice(range.clone());
                    b.arg(&out_f32);
                }
            }
            None => {
                b.arg(&null);
            }
        }
        b.arg(&len)
            .arg(&grad_scale)
            .arg(&k.decay)
            .arg(&k.one_minus_beta1)
            .arg(&k.beta2)
            .arg(&k.one_minus_beta2)
            .arg(&k.step_size)
            .arg(&k.bias_correction2_sqrt)
            .arg(&k.eps);
        // SAFETY: (p, m, v, g, out|0, n, gscale, decay, b1c, b2, b2c, lr_t, bc2, eps) as adamw_*;
        // every buffer is sliced to `range`, whose length is n.
        unsafe { b.launch(grid_1d(range.len(), 256)) }.w()?;
        Ok(())
    }

    /// The master weights, moments: copies to the host (for checkpoints).
    pub fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let s = self.device.cuda_stream();
        Ok((s.clone_dtoh(&self.master).w()?, s.clone_dtoh(&self.m).w()?, s.clone_dtoh(&self.v).w()?))
    }
}

/// `Σ x²` of a flat f32 or bf16 CUDA tensor, summed in f32 in a fixed order (1024 block
/// partials, then one block): the gradient norm without candle's single-block `sum_all`.
pub fn sum_squares(t: &candle_core::Tensor) -> Result<f64> {
    const OP: &str = "sum_squares";
    const BLOCKS: usize = 1024;
    if t.rank() != 1 {
        candle_core::bail!("{OP}: expects a flat tensor, got {:?}", t.dims());
    }
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*s else { candle_core::bail!("{OP}: the tensor is not on CUDA") };
    let dev = &s.device;
    let mut part = output::<f32>(dev, BLOCKS)?;
    let mut out = output::<f32>(dev, 1)?;
    let stream = dev.cuda_stream();
    dispatch!(OP, s, |T| {
        let x = view::<T>(OP, "x", (s, l))?;
        let n = x.len() as i64;
        let f = func(dev, &format!("sumsq_part_{}", T::SUFFIX))?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&mut part).arg(&n);
        let cfg = LaunchConfig { grid_dim: (BLOCKS as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (x, part, n) as sumsq_part_*; part holds one value per block.
        unsafe { b.launch(cfg) }.w()?;
        Ok::<(), candle_core::Error>(())
    })?;
    let f = func(dev, "sum_f32")?;
    let mut b = stream.launch_builder(&f);
    let parts = BLOCKS as i32;
    b.arg(&part).arg(&mut out).arg(&parts);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: (part, out, n) as sum_f32; out holds one value.
    unsafe { b.launch(cfg) }.w()?;
    Ok(f64::from(stream.clone_dtoh(&out).w()?[0]))
}
