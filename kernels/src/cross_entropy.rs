//! Mean softmax cross-entropy over rows of logits, never materialising the probabilities.
//!
//! `loss = mean_i (logsumexp(l_i) - l_i[t_i])`; backward with the scalar loss gradient `g`:
//! `dl_i = (softmax(l_i) - onehot(t_i)) * g / n`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor};

use crate::cpu::{self, Elem, Rows, dispatch_float, ld, st};
use crate::error::{KernelError, contiguous_range, expect_contiguous, expect_float, fused};
use crate::reference;

const OP: &str = "cross_entropy";

/// Mean cross-entropy of `logits` (`[n, v]`, f32/bf16/f16) against class indices `targets`
/// (`[n]`, u32, each `< v`). Returns a rank-0 f32 tensor (the loss is f32 whatever the logits'
/// dtype).
///
/// Differentiable with respect to `logits`. On CPU it runs the fused kernel (logsumexp per row,
/// summed in f64 in row order); on other devices [`reference::cross_entropy`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = match logits.dims() {
        &[n, v] if n > 0 && v > 0 => (n, v),
        dims => {
            return Err(KernelError::Shape {
                op: OP,
                what: "logits",
                got: dims.to_vec(),
                expected: "[n, v] with n > 0 rows and v > 0 classes".to_string(),
            }
            .into());
        }
    };
    if targets.dims() != [n] {
        return Err(KernelError::Shape {
            op: OP,
            what: "targets",
            got: targets.dims().to_vec(),
            expected: format!("[{n}] (one class index per row of logits)"),
        }
        .into());
    }
    if targets.dtype() != DType::U32 {
        return Err(KernelError::UnsupportedDType { op: OP, what: "targets", dtype: targets.dtype() }.into());
    }
    if !fused(logits) {
        return reference::cross_entropy(logits, targets);
    }
    expect_float(OP, "logits", logits)?;
    let logits = cpu::unit_last_stride(logits)?;
    logits.apply_op2(&targets.contiguous()?, CrossEntropy { vocab: v })
}

struct CrossEntropy {
    vocab: usize,
}

/// Checks every target against the vocabulary size.
fn targets<'a>(s: &'a CpuStorage, l: &Layout, vocab: usize) -> Result<&'a [u32]> {
    let t = cpu::contiguous(OP, "targets", s.as_slice::<u32>()?, l)?;
    if let Some((row, &target)) = t.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
        return Err(KernelError::TargetOutOfRange { op: OP, row, target, vocab }.into());
    }
    Ok(t)
}

/// `(max, Σ exp(l - max))` of a row.
#[inline]
fn max_and_sum_exp<T: Elem>(row: &[T]) -> (f32, f32) {
    let m = cpu::max_f32(row);
    (m, cpu::sum_map(row, |v| cpu::exp(ld(v) - m)))
}

impl CrossEntropy {
    fn fwd<T: Elem>(&self, logits: &[T], ll: &Layout, t: &[u32]) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::new(OP, "logits", ll)?;
        let mut losses = vec![0f32; rows.count];
        cpu::for_row_chunks(rows.count, 2 * self.vocab, &mut losses, 1, |range, chunk| {
            for (r, loss) in range.zip(chunk) {
                let lr = rows.row(logits, r);
                let (m, s) = max_and_sum_exp(lr);
                // `ln s - (l_t - m)`, not `m + ln s - l_t`: no cancellation when the loss is small.
                *loss = s.ln() - (ld(lr[t[r] as usize]) - m);
            }
        });
        let sum: f64 = losses.iter().map(|&l| f64::from(l)).sum();
        let mean = (sum / losses.len() as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        OP
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::ce_fwd((s1, l1), (s2, l2))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = targets(s2, l2, self.vocab)?;
        dispatch_float!(OP, (s1), |logits| self.fwd(logits, l1, t))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !logits.track_op() {
            return Ok((None, None));
        }
        let op = CrossEntropyBwd { vocab: self.vocab };
        let dl = logits.apply_op3_no_bwd(targets, &g.to_dtype(DType::F32)?, &op)?;
        Ok((Some(dl), None))
    }
}

/// Inputs `(logits, targets, g)` with `g` the rank-0 f32 loss gradient; output `dlogits`.
struct CrossEntropyBwd {
    vocab: usize,
}

