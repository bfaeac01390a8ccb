//! Shared test machinery: the per-device test macro, seeded random tensors, and the two
//! checks every op goes through (fused vs reference, autodiff vs finite differences).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generates a CPU test and, with the `cuda` feature, a CUDA test, both running
/// `$fn_name(&Device)` (after candle's `candle-core/src/test_utils.rs`).
macro_rules! test_device {
    ($fn_name:ident, $test_cpu:ident, $test_cuda:ident) => {
        #[test]
        fn $test_cpu() -> candle_core::Result<()> {
            $fn_name(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $test_cuda() -> candle_core::Result<()> {
            $fn_name(&candle_core::Device::new_cuda(0)?)
        }
    };
}
pub(crate) use test_device;

/// An op under test: inputs (the leaves) to output.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// An f32 tensor with elements uniform in `[lo, hi)`.
pub fn uniform(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32, dev: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(data, dims, dev)
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// `‖a − b‖ / ‖b‖` (or `‖a − b‖` when `b` is 0), in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (host_f64(a)?, host_f64(b)?);
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    Ok(())
}

/// Leaves as variables where `diff`, constants elsewhere.
fn leaves(inputs: &[Tensor], diff: &[bool]) -> Result<Vec<(Tensor, Option<Var>)>> {
    inputs
        .iter()
        .zip(diff)
        .map(|(t, &d)| {
            if d {
                let v = Var::from_tensor(t)?;
                Ok((v.as_tensor().clone(), Some(v)))
            } else {
                Ok((t.clone(), None))
            }
        })
        .collect()
}

/// The scalar functional `Σ out * r` (in f64) whose gradients the tests compare.
fn functional(out: &Tensor, r: &Tensor) -> Result<Tensor> {
    (out.to_dtype(DType::F64)? * r)?.sum_all()
}

/// Asserts a gradient exists, is finite and is not all zero.
pub fn assert_grad_reaches(what: &str, g: Option<&Tensor>) -> Result<()> {
    let g = g.unwrap_or_else(|| panic!("{what}: no gradient reached this input"));
    let v = host_f64(g)?;
    assert!(v.iter().all(|x| x.is_finite()), "{what}: gradient is not finite");
    assert!(v.iter().any(|&x| x != 0.0), "{what}: gradient is all zero");
    Ok(())
}

/// Tolerances for [`compare`]: forward and gradients, relative.
#[derive(Clone, Copy)]
pub struct Tol {
    pub fwd: f64,
    pub grad: f64,
}

pub const F32_TOL: Tol = Tol { fwd: 1e-5, grad: 1e-4 };

/// Fused vs reference on the same inputs: outputs, then the gradients of `Σ op(..) * r` (random
/// `r`) with respect to every input marked in `diff`, which must all be present, finite and
/// non-zero.
pub fn compare(
    what: &str,
    rng: &mut StdRng,
    inputs: &[Tensor],
    diff: &[bool],
    fused: OpFn,
    reference: OpFn,
    tol: Tol,
) -> Result<()> {
    let leaves = leaves(inputs, diff)?;
    let xs: Vec<Tensor> = leaves.iter().map(|(t, _)| t.clone()).collect();
    let out_f = fused(&xs)?;
    let out_r = reference(&xs)?;
    assert_close(&format!("{what}: forward"), &out_f, &out_r, tol.fwd)?;
    let r = uniform(rng, out_r.dims(), -1.0, 1.0, out_r.device())?.to_dtype(DType::F64)?;
    let grads_f = functional(&out_f, &r)?.backward()?;
    let grads_r = functional(&out_r, &r)?.backward()?;
    for (i, (_, var)) in leaves.iter().enumerate() {
        let Some(var) = var else { continue };
        let name = format!("{what}: grad of input {i}");
        assert_grad_reaches(&name, grads_f.get(var.as_tensor()))?;
        assert_grad_reaches(&format!("{name} (reference)"), grads_r.get(var.as_tensor()))?;
        let (gf, gr) = (grads_f.get(var.as_tensor()), grads_r.get(var.as_tensor()));
        if let (Some(gf), Some(gr)) = (gf, gr) {
            assert_close(&name, gf, gr, tol.grad)?;
        }
    }
    Ok(())
}

/// Autodiff vs central finite differences of `Σ op(..) * r`, at `coords` random coordinates of
/// each input marked in `diff`. `h` is the step, `tol` bounds `|fd − ad| / (1 + |ad|)`.
#[allow(clippy::too_many_arguments)]
pub fn finite_differences(
    what: &str,
    rng: &mut StdRng,
    inputs: &[Tensor],
    diff: &[bool],
    op: OpFn,
    coords: usize,
    h: f64,
    tol: f64,
) -> Result<()> {
    let leaves = leaves(inputs, diff)?;
    let xs: Vec<Tensor> = leaves.iter().map(|(t, _)| t.clone()).collect();
    let out = op(&xs)?;
    let r = uniform(rng, out.dims(), -1.0, 1.0, out.device())?.to_dtype(DType::F64)?;
    let grads = functional(&out, &r)?.backward()?;
    for (i, (_, var)) in leaves.iter().enumerate() {
        let Some(var) = var else { continue };
        let g = host_f64(grads.get(var.as_tensor()).expect("gradient present"))?;
        let x = &inputs[i];
        let base = host_f64(x)?;
        for _ in 0..coords {
            let k = rng.random_range(0..base.len());
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[k] += delta;
                let mut ys = inputs.to_vec();
                ys[i] = Tensor::from_vec(v, x.dims(), x.device())?.to_dtype(x.dtype())?;
                functional(&op(&ys)?, &r)?.to_scalar::<f64>()
            };
            let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
            let err = (fd - g[k]).abs() / (1.0 + g[k].abs());
            assert!(
                err <= tol,
                "{what}: input {i} coordinate {k}: finite difference {fd:.6e} vs autodiff {:.6e} (error {err:.2e} > {tol:.0e})",
                g[k]
            );
        }
    }
    Ok(())
}

/// Step sizes and tolerances for finite differences: on the f32 fused kernels (a power of two,
/// so `x ± h` is exact) and on the f64 references.
pub const FD_F32: (f64, f64) = (1.0 / 128.0, 2e-3);
pub const FD_F64: (f64, f64) = (1e-6, 1e-6);

/// Casts every input to f64 (for the references' finite-difference checks).
pub fn to_f64(xs: &[Tensor]) -> Result<Vec<Tensor>> {
    xs.iter().map(|t| if t.dtype().is_float() { t.to_dtype(DType::F64) } else { Ok(t.clone()) }).collect()
}
