//! The unfused path: each op built only from plain, differentiable candle tensor ops.
//!
//! Tests compare the fused kernels against these (values and gradients) and check these
//! against finite differences. They also serve devices that have no fused kernel yet. They
//! compute in the input dtype (f64 works too), and validate nothing beyond what candle does.

use candle_core::{D, DType, Result, Tensor};

/// `x * rsqrt(mean(x^2, -1) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Hugging Face Llama rotary embedding: `x * cos + rotate_half(x) * sin` with the tables
/// `cos`, `sin` of shape `[s, d/2]` repeated over both halves.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let out2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[out1, out2], D::Minus1)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `exp(x - max) / Σ exp(x - max)` over the last dimension (the max is a constant shift).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean of `-log softmax(logits)[target]` over rows, a rank-0 tensor, computed in f32
/// (in f64 for f64 logits).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = match logits.dtype() {
        DType::F64 => logits.clone(),
        _ => logits.to_dtype(DType::F32)?,
    };
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum_exp)?;
    let picked = log_probs.gather(&targets.contiguous()?.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// Causal grouped-query attention with the scores materialised (`q`: `[b, h, s, d]`; `k`, `v`:
/// `[b, hkv, s, d]`), through the reference softmax.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    crate::attention::unfused(q, k, v, scale, softmax_last_dim)
}
