//! `swarm plan`: lays a recipe over a cluster and prints the plan (stages, devices, layers,
//! memory per device, predicted step time and tokens/s) before anything is downloaded or started.

use anyhow::Context;
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;
use swarm_sharding::plan::{Plan, SyncStrategy};
use swarm_sharding::plan_error::gib;
use swarm_sharding::train_spec::model_for_planning;
use swarm_sharding::{ClusterSpec, PlanError, TrainSpec};

#[derive(Args)]
pub struct PlanArgs {
    /// The recipe (YAML) to plan. Its dataset need not exist.
    #[arg(long)]
    pub recipe: PathBuf,
    /// The cluster (YAML): workers, their devices and the links between them (see ops/clusters/).
    #[arg(long)]
    pub cluster: PathBuf,
    /// Print the plan (or the reason none fits) as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: PlanArgs) -> anyhow::Result<()> {
    let recipe = super::recipe::load(&a.recipe)?;
    let text =
        std::fs::read_to_string(&a.cluster).with_context(|| format!("cannot read cluster {}", a.cluster.display()))?;
    let cluster = ClusterSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("cluster {}: {e}", a.cluster.display()))?;
    let config = match &recipe.model.hf_dir {
        Some(d) => Some(std::fs::read_to_string(d.join("config.json")).with_context(|| {
            format!("recipe {}: model.hf_dir = {}: no config.json", a.recipe.display(), d.display())
        })?),
        None => None,
    };
    let model = model_for_planning(&recipe, config.as_deref())
        .map_err(|e| anyhow::anyhow!("recipe {}: {e}", a.recipe.display()))?;
    let train = TrainSpec::from_recipe(&recipe);
    match swarm_sharding::plan(&cluster, &model, &train) {
        Ok(p) if a.json => println!("{}", serde_json::to_string_pretty(&p)?),
        Ok(p) => print!("{}", render(&p, &a)),
        Err(e) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            }
            return Err(plan_failed(e, &a));
        }
    }
    Ok(())
}

fn plan_failed(e: PlanError, a: &PlanArgs) -> anyhow::Error {
    anyhow::anyhow!("recipe {} on cluster {}: {e}", a.recipe.display(), a.cluster.display())
}

/// `[#######-------------] 14.2/24.0 GiB`
fn memory_bar(used: u64, capacity: u64) -> String {
    const WIDTH: usize = 20;
    let filled = ((used as f64 / capacity.max(1) as f64) * WIDTH as f64).round().min(WIDTH as f64) as usize;
    format!(
        "[{}{}] {:.1}/{:.1} GiB",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        used as f64 / (1u64 << 30) as f64,
        capacity as f64 / (1u64 << 30) as f64
    )
}

fn billions(n: u64) -> String {
    if n >= 1_000_000_000 { format!("{:.2}B", n as f64 / 1e9) } else { format!("{:.1}M", n as f64 / 1e6) }
}

