//! Why no plan exists, with the numbers a user needs to fix it.

use crate::plan::MemoryBreakdown;
use serde::Serialize;
use std::fmt;

/// Why no plan exists. Every variant says what is wrong with which value and what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum PlanError {
    #[error(
        "{nodes} workers cannot split a global batch of {global_batch} sequences (each worker needs at least one); raise train.global_batch to >= {nodes} or use --nodes {global_batch}"
    )]
    BatchTooSmall { nodes: usize, global_batch: usize },
    #[error("--nodes must be at least 1, got 0")]
    NoNodes,
    #[error("the cluster has no device to plan on; add a worker with at least one device")]
    EmptyCluster,
    /// A value of the model or train spec the planner cannot work with.
    #[error("{field} = {value}: {problem}; {fix}")]
    Invalid { field: String, value: String, problem: String, fix: String },
    /// Nothing the planner tried fits in memory.
    #[error("{0}")]
    DoesNotFit(Box<Shortfall>),
}

/// Which memory runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    Device,
    HostRam,
}

/// The closest the planner came to fitting, and what would close the gap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shortfall {
    pub memory: MemoryKind,
    /// The worker and device that are short in the closest layout tried.
    pub worker: String,
    pub device: String,
    pub needed_bytes: u64,
    pub available_bytes: u64,
    /// The device's memory in that layout (absent when host RAM is short).
    pub breakdown: Option<MemoryBreakdown>,
    /// The closest layout tried, in words.
    pub closest_layout: String,
    pub suggestions: Vec<Suggestion>,
}

impl Shortfall {
    pub fn short_bytes(&self) -> u64 {
        self.needed_bytes.saturating_sub(self.available_bytes)
    }
}

/// One change that would help, and its computed effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    /// The change, as the recipe or cluster would say it (`finetune.mode: qlora`).
    pub change: String,
    /// What the planner predicts with the change.
    pub effect: String,
    /// Whether a plan exists with the change.
    pub fits: bool,
}

/// Bytes in GiB with one decimal, e.g. `14.2 GiB`.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.memory {
            MemoryKind::Device => format!("{} ({}, {})", self.worker, self.device, gib(self.available_bytes)),
            MemoryKind::HostRam => format!("host RAM of {} ({})", self.worker, gib(self.available_bytes)),
        };
        write!(f, "does not fit: {what} would need {}", gib(self.needed_bytes))?;
        if let Some(b) = &self.breakdown {
            write!(f, " ({})", b.summary())?;
        }
        write!(f, " in the closest layout tried ({}); short by {}", self.closest_layout, gib(self.short_bytes()))?;
        if self.suggestions.is_empty() {
            return write!(f, "; no single change the planner tried makes it fit");
        }
        write!(f, "; options:")?;
        for s in &self.suggestions {
            write!(f, "\n  - {}: {}", s.change, s.effect)?;
        }
        Ok(())
    }
}
