//! `swarm bench train`: training throughput of a recipe on 1, 2, ... local workers.

use super::local::LocalCluster;
use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchTrainArgs {
    /// The recipe to measure.
    #[arg(long, default_value = "recipes/tiny-cpu.yaml")]
    pub recipe: PathBuf,
    /// Worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub nodes: Vec<usize>,
    /// Steps per run; the first `--warmup` are not timed.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Sequences per step over all workers (default: the recipe's train.global_batch). The same
    /// for every node count, so the scaling column compares the same work (strong scaling).
    #[arg(long, conflicts_with = "batch_per_worker")]
    pub global_batch: Option<usize>,
    /// Sequences per step per worker instead: the global batch grows with the node count, and
    /// the scaling column compares the same work per worker (weak scaling).
    #[arg(long)]
    pub batch_per_worker: Option<usize>,
    /// The device's peak dense bf16 rate in TFLOP/s, for MFU (989 = H100 SXM).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    #[arg(long)]
    pub json: bool,
}

/// Training FLOPs per token, counted as `bench/pytorch_ref.py` counts them: 6 per parameter
/// that multiplies (the embedding table only when it is also the head) plus the causal
/// attention products, `6 · layers · seq · hidden`.
pub fn flops_per_token(spec: &swarm_sharding::ModelSpec, seq: usize) -> f64 {
    let embed = (spec.vocab_size * spec.hidden_size) as f64;
    let n = spec.param_count() as f64 - if spec.tie_word_embeddings { 0.0 } else { embed };
    6.0 * n + 6.0 * (spec.num_hidden_layers * seq * spec.hidden_size) as f64
}

struct Row {
    nodes: usize,
    timed_steps: u64,
    seconds: f64,
    tokens_per_s: f64,
    final_loss: f64,
    peak_memory_bytes: u64,
    /// Data-plane bytes one rank sent per step, averaged over every rank and step.
    bytes_per_step: f64,
    /// Pipeline stages and micro-batches per step.
    stages: usize,
    micro_batches: usize,
    /// Per stage: seconds of work per step (forward, backward, sends), and seconds in the 1F1B
    /// schedule per step (work plus waiting on a neighbour), each the mean over the replicas.
    stage_busy: Vec<f64>,
    stage_span: Vec<f64>,
}

/// The pipeline bubble as the planner defines it: the schedule's time beyond `m` micro-batches
/// of the slowest stage, over the schedule's time. Measured: from each stage's time in the
/// schedule. Predicted: the planner's 1F1B formula (fill and drain cost the sum of the stages,
/// then the slowest paces) fed with the measured per-stage times, `(Σt − t_max) / (Σt + (m − 1) t_max)`,
/// which is `(p − 1) / (m + p − 1)` for equal stages.
fn bubble(r: &Row) -> Option<(f64, f64)> {
    if r.stages < 2 || r.stage_busy.is_empty() {
        return None;
    }
    let m = r.micro_batches as f64;
    let t: Vec<f64> = r.stage_busy.iter().map(|b| b / m).collect();
    let (sum, tmax) = (t.iter().sum::<f64>(), t.iter().copied().fold(0.0, f64::max));
    let span = r.stage_span.iter().copied().fold(0.0, f64::max);
    Some(((span - m * tmax) / span, (sum - tmax) / (sum + (m - 1.0) * tmax)))
}

