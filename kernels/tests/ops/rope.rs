use candle_core::{Device, Result, Tensor};
use swarm_kernels::{reference, rope};

use crate::common::{self, F32_TOL, FD_F32, FD_F64, test_device};

/// Llama angle tables `[s, d/2]`: position `t`, frequency `base^(-2i/d)`.
fn tables(s: usize, d: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let angles: Vec<f32> =
        (0..s).flat_map(|t| (0..half).map(move |i| t as f32 * 10_000f32.powf(-2.0 * i as f32 / d as f32))).collect();
    let a = Tensor::from_vec(angles, (s, half), dev)?;
    Ok((a.cos()?, a.sin()?))
}

fn fused(xs: &[Tensor]) -> Result<Tensor> {
    rope(&xs[0], &xs[1], &xs[2])
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::rope(&xs[0], &xs[1], &xs[2])
}

/// `x`, `cos`, `sin` for an `x` of `dims` (`[..., s, d]`).
fn inputs(rng: &mut rand::rngs::StdRng, dims: &[usize], dev: &Device) -> Result<Vec<Tensor>> {
    let (s, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let (cos, sin) = tables(s, d, dev)?;
    Ok(vec![common::uniform(rng, dims, -2.0, 2.0, dev)?, cos, sin])
}

const DIFF: [bool; 3] = [true, false, false];

fn rope_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(21);
    // d/2 odd, d not a power of two, rank 3, and one large enough to run in parallel.
    for dims in [&[1usize, 1, 5, 8][..], &[2, 3, 7, 6], &[2, 4, 9, 34], &[6, 11, 10], &[2, 8, 40, 64]] {
        let xs = inputs(&mut rng, dims, dev)?;
        common::compare(&format!("rope {dims:?}"), &mut rng, &xs, &DIFF, &fused, &unfused, F32_TOL)?;
    }
    Ok(())
}
test_device!(rope_matches_reference, rope_matches_reference_cpu, rope_matches_reference_cuda);

fn rope_strided_inputs(dev: &Device) -> Result<()> {
    let mut rng = common::rng(22);
    // The usual layout: q stored as [b, s, h, d] and viewed as [b, h, s, d] (no copy).
    let (b, s, h, d) = (2, 7, 3, 12);
    let mut xs = inputs(&mut rng, &[b, h, s, d], dev)?;
    xs[0] = common::uniform(&mut rng, &[b, s, h, d], -2.0, 2.0, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| {
        move |xs: &[Tensor]| f(&[xs[0].transpose(1, 2)?, xs[1].clone(), xs[2].clone()])
    };
    common::compare("rope [b,s,h,d]^T", &mut rng, &xs, &DIFF, &t(fused), &t(unfused), F32_TOL)?;
    // The last dimension strided (stored as [b, h, d, s]): copied first. The output is viewed
    // transposed afterwards, so the gradient reaching the op is strided too.
    xs[0] = common::uniform(&mut rng, &[b, h, d, s], -2.0, 2.0, dev)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| {
        move |xs: &[Tensor]| f(&[xs[0].transpose(2, 3)?, xs[1].clone(), xs[2].clone()])?.transpose(1, 2)
    };
    common::compare("rope last dim strided", &mut rng, &xs, &DIFF, &t(fused), &t(unfused), F32_TOL)
}
test_device!(rope_strided_inputs, rope_strided_inputs_cpu, rope_strided_inputs_cuda);

fn rope_finite_differences(dev: &Device) -> Result<()> {
    let mut rng = common::rng(23);
    let xs = inputs(&mut rng, &[1, 2, 4, 6], dev)?;
    let (h, tol) = FD_F32;
    common::finite_differences("rope fused f32", &mut rng, &xs, &DIFF, &fused, 6, h, tol)?;
    let (h, tol) = FD_F64;
    let xs = common::to_f64(&xs)?;
    common::finite_differences("rope reference f64", &mut rng, &xs, &DIFF, &unfused, 6, h, tol)
}
test_device!(rope_finite_differences, rope_fd_cpu, rope_fd_cuda);

fn rope_known_values(dev: &Device) -> Result<()> {
    // d = 4, one position rotated by 90° in both pairs: (x1, x2) -> (-x2, x1).
    let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], dev)?;
    let cos = Tensor::new(&[[0f32, 0.]], dev)?;
    let sin = Tensor::new(&[[1f32, 1.]], dev)?;
    let y = rope(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(y, [-3., -4., 1., 2.]);
    Ok(())
}
test_device!(rope_known_values, rope_known_values_cpu, rope_known_values_cuda);
