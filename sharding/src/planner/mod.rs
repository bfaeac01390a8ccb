//! The planner: searches pipeline degree, stage boundaries, data-parallel groups, ZeRO stage,
//! offload, checkpointing and micro-batch sizes with the cost model, and keeps the layout with
//! the best predicted throughput. Deterministic: candidates are tried in a fixed order and a later
//! one replaces the best only when it is strictly faster.
//!
//! A layout takes the `k` fastest devices, cuts them into `p` stage groups of `d` consecutive
//! devices (so a stage's replicas are alike), and orders the groups fastest-first or
//! fastest-last (the last stage also runs the LM head). Layers are balanced by each group's
//! speed within each member's memory; sequences are split over replicas by their speed.

mod build;
mod layout;
mod suggest;
mod timing;

use crate::cluster::{ClusterSpec, DeviceKind, PlanDevice};
use crate::cost::{CostModel, ModelCost, Sharding, Slot};
use crate::model::ModelSpec;
use crate::plan::{MemoryBreakdown, Plan, StepTime, SyncPlan};
use crate::plan_error::{MemoryKind, PlanError};
use crate::train_spec::TrainSpec;
use layout::{balance_layers, device_counts, divisors, profiles, speed_order, split_sequences};

/// The (device profile, host RAM share) of a replica's device on each stage.
type ReplicaKey = Vec<(usize, u64)>;

/// Micro-batch counts tried per pipelined layout (the smallest ones that fit).
const MAX_MICRO_BATCH_TRIES: usize = 12;

/// Plans `train` of `model` on `cluster` with the default cost model.
pub fn plan(cluster: &ClusterSpec, model: &ModelSpec, train: &TrainSpec) -> Result<Plan, PlanError> {
    plan_with(cluster, model, train, &CostModel::DEFAULT)
}

/// Plans with a given cost model (for calibration and what-ifs).
pub fn plan_with(
    cluster: &ClusterSpec,
    model: &ModelSpec,
    train: &TrainSpec,
    cost: &CostModel,
) -> Result<Plan, PlanError> {
    check_inputs(cluster, model, train)?;
    let ctx = Ctx::new(cluster, model, train, cost);
    if ctx.devs.is_empty() {
        return Err(PlanError::EmptyCluster);
    }
    let found = ctx.search(false);
    match &found.best {
        Some(best) => Ok(build::plan(&ctx, best, &found)),
        None => Err(suggest::shortfall(&ctx, found.miss)),
    }
}

fn invalid(field: &str, value: impl std::fmt::Display, problem: &str, fix: &str) -> PlanError {
    PlanError::Invalid { field: field.into(), value: value.to_string(), problem: problem.into(), fix: fix.into() }
}

fn check_inputs(cluster: &ClusterSpec, model: &ModelSpec, t: &TrainSpec) -> Result<(), PlanError> {
    cluster.validate().map_err(|e| invalid(&format!("cluster {}", e.field), e.value, &e.problem, &e.fix))?;
    model.check().map_err(|e| invalid("model", "(shape)", &e, "fix the model's config.json or overrides"))?;
    if t.seq_len < 2 || t.seq_len > model.max_position_embeddings {
        return Err(invalid(
            "train.seq_len",
            t.seq_len,
            &format!("must be in [2, {}] (the model's max_position_embeddings)", model.max_position_embeddings),
            "shorten train.seq_len",
        ));
    }
    if t.global_batch == 0 {
        return Err(invalid("train.global_batch", 0, "must be > 0", "set the sequences per step, e.g. 16"));
    }
    if let Some(l) = t.mode.lora() {
        if l.rank == 0 {
            return Err(invalid("finetune.lora.rank", 0, "must be > 0", "use e.g. 16"));
        }
        if l.targets.is_empty() {
            return Err(invalid("finetune.lora.target_modules", "[]", "names no module", "use e.g. [q_proj, v_proj]"));
        }
    }
    if let Some(b) = t.micro_batch
        && (b == 0 || !t.global_batch.is_multiple_of(b))
    {
        return Err(invalid(
            "micro_batch",
            b,
            &format!("must be > 0 and divide train.global_batch ({})", t.global_batch),
            "leave it to the planner",
        ));
    }
    Ok(())
}

