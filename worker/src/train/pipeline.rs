//! One rank of a pipeline-parallel job: a stage of consecutive layers, replicated over the
//! stage's data-parallel group (ZeRO-1 inside it).
//!
//! - **Layout** (`StageLayout`): rank = stage × replicas + replica. The first stage holds the
//!   embedding, the last the final norm and LM head; an embedding tied to the head is the last
//!   stage's. Each stage's parameters are one range of the model's flat vector (`param_shapes`
//!   order is stage order), or two on the last stage of a tied model (the embedding at the start,
//!   then its layers); a stage's ZeRO shards are cut from their concatenation, so the ranks'
//!   shards partition the vector exactly as without stages, and checkpoints keep their format.
//! - **Schedule**: 1F1B over the replica's micro-batches. Stage s runs `stages − s − 1` forward
//!   passes ahead, then alternates one forward and one backward, then drains the backward
//!   passes. Activations go to the next stage and their gradients come back over direct links
//!   (`comm::link`, channel [`NEXT`]); a stage's backward pass starts from the incoming gradient
//!   `g` as the backward of `sum(out · g)`, whose gradient with respect to `out` is exactly `g`.
//! - **Tied embeddings** ([`TIED`] link, sparse): the last stage owns the table (the head's
//!   gradient is dense there). At the start of a step it sends the rows of the step's distinct
//!   input tokens; the first stage looks its inputs up in them, and at the end of its schedule
//!   sends back the gradient of its inputs, a row per token, which the last stage adds into the
//!   table's gradient. Both ends know the tokens (they read the same rows), so no ids travel:
//!   at most 2 × tokens × hidden values a step, where the whole table went each way before.
//! - **Step**: reduce-scatter of the stage's gradient in its group, the global norm summed over
//!   every rank (the shards partition the model), AdamW on the shard, all-gather in the group.
//!   A CUDA stage without replicas skips the group: its gradients, moments and master weights
//!   stay on the device ([`DeviceStage`]) and the AdamW kernel writes the packed parameters.

use super::{
    Report, StepStats, TrainContext, adam_config, check_norm, clip_scale, decay_segments, flatten_params, host_adamw,
    load_start, peak_memory,
};
use crate::checkpoint::RankShard;
use crate::comm::link::Link;
use crate::comm::ring::Ring;
use crate::data::sample_rows;
use crate::model::{Llama, param_shapes, split_windows};
use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;
use swarm_kernels::AdamW;
use swarm_sharding::recipe::StageLayout;
use swarm_sharding::{Assignment, Peer, Rank, Step};

/// Data-plane channels of a pipeline job's links (the world ring is channel 0).
const GROUP: u32 = 1;
const NEXT: u32 = 2;
const TIED: u32 = 3;

/// The transformer layer a parameter name belongs to.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// A forward pass whose backward pass is still to come.
struct InFlight {
    /// The stage's input as a leaf (absent on the first stage, whose input is token ids).
    input: Option<Var>,
    /// The loss scaled by the micro-batch's share of the global batch (last stage), else the
    /// stage's output.
    out: Tensor,
}