pub async fn run(a: BenchTrainArgs) -> anyhow::Result<()> {
    if a.steps <= a.warmup + 1 {
        bail!("--steps ({}) must exceed --warmup ({}) by at least 2", a.steps, a.warmup);
    }
    let mut recipe = super::recipe::load(&a.recipe)?;
    super::recipe::ensure_dataset(&recipe, &a.recipe, !a.json)?;
    super::recipe::resolve(&mut recipe, &a.recipe)?;
    if let Some(b) = a.global_batch {
        if b == 0 || a.nodes.iter().any(|&n| b < n) {
            bail!("--global-batch {b}: needs at least one sequence per worker (nodes {:?})", a.nodes);
        }
        recipe.train.global_batch = b;
    }
    if a.batch_per_worker == Some(0) {
        bail!("--batch-per-worker 0: needs at least one sequence per worker");
    }
    // The global batch of a run on `n` workers.
    let batch_for = |n: usize, fixed: usize| a.batch_per_worker.map_or(fixed, |b| b * n);
    // Every node count must be able to split the batch before any cluster starts.
    let fixed = recipe.train.global_batch;
    for &n in &a.nodes {
        recipe.train.global_batch = batch_for(n, fixed);
        recipe.validate().map_err(|e| anyhow::anyhow!("recipe {} with the bench's flags: {e}", a.recipe.display()))?;
        recipe.batch_shares(n).map_err(|e| anyhow::anyhow!("recipe {}: {e}", a.recipe.display()))?;
    }
    recipe.train.global_batch = fixed;
    recipe.train.steps = a.steps;
    recipe.train.warmup_steps = recipe.train.warmup_steps.min(a.steps);
    recipe.checkpoint.every = a.steps;
    // The timed runs' checkpoints stay on their workers.
    recipe.checkpoint.pull = swarm_sharding::recipe::PullPolicy::None;
    let scratch = std::env::temp_dir().join(format!("swarm-bench-{}", std::process::id()));
    let tokens_per_step = |n: usize| (batch_for(n, fixed) * recipe.train.seq_len) as f64;
    let mut rows = Vec::new();
    for &n in &a.nodes {
        let dir = scratch.join(format!("nodes-{n}"));
        recipe.checkpoint.dir = dir.join("checkpoints");
        recipe.train.global_batch = batch_for(n, fixed);
        let mut cluster = LocalCluster::start(n, &dir.join("coordinator"), &dir.join("workers"), &dir.join("logs"))?;
        let token = cluster.admin.clone();
        let target = super::train::Target {
            token: &token,
            wait: std::time::Duration::from_secs(600),
            overwrite: false,
            resume_from: None,
        };
        let mut seen: Vec<(u64, Instant)> = Vec::new();
        let status = super::train::submit_and_follow(target, &recipe, n, false, false, Some(&mut cluster), |s| {
            if s.state == "running" && seen.last().is_none_or(|(st, _)| *st < s.step) {
                seen.push((s.step, Instant::now()));
            }
        })
        .await;
        cluster.stop();
        let status = status?;
        if status.state != "succeeded" {
            bail!("benchmark run on {n} worker(s) {}: {}", status.state, status.error);
        }
        let first = seen.iter().find(|(s, _)| *s >= a.warmup).context("no step was observed after the warm-up")?;
        let last = seen.last().context("no step observed")?;
        let secs = last.1.duration_since(first.1).as_secs_f64();
        let timed = last.0 - first.0;
        if timed == 0 || secs <= 0.0 {
            bail!("too few steps were observed to time the run on {n} worker(s)");
        }
        rows.push(Row {
            nodes: n,
            timed_steps: timed,
            seconds: secs,
            tokens_per_s: timed as f64 * tokens_per_step(n) / secs,
            final_loss: status.loss,
            peak_memory_bytes: status.peak_memory_bytes,
            bytes_per_step: status.bytes_sent as f64 / (a.steps * n as u64) as f64,
            stages: recipe.parallel.pipeline_stages,
            micro_batches: {
                let share = recipe.batch_shares(n).map_err(anyhow::Error::msg)?[0].count;
                share.div_ceil(recipe.micro_batch_rows(0, share))
            },
            stage_busy: per_stage(&recipe, n, &status.compute_s, a.steps)?,
            stage_span: per_stage(
                &recipe,
                n,
                &status.compute_s.iter().zip(&status.idle_s).map(|(c, i)| c + i).collect::<Vec<_>>(),
                a.steps,
            )?,
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let spec = recipe.spec().context("resolved above")?;
    let fpt = flops_per_token(spec, recipe.train.seq_len);
    let mfu = |r: &Row| r.tokens_per_s * fpt / (a.peak_tflops * 1e12) / r.nodes as f64;
    // Scaling efficiency against the one-worker run: tokens/s over n times one worker's.
    let one = rows.iter().find(|r| r.nodes == 1).map(|r| r.tokens_per_s);
    let scaling = |r: &Row| one.map(|o| r.tokens_per_s / (o * r.nodes as f64));
    // The ring-collective formula for one data-parallel step: a reduce-scatter of the f32
    // gradient plus an all-gather of the f32 parameters, (n - 1) / n of the model each.
    let model_bytes = 4.0 * spec.param_count() as f64;
    let formula = |r: &Row| 2.0 * (r.nodes as f64 - 1.0) / r.nodes as f64 * model_bytes;
    // The formula is data parallelism's; a pipeline's links carry activations instead.
    let ratio = |r: &Row| (r.nodes > 1 && r.stages == 1).then(|| r.bytes_per_step / formula(r));
    // What the recipe's ZeRO stage should send by the same ring formula (`zero_passes`).
    let zero = recipe.parallel.zero_stage;
    let zero_formula = |r: &Row| zero_passes(zero, r.micro_batches) / 2.0 * formula(r);
    let zero_ratio = |r: &Row| (r.nodes > 1 && r.stages == 1).then(|| r.bytes_per_step / zero_formula(r));
    if a.json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"nodes": r.nodes, "global_batch": batch_for(r.nodes, fixed), "timed_steps": r.timed_steps, "seconds": r.seconds, "tokens_per_s": r.tokens_per_s, "final_loss": r.final_loss, "mfu": mfu(r), "scaling": scaling(r), "peak_memory_bytes": r.peak_memory_bytes, "bytes_sent_per_rank_step": r.bytes_per_step, "ring_formula_bytes": formula(r), "bytes_vs_formula": ratio(r), "zero_stage": zero, "zero_formula_bytes": zero_formula(r), "bytes_vs_zero_formula": zero_ratio(r), "pipeline_stages": r.stages, "micro_batches": r.micro_batches, "stage_busy_s": r.stage_busy, "stage_span_s": r.stage_span, "bubble": bubble(r).map(|b| b.0), "bubble_predicted": bubble(r).map(|b| b.1)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"recipe": a.recipe, "params": spec.param_count(), "tokens_per_step": a.nodes.iter().map(|&n| tokens_per_step(n)).collect::<Vec<_>>(), "scaling": if a.batch_per_worker.is_some() { "weak" } else { "strong" }, "flops_per_token": fpt, "peak_tflops": a.peak_tflops, "runs": out})
        );
        return Ok(());
    }
    println!(
        "recipe {} ({:.2}M parameters, {} tokens/step{}, steps {}..{} timed)",
        a.recipe.display(),
        spec.param_count() as f64 / 1e6,
        tokens_per_step(1),
        if a.batch_per_worker.is_some() { " per worker" } else { "" },
        a.warmup,
        a.steps
    );
    println!(
        "scaling = tokens/s over n x one worker's, {}",
        if a.batch_per_worker.is_some() {
            "each worker running the same batch (weak scaling)"
        } else {
            "the same global batch split over the workers (strong scaling)"
        }
    );
    println!("MFU = tokens/s x {:.3e} FLOP/token / ({} TFLOP/s x nodes)", fpt, a.peak_tflops);
    println!(
        "sent MB = data-plane bytes per rank per step; formula = 2(n-1)/n x {:.1} MB (f32 model: reduce-scatter + all-gather)",
        model_bytes / 1e6
    );
    println!(
        "ZeRO-{zero} = the same over what ZeRO-{zero} sends by the ring formula: {}",
        match zero {
            2 => "(k+1)(n-1)/n x the model for k micro-batches (each one's gradient is reduce-scattered)",
            3 => "3(n-1)/n x the model (all-gathered for the forward and again for the backward, reduce-scattered)",
            _ => "2(n-1)/n x the model, as above",
        }
    );
    println!(
        "{:>6} | {:>8} | {:>10} | {:>10} | {:>6} | {:>7} | {:>9} | {:>10} | {:>10} | {:>7} | {:>7}",
        "nodes",
        "steps",
        "s/step",
        "tokens/s",
        "MFU",
        "scaling",
        "peak GiB",
        "final loss",
        "sent MB",
        "formula",
        format!("ZeRO-{zero}")
    );
    println!(
        "{:-<6}-+-{:-<8}-+-{:-<10}-+-{:-<10}-+-{:-<6}-+-{:-<7}-+-{:-<9}-+-{:-<10}-+-{:-<10}-+-{:-<7}-+-{:-<7}",
        "", "", "", "", "", "", "", "", "", "", ""
    );
    if rows.iter().any(|r| r.stages > 1) {
        println!(
            "bubble = schedule time beyond m micro-batches of the slowest stage / schedule time; predicted by the planner's 1F1B formula from the measured stage times"
        );
    }
    for r in &rows {
        if let Some((measured, predicted)) = bubble(r) {
            let ms: Vec<String> = r.stage_busy.iter().map(|b| format!("{:.1}", b * 1e3)).collect();
            println!(
                "{:>6} | {} stages ({} ms of work per step), {} micro-batches: bubble {:.1}% measured, {:.1}% predicted ({:.1}% for equal stages)",
                r.nodes,
                r.stages,
                ms.join(" / "),
                r.micro_batches,
                100.0 * measured,
                100.0 * predicted,
                100.0 * (r.stages - 1) as f64 / (r.micro_batches + r.stages - 1) as f64
            );
        }
        println!(
            "{:>6} | {:>8} | {:>10.3} | {:>10.0} | {:>5.1}% | {:>7} | {:>9.2} | {:>10.4} | {:>10.3} | {:>7} | {:>7}",
            r.nodes,
            r.timed_steps,
            r.seconds / r.timed_steps as f64,
            r.tokens_per_s,
            100.0 * mfu(r),
            scaling(r).map_or("-".to_string(), |s| format!("{s:.3}")),
            r.peak_memory_bytes as f64 / (1u64 << 30) as f64,
            r.final_loss,
            r.bytes_per_step / 1e6,
            ratio(r).map_or("-".to_string(), |x| format!("{x:.3}x")),
            zero_ratio(r).map_or("-".to_string(), |x| format!("{x:.3}x"))
        );
    }
    Ok(())
}

