//! Softmax over the last dimension, `-inf`-safe (masked entries get probability 0).
//!
//! Backward from the output `y` and its gradient `g`: `dx = y * (g - Σ g * y)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{self, Elem, Rows, dispatch_float, ld, st};
use crate::error::{expect_float, fused, last_dim};
use crate::reference;

const OP: &str = "softmax_last_dim";

/// Softmax over the last dimension of `x`.
///
/// `-inf` entries (a causal mask) get probability 0 and gradient 0. A row that is entirely
/// `-inf` gives all zeros here (the reference gives NaN). Differentiable with respect to `x`.
/// On CPU it runs the fused kernel; on other devices [`reference::softmax_last_dim`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    last_dim(OP, "x", x)?;
    if !fused(x) {
        return reference::softmax_last_dim(x);
    }
    expect_float(OP, "x", x)?;
    cpu::unit_last_stride(x)?.apply_op1(Softmax)
}

struct Softmax;

impl Softmax {
    fn fwd<T: Elem>(&self, x: &[T], lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::new(OP, "x", lx)?;
        let d = rows.len;
        let mut out = vec![T::zero(); rows.count * d];
        cpu::for_row_chunks(rows.count, 4 * d, &mut out, d, |range, chunk| {
            let mut e = vec![0f32; d];
            for (r, o) in range.zip(chunk.chunks_exact_mut(d)) {
                let xr = rows.row(x, r);
                let m = cpu::max_f32(xr);
                if m == f32::NEG_INFINITY {
                    // Nothing to attend to: all probabilities 0 rather than NaN.
                    o.fill(T::zero());
                    continue;
                }
                for (e, &v) in e.iter_mut().zip(xr) {
                    *e = cpu::exp(ld(v) - m);
                }
                let inv = 1.0 / cpu::sum_map(&e, |v| v);
                for (o, &e) in o.iter_mut().zip(&e) {
                    *o = st(e * inv);
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        OP
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_fwd((s1, l1))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(OP, (s), |x| self.fwd(x, l))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = y.apply_op2_no_bwd(&cpu::unit_last_stride(g)?, &SoftmaxBwd)?;
        Ok(Some(dx))
    }
}

/// Inputs `(y, g)`; output `dx`.
struct SoftmaxBwd;

impl SoftmaxBwd {
    fn run<T: Elem>(&self, y: &[T], ly: &Layout, g: &[T], lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let yrows = Rows::new(OP, "y", ly)?;
        let grows = Rows::new(OP, "grad", lg)?;
        let d = yrows.len;
        let mut out = vec![T::zero(); yrows.count * d];
        cpu::for_row_chunks(yrows.count, 2 * d, &mut out, d, |range, chunk| {
            for (r, o) in range.zip(chunk.chunks_exact_mut(d)) {
                let yr = yrows.row(y, r);
                let gr = grows.row(g, r);
                let gy = cpu::sum_map2(gr, yr, |g, y| ld(g) * ld(y));
                for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                    *o = st(ld(yv) * (ld(gv) - gy));
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), ly.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax_last_dim_bwd"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_bwd((s1, l1), (s2, l2))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(OP, (s1, s2), |y, g| self.run(y, l1, g, l2))
    }
}
