//! What the planner decides ([`Plan`] and its parts, all `Serialize` for `swarm plan --json`), and
//! the splitting helpers the executor uses today: [`split_batch`] (rows of a global batch per
//! data-parallel rank) and [`shard_range`] (the part of a flat parameter vector a rank owns).
//! The search itself is in `planner`; the numbers come from [`crate::cost`].

use crate::cluster::DeviceKind;
use crate::ids::{Rank, StageId, WorkerId};
use crate::plan_error::gib;
use serde::{Deserialize, Serialize};

pub use crate::plan_error::PlanError;

/// A plan: how to lay a model over a cluster, with its predicted memory and speed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub cluster: String,
    pub model: ModelSummary,
    pub train: TrainSummary,
    /// Pipeline stages (p).
    pub pipeline_degree: usize,
    /// Data-parallel replicas of each stage (d); `p × d` = the ranks used.
    pub data_parallel_degree: usize,
    /// 1: optimizer state sharded over each stage's replicas; 2: + gradients; 3: + weights.
    /// 0: nothing sharded (DiLoCo replicas each keep everything).
    pub zero_stage: u8,
    pub activation_checkpointing: bool,
    pub cpu_offload: bool,
    /// Always "1F1B" (one forward, one backward, per stage in steady state).
    pub schedule: String,
    /// Micro-batches per optimizer step, per replica.
    pub micro_batches: usize,
    pub stages: Vec<StagePlan>,
    pub ranks: Vec<RankPlan>,
    /// Devices of the cluster the plan leaves idle, and why.
    pub unused: Vec<UnusedDevice>,
    pub sync: SyncPlan,
    pub step: StepTime,
    pub executable: Executable,
    /// What the predictions assume.
    pub assumptions: Vec<String>,
}

impl Plan {
    /// The recipe's `parallel:` section that runs this plan: stages and their layers, the
    /// ZeRO stage, and each replica's rows and micro-batch size (ranks are stage x replicas +
    /// replica, as the coordinator numbers them).
    pub fn parallel_section(&self) -> String {
        let replicas: Vec<&RankPlan> = self.ranks.iter().filter(|r| r.stage.0 == 0).collect();
        let rows: Vec<usize> = replicas.iter().map(|r| r.micro_batch * self.micro_batches).collect();
        let micro: Vec<usize> = replicas.iter().map(|r| r.micro_batch).collect();
        let mut out = format!("parallel:\n  zero_stage: {}\n", self.zero_stage.max(1));
        if self.pipeline_degree > 1 {
            let layers: Vec<usize> = self.stages.iter().map(StagePlan::layers).collect();
            out.push_str(&format!("  pipeline_stages: {}\n  stage_layers: {layers:?}\n", self.pipeline_degree));
        }
        if rows.windows(2).any(|w| w[0] != w[1]) {
            out.push_str(&format!("  rows_per_worker: {rows:?}\n"));
        }
        if self.micro_batches > 1 {
            out.push_str(&format!("  micro_batch_rows: {micro:?}\n"));
        }
        let mut ranks: Vec<&RankPlan> = self.ranks.iter().collect();
        ranks.sort_by_key(|r| r.rank.0);
        let names: Vec<String> = ranks.iter().map(|r| format!("{:?}", r.worker)).collect();
        out.push_str(&format!("  workers: [{}]\n", names.join(", ")));
        out
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    pub params: u64,
    pub trainable_params: u64,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSummary {
    pub mode: String,
    pub optimizer: String,
    pub seq_len: usize,
    pub global_batch: usize,
    pub tokens_per_step: u64,
}

/// A pipeline stage: a contiguous range of decoder layers and the ranks that hold it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePlan {
    pub stage: StageId,
    /// Decoder layers `[first_layer, end_layer)`.
    pub first_layer: usize,
    pub end_layer: usize,
    /// The token embedding lives here (stage 0).
    pub embedding: bool,
    /// The final norm and LM head live here (the last stage).
    pub lm_head: bool,
    /// The data-parallel group of this stage, one rank per replica.
    pub ranks: Vec<Rank>,
}

impl StagePlan {
    pub fn layers(&self) -> usize {
        self.end_layer - self.first_layer
    }
}

/// One device's part of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankPlan {
    pub rank: Rank,
    pub worker: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    pub device: String,
    pub kind: DeviceKind,
    pub ordinal: u32,
    pub stage: StageId,
    /// Which pipeline replica (0..d) this rank belongs to.
    pub replica: usize,
    /// Sequences per micro-batch on this rank (replicas may differ).
    pub micro_batch: usize,
    /// The trainable parameters whose optimizer state (and, from ZeRO-2, gradients) this rank
    /// owns: a range of the model's flat trainable-parameter vector (stage by stage, in order).
    pub owns: ParamRange,
    pub memory: MemoryBreakdown,
    /// Host RAM this rank uses for offloaded state.
    pub host_bytes: u64,
    /// Seconds this rank computes per step.
    pub compute_s: f64,
}

/// Elements `[start, end)` of a flat parameter vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamRange {
    pub start: u64,
    pub end: u64,
}

