//! Swarm's worker: executes what the coordinator assigns, and reports.
//!
//! Architecture invariant: a worker never plans. It detects and measures its devices
//! ([`device`]), trains its rank of a job ([`train`]) on the Llama-family model ([`model`],
//! built only from differentiable ops of `swarm_kernels`), moves tensors only over the data
//! plane to its peers ([`comm`]), never through the coordinator, and writes checkpoints that are
//! Hugging Face model directories ([`checkpoint`]). Wire types are converted in [`proto_conv`].

pub mod checkpoint;
pub mod comm;
pub mod content;
pub mod daemon;
pub mod data;
pub mod device;
pub mod eval;
pub mod flat_grads;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod model;
pub mod proto_conv;
pub mod train;
