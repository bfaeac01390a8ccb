//! Rotary position embedding, Hugging Face Llama "rotate_half" convention.
//!
//! With `x1 = x[..., :d/2]`, `x2 = x[..., d/2:]` and angle tables `cos`, `sin` of shape
//! `[s, d/2]`: `out[..., i] = x1*cos - x2*sin`, `out[..., d/2 + i] = x2*cos + x1*sin`.
//! Each pair `(i, d/2 + i)` is rotated by an angle, so the backward is the inverse rotation:
//! the same kernel with `-sin`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu::{self, Elem, Rows, dispatch_float, ld, st};
use crate::error::{KernelError, expect_float, expect_same_dtype, fused};
use crate::reference;

const OP: &str = "rope";

/// Rotates `x` (`[b, h, s, d]`, or any `[..., s, d]`; contiguous or a strided view such as a
/// transposed `[b, s, h, d]`) by the angle tables `cos`, `sin` (`[s, d/2]`, `d` even).
///
/// Differentiable with respect to `x`; `cos` and `sin` are constants (no gradient). Output is
/// contiguous. On CPU it runs the fused kernel; on other devices [`reference::rope`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let rank = dims.len();
    if rank < 2 || !dims[rank - 1].is_multiple_of(2) {
        return Err(KernelError::Shape {
            op: OP,
            what: "x",
            got: dims.to_vec(),
            expected: "[..., s, d] with d even".to_string(),
        }
        .into());
    }
    let (s, half) = (dims[rank - 2], dims[rank - 1] / 2);
    for (what, t) in [("cos", cos), ("sin", sin)] {
        if t.dims() != [s, half] {
            return Err(KernelError::Shape {
                op: OP,
                what,
                got: t.dims().to_vec(),
                expected: format!("[{s}, {half}] (sequence length, head dim / 2 of x)"),
            }
            .into());
        }
        expect_same_dtype(OP, what, t, "x", x)?;
    }
    if !fused(x) {
        return reference::rope(x, cos, sin);
    }
    expect_float(OP, "x", x)?;
    let x = cpu::unit_last_stride(x)?;
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

/// Inputs `(x, cos, sin)`; rotates by `+angle`, or by `-angle` when `inverse`.
struct Rope {
    inverse: bool,
}

impl Rope {
    fn run<T: Elem>(
        &self,
        (x, lx): (&[T], &Layout),
        (cos, lc): (&[T], &Layout),
        (sin, ls): (&[T], &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::new(OP, "x", lx)?;
        let cos = cpu::contiguous(OP, "cos", cos, lc)?;
        let sin = cpu::contiguous(OP, "sin", sin, ls)?;
        let dims = lx.dims();
        let seq = dims[dims.len() - 2];
        let (d, half) = (rows.len, rows.len / 2);
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![T::zero(); rows.count * d];
        cpu::for_row_chunks(rows.count, 2 * d, &mut out, d, |range, chunk| {
            for (r, o) in range.zip(chunk.chunks_exact_mut(d)) {
                let t = r % seq;
                let (c, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                let (x1, x2) = rows.row(x, r).split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for (((((o1, o2), &a), &b), &c), &sn) in o1.iter_mut().zip(o2).zip(x1).zip(x2).zip(c).zip(sn) {
                    let (a, b, c, sn) = (ld(a), ld(b), ld(c), sign * ld(sn));
                    *o1 = st(a * c - b * sn);
                    *o2 = st(b * c + a * sn);
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse { "rope_bwd" } else { OP }
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
        crate::cuda::rope((s1, l1), (s2, l2), (s3, l3), if self.inverse { -1.0 } else { 1.0 })
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
        dispatch_float!(OP, (s1, s2, s3), |x, c, s| self.run((x, l1), (c, l2), (s, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let inverse = Rope { inverse: !self.inverse };
        let dx = cpu::unit_last_stride(g)?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}
