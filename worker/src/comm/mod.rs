//! Collectives between workers: the data-plane listener and the TCP ring.
pub mod dataplane;
pub mod ring;
