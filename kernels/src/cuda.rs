//! CUDA implementations of the fused ops (feature `cuda`): the kernels in `cuda/ops.cu`,
//! compiled once per process by NVRTC and loaded once per device, launched on candle's stream.
//!
//! Every function takes contiguous inputs (the public ops make them so) in f32 or bf16 and
//! returns a fresh output; the math is f32 whatever the storage dtype. Launch shapes follow the
//! comment above each kernel in `ops.cu`. Reductions sum in an order fixed by the input shape
//! alone, so results are deterministic run to run.

// Kernel launches are `unsafe` in cudarc: the arguments must match the kernel's parameter list.
// Each launch below passes exactly the parameters of the `ops.cu` entry point it names, with
// buffers sized from the same shapes the kernel indexes.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::OnceLock;

use crate::error::KernelError;

const SRC: &str = include_str!("cuda/ops.cu");
const MODULE: &str = "swarm_kernels_ops";

/// The PTX of `ops.cu`, compiled by NVRTC the first time a kernel is needed.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let opts = nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
        nvrtc::compile_ptx_with_opts(SRC, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    });
    compiled.as_deref().map_err(|e| {
        candle_core::Error::Msg(format!(
            "NVRTC could not compile swarm-kernels' CUDA source ({e}); is libnvrtc from CUDA 12.x/13.x loadable?"
        ))
    })
}

/// Compiles (once) and loads (once per device) `ops.cu`, and returns its entry point `name`.
pub(crate) fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, ptx()?)?.into_cuda_function())
}

/// A storage dtype the kernels take, with the suffix of its entry points.
pub(crate) trait Float: CudaDType + DeviceRepr + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Runs `$body` with `$t` bound to the Rust type of `$storage`'s dtype (f32 or bf16).
macro_rules! dispatch {
    ($op:expr, $storage:expr, |$t:ident| $body:expr) => {
        match $storage.dtype() {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dtype => Err(crate::error::KernelError::UnsupportedDType { op: $op, what: "input", dtype }.into()),
        }
    };
}

// Declared after `dispatch!` so the module can use it.
mod inplace;
mod optim;
pub(crate) use inplace::{add_into, add_matmul_tn, add_rows_into, scale_by};
pub use optim::{DeviceAdamW, sum_squares};

/// The contiguous elements of `(s, l)` as a view.
pub(crate) fn view<'a, T: Float>(
    op: &'static str,
    what: &'static str,
    (s, l): (&'a CudaStorage, &Layout),
) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| KernelError::Layout {
        op,
        what,
        detail: format!("strides {:?} are not contiguous", l.stride()),
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// An output buffer of `n` elements that the launched kernel writes completely.
pub(crate) fn output<T: Float>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before anything reads.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

pub(crate) fn wrap<T: Float>(out: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> (CudaStorage, Shape) {
    (CudaStorage::wrap_cuda_slice(out, dev.clone()), shape)
}

/// Threads per block for a kernel that walks rows of `d` elements (16-byte vectors where it can).
pub(crate) fn row_threads(d: usize) -> u32 {
    (d.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

pub(crate) fn grid_1d(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(threads as usize).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn per_row(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (row_threads(d), 1, 1), shared_mem_bytes: 0 }
}

fn i32_of(op: &'static str, what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KernelError::Shape { op, what, got: vec![v], expected: format!("at most {} on CUDA", i32::MAX) }.into()
    })
}

/// Rows and row length of a contiguous `[..., d]` layout.
fn rows_of(l: &Layout) -> (usize, usize) {
    let d = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / d.max(1), d)
}

// ------------------------------------------------------------------------------------ RMSNorm

pub(crate) fn rms_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rms_norm";
    let dev = &x.0.device;
    let (rows, d) = rows_of(x.1);
    dispatch!(OP, x.0, |T| {
        let (xv, wv) = (view::<T>(OP, "x", x)?, view::<T>(OP, "weight", w)?);
        let mut y = output::<T>(dev, rows * d)?;
        let di = i32_of(OP, "d", d)?;
        let stream = dev.cuda_stream();
        // A warp per row with the row in registers when d is 32 lanes x 1, 2, 4 or 8 vectors
        // and the buffers are 16-byte aligned; else a block per row.
        let per_lane = d / (32 * 16 / std::mem::size_of::<T>());
        let aligned = (x.1.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16)
            && (w.1.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16);
        if aligned && d % (32 * 16 / std::mem::size_of::<T>()) == 0 && matches!(per_lane, 1 | 2 | 4 | 8) {
            let f = func(dev, &format!("rms_norm_fwd_warp{per_lane}_{}", T::SUFFIX))?;
            let ri = i32_of(OP, "rows", rows)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&mut y).arg(&ri).arg(&di).arg(&eps);
            // SAFETY: (x, w, y, rows, d, eps) as rms_norm_fwd_warpN_*; 8 rows per 256-thread block;
            // d = 32 * N * (16 / sizeof T) and 16-byte aligned rows, checked above.
            unsafe { b.launch(grid_1d(rows * 32, 256)) }.w()?;
        } else {
            let f = func(dev, &format!("rms_norm_fwd_{}", T::SUFFIX))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&mut y).arg(&di).arg(&eps);
            // SAFETY: (x, w, y, d, eps) as rms_norm_fwd_*; x and y hold rows * d elements, w d.
            unsafe { b.launch(per_row(rows, d)) }.w()?;
        }
        Ok(wrap(y, dev, x.1.shape().clone()))
    })
}

