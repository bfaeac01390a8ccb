//! Swarm's domain model and planner.
//!
//! Architecture invariant: pure. No I/O, no async, no clock, no GPU, no `proto` types. Everything
//! here is a value in, a value out, so most of the system's logic is tested here without a
//! runtime. "It does not fit" is a [`plan::PlanError`] with numbers in it, never a panic.
//!
//! API boundary: [`recipe::Recipe`] (the typed recipe and its validation), [`model::ModelSpec`]
//! (a Llama-family shape), [`ids`] (typed ids), [`plan`] (splitting work over workers).

pub mod cluster;
pub mod ids;
pub mod job;
pub mod model;
pub mod plan;
pub mod recipe;

pub use cluster::{DeviceInfo, DeviceKind};
pub use ids::{JobId, Rank, StageId, Step, WorkerId};
pub use job::{Assignment, Manifest, Peer, RankCheckpoint, ResumePoint, ShardFile};
pub use model::{ModelSpec, RopeScaling};
pub use plan::{BatchShare, PlanError};
pub use recipe::{Recipe, RecipeError};
