use candle_core::{Device, Result, Tensor, Var};
use swarm_kernels::{reference, softmax_last_dim};

use crate::common::{self, F32_TOL, FD_F32, FD_F64, test_device};

fn fused(xs: &[Tensor]) -> Result<Tensor> {
    softmax_last_dim(&xs[0])
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::softmax_last_dim(&xs[0])
}

fn softmax_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(41);
    // Two elements, odd sizes, batch dims, and one large enough to run in parallel.
    for dims in [&[1usize, 2][..], &[4, 9], &[2, 3, 17], &[64, 600]] {
        let xs = vec![common::uniform(&mut rng, dims, -4.0, 4.0, dev)?];
        common::compare(&format!("softmax {dims:?}"), &mut rng, &xs, &[true], &fused, &unfused, F32_TOL)?;
    }
    // Strided input rows (unit last stride), with the output transposed back so that the
    // gradient reaching the op is strided as well; then a strided last dimension.
    let xs = vec![common::uniform(&mut rng, &[5, 3, 19], -4.0, 4.0, dev)?];
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].transpose(0, 1)?])?.transpose(0, 1);
    common::compare("softmax strided rows", &mut rng, &xs, &[true], &t(fused), &t(unfused), F32_TOL)?;
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].transpose(1, 2)?]);
    common::compare("softmax strided last dim", &mut rng, &xs, &[true], &t(fused), &t(unfused), F32_TOL)
}
test_device!(softmax_matches_reference, softmax_matches_reference_cpu, softmax_matches_reference_cuda);

/// `[s, s]` with 0 on and below the diagonal and `-inf` above (a causal mask).
fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..s * s).map(|k| if k % s > k / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (s, s), dev)
}

fn softmax_causal_mask(dev: &Device) -> Result<()> {
    let mut rng = common::rng(42);
    let (b, h, s) = (2, 3, 11);
    let mask = causal_mask(s, dev)?;
    let masked = |f: fn(&[Tensor]) -> Result<Tensor>| {
        let mask = mask.clone();
        move |xs: &[Tensor]| f(&[xs[0].broadcast_add(&mask)?])
    };
    let scores = common::uniform(&mut rng, &[b, h, s, s], -3.0, 3.0, dev)?;
    common::compare(
        "softmax causal",
        &mut rng,
        std::slice::from_ref(&scores),
        &[true],
        &masked(fused),
        &masked(unfused),
        F32_TOL,
    )?;

    // Masked entries: probability exactly 0 and gradient exactly 0; rows sum to 1.
    let var = Var::from_tensor(&scores)?;
    let y = masked(fused)(&[var.as_tensor().clone()])?;
    let r = common::uniform(&mut rng, &[b, h, s, s], -1.0, 1.0, dev)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let g = grads.get(var.as_tensor()).expect("gradient reaches the scores");
    let y = y.flatten_all()?.to_vec1::<f32>()?;
    let g = g.flatten_all()?.to_vec1::<f32>()?;
    for (k, (&p, &gk)) in y.iter().zip(&g).enumerate() {
        let (row, col) = ((k / s) % s, k % s);
        if col > row {
            assert_eq!((p, gk), (0.0, 0.0), "masked entry {k} (row {row}, col {col})");
        } else {
            assert!(p > 0.0 && gk.is_finite(), "visible entry {k}: p {p}, grad {gk}");
        }
    }
    for row in y.chunks(s) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "row sums to {sum}");
    }
    Ok(())
}
test_device!(softmax_causal_mask, softmax_causal_mask_cpu, softmax_causal_mask_cuda);

fn softmax_fully_masked_row_is_zero(dev: &Device) -> Result<()> {
    if !dev.is_cpu() {
        return Ok(()); // the reference path gives NaN here; only the fused kernel promises 0
    }
    let x = Tensor::new(&[[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, f32::NEG_INFINITY]], dev)?;
    let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
    assert_eq!(y, [[0.0, 0.0], [1.0, 0.0]]);
    Ok(())
}
test_device!(softmax_fully_masked_row_is_zero, softmax_fully_masked_row_cpu, softmax_fully_masked_row_cuda);

fn softmax_finite_differences(dev: &Device) -> Result<()> {
    let mut rng = common::rng(43);
    let xs = vec![common::uniform(&mut rng, &[3, 7], -2.0, 2.0, dev)?];
    let (h, tol) = FD_F32;
    common::finite_differences("softmax fused f32", &mut rng, &xs, &[true], &fused, 6, h, tol)?;
    let (h, tol) = FD_F64;
    let xs = common::to_f64(&xs)?;
    common::finite_differences("softmax reference f64", &mut rng, &xs, &[true], &unfused, 6, h, tol)
}
test_device!(softmax_finite_differences, softmax_fd_cpu, softmax_fd_cuda);
