//! `swarm up`: the coordinator in the foreground.

use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use swarm_coordinator::{Config, Service};

#[derive(Args)]
pub struct UpArgs {
    /// Address to listen on for workers and the CLI.
    #[arg(long, default_value = "0.0.0.0:7450")]
    pub listen: String,
    /// Where the coordinator keeps its state (jobs survive a restart).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A worker not heard from for this long is lost.
    #[arg(long, default_value_t = 6000)]
    pub lease_ms: u64,
    /// Exit when this process id is gone (used by the embedded local cluster).
    #[arg(long, hide = true)]
    pub exit_with_parent: Option<u32>,
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    super::exit_with_parent(a.exit_with_parent);
    let data_dir = a.data_dir.unwrap_or_else(crate::default_data_dir);
    let config = Config { lease_ms: a.lease_ms, heartbeat_interval_ms: (a.lease_ms / 6).clamp(100, 5000) };
    let svc = Service::open(&data_dir, config)?;
    let listener =
        tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let shown =
        if addr.ip().is_unspecified() { format!("<this-machine's-address>:{}", addr.port()) } else { addr.to_string() };
    // The first line of stdout is read by `swarm train` when it starts a local coordinator.
    // Write errors are ignored: a coordinator must not die because nobody reads its stdout.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "swarm coordinator listening on {addr}");
    let _ = writeln!(out, "  state:  {}", data_dir.display());
    let _ = writeln!(out, "  join:   swarm worker --coordinator {shown}");
    let _ = writeln!(out, "  train:  swarm train --coordinator {shown} --nodes N --recipe RECIPE.yaml");
    let _ = out.flush();
    let ticker = svc.spawn_ticker();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(svc.server())
        .serve_with_incoming_shutdown(incoming, super::shutdown_signal())
        .await
        .context("serving gRPC")?;
    ticker.abort();
    eprintln!("coordinator stopped");
    Ok(())
}