/// Row blocks of the RMSNorm backward: fixed by the row count only, so `dw` sums in the same
/// order on every device.
const RMS_BWD_BLOCKS: usize = 256;

/// Largest row length the backward takes (its `dw` partials live in 48 KiB of shared memory).
pub(crate) const RMS_BWD_MAX_D: usize = 12 * 1024;

pub(crate) fn rms_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    eps: f32,
    want_x: bool,
    want_w: bool,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rms_norm";
    let dev = &x.0.device;
    let (rows, d) = rows_of(x.1);
    dispatch!(OP, x.0, |T| {
        let (xv, wv, gv) = (view::<T>(OP, "x", x)?, view::<T>(OP, "weight", w)?, view::<T>(OP, "grad", g)?);
        let dx_len = if want_x { rows * d } else { 0 };
        let total = dx_len + if want_w { d } else { 0 };
        let mut out = output::<T>(dev, total)?;
        let blocks = rows.clamp(1, RMS_BWD_BLOCKS);
        let mut part = if want_w { Some(output::<f32>(dev, blocks * d)?) } else { None };
        let (ri, di) = (i32_of(OP, "rows", rows)?, i32_of(OP, "d", d)?);
        let null = 0u64;
        {
            let f = func(dev, &format!("rms_norm_bwd_{}", T::SUFFIX))?;
            let mut dx_view = out.slice_mut(0..dx_len.max(1));
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&gv);
            if want_x {
                b.arg(&mut dx_view);
            } else {
                b.arg(&null);
            }
            match part.as_mut() {
                Some(p) => b.arg(p),
                None => b.arg(&null),
            };
            b.arg(&ri).arg(&di).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (row_threads(d).min(256), 1, 1),
                shared_mem_bytes: if want_w { (d * 4) as u32 } else { 0 },
            };
            // SAFETY: (x, w, g, dx|0, dw_part|0, rows, d, eps) as rms_norm_bwd_*; dx holds rows * d,
            // dw_part blocks * d f32; shared memory d * 4 bytes <= 48 KiB (RMS_BWD_MAX_D).
            unsafe { b.launch(cfg) }.w()?;
        }
        if let Some(p) = &part {
            let f = func(dev, &format!("sum_partials_{}", T::SUFFIX))?;
            let mut dw = out.slice_mut(dx_len..dx_len + d);
            let bi = blocks as i32;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(p).arg(&mut dw).arg(&bi).arg(&di);
            // SAFETY: (part, out, parts, d) as sum_partials_*; part holds blocks * d, out d.
            unsafe { b.launch(grid_1d(d, 256)) }.w()?;
        }
        Ok(wrap(out, dev, Shape::from(total)))
    })
}

// ------------------------------------------------------------------------------------ RoPE

