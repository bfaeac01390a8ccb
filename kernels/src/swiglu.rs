//! SwiGLU activation: `silu(gate) * up`, elementwise.
//!
//! With `s = sigmoid(gate)` and `g` the output gradient: `d_up = g * gate * s` and
//! `d_gate = g * up * s * (1 + gate * (1 - s))`; one fused pass computes both.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{self, Elem, dispatch_float, ld, st};
use crate::error::{KernelError, expect_float, expect_same_dtype, fused};
use crate::reference;

const OP: &str = "swiglu";

/// `silu(gate) * up` for two tensors of the same shape.
///
/// Differentiable with respect to `gate` and `up`. On CPU it runs the fused kernel; on other
/// devices [`reference::swiglu`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(KernelError::Shape {
            op: OP,
            what: "up",
            got: up.dims().to_vec(),
            expected: format!("{:?} (the shape of gate)", gate.dims()),
        }
        .into());
    }
    expect_same_dtype(OP, "up", up, "gate", gate)?;
    if !fused(gate) {
        return reference::swiglu(gate, up);
    }
    expect_float(OP, "gate", gate)?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + cpu::exp(-v))
}

struct SwiGlu;

impl SwiGlu {
    fn fwd<T: Elem>(&self, a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let gate = cpu::contiguous(OP, "gate", a, la)?;
        let up = cpu::contiguous(OP, "up", b, lb)?;
        let mut out = vec![T::zero(); gate.len()];
        cpu::for_elem_chunks(&mut out, |range, o| {
            for ((o, &g), &u) in o.iter_mut().zip(&gate[range.clone()]).zip(&up[range]) {
                let g = ld(g);
                *o = st(g * sigmoid(g) * ld(u));
            }
        });
        Ok((T::to_cpu_storage_owned(out), la.shape().clone()))
    }
}

impl CustomOp2 for SwiGlu {
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
        crate::cuda::swiglu_fwd((s1, l1), (s2, l2))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(OP, (s1, s2), |g, u| self.fwd(g, l1, u, l2))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_gate, want_up) = (gate.track_op(), up.track_op());
        if !want_gate && !want_up {
            return Ok((None, None));
        }
        let packed = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluBwd)?;
        let dims = gate.dims();
        let mut grads = cpu::unpack(&packed, &[dims, dims])?.into_iter();
        let (d_gate, d_up) = (grads.next(), grads.next());
        Ok((d_gate.filter(|_| want_gate), d_up.filter(|_| want_up)))
    }
}

/// Elements per parallel task of the backward kernel.
const GRAIN: usize = 16 * 1024;

/// Inputs `(gate, up, g)`; output `[d_gate | d_up]`, flat. Both are always computed (one pass
/// over the inputs); it is rare that only one is needed.
struct SwiGluBwd;

impl SwiGluBwd {
    fn run<T: Elem>(
        &self,
        (gate, lgate): (&[T], &Layout),
        (up, lup): (&[T], &Layout),
        (g, lg): (&[T], &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let gate = cpu::contiguous(OP, "gate", gate, lgate)?;
        let up = cpu::contiguous(OP, "up", up, lup)?;
        let g = cpu::contiguous(OP, "grad", g, lg)?;
        let n = gate.len();
        let mut out = vec![T::zero(); 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let kernel = |i0: usize, dg: &mut [T], du: &mut [T]| {
            let r = i0..i0 + dg.len();
            let inputs = gate[r.clone()].iter().zip(&up[r.clone()]).zip(&g[r]);
            for ((dg, du), ((&a, &u), &gv)) in dg.iter_mut().zip(du.iter_mut()).zip(inputs) {
                let (a, u, gv) = (ld(a), ld(u), ld(gv));
                let s = sigmoid(a);
                *du = st(gv * a * s);
                *dg = st(gv * u * s * (1.0 + a * (1.0 - s)));
            }
        };
        if n <= GRAIN {
            kernel(0, d_gate, d_up);
        } else {
            d_gate
                .par_chunks_mut(GRAIN)
                .zip(d_up.par_chunks_mut(GRAIN))
                .enumerate()
                .for_each(|(c, (dg, du))| kernel(c * GRAIN, dg, du));
        }
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu_bwd"
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
        crate::cuda::swiglu_bwd((s1, l1), (s2, l2), (s3, l3))
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
        dispatch_float!(OP, (s1, s2, s3), |a, u, g| self.run((a, l1), (u, l2), (g, l3)))
    }
}
