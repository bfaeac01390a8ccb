//! When nothing fits: the closest layout's numbers, and single changes that would help, each
//! checked by planning again with the change.

use super::{Candidate, Ctx, Miss};
use crate::cluster::{ClusterSpec, DeviceSpec, WorkerSpec};
use crate::cost::Sharding;
use crate::finetune::OptimizerKind;
use crate::plan_error::{MemoryKind, PlanError, Shortfall, Suggestion, gib};
use crate::train_spec::{LoraSpec, LoraTarget, TrainMode, TrainSpec};

/// Most devices the "more devices" suggestion looks for.
const MAX_SUGGESTED_DEVICES: usize = 1024;
/// Shortest sequence the "shorter sequences" suggestion tries.
const MIN_SUGGESTED_SEQ_LEN: usize = 128;
const GIB: f64 = (1u64 << 30) as f64;

pub(crate) fn shortfall(ctx: &Ctx, miss: Option<Miss>) -> PlanError {
    let Some(m) = miss else {
        return PlanError::Invalid {
            field: "cluster".into(),
            value: format!("{} devices", ctx.devs.len()),
            problem: "no layout could be formed".into(),
            fix: "check the cluster and train.global_batch".into(),
        };
    };
    let dev = &ctx.devs[m.device];
    let lay = &m.lay;
    let mut closest = format!(
        "{} stage{} x {} replica{}, ZeRO-{}, micro-batch {}",
        lay.p,
        if lay.p == 1 { "" } else { "s" },
        lay.d,
        if lay.d == 1 { "" } else { "s" },
        lay.sharding.zero_stage().max(1),
        m.micro_batch
    );
    if lay.ckpt {
        closest.push_str(", activation checkpointing");
    }
    if lay.offload {
        closest.push_str(", CPU offload");
    }
    if lay.sharding == Sharding::Replicated {
        closest.push_str(", DiLoCo replicas");
    }
    PlanError::DoesNotFit(Box::new(Shortfall {
        memory: m.memory,
        worker: dev.worker_name.clone(),
        device: dev.name.clone(),
        needed_bytes: m.needed,
        available_bytes: m.available,
        breakdown: m.breakdown.clone(),
        closest_layout: closest,
        suggestions: suggestions(ctx),
    }))
}

/// The fullest device of a candidate: (peak bytes, capacity).
fn fullest(ctx: &Ctx, c: &Candidate) -> (u64, u64) {
    let mut out = (0, 1);
    for s in 0..c.lay.p {
        for r in 0..c.lay.d {
            let di = c.lay.groups[s][r];
            let (mem, _) = ctx.mc.memory(ctx.cm, &ctx.slot(&c.lay, s, c.layers[s], c.micro[r], c.m, di));
            let cap = ctx.capacity(di);
            if mem.total as f64 / cap as f64 > out.0 as f64 / out.1 as f64 {
                out = (mem.total, cap);
            }
        }
    }
    out
}

/// Plans again with another cluster or train spec: (effect in words, fits).
fn outcome(ctx: &Ctx, cluster: &ClusterSpec, train: &TrainSpec, all_only: bool) -> (String, bool) {
    let again = Ctx::new(cluster, ctx.model, train, ctx.cm);
    let found = again.search(all_only);
    match (&found.best, &found.miss) {
        (Some(c), _) => {
            let (peak, cap) = fullest(&again, c);
            (
                format!(
                    "fits: {} peak of {} on the fullest device, {:.0} tokens/s",
                    gib(peak),
                    gib(cap),
                    c.step.tokens_per_s
                ),
                true,
            )
        }
        (None, Some(m)) => {
            let what = match m.memory {
                MemoryKind::Device => format!("{} ({})", again.devs[m.device].worker_name, again.devs[m.device].name),
                MemoryKind::HostRam => format!("the host RAM of {}", again.devs[m.device].worker_name),
            };
            (format!("still short by {} on {what}", gib(m.short)), false)
        }
        (None, None) => ("no layout could be formed".to_string(), false),
    }
}