/// Everything a search needs, computed once.
pub(crate) struct Ctx<'a> {
    pub cluster: &'a ClusterSpec,
    pub model: &'a ModelSpec,
    pub train: &'a TrainSpec,
    pub cm: &'a CostModel,
    pub mc: ModelCost,
    pub devs: Vec<PlanDevice>,
    profile: Vec<usize>,
    workers: usize,
}

/// Which devices do what, and how state is kept.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub p: usize,
    pub d: usize,
    /// Device indices, `[stage][replica]`.
    pub groups: Vec<Vec<usize>>,
    pub sharding: Sharding,
    pub offload: bool,
    pub ckpt: bool,
    /// Used devices per worker (they share its host RAM).
    share: Vec<u64>,
}

/// A layout that fits, with its numbers.
pub(crate) struct Candidate {
    pub lay: Layout,
    pub layers: Vec<u64>,
    pub m: u64,
    pub micro: Vec<u64>,
    pub step: StepTime,
    pub sync: SyncPlan,
    pub busy: Vec<Vec<f64>>,
}

/// The closest a layout came to fitting.
#[derive(Clone, Debug)]
pub(crate) struct Miss {
    pub short: u64,
    pub memory: MemoryKind,
    pub device: usize,
    pub needed: u64,
    pub available: u64,
    pub breakdown: Option<MemoryBreakdown>,
    pub lay: Layout,
    pub micro_batch: u64,
}

pub(crate) struct Found {
    pub best: Option<Candidate>,
    pub miss: Option<Miss>,
    /// Per device, tokens/s of the best layout that fits and uses it (0 when none does).
    pub best_using: Vec<f64>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(cluster: &'a ClusterSpec, model: &'a ModelSpec, train: &'a TrainSpec, cm: &'a CostModel) -> Self {
        let devs = cluster.plan_devices();
        let profile = profiles(&devs);
        let workers = devs.iter().map(|d| d.worker + 1).max().unwrap_or(0);
        Ctx { cluster, model, train, cm, mc: ModelCost::new(model, train), devs, profile, workers }
    }

    pub(crate) fn slot(&self, lay: &Layout, s: usize, layers: u64, b: u64, m: u64, dev: usize) -> Slot {
        Slot {
            layers,
            embedding: s == 0,
            head: s == lay.p - 1,
            dp: lay.d as u64,
            sharding: lay.sharding,
            offload: lay.offload,
            checkpointing: lay.ckpt,
            micro_batch: b,
            in_flight: m.min((lay.p - s) as u64),
            pipeline: lay.p > 1,
            cpu: self.devs[dev].kind == DeviceKind::Cpu,
        }
    }

    /// Device memory a rank may use.
    pub(crate) fn capacity(&self, dev: usize) -> u64 {
        let d = &self.devs[dev];
        if d.kind == DeviceKind::Cpu {
            d.memory_bytes.saturating_sub(self.cm.host_reserved_bytes)
        } else {
            d.memory_bytes
        }
    }

    fn host_capacity(&self, lay: &Layout, dev: usize) -> u64 {
        let d = &self.devs[dev];
        d.host_ram_bytes.saturating_sub(self.cm.host_reserved_bytes) / lay.share[d.worker].max(1)
    }

    /// How far a device is over its memory or its share of host RAM (0 when it fits).
    pub(crate) fn overrun(
        &self,
        lay: &Layout,
        slot: &Slot,
        dev: usize,
    ) -> (u64, MemoryKind, u64, u64, MemoryBreakdown) {
        let (mut mem, host) = self.mc.memory(self.cm, slot);
        mem.capacity = self.capacity(dev);
        let host_cap = self.host_capacity(lay, dev);
        let dev_short = mem.total.saturating_sub(mem.capacity);
        let host_short = host.saturating_sub(host_cap);
        if host_short > dev_short {
            (host_short, MemoryKind::HostRam, host, host_cap, mem)
        } else {
            (dev_short, MemoryKind::Device, mem.total, mem.capacity, mem)
        }
    }

    fn fits(&self, lay: &Layout, slot: &Slot, dev: usize) -> bool {
        self.overrun(lay, slot, dev).0 == 0
    }

