//! The in-place updates' CUDA side: `acc += x`, `t *= g`, rows added into chosen rows, and a
//! product accumulated by cuBLAS (the fused LM-head loss and the pipeline's tied rows use them).

// Launches and cuBLAS calls are `unsafe`; each passes exactly the parameters of the `ops.cu`
// entry point (or the GEMM) it names, with buffers sized from the shapes the kernel indexes.
#![allow(unsafe_code)]

use super::{Float, func, grid_1d, i32_of, per_row, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

use crate::error::{KernelError, contiguous_range};

/// `acc += x` in place; both contiguous, same dtype and element count.
pub(crate) fn add_into(acc: (&mut CudaStorage, &Layout), x: (&CudaStorage, &Layout)) -> Result<()> {
    const OP: &str = "add_into";
    let dev = acc.0.device.clone();
    let r = contiguous_range(OP, "acc", acc.1)?;
    let n = r.len();
    dispatch!(OP, acc.0, |T| {
        let xv = view::<T>(OP, "x", x)?;
        if xv.len() != n {
            candle_core::bail!("{OP}: x has {} elements, acc {n}", xv.len());
        }
        let mut a = acc.0.as_cuda_slice_mut::<T>()?.slice_mut(r);
        let f = func(&dev, &format!("add_into_{}", T::SUFFIX))?;
        let nl = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut a).arg(&xv).arg(&nl);
        // SAFETY: (acc, x, n) as add_into_*; both views hold n elements (checked above).
        unsafe { b.launch(grid_1d(n, 256)) }.w()?;
        Ok(())
    })
}

/// `acc[ids[r]] += x[r]` for each row `r` of `x` (`[rows, d]` f32; `acc` `[.., d]` f32 or bf16;
/// the ids distinct and in range, checked by the caller).
pub(crate) fn add_rows_into(
    acc: (&mut CudaStorage, &Layout),
    ids: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    d: usize,
) -> Result<()> {
    const OP: &str = "add_rows_into";
    let dev = acc.0.device.clone();
    let r = contiguous_range(OP, "acc", acc.1)?;
    let (start, end) = ids.1.contiguous_offsets().ok_or_else(|| KernelError::Layout {
        op: OP,
        what: "ids",
        detail: "not contiguous".to_string(),
    })?;
    let iv = ids.0.as_cuda_slice::<u32>()?.slice(start..end);
    let xv = view::<f32>(OP, "x", x)?;
    let rows = iv.len();
    if xv.len() != rows * d || r.len() % d.max(1) != 0 {
        candle_core::bail!("{OP}: {rows} ids, x has {} values, acc {}, rows of {d}", xv.len(), r.len());
    }
    let di = i32_of(OP, "d", d)?;
    dispatch!(OP, acc.0, |T| {
        let mut a = acc.0.as_cuda_slice_mut::<T>()?.slice_mut(r);
        let f = func(&dev, &format!("add_rows_into_{}", T::SUFFIX))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut a).arg(&iv).arg(&xv).arg(&di);
        // SAFETY: (acc, ids, x, d) as add_rows_into_*; x holds rows * d values (checked above)
        // and the caller checked every id against acc's row count.
        unsafe { b.launch(per_row(rows, d)) }.w()?;
        Ok(())
    })
}

/// `t *= g[0]` in place; `g` one f32.
pub(crate) fn scale_by(t: (&mut CudaStorage, &Layout), g: (&CudaStorage, &Layout)) -> Result<()> {
    const OP: &str = "scale_by";
    let dev = t.0.device.clone();
    let r = contiguous_range(OP, "t", t.1)?;
    let n = r.len();
    let gv = view::<f32>(OP, "g", g)?;
    dispatch!(OP, t.0, |T| {
        let mut tv = t.0.as_cuda_slice_mut::<T>()?.slice_mut(r);
        let f = func(&dev, &format!("scale_by_{}", T::SUFFIX))?;
        let nl = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut tv).arg(&gv).arg(&nl);
        // SAFETY: (t, g, n) as scale_by_*; t holds n elements, g at least one.
        unsafe { b.launch(grid_1d(n, 256)) }.w()?;
        Ok(())
    })
}

/// `acc += aᵀ · b` in place as one cuBLAS GEMM with beta = 1 and f32 accumulation: row-major
/// `acc` `[m, n]`, `a` `[k, m]`, `b` `[k, n]`, all contiguous and of `acc`'s dtype (f32 or bf16).
/// In cuBLAS's column-major terms `accᵀ (n × m) += bᵀ (n × k) · a (k × m)`: `b` untransposed with
/// leading dimension `n`, `a` transposed with leading dimension `m`.
pub(crate) fn add_matmul_tn(
    acc: (&mut CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    (k, m, n): (usize, usize, usize),
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    const OP: &str = "add_matmul_tn";
    let dev = acc.0.device.clone();
    let r = contiguous_range(OP, "acc", acc.1)?;
    let (ki, mi, ni) = (i32_of(OP, "k", k)?, i32_of(OP, "m", m)?, i32_of(OP, "n", n)?);
    let dt = match acc.0.dtype() {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        dtype => return Err(KernelError::UnsupportedDType { op: OP, what: "acc", dtype }.into()),
    };
    dispatch!(OP, acc.0, |T| {
        let (av, bv) = (view::<T>(OP, "a", a)?, view::<T>(OP, "b", b)?);
        if r.len() != m * n || av.len() != k * m || bv.len() != k * n {
            candle_core::bail!(
                "{OP}: acc has {} elements, a {}, b {}; expected {m}x{n}, {k}x{m}, {k}x{n}",
                r.len(),
                av.len(),
                bv.len()
            );
        }
        let blas = dev.cublas_handle();
        let stream = dev.cuda_stream();
        let mut cv = acc.0.as_cuda_slice_mut::<T>()?.slice_mut(r);
        let (ap, _ga) = av.device_ptr(&stream);
        let (bp, _gb) = bv.device_ptr(&stream);
        let (cp, _gc) = cv.device_ptr_mut(&stream);
        let (alpha, beta) = (1f32, 1f32);
        // SAFETY: cuBLAS reads n×k of b (ld n) and m×k of a (ld m) and updates n×m of acc
        // (ld n), exactly the element counts checked above; alpha and beta are host f32 as
        // CUBLAS_COMPUTE_32F expects; the handle runs on candle's stream, like every launch here.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_T,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                bp as *const _,
                dt,
                ni,
                ap as *const _,
                dt,
                mi,
                (&beta as *const f32).cast(),
                cp as *mut _,
                dt,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("{OP}: cuBLAS GEMM of [{k}, {m}]ᵀ x [{k}, {n}]: {e:?}")))?;
        Ok(())
    })
}