fn suggestions(ctx: &Ctx) -> Vec<Suggestion> {
    let base = ctx.train;
    let mut out = Vec::new();
    let mut try_train = |change: String, t: TrainSpec| {
        let (effect, fits) = outcome(ctx, ctx.cluster, &t, false);
        out.push(Suggestion { change, effect, fits });
    };
    let default_lora = LoraSpec { rank: 16, targets: LoraTarget::ALL.to_vec() };
    match &base.mode {
        TrainMode::Full => {
            let q = TrainMode::Qlora { lora: default_lora.clone(), double_quant: true };
            try_train(
                "finetune.mode: qlora (rank 16 on every linear layer)".into(),
                TrainSpec { mode: q, ..base.clone() },
            );
            let l = TrainMode::Lora { lora: default_lora };
            try_train(
                "finetune.mode: lora (rank 16 on every linear layer)".into(),
                TrainSpec { mode: l, ..base.clone() },
            );
            if base.optimizer == OptimizerKind::Adamw {
                let t = TrainSpec { optimizer: OptimizerKind::Adamw8bit, ..base.clone() };
                try_train("train.optimizer: adamw8bit".into(), t);
            }
        }
        TrainMode::Lora { lora } => {
            let q = TrainMode::Qlora { lora: lora.clone(), double_quant: true };
            try_train("finetune.mode: qlora".into(), TrainSpec { mode: q, ..base.clone() });
        }
        TrainMode::Qlora { .. } => {}
    }
    if !base.activation_checkpointing {
        try_train(
            "train.activation_checkpointing: true".into(),
            TrainSpec { activation_checkpointing: true, ..base.clone() },
        );
    }
    if !base.cpu_offload {
        try_train("train.cpu_offload: true".into(), TrainSpec { cpu_offload: true, ..base.clone() });
    }
    let mut seq = base.seq_len / 2;
    while seq >= MIN_SUGGESTED_SEQ_LEN {
        let t = TrainSpec { seq_len: seq, ..base.clone() };
        let (effect, fits) = outcome(ctx, ctx.cluster, &t, false);
        if fits {
            out.push(Suggestion { change: format!("train.seq_len: {seq}"), effect, fits });
            break;
        }
        seq /= 2;
    }
    if let Some(s) = more_devices(ctx) {
        out.push(s);
    }
    out
}

/// The fewest devices like the cluster's largest one that fit the job as it is.
fn more_devices(ctx: &Ctx) -> Option<Suggestion> {
    let n = ctx.devs.len();
    let big = (0..n).max_by(|&a, &b| {
        let (x, y) = (&ctx.devs[a], &ctx.devs[b]);
        x.memory_bytes.cmp(&y.memory_bytes).then(x.flops_per_s.total_cmp(&y.flops_per_s)).then(b.cmp(&a))
    })?;
    let dev = &ctx.devs[big];
    let like = |count: usize| ClusterSpec {
        name: format!("{count} x {}", dev.name),
        default_link: ctx.cluster.default_link,
        workers: vec![WorkerSpec {
            name: "like".into(),
            id: None,
            count,
            host_ram_gib: dev.host_ram_bytes as f64 / GIB,
            host_link_gb_s: dev.host_link_bytes_per_s / 1e9,
            devices: vec![DeviceSpec {
                kind: dev.kind,
                name: dev.name.clone(),
                memory_gib: Some(dev.memory_bytes as f64 / GIB),
                bf16_tflops: dev.flops_per_s / 1e12,
                memory_bandwidth_gb_s: Some(dev.memory_bytes_per_s / 1e9),
                count: 1,
            }],
        }],
        links: Vec::new(),
    };
    let fits = |count: usize| outcome(ctx, &like(count), ctx.train, true);
    let (mut lo, mut hi) = (n, None);
    let mut k = n.max(1);
    while k < MAX_SUGGESTED_DEVICES {
        k = (k * 2).min(MAX_SUGGESTED_DEVICES);
        let r = fits(k);
        if r.1 {
            hi = Some((k, r.0));
            break;
        }
        lo = k;
    }
    let (mut hi_k, mut effect) = hi?;
    while hi_k - lo > 1 {
        let mid = lo + (hi_k - lo) / 2;
        let r = fits(mid);
        if r.1 {
            (hi_k, effect) = (mid, r.0);
        } else {
            lo = mid;
        }
    }
    Some(Suggestion {
        change: format!(
            "{hi_k} devices like {}'s {} ({}) instead of {n}",
            dev.worker_name,
            dev.name,
            gib(dev.memory_bytes)
        ),
        effect,
        fits: true,
    })
}