impl CrossEntropyBwd {
    fn run<T: Elem>(&self, logits: &[T], ll: &Layout, t: &[u32], g: f32) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::new(OP, "logits", ll)?;
        let (n, v) = (rows.count, self.vocab);
        let scale = g / n as f32;
        let mut out = vec![T::zero(); n * v];
        cpu::for_row_chunks(n, 3 * v, &mut out, v, |range, chunk| {
            for (r, o) in range.zip(chunk.chunks_exact_mut(v)) {
                let lr = rows.row(logits, r);
                let (m, s) = max_and_sum_exp(lr);
                let k = scale / s;
                for (o, &l) in o.iter_mut().zip(lr) {
                    *o = st(cpu::exp(ld(l) - m) * k);
                }
                let tr = t[r] as usize;
                o[tr] = st(cpu::exp(ld(lr[tr]) - m) * k - scale);
            }
        });
        Ok((T::to_cpu_storage_owned(out), ll.shape().clone()))
    }
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross_entropy_bwd"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.dims().first().copied().unwrap_or(1).max(1);
        crate::cuda::ce_bwd((s1, l1), (s2, l2), (s3, l3), 1.0 / n as f32)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = targets(s2, l2, self.vocab)?;
        let g = cpu::contiguous(OP, "grad", s3.as_slice::<f32>()?, l3)?;
        let g = g.first().copied().unwrap_or(0.0);
        dispatch_float!(OP, (s1), |logits| self.run(logits, l1, t, g))
    }
}

/// The gradient of the mean cross-entropy written over the logits: `logits` (`[n, v]`,
/// contiguous, f32 or bf16 on CUDA, f32/bf16/f16 on the CPU) becomes
/// `(softmax(logits) - onehot(targets)) * g / n`, with `g` a one-element f32 tensor read on the
/// device. The same values as `cross_entropy`'s backward, without a second `[n, v]` buffer (the
/// fused LM-head loss uses it on each chunk of logits, which it needs no longer).
pub(crate) fn cross_entropy_grad_in_place(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<()> {
    let v = logits.dim(1)?;
    expect_contiguous(OP, "logits", logits)?;
    logits.inplace_op3(
        &targets.contiguous()?,
        &g.to_dtype(DType::F32)?.flatten_all()?,
        &CrossEntropyBwdInPlace { vocab: v },
    )
}

struct CrossEntropyBwdInPlace {
    vocab: usize,
}

impl CrossEntropyBwdInPlace {
    fn run<T: Elem>(&self, logits: &mut [T], t: &[u32], g: f32) {
        let v = self.vocab;
        let n = logits.len() / v;
        let scale = g / n as f32;
        cpu::for_row_chunks(n, 3 * v, logits, v, |range, chunk| {
            for (r, row) in range.zip(chunk.chunks_exact_mut(v)) {
                let (m, s) = max_and_sum_exp(row);
                let k = scale / s;
                let tr = t[r] as usize;
                for (i, o) in row.iter_mut().enumerate() {
                    let p = cpu::exp(ld(*o) - m) * k;
                    *o = st(if i == tr { p - scale } else { p });
                }
            }
        });
    }
}

impl InplaceOp3 for CrossEntropyBwdInPlace {
    fn name(&self) -> &'static str {
        "cross_entropy_bwd_in_place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let t = targets(s2, l2, self.vocab)?;
        let g = cpu::contiguous(OP, "grad", s3.as_slice::<f32>()?, l3)?;
        let g = g.first().copied().unwrap_or(0.0);
        let r = contiguous_range(OP, "logits", l1)?;
        if r.len() != t.len() * self.vocab {
            candle_core::bail!("{OP}: {} targets for {} logits of a {}-class vocabulary", t.len(), r.len(), self.vocab);
        }
        match s1 {
            CpuStorage::F32(l) => self.run(&mut l[r], t, g),
            CpuStorage::BF16(l) => self.run(&mut l[r], t, g),
            CpuStorage::F16(l) => self.run(&mut l[r], t, g),
            l => return Err(cpu::dtype_error(OP, &[&*l])),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let n = l1.dims().first().copied().unwrap_or(1).max(1);
        crate::cuda::ce_bwd_in_place((s1, l1), (s2, l2), (s3, l3), 1.0 / n as f32)
    }
}
