//! The predicted step of one candidate: compute per device, the 1F1B pipeline, communication
//! (collectives inside each stage's data-parallel group, pipeline sends, offload transfers) and
//! the sync strategy.

use super::{Ctx, Layout};
use crate::cluster::DeviceKind;
use crate::cost::Sharding;
use crate::plan::{StepTime, SyncPlan, SyncStrategy};

pub(crate) struct Timing {
    pub step: StepTime,
    pub sync: SyncPlan,
    /// Seconds each device computes per step, `[stage][replica]`.
    pub busy: Vec<Vec<f64>>,
}

/// One direction of a ring collective (reduce-scatter or all-gather) of `bytes` over `d` ranks.
fn half_ring(bytes: f64, d: u64, (bw, lat): (f64, f64), bucket: f64) -> f64 {
    if d <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let dm = (d - 1) as f64;
    dm / d as f64 * bytes / bw + dm * lat * (bytes / bucket).ceil().max(1.0)
}

impl Ctx<'_> {
    /// The slowest link of the ring through a stage's group: (bytes/s, latency s).
    fn ring_link(&self, group: &[usize]) -> (f64, f64) {
        let mut out = (f64::INFINITY, 0.0f64);
        for k in 0..group.len() {
            let (bw, lat) = self.cluster.link(&self.devs[group[k]], &self.devs[group[(k + 1) % group.len()]]);
            out = (out.0.min(bw), out.1.max(lat));
        }
        out
    }

    /// The step time of a layout with `layers` per stage, `m` micro-batches and `micro` sequences
    /// per micro-batch per replica. `None` for a DiLoCo layout whose links are fast enough to
    /// sync every step.
    pub(crate) fn timing(&self, lay: &Layout, layers: &[u64], m: u64, micro: &[u64]) -> Option<Timing> {
        let (p, d) = (lay.p, lay.d);
        let cm = self.cm;
        let bucket = cm.collective_bucket_bytes as f64;
        let mut tmb = vec![vec![0.0; d]; p];
        let mut useful = 0.0;
        for s in 0..p {
            for r in 0..d {
                let dev = &self.devs[lay.groups[s][r]];
                let slot = self.slot(lay, s, layers[s], micro[r], m, lay.groups[s][r]);
                tmb[s][r] = self.mc.micro_batch_seconds(cm, &slot, dev.flops_per_s, dev.memory_bytes_per_s);
                useful += m as f64 * self.mc.flops(&slot).0;
            }
        }
        // 1F1B per replica: fill and drain cost the sum of the stages, then the slowest stage paces.
        let mut pipe = vec![0.0; d];
        let mut bottleneck = vec![0.0; d];
        for r in 0..d {
            let sum: f64 = (0..p).map(|s| tmb[s][r]).sum();
            bottleneck[r] = (0..p).map(|s| tmb[s][r]).fold(0.0, f64::max);
            pipe[r] = sum + (m - 1) as f64 * bottleneck[r];
        }
        let slowest = (0..d).max_by(|&a, &b| pipe[a].total_cmp(&pipe[b]).then(b.cmp(&a))).unwrap_or(0);
        let compute = m as f64 * bottleneck[slowest];
        let bubble = pipe[slowest] - compute;

        let mut every_step_sync = 0.0f64;
        let mut diloco_sync = 0.0f64;
        let mut comm = vec![vec![0.0; d]; p];
        let mut host_opt = 0.0f64;
        for s in 0..p {
            let head = s == p - 1;
            let trainable = self.mc.trainable(layers[s], s == 0, head) as f64;
            let link = self.ring_link(&lay.groups[s]);
            let (dd, mf) = (d as u64, m as f64);
            let allreduce = 2.0 * half_ring(2.0 * trainable, dd, link, bucket);
            every_step_sync = every_step_sync.max(allreduce);
            diloco_sync = diloco_sync.max(2.0 * half_ring(4.0 * trainable, dd, link, bucket));
            for r in 0..d {
                let di = lay.groups[s][r];
                let dev = &self.devs[di];
                let slot = self.slot(lay, s, layers[s], micro[r], m, di);
                let gathered = self.mc.stage_weight_bytes(&slot) as f64
                    + if self.mc.layer_lora > 0 { 2.0 * trainable } else { 0.0 };
                let mut c = match lay.sharding {
                    Sharding::Zero1 => allreduce,
                    Sharding::Zero2 => {
                        mf * half_ring(2.0 * trainable, dd, link, bucket) + half_ring(2.0 * trainable, dd, link, bucket)
                    }
                    Sharding::Zero3 => {
                        mf * (half_ring(2.0 * trainable, dd, link, bucket)
                            + 2.0 * half_ring(gathered, dd, link, bucket))
                    }
                    Sharding::Replicated => 0.0,
                };
                if lay.offload {
                    let h2d = dev.host_link_bytes_per_s;
                    c += mf * 2.0 * gathered / d as f64 / h2d + 4.0 * trainable / d as f64 / h2d;
                    host_opt = host_opt.max(trainable / d as f64 / cm.host_adam_params_per_s);
                }
                for nb in [s.wrapping_sub(1), s + 1] {
                    if nb < p {
                        let (bw, lat) = self.cluster.link(dev, &self.devs[lay.groups[nb][r]]);
                        let bytes = self.mc.boundary_bytes(micro[r], slot.cpu) as f64;
                        c += mf * 2.0 * (bytes / bw + lat);
                    }
                }
                comm[s][r] = c;
            }
        }
        let strategy;
        let explanation;
        let reference = compute + bubble;
        let ratio = every_step_sync / reference.max(1e-12);
        if lay.sharding == Sharding::Replicated {
            if d <= 1 || every_step_sync <= cm.diloco_switch_fraction * reference {
                return None;
            }
            let h = ((diloco_sync / (cm.diloco_target_overhead * reference)).ceil() as u64)
                .clamp(cm.diloco_min_h, cm.diloco_max_h);
            for row in &mut comm {
                for c in row.iter_mut() {
                    *c += diloco_sync / h as f64;
                }
            }
            strategy = SyncStrategy::Diloco { every: h };
            explanation = format!(
                "an every-step all-reduce would take {every_step_sync:.2} s against {reference:.2} s of compute ({ratio:.1}x), so replicas step locally and average their weights every H = {h} steps ({diloco_sync:.2} s per outer sync, {:.1}% of compute amortized); break-even (amortized sync = compute) at H = {:.1}",
                100.0 * diloco_sync / h as f64 / reference,
                diloco_sync / reference
            );
        } else {
            strategy = SyncStrategy::EveryStep;
            explanation = if d == 1 {
                "one replica per stage: nothing to sync between replicas".to_string()
            } else {
                format!(
                    "ZeRO-{} reduces gradients every step: the all-reduce takes {every_step_sync:.3} s against {reference:.2} s of compute ({:.1}%), partly hidden behind the backward pass; DiLoCo would pay off above {:.0}%",
                    lay.sharding.zero_stage(),
                    100.0 * ratio,
                    100.0 * cm.diloco_switch_fraction
                )
            };
        }
        let mut exposed = 0.0f64;
        let mut busy = vec![vec![0.0; d]; p];
        for s in 0..p {
            for r in 0..d {
                busy[s][r] = m as f64 * tmb[s][r];
                exposed = exposed.max((comm[s][r] - cm.comm_overlap * busy[s][r]).max(0.0));
            }
        }
        // A tied table lives on the last stage: the first waits for its rows before the schedule
        // and the last for their gradient after it (`worker::train::pipeline`).
        let mut tied = 0.0f64;
        if p > 1 {
            for (r, &rows) in micro.iter().enumerate().take(d) {
                let (first, last) = (&self.devs[lay.groups[0][r]], &self.devs[lay.groups[p - 1][r]]);
                let tokens = m * rows * self.train.seq_len as u64;
                let bytes =
                    self.mc.tied_exchange_bytes(tokens, last.kind == DeviceKind::Cpu, first.kind == DeviceKind::Cpu);
                if bytes > 0 {
                    let (bw, lat) = self.cluster.link(first, last);
                    tied = tied.max(bytes as f64 / bw + 2.0 * lat);
                }
            }
        }
        let total = compute + bubble + exposed + tied + host_opt;
        let flops: f64 = lay.groups.iter().flatten().map(|&i| self.devs[i].flops_per_s).sum();
        let tokens = self.train.tokens_per_step() as f64;
        Some(Timing {
            step: StepTime {
                compute_s: compute + host_opt,
                communication_s: exposed + tied,
                tied_exchange_s: tied,
                bubble_s: bubble,
                total_s: total,
                bubble_fraction: bubble / reference.max(1e-12),
                tokens_per_s: tokens / total,
                mfu: useful / (total * flops),
            },
            sync: SyncPlan {
                strategy,
                sync_s: if lay.sharding == Sharding::Replicated { diloco_sync } else { every_step_sync },
                compute_s: reference,
                break_even_h: (d > 1).then_some(if lay.sharding == Sharding::Replicated {
                    diloco_sync / reference
                } else {
                    ratio
                }),
                explanation,
            },
            busy,
        })
    }
}
