//! Gradients must reach every input through our ops, and the check must catch an op without
//! backward (what candle_nn's fused rms_norm / softmax / rope do: `apply_op*_no_bwd`).

use candle_core::{CpuStorage, CustomOp2, D, Device, Layout, Result, Shape, Tensor, Var};
use swarm_kernels::{cross_entropy, rms_norm, rope, softmax_last_dim, swiglu};

use crate::common::{self, test_device};

/// The names of the variables that got no finite, non-zero gradient from `loss`.
fn unreached(loss: &Tensor, vars: &[(&str, &Var)]) -> Result<Vec<String>> {
    let grads = loss.backward()?;
    let mut missing = Vec::new();
    for (name, var) in vars {
        let ok = match grads.get(var.as_tensor()) {
            None => false,
            Some(g) => {
                let v = g.flatten_all()?.to_vec1::<f32>()?;
                v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0)
            }
        };
        if !ok {
            missing.push(name.to_string());
        }
    }
    Ok(missing)
}

/// A small attention + MLP block built only from our ops (and matmuls), ending in the loss.
fn block_gradients_reach_every_input(dev: &Device) -> Result<()> {
    let mut rng = common::rng(71);
    let (b, s, heads, hd, ffn, vocab) = (2, 5, 2, 6, 10, 13);
    let dm = heads * hd;
    let var = |rng: &mut _, dims: &[usize], lo, hi| Var::from_tensor(&common::uniform(rng, dims, lo, hi, dev)?);
    let x = var(&mut rng, &[b * s, dm], -1.0, 1.0)?;
    let norm = var(&mut rng, &[dm], 0.5, 1.5)?;
    let w_gate = var(&mut rng, &[dm, ffn], -0.5, 0.5)?;
    let w_up = var(&mut rng, &[dm, ffn], -0.5, 0.5)?;
    let w_out = var(&mut rng, &[ffn, vocab], -0.5, 0.5)?;
    let angles = common::uniform(&mut rng, &[s, hd / 2], 0.0, 3.0, dev)?;
    let mask: Vec<f32> = (0..s * s).map(|k| if k % s > k / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (s, s), dev)?;

    let h = rms_norm(x.as_tensor(), norm.as_tensor(), 1e-5)?;
    let q = h.reshape((b, s, heads, hd))?.transpose(1, 2)?;
    let q = rope(&q, &angles.cos()?, &angles.sin()?)?;
    let scores = q.matmul(&q.transpose(2, 3)?.contiguous()?)?.broadcast_add(&mask)?;
    let attn = softmax_last_dim(&scores)?.matmul(&q)?;
    let a = (attn.transpose(1, 2)?.reshape((b * s, dm))? + &h)?;
    let mlp = swiglu(&a.matmul(w_gate.as_tensor())?, &a.matmul(w_up.as_tensor())?)?;
    let logits = mlp.matmul(w_out.as_tensor())?;
    let targets = Tensor::from_vec((0..(b * s) as u32).map(|i| i % vocab as u32).collect(), b * s, dev)?;
    let loss = cross_entropy(&logits, &targets)?;

    let vars = [("x", &x), ("norm", &norm), ("w_gate", &w_gate), ("w_up", &w_up), ("w_out", &w_out)];
    let missing = unreached(&loss, &vars)?;
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
    Ok(())
}
test_device!(block_gradients_reach_every_input, block_gradients_cpu, block_gradients_cuda);

/// RMSNorm as candle_nn applies it on contiguous input: a fused op without backward.
struct NoBackwardRmsNorm;

impl CustomOp2 for NoBackwardRmsNorm {
    fn name(&self) -> &'static str {
        "no_backward_rms_norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
        let (x, w) = (&x[l1.start_offset()..], &w[l2.start_offset()..]);
        let d = l1.dims()[l1.dims().len() - 1];
        let mut out = Vec::with_capacity(l1.shape().elem_count());
        for row in x[..l1.shape().elem_count()].chunks(d) {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-5).sqrt();
            out.extend(row.iter().zip(w).map(|(v, w)| v * inv * w));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[test]
fn the_check_catches_an_op_without_backward() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = common::rng(72);
    let x = Var::from_tensor(&common::uniform(&mut rng, &[3, 8], -1.0, 1.0, &dev)?)?;
    let w = Var::from_tensor(&common::uniform(&mut rng, &[8], 0.5, 1.5, &dev)?)?;
    let r = common::uniform(&mut rng, &[3, 8], -1.0, 1.0, &dev)?;
    let vars = [("x", &x), ("w", &w)];

    let stopped = x.as_tensor().apply_op2_no_bwd(w.as_tensor(), &NoBackwardRmsNorm)?;
    let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
    // Same values, but only ours carries gradients.
    common::assert_close("no-backward op vs ours", &stopped, &ours, 1e-6)?;
    let loss = |y: &Tensor| (y * &r)?.sum(D::Minus1)?.sum_all();
    assert_eq!(unreached(&loss(&stopped)?, &vars)?, ["x", "w"]);
    assert!(unreached(&loss(&ours)?, &vars)?.is_empty());
    Ok(())
}
