//! `swarm worker`: the worker daemon.

use clap::Args;
use swarm_worker::daemon::{self, WorkerOptions};

#[derive(Args)]
pub struct WorkerArgs {
    /// host:port of the coordinator (default: $SWARM_COORDINATOR or 127.0.0.1:7450).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Name shown in `swarm status` (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where peers connect for tensors (gradients, parameters).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub data_listen: String,
    /// Host name or IP that peers should dial (default: the address used to reach the coordinator).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// The device to train on: auto (the first CUDA GPU in a CUDA build, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWARM_DEVICE", default_value = "auto")]
    pub device: String,
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
    let opts = WorkerOptions {
        coordinator: a.coordinator.unwrap_or_else(crate::default_coordinator),
        name: a.name.unwrap_or_else(hostname),
        data_listen: a.data_listen,
        advertise_host: a.advertise_host,
        device: a.device,
    };
    tokio::select! {
        r = daemon::run(opts) => r,
        () = super::shutdown_signal() => {
            eprintln!("worker stopping");
            Ok(())
        }
    }
}