pub(super) fn run(a: &Assignment, mut ctx: TrainContext, layout: StageLayout) -> anyhow::Result<Step> {
    let recipe = &a.recipe;
    let spec = recipe.spec().context("the recipe's model shape is not resolved")?;
    let t = &recipe.train;
    let device: Device = crate::device::select(&ctx.device)?;
    let rank = a.rank.0 as usize;
    let (stages, replicas) = (layout.stages, layout.replicas);
    let (stage, replica) = (layout.stage_of(rank), layout.replica_of(rank));
    let (first, last) = (stage == 0, stage + 1 == stages);
    let tied = spec.tie_word_embeddings;
    let my_layers = layout.layers[stage].clone();
    let peer = |s: usize, r: usize| -> &Peer { &a.peers[layout.rank(s, r)] };
    let name_of = |s: usize, r: usize| format!("{} ({})", peer(s, r).rank, layout.describe(layout.rank(s, r)));

    let (dataset, mut order) = super::open_data(recipe, spec)?;

    // A tied embedding is the LM head's weight: the last stage owns it (the head's gradient is
    // dense there), and the first stage looks its rows up from what the last stage sends.
    let tied_split = tied && stages > 1;
    let keep = |name: &str| owns(name, &my_layers, first, last, tied_split);
    // A fresh start initialises only this stage's parameters (to the values one process would
    // give them), or loads only them from Hugging Face weights (the worker fetched only the
    // files holding them). Resuming loads the whole model and drops the other stages' parameters.
    let (mut model, resumed, start, mut cursor) = match (&a.resume, &recipe.model.hf_dir) {
        (None, None) => (Llama::init_subset(spec, t.seed, &device, keep)?, None, Step(0), 0),
        (None, Some(dir)) => {
            let m = Llama::load_subset(spec, dir, &device, keep)
                .with_context(|| format!("model.hf_dir: cannot load stage {stage}'s weights on this worker"))?;
            (m, None, Step(0), 0)
        }
        (Some(_), _) => load_start(a, spec, &device)?,
    };
    model.retain(keep);
    // The stage's ranges of the flat vector (two on the last stage of a tied model: the
    // embedding, then its layers); its parameters are their concatenation.
    let total: usize = param_shapes(spec).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let stage_ranges = stage_ranges(spec, &layout, stage)?;
    let mut params = flatten_params(&model)?;
    let stage_len: usize = stage_ranges.iter().map(Range::len).sum();
    if params.len() != stage_len {
        bail!("stage {stage}: {} parameters where its ranges {stage_ranges:?} hold {stage_len}", params.len());
    }
    let dtype = super::compute_dtype(t.precision, &device);
    model.cast(dtype)?;
    // Filled below once the moments are known: a CUDA stage without replicas keeps its gradients
    // and optimizer on the device.
    let mut on_device: Option<DeviceStage> = None;

    // Links: every rank in a ring (the norm, checkpoints), the stage's group, the neighbours.
    let mut world = Ring::connect(&ctx.data_plane, a.job, a.attempt, a.rank, &a.peers, &ctx.aborter)?;
    let group_peers: Vec<Peer> = (0..replicas).map(|r| peer(stage, r).clone()).collect();
    let mut group = Ring::connect_group(&ctx.data_plane, a.job, a.attempt, GROUP, a.rank, &group_peers, &ctx.aborter)?;
    let link = |s: usize, ch: u32| {
        Link::connect(
            &ctx.data_plane,
            a.job,
            a.attempt,
            ch,
            a.rank,
            peer(s, replica),
            name_of(s, replica),
            &ctx.aborter,
        )
    };
    // Lower stages dial, so connecting in stage order cannot deadlock.
    let mut prev = if first { None } else { Some(link(stage - 1, NEXT)?) };
    let mut next = if last { None } else { Some(link(stage + 1, NEXT)?) };
    let mut tied_link = match (tied_split, first, last) {
        (true, true, _) => Some(link(stages - 1, TIED)?),
        (true, _, true) => Some(link(0, TIED)?),
        _ => None,
    };
    let own = group.own_range(params.len());
    let own_global = sub_ranges(&stage_ranges, own.clone());
    // The replicas of a stage must start from the same weights.
    let local: f64 = params.iter().map(|x| f64::from(*x)).sum();
    let sums = group.all_reduce_small(&[local, 1.0])?;
    if (sums[0] - local * sums[1]).abs() > 1e-9 * (local.abs() * sums[1]).max(1.0) {
        bail!("the replicas of stage {stage} of {} start from different weights", a.job);
    }
    let (mut m, mut v, mut adam_step) = match resumed {
        Some(o) => (pick(&o.exp_avg, &own_global), pick(&o.exp_avg_sq, &own_global), o.adam_step),
        None => (vec![0f32; own.len()], vec![0f32; own.len()], 0),
    };
    // Decay segments of the stage's parameters, within the shard.
    let decay: Vec<(Range<usize>, bool)> = decay_segments(&model)
        .into_iter()
        .filter_map(|(r, d)| {
            let (s, e) = (r.start.max(own.start), r.end.min(own.end));
            (s < e).then(|| (s - own.start..e - own.start, d))
        })
        .collect();
    if device.is_cuda() && replicas == 1 {
        on_device = Some(DeviceStage::new(&mut model, &params, &m, &v)?);
    }
    let (offset, count) = (a.share.offset, a.share.count);
    let micro = recipe.micro_batch_rows(replica, count);
    let pieces = super::micro_batches(count, micro);
    let mb = pieces.len();
    let warmup = (stages - stage - 1).min(mb);
    let (h, seq) = (spec.hidden_size, t.seq_len);
    tracing::info!(job = %a.job, rank = %a.rank, stage, replica, layers = ?my_layers, params = params.len(), own = own.len(), micro_batches = mb, optimizer = if on_device.is_some() { "device" } else { "host" }, "training a pipeline stage");

    let bytes = |world: &Ring, group: &Ring, links: [&Option<Link>; 3]| {
        world.bytes_sent()
            + group.bytes_sent()
            + links.iter().map(|l| l.as_ref().map_or(0, Link::bytes_sent)).sum::<u64>()
    };
    let mut sent_before = bytes(&world, &group, [&prev, &next, &tied_link]);
    let profile = std::env::var_os("SWARM_PROFILE").is_some();
    for step_no in start.0 + 1..=t.steps {
        let step = Step(step_no);
        if ctx.cancel.load(Ordering::Relaxed) {
            bail!("cancelled at {step}");
        }
        let t0 = Instant::now();
        let rows = sample_rows(&mut order, cursor + offset as u64, count);
        let lr = recipe.lr_at(step_no);
        let mut idle = 0.0;
        let mut loss_sum: Option<Tensor> = None;
        let mut grad: Option<Vec<f32>> = None;
        let mut flight: std::collections::VecDeque<InFlight> = Default::default();
        // The tied embedding's rows this step looks up: the distinct input tokens of the
        // replica's rows (both ends of the tied link compute them from the same rows). The last
        // stage sends their current values; the first stage looks its inputs up in them and
        // sends back the gradient of its inputs, which the last stage adds to the table's.
        let ids = if tied_split && (first || last) { input_ids(&dataset, &rows, seq) } else { Vec::new() };
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut tied_rows: Option<Tensor> = None;
        let mut input_grads: Vec<Tensor> = Vec::new();
        if let Some(tl) = &mut tied_link {
            if last {
                let table = Tensor::from_vec(distinct.clone(), distinct.len(), &device)?;
                let w = model.params[0].var.as_tensor();
                tl.send_tensor(&w.index_select(&table, 0)?)?;
            } else {
                let tw = Instant::now();
                tied_rows = Some(tl.recv_tensor((distinct.len(), h), &device, dtype)?);
                idle += tw.elapsed().as_secs_f64();
            }
        }
        // 1F1B: `warmup` forward passes, then one forward and one backward, then the rest.
        let mut ops: Vec<(bool, usize)> = (0..warmup).map(|i| (true, i)).collect();
        for i in 0..mb - warmup {
            ops.push((true, warmup + i));
            ops.push((false, i));
        }
        ops.extend((mb - warmup..mb).map(|i| (false, i)));
        for (forward, i) in ops {
            let piece = pieces[i].clone();
            let len = piece.len();
            if forward {
                // Token windows: the last stage's targets, the first stage's inputs (unless a
                // tied table's rows, looked up by `ids`, stand in for the embedding).
                let windows = if (first && !tied_split) || last {
                    Some(split_windows(&super::windows(&dataset, &rows[piece.clone()], seq, &device)?)?)
                } else {
                    None
                };
                let (input, x) = match &mut prev {
                    None if tied_split => {
                        // Looked up in the rows the last stage sent; the input is a leaf whose
                        // gradient goes back to it.
                        let at = positions(&ids[piece.start * seq..piece.end * seq], &distinct, &device)?;
                        let rows_t = tied_rows.as_ref().context("the tied embedding's rows")?;
                        let x = Var::from_tensor(&rows_t.index_select(&at, 0)?.reshape((len, seq, h))?)?;
                        let t = x.as_tensor().clone();
                        (Some(x), t)
                    }
                    None => (None, model.embed(&windows.as_ref().context("first stage")?.0)?),
                    Some(p) => {
                        let tw = Instant::now();
                        let got = p.recv_tensor((len, seq, h), &device, dtype)?;
                        idle += tw.elapsed().as_secs_f64();
                        let x = Var::from_tensor(&got)?;
                        let t = x.as_tensor().clone();
                        (Some(x), t)
                    }
                };
                let out = model.layers(x, my_layers.clone())?;
                let out = match &mut next {
                    None => {
                        let loss = model.head_loss(&out, &windows.as_ref().context("last stage")?.1)?;
                        let part = (loss.detach() * (len as f64 / count as f64))?;
                        loss_sum = Some(match loss_sum {
                            Some(l) => (l + part)?,
                            None => part,
                        });
                        (&loss * (len as f64 / t.global_batch as f64))?
                    }
                    Some(n) => {
                        n.send_tensor(&out)?;
                        out
                    }
                };
                flight.push_back(InFlight { input, out });
            } else {
                let f = flight.pop_front().context("1F1B: a backward pass with no forward pass")?;
                let root = match &mut next {
                    None => f.out,
                    Some(n) => {
                        let tw = Instant::now();
                        let g = n.recv_tensor((len, seq, h), &device, dtype)?;
                        idle += tw.elapsed().as_secs_f64();
                        (&f.out * &g)?.sum_all()?
                    }
                };
                let gx = match &on_device {
                    // Backward passes run in micro-batch order: the first one starts the sum.
                    Some(d) => d.backward(&root, i > 0, f.input.as_ref())?,
                    None => {
                        let grads = root.backward()?;
                        let g = super::flat_grads(&model, &grads)?;
                        match &mut grad {
                            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                            None => grad = Some(g),
                        }
                        match &f.input {
                            Some(x) => {
                                Some(grads.get(x.as_tensor()).context("no gradient reached the stage's input")?.clone())
                            }
                            None => None,
                        }
                    }
                };
                match (&mut prev, gx) {
                    (Some(p), Some(gx)) => p.send_tensor(&gx)?,
                    // The first stage of a tied model: kept until the schedule ends (sending now
                    // could fill the link while the last stage waits for activations).
                    (None, Some(gx)) => input_grads.push(gx.flatten_all()?),
                    _ => {}
                }
            }
        }
        let busy = t0.elapsed().as_secs_f64() - idle;
        let cfg = |decays: bool| adam_config(t, lr, decays);
        // The tied embedding: the first stage's input gradients join the head's gradient of the
        // table on the last stage (a row per input token, summed in token order).
        let t1 = Instant::now();
        // Summed in f32 whatever the dtype the rows travelled in: on the device for a stage that
        // steps there, on the host otherwise.
        let mut table_grad: Option<Tensor> = None;
        if let Some(tl) = &mut tied_link {
            if first {
                tl.send_tensor(&Tensor::cat(&input_grads, 0)?)?;
            } else {
                let at = if on_device.is_some() { device.clone() } else { Device::Cpu };
                table_grad = Some(tl.recv_tensor((ids.len(), h), &at, DType::F32)?);
            }
        }
        let (norm, comm) = match &mut on_device {
            Some(d) => {
                if let Some(dx) = table_grad {
                    // Summed per distinct token in f32 (in token order), then added into those
                    // rows of the table's gradient in place: no dense [vocab, hidden] temporary.
                    let at = positions(&ids, &distinct, &device)?;
                    let rows = Tensor::zeros((distinct.len(), h), DType::F32, &device)?.index_add(&at, &dx, 0)?;
                    let table = d.grads().narrow(0, 0, spec.vocab_size * h)?.reshape((spec.vocab_size, h))?;
                    swarm_kernels::add_rows_into(&table, &distinct, &rows)?;
                }
                let norm = world.all_reduce_small(&[d.sum_squares(d.grads())?])?[0].sqrt();
                let comm = t1.elapsed().as_secs_f64();
                check_norm(norm, step)?;
                let scale = clip_scale(t, norm);
                adam_step += 1;
                d.step(&decay, &cfg, adam_step, scale)?;
                device.synchronize()?;
                (norm, comm)
            }
            None => {
                let mut grad = grad.take().context("a step with no micro-batches")?;
                if let Some(dx) = table_grad {
                    let dx = dx.flatten_all()?.to_vec1::<f32>()?;
                    // The table is the first of the last stage's parameters.
                    for (t, &id) in ids.iter().enumerate() {
                        let row = &mut grad[id as usize * h..(id as usize + 1) * h];
                        row.iter_mut().zip(&dx[t * h..(t + 1) * h]).for_each(|(a, b)| *a += b);
                    }
                }
                let r = group.reduce_scatter(&mut grad)?;
                let g = &mut grad[r];
                let sumsq: f64 = g.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
                let norm = world.all_reduce_small(&[sumsq])?[0].sqrt();
                let mut comm = t1.elapsed().as_secs_f64();
                check_norm(norm, step)?;
                adam_step += 1;
                host_adamw(t, lr, norm, adam_step, &decay, &mut params[own.clone()], g, &mut m, &mut v);
                let t3 = Instant::now();
                group.all_gather(&mut params)?;
                comm += t3.elapsed().as_secs_f64();
                super::unflatten_into(&model, &params)?;
                (norm, comm)
            }
        };
        cursor += t.global_batch as u64;
        let loss_value = match &loss_sum {
            Some(l) => f64::from(l.to_dtype(DType::F32)?.to_scalar::<f32>()?),
            None => 0.0,
        };
        if profile {
            eprintln!(
                "{step}: stage {stage}: schedule {:.1} ms (work {:.1}, waiting {:.1}), then {:.1} ms (exchanges {:.1})",
                (busy + idle) * 1e3,
                busy * 1e3,
                idle * 1e3,
                (t0.elapsed().as_secs_f64() - busy - idle) * 1e3,
                comm * 1e3
            );
        }
        let sent = bytes(&world, &group, [&prev, &next, &tied_link]);
        (ctx.report)(Report::Step(StepStats {
            step,
            loss: loss_value,
            // Only the last stage's tokens count: they are the tokens the loss is over.
            tokens: if last { (count * seq) as u64 } else { 0 },
            compute_s: busy,
            comm_s: comm,
            idle_s: idle,
            lr,
            grad_norm: norm,
            peak_memory_bytes: peak_memory(&device),
            bytes_sent: sent - sent_before,
        }))?;
        sent_before = sent;

        if step_no % recipe.checkpoint.every == 0 || step_no == t.steps {
            // Every rank's own ranges, gathered to rank 0, which writes the whole model.
            let ranges: Vec<Vec<Range<usize>>> =
                (0..a.peers.len()).map(|r| owned_ranges(spec, &layout, r)).collect::<anyhow::Result<_>>()?;
            if let Some(d) = &on_device {
                (params, m, v) = d.to_host()?;
            }
            if ranges[rank] != own_global {
                bail!("rank {rank}: owns {own_global:?} but the layout gives {:?}", ranges[rank]);
            }
            let full = world.gather_range_lists_to_first(&params[own.clone()], &ranges, total)?;
            super::write_checkpoint(
                &mut ctx,
                recipe,
                &dataset,
                step,
                cursor,
                &RankShard {
                    rank: Rank(rank as u32),
                    world: a.world_size,
                    params: full.as_deref(),
                    total,
                    ranges: own_global.clone(),
                    exp_avg: &m,
                    exp_avg_sq: &v,
                    adam_step,
                },
            )?;
        }
    }
    Ok(Step(t.steps))
}