    /// Runs the search. `all_only` keeps every device (no smaller subsets).
    pub(crate) fn search(&self, all_only: bool) -> Found {
        let order = speed_order(&self.devs);
        let n = order.len();
        let counts = if all_only { vec![n] } else { device_counts(&order, &self.profile) };
        let mut found = Found { best: None, miss: None, best_using: vec![0.0; n] };
        for k in counts {
            self.search_devices(&order, k, &mut found);
        }
        found
    }

    /// Tries every layout of the `k` fastest devices.
    fn search_devices(&self, order: &[usize], k: usize, found: &mut Found) {
        let layers = self.mc.layers as usize;
        for p in (1..=k.min(layers)).filter(|p| k.is_multiple_of(*p)) {
            let d = k / p;
            let groups: Vec<Vec<usize>> = order[..k].chunks(d).map(<[usize]>::to_vec).collect();
            let mut share = vec![0u64; self.workers];
            for &i in &order[..k] {
                share[self.devs[i].worker] += 1;
            }
            let any_cpu = order[..k].iter().any(|&i| self.devs[i].kind == DeviceKind::Cpu);
            let orientations: &[bool] = if p == 1 { &[false] } else { &[false, true] };
            let ckpts: &[bool] = if self.train.activation_checkpointing { &[false, true] } else { &[false] };
            let offloads: &[bool] = if self.train.cpu_offload && !any_cpu { &[false, true] } else { &[false] };
            for &fast_last in orientations {
                let mut g = groups.clone();
                if fast_last {
                    g.reverse();
                }
                for &ckpt in ckpts {
                    for &offload in offloads {
                        let shardings: &[Sharding] = match (d, offload) {
                            (1, _) => &[Sharding::Zero1],
                            (_, true) => &[Sharding::Zero3],
                            _ => &[Sharding::Zero1, Sharding::Zero2, Sharding::Zero3, Sharding::Replicated],
                        };
                        for &sharding in shardings {
                            let lay = Layout { p, d, groups: g.clone(), sharding, offload, ckpt, share: share.clone() };
                            self.evaluate(&lay, found);
                        }
                    }
                }
            }
        }
    }

