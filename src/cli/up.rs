//! `swarm up`: the coordinator in the foreground, over TLS with the cluster's own identity.

use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use swarm_coordinator::identity::ClusterIdentity;
use swarm_coordinator::{Config, Service};
use tonic::transport::{Identity, ServerTlsConfig};

#[derive(Args)]
pub struct UpArgs {
    /// Address to listen on for workers and the CLI (7450 is the documented port; open it in
    /// the firewall for the LAN).
    #[arg(long, default_value = "0.0.0.0:7450")]
    pub listen: String,
    /// Where the coordinator keeps its state: jobs (they survive a restart) and the cluster's
    /// identity (CA, certificate, secrets, tokens).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A worker not heard from for this long is lost.
    #[arg(long, default_value_t = 6000)]
    pub lease_ms: u64,
    /// Do not advertise this coordinator on the LAN by mDNS (workers then need the addresses
    /// in their token to answer).
    #[arg(long)]
    pub no_mdns: bool,
    /// Exit when this process id is gone (used by the embedded local cluster).
    #[arg(long, hide = true)]
    pub exit_with_parent: Option<u32>,
}

/// The addresses a token should list for a listener on `addr`: the address itself, or, for an
/// unspecified one (0.0.0.0), every non-loopback IPv4 address of this machine (loopback when
/// there is none).
pub fn advertised_addrs(addr: SocketAddr) -> Vec<String> {
    if !addr.ip().is_unspecified() {
        return vec![addr.to_string()];
    }
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| ip.is_ipv4() && !ip.is_loopback())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips.truncate(swarm_proto::trust::MAX_TOKEN_ADDRS);
    ips.into_iter().map(|ip| SocketAddr::new(ip, addr.port()).to_string()).collect()
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    super::exit_with_parent(a.exit_with_parent);
    let data_dir = a.data_dir.unwrap_or_else(crate::default_data_dir);
    let identity = ClusterIdentity::load_or_create(&data_dir)?;
    let config = Config { lease_ms: a.lease_ms, heartbeat_interval_ms: (a.lease_ms / 6).clamp(100, 5000) };
    let svc = Service::open(&data_dir, config, identity.secrets)?;
    let listener =
        tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let addrs = advertised_addrs(addr);
    let (join, _) = identity.write_tokens(&addrs)?;
    // The first line of stdout is read by `swarm train` when it starts a local coordinator.
    // Write errors are ignored: a coordinator must not die because nobody reads its stdout.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "swarm coordinator listening on {addr} (TLS, cluster CA {})", identity.pin());
    let _ = writeln!(out, "  state:  {}", data_dir.display());
    let _ = writeln!(out, "  join:   swarm worker --join {join}");
    let _ = writeln!(
        out,
        "  admin:  {} (`swarm token` prints it; clients on this machine read it by themselves)",
        identity.dir.join(ClusterIdentity::ADMIN_TOKEN).display()
    );
    let _ = writeln!(out, "  train:  swarm train --nodes N --recipe RECIPE.yaml");
    // Found by workers whose token's addresses no longer answer (a new DHCP lease).
    let lan_ips: Vec<IpAddr> = addrs
        .iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback())
        .collect();
    let _advertised = if a.no_mdns || lan_ips.is_empty() {
        None
    } else {
        match swarm_proto::discovery::advertise(&identity.pin(), &lan_ips, addr.port()) {
            Ok(ad) => {
                let _ = writeln!(out, "  lan:    advertised by mDNS ({})", swarm_proto::discovery::SERVICE_TYPE);
                Some(ad)
            }
            Err(e) => {
                tracing::warn!("not advertised on the LAN: {e}; workers need the addresses in their token");
                None
            }
        }
    };
    let _ = out.flush();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&identity.server_chain_pem, &identity.server_key_pem))
        .timeout(Duration::from_secs(10));
    let ticker = svc.spawn_ticker();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("the coordinator's TLS certificate")?
        .add_service(svc.server())
        .serve_with_incoming_shutdown(incoming, super::shutdown_signal())
        .await
        .context("serving gRPC")?;
    ticker.abort();
    eprintln!("coordinator stopped");
    Ok(())
}
