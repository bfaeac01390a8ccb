use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use swarm_kernels::{add_into, linear_cross_entropy, linear_cross_entropy_blocks, reference, scale_by};

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
    // The weight gradient built in vocabulary blocks (one that does not divide v, and one row).
    for (n, h, v, chunk, block) in [(13, 24, 101, 5, 32), (9, 8, 17, 4, 1)] {
        let xs = inputs(&mut rng, n, h, v, dev)?;
        let fused = move |xs: &[Tensor]| linear_cross_entropy_blocks(&xs[0], &xs[1], &xs[2], chunk, block);
        let what = format!("linear_cross_entropy n={n} h={h} v={v} chunk={chunk} block={block}");
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

/// The gradients are computed in the forward pass and handed over once: a second backward on
/// the same graph is an error, not gradients scaled twice.
fn linear_cross_entropy_backward_runs_once(dev: &Device) -> Result<()> {
    let mut rng = common::rng(92);
    let xs = inputs(&mut rng, 6, 8, 11, dev)?;
    let x = candle_core::Var::from_tensor(&xs[0])?;
    let loss = (linear_cross_entropy(x.as_tensor(), &xs[1], &xs[2], 4)? * 0.5)?;
    let g = loss.backward()?;
    assert!(g.get(x.as_tensor()).is_some());
    let err = loss.backward().expect_err("a second backward must fail").to_string();
    assert!(err.contains("backward ran twice"), "{err}");
    Ok(())
}
test_device!(linear_cross_entropy_backward_runs_once, lce_backward_once_cpu, lce_backward_once_cuda);

/// `add_into` and `scale_by` against `+` and `*` on random inputs, in f32 and bf16, on a
/// narrowed destination (a view into a larger buffer: only its rows change).
fn in_place_updates_match_out_of_place(dev: &Device) -> Result<()> {
    let mut rng = common::rng(93);
    for dtype in [DType::F32, DType::BF16] {
        let big = common::uniform(&mut rng, &[10, 33], -1.0, 1.0, dev)?.to_dtype(dtype)?;
        let before = big.copy()?;
        let x = common::uniform(&mut rng, &[4, 33], -1.0, 1.0, dev)?.to_dtype(dtype)?;
        let dst = big.narrow(0, 3, 4)?;
        let want = (before.narrow(0, 3, 4)?.to_dtype(DType::F32)? + x.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        add_into(&dst, &x)?;
        common::assert_close(&format!("add_into {dtype:?}"), &dst, &want, 0.0)?;
        common::assert_close(
            &format!("add_into {dtype:?}: rows before"),
            &big.narrow(0, 0, 3)?,
            &before.narrow(0, 0, 3)?,
            0.0,
        )?;
        common::assert_close(
            &format!("add_into {dtype:?}: rows after"),
            &big.narrow(0, 7, 3)?,
            &before.narrow(0, 7, 3)?,
            0.0,
        )?;
        let g = Tensor::new(&[-0.37f64], dev)?;
        let want = (dst.to_dtype(DType::F32)? * -0.37)?.to_dtype(dtype)?;
        scale_by(&dst, &g)?;
        common::assert_close(&format!("scale_by {dtype:?}"), &dst, &want, 1e-7)?;
    }
    let a = Tensor::zeros((2, 3), DType::F32, dev)?;
    let err = add_into(&a, &Tensor::zeros((3, 2), DType::F32, dev)?).expect_err("shape mismatch").to_string();
    assert!(err.contains("add_into") && err.contains("[3, 2]"), "{err}");
    Ok(())
}
test_device!(in_place_updates_match_out_of_place, in_place_updates_cpu, in_place_updates_cuda);