/// A CUDA stage's gradients and optimizer, kept on the device (a stage without replicas: no
/// group to reduce over, so nothing but the activations and the tied embedding's rows and input
/// gradients crosses PCIe). The parameters are packed into one buffer (on the last stage of a
/// tied model the table first), the gradients land in a flat buffer of the same layout, and the
/// AdamW kernel writes the new weights into the packed buffer in place.
#[cfg(feature = "cuda")]
struct DeviceStage {
    adam: swarm_kernels::DeviceAdamW,
    packed: Tensor,
    grads: crate::flat_grads::FlatGrads,
}

/// Without CUDA there is no device stage (this type has no values).
#[cfg(not(feature = "cuda"))]
enum DeviceStage {}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::unused_self)]
impl DeviceStage {
    fn new(_: &mut Llama, _: &[f32], _: &[f32], _: &[f32]) -> anyhow::Result<Self> {
        bail!("a device stage needs a build with --features cuda")
    }
    fn sum_squares(&self, _: &Tensor) -> anyhow::Result<f64> {
        match *self {}
    }
    fn backward(&self, _: &Tensor, _: bool, _: Option<&Var>) -> anyhow::Result<Option<Tensor>> {
        match *self {}
    }
    fn grads(&self) -> &Tensor {
        match *self {}
    }
    fn step(&mut self, _: &[(Range<usize>, bool)], _: &dyn Fn(bool) -> AdamW, _: u64, _: f32) -> anyhow::Result<()> {
        match *self {}
    }
    fn to_host(&self) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        match *self {}
    }
}

