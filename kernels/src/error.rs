//! The kernels' failure domain. Every public op returns `candle_core::Result` (the ops compose
//! with candle tensors), so a [`KernelError`] travels wrapped in `candle_core::Error`; its
//! message names the op, the offending value and what to do about it.

use candle_core::{DType, Tensor};

/// Why a kernel refused its inputs.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The CPU kernel has no implementation for this dtype.
    #[error(
        "{op}: {what} has dtype {dtype:?}; the fused CPU kernel takes f32, bf16 or f16 \
         (convert with `to_dtype(DType::F32)`, or use `swarm_kernels::reference::{op}`)"
    )]
    UnsupportedDType { op: &'static str, what: &'static str, dtype: DType },
    /// Two inputs that must share a dtype do not.
    #[error("{op}: {what} has dtype {got:?} but {other} has {expected:?}; convert one with `to_dtype`")]
    DTypeMismatch { op: &'static str, what: &'static str, other: &'static str, got: DType, expected: DType },
    /// An input has the wrong shape.
    #[error("{op}: {what} has shape {got:?}, expected {expected}")]
    Shape { op: &'static str, what: &'static str, got: Vec<usize>, expected: String },
    /// A cross-entropy target does not index into the vocabulary.
    #[error("{op}: target {target} at row {row} is out of range for a vocabulary of {vocab} logits")]
    TargetOutOfRange { op: &'static str, row: usize, target: u32, vocab: usize },
    /// A storage layout the kernel cannot address. The public functions make their inputs
    /// addressable first, so this means a bug in this crate.
    #[error("{op}: {what} has an unsupported layout ({detail}); this is a bug in swarm-kernels")]
    Layout { op: &'static str, what: &'static str, detail: String },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Fails unless `t` has a dtype the fused CPU kernels take.
pub(crate) fn expect_float(op: &'static str, what: &'static str, t: &Tensor) -> Result<(), KernelError> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        dtype => Err(KernelError::UnsupportedDType { op, what, dtype }),
    }
}

/// Fails unless `t` is contiguous: in-place ops write its elements as one range.
pub(crate) fn expect_contiguous(op: &'static str, what: &'static str, t: &Tensor) -> Result<(), KernelError> {
    if t.is_contiguous() {
        Ok(())
    } else {
        Err(KernelError::Layout { op, what, detail: format!("strides {:?} are not contiguous", t.stride()) })
    }
}

/// The element range a contiguous layout covers in its storage (what an in-place op writes);
/// an error naming `what` otherwise.
pub(crate) fn contiguous_range(
    op: &'static str,
    what: &'static str,
    l: &candle_core::Layout,
) -> Result<std::ops::Range<usize>, KernelError> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| KernelError::Layout {
        op,
        what,
        detail: format!("strides {:?} are not contiguous", l.stride()),
    })?;
    Ok(a..b)
}

/// Fails unless `t` has the dtype of `like`.
pub(crate) fn expect_same_dtype(
    op: &'static str,
    what: &'static str,
    t: &Tensor,
    other: &'static str,
    like: &Tensor,
) -> Result<(), KernelError> {
    if t.dtype() == like.dtype() {
        Ok(())
    } else {
        Err(KernelError::DTypeMismatch { op, what, other, got: t.dtype(), expected: like.dtype() })
    }
}

/// The size of the last dimension; fails on a rank-0 tensor.
pub(crate) fn last_dim(op: &'static str, what: &'static str, t: &Tensor) -> Result<usize, KernelError> {
    t.dims().last().copied().ok_or_else(|| KernelError::Shape {
        op,
        what,
        got: Vec::new(),
        expected: "at least one dimension".to_string(),
    })
}

/// Whether `t`'s device and dtype have a fused kernel: CPU (f32, bf16, f16), and with the
/// `cuda` feature CUDA (f32, bf16). Elsewhere the public ops take their reference path.
pub(crate) fn fused(t: &Tensor) -> bool {
    match t.device() {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => matches!(t.dtype(), DType::F32 | DType::BF16),
        _ => false,
    }
}
