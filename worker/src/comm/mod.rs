//! Collectives between workers: the data-plane listener and the TCP ring.
pub mod dataplane;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
