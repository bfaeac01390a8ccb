//! `swarm checkpoint pull`: copy a committed checkpoint from the workers that hold it to this
//! machine, as a Hugging Face model directory (with the optimizer shards and the manifest).

use anyhow::bail;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Fetch a committed checkpoint (the latest, or --step) into a local directory.
    Pull(PullArgs),
}

#[derive(Args)]
pub struct PullArgs {
    /// The recipe the job ran: its name picks the checkpoints, its checkpoint.dir is the
    /// default destination.
    #[arg(long, conflicts_with = "name")]
    pub recipe: Option<PathBuf>,
    /// The recipe name, instead of --recipe.
    #[arg(long)]
    pub name: Option<String>,
    /// The step to fetch (default: the latest committed).
    #[arg(long)]
    pub step: Option<u64>,
    /// Where to put `step-NNNNNN/` (default: the recipe's checkpoint.dir, or the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The coordinator's admin token (`swarm token` on its machine prints it).
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// host:port of the coordinator, instead of the addresses the token lists.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Print what was fetched as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(c: CheckpointCommand) -> anyhow::Result<()> {
    let CheckpointCommand::Pull(a) = c;
    let (name, default_out) = match (&a.recipe, &a.name) {
        (Some(r), _) => {
            let recipe = super::recipe::load(r)?;
            (recipe.name, recipe.checkpoint.dir)
        }
        (None, Some(n)) => (n.clone(), PathBuf::from(".")),
        (None, None) => bail!("say which checkpoints: --recipe RECIPE.yaml or --name NAME"),
    };
    let out = a.out.unwrap_or(default_out);
    let token = super::auth::require_admin_token(a.token.as_deref(), a.coordinator.as_deref())?;
    let mut client = super::auth::admin_client(&token).await?;
    let secret = super::content::fetch_secret(&mut client).await?;
    let m = super::content::manifest(&mut client, &name, a.step.unwrap_or(0)).await?;
    let (step, bytes) = (m.step, m.ranks.iter().flat_map(|r| &r.files).map(|f| f.bytes).sum::<u64>());
    let t0 = std::time::Instant::now();
    let dir = super::content::pull(m, secret, &out).await?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "name": name, "step": step.0, "dir": dir, "bytes": bytes, "seconds": secs })
        );
    } else {
        eprintln!("pulled {name} {step} ({} MB in {secs:.1} s) into {}", bytes / 1_000_000, dir.display());
    }
    Ok(())
}
