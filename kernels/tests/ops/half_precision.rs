//! bf16 and f16 storage on the fused CPU path (math in f32) against the f32 reference.

use candle_core::{DType, Device, Result, Tensor};
use swarm_kernels::{cross_entropy, reference, rms_norm, rope, softmax_last_dim, swiglu};

use crate::common::{self, Tol, test_device};

/// Half-precision rounding of inputs, outputs and gradients.
const HALF_TOL: Tol = Tol { fwd: 1e-2, grad: 2e-2 };

/// Runs `op` with its float inputs cast to `dtype`, output cast back to f32.
fn in_dtype(dtype: DType, xs: &[Tensor], op: fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let xs = xs
        .iter()
        .map(|t| if t.dtype() == DType::F32 { t.to_dtype(dtype) } else { Ok(t.clone()) })
        .collect::<Result<Vec<_>>>()?;
    op(&xs)?.to_dtype(DType::F32)
}

type Op = fn(&[Tensor]) -> Result<Tensor>;

fn half_precision_matches_reference(dev: &Device) -> Result<()> {
    let mut rng = common::rng(81);
    let u = |rng: &mut _, dims: &[usize], lo, hi| common::uniform(rng, dims, lo, hi, dev);
    let angles = u(&mut rng, &[5, 4], 0.0, 6.0)?;
    let targets = Tensor::new(&[0u32, 6, 2, 9], dev)?;
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<Tensor>, Vec<bool>, Op, Op)> = vec![
        (
            "rms_norm",
            vec![u(&mut rng, &[4, 24], -2.0, 2.0)?, u(&mut rng, &[24], 0.5, 1.5)?],
            vec![true, true],
            |xs| rms_norm(&xs[0], &xs[1], 1e-5),
            |xs| reference::rms_norm(&xs[0], &xs[1], 1e-5),
        ),
        (
            // Rows of 16-byte vectors (the CUDA kernels' vector path).
            "rms_norm wide",
            vec![u(&mut rng, &[9, 256], -2.0, 2.0)?, u(&mut rng, &[256], 0.5, 1.5)?],
            vec![true, true],
            |xs| rms_norm(&xs[0], &xs[1], 1e-5),
            |xs| reference::rms_norm(&xs[0], &xs[1], 1e-5),
        ),
        (
            // A vocabulary wider than one block of threads.
            "cross_entropy wide",
            vec![u(&mut rng, &[3, 5003], -4.0, 4.0)?, Tensor::new(&[17u32, 5002, 0], dev)?],
            vec![true, false],
            |xs| cross_entropy(&xs[0], &xs[1]),
            |xs| reference::cross_entropy(&xs[0], &xs[1]),
        ),
        (
            // Rows of a multiple of 8 values: the CUDA kernel's 16-byte loads.
            "cross_entropy wide, vectorised",
            vec![u(&mut rng, &[3, 5008], -4.0, 4.0)?, Tensor::new(&[17u32, 5007, 0], dev)?],
            vec![true, false],
            |xs| cross_entropy(&xs[0], &xs[1]),
            |xs| reference::cross_entropy(&xs[0], &xs[1]),
        ),
        (
            "rope",
            vec![u(&mut rng, &[2, 3, 5, 8], -2.0, 2.0)?, angles.cos()?, angles.sin()?],
            vec![true, false, false],
            |xs| rope(&xs[0], &xs[1], &xs[2]),
            |xs| reference::rope(&xs[0], &xs[1], &xs[2]),
        ),
        (
            "swiglu",
            vec![u(&mut rng, &[6, 7], -4.0, 4.0)?, u(&mut rng, &[6, 7], -2.0, 2.0)?],
            vec![true, true],
            |xs| swiglu(&xs[0], &xs[1]),
            |xs| reference::swiglu(&xs[0], &xs[1]),
        ),
        (
            "softmax_last_dim",
            vec![u(&mut rng, &[5, 19], -4.0, 4.0)?],
            vec![true],
            |xs| softmax_last_dim(&xs[0]),
            |xs| reference::softmax_last_dim(&xs[0]),
        ),
        (
            "cross_entropy",
            vec![u(&mut rng, &[4, 11], -4.0, 4.0)?, targets],
            vec![true, false],
            |xs| cross_entropy(&xs[0], &xs[1]),
            |xs| reference::cross_entropy(&xs[0], &xs[1]),
        ),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for (name, xs, diff, fused, unfused) in &cases {
            let fused = |xs: &[Tensor]| in_dtype(dtype, xs, *fused);
            common::compare(&format!("{name} {dtype:?}"), &mut rng, xs, diff, &fused, unfused, HALF_TOL)?;
        }
    }
    Ok(())
}
test_device!(half_precision_matches_reference, half_precision_cpu, half_precision_cuda);