#[cfg(feature = "cuda")]
impl DeviceStage {
    /// Packs `model` (the stage's parameters, in order) and uploads their f32 master weights and
    /// moments.
    fn new(model: &mut Llama, master: &[f32], m: &[f32], v: &[f32]) -> anyhow::Result<Self> {
        let n = model.num_params();
        let packed = model.pack(n)?;
        let grads = crate::flat_grads::FlatGrads::new(model, n, n)?;
        let adam = swarm_kernels::DeviceAdamW::new(model.device(), master, m, v)?;
        Ok(DeviceStage { adam, packed, grads })
    }

    fn sum_squares(&self, g: &Tensor) -> anyhow::Result<f64> {
        Ok(swarm_kernels::sum_squares(g)?)
    }

    /// The backward pass of one micro-batch into the gradient buffer (added to it when
    /// `accumulate`), returning the gradient of the stage's input activations.
    fn backward(&self, root: &Tensor, accumulate: bool, input: Option<&Var>) -> anyhow::Result<Option<Tensor>> {
        self.grads.backward_to_input(root, accumulate, &mut |_| Ok(()), input)
    }

    /// The flat gradient buffer (the packed layout).
    fn grads(&self) -> &Tensor {
        &self.grads.flat
    }

    /// One AdamW step over the stage's parameters (the whole packed buffer).
    fn step(
        &mut self,
        decay: &[(Range<usize>, bool)],
        cfg: &dyn Fn(bool) -> AdamW,
        adam_step: u64,
        scale: f32,
    ) -> anyhow::Result<()> {
        for (r, decays) in decay {
            self.adam.step(&cfg(*decays), adam_step, r.clone(), scale, &self.grads.flat, Some(&self.packed))?;
        }
        Ok(())
    }