fn render(p: &Plan, a: &PlanArgs) -> String {
    let mut o = String::new();
    let t = &p.train;
    let _ = writeln!(o, "plan: {} on {} ({} devices)", a.recipe.display(), p.cluster, p.ranks.len() + p.unused.len());
    let _ = writeln!(
        o,
        "model: {} parameters, {} layers; {} trains {} ({:.2}%) with {}",
        billions(p.model.params),
        p.model.layers,
        t.mode,
        billions(p.model.trainable_params),
        100.0 * p.model.trainable_params as f64 / p.model.params.max(1) as f64,
        t.optimizer
    );
    let mut layout = format!(
        "{} stage{} x {} replica{}, ZeRO-{}",
        p.pipeline_degree,
        if p.pipeline_degree == 1 { "" } else { "s" },
        p.data_parallel_degree,
        if p.data_parallel_degree == 1 { "" } else { "s" },
        p.zero_stage
    );
    if p.zero_stage == 0 {
        layout = layout.replace("ZeRO-0", "replicated state");
    }
    if p.activation_checkpointing {
        layout.push_str(", activation checkpointing");
    }
    if p.cpu_offload {
        layout.push_str(", CPU offload");
    }
    let _ = writeln!(
        o,
        "step: {} sequences x {} tokens = {} tokens; {layout}; {} micro-batch{} per step ({})",
        t.global_batch,
        t.seq_len,
        t.tokens_per_step,
        p.micro_batches,
        if p.micro_batches == 1 { "" } else { "es" },
        p.schedule
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<6} {:<12} {:<6} {:<12} {:<16} {:>3}  {:<38} largest parts",
        "stage", "layers", "rank", "worker", "device", "mb", "memory"
    );
    for s in &p.stages {
        let mut layers = format!("{}-{}", s.first_layer, s.end_layer.saturating_sub(1));
        if s.embedding {
            layers.push_str(" +emb");
        }
        if s.lm_head {
            layers.push_str(" +head");
        }
        for (i, rank) in s.ranks.iter().enumerate() {
            let r = &p.ranks[rank.0 as usize];
            let summary = r.memory.summary();
            let parts: Vec<&str> = summary.split(", ").take(3).collect();
            let _ = writeln!(
                o,
                "{:<6} {:<12} {:<6} {:<12} {:<16} {:>3}  {:<38} {}",
                if i == 0 { s.stage.to_string() } else { String::new() },
                if i == 0 { layers.clone() } else { String::new() },
                r.rank.to_string(),
                r.worker,
                r.device,
                r.micro_batch,
                memory_bar(r.memory.total, r.memory.capacity),
                parts.join(", ")
            );
        }
    }
    // Runs of idle devices of one kind, for one reason, take one line.
    let mut i = 0;
    while i < p.unused.len() {
        let u = &p.unused[i];
        let run = p.unused[i..].iter().take_while(|x| x.device == u.device && x.reason == u.reason).count();
        let workers =
            if run == 1 { u.worker.clone() } else { format!("{}..{}", u.worker, p.unused[i + run - 1].worker) };
        let device = if run == 1 { u.device.clone() } else { format!("{run} x {}", u.device) };
        let _ =
            writeln!(o, "{:<6} {:<12} {:<6} {:<12} {:<16}      not used: {}", "-", "-", "-", workers, device, u.reason);
        i += run;
    }
    let host: u64 = p.ranks.iter().map(|r| r.host_bytes).max().unwrap_or(0);
    if host > 0 {
        let _ = writeln!(o, "host RAM for offloaded state: up to {} per rank", gib(host));
    }
    let st = &p.step;
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "predicted step: {:.2} s = compute {:.2} s + communication {:.2} s + pipeline bubble {:.2} s ({:.0}%)",
        st.total_s,
        st.compute_s,
        st.communication_s,
        st.bubble_s,
        100.0 * st.bubble_fraction
    );
    if st.tied_exchange_s > 0.0 {
        let _ = writeln!(
            o,
            "of the communication, {:.2} s is the tied embedding's rows and their gradient between the first and last stage",
            st.tied_exchange_s
        );
    }
    let _ = writeln!(o, "throughput: {:.0} tokens/s, MFU {:.1}%", st.tokens_per_s, 100.0 * st.mfu);
    let sync = match &p.sync.strategy {
        SyncStrategy::EveryStep => "every step".to_string(),
        SyncStrategy::Diloco { every } => format!("DiLoCo, outer sync every {every} steps"),
    };
    let _ = writeln!(o, "sync: {sync}: {}", p.sync.explanation);
    if p.executable.ok {
        let _ = writeln!(o, "this build can run this plan; in the recipe:");
        for l in p.parallel_section().lines() {
            let _ = writeln!(o, "  {l}");
        }
    } else {
        let _ = writeln!(o, "this build cannot run this plan yet:");
        for r in &p.executable.reasons {
            let _ = writeln!(o, "  - {r}");
        }
    }
    let _ = writeln!(o, "assumes:");
    for x in &p.assumptions {
        let _ = writeln!(o, "  - {x}");
    }
    o
}