pub(crate) fn rope(
    x: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
    sign: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rope";
    let dev = &x.0.device;
    let (rows, d) = rows_of(x.1);
    let dims = x.1.dims();
    let seq = dims[dims.len() - 2];
    dispatch!(OP, x.0, |T| {
        let (xv, cv, sv) = (view::<T>(OP, "x", x)?, view::<T>(OP, "cos", cos)?, view::<T>(OP, "sin", sin)?);
        let mut y = output::<T>(dev, rows * d)?;
        let f = func(dev, &format!("rope_{}", T::SUFFIX))?;
        let (rl, si, di) = (rows as i64, i32_of(OP, "seq", seq)?, i32_of(OP, "d", d)?);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&cv).arg(&sv).arg(&mut y).arg(&rl).arg(&si).arg(&di).arg(&sign);
        // SAFETY: (x, cos, sin, y, rows, seq, d, sign) as rope_*; x, y rows * d; cos, sin seq * d/2.
        unsafe { b.launch(grid_1d(rows * d / 2, 256)) }.w()?;
        Ok(wrap(y, dev, x.1.shape().clone()))
    })
}

// ------------------------------------------------------------------------------------ SwiGLU

pub(crate) fn swiglu_fwd(gate: (&CudaStorage, &Layout), up: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "swiglu";
    let dev = &gate.0.device;
    let n = gate.1.shape().elem_count();
    dispatch!(OP, gate.0, |T| {
        let (a, u) = (view::<T>(OP, "gate", gate)?, view::<T>(OP, "up", up)?);
        let mut y = output::<T>(dev, n)?;
        let f = func(dev, &format!("swiglu_fwd_{}", T::SUFFIX))?;
        let nl = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&a).arg(&u).arg(&mut y).arg(&nl);
        // SAFETY: (gate, up, y, n) as swiglu_fwd_*; all hold n elements.
        unsafe { b.launch(grid_1d(n, 256)) }.w()?;
        Ok(wrap(y, dev, gate.1.shape().clone()))
    })
}

pub(crate) fn swiglu_bwd(
    gate: (&CudaStorage, &Layout),
    up: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "swiglu";
    let dev = &gate.0.device;
    let n = gate.1.shape().elem_count();
    dispatch!(OP, gate.0, |T| {
        let (a, u, gv) = (view::<T>(OP, "gate", gate)?, view::<T>(OP, "up", up)?, view::<T>(OP, "grad", g)?);
        let mut out = output::<T>(dev, 2 * n)?;
        let f = func(dev, &format!("swiglu_bwd_{}", T::SUFFIX))?;
        let nl = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&a).arg(&u).arg(&gv).arg(&mut out).arg(&nl);
        // SAFETY: (gate, up, g, out, n) as swiglu_bwd_*; inputs n elements, out 2n.
        unsafe { b.launch(grid_1d(n, 256)) }.w()?;
        Ok(wrap(out, dev, Shape::from(2 * n)))
    })
}

// ------------------------------------------------------------------------------------ softmax

pub(crate) fn softmax_fwd(x: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "softmax_last_dim";
    let dev = &x.0.device;
    let (rows, d) = rows_of(x.1);
    dispatch!(OP, x.0, |T| {
        let xv = view::<T>(OP, "x", x)?;
        let mut y = output::<T>(dev, rows * d)?;
        let f = func(dev, &format!("softmax_fwd_{}", T::SUFFIX))?;
        let di = i32_of(OP, "d", d)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&mut y).arg(&di);
        // SAFETY: (x, y, d) as softmax_fwd_*; both rows * d elements, one block per row.
        unsafe { b.launch(per_row(rows, d)) }.w()?;
        Ok(wrap(y, dev, x.1.shape().clone()))
    })
}

pub(crate) fn softmax_bwd(y: (&CudaStorage, &Layout), g: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "softmax_last_dim";
    let dev = &y.0.device;
    let (rows, d) = rows_of(y.1);
    dispatch!(OP, y.0, |T| {
        let (yv, gv) = (view::<T>(OP, "y", y)?, view::<T>(OP, "grad", g)?);
        let mut dx = output::<T>(dev, rows * d)?;
        let f = func(dev, &format!("softmax_bwd_{}", T::SUFFIX))?;
        let di = i32_of(OP, "d", d)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&yv).arg(&gv).arg(&mut dx).arg(&di);
        // SAFETY: (y, g, dx, d) as softmax_bwd_*; all rows * d elements, one block per row.
        unsafe { b.launch(per_row(rows, d)) }.w()?;
        Ok(wrap(dx, dev, y.1.shape().clone()))
    })
}

