//! RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * w` over the last dimension.
//!
//! Backward, with `r = rsqrt(mean(x^2) + eps)` recomputed per row and `g` the output gradient:
//! `dx = r * g * w - x * r^3 / d * Σ(g * w * x)` and `dw = Σ_rows g * x * r`.
//! One fused pass computes both; `dw` sums per-chunk partials in a fixed order.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu::{self, Elem, Rows, dispatch_float, ld, st};
use crate::error::{KernelError, expect_float, expect_same_dtype, fused, last_dim};
use crate::reference;

const OP: &str = "rms_norm";

/// RMSNorm over the last dimension of `x` (`[..., d]`) with gain `weight` (`[d]`).
///
/// Differentiable with respect to `x` and `weight`. On CPU it runs the fused kernel (f32, bf16
/// or f16 storage, f32 math); on other devices the unfused [`reference::rms_norm`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = last_dim(OP, "x", x)?;
    if weight.dims() != [d] {
        return Err(KernelError::Shape {
            op: OP,
            what: "weight",
            got: weight.dims().to_vec(),
            expected: format!("[{d}] (the last dimension of x)"),
        }
        .into());
    }
    expect_same_dtype(OP, "weight", weight, "x", x)?;
    // The CUDA backward keeps a row of `dw` partials in shared memory.
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && d > crate::cuda::RMS_BWD_MAX_D {
        return reference::rms_norm(x, weight, eps);
    }
    if !fused(x) {
        return reference::rms_norm(x, weight, eps);
    }
    expect_float(OP, "x", x)?;
    let x = cpu::unit_last_stride(x)?;
    x.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

#[inline]
fn inv_rms<T: Elem>(row: &[T], eps: f32) -> f32 {
    let ss = cpu::sum_map(row, |v| {
        let v = ld(v);
        v * v
    });
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl RmsNorm {
    fn fwd<T: Elem>(&self, x: &[T], lx: &Layout, w: &[T], lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::new(OP, "x", lx)?;
        let w: Vec<f32> = cpu::contiguous(OP, "weight", w, lw)?.iter().map(|&v| ld(v)).collect();
        let d = rows.len;
        let mut out = vec![T::zero(); rows.count * d];
        cpu::for_row_chunks(rows.count, d, &mut out, d, |range, chunk| {
            for (r, o) in range.zip(chunk.chunks_exact_mut(d)) {
                let xr = rows.row(x, r);
                let inv = inv_rms(xr, self.eps);
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(&w) {
                    *o = st(ld(xv) * inv * wv);
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }
}

impl CustomOp2 for RmsNorm {
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
        crate::cuda::rms_norm_fwd((s1, l1), (s2, l2), self.eps)
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(OP, (s1, s2), |x, w| self.fwd(x, l1, w, l2))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !want_x && !want_w {
            return Ok((None, None));
        }
        let op = RmsNormBwd { eps: self.eps, want_x, want_w };
        let packed = x.apply_op3_no_bwd(w, &cpu::unit_last_stride(g)?, &op)?;
        let mut shapes: Vec<&[usize]> = Vec::new();
        if want_x {
            shapes.push(x.dims());
        }
        if want_w {
            shapes.push(w.dims());
        }
        let mut grads = cpu::unpack(&packed, &shapes)?.into_iter();
        let dx = if want_x { grads.next() } else { None };
        let dw = if want_w { grads.next() } else { None };
        Ok((dx, dw))
    }
}

/// Inputs `(x, w, g)`; output `[dx (if want_x) | dw (if want_w)]`, flat.
struct RmsNormBwd {
    eps: f32,
    want_x: bool,
    want_w: bool,
}

impl RmsNormBwd {
    fn run<T: Elem>(
        &self,
        (x, lx): (&[T], &Layout),
        (w, lw): (&[T], &Layout),
        (g, lg): (&[T], &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let xrows = Rows::new(OP, "x", lx)?;
        let grows = Rows::new(OP, "grad", lg)?;
        let w: Vec<f32> = cpu::contiguous(OP, "weight", w, lw)?.iter().map(|&v| ld(v)).collect();
        let (n, d) = (xrows.count, xrows.len);
        let dx_len = if self.want_x { n * d } else { 0 };
        let mut out = vec![T::zero(); dx_len + if self.want_w { d } else { 0 }];
        let (dx, dw_out) = out.split_at_mut(dx_len);
        let out_row_len = if self.want_x { d } else { 0 };
        let partials = cpu::for_row_chunks(n, 2 * d, dx, out_row_len, |range, chunk| {
            let mut dw = if self.want_w { vec![0f32; d] } else { Vec::new() };
            for (i, r) in range.enumerate() {
                let xr = xrows.row(x, r);
                let gr = grows.row(g, r);
                let inv = inv_rms(xr, self.eps);
                if self.want_x {
                    let gwx = dot3(gr, &w, xr);
                    let coef = gwx * inv * inv * inv / d as f32;
                    let o = &mut chunk[i * d..(i + 1) * d];
                    for (((o, &gv), &wv), &xv) in o.iter_mut().zip(gr).zip(&w).zip(xr) {
                        *o = st(inv * ld(gv) * wv - ld(xv) * coef);
                    }
                }
                for ((a, &gv), &xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *a += ld(gv) * ld(xv) * inv;
                }
            }
            dw
        });
        if self.want_w {
            let mut dw = vec![0f32; d];
            for p in &partials {
                for (a, &b) in dw.iter_mut().zip(p) {
                    *a += b;
                }
            }
            for (o, v) in dw_out.iter_mut().zip(dw) {
                *o = st(v);
            }
        }
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

/// `Σ g * w * x` over a row, lane-split.
#[inline]
fn dot3<T: Elem>(g: &[T], w: &[f32], x: &[T]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let (gc, wc, xc) = (g.chunks_exact(L), w.chunks_exact(L), x.chunks_exact(L));
    let (gr, wr, xr) = (gc.remainder(), wc.remainder(), xc.remainder());
    for ((gs, ws), xs) in gc.zip(wc).zip(xc) {
        for (((a, &gv), &wv), &xv) in acc.iter_mut().zip(gs).zip(ws).zip(xs) {
            *a += ld(gv) * wv * ld(xv);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for ((&gv, &wv), &xv) in gr.iter().zip(wr).zip(xr) {
        s += ld(gv) * wv * ld(xv);
    }
    s
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
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
        crate::cuda::rms_norm_bwd((s1, l1), (s2, l2), (s3, l3), self.eps, self.want_x, self.want_w)
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
        dispatch_float!(OP, (s1, s2, s3), |x, w, g| self.run((x, l1), (w, l2), (g, l3)))
    }
}
