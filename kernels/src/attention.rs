//! Causal grouped-query attention.
//!
//! On CUDA with bf16 and head size 64 or 128 it runs flash attention (`cuda/flash_attn.cu`):
//! tiles of queries against tiles of keys with an online softmax in f32, so the `S × S` scores
//! never exist; the backward recomputes them tile by tile from the saved row log-sum-exp. Every
//! other case runs the unfused path: scores materialised, masked, our fused softmax.

use candle_core::{Result, Tensor};

use crate::error::KernelError;

const OP: &str = "causal_attention";

/// `softmax(scale · q kᵀ + causal mask) v` per head. `q`: `[b, h, s, d]`; `k`, `v`:
/// `[b, hkv, s, d]` with `h` a multiple of `hkv` (query head `i` reads kv head
/// `i / (h / hkv)`). Returns `[b, h, s, d]`. Differentiable with respect to `q`, `k` and `v`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (bk, hkv, sk, dk) = k.dims4()?;
    if (bk, sk, dk) != (b, s, d) || hkv == 0 || h % hkv != 0 {
        return Err(KernelError::Shape {
            op: OP,
            what: "k",
            got: k.dims().to_vec(),
            expected: format!("[{b}, hkv, {s}, {d}] with {h} a multiple of hkv"),
        }
        .into());
    }
    if v.dims() != k.dims() {
        return Err(KernelError::Shape {
            op: OP,
            what: "v",
            got: v.dims().to_vec(),
            expected: format!("{:?}", k.dims()),
        }
        .into());
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && q.dtype() == candle_core::DType::BF16 && (d == 64 || d == 128) && scale > 0.0 {
        return crate::cuda::flash::attention(q, k, v, scale as f32);
    }
    unfused(q, k, v, scale, crate::softmax_last_dim)
}

/// The unfused path with a given softmax (ours, or the reference one).
pub(crate) fn unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, h, s, _) = q.dims4()?;
    let rep = h / k.dim(1)?;
    let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
    let mask: Vec<f32> =
        (0..s).flat_map(|i| (0..s).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (s, s), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    softmax(&scores)?.matmul(&v)
}

/// `[b, hkv, s, d]` to `[b, hkv * rep, s, d]`, each kv head repeated for its query heads.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    if rep == 1 {
        return Ok(x);
    }
    let (b, hkv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, hkv, rep, s, d))?.reshape((b, hkv * rep, s, d))
}