/// Predicted peak memory of one device, by what it holds, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryBreakdown {
    /// Base weights resident (bf16, or NF4 for QLoRA), including gathered ZeRO-3 / offload layers.
    pub weights: u64,
    /// LoRA adapter weights.
    pub lora: u64,
    /// Gradients of trainable parameters (f32).
    pub gradients: u64,
    /// Optimizer state (f32 master weights and moments).
    pub optimizer: u64,
    /// Activations kept for the backward pass, the recomputed layer and the logits chunk.
    pub activations: u64,
    /// Collective and pipeline send/receive buffers.
    pub comm_buffers: u64,
    /// Scratch such as the dequantized NF4 weight.
    pub workspace: u64,
    /// CUDA context and the allocator's slack.
    pub runtime: u64,
    pub total: u64,
    /// The device's memory.
    pub capacity: u64,
}

impl MemoryBreakdown {
    /// The parts with their sizes, in field order.
    pub fn parts(&self) -> [(&'static str, u64); 8] {
        [
            ("weights", self.weights),
            ("lora", self.lora),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("comm buffers", self.comm_buffers),
            ("workspace", self.workspace),
            ("runtime", self.runtime),
        ]
    }

    /// The non-zero parts, largest first: `optimizer 40.1 GiB, weights 35.3 GiB, ...`.
    pub fn summary(&self) -> String {
        let mut parts: Vec<_> = self.parts().into_iter().filter(|(_, b)| *b > 0).collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        parts.iter().map(|(n, b)| format!("{n} {}", gib(*b))).collect::<Vec<_>>().join(", ")
    }
}

/// How replicas keep their weights in agreement.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SyncStrategy {
    /// Gradients are reduced across replicas every optimizer step (or there is one replica).
    EveryStep,
    /// DiLoCo: replicas take `every` local steps, then average their weight deltas (outer step).
    Diloco { every: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncPlan {
    pub strategy: SyncStrategy,
    /// Seconds one data-parallel sync of the trainable parameters takes.
    pub sync_s: f64,
    /// Seconds of compute per step it is weighed against.
    pub compute_s: f64,
    /// The outer interval at which the amortized sync equals the compute time, `sync_s / compute_s`.
    pub break_even_h: Option<f64>,
    /// The choice in words.
    pub explanation: String,
}

/// The predicted optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepTime {
    /// Forward and backward work of the slowest replica, without pipeline idle time.
    pub compute_s: f64,
    /// Communication not hidden behind compute (collectives, pipeline sends, offload transfers,
    /// a tied embedding's exchange).
    pub communication_s: f64,
    /// Of `communication_s`: a tied embedding's exchange between a replica's first and last
    /// pipeline stage (the rows it looks up before its schedule, their gradient after it), which
    /// nothing overlaps. 0 without a pipeline or a tied head.
    pub tied_exchange_s: f64,
    /// Pipeline fill and drain: stages idle while waiting for others.
    pub bubble_s: f64,
    pub total_s: f64,
    /// `bubble_s` over the pipelined compute time; `(p-1)/(m+p-1)` for equal stages.
    pub bubble_fraction: f64,
    pub tokens_per_s: f64,
    /// Useful model flops per second over the used devices' measured matmul rate.
    pub mfu: f64,
}

/// Whether this build's executor can run the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Executable {
    pub ok: bool,
    /// What this build cannot run yet (empty when `ok`).
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnusedDevice {
    pub worker: String,
    pub device: String,
    pub reason: String,
}

/// One rank's share of every global batch: rows `[offset, offset + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchShare {
    pub rank: Rank,
    pub offset: usize,
    pub count: usize,
}

/// Splits a global batch of `global_batch` sequences over `nodes` data-parallel ranks as evenly
/// as possible (the first `global_batch % nodes` ranks take one more). Gradients are weighted by
/// tokens, so uneven shares give the same maths as even ones.
pub fn split_batch(nodes: usize, global_batch: usize) -> Result<Vec<BatchShare>, PlanError> {
    if nodes == 0 {
        return Err(PlanError::NoNodes);
    }
    if global_batch < nodes {
        return Err(PlanError::BatchTooSmall { nodes, global_batch });
    }
    let base = global_batch / nodes;
    let extra = global_batch % nodes;
    let mut offset = 0;
    Ok((0..nodes)
        .map(|r| {
            let count = base + usize::from(r < extra);
            let share = BatchShare { rank: Rank(r as u32), offset, count };
            offset += count;
            share
        })
        .collect())
}

/// The contiguous range of a flat parameter vector of `len` elements that `rank` owns under
/// ZeRO (optimizer state, and gradients after reduce-scatter): equal chunks, the last ones one
/// element shorter when `len` does not divide evenly. The ranges partition `0..len`.
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batch_too_small_says_what_to_do() {
        let e = split_batch(4, 2).unwrap_err().to_string();
        assert!(e.contains("global batch of 2") && e.contains("--nodes 2"), "{e}");
    }

    proptest! {
        #[test]
        fn shares_cover_the_batch_exactly_once(nodes in 1usize..64, extra in 0usize..200) {
            let gb = nodes + extra;
            let shares = split_batch(nodes, gb).unwrap();
            let mut next = 0;
            for s in &shares {
                prop_assert_eq!(s.offset, next);
                prop_assert!(s.count >= 1);
                next += s.count;
            }
            prop_assert_eq!(next, gb);
            let max = shares.iter().map(|s| s.count).max().unwrap();
            let min = shares.iter().map(|s| s.count).min().unwrap();
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn shard_ranges_partition(len in 0usize..10_000, world in 1usize..70) {
            let mut next = 0;
            for r in 0..world {
                let range = shard_range(len, world, r);
                prop_assert_eq!(range.start, next);
                next = range.end;
            }
            prop_assert_eq!(next, len);
        }
    }
}