// ------------------------------------------------------------------------------------ cross-entropy

/// Mean cross-entropy of `[n, v]` logits against u32 targets: a rank-0 f32 storage.
pub(crate) fn ce_fwd(
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "cross_entropy";
    let dev = &logits.0.device;
    let (n, v) = rows_of(logits.1);
    let t = targets_view(targets)?;
    dispatch!(OP, logits.0, |T| {
        let lv = view::<T>(OP, "logits", logits)?;
        let mut rows = output::<f32>(dev, n)?;
        let vi = i32_of(OP, "vocab", v)?;
        {
            let f = func(dev, &format!("ce_fwd_{}", T::SUFFIX))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&lv).arg(&t).arg(&mut rows).arg(&vi);
            // SAFETY: (logits, targets, loss, v) as ce_fwd_*; logits n * v, targets and loss n.
            unsafe { b.launch(per_row(n, v)) }.w()?;
        }
        let mut mean = output::<f32>(dev, 1)?;
        let f = func(dev, "mean_f32")?;
        let ni = i32_of(OP, "rows", n)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&rows).arg(&mut mean).arg(&ni);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (loss, out, n) as mean_f32; loss n elements, out 1.
        unsafe { b.launch(cfg) }.w()?;
        Ok(wrap(mean, dev, Shape::from(())))
    })
}

fn targets_view<'a>(t: (&'a CudaStorage, &Layout)) -> Result<CudaView<'a, u32>> {
    let (start, end) = t.1.contiguous_offsets().ok_or_else(|| KernelError::Layout {
        op: "cross_entropy",
        what: "targets",
        detail: "not contiguous".to_string(),
    })?;
    if t.0.dtype() != DType::U32 {
        return Err(KernelError::UnsupportedDType { op: "cross_entropy", what: "targets", dtype: t.0.dtype() }.into());
    }
    Ok(t.0.as_cuda_slice::<u32>()?.slice(start..end))
}

/// `dlogits = (softmax(l) - onehot(t)) * g * scale`, `g` a one-element f32 storage.
pub(crate) fn ce_bwd(
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "cross_entropy";
    let dev = &logits.0.device;
    let (n, v) = rows_of(logits.1);
    let t = targets_view(targets)?;
    let gv = view::<f32>(OP, "grad", g)?;
    dispatch!(OP, logits.0, |T| {
        let lv = view::<T>(OP, "logits", logits)?;
        let mut dl = output::<T>(dev, n * v)?;
        let f = func(dev, &format!("ce_bwd_{}", T::SUFFIX))?;
        let vi = i32_of(OP, "vocab", v)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&lv).arg(&t).arg(&gv).arg(&mut dl).arg(&vi).arg(&scale);
        // SAFETY: (logits, targets, g, dl, v, scale) as ce_bwd_*; logits and dl n * v, targets n, g 1.
        unsafe { b.launch(per_row(n, v)) }.w()?;
        Ok(wrap(dl, dev, logits.1.shape().clone()))
    })
}

/// [`ce_bwd`] written over the logits themselves: `l = (softmax(l) - onehot(t)) * g * scale`.
pub(crate) fn ce_bwd_in_place(
    logits: (&mut CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let dev = logits.0.device.clone();
    let (n, v) = rows_of(logits.1);
    let r = crate::error::contiguous_range(OP, "logits", logits.1)?;
    let t = targets_view(targets)?;
    let gv = view::<f32>(OP, "grad", g)?;
    if t.len() != n || r.len() != n * v {
        candle_core::bail!("{OP}: {} targets for {n} rows of {v} logits ({} elements)", t.len(), r.len());
    }
    dispatch!(OP, logits.0, |T| {
        let mut lv = logits.0.as_cuda_slice_mut::<T>()?.slice_mut(r);
        let f = func(&dev, &format!("ce_bwd_in_place_{}", T::SUFFIX))?;
        let vi = i32_of(OP, "vocab", v)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut lv).arg(&t).arg(&gv).arg(&vi).arg(&scale);
        // SAFETY: (l, targets, g, v, scale) as ce_bwd_in_place_*; l n * v, targets n (checked
        // above), g 1.
        unsafe { b.launch(per_row(n, v)) }.w()?;
        Ok(())
    })
}

