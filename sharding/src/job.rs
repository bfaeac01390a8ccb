//! What a job is made of, as both sides see it: the assignment a worker receives and the manifest
//! that marks a committed checkpoint. Plain values; the wire and file formats map onto these.

use crate::content::Inputs;
use crate::ids::{JobId, Rank, Step, WorkerId};
use crate::plan::BatchShare;
use crate::recipe::Recipe;
use serde::{Deserialize, Serialize};

/// One member of a job's data-parallel group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub rank: Rank,
    pub worker: WorkerId,
    /// host:port of the worker's data-plane listener.
    pub data_addr: String,
}

/// A committed checkpoint to start from: `dir` is where its manifest is, on the coordinator
/// (the coordinator's own record) or, in an assignment, on the worker once fetched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub dir: String,
    pub step: Step,
}

/// What the coordinator tells one worker to do for one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub rank: Rank,
    pub world_size: u32,
    pub peers: Vec<Peer>,
    pub recipe: Recipe,
    pub resume: Option<ResumePoint>,
    pub share: BatchShare,
    /// Bumped each time the job is (re)started, so stale data-plane peers are refused.
    pub attempt: u64,
    /// The dataset and model to fetch before training, and who serves them.
    #[serde(default)]
    pub inputs: Inputs,
    /// The manifest of `resume`, with the hosts that hold each rank's files (their current
    /// data-plane addresses): the worker fetches what it lacks from them.
    #[serde(default)]
    pub resume_manifest: Option<Box<Manifest>>,
}

/// One file a rank wrote for a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFile {
    /// Relative to the step directory.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What one rank reports after writing its part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankCheckpoint {
    pub rank: Rank,
    pub worker: WorkerId,
    pub files: Vec<ShardFile>,
    /// Opaque RNG state of the rank (recorded for a bit-exact resume).
    pub rng_state: String,
    /// The hosts that hold these files: the rank's own worker first, then its replicas.
    #[serde(default)]
    pub holders: Vec<Holder>,
}

/// A host that holds a copy of one rank's checkpoint files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The worker's name (`swarm status`): how a holder is found again after it re-registers.
    pub worker: String,
    /// host:port of its data plane when it reported.
    pub data_addr: String,
    /// The step directory on that host, relative to its state directory
    /// (`checkpoints/<recipe name>/step-000050`).
    pub dir: String,
}

/// `manifest.json` in a step directory. Its presence marks the checkpoint complete: the
/// coordinator writes it under a temporary name and renames it, after every rank reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job: JobId,
    pub name: String,
    pub step: Step,
    pub world_size: u32,
    /// Global samples consumed: the data order resumes from here.
    pub data_cursor: u64,
    /// Mean loss of the last step, for display.
    pub loss: Option<f64>,
    pub recipe: Recipe,
    pub ranks: Vec<RankCheckpoint>,
    pub committed_unix_ms: u64,
}

impl Manifest {
    pub const FORMAT: u32 = 1;
    pub const FILE: &'static str = "manifest.json";
}

/// The directory name of the checkpoint at `step` (`step-000050`), sorting in step order.
pub fn step_dir_name(step: Step) -> String {
    format!("step-{:06}", step.0)
}

/// Parses a directory name written by [`step_dir_name`].
pub fn parse_step_dir_name(name: &str) -> Option<Step> {
    name.strip_prefix("step-")?.parse().ok().map(Step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names_round_trip_and_sort() {
        assert_eq!(step_dir_name(Step(50)), "step-000050");
        assert_eq!(parse_step_dir_name("step-000050"), Some(Step(50)));
        assert_eq!(parse_step_dir_name("step-x"), None);
        assert!(step_dir_name(Step(9)) < step_dir_name(Step(10)));
    }
}
