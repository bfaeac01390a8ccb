//! One rank of a data-parallel job with ZeRO-3 (FSDP): parameters, gradients and optimizer
//! state are all sharded.
//!
//! - **Shards**: every parameter tensor is cut into `world` equal pieces (`shard_range`); a rank
//!   keeps its piece of each, in f32, with its AdamW moments. Nothing else of the model lives
//!   on it between uses.
//! - **Units**: the embedding, each transformer layer, and the head (final norm and LM head, or
//!   the embedding again when tied). A unit's parameters are all-gathered right before it runs
//!   and dropped right after; the next unit's gather is already on its way (a communication
//!   thread owns the group's ring and serves requests in order, so it overlaps the compute).
//! - **Backward by recomputation**: candle's graph would keep every weight it used alive until
//!   the backward pass, so the forward pass keeps only each unit's input; the backward pass
//!   gathers each unit again, recomputes its forward from that input and runs its backward from
//!   the incoming gradient (as the backward of `sum(out · g)`), as FSDP does with activation
//!   checkpointing. Each unit's weight gradients are reduce-scattered at once (per
//!   micro-batch), and each rank adds its piece to its gradient shard.
//! - **Step**: the global norm from every rank's shard, AdamW on the shard. Checkpoints gather
//!   parameters and moments so that they keep the usual format (any layout resumes them).

use super::{Report, StepStats, TrainContext, check_norm, load_start, peak_memory};
use crate::checkpoint::RankShard;
use crate::comm::ring::Ring;
use crate::data::sample_rows;
use crate::model::{Llama, init_piece, param_shapes, split_windows};
use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;
use swarm_sharding::plan::shard_range;
use swarm_sharding::{Assignment, Step};

/// The data-plane channel of the communication thread's ring (the main thread's is 0).
const COMM: u32 = 1;

/// What the communication thread does, in the order asked.
enum Job {
    /// All-gather each (piece, full length): the full tensors come back.
    Gather(Vec<(Vec<f32>, usize)>, Sender<anyhow::Result<Vec<Vec<f32>>>>),
    /// Gather each (piece, full length) to rank 0 only: the full tensors there, nothing elsewhere.
    GatherToFirst(Vec<(Vec<f32>, usize)>, Sender<anyhow::Result<Vec<Vec<f32>>>>),
    /// Reduce-scatter each full gradient: this rank's summed pieces come back.
    ReduceScatter(Vec<Vec<f32>>, Sender<anyhow::Result<Vec<Vec<f32>>>>),
}

/// The ring, on a thread of its own.
struct Comm {
    jobs: Option<Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Bytes the ring has sent, updated after each job.
    bytes: Arc<AtomicU64>,
}

