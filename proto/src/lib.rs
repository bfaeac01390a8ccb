//! Swarm's wire contract (`proto/swarm/v1/swarm.proto`), generated at build time with protox.
//!
//! Architecture invariant: this crate holds only generated types, the size limits below,
//! [`trust`] (tokens, the pinned TLS verifier, bearer metadata, the MAC the data plane uses) and
//! [`discovery`] (finding the coordinator on the LAN by mDNS).
//! Conversions to domain types live in one place per side (`coordinator::to_proto`,
//! `worker::proto_conv`), so the planner and the state machine never see these types.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod discovery;
pub mod trust;

pub mod v1 {
    tonic::include_proto!("swarm.v1");
}

/// Size limits, in bytes, enforced by the gRPC codec on both sides of every connection.
pub mod limits {
    /// The largest message either side decodes. A recipe is the biggest field (a few KiB).
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// The largest recipe (JSON) the coordinator accepts.
    pub const MAX_RECIPE_BYTES: usize = 256 * 1024;
    /// Devices a worker may report.
    pub const MAX_DEVICES: usize = 64;
    /// Files a checkpoint report may list.
    pub const MAX_SHARD_FILES: usize = 64;
    /// Workers one job may use.
    pub const MAX_WORLD_SIZE: usize = 1024;
    /// Loss history points a job status carries (the latest ones).
    pub const MAX_LOSS_HISTORY: usize = 20_000;
    /// Longest free-text field (names, errors, paths).
    pub const MAX_TEXT_BYTES: usize = 16 * 1024;
}
