use candle_core::{Device, Result, Tensor};
use swarm_kernels::{reference, rms_norm};

use crate::common::{self, F32_TOL, FD_F32, FD_F64, test_device};

const EPS: f64 = 1e-5;

fn fused(xs: &[Tensor]) -> Result<Tensor> {
    rms_norm(&xs[0], &xs[1], EPS)
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::rms_norm(&xs[0], &xs[1], EPS)
}

fn inputs(rng: &mut rand::rngs::StdRng, dims: &[usize], d: usize, dev: &Device) -> Result<Vec<Tensor>> {
    Ok(vec![common::uniform(rng, dims, -2.0, 2.0, dev)?, common::uniform(rng, &[d], 0.5, 1.5, dev)?])
}

fn rms_norm_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(11);
    // Odd sizes, d not a power of two, batch dims, and one large enough to run in parallel.
    for dims in [&[1usize, 7][..], &[17, 33], &[3, 5, 96], &[2, 1, 4, 10], &[130, 257], &[33, 1024]] {
        let d = *dims.last().unwrap_or(&1);
        let xs = inputs(&mut rng, dims, d, dev)?;
        common::compare(&format!("rms_norm {dims:?}"), &mut rng, &xs, &[true, true], &fused, &unfused, F32_TOL)?;
    }
    Ok(())
}
test_device!(rms_norm_matches_reference, rms_norm_matches_reference_cpu, rms_norm_matches_reference_cuda);

fn rms_norm_strided_inputs_and_grads(dev: &Device) -> Result<()> {
    let mut rng = common::rng(12);
    // x stored as [d, n], used transposed: the last dimension has stride n (copied first).
    let xs = inputs(&mut rng, &[9, 24], 9, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].t()?, xs[1].clone()]);
    common::compare("rms_norm x^T", &mut rng, &xs, &[true, true], &t(fused), &t(unfused), F32_TOL)?;
    // x stored as [s, b, d], used as [b, s, d]: strided rows with unit last stride (no copy);
    // the output is transposed back, so the gradient reaching the op is strided too.
    let xs = inputs(&mut rng, &[6, 4, 50], 50, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| {
        move |xs: &[Tensor]| f(&[xs[0].transpose(0, 1)?, xs[1].clone()])?.transpose(0, 1)
    };
    common::compare("rms_norm strided rows", &mut rng, &xs, &[true, true], &t(fused), &t(unfused), F32_TOL)?;
    // A narrowed view (row offset) of a larger tensor.
    let xs = inputs(&mut rng, &[10, 21], 21, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].narrow(0, 3, 5)?, xs[1].clone()]);
    common::compare("rms_norm narrowed", &mut rng, &xs, &[true, true], &t(fused), &t(unfused), F32_TOL)
}
test_device!(rms_norm_strided_inputs_and_grads, rms_norm_strided_cpu, rms_norm_strided_cuda);

fn rms_norm_finite_differences(dev: &Device) -> Result<()> {
    let mut rng = common::rng(13);
    let xs = inputs(&mut rng, &[3, 10], 10, dev)?;
    let (h, tol) = FD_F32;
    common::finite_differences("rms_norm fused f32", &mut rng, &xs, &[true, true], &fused, 6, h, tol)?;
    let (h, tol) = FD_F64;
    let xs = common::to_f64(&xs)?;
    common::finite_differences("rms_norm reference f64", &mut rng, &xs, &[true, true], &unfused, 6, h, tol)
}
test_device!(rms_norm_finite_differences, rms_norm_fd_cpu, rms_norm_fd_cuda);

fn rms_norm_frozen_weight(dev: &Device) -> Result<()> {
    // Only x needs a gradient (a frozen norm under LoRA): the weight gets none, x's is right.
    let mut rng = common::rng(14);
    let xs = inputs(&mut rng, &[5, 12], 12, dev)?;
    common::compare("rms_norm frozen weight", &mut rng, &xs, &[true, false], &fused, &unfused, F32_TOL)?;
    common::compare("rms_norm frozen x", &mut rng, &xs, &[false, true], &fused, &unfused, F32_TOL)
}
test_device!(rms_norm_frozen_weight, rms_norm_frozen_weight_cpu, rms_norm_frozen_weight_cuda);
