//! `swarm status`: jobs and workers of a coordinator.

use clap::Args;
use swarm_proto::v1 as pb;

#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's admin token (default: the one of a coordinator on this machine).
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// host:port of the coordinator, instead of the addresses the token lists.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Print JSON for programs.
    #[arg(long)]
    pub json: bool,
}

fn finite(x: f64) -> serde_json::Value {
    if x.is_finite() { x.into() } else { serde_json::Value::Null }
}

pub fn job_json(j: &pb::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": j.job_id,
        "name": j.name,
        "state": j.state,
        "error": (!j.error.is_empty()).then_some(&j.error),
        "nodes": j.nodes,
        "workers": j.workers,
        "step": j.step,
        "total_steps": j.total_steps,
        "start_step": j.start_step,
        "first_loss": finite(j.first_loss),
        "loss": finite(j.loss),
        "tokens_per_s": j.tokens_per_s,
        "last_checkpoint_step": j.last_checkpoint_step,
        "last_checkpoint_dir": (!j.last_checkpoint_dir.is_empty()).then_some(&j.last_checkpoint_dir),
        "losses_first_step": j.losses_first_step,
        "peak_memory_bytes": j.peak_memory_bytes,
        "bytes_sent": j.bytes_sent,
        "compute_s": j.compute_s,
        "idle_s": j.idle_s,
        "losses": j.losses.iter().map(|l| finite(*l)).collect::<Vec<_>>(),
    })
}

pub async fn run(a: StatusArgs) -> anyhow::Result<()> {
    let token = super::auth::require_admin_token(a.token.as_deref(), a.coordinator.as_deref())?;
    let (channel, addr) = swarm_proto::trust::connect_channel(&token.addrs, token.pin).await?;
    let mut client = swarm_proto::trust::client(channel, &token.secret);
    let s = client.status(pb::ListJobsRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
    if a.json {
        let workers: Vec<_> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.worker_id, "name": w.name, "state": w.state, "job_id": (w.job_id != 0).then_some(w.job_id),
                    "data_addr": w.data_addr, "last_seen_ms_ago": w.last_seen_ms_ago,
                    "devices": w.devices.iter().map(|d| serde_json::json!({"kind": d.kind, "name": d.name, "memory_bytes": d.memory_bytes, "measured_tflops": d.measured_tflops, "cores": d.cores})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let jobs: Vec<_> = s.jobs.iter().map(job_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"coordinator": addr, "version": s.coordinator_version, "workers": workers, "jobs": jobs})
            )?
        );
        return Ok(());
    }
    println!("coordinator {addr} (swarm {})", s.coordinator_version);
    println!("\nWORKERS ({})", s.workers.len());
    for w in &s.workers {
        let devs: Vec<String> = w
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{} {} ({:.2} TFLOP/s, {:.1} GiB)",
                    d.kind,
                    d.name,
                    d.measured_tflops,
                    d.memory_bytes as f64 / (1u64 << 30) as f64
                )
            })
            .collect();
        let job = if w.job_id != 0 { format!(" job-{}", w.job_id) } else { String::new() };
        println!("  w{:<4} {:<16} {:<6}{job}  {}", w.worker_id, w.name, w.state, devs.join("; "));
    }
    println!("\nJOBS ({})", s.jobs.len());
    for j in &s.jobs {
        let loss = if j.loss.is_finite() { format!("loss {:.4}", j.loss) } else { "loss -".into() };
        println!(
            "  job-{:<4} {:<16} {:<11} step {}/{}  {loss}  nodes {}",
            j.job_id, j.name, j.state, j.step, j.total_steps, j.nodes
        );
        if !j.error.is_empty() {
            println!("           {}", j.error);
        }
    }
    Ok(())
}
