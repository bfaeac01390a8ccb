//! Swarm's domain model and planner.
//!
//! Architecture invariant: pure. No I/O, no async, no clock, no GPU, no `proto` types. Everything
//! here is a value in, a value out, so most of the system's logic is tested here without a
//! runtime. "It does not fit" is a [`plan::PlanError`] with numbers in it, never a panic.
//!
//! API boundary: [`recipe::Recipe`] (the typed recipe and its validation), [`model::ModelSpec`]
//! (a Llama-family shape), [`cluster::ClusterSpec`] (workers, devices, links),
//! [`train_spec::TrainSpec`] (what a step trains), [`ids`] (typed ids), and the planner:
//! [`plan()`]`(&ClusterSpec, &ModelSpec, &TrainSpec) -> Result<`[`Plan`]`, `[`PlanError`]`>`, whose
//! cost model's constants live in [`cost::CostModel`]. [`plan::split_batch`] and
//! [`plan::shard_range`] split a batch and a flat parameter vector over data-parallel ranks.

pub mod cluster;
pub mod content;
pub mod cost;
pub mod finetune;
pub mod ids;
pub mod job;
pub mod model;
pub mod plan;
pub mod plan_error;
mod planner;
pub mod recipe;
pub mod train_spec;

pub use cluster::{ClusterError, ClusterSpec, DeviceInfo, DeviceKind, LiveWorker};
pub use content::{Bundle, ContentFile, Inputs};
pub use cost::CostModel;
pub use finetune::{FinetuneMode, OptimizerKind};
pub use ids::{JobId, Rank, StageId, Step, WorkerId};
pub use job::{Assignment, Holder, Manifest, Peer, RankCheckpoint, ResumePoint, ShardFile};
pub use model::{ModelSpec, RopeScaling};
pub use plan::{BatchShare, Plan};
pub use plan_error::PlanError;
pub use planner::{plan, plan_with};
pub use recipe::{Precision, Recipe, RecipeError};
pub use train_spec::TrainSpec;
