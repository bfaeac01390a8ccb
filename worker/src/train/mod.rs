//! One rank's part of a training job: data parallel with ZeRO-1.
//!
//! Every rank holds the full model. Per step it runs forward and backward on its rows of the
//! global batch (the loss scaled by its share of the batch's tokens, so summed gradients are the
//! global mean), reduce-scatters the flat gradient, clips by the global norm, applies AdamW to
//! the chunk it owns (f32 moments for that chunk only), and all-gathers the updated parameters.
//! Over the TCP ring that is a reduce-scatter. When every rank is on its own CUDA device, NCCL
//! instead all-reduces the gradient in buckets while the backward pass runs (`flat_grads`), so
//! each rank has the whole sum and updates its chunk from it. A CUDA rank training alone keeps
//! the whole optimizer on its device.

use crate::checkpoint::{self, RankShard};
use crate::comm::dataplane::DataPlane;
use crate::comm::fetch::{Fetcher, Source, Want};
use crate::comm::ring::{Aborter, Ring};
use crate::data::{Dataset, SampleOrder, sample_rows};
#[cfg(feature = "cuda")]
use crate::flat_grads::FlatGrads;
use crate::model::Llama;
use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

mod pipeline;
pub use pipeline::stage_filter;
mod zero3;
use swarm_kernels::{AdamW, adamw_step};
use swarm_sharding::{Assignment, Manifest, Precision, Rank, ShardFile, Step, WorkerId};

/// Gradient values per all-reduce bucket on CUDA: 32 Mi values (64 MiB of bf16), about half a
/// transformer layer of Llama-3.2-1B (61M values). Big enough for NCCL to reach its bandwidth, small enough
/// that the last bucket (the one the backward pass ends with) leaves little to wait for.
#[cfg(feature = "cuda")]
const GRAD_BUCKET_ELEMS: usize = 32 << 20;

/// What a rank tells the coordinator while it trains.
#[derive(Clone, Debug)]
pub enum Report {
    Step(StepStats),
    Checkpoint(CheckpointDone),
}

/// One rank's part of a checkpoint, written and copied.
#[derive(Clone, Debug)]
pub struct CheckpointDone {
    pub step: Step,
    /// The step directory, relative to the worker's state directory.
    pub dir: String,
    pub files: Vec<ShardFile>,
    /// Other ranks' files copied into the same directory.
    pub replicas: Vec<(Rank, Vec<ShardFile>)>,
    pub rng_state: String,
    pub data_cursor: u64,
}

#[derive(Clone, Debug)]
pub struct StepStats {
    pub step: Step,
    pub loss: f64,
    pub tokens: u64,
    pub compute_s: f64,
    pub comm_s: f64,
    /// Time spent waiting for a neighbouring pipeline stage (the bubble), 0 without stages.
    pub idle_s: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub peak_memory_bytes: u64,
    pub bytes_sent: u64,
}

/// What training needs from the daemon.
pub struct TrainContext {
    pub worker: WorkerId,
    pub data_plane: Arc<DataPlane>,
    /// Called for every report, in order; an error stops training.
    pub report: Box<dyn FnMut(Report) -> anyhow::Result<()> + Send>,
    pub cancel: Arc<AtomicBool>,
    pub aborter: Aborter,
    /// Which device to train on (`auto`, `cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// The worker's own directory: checkpoints are written under it.
    pub state_dir: PathBuf,
    /// Copies neighbours' checkpoint files (replicas).
    pub fetcher: Fetcher,
    /// Each rank's data-plane address, in rank order, and this attempt.
    pub peer_addrs: Vec<String>,
    pub attempt: u64,
    pub job: swarm_sharding::JobId,
}

