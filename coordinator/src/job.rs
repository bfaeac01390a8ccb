//! A job as the coordinator keeps it: the persisted record plus in-flight aggregation.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use swarm_sharding::{Holder, Inputs, JobId, Rank, RankCheckpoint, Recipe, ResumePoint, ShardFile, Step, WorkerId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Submitted, waiting for enough idle workers.
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The coordinator restarted while the job was waiting or running.
    Interrupted,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Waiting | JobState::Running)
    }
}

/// The persisted record of a job (the store keeps these as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub recipe: Recipe,
    pub nodes: usize,
    pub state: JobState,
    pub error: Option<String>,
    /// Workers in rank order while running (and after, for the record).
    pub workers: Vec<WorkerId>,
    pub attempt: u64,
    pub resume: Option<ResumePoint>,
    /// The step training started from (the resume point's, or 0).
    pub start_step: Step,
    /// The last step every rank finished.
    pub step: Step,
    pub loss: Option<f64>,
    pub first_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// The largest peak memory any rank reported.
    #[serde(default)]
    pub peak_memory_bytes: u64,
    /// Data-plane bytes all ranks sent, summed over the steps reported since `start_step`.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Per rank: seconds computed, and waited on a neighbouring pipeline stage (the bubble),
    /// summed over the steps reported since `start_step`.
    #[serde(default)]
    pub compute_s: Vec<f64>,
    #[serde(default)]
    pub idle_s: Vec<f64>,
    /// Mean loss of every finished step since `start_step` (index 0 is step `start_step + 1`).
    #[serde(default)]
    pub losses: Vec<f64>,
    /// Committed checkpoints of this job, oldest first.
    pub committed: Vec<ResumePoint>,
    pub submitted_unix_ms: u64,
    /// The dataset and model the workers fetch, and the submitter's data plane.
    #[serde(default)]
    pub inputs: Inputs,
    #[serde(skip)]
    pub progress: Progress,
}

/// Aggregation of reports that are not complete yet. Not persisted: a restarted coordinator
/// interrupts running jobs, and they resume from their last committed checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub steps: BTreeMap<Step, StepAgg>,
    pub checkpoints: BTreeMap<Step, CheckpointAgg>,
    pub results: BTreeMap<Rank, RankResult>,
    pub commit_in_flight: BTreeSet<Step>,
    /// When the previous step completed, for tokens/s.
    pub last_step_done_ms: Option<u64>,
    /// A rank's failure held back until this time (ms), in case a worker of the job is found
    /// lost meanwhile: its peers' errors ("connection reset by rank 1") are symptoms, the lost
    /// worker the cause.
    pub pending_failure: Option<(u64, String)>,
}

#[derive(Clone, Debug, Default)]
pub struct StepAgg {
    pub ranks: BTreeSet<Rank>,
    pub loss_x_tokens: f64,
    pub tokens: u64,
}

#[derive(Clone, Debug)]
pub struct CheckpointAgg {
    pub dir: String,
    pub data_cursor: u64,
    pub ranks: BTreeMap<Rank, RankCheckpoint>,
    /// Copies reported so far: of which rank, on which host, which files.
    pub replicas: Vec<(Rank, Holder, Vec<ShardFile>)>,
}

#[derive(Clone, Debug)]
pub struct RankResult {
    pub ok: bool,
    pub error: String,
    pub last_step: Step,
}

impl Job {
    pub fn total_steps(&self) -> Step {
        Step(self.recipe.train.steps)
    }

    pub fn last_checkpoint(&self) -> Option<&ResumePoint> {
        self.committed.last().or(self.resume.as_ref())
    }

    pub fn rank_of(&self, worker: WorkerId) -> Option<Rank> {
        self.workers.iter().position(|w| *w == worker).map(|r| Rank(r as u32))
    }
}
