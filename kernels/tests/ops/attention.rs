use candle_core::{DType, Device, Result, Tensor};
use swarm_kernels::{causal_attention, reference};

use crate::common::{self, F32_TOL, Tol, test_device};

/// bf16 operands (flash attention on CUDA) against the f32 reference on the same values.
const BF16_TOL: Tol = Tol { fwd: 1e-2, grad: 2e-2 };

fn inputs(
    rng: &mut rand::rngs::StdRng,
    b: usize,
    h: usize,
    hkv: usize,
    s: usize,
    d: usize,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    Ok(vec![
        common::uniform(rng, &[b, h, s, d], -2.0, 2.0, dev)?,
        common::uniform(rng, &[b, hkv, s, d], -2.0, 2.0, dev)?,
        common::uniform(rng, &[b, hkv, s, d], -2.0, 2.0, dev)?,
    ])
}

fn causal_attention_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(101);
    // One token, a tail that is not a tile multiple, GQA groups of 1, 2 and 4, both head sizes
    // the flash kernels take.
    for (b, h, hkv, s, d) in [(1, 2, 1, 1, 64), (2, 4, 2, 77, 64), (1, 4, 4, 130, 128), (1, 4, 1, 200, 64)] {
        let xs = inputs(&mut rng, b, h, hkv, s, d, dev)?;
        // With one token the softmax is 1 whatever q and k are: only v has a gradient.
        let diff = if s == 1 { [false, false, true] } else { [true; 3] };
        let scale = 1.0 / (d as f64).sqrt();
        let unfused = move |xs: &[Tensor]| reference::causal_attention(&xs[0], &xs[1], &xs[2], scale);
        let what = format!("causal_attention b={b} h={h} hkv={hkv} s={s} d={d}");
        let f32_op = move |xs: &[Tensor]| causal_attention(&xs[0], &xs[1], &xs[2], scale);
        common::compare(&format!("{what} f32"), &mut rng, &xs, &diff, &f32_op, &unfused, F32_TOL)?;
        let bf16_op = move |xs: &[Tensor]| {
            let c = |t: &Tensor| t.to_dtype(DType::BF16);
            causal_attention(&c(&xs[0])?, &c(&xs[1])?, &c(&xs[2])?, scale)?.to_dtype(DType::F32)
        };
        common::compare(&format!("{what} bf16"), &mut rng, &xs, &diff, &bf16_op, &unfused, BF16_TOL)?;
    }
    Ok(())
}
test_device!(causal_attention_matches_reference, causal_attention_cpu, causal_attention_cuda);
