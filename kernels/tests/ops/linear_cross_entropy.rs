use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use swarm_kernels::{linear_cross_entropy, reference};

use crate::common::{self, F32_TOL, Tol, test_device};

fn inputs(rng: &mut rand::rngs::StdRng, n: usize, h: usize, v: usize, dev: &Device) -> Result<Vec<Tensor>> {
    let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    Ok(vec![
        common::uniform(rng, &[n, h], -1.0, 1.0, dev)?,
        common::uniform(rng, &[v, h], -0.5, 0.5, dev)?,
        Tensor::from_vec(t, n, dev)?,
    ])
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::cross_entropy(&xs[0].matmul(&xs[1].t()?)?, &xs[2])
}

fn linear_cross_entropy_matches_unfused(dev: &Device) -> Result<()> {
    let mut rng = common::rng(91);
    // Chunks of one row, a chunk that does not divide n, and one chunk for everything.
    for (n, h, v, chunk) in [(7, 16, 33, 1), (13, 24, 101, 5), (13, 24, 101, 64), (40, 32, 1500, 16)] {
        let xs = inputs(&mut rng, n, h, v, dev)?;
        let fused = move |xs: &[Tensor]| linear_cross_entropy(&xs[0], &xs[1], &xs[2], chunk);
        let what = format!("linear_cross_entropy n={n} h={h} v={v} chunk={chunk}");
        common::compare(&what, &mut rng, &xs, &[true, true, false], &fused, &unfused, F32_TOL)?;
    }
    // bf16 inputs (the GPU training dtype) against the f32 reference on the same values.
    let xs = inputs(&mut rng, 24, 32, 257, dev)?;
    let fused = |xs: &[Tensor]| {
        let (x, w) = (xs[0].to_dtype(DType::BF16)?, xs[1].to_dtype(DType::BF16)?);
        linear_cross_entropy(&x, &w, &xs[2], 7)
    };
    let tol = Tol { fwd: 1e-2, grad: 3e-2 };
    common::compare("linear_cross_entropy bf16", &mut rng, &xs, &[true, true, false], &fused, &unfused, tol)
}
test_device!(linear_cross_entropy_matches_unfused, linear_cross_entropy_cpu, linear_cross_entropy_cuda);
