//! Turns the winning candidate into a [`Plan`]: stages, ranks with their memory and the
//! parameters they own, idle devices with the reason, and what this build can execute.

use super::{Candidate, Ctx, Found};
use crate::cost::Sharding;
use crate::ids::{Rank, StageId};
use crate::plan::{
    Executable, ModelSummary, ParamRange, Plan, RankPlan, StagePlan, SyncStrategy, TrainSummary, UnusedDevice,
    shard_range,
};
use crate::recipe::SUPPORTED_ZERO_STAGES;
use crate::train_spec::TrainMode;

pub(crate) fn plan(ctx: &Ctx, c: &Candidate, found: &Found) -> Plan {
    let lay = &c.lay;
    let (p, d) = (lay.p, lay.d);
    let mut stages = Vec::with_capacity(p);
    let mut ranks = Vec::with_capacity(p * d);
    let mut first_layer = 0usize;
    let mut param_offset = 0u64;
    for s in 0..p {
        let end_layer = first_layer + c.layers[s] as usize;
        let trainable = ctx.mc.trainable(c.layers[s], s == 0, s == p - 1);
        let mut stage_ranks = Vec::with_capacity(d);
        for r in 0..d {
            let di = lay.groups[s][r];
            let dev = &ctx.devs[di];
            let rank = Rank((s * d + r) as u32);
            stage_ranks.push(rank);
            let slot = ctx.slot(lay, s, c.layers[s], c.micro[r], c.m, di);
            let (mut memory, host_bytes) = ctx.mc.memory(ctx.cm, &slot);
            memory.capacity = ctx.capacity(di);
            let own = shard_range(trainable as usize, d, r);
            ranks.push(RankPlan {
                rank,
                worker: dev.worker_name.clone(),
                worker_id: worker_id(ctx, dev),
                device: dev.name.clone(),
                kind: dev.kind,
                ordinal: dev.ordinal,
                stage: StageId(s as u32),
                replica: r,
                micro_batch: c.micro[r] as usize,
                owns: ParamRange { start: param_offset + own.start as u64, end: param_offset + own.end as u64 },
                memory,
                host_bytes,
                compute_s: c.busy[s][r],
            });
        }
        stages.push(StagePlan {
            stage: StageId(s as u32),
            first_layer,
            end_layer,
            embedding: s == 0,
            lm_head: s == p - 1,
            ranks: stage_ranks,
        });
        first_layer = end_layer;
        param_offset += trainable;
    }
    let used: Vec<usize> = lay.groups.iter().flatten().copied().collect();
    let unused = (0..ctx.devs.len())
        .filter(|i| !used.contains(i))
        .map(|i| UnusedDevice {
            worker: ctx.devs[i].worker_name.clone(),
            device: ctx.devs[i].name.clone(),
            reason: if found.best_using[i] > 0.0 {
                format!(
                    "the best plan that uses it predicts {:.0} tokens/s, against {:.0} without it",
                    found.best_using[i], c.step.tokens_per_s
                )
            } else {
                "no plan that uses it fits".to_string()
            },
        })
        .collect();
    let t = ctx.train;
    Plan {
        cluster: ctx.cluster.name.clone(),
        model: ModelSummary {
            params: ctx.model.param_count(),
            trainable_params: param_offset,
            layers: ctx.model.num_hidden_layers,
            hidden_size: ctx.model.hidden_size,
            vocab_size: ctx.model.vocab_size,
        },
        train: TrainSummary {
            mode: t.mode.name().to_string(),
            optimizer: t.optimizer.as_str().to_string(),
            seq_len: t.seq_len,
            global_batch: t.global_batch,
            tokens_per_step: t.tokens_per_step(),
        },
        pipeline_degree: p,
        data_parallel_degree: d,
        zero_stage: if d == 1 { 1 } else { lay.sharding.zero_stage() },
        activation_checkpointing: lay.ckpt,
        cpu_offload: lay.offload,
        schedule: "1F1B".to_string(),
        micro_batches: c.m as usize,
        stages,
        ranks,
        unused,
        sync: c.sync.clone(),
        step: c.step.clone(),
        executable: executable(ctx, c),
        assumptions: assumptions(ctx),
    }
}

fn worker_id(ctx: &Ctx, dev: &crate::cluster::PlanDevice) -> Option<crate::ids::WorkerId> {
    ctx.cluster.workers.iter().find(|w| w.name == dev.group && w.count == 1).and_then(|w| w.id)
}

/// What of the plan this build's executor cannot run yet.
fn executable(ctx: &Ctx, c: &Candidate) -> Executable {
    let lay = &c.lay;
    let mut reasons = Vec::new();
    if lay.p > 1 && lay.d > 1 && lay.sharding.zero_stage() > 1 {
        reasons.push(format!(
            "{} pipeline stages with ZeRO-{}: this build runs ZeRO-1 inside each stage",
            lay.p,
            lay.sharding.zero_stage()
        ));
    }
    if lay.sharding == Sharding::Replicated && matches!(c.sync.strategy, SyncStrategy::Diloco { .. }) {
        reasons.push("DiLoCo outer sync: this build reduces gradients every step".to_string());
    } else if lay.d > 1 && !SUPPORTED_ZERO_STAGES.contains(&lay.sharding.zero_stage()) {
        reasons.push(format!("ZeRO-{}: this build runs ZeRO-1, 2 and 3 only", lay.sharding.zero_stage()));
    }
    if !matches!(ctx.train.mode, TrainMode::Full) {
        reasons.push(format!("{}: this build's worker trains every weight", ctx.train.mode.name()));
    }
    if lay.ckpt {
        reasons.push("activation checkpointing: not implemented by this build's worker".to_string());
    }
    if lay.offload {
        reasons.push("CPU offload: not implemented by this build's worker".to_string());
    }
    Executable { ok: reasons.is_empty(), reasons }
}

fn assumptions(ctx: &Ctx) -> Vec<String> {
    let cm = ctx.cm;
    let l = ctx.cluster.default_link;
    vec![
        "attention is flash-style: no s×s scores are stored (Korthikanti's 5·a·s² term dropped)".to_string(),
        format!("the loss is fused with the LM head: logits of {} tokens exist at once", cm.fused_ce_chunk_tokens),
        format!(
            "steps sustain {:.0}% of each device's measured matmul rate (half that at {:.0} tokens per micro-batch)",
            100.0 * cm.matmul_efficiency,
            cm.half_efficiency_tokens
        ),
        format!(
            "links not given are {} Gbit/s with {} µs latency; up to {:.0}% of compute hides communication",
            l.bandwidth_gbit_s,
            l.latency_us,
            100.0 * cm.comm_overlap
        ),
        "MFU is against the measured, not the datasheet, matmul rate".to_string(),
    ]
}