    /// Master weights and moments, for a checkpoint.
    fn to_host(&self) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok(self.adam.to_host()?)
    }
}

/// Whether a stage (its layers, whether it is the first or the last, and whether a tied
/// embedding is split between the first and last stages) holds parameter `name`. The last stage
/// holds a tied embedding: it is the LM head's weight there.
/// The parameters rank `rank`'s pipeline stage holds, when `recipe` runs `world` ranks in more
/// than one stage; `None` without stages (every rank holds them all).
pub fn stage_filter(recipe: &swarm_sharding::Recipe, world: usize, rank: usize) -> Option<impl Fn(&str) -> bool> {
    let layout = recipe.stage_layout(world).ok().filter(|l| l.stages > 1)?;
    let stage = layout.stage_of(rank);
    let (first, last) = (stage == 0, stage + 1 == layout.stages);
    let tied_split = recipe.spec().is_some_and(|s| s.tie_word_embeddings);
    let layers = layout.layers[stage].clone();
    Some(move |name: &str| owns(name, &layers, first, last, tied_split))
}

fn owns(name: &str, layers: &Range<usize>, first: bool, last: bool, tied_split: bool) -> bool {
    match layer_of(name) {
        Some(l) => layers.contains(&l),
        None if name == "model.embed_tokens.weight" => {
            if tied_split {
                last
            } else {
                first
            }
        }
        None => last,
    }
}

