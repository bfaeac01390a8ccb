//! The LM head fused with softmax cross-entropy, chunked over tokens so the full `[n, vocab]`
//! logits never exist.
//!
//! For each chunk of rows: `logits = x_c · wᵀ`, the fused cross-entropy (the chunk's loss) and,
//! when `x` or `w` needs a gradient, right away `dlogits = (softmax − onehot) / n` in place of the
//! logits (the fused backward kernel), `dx_c = dlogits · w` and `dw += dlogitsᵀ · x_c`. The
//! backward then only scales `dx` and `dw` by the incoming gradient, in place and on the device
//! (no host sync): no second pass over the vocabulary.
//!
//! `dw` is one buffer, updated in place ([`add_matmul_tn`]): on CUDA each chunk adds
//! `dlogitsᵀ · x_c` into it with one accumulating cuBLAS GEMM; on the CPU the product is formed
//! in vocabulary blocks of at most [`CHUNK_BYTES`]` / 2` and added. No second `[vocab, h]` tensor
//! ever exists. Peak extra memory is `dw` plus one chunk of logits, which their gradient
//! overwrites (plus a block on the CPU), against `n × vocab` logits and their gradient for the
//! unfused path.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use std::sync::Mutex;

use crate::cross_entropy::{cross_entropy, cross_entropy_grad_in_place};
use crate::error::KernelError;
use crate::inplace::{add_matmul_tn, scale_by};

const OP: &str = "linear_cross_entropy";

/// Bytes of logits one chunk may take: 1,024 tokens of a 128k vocabulary in bf16.
pub const CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk so that one chunk's logits stay within [`CHUNK_BYTES`]. A small model's whole
/// batch is then one chunk (the same arithmetic as the unfused path).
pub fn chunk_rows(vocab: usize, dtype: DType) -> usize {
    (CHUNK_BYTES / (vocab.max(1) * dtype.size_in_bytes())).max(1)
}

/// Mean cross-entropy of `x · wᵀ` (`x`: `[n, h]`, `w`: `[vocab, h]`, same dtype) against
/// `targets` (`[n]`, u32), computed `chunk` rows at a time. Returns a rank-0 f32 tensor.
///
/// Differentiable with respect to `x` and `w`. Equal to
/// `cross_entropy(&x.matmul(&w.t()?)?, targets)` up to floating-point summation order.
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let block = (CHUNK_BYTES / 2 / (w.dim(1)?.max(1) * w.dtype().size_in_bytes())).max(1);
    linear_cross_entropy_blocks(x, w, targets, chunk, block)
}

/// [`linear_cross_entropy`] with the CPU's weight gradient built `vocab_block` rows of `w` at a
/// time (the default keeps one block's product within [`CHUNK_BYTES`]` / 2`; CUDA accumulates
/// each chunk with one GEMM and ignores it). Results do not depend on the block beyond
/// floating-point rounding; tests use small blocks to reach that path.
pub fn linear_cross_entropy_blocks(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    vocab_block: usize,
) -> Result<Tensor> {
    let (n, h) = x.dims2().map_err(|_| shape("x", x, "[n, h]".to_string()))?;
    let (v, hw) = w.dims2().map_err(|_| shape("w", w, format!("[vocab, {h}]")))?;
    if hw != h || v == 0 {
        return Err(shape("w", w, format!("[vocab, {h}] (h of x)")).into());
    }
    if targets.dims() != [n] {
        return Err(shape("targets", targets, format!("[{n}] (one per row of x)")).into());
    }
    if chunk == 0 || vocab_block == 0 {
        return Err(shape("chunk", targets, "a chunk and a vocabulary block of at least one row".to_string()).into());
    }
    let (xd, wd) = (x.detach(), w.detach());
    let targets = targets.contiguous()?;
    let (want_x, want_w) = (x.track_op(), w.track_op());
    // The gradient of the mean for an incoming gradient of 1; the backward scales it.
    let one = Tensor::ones((), DType::F32, x.device())?;
    let mut total: Option<Tensor> = None;
    let mut dx = Vec::new();
    let dw = if want_w { Some(Tensor::zeros((v, h), w.dtype(), w.device())?) } else { None };
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let xc = xd.narrow(0, start, len)?;
        let tc = targets.narrow(0, start, len)?;
        let logits = xc.matmul(&wd.t()?)?;
        let part = (cross_entropy(&logits, &tc)? * len as f64)?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
        if !want_x && !want_w {
            continue;
        }
        // The fused backward divides by its own row count: scale by len / n.
        let gc = (&one * (len as f64 / n as f64))?;
        // The chunk's logits become its gradient in place (queued after the loss read them).
        cross_entropy_grad_in_place(&logits, &tc, &gc)?;
        let dlogits = logits;
        if want_x {
            dx.push(dlogits.matmul(&wd)?);
        }
        if let Some(dw) = &dw {
            add_matmul_tn(dw, &dlogits, &xc, vocab_block)?;
        }
    }
    let loss = (total.expect("n > 0 rows") / n as f64)?.to_dtype(DType::F32)?;
    let dx = if want_x { Some(Tensor::cat(&dx, 0)?) } else { None };
    x.apply_op2(w, LinearCrossEntropy { loss, grads: Mutex::new(Some((dx, dw))) })
}

fn shape(what: &'static str, t: &Tensor, expected: String) -> KernelError {
    KernelError::Shape { op: OP, what, got: t.dims().to_vec(), expected }
}

/// The autograd node: its forward hands back the loss computed chunk by chunk above, its
/// backward the gradients computed there, times the incoming gradient.
struct LinearCrossEntropy {
    loss: Tensor,
    /// `dx` and `dw` for an incoming gradient of 1; the backward scales them in place and hands
    /// them over, so it can run once per graph.
    grads: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, _) = self.loss.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Ok((c.clone(), Shape::from(()))),
            _ => candle_core::bail!("{OP}: the loss is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (s, l) = self.loss.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, Shape::from(()))),
            _ => candle_core::bail!("{OP}: the loss is not on CUDA"),
        }
    }

    fn bwd(&self, _x: &Tensor, _w: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // g is one number (the loss's weight in the total, often exactly 1). It is read on the
        // device: scaling in f32 keeps a weight like 1/3 exact to f32 precision (in bf16 it
        // would be off by 0.1%), and reading it here would stall the backward pass on a sync.
        let taken =
            self.grads.lock().map_err(|_| candle_core::Error::Msg(format!("{OP}: a backward pass panicked")))?.take();
        let Some((dx, dw)) = taken else {
            candle_core::bail!(
                "{OP}: backward ran twice on one graph; its gradients are computed in the forward pass and \
                 handed over once (run the forward again before a second backward)"
            )
        };
        for t in dx.iter().chain(dw.iter()) {
            scale_by(t, g)?;
        }
        Ok((dx, dw))
    }
}