/// Passes of `(n - 1) / n` of the model over the ring that a data-parallel step of this ZeRO stage
/// makes: ZeRO-1 reduce-scatters the gradient once and all-gathers the parameters once; ZeRO-2
/// reduce-scatters each of the `micro_batches` gradients (it keeps only its shard between them);
/// ZeRO-3 all-gathers the parameters for the forward and again for the recomputing backward, and
/// reduce-scatters the gradient (FSDP's textbook 3).
fn zero_passes(zero_stage: u8, micro_batches: usize) -> f64 {
    match zero_stage {
        2 => micro_batches.max(1) as f64 + 1.0,
        3 => 3.0,
        _ => 2.0,
    }
}

/// Mean over each stage's replicas of `per_rank` (sums over `steps` steps), per step.
fn per_stage(recipe: &swarm_sharding::Recipe, nodes: usize, per_rank: &[f64], steps: u64) -> anyhow::Result<Vec<f64>> {
    if per_rank.len() != nodes {
        return Ok(Vec::new());
    }
    let layout = recipe.stage_layout(nodes).map_err(anyhow::Error::msg)?;
    Ok((0..layout.stages)
        .map(|s| {
            (0..layout.replicas).map(|r| per_rank[layout.rank(s, r)]).sum::<f64>()
                / (layout.replicas as f64 * steps as f64)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_stage_ring_passes() {
        assert_eq!(zero_passes(1, 3), 2.0);
        assert_eq!(zero_passes(2, 1), 2.0, "one micro-batch: ZeRO-2 sends what ZeRO-1 does");
        assert_eq!(zero_passes(2, 2), 3.0);
        assert_eq!(zero_passes(3, 4), 3.0);
    }

    #[test]
    fn bubble_of_equal_stages_is_the_textbook_value() {
        let r = Row {
            nodes: 2,
            timed_steps: 1,
            seconds: 1.0,
            tokens_per_s: 1.0,
            final_loss: 0.0,
            peak_memory_bytes: 0,
            bytes_per_step: 0.0,
            stages: 2,
            micro_batches: 4,
            stage_busy: vec![0.4, 0.4],
            // 4 micro-batches of 0.1 s plus one fill/drain slot of 0.1 s: 0.5 s per stage.
            stage_span: vec![0.5, 0.5],
        };
        let (measured, predicted) = bubble(&r).unwrap();
        assert!((measured - 0.2).abs() < 1e-12, "{measured}");
        assert!((predicted - 1.0 / 5.0).abs() < 1e-12, "{predicted}");
    }
}