/// The ranges of the flat parameter vector that stage `stage` holds and optimizes, ascending:
/// its layers, the embedding on the first stage (on the last when it is tied to the head), the
/// final norm and an untied LM head on the last. One range, or two on the last stage of a tied
/// model (the embedding at the start of the vector, then the stage's layers).
fn stage_ranges(
    spec: &swarm_sharding::ModelSpec,
    layout: &StageLayout,
    stage: usize,
) -> anyhow::Result<Vec<Range<usize>>> {
    let layers = layout.layers[stage].clone();
    let (first, last) = (stage == 0, stage + 1 == layout.stages);
    let tied_split = spec.tie_word_embeddings && layout.stages > 1;
    let mut off = 0;
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for (name, shape) in param_shapes(spec) {
        let n: usize = shape.iter().product();
        if owns(&name, &layers, first, last, tied_split) {
            match ranges.last_mut() {
                Some(r) if r.end == off => r.end = off + n,
                _ => ranges.push(off..off + n),
            }
        }
        off += n;
    }
    if ranges.is_empty() {
        bail!("pipeline stage {stage} holds no parameters");
    }
    Ok(ranges)
}

/// The global ranges of `local`, a range of the concatenation of `ranges`.
fn sub_ranges(ranges: &[Range<usize>], local: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut off = 0;
    for r in ranges {
        let (s, e) = (local.start.max(off), local.end.min(off + r.len()));
        if s < e {
            out.push(r.start + s - off..r.start + e - off);
        }
        off += r.len();
    }
    out
}

