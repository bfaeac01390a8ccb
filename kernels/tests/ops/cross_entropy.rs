use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use swarm_kernels::{cross_entropy, reference};

use crate::common::{self, F32_TOL, FD_F32, FD_F64, test_device};

fn fused(xs: &[Tensor]) -> Result<Tensor> {
    cross_entropy(&xs[0], &xs[1])
}

fn unfused(xs: &[Tensor]) -> Result<Tensor> {
    reference::cross_entropy(&xs[0], &xs[1])
}

fn targets(rng: &mut StdRng, n: usize, v: usize, dev: &Device) -> Result<Tensor> {
    let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    Tensor::from_vec(t, n, dev)
}

fn inputs(rng: &mut StdRng, n: usize, v: usize, dev: &Device) -> Result<Vec<Tensor>> {
    Ok(vec![common::uniform(rng, &[n, v], -5.0, 5.0, dev)?, targets(rng, n, v, dev)?])
}

fn cross_entropy_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(51);
    // Two classes, odd sizes, and a vocabulary large enough to run in parallel.
    for (n, v) in [(1, 2), (5, 17), (33, 1000), (7, 3001)] {
        let xs = inputs(&mut rng, n, v, dev)?;
        let what = format!("cross_entropy n={n} v={v}");
        common::compare(&what, &mut rng, &xs, &[true, false], &fused, &unfused, F32_TOL)?;
        let loss = fused(&xs)?;
        assert_eq!(loss.rank(), 0, "{what}: the loss is a scalar");
    }
    // Logits far apart (exp(80) overflows f32 without the running maximum), a row whose
    // maximum comes late in every thread's slice, and one of equal logits.
    let (n, v) = (3, 1024);
    let mut l = common::uniform(&mut rng, &[n, v], -80.0, 80.0, dev)?.to_vec2::<f32>()?;
    l[1] = (0..v).map(|i| i as f32 / 8.0).collect();
    l[2] = vec![3.0; v];
    let xs = vec![Tensor::new(l, dev)?, targets(&mut rng, n, v, dev)?];
    common::compare("cross_entropy wide range", &mut rng, &xs, &[true, false], &fused, &unfused, F32_TOL)?;
    // Logits stored as [v, n] and used transposed.
    let (n, v) = (6, 23);
    let xs = vec![common::uniform(&mut rng, &[v, n], -5.0, 5.0, dev)?, targets(&mut rng, n, v, dev)?];
    let t = |f: fn(&[Tensor]) -> Result<Tensor>| move |xs: &[Tensor]| f(&[xs[0].t()?, xs[1].clone()]);
    common::compare("cross_entropy logits^T", &mut rng, &xs, &[true, false], &t(fused), &t(unfused), F32_TOL)
}
test_device!(
    cross_entropy_matches_reference,
    cross_entropy_matches_reference_cpu,
    cross_entropy_matches_reference_cuda
);

fn cross_entropy_known_value(dev: &Device) -> Result<()> {
    // Uniform logits over 4 classes: loss ln 4, gradient (1/4 - onehot) / n.
    let var = candle_core::Var::from_tensor(&Tensor::zeros((2, 4), candle_core::DType::F32, dev)?)?;
    let t = Tensor::new(&[1u32, 3], dev)?;
    let loss = cross_entropy(var.as_tensor(), &t)?;
    assert!((loss.to_scalar::<f32>()? - 4f32.ln()).abs() < 1e-6);
    let g = loss.backward()?.get(var.as_tensor()).expect("gradient").to_vec2::<f32>()?;
    assert_eq!(g, [[0.125, -0.375, 0.125, 0.125], [0.125, 0.125, 0.125, -0.375]]);
    Ok(())
}
test_device!(cross_entropy_known_value, cross_entropy_known_value_cpu, cross_entropy_known_value_cuda);

fn cross_entropy_finite_differences(dev: &Device) -> Result<()> {
    let mut rng = common::rng(52);
    let xs = inputs(&mut rng, 3, 8, dev)?;
    let (h, tol) = FD_F32;
    common::finite_differences("cross_entropy fused f32", &mut rng, &xs, &[true, false], &fused, 6, h, tol)?;
    let (h, tol) = FD_F64;
    let xs = common::to_f64(&xs)?;
    common::finite_differences("cross_entropy reference f64", &mut rng, &xs, &[true, false], &unfused, 6, h, tol)
}
test_device!(cross_entropy_finite_differences, cross_entropy_fd_cpu, cross_entropy_fd_cuda);

fn cross_entropy_rejects_bad_targets(dev: &Device) -> Result<()> {
    let logits = Tensor::zeros((2, 4), candle_core::DType::F32, dev)?;
    if dev.is_cpu() {
        // The fused kernel checks every target (the reference's gather on a GPU need not).
        let err = cross_entropy(&logits, &Tensor::new(&[1u32, 4], dev)?).expect_err("target 4 of 4");
        let msg = err.to_string();
        assert!(msg.contains("target 4 at row 1") && msg.contains("4 logits"), "{msg}");
    }
    let err = cross_entropy(&logits, &Tensor::new(&[1u32, 2, 3], dev)?).expect_err("3 targets for 2 rows");
    assert!(err.to_string().contains("targets has shape [3]"), "{err}");
    let err = cross_entropy(&logits, &Tensor::new(&[1i64, 2], dev)?).expect_err("i64 targets");
    assert!(err.to_string().contains("I64"), "{err}");
    Ok(())
}
test_device!(cross_entropy_rejects_bad_targets, cross_entropy_bad_targets_cpu, cross_entropy_bad_targets_cuda);
