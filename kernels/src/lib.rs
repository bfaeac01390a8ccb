//! Differentiable fused operations for training Llama-family models with candle.
//!
//! candle's own fused `rms_norm`, `softmax_last_dim` and `rope` have no backward: gradients
//! silently stop there. Every op here is a candle custom op with a backward, so
//! `Tensor::backward()` reaches every input that needs a gradient.
//!
//! # Architecture Invariant
//! - Every op has three parts: a fused CPU forward, a backward (itself a fused CPU kernel where
//!   it matters, with all math in f32), and an unfused [`reference`](mod@reference) built from plain
//!   differentiable candle ops. Tests compare fused against reference (values and gradients of
//!   every input) on random inputs on every backend present, and check the reference against
//!   finite differences.
//! - No I/O, no global state, no threads of its own beyond rayon's pool. Results do not
//!   depend on the number of threads (parallel reductions sum fixed chunks in a fixed order).
//! - A device without a fused kernel (today: every non-CPU device) takes the reference path;
//!   a CUDA kernel is added per op as that op's `cuda_fwd`, and its public function then stops
//!   falling back.
//!
//! # API Boundary
//! The five tensor ops ([`rms_norm`], [`rope`], [`swiglu`], [`softmax_last_dim`],
//! [`cross_entropy`]), the fused LM head ([`linear_cross_entropy`]), [`causal_attention`], the
//! in-place updates it uses ([`add_matmul_tn`], [`add_into`], [`scale_by`]) and [`add_rows_into`], [`reference`](mod@reference) with the
//! same five signatures, the optimizer step
//! ([`AdamW`], [`adamw_step`], [`adamw_step_reference`]) on flat f32 buffers, and
//! [`KernelError`], which reaches callers wrapped in `candle_core::Error`. The custom-op
//! structs stay private. Used only by `swarm-worker`.

mod adamw;
mod attention;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod inplace;
mod linear_cross_entropy;
pub mod reference;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use adamw::{AdamW, adamw_step, adamw_step_reference};
pub use attention::causal_attention;
pub use cross_entropy::cross_entropy;
#[cfg(feature = "cuda")]
pub use cuda::{DeviceAdamW, sum_squares};
pub use error::KernelError;
pub use inplace::{add_into, add_matmul_tn, add_rows_into, scale_by};
pub use linear_cross_entropy::{CHUNK_BYTES, chunk_rows, linear_cross_entropy, linear_cross_entropy_blocks};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;
