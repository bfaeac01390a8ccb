//! Every fused op against its unfused reference (values and gradients) and against finite
//! differences, on every device present; AdamW against its multi-pass reference.

mod common;

mod adamw;
mod attention;
mod cross_entropy;
mod errors;
mod grads_reach;
mod half_precision;
mod linear_cross_entropy;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;
