//! Collectives between workers: the data-plane listener, the TCP ring and point-to-point links.
pub mod dataplane;
pub mod link;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
