use candle_core::{Device, Result, Tensor};
use swarm_kernels::{reference, swiglu};

use crate::common::{self, F32_TOL, FD_F32, FD_F64, test_device};

fn fused(xs: &[Tensor]) -> Result<Tensor> {
    swiglu(&xs[0], &xs[1])
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::swiglu(&xs[0], &xs[1])
}

fn inputs(rng: &mut rand::rngs::StdRng, dims: &[usize], dev: &Device) -> Result<Vec<Tensor>> {
    Ok(vec![common::uniform(rng, dims, -6.0, 6.0, dev)?, common::uniform(rng, dims, -2.0, 2.0, dev)?])
}

fn swiglu_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(31);
    // Odd sizes, batch dims, and large ones that run in parallel (forward and backward).
    for dims in [&[7usize][..], &[3, 11], &[2, 5, 37], &[40_009], &[3, 100, 117]] {
        let xs = inputs(&mut rng, dims, dev)?;
        common::compare(&format!("swiglu {dims:?}"), &mut rng, &xs, &[true, true], &fused, &unfused, F32_TOL)?;
    }
    // Only one side needs a gradient.
    let xs = inputs(&mut rng, &[4, 9], dev)?;
    common::compare("swiglu gate only", &mut rng, &xs, &[true, false], &fused, &unfused, F32_TOL)?;
    common::compare("swiglu up only", &mut rng, &xs, &[false, true], &fused, &unfused, F32_TOL)?;
    // Non-contiguous gate (a transposed view).
    let mut xs = inputs(&mut rng, &[6, 13], dev)?;
    xs[0] = common::uniform(&mut rng, &[13, 6], -6.0, 6.0, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].t()?, xs[1].clone()]);
    common::compare("swiglu gate^T", &mut rng, &xs, &[true, true], &t(fused), &t(unfused), F32_TOL)
}
test_device!(swiglu_matches_reference, swiglu_matches_reference_cpu, swiglu_matches_reference_cuda);

fn swiglu_finite_differences(dev: &Device) -> Result<()> {
    let mut rng = common::rng(32);
    let xs = inputs(&mut rng, &[4, 5], dev)?;
    let (h, tol) = FD_F32;
    common::finite_differences("swiglu fused f32", &mut rng, &xs, &[true, true], &fused, 6, h, tol)?;
    let (h, tol) = FD_F64;
    let xs = common::to_f64(&xs)?;
    common::finite_differences("swiglu reference f64", &mut rng, &xs, &[true, true], &unfused, 6, h, tol)
}
test_device!(swiglu_finite_differences, swiglu_fd_cpu, swiglu_fd_cuda);
