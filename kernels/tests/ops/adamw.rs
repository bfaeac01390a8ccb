use rand::Rng;
use swarm_kernels::{AdamW, adamw_step, adamw_step_reference};

use crate::common;

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-6)).fold(0.0, f32::max)
}

#[test]
fn adamw_matches_reference_over_steps() {
    let mut rng = common::rng(61);
    let cfg = AdamW { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    // A small buffer (one pass on the calling thread) and a large one (parallel chunks).
    for n in [37, 100_003] {
        let mut p: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut p_ref, mut m_ref, mut v_ref) = (p.clone(), m.clone(), v.clone());
        for step in 1..=5 {
            let g: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
            adamw_step(&cfg, step, &mut p, &g, &mut m, &mut v);
            adamw_step_reference(&cfg, step, &mut p_ref, &g, &mut m_ref, &mut v_ref);
            for (what, a, b) in [("params", &p, &p_ref), ("m", &m, &m_ref), ("v", &v, &v_ref)] {
                let e = max_rel_diff(a, b);
                assert!(e <= 1e-6, "n={n} step {step}: {what} differ by {e:.2e}");
            }
        }
    }
}

#[test]
fn adamw_single_step_by_hand() {
    // Step 1 from zero moments: the bias corrections make the update lr * g / |g| (+ eps).
    // p = 1, lr = 0.1, wd = 0.01: decay to 0.999, then -/+ 0.1.
    let cfg = AdamW { lr: 0.1, weight_decay: 0.01, ..AdamW::default() };
    let mut p = vec![1.0f32, 1.0, 2.0];
    let g = [0.5f32, -2.0, 0.0];
    let (mut m, mut v) = (vec![0f32; 3], vec![0f32; 3]);
    adamw_step(&cfg, 1, &mut p, &g, &mut m, &mut v);
    let want_p = [0.999 - 0.1, 0.999 + 0.1, 2.0 * 0.999];
    let want_m = [0.05, -0.2, 0.0];
    let want_v = [0.00025, 0.004, 0.0];
    for i in 0..3 {
        assert!((p[i] - want_p[i]).abs() <= 1e-6, "p[{i}] = {}, want {}", p[i], want_p[i]);
        assert!((m[i] - want_m[i]).abs() <= 1e-7, "m[{i}] = {}, want {}", m[i], want_m[i]);
        assert!((v[i] - want_v[i]).abs() <= 1e-8, "v[{i}] = {}, want {}", v[i], want_v[i]);
    }
    // Step 2 with the same gradient, by hand in f64 from the formulas.
    let (b1, b2, lr, wd, eps) = (0.9f64, 0.999f64, 0.1f64, 0.01f64, 1e-8f64);
    let mut want = Vec::new();
    for i in 0..2 {
        let gi = f64::from(g[i]);
        let m2 = f64::from(m[i]) + (1.0 - b1) * (gi - f64::from(m[i]));
        let v2 = b2 * f64::from(v[i]) + (1.0 - b2) * gi * gi;
        let denom = v2.sqrt() / (1.0 - b2 * b2).sqrt() + eps;
        want.push(f64::from(p[i]) * (1.0 - lr * wd) - lr / (1.0 - b1 * b1) * m2 / denom);
    }
    adamw_step(&cfg, 2, &mut p, &g, &mut m, &mut v);
    for i in 0..2 {
        assert!((f64::from(p[i]) - want[i]).abs() <= 1e-6, "step 2: p[{i}] = {}, want {}", p[i], want[i]);
    }
}

#[test]
#[should_panic(expected = "differ in length")]
fn adamw_rejects_mismatched_buffers() {
    let mut p = vec![0f32; 3];
    let (mut m, mut v) = (vec![0f32; 3], vec![0f32; 2]);
    adamw_step(&AdamW::default(), 1, &mut p, &[0.0; 3], &mut m, &mut v);
}

