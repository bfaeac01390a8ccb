//! `swarm token`: prints the admin token (or the join token) of the coordinator on this machine.

use clap::Args;
use std::path::PathBuf;
use swarm_coordinator::identity::{ClusterIdentity, read_token};
use swarm_proto::trust::TokenKind;

#[derive(Args)]
pub struct TokenArgs {
    /// The coordinator's data directory (as given to `swarm up`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the join token (for `swarm worker --join`) instead of the admin token.
    #[arg(long)]
    pub join: bool,
}

pub async fn run(a: TokenArgs) -> anyhow::Result<()> {
    let dir = a.data_dir.unwrap_or_else(crate::default_data_dir).join(ClusterIdentity::DIR);
    let (file, kind) = if a.join {
        (ClusterIdentity::JOIN_TOKEN, TokenKind::Join)
    } else {
        (ClusterIdentity::ADMIN_TOKEN, TokenKind::Admin)
    };
    let path = dir.join(file);
    if !path.is_file() {
        anyhow::bail!(
            "{} does not exist: run `swarm up` (with the same --data-dir) on this machine first",
            path.display()
        );
    }
    println!("{}", read_token(&path, kind)?.encode());
    Ok(())
}