/// Peak resident memory of this process (VmHWM), 0 where unknown.
pub fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The flat parameter vector, in `param_shapes` order.
pub fn flatten_params(model: &Llama) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(model.num_params());
    for p in &model.params {
        out.extend(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Writes the flat f32 vector back into the model's variables (in the model's dtype).
pub fn unflatten_into(model: &Llama, flat: &[f32]) -> anyhow::Result<()> {
    let mut off = 0;
    for p in &model.params {
        let n = p.var.elem_count();
        let t = Tensor::from_slice(&flat[off..off + n], p.var.shape(), model.device())?.to_dtype(model.dtype())?;
        p.var.set(&t)?;
        off += n;
    }
    Ok(())
}

/// The gradient of every parameter, in `param_shapes` order; a parameter no gradient reached is
/// an error, never a silent zero.
fn grads_in_order<'a>(model: &Llama, grads: &'a candle_core::backprop::GradStore) -> anyhow::Result<Vec<&'a Tensor>> {
    model
        .params
        .iter()
        .map(|p| {
            grads.get(p.var.as_tensor()).with_context(|| {
                format!("no gradient reached {}: an op without a backward pass is in the model", p.name)
            })
        })
        .collect()
}

/// Flat f32 gradients on the host.
fn flat_grads(model: &Llama, grads: &candle_core::backprop::GradStore) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(model.num_params());
    for g in grads_in_order(model, grads)? {
        out.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The compute dtype a recipe asks for on `device`.
pub fn compute_dtype(precision: Precision, device: &Device) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Auto if device.is_cuda() => DType::BF16,
        Precision::Auto => DType::F32,
    }
}

/// Where the optimizer runs. On the host (any device, any world size): the ring carries flat
/// f32 gradients and parameters. On a CUDA device training alone: master weights, moments and
/// the update stay on the device and nothing crosses PCIe per step. In a group of CUDA ranks:
/// the same, for this rank's shard, with NCCL moving gradients and parameters.
enum Optimizer {
    Host,
    #[cfg(feature = "cuda")]
    Device {
        adam: swarm_kernels::DeviceAdamW,
        /// The model's parameters (compute dtype, flat; each parameter a view of its range),
        /// written by the AdamW kernel.
        packed: Tensor,
        grads: FlatGrads,
    },
    #[cfg(feature = "cuda")]
    Nccl {
        group: crate::comm::nccl::NcclGroup,
        /// Master weights and moments of this rank's shard.
        adam: swarm_kernels::DeviceAdamW,
        /// This rank's shard of the parameters in the compute dtype, padded to the group's
        /// chunk: what the AdamW kernel writes and the all-gather sends.
        shard: Tensor,
        /// The model's parameters, padded to `world` chunks: what the all-gather fills.
        packed: Tensor,
        grads: FlatGrads,
    },
}

/// Ranges of the flat vector that take weight decay: matrices yes; norms and biases no.
fn decay_segments(model: &Llama) -> Vec<(Range<usize>, bool)> {
    let mut off = 0;
    model
        .params
        .iter()
        .map(|p| {
            let n = p.var.elem_count();
            let r = off..off + n;
            off += n;
            (r, p.var.rank() >= 2)
        })
        .collect()
}

/// AdamW's settings for a step at learning rate `lr`, with weight decay or without.
fn adam_config(t: &swarm_sharding::recipe::TrainSection, lr: f64, decays: bool) -> AdamW {
    AdamW { lr, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: if decays { t.weight_decay } else { 0.0 } }
}

/// What a gradient of global norm `norm` is multiplied by: `train.grad_clip / norm` when clipping
/// is on and the norm exceeds it, else 1.
fn clip_scale(t: &swarm_sharding::recipe::TrainSection, norm: f64) -> f32 {
    if t.grad_clip > 0.0 && norm > t.grad_clip { (t.grad_clip / norm) as f32 } else { 1.0 }
}