/// The CUDA AdamW kernel (f32 master and moments, bf16 and f32 parameter copies, clipping scale,
/// decay segments) against the reference on the host.
#[cfg(feature = "cuda")]
#[test]
fn device_adamw_matches_reference() -> candle_core::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use swarm_kernels::DeviceAdamW;
    let dev = Device::new_cuda(0)?;
    let mut rng = common::rng(62);
    let n = 300_007;
    let split = 123_457; // two segments: the first decays, the second does not
    let cfg = AdamW { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let p0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (mut p_ref, mut m_ref, mut v_ref) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
    let mut opt = DeviceAdamW::new(&dev, &p0, &vec![0f32; n], &vec![0f32; n])?;
    // Parameters out in bf16 or f32; gradients in f32 or bf16 (the reference gets the same
    // bf16-rounded values).
    for (out_dtype, grad_dtype) in [(DType::BF16, DType::F32), (DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
        let out = Tensor::zeros(n, out_dtype, &dev)?;
        for step in 1..=3u64 {
            let g: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
            let scale = 0.5f32;
            let gd = Tensor::from_slice(&g, n, &dev)?.to_dtype(grad_dtype)?;
            let g: Vec<f32> = gd.to_dtype(DType::F32)?.to_vec1()?;
            opt.step(&cfg, step, 0..split, scale, &gd, Some(&out))?;
            let no_decay = AdamW { weight_decay: 0.0, ..cfg };
            opt.step(&no_decay, step, split..n, scale, &gd, Some(&out))?;
            let gs: Vec<f32> = g.iter().map(|x| x * scale).collect();
            adamw_step_reference(
                &cfg,
                step,
                &mut p_ref[..split],
                &gs[..split],
                &mut m_ref[..split],
                &mut v_ref[..split],
            );
            adamw_step_reference(
                &no_decay,
                step,
                &mut p_ref[split..],
                &gs[split..],
                &mut m_ref[split..],
                &mut v_ref[split..],
            );
            let (p, m, v) = opt.to_host()?;
            // The GPU contracts multiply-adds into FMAs, so elements differ in the last bits:
            // bound the largest absolute difference (values are O(1) or smaller).
            for (what, a, b) in [("params", &p, &p_ref), ("m", &m, &m_ref), ("v", &v, &v_ref)] {
                let e = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(e <= 1e-6, "{out_dtype:?} {grad_dtype:?} step {step}: {what} differ by up to {e:.2e}");
            }
            // The parameter copy is the master weights rounded to the copy's dtype.
            let want = Tensor::from_slice(&p, n, &dev)?.to_dtype(out_dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let got = out.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert_eq!(got, want, "{out_dtype:?} step {step}: parameter copy");
        }
        // Reset the reference and the device state for the next dtype.
        p_ref.copy_from_slice(&p0);
        m_ref.fill(0.0);
        v_ref.fill(0.0);
        opt = DeviceAdamW::new(&dev, &p0, &vec![0f32; n], &vec![0f32; n])?;
    }
    Ok(())
}

/// The gradient-norm reduction against f64 on the host.
#[cfg(feature = "cuda")]
#[test]
fn sum_squares_matches_f64() -> candle_core::Result<()> {
    let dev = candle_core::Device::new_cuda(0)?;
    let mut rng = common::rng(63);
    for n in [1usize, 1000, 1_234_567] {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let want: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
        let t = candle_core::Tensor::from_slice(&x, n, &dev)?;
        let got = swarm_kernels::sum_squares(&t)?;
        assert!((got - want).abs() <= 1e-5 * want, "n={n}: {got} vs {want}");
        // bf16: the sum of the rounded values.
        let tb = t.to_dtype(candle_core::DType::BF16)?;
        let xb: Vec<f32> = tb.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let want: f64 = xb.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
        let got = swarm_kernels::sum_squares(&tb)?;
        assert!((got - want).abs() <= 1e-5 * want, "bf16 n={n}: {got} vs {want}");
    }
    Ok(())
}