impl Comm {
    fn start(mut ring: Ring) -> anyhow::Result<Comm> {
        let (tx, rx) = channel::<Job>();
        let bytes: Arc<AtomicU64> = Arc::default();
        let sent = bytes.clone();
        let thread = std::thread::Builder::new().name("zero3-comm".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Gather(pieces, back) => {
                        let r = pieces
                            .into_iter()
                            .map(|(piece, len)| {
                                let mut full = vec![0f32; len];
                                full[ring.own_range(len)].copy_from_slice(&piece);
                                ring.all_gather(&mut full)?;
                                Ok(full)
                            })
                            .collect();
                        sent.store(ring.bytes_sent(), Ordering::Relaxed);
                        let _ = back.send(r);
                    }
                    Job::GatherToFirst(pieces, back) => {
                        let r = pieces
                            .into_iter()
                            .map(|(piece, len)| {
                                let ranges: Vec<Range<usize>> =
                                    (0..ring.world()).map(|i| shard_range(len, ring.world(), i)).collect();
                                Ok(ring.gather_ranges_to_first(&piece, &ranges, len)?.unwrap_or_default())
                            })
                            .collect();
                        sent.store(ring.bytes_sent(), Ordering::Relaxed);
                        let _ = back.send(r);
                    }
                    Job::ReduceScatter(grads, back) => {
                        let r = grads
                            .into_iter()
                            .map(|mut g| {
                                let own = ring.reduce_scatter(&mut g)?;
                                g.truncate(own.end);
                                g.drain(..own.start);
                                Ok(g)
                            })
                            .collect();
                        sent.store(ring.bytes_sent(), Ordering::Relaxed);
                        let _ = back.send(r);
                    }
                }
            }
        })?;
        Ok(Comm { jobs: Some(tx), thread: Some(thread), bytes })
    }

    fn ask(&self, job: impl FnOnce(Sender<anyhow::Result<Vec<Vec<f32>>>>) -> Job) -> anyhow::Result<Pending> {
        let (tx, rx) = channel();
        self.jobs
            .as_ref()
            .context("the communication thread stopped")?
            .send(job(tx))
            .map_err(|_| anyhow::anyhow!("the communication thread stopped (a peer failed)"))?;
        Ok(Pending(rx))
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A collective on its way.
struct Pending(Receiver<anyhow::Result<Vec<Vec<f32>>>>);

impl Pending {
    fn wait(self) -> anyhow::Result<Vec<Vec<f32>>> {
        self.0.recv().map_err(|_| anyhow::anyhow!("the communication thread stopped (a peer failed)"))?
    }
}

/// One parameter: its name, shape, place in the flat vector, and this rank's piece of it.
struct Shard {
    name: String,
    shape: Vec<usize>,
    /// This rank's piece: `shard_range(numel, world, rank)` of the flattened tensor.
    piece: Range<usize>,
    /// Where the piece sits in the rank's shard vector.
    at: Range<usize>,
    decays: bool,
    global: usize,
}

/// The model's units in forward order: parameter indices.
fn units(shards: &[Shard], layers: usize, tied: bool) -> Vec<Vec<usize>> {
    let find = |n: &str| shards.iter().position(|s| s.name == n).expect("a model parameter");
    let mut u = vec![vec![find("model.embed_tokens.weight")]];
    for l in 0..layers {
        let prefix = format!("model.layers.{l}.");
        u.push(shards.iter().enumerate().filter(|(_, s)| s.name.starts_with(&prefix)).map(|(i, _)| i).collect());
    }
    let head = if tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
    u.push(vec![find("model.norm.weight"), find(head)]);
    u
}

pub(super) fn run(a: &Assignment, mut ctx: TrainContext) -> anyhow::Result<Step> {
    let recipe = &a.recipe;
    let spec = recipe.spec().context("the recipe's model shape is not resolved")?;
    let t = &recipe.train;
    let device: Device = crate::device::select(&ctx.device)?;
    let (rank, world) = (a.rank.0 as usize, a.world_size as usize);
    let (dataset, mut order) = super::open_data(recipe, spec)?;
    let dtype = super::compute_dtype(t.precision, &device);

    // This rank's piece of every tensor. A fresh start generates only those pieces (the values
    // one process would give them); resuming, or starting from Hugging Face weights, loads the
    // whole model once and keeps the pieces.
    let fresh = a.resume.is_none() && recipe.model.hf_dir.is_none();
    let (model, resumed, start, mut cursor) = if fresh {
        (None, None, Step(0), 0)
    } else {
        let (m, r, s, c) = load_start(a, spec, &device)?;
        (Some(m), r, s, c)
    };
    let (mut shards, mut params) = (Vec::new(), Vec::new());
    let mut global = 0;
    for (i, (name, shape)) in param_shapes(spec).into_iter().enumerate() {
        let numel: usize = shape.iter().product();
        let piece = shard_range(numel, world, rank);
        let flat = match &model {
            None => init_piece(spec, t.seed, &name, piece.clone())?,
            Some(m) => {
                m.params[i].var.as_tensor().flatten_all()?.narrow(0, piece.start, piece.len())?.to_vec1::<f32>()?
            }
        };
        let at = params.len()..params.len() + flat.len();
        params.extend(flat);
        shards.push(Shard { name, decays: shape.len() >= 2, shape, piece, at, global });
        global += numel;
    }
    drop(model);
    let total = global;
    let (mut m, mut v, mut adam_step) = match resumed {
        Some(o) => {
            let slice = |full: &[f32]| -> Vec<f32> {
                shards.iter().flat_map(|s| full[s.global + s.piece.start..s.global + s.piece.end].to_vec()).collect()
            };
            (slice(&o.exp_avg), slice(&o.exp_avg_sq), o.adam_step)
        }
        None => (vec![0f32; params.len()], vec![0f32; params.len()], 0),
    };
    let units = units(&shards, spec.num_hidden_layers, spec.tie_word_embeddings);

    let mut world_ring = Ring::connect(&ctx.data_plane, a.job, a.attempt, a.rank, &a.peers, &ctx.aborter)?;
    let comm =
        Comm::start(Ring::connect_group(&ctx.data_plane, a.job, a.attempt, COMM, a.rank, &a.peers, &ctx.aborter)?)?;
    tracing::info!(job = %a.job, rank = %a.rank, shard = params.len(), of = total, units = units.len(), "training with ZeRO-3");

    // Gathers unit `u`: its parameters as a model holding only them.
    let gather = |params: &[f32], u: usize| -> anyhow::Result<Pending> {
        let pieces = units[u]
            .iter()
            .map(|&i| (params[shards[i].at.clone()].to_vec(), shards[i].shape.iter().product()))
            .collect();
        comm.ask(|tx| Job::Gather(pieces, tx))
    };
    let resident = |u: usize, full: Vec<Vec<f32>>| -> anyhow::Result<Llama> {
        let tensors = units[u]
            .iter()
            .zip(full)
            .map(|(&i, f)| Ok((shards[i].name.clone(), Tensor::from_vec(f, shards[i].shape.clone(), &device)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Llama::from_parts(spec, tensors, &device, dtype)
    };
    let (offset, count) = (a.share.offset, a.share.count);
    let micro = recipe.micro_batch_rows(rank, count);
    let pieces = super::micro_batches(count, micro);
    let n_units = units.len();
    let mut sent_before = world_ring.bytes_sent();

    for step_no in start.0 + 1..=t.steps {
        let step = Step(step_no);
        if ctx.cancel.load(Ordering::Relaxed) {
            bail!("cancelled at {step}");
        }
        let t0 = Instant::now();
        let rows = sample_rows(&mut order, cursor + offset as u64, count);
        let lr = recipe.lr_at(step_no);
        let mut grad = vec![0f32; params.len()];
        let mut loss_sum = 0f64;
        let mut wait = 0.0;
        let mut timed = |p: Pending| -> anyhow::Result<Vec<Vec<f32>>> {
            let tw = Instant::now();
            let r = p.wait();
            wait += tw.elapsed().as_secs_f64();
            r
        };
        for piece in &pieces {
            let (inputs, targets) =
                split_windows(&super::windows(&dataset, &rows[piece.clone()], t.seq_len, &device)?)?;
            // Forward: unit by unit, keeping only each unit's input.
            let mut inputs_of: Vec<Tensor> = Vec::with_capacity(n_units);
            let mut next = Some(gather(&params, 0)?);
            let mut x: Option<Tensor> = None;
            for u in 0..n_units - 1 {
                let full = timed(next.take().context("gathered")?)?;
                next = Some(gather(&params, u + 1)?);
                let unit = resident(u, full)?;
                let out = match &x {
                    None => unit.embed(&inputs)?,
                    Some(x) => unit.layers(x.clone(), u - 1..u)?,
                };
                inputs_of.push(out.detach());
                x = Some(out.detach());
            }
            // Backward, from the head down, each unit recomputed; its gradients reduce-scattered.
            let mut g: Option<Tensor> = None;
            let mut scattered: Vec<(usize, Pending)> = Vec::new();
            for u in (0..n_units).rev() {
                let full = timed(next.take().context("gathered")?)?;
                if u > 0 {
                    next = Some(gather(&params, u - 1)?);
                }
                let unit = resident(u, full)?;
                let input = if u > 0 { Some(Var::from_tensor(&inputs_of[u - 1])?) } else { None };
                let root = if u + 1 == n_units {
                    let loss = unit.head_loss(input.as_ref().context("head input")?.as_tensor(), &targets)?;
                    loss_sum +=
                        f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?) * piece.len() as f64 / count as f64;
                    (&loss * (piece.len() as f64 / t.global_batch as f64))?
                } else {
                    let out = match &input {
                        None => unit.embed(&inputs)?,
                        Some(x) => unit.layers(x.as_tensor().clone(), u - 1..u)?,
                    };
                    (&out * g.as_ref().context("incoming gradient")?)?.sum_all()?
                };
                let grads = root.backward()?;
                let mut full_grads = Vec::with_capacity(units[u].len());
                for p in &unit.params {
                    let gp = grads.get(p.var.as_tensor()).with_context(|| format!("no gradient reached {}", p.name))?;
                    full_grads.push(gp.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                }
                g = match &input {
                    Some(x) => Some(grads.get(x.as_tensor()).context("no gradient reached a unit's input")?.clone()),
                    None => None,
                };
                scattered.push((u, comm.ask(|tx| Job::ReduceScatter(full_grads, tx))?));
            }
            for (u, p) in scattered {
                for (&i, piece) in units[u].iter().zip(timed(p)?) {
                    grad[shards[i].at.clone()].iter_mut().zip(piece).for_each(|(a, b)| *a += b);
                }
            }
        }
        let compute_s = t0.elapsed().as_secs_f64() - wait;
        let t1 = Instant::now();
        let sumsq: f64 = grad.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
        let norm = world_ring.all_reduce_small(&[sumsq])?[0].sqrt();
        check_norm(norm, step)?;
        adam_step += 1;
        let segments: Vec<(Range<usize>, bool)> = shards.iter().map(|s| (s.at.clone(), s.decays)).collect();
        super::host_adamw(t, lr, norm, adam_step, &segments, &mut params, &mut grad, &mut m, &mut v);
        let comm_s = wait + t1.elapsed().as_secs_f64();
        cursor += t.global_batch as u64;
        // Every collective of the step has been waited for, so the count is complete.
        let sent = world_ring.bytes_sent() + comm.bytes.load(Ordering::Relaxed);
        (ctx.report)(Report::Step(StepStats {
            step,
            loss: loss_sum,
            tokens: (count * t.seq_len) as u64,
            compute_s,
            comm_s,
            idle_s: 0.0,
            lr,
            grad_norm: norm,
            peak_memory_bytes: peak_memory(&device),
            bytes_sent: sent - sent_before,
        }))?;
        sent_before = sent;

        if step_no % recipe.checkpoint.every == 0 || step_no == t.steps {
            // The parameters gathered to rank 0, which writes the model; every rank writes the
            // moments of its pieces, with their ranges.
            let pieces = shards.iter().map(|s| (params[s.at.clone()].to_vec(), s.shape.iter().product())).collect();
            let full_p = comm.ask(|tx| Job::GatherToFirst(pieces, tx))?.wait()?.concat();
            let ranges: Vec<Range<usize>> =
                shards.iter().map(|s| s.global + s.piece.start..s.global + s.piece.end).collect();
            super::write_checkpoint(
                &mut ctx,
                recipe,
                &dataset,
                step,
                cursor,
                &RankShard {
                    rank: a.rank,
                    world: a.world_size,
                    params: (rank == 0).then_some(full_p.as_slice()),
                    total,
                    ranges,
                    exp_avg: &m,
                    exp_avg_sq: &v,
                    adam_step,
                },
            )?;
        }
    }
    drop(comm);
    Ok(Step(t.steps))
}