    /// Most layers stage `s` of a layout can hold with micro-batches of `b` sequences.
    fn max_layers(&self, lay: &Layout, s: usize, b: u64, m: u64) -> u64 {
        let total = self.mc.layers;
        let mut best = total;
        let mut seen: Vec<(usize, u64)> = Vec::new();
        for &dev in &lay.groups[s] {
            let key = (self.profile[dev], lay.share[self.devs[dev].worker]);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let fits = |n: u64| self.fits(lay, &self.slot(lay, s, n, b, m, dev), dev);
            if !fits(0) {
                return 0;
            }
            let (mut lo, mut hi) = (0, best);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(mid) { lo = mid } else { hi = mid - 1 }
            }
            best = lo;
        }
        best
    }

    /// Largest micro-batch (sequences, at most `upper`) replica `r` fits on every stage.
    fn max_micro(&self, lay: &Layout, r: usize, layers: &[u64], m: u64, upper: u64) -> u64 {
        let mut best = upper;
        for (s, &n) in layers.iter().enumerate() {
            let dev = lay.groups[s][r];
            let fits = |b: u64| self.fits(lay, &self.slot(lay, s, n, b, m, dev), dev);
            let (mut lo, mut hi) = (0, best);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(mid) { lo = mid } else { hi = mid - 1 }
            }
            best = lo;
        }
        best
    }

    fn evaluate(&self, lay: &Layout, found: &mut Found) {
        let (p, d) = (lay.p, lay.d);
        let g = self.train.global_batch as u64;
        if (d as u64) > g {
            return;
        }
        let fixed = self.train.micro_batch.map(|b| b as u64);
        let b0 = fixed.unwrap_or(1);
        let m_most = (g / (d as u64 * b0)).max(1);
        let caps: Vec<u64> = (0..p).map(|s| self.max_layers(lay, s, b0, m_most)).collect();
        let speed: Vec<f64> =
            lay.groups.iter().map(|grp| grp.iter().map(|&i| self.devs[i].flops_per_s).sum()).collect();
        let one = self.slot(lay, 0, 1, 1, 1, lay.groups[0][0]);
        let work = self.mc.flops(&Slot { embedding: false, head: false, ..one }).1;
        let head = self.mc.flops(&Slot { layers: 0, embedding: false, head: true, ..one }).1;
        let extra: Vec<f64> = (0..p).map(|s| if s == p - 1 { head } else { 0.0 }).collect();
        let total = self.mc.layers;
        let Some(layers) = balance_layers(total, work, &speed, &extra, &caps) else {
            if let Some(layers) = balance_layers(total, work, &speed, &extra, &vec![total; p]) {
                self.record_miss(lay, &layers, &vec![b0; d], m_most, found);
            }
            return;
        };
        let mut tried = 0;
        for m in divisors(g) {
            let seqs = g / m;
            if seqs < d as u64 {
                break;
            }
            if fixed.is_some_and(|b| seqs != b * d as u64) {
                continue;
            }
            // Replicas made of alike devices get the same answers: work each out once.
            let mut known: Vec<(ReplicaKey, u64, f64)> = Vec::new();
            let (mut caps, mut secs) = (Vec::with_capacity(d), Vec::with_capacity(d));
            for r in 0..d {
                let key: ReplicaKey = (0..p)
                    .map(|s| (self.profile[lay.groups[s][r]], lay.share[self.devs[lay.groups[s][r]].worker]))
                    .collect();
                let (cap, sec) = match known.iter().find(|k| k.0 == key) {
                    Some(k) => (k.1, k.2),
                    None => {
                        let cap = match fixed {
                            Some(b) if self.max_micro(lay, r, &layers, m, b) == b => b,
                            Some(_) => 0,
                            None => self.max_micro(lay, r, &layers, m, seqs),
                        };
                        let sec = (0..p)
                            .map(|s| {
                                let dev = &self.devs[lay.groups[s][r]];
                                let slot = self.slot(lay, s, layers[s], 1, m, lay.groups[s][r]);
                                self.mc.micro_batch_seconds(self.cm, &slot, dev.flops_per_s, dev.memory_bytes_per_s)
                            })
                            .fold(0.0, f64::max);
                        known.push((key, cap, sec));
                        (cap, sec)
                    }
                };
                caps.push(cap);
                secs.push(sec);
            }
            let Some(micro) = split_sequences(seqs, &secs, &caps) else {
                let even = vec![seqs.div_ceil(d as u64); d];
                self.record_miss(lay, &layers, &even, m, found);
                continue;
            };
            let Some(t) = self.timing(lay, &layers, m, &micro) else { return };
            tried += 1;
            let tps = t.step.tokens_per_s;
            for &i in lay.groups.iter().flatten() {
                found.best_using[i] = found.best_using[i].max(tps);
            }
            if found.best.as_ref().is_none_or(|b| tps > b.step.tokens_per_s * (1.0 + 1e-9)) {
                found.best = Some(Candidate {
                    lay: lay.clone(),
                    layers: layers.clone(),
                    m,
                    micro,
                    step: t.step,
                    sync: t.sync,
                    busy: t.busy,
                });
            }
            if p == 1 || tried >= MAX_MICRO_BATCH_TRIES {
                break;
            }
        }
    }

    /// Remembers the worst overrun of a layout that does not fit, if it is the closest yet.
    fn record_miss(&self, lay: &Layout, layers: &[u64], micro: &[u64], m: u64, found: &mut Found) {
        let mut worst: Option<Miss> = None;
        for (s, &n) in layers.iter().enumerate() {
            for (r, &b) in micro.iter().enumerate() {
                let dev = lay.groups[s][r];
                let slot = self.slot(lay, s, n, b, m, dev);
                let (short, memory, needed, available, mem) = self.overrun(lay, &slot, dev);
                if short > 0 && worst.as_ref().is_none_or(|w| short > w.short) {
                    worst = Some(Miss {
                        short,
                        memory,
                        device: dev,
                        needed,
                        available,
                        breakdown: (memory == MemoryKind::Device).then_some(mem),
                        lay: lay.clone(),
                        micro_batch: b,
                    });
                }
            }
        }
        if let Some(w) = worst
            && found.miss.as_ref().is_none_or(|b| w.short < b.short)
        {
            found.miss = Some(w);
        }
    }
}

#[cfg(test)]
mod tests;