/// The values of `ranges` of `v`, concatenated.
fn pick(v: &[f32], ranges: &[Range<usize>]) -> Vec<f32> {
    ranges.iter().flat_map(|r| v[r.clone()].iter().copied()).collect()
}

/// The ranges of the flat parameter vector that rank `rank` owns: its ZeRO shard of its
/// stage's ranges.
fn owned_ranges(
    spec: &swarm_sharding::ModelSpec,
    layout: &StageLayout,
    rank: usize,
) -> anyhow::Result<Vec<Range<usize>>> {
    let ranges = stage_ranges(spec, layout, layout.stage_of(rank))?;
    let len = ranges.iter().map(Range::len).sum();
    Ok(sub_ranges(&ranges, swarm_sharding::plan::shard_range(len, layout.replicas, layout.replica_of(rank))))
}

/// Where each of `ids` sits in `distinct` (sorted, holding every id), as a u32 tensor on `device`.
fn positions(ids: &[u32], distinct: &[u32], device: &Device) -> anyhow::Result<Tensor> {
    let at: Vec<u32> = ids
        .iter()
        .map(|id| distinct.binary_search(id).map(|p| p as u32))
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("a token of the step is missing from its rows"))?;
    Ok(Tensor::from_vec(at, ids.len(), device)?)
}

/// The input tokens (each window's first `seq`) of sample rows `rows`, in order.
fn input_ids(dataset: &crate::data::Dataset, rows: &[u64], seq: usize) -> Vec<u32> {
    rows.iter().flat_map(|&w| dataset.window(w, seq)[..seq].to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over every rank of a layout, the owned ranges partition the flat vector exactly, tied
    /// or not, for several stage and replica counts.
    #[test]
    fn owned_ranges_partition_the_model() {
        for tied in [false, true] {
            let mut spec = swarm_sharding::ModelSpec::preset("tiny").unwrap();
            spec.tie_word_embeddings = tied;
            let total: usize = param_shapes(&spec).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            for (stages, replicas) in [(2, 1), (2, 2), (2, 3), (3, 1), (4, 2)] {
                let l = spec.num_hidden_layers;
                let layers = (0..stages).map(|s| s * l / stages..(s + 1) * l / stages).collect();
                let layout = StageLayout { stages, replicas, layers };
                let mut all: Vec<Range<usize>> = (0..stages * replicas)
                    .flat_map(|r| owned_ranges(&spec, &layout, r).unwrap())
                    .filter(|r| !r.is_empty())
                    .collect();
                all.sort_by_key(|r| r.start);
                let mut at = 0;
                for r in &all {
                    assert_eq!(r.start, at, "tied {tied}, {stages} x {replicas}: gap or overlap at {at}");
                    at = r.end;
                }
                assert_eq!(at, total, "tied {tied}, {stages} x {replicas}: the ranges end early");
                let last = stage_ranges(&spec, &layout, stages - 1).unwrap();
                assert_eq!(last.len(), if tied { 2 } else { 1 }, "tied {tied}: the last stage's ranges {last:?}");
            }
        }
    }

    #[test]
    fn sub_ranges_map_a_local_range_through_the_gaps() {
        let ranges = [0..4, 10..16];
        assert_eq!(sub_ranges(&ranges, 0..10), vec![0..4, 10..16]);
        assert_eq!(sub_ranges(&ranges, 2..6), vec![2..4, 10..12]);
        assert_eq!(sub_ranges(&ranges, 5..7), vec![11..13]);
        assert!(sub_ranges(&ranges, 3..3).is_empty());
        assert_eq!(pick(&(0..20).map(|x| x as f32).collect::<Vec<_>>(), &[2..4, 10..12]), vec![2.0, 3.0, 10.0, 11.0]);
    }
}
