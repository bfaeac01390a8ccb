//! `swarm worker`: the worker daemon.

use anyhow::Context;
use clap::Args;
use swarm_proto::trust::{Token, TokenKind};
use swarm_worker::daemon::{self, WorkerOptions};

#[derive(Args)]
pub struct WorkerArgs {
    /// The join token from the join command `swarm up` printed (`swarm token --join` on the
    /// coordinator's machine prints it again).
    #[arg(long, env = "SWARM_JOIN_TOKEN", hide_env_values = true)]
    pub join: String,
    /// host:port of the coordinator, instead of the addresses the token lists.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Name shown in `swarm status` (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where peers connect for tensors (gradients, parameters); 7451 is the documented port.
    #[arg(long, default_value = "0.0.0.0:7451")]
    pub data_listen: String,
    /// Host name or IP that peers should dial (default: the address used to reach the coordinator).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// The device to train on: auto (the first CUDA GPU in a CUDA build, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWARM_DEVICE", default_value = "auto")]
    pub device: String,
    /// The only directory this worker reads and writes: the datasets and models it fetched
    /// (`content/`) and the checkpoints it holds (`checkpoints/`). Default: the `worker`
    /// folder of the data directory ($XDG_DATA_HOME/swarm or ~/.local/share/swarm).
    #[arg(long, env = "SWARM_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    pub exit_with_parent: Option<u32>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

pub async fn run(a: WorkerArgs) -> anyhow::Result<()> {
    super::exit_with_parent(a.exit_with_parent);
    let mut join = Token::decode_kind(&a.join, TokenKind::Join).context("--join")?;
    if let Some(c) = a.coordinator {
        join.addrs = vec![c];
    }
    let opts = WorkerOptions {
        join,
        name: a.name.unwrap_or_else(hostname),
        data_listen: a.data_listen,
        advertise_host: a.advertise_host,
        device: a.device,
        state_dir: a.state_dir.unwrap_or_else(|| crate::default_data_dir().join("worker")),
    };
    tokio::select! {
        r = daemon::run(opts) => r,
        () = super::shutdown_signal() => {
            eprintln!("worker stopping");
            Ok(())
        }
    }
}
