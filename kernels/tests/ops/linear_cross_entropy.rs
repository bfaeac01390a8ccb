use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use swarm_kernels::{
    add_into, add_matmul_tn, add_rows_into, linear_cross_entropy, linear_cross_entropy_blocks, reference, scale_by,
};

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
    // A vocabulary of a multiple of 8 too: the CUDA loss kernels' 16-byte path.
    for v in [257, 256] {
        let xs = inputs(&mut rng, 24, 32, v, dev)?;
        let fused = |xs: &[Tensor]| {
            let (x, w) = (xs[0].to_dtype(DType::BF16)?, xs[1].to_dtype(DType::BF16)?);
            linear_cross_entropy(&x, &w, &xs[2], 7)
        };
        let tol = Tol { fwd: 1e-2, grad: 3e-2 };
        let what = format!("linear_cross_entropy bf16 v={v}");
        common::compare(&what, &mut rng, &xs, &[true, true, false], &fused, &unfused, tol)?;
    }
    Ok(())
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

/// `add_matmul_tn` (`acc += aᵀ · b`, the fused LM head's weight-gradient update) against
/// `acc + a.t().matmul(b)` in f64, on a narrowed destination, in f32 and bf16, with blocks that
/// do and do not divide the rows (the CPU path) and shapes that are not multiples of 8.
fn add_matmul_tn_matches_matmul_then_add(dev: &Device) -> Result<()> {
    let mut rng = common::rng(94);
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        for (k, m, n, block) in [(5, 7, 3, 7), (33, 19, 24, 4), (64, 130, 72, 1000), (9, 6, 5, 1)] {
            let big = common::uniform(&mut rng, &[m + 3, n], -1.0, 1.0, dev)?.to_dtype(dtype)?;
            let before = big.to_dtype(DType::F64)?;
            let a = common::uniform(&mut rng, &[k, m], -1.0, 1.0, dev)?.to_dtype(dtype)?;
            let b = common::uniform(&mut rng, &[k, n], -1.0, 1.0, dev)?.to_dtype(dtype)?;
            let want = (before.narrow(0, 1, m)? + a.to_dtype(DType::F64)?.t()?.matmul(&b.to_dtype(DType::F64)?)?)?;
            let acc = big.narrow(0, 1, m)?;
            add_matmul_tn(&acc, &a, &b, block)?;
            let what = format!("add_matmul_tn {dtype:?} k={k} m={m} n={n} block={block}");
            common::assert_close(&what, &acc.to_dtype(DType::F64)?, &want, tol)?;
            // Only the view's rows change.
            for (r0, len) in [(0, 1), (m + 1, 2)] {
                let got = big.narrow(0, r0, len)?.to_dtype(DType::F64)?;
                common::assert_close(&format!("{what}: rows outside"), &got, &before.narrow(0, r0, len)?, 0.0)?;
            }
        }
    }
    let acc = Tensor::zeros((4, 3), DType::F32, dev)?;
    let a = Tensor::zeros((2, 5), DType::F32, dev)?;
    let err = add_matmul_tn(&acc, &a, &Tensor::zeros((2, 3), DType::F32, dev)?, 4).expect_err("m mismatch").to_string();
    assert!(err.contains("add_matmul_tn") && err.contains("[2, 5]"), "{err}");
    Ok(())
}
test_device!(add_matmul_tn_matches_matmul_then_add, add_matmul_tn_cpu, add_matmul_tn_cuda);

/// `add_rows_into` (a pipeline's tied-embedding rows joining the head's gradient) against a dense
/// f64 `index_add` then add, in f32 and bf16, on a narrowed destination; rows not named stay
/// bit-equal; repeated and out-of-range ids are errors naming the id.
fn add_rows_into_matches_dense_index_add(dev: &Device) -> Result<()> {
    let mut rng = common::rng(95);
    let ids = [7u32, 0, 12, 3, 9];
    for (dtype, tol) in [(DType::F32, 1e-7), (DType::BF16, 4e-3)] {
        let big = common::uniform(&mut rng, &[15, 33], -1.0, 1.0, dev)?.to_dtype(dtype)?;
        let before = big.to_dtype(DType::F64)?;
        let x = common::uniform(&mut rng, &[ids.len(), 33], -1.0, 1.0, dev)?;
        let acc = big.narrow(0, 1, 13)?;
        let at = Tensor::new(&ids, dev)?;
        let want = before.narrow(0, 1, 13)?.index_add(&at, &x.to_dtype(DType::F64)?, 0)?;
        add_rows_into(&acc, &ids, &x)?;
        let what = format!("add_rows_into {dtype:?}");
        common::assert_close(&what, &acc.to_dtype(DType::F64)?, &want, tol)?;
        for r in (0..13).filter(|r| !ids.contains(&(*r as u32))) {
            let (got, was) = (acc.narrow(0, r, 1)?.to_dtype(DType::F64)?, before.narrow(0, r + 1, 1)?);
            common::assert_close(&format!("{what}: row {r} not named"), &got, &was, 0.0)?;
        }
        for r0 in [0, 14] {
            let (got, was) = (big.narrow(0, r0, 1)?.to_dtype(DType::F64)?, before.narrow(0, r0, 1)?);
            common::assert_close(&format!("{what}: rows outside the view"), &got, &was, 0.0)?;
        }
    }
    let acc = Tensor::zeros((4, 3), DType::F32, dev)?;
    let x = Tensor::zeros((2, 3), DType::F32, dev)?;
    let err = add_rows_into(&acc, &[1, 1], &x).expect_err("repeated id").to_string();
    assert!(err.contains("add_rows_into") && err.contains("id 1 appears twice"), "{err}");
    let err = add_rows_into(&acc, &[1, 4], &x).expect_err("id out of range").to_string();
    assert!(err.contains("below 4") && err.contains("got 4"), "{err}");
    add_rows_into(&acc, &[], &Tensor::zeros((0, 3), DType::F32, dev)?)?;
    Ok(())
}
test_device!(add_rows_into_matches_dense_index_add, add_rows_into_cpu, add_rows_into_cuda);