/// One AdamW step on the host over `segments` of a shard (each a range and whether it decays):
/// the gradient `g`, of global norm `norm`, is clipped first (in place).
#[allow(clippy::too_many_arguments)]
fn host_adamw(
    t: &swarm_sharding::recipe::TrainSection,
    lr: f64,
    norm: f64,
    adam_step: u64,
    segments: &[(Range<usize>, bool)],
    params: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let c = clip_scale(t, norm);
    if c != 1.0 {
        g.iter_mut().for_each(|x| *x *= c);
    }
    for (r, decays) in segments {
        let r = r.clone();
        adamw_step(
            &adam_config(t, lr, *decays),
            adam_step,
            &mut params[r.clone()],
            &g[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
        );
    }
}

fn check_norm(norm: f64, step: Step) -> anyhow::Result<()> {
    if norm.is_finite() {
        Ok(())
    } else {
        bail!("the gradient norm is {norm} at {step}; lower train.lr or check the data")
    }
}

/// Peak memory of this worker: device memory in use on a GPU (its high-water mark is not
/// exposed, so this is the use at the end of the step), else the process's peak RSS.
fn peak_memory(device: &Device) -> u64 {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device
        && let Ok((free, total)) = d.cuda_stream().context().mem_get_info()
    {
        return (total - free) as u64;
    }
    let _ = device;
    peak_memory_bytes()
}

/// The recipe's dataset, checked against the model's vocabulary, and its sample order.
fn open_data(
    recipe: &swarm_sharding::Recipe,
    spec: &swarm_sharding::ModelSpec,
) -> anyhow::Result<(Dataset, SampleOrder)> {
    let dataset = Dataset::open(&recipe.data.dataset)?;
    if dataset.info().vocab_size as usize > spec.vocab_size {
        bail!(
            "data.dataset {} has a vocabulary of {}, more than the model's {}",
            recipe.data.dataset.display(),
            dataset.info().vocab_size,
            spec.vocab_size
        );
    }
    let order = dataset.sample_order(recipe.train.seq_len, recipe.train.seed)?;
    Ok((dataset, order))
}

/// A rank's `count` rows as micro-batches of `micro` rows (the last may be shorter).
fn micro_batches(count: usize, micro: usize) -> Vec<Range<usize>> {
    (0..count).step_by(micro.max(1)).map(|s| s..(s + micro).min(count)).collect()
}

/// The token windows (`[rows, seq + 1]`) of sample rows `rows`.
fn windows(dataset: &Dataset, rows: &[u64], seq: usize, device: &Device) -> anyhow::Result<Tensor> {
    let mut tokens = Vec::with_capacity(rows.len() * (seq + 1));
    for &w in rows {
        tokens.extend(dataset.window(w, seq));
    }
    Ok(Tensor::from_vec(tokens, (rows.len(), seq + 1), device)?)
}

/// Writes this rank's part of the checkpoint of `step` and reports it.
fn write_checkpoint(
    ctx: &mut TrainContext,
    recipe: &swarm_sharding::Recipe,
    dataset: &Dataset,
    step: Step,
    cursor: u64,
    shard: &RankShard<'_>,
) -> anyhow::Result<()> {
    let spec = recipe.spec().context("the recipe's model shape is not resolved")?;
    let rel = crate::content::step_rel_dir(&recipe.name, step);
    let dir = ctx.state_dir.join(&rel);
    // Whatever an earlier run of this recipe left at this step goes first.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let files = checkpoint::write_rank(&dir, spec, &dataset.tokenizer_path(), shard)?;
    let listing =
        checkpoint::Listing { job: ctx.job.0, attempt: ctx.attempt, rank: shard.rank.0, files: files.clone() };
    listing.write(&dir)?;
    let replicas = copy_replicas(ctx, &rel, shard.rank, recipe.checkpoint.replicas_for(shard.world as usize))?;
    prune_own_checkpoints(&ctx.state_dir, &recipe.name, recipe.checkpoint.keep);
    let rng_state =
        format!("data-order splitmix64 seed={} cursor={cursor}; no other randomness in training", recipe.train.seed);
    (ctx.report)(Report::Checkpoint(CheckpointDone { step, dir: rel, files, replicas, rng_state, data_cursor: cursor }))
}

/// How long a rank waits for a neighbour to finish writing its checkpoint files.
const REPLICA_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Copies the checkpoint files of the next `replicas - 1` ranks (in ring order) from their
/// workers into `rel` here, each verified against the listing its writer left.
fn copy_replicas(
    ctx: &TrainContext,
    rel: &str,
    rank: Rank,
    replicas: usize,
) -> anyhow::Result<Vec<(Rank, Vec<ShardFile>)>> {
    let world = ctx.peer_addrs.len();
    let mut out = Vec::new();
    for k in 1..replicas.min(world) {
        let of = Rank(((rank.0 as usize + k) % world) as u32);
        let addr = &ctx.peer_addrs[of.0 as usize];
        let listing_path = format!("{rel}/{}", checkpoint::Listing::file_name(of));
        let deadline = Instant::now() + REPLICA_WAIT;
        let listing = loop {
            if ctx.cancel.load(Ordering::Relaxed) {
                bail!("cancelled while copying {of}'s checkpoint files");
            }
            let got = ctx.fetcher.get_small(addr, &listing_path, checkpoint::Listing::MAX_BYTES);
            if let Ok(Some(bytes)) = &got
                && let Ok(l) = serde_json::from_slice::<checkpoint::Listing>(bytes)
                && (l.job, l.attempt, l.rank) == (ctx.job.0, ctx.attempt, of.0)
            {
                break l;
            }
            if Instant::now() >= deadline {
                bail!("{of} (at {addr}) did not list its checkpoint files in {rel} within {REPLICA_WAIT:?}: {got:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        for f in &listing.files {
            if !swarm_sharding::content::valid_file_name(&f.path) {
                bail!("{of} listed {:?}, not a plain file name", f.path);
            }
            let from = [Source::new(addr.clone(), format!("{rel}/{}", f.path))];
            let dest = ctx.state_dir.join(rel).join(&f.path);
            ctx.fetcher
                .fetch(&from, &Want { sha256: &f.sha256, bytes: f.bytes }, &dest, &ctx.cancel)
                .with_context(|| format!("copying {of}'s checkpoint file {} as a replica", f.path))?;
        }
        out.push((of, listing.files));
    }
    Ok(out)
}

/// Deletes this worker's step directories of recipe `name` beyond the newest `keep + 1` (the
/// newest may not be committed yet); `keep` 0 keeps all.
fn prune_own_checkpoints(state: &Path, name: &str, keep: usize) {
    if keep == 0 {
        return;
    }
    let root = state.join(crate::content::CHECKPOINTS_DIR).join(name);
    let Ok(entries) = std::fs::read_dir(&root) else { return };
    let mut steps: Vec<(Step, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((swarm_sharding::job::parse_step_dir_name(e.file_name().to_str()?)?, e.path())))
        .collect();
    steps.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    for (_, dir) in steps.into_iter().skip(keep + 1) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "could not delete an old checkpoint: {e}");
        }
    }
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let p = dir.join(Manifest::FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// The model and optimizer state a run starts from: a committed checkpoint (checked against the
/// recipe), a Hugging Face directory, or the seed; with the step and data cursor to go on from.
fn load_start(
    a: &Assignment,
    spec: &swarm_sharding::ModelSpec,
    device: &Device,
) -> anyhow::Result<(Llama, Option<checkpoint::FullOptimState>, Step, u64)> {
    let t = &a.recipe.train;
    let recipe = &a.recipe;
    Ok(match &a.resume {
        Some(rp) => {
            let dir = Path::new(&rp.dir);
            let manifest = read_manifest(dir)?;
            let (old, new) = (&manifest.recipe.train, t);
            if (old.seed, old.seq_len) != (new.seed, new.seq_len) {
                bail!(
                    "the checkpoint in {} was trained with train.seed = {} and train.seq_len = {}, the recipe now says {} and {}; the data order would change (samples repeated or skipped): resume with the same values",
                    dir.display(),
                    old.seed,
                    old.seq_len,
                    new.seed,
                    new.seq_len
                );
            }
            if manifest.recipe.spec() != Some(spec) {
                bail!(
                    "the checkpoint in {} has a different model shape than the recipe; resume with the recipe it was trained with",
                    dir.display()
                );
            }
            let (model, opt) = checkpoint::load(dir, &manifest, spec, device)?;
            (model, Some(opt), manifest.step, manifest.data_cursor)
        }
        None => {
            let model = match &recipe.model.hf_dir {
                // Weights named by the recipe must load: never a silent random start.
                Some(dir) => Llama::load(spec, dir, device).with_context(|| {
                    format!("model.hf_dir = {}: cannot load its weights on this worker", dir.display())
                })?,
                None => Llama::init(spec, t.seed, device)?,
            };
            (model, None, Step(0), 0)
        }
    })
}

pub fn run(a: &Assignment, mut ctx: TrainContext) -> anyhow::Result<Step> {
    let recipe = &a.recipe;
    let layout = recipe.stage_layout(a.world_size as usize).map_err(anyhow::Error::msg)?;
    if layout.stages > 1 {
        return pipeline::run(a, ctx, layout);
    }
    if recipe.parallel.zero_stage == 3 && a.world_size > 1 {
        return zero3::run(a, ctx);
    }
    let spec = recipe.spec().context("the recipe's model shape is not resolved")?;
    let t = &recipe.train;
    let device: Device = crate::device::select(&ctx.device)?;
    // Declared first, dropped last: after every tensor of the run is freed.
    #[cfg(feature = "cuda")]
    let _trim = crate::gpu::TrimPoolOnDrop(device.clone());
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // The kernels of this worker run on candle's stream (DeviceAdamW launches on it too),
        // so cudarc's per-launch cross-stream events are pure overhead. The one other stream is
        // NCCL's (`comm::nccl`): it touches only the flat gradient, packed parameter and shard
        // buffers, and every use is ordered by explicit events (`join` before each collective,
        // `join` back before the compute stream reads the result).
        // SAFETY: candle's precondition (no unordered use from a second stream) holds as above.
        #[allow(unsafe_code)]
        unsafe {
            d.disable_event_tracking()
        };
    }
    let profile = std::env::var_os("SWARM_PROFILE").is_some();
    let (dataset, mut order) = open_data(recipe, spec)?;

    let (mut model, resumed, start, mut cursor) = load_start(a, spec, &device)?;
    // f32 master weights, taken before the model moves to its compute dtype.
    let mut params = flatten_params(&model)?;
    let len = params.len();
    let dtype = compute_dtype(t.precision, &device);
    model.cast(dtype)?;
    let mut ring = Ring::connect(&ctx.data_plane, a.job, a.attempt, a.rank, &a.peers, &ctx.aborter)?;
    // A group whose ranks all train on CUDA moves gradients and parameters through NCCL; any
    // other group through the TCP ring. Every rank votes, so all take the same path.
    #[cfg(feature = "cuda")]
    let nccl = match a.world_size > 1 {
        false => None,
        // ZeRO-2 reduce-scatters each micro-batch's gradient over the TCP ring: this build's
        // NCCL path all-reduces (ZeRO-1).
        true if recipe.parallel.zero_stage == 2 => {
            tracing::info!(job = %a.job, rank = %a.rank, "ZeRO-2: gradients go over the TCP ring (NCCL runs ZeRO-1)");
            None
        }
        true => match crate::comm::nccl::usable(&mut ring, &device)? {
            Ok(()) => {
                let g = crate::comm::nccl::NcclGroup::connect(&mut ring, &device)?;
                tracing::info!(job = %a.job, rank = %a.rank, world = g.world(), "NCCL group ready");
                Some(g)
            }
            Err(why) => {
                tracing::info!(job = %a.job, rank = %a.rank, "gradients go over the TCP ring: {why}");
                None
            }
        },
    };
    #[cfg(feature = "cuda")]
    let own = match &nccl {
        Some(g) => g.own_range(len),
        None => ring.own_range(len),
    };
    #[cfg(not(feature = "cuda"))]
    let own = ring.own_range(len);
    // Every rank must start from the same weights (ZeRO-1 keeps full replicas).
    let local: f64 = params.iter().map(|x| f64::from(*x)).sum();
    let sums = ring.all_reduce_small(&[local, 1.0])?;
    let world = sums[1];
    if (sums[0] - local * world).abs() > 1e-9 * (local.abs() * world).max(1.0) {
        bail!("the ranks of {} start from different weights (sum {local} here, {} over {world} ranks)", a.job, sums[0]);
    }
    let (mut m, mut v, mut adam_step) = match resumed {
        Some(o) => (o.exp_avg[own.clone()].to_vec(), o.exp_avg_sq[own.clone()].to_vec(), o.adam_step),
        None => (vec![0f32; own.len()], vec![0f32; own.len()], 0),
    };
    let decay: Vec<(Range<usize>, bool)> = decay_segments(&model)
        .into_iter()
        .filter_map(|(r, d)| {
            let s = r.start.max(own.start);
            let e = r.end.min(own.end);
            (s < e).then(|| (s - own.start..e - own.start, d))
        })
        .collect();
    let mut optimizer = Optimizer::Host;
    // On CUDA the model's parameters become views of one flat buffer (written in place by the
    // optimizer and the all-gather) and gradients land in another as the backward pass ends each.
    #[cfg(feature = "cuda")]
    if let Some(group) = nccl {
        let padded = group.chunk(len) * group.world();
        let packed = model.pack(padded)?;
        let grads = FlatGrads::new(&model, padded, GRAD_BUCKET_ELEMS)?;
        let adam = swarm_kernels::DeviceAdamW::new(&device, &params[own.clone()], &m, &v)?;
        let shard = Tensor::zeros(group.chunk(len), dtype, &device)?;
        optimizer = Optimizer::Nccl { group, adam, shard, packed, grads };
    } else if device.is_cuda() && a.world_size == 1 {
        let packed = model.pack(len)?;
        let grads = FlatGrads::new(&model, len, len)?;
        let adam = swarm_kernels::DeviceAdamW::new(&device, &params, &m, &v)?;
        optimizer = Optimizer::Device { adam, packed, grads };
    }
    #[cfg(feature = "cuda")]
    let mut nccl_bytes = 0u64;
    #[cfg(not(feature = "cuda"))]
    let nccl_bytes = 0u64;
    let (offset, count) = (a.share.offset, a.share.count);
    let micro = recipe.micro_batch_rows(a.rank.0 as usize, count);
    let zero2 = recipe.parallel.zero_stage == 2 && a.world_size > 1;
    tracing::info!(job = %a.job, rank = %a.rank, params = len, own = own.len(), start = %start, rows = count, micro_batch = micro, zero = recipe.parallel.zero_stage, "training");

    // Data-plane bytes sent before this step (the start-up handshake is not a step's traffic).
    let mut sent_before = ring.bytes_sent();
    for step_no in start.0 + 1..=t.steps {
        let step = Step(step_no);
        if ctx.cancel.load(Ordering::Relaxed) {
            bail!("cancelled at {step}");
        }
        let t0 = Instant::now();
        let rows = sample_rows(&mut order, cursor + offset as u64, count);
        let lr = recipe.lr_at(step_no);
        // Forward and backward, one micro-batch at a time; gradients accumulate (on the host in
        // f32, on a GPU in the flat gradient buffer). Each micro-batch's loss is weighted by its
        // share of the global batch's tokens, so the sum is the global mean's gradient.
        let mut loss_sum: Option<Tensor> = None;
        let mut host_grad: Vec<f32> = Vec::new();
        let mut zero2_comm = 0.0;
        let mut t_fwd = 0.0;
        let pieces = micro_batches(count, micro);
        for (i, piece) in pieces.iter().enumerate() {
            let first = i == 0;
            let windows = windows(&dataset, &rows[piece.clone()], t.seq_len, &device)?;
            let tf = Instant::now();
            let loss = model.loss(&windows)?;
            if profile {
                device.synchronize()?;
            }
            t_fwd += tf.elapsed().as_secs_f64();
            let part = (loss.detach() * (piece.len() as f64 / count as f64))?;
            loss_sum = Some(match loss_sum {
                Some(l) => (l + part)?,
                None => part,
            });
            let scaled = (&loss * (piece.len() as f64 / t.global_batch as f64))?;
            match &mut optimizer {
                Optimizer::Host => {
                    let grads = scaled.backward()?;
                    let mut g = flat_grads(&model, &grads)?;
                    drop(grads);
                    if zero2 {
                        // ZeRO-2: this micro-batch's gradient is reduce-scattered right away and
                        // only this rank's shard is kept (summed over the micro-batches).
                        let tc = Instant::now();
                        let r = ring.reduce_scatter(&mut g)?;
                        zero2_comm += tc.elapsed().as_secs_f64();
                        g.truncate(r.end);
                        g.drain(..r.start);
                    }
                    if first {
                        host_grad = g;
                    } else {
                        host_grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                    }
                }
                #[cfg(feature = "cuda")]
                Optimizer::Device { grads, .. } => grads.backward(&scaled, !first, &mut |_| Ok(()))?,
                // Each bucket of gradients is summed over the ranks (in the compute dtype: bf16
                // on a GPU, half the bytes of f32) while the last micro-batch's backward pass
                // goes on; earlier micro-batches only accumulate locally.
                #[cfg(feature = "cuda")]
                Optimizer::Nccl { group, grads, .. } => grads.backward(&scaled, !first, &mut |r| {
                    if i + 1 == pieces.len() { group.all_reduce(&grads.flat, r) } else { Ok(()) }
                })?,
            }
        }
        // Read after the backward is queued: reading it earlier would make the host wait for
        // the forward before queuing the backward's kernels.
        let loss_sum = loss_sum.context("a rank with no rows in the global batch")?;
        let read_loss = || -> anyhow::Result<f64> { Ok(f64::from(loss_sum.to_dtype(DType::F32)?.to_scalar::<f32>()?)) };
        let log_phases = |what: &str| {
            eprintln!(
                "{step}: forward {:.1} ms, backward {:.1} ms{what}",
                t_fwd * 1e3,
                (t0.elapsed().as_secs_f64() - t_fwd) * 1e3
            )
        };
        let (loss_value, norm, compute_s, comm) = match &mut optimizer {
            Optimizer::Host => {
                let loss_value = read_loss()?;
                if profile {
                    log_phases("");
                }
                let mut grad = std::mem::take(&mut host_grad);
                let compute_fwd_bwd = t0.elapsed().as_secs_f64() - zero2_comm;

                let t1 = Instant::now();
                // ZeRO-1: the accumulated gradient is reduce-scattered once per step. ZeRO-2
                // already holds its reduced shard.
                let own_range = if zero2 { 0..grad.len() } else { ring.reduce_scatter(&mut grad)? };
                let g = &mut grad[own_range];
                let sumsq: f64 = g.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
                let norm = ring.all_reduce_small(&[sumsq])?[0].sqrt();
                let mut comm = t1.elapsed().as_secs_f64() + zero2_comm;

                let t2 = Instant::now();
                check_norm(norm, step)?;
                adam_step += 1;
                host_adamw(t, lr, norm, adam_step, &decay, &mut params[own.clone()], g, &mut m, &mut v);
                let optim = t2.elapsed().as_secs_f64();

                let t3 = Instant::now();
                ring.all_gather(&mut params)?;
                comm += t3.elapsed().as_secs_f64();
                unflatten_into(&model, &params)?;
                (loss_value, norm, compute_fwd_bwd + optim, comm)
            }
            #[cfg(feature = "cuda")]
            Optimizer::Device { adam, packed, grads } => {
                let loss_value = read_loss()?;
                if profile {
                    device.synchronize()?;
                    log_phases("");
                }
                let g = grads.flat.narrow(0, 0, len)?;
                let norm = swarm_kernels::sum_squares(&g)?.sqrt();
                check_norm(norm, step)?;
                let scale = clip_scale(t, norm);
                adam_step += 1;
                // The kernel writes the new bf16 parameters straight into the model's buffer.
                let out = packed.narrow(0, 0, len)?;
                for (r, decays) in &decay {
                    adam.step(&adam_config(t, lr, *decays), adam_step, r.clone(), scale, &g, Some(&out))?;
                }
                device.synchronize()?;
                if profile {
                    eprintln!("{step}: step total {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
                }
                (loss_value, norm, t0.elapsed().as_secs_f64(), 0.0)
            }
            #[cfg(feature = "cuda")]
            Optimizer::Nccl { group, adam, shard, packed, grads } => {
                let loss_value = read_loss()?;
                device.synchronize()?;
                let compute_fwd_bwd = t0.elapsed().as_secs_f64();
                if profile {
                    log_phases("");
                }
                // What the backward pass did not hide: the last buckets' all-reduce.
                let t1 = Instant::now();
                group.synchronize()?;
                group.join()?;
                let mut comm = t1.elapsed().as_secs_f64();
                // Every rank holds the summed gradients: the norm needs no exchange.
                let g = grads.flat.narrow(0, 0, len)?;
                let norm = swarm_kernels::sum_squares(&g)?.sqrt();
                check_norm(norm, step)?;
                let t2 = Instant::now();
                let scale = clip_scale(t, norm);
                adam_step += 1;
                let own_grad = g.narrow(0, own.start, own.len())?;
                let out = shard.narrow(0, 0, own.len())?;
                for (r, decays) in &decay {
                    adam.step(&adam_config(t, lr, *decays), adam_step, r.clone(), scale, &own_grad, Some(&out))?;
                }
                device.synchronize()?;
                let optim = t2.elapsed().as_secs_f64();
                // The updated shards go straight into the model's parameter buffer.
                let t3 = Instant::now();
                group.all_gather_into(shard, packed)?;
                group.synchronize()?;
                group.join()?;
                comm += t3.elapsed().as_secs_f64();
                nccl_bytes = group.bytes_sent();
                if profile {
                    eprintln!(
                        "{step}: step total {:.1} ms, comm not hidden {:.1} ms",
                        t0.elapsed().as_secs_f64() * 1e3,
                        comm * 1e3
                    );
                }
                (loss_value, norm, compute_fwd_bwd + optim, comm)
            }
        };
        cursor += t.global_batch as u64;
        let sent = ring.bytes_sent() + nccl_bytes;

        (ctx.report)(Report::Step(StepStats {
            step,
            loss: loss_value,
            tokens: (count * t.seq_len) as u64,
            compute_s,
            comm_s: comm,
            idle_s: 0.0,
            lr,
            grad_norm: norm,
            peak_memory_bytes: peak_memory(&device),
            bytes_sent: sent - sent_before,
        }))?;
        sent_before = sent;

        if step_no % recipe.checkpoint.every == 0 || step_no == t.steps {
            #[cfg(feature = "cuda")]
            match &mut optimizer {
                Optimizer::Device { adam, .. } => (params, m, v) = adam.to_host()?,
                // Rank 0 writes the whole model from `params`: gather every rank's f32 master
                // shard into it (each rank holds only its own up to date).
                Optimizer::Nccl { adam, group, .. } => {
                    let (p, mm, vv) = adam.to_host()?;
                    let c = group.chunk(len);
                    let mut mine = p;
                    mine.resize(c, 0.0);
                    let shard = Tensor::from_vec(mine, c, &device)?;
                    let full = Tensor::zeros(c * group.world(), DType::F32, &device)?;
                    group.all_gather_into(&shard, &full)?;
                    group.join()?;
                    params.copy_from_slice(&full.narrow(0, 0, len)?.to_vec1::<f32>()?);
                    (m, v) = (mm, vv);
                }
                Optimizer::Host => {}
            }
            write_checkpoint(
                &mut ctx,
                recipe,
                &dataset,
                step,
                cursor,
                &RankShard {
                    rank: a.rank,
                    world: a.world_size,
                    params: Some(&params),
                    total: len,
                    ranges: vec![own.clone()],
                    exp_avg: &m,
                    exp_avg_sq: &v,
                    adam_step,
                },
            )?;
        }
    }
    Ok(Step(t.steps))
}
