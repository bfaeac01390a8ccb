//! Bad inputs give errors that name the op, the value and the fix.

use candle_core::{DType, Device, Result, Tensor};
use swarm_kernels::{rms_norm, rope, softmax_last_dim, swiglu};

use crate::common::test_device;

fn expect_err(r: Result<Tensor>, needles: &[&str]) {
    let msg = r.expect_err("must fail").to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
}

fn bad_inputs_are_rejected(dev: &Device) -> Result<()> {
    let x = Tensor::zeros((2, 6), DType::F32, dev)?;
    expect_err(rms_norm(&x, &Tensor::ones(5, DType::F32, dev)?, 1e-5), &["rms_norm", "weight", "[5]", "[6]"]);
    expect_err(rms_norm(&x, &Tensor::ones(6, DType::BF16, dev)?, 1e-5), &["rms_norm", "BF16", "F32"]);
    let odd = Tensor::zeros((1, 1, 3, 5), DType::F32, dev)?;
    let table = Tensor::zeros((3, 2), DType::F32, dev)?;
    expect_err(rope(&odd, &table, &table), &["rope", "d even"]);
    let x4 = Tensor::zeros((1, 1, 3, 4), DType::F32, dev)?;
    expect_err(rope(&x4, &Tensor::zeros((4, 2), DType::F32, dev)?, &table), &["rope", "cos", "[3, 2]"]);
    expect_err(swiglu(&x, &Tensor::zeros((6, 2), DType::F32, dev)?), &["swiglu", "up", "[6, 2]"]);
    if dev.is_cpu() {
        // f64 and integers have no fused CPU kernel (the reference takes f64).
        expect_err(softmax_last_dim(&x.to_dtype(DType::F64)?), &["softmax_last_dim", "F64", "reference"]);
        expect_err(softmax_last_dim(&x.to_dtype(DType::U32)?), &["softmax_last_dim", "U32"]);
    }
    Ok(())
}
test_device!(bad_inputs_are_rejected, bad_inputs_cpu, bad_inputs_cuda);