/// Flash attention (`cuda/flash_attn.cu`): the forward as a custom op, the backward as three
/// launches. Launch shapes follow the table at the top of that file.
pub(crate) mod flash {
    use super::*;
    use candle_core::op::BackpropOp;
    use candle_core::{CustomOp3, Storage, Tensor};
    use std::sync::Mutex;

    const SRC: &str = include_str!("cuda/flash_attn.cu");
    const MODULE: &str = "swarm_flash_attn";
    const OP: &str = "causal_attention";

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        let compiled = PTX.get_or_init(|| {
            let opts = nvrtc::CompileOptions { arch: Some("compute_90"), ..Default::default() };
            nvrtc::compile_ptx_with_opts(SRC, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
        });
        compiled.as_deref().map_err(|e| candle_core::Error::Msg(format!("NVRTC could not compile flash_attn.cu ({e})")))
    }

    fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        Ok(dev.get_or_load_custom_func(name, MODULE, ptx()?)?.into_cuda_function())
    }

    #[derive(Clone, Copy)]
    struct Dims {
        b: i32,
        h: i32,
        hkv: i32,
        s: i32,
        d: usize,
        scale: f32,
    }

    impl Dims {
        fn cfg(grid: (usize, usize), block: u32) -> LaunchConfig {
            LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
        }
        fn rows(&self) -> usize {
            (self.b * self.h) as usize
        }
        fn s(&self) -> usize {
            self.s as usize
        }
        fn fwd(&self) -> LaunchConfig {
            if self.d == 64 {
                Self::cfg((self.rows(), self.s().div_ceil(128)), 256)
            } else {
                Self::cfg((self.rows(), self.s().div_ceil(64)), 128)
            }
        }
        fn pre(&self) -> LaunchConfig {
            Self::cfg(((self.rows() * self.s()).div_ceil(8), 1), 256)
        }
        fn dkdv(&self) -> LaunchConfig {
            Self::cfg(((self.b * self.hkv) as usize, self.s().div_ceil(64)), 128)
        }
        fn dq(&self) -> LaunchConfig {
            if self.d == 64 {
                Self::cfg((self.rows(), self.s().div_ceil(64)), 128)
            } else {
                Self::cfg((self.rows(), self.s().div_ceil(128)), 256)
            }
        }
    }

    /// The forward node: writes `o` and keeps the row log-sum-exp for the backward.
    struct FlashAttn {
        dims: Dims,
        lse: Mutex<Option<CudaSlice<f32>>>,
    }

    pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let hkv = k.dim(1)?;
        let i = |what, x: usize| i32_of(OP, what, x);
        let dims = Dims { b: i("b", b)?, h: i("h", h)?, hkv: i("hkv", hkv)?, s: i("s", s)?, d, scale };
        if b * h * s >= i32::MAX as usize || s > 65535 * 64 {
            return Err(KernelError::Shape {
                op: OP,
                what: "q",
                got: q.dims().to_vec(),
                expected: "b * h * s < 2^31 and s <= 4194240 for the flash kernels".to_string(),
            }
            .into());
        }
        let op = FlashAttn { dims, lse: Mutex::new(None) };
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    }

    fn cuda<'a>(t: &'a (candle_core::StorageRef<'a>, &'a Layout)) -> Result<(&'a CudaStorage, &'a Layout)> {
        match &*t.0 {
            Storage::Cuda(c) => Ok((c, t.1)),
            _ => candle_core::bail!("{OP}: a tensor is not on CUDA"),
        }
    }

    impl CustomOp3 for FlashAttn {
        fn name(&self) -> &'static str {
            OP
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("{OP}: the flash kernels run on CUDA only")
        }

        fn cuda_fwd(
            &self,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            type T = half::bf16;
            let dev = &qs.device;
            let x = self.dims;
            let (q, k, v) =
                (view::<T>(OP, "q", (qs, ql))?, view::<T>(OP, "k", (ks, kl))?, view::<T>(OP, "v", (vs, vl))?);
            let mut o = output::<T>(dev, ql.shape().elem_count())?;
            let mut lse = output::<f32>(dev, x.rows() * x.s())?;
            let f = func(dev, &format!("flash_attn_fwd_d{}", x.d))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&k).arg(&v).arg(&mut o).arg(&mut lse);
            b.arg(&x.b).arg(&x.h).arg(&x.hkv).arg(&x.s).arg(&x.scale);
            // SAFETY: (q, k, v, o, lse, B, H, HKV, S, scale) as flash_attn_fwd_dX, grid and block
            // from the table in flash_attn.cu; o is B*H*S*D, lse B*H*S.
            unsafe { b.launch(x.fwd()) }.w()?;
            *self.lse.lock().expect("lse lock") = Some(lse);
            Ok(wrap(o, dev, ql.shape().clone()))
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            o: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            type T = half::bf16;
            let x = self.dims;
            let lse_guard = self.lse.lock().expect("lse lock");
            let Some(lse) = lse_guard.as_ref() else {
                candle_core::bail!("{OP}: backward before forward (no saved log-sum-exp)")
            };
            let g = g.contiguous()?;
            let guards = [
                q.storage_and_layout(),
                k.storage_and_layout(),
                v.storage_and_layout(),
                o.storage_and_layout(),
                g.storage_and_layout(),
            ];
            let (qs, ks, vs, os, gs) =
                (cuda(&guards[0])?, cuda(&guards[1])?, cuda(&guards[2])?, cuda(&guards[3])?, cuda(&guards[4])?);
            let dev = qs.0.device.clone();
            let (qv, kv, vv) = (view::<T>(OP, "q", qs)?, view::<T>(OP, "k", ks)?, view::<T>(OP, "v", vs)?);
            let (ov, gv) = (view::<T>(OP, "o", os)?, view::<T>(OP, "grad", gs)?);
            let mut dvec = output::<f32>(&dev, x.rows() * x.s())?;
            let mut dq = output::<T>(&dev, q.elem_count())?;
            let mut dk = output::<T>(&dev, k.elem_count())?;
            let mut dv = output::<T>(&dev, v.elem_count())?;
            macro_rules! tail {
                ($b:ident) => {
                    $b.arg(&x.b).arg(&x.h).arg(&x.hkv).arg(&x.s).arg(&x.scale)
                };
            }
            {
                let f = func(&dev, &format!("flash_attn_bwd_preprocess_d{}", x.d))?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&ov).arg(&gv).arg(&mut dvec);
                tail!(b);
                // SAFETY: (o, dout, dvec, B, H, HKV, S, scale) as flash_attn_bwd_preprocess_dX.
                unsafe { b.launch(x.pre()) }.w()?;
            }
            {
                let f = func(&dev, &format!("flash_attn_bwd_dkdv_d{}", x.d))?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(lse).arg(&dvec).arg(&mut dk).arg(&mut dv);
                tail!(b);
                // SAFETY: (q, k, v, dout, lse, dvec, dk, dv, B, H, HKV, S, scale) as
                // flash_attn_bwd_dkdv_dX; dk, dv are B*HKV*S*D.
                unsafe { b.launch(x.dkdv()) }.w()?;
            }
            {
                let f = func(&dev, &format!("flash_attn_bwd_dq_d{}", x.d))?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(lse).arg(&dvec).arg(&mut dq);
                tail!(b);
                // SAFETY: (q, k, v, dout, lse, dvec, dq, B, H, HKV, S, scale) as flash_attn_bwd_dq_dX.
                unsafe { b.launch(x.dq()) }.w()?;
            }
            let t = |s: CudaSlice<T>, shape: &[usize]| {
                let st = CudaStorage::wrap_cuda_slice(s, dev.clone());
                Tensor::from_storage(Storage::Cuda(st), shape, BackpropOp::none(), false)
            };
            Ok((Some(t(dq, q.dims())), Some(t(dk, k.dims())), Some(t(dv, v.dims()))))
        }
    }
}
