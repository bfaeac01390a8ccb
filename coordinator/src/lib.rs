//! Swarm's coordinator: decides, never touches a tensor.
//!
//! Architecture invariant: [`machine::Coordinator`] is a pure state machine (events in, commands
//! out, time passed in); it is unit-tested without tokio. [`service::Service`] is the only
//! place that does I/O for it: the gRPC endpoints, the redb [`store`], manifest commits
//! ([`checkpoint`]). Wire types are converted in [`to_proto`] and nowhere else. Every RPC is
//! authenticated in the service before it becomes an event ([`identity`] holds the secrets).

pub mod checkpoint;
pub mod identity;
pub mod job;
pub mod machine;
pub mod service;
pub mod store;
pub mod to_proto;

pub use machine::{Config, Coordinator};
pub use service::Service;
