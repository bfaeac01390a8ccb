//! The subcommands. Each module parses its arguments and calls into the library crates.

pub mod auth;
pub mod bench;
pub mod bench_kernels;
pub mod bench_lan;
pub mod checkpoint;
pub mod content;
pub mod data;
pub mod doctor;
pub mod eval;
pub mod local;
pub mod plan;
pub mod recipe;
pub mod status;
pub mod token;
pub mod train;
pub mod up;
pub mod worker;

use std::time::Duration;

pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWARM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Exits this process when `pid` is gone, so processes started for an embedded cluster never
/// outlive the command that started them, even when it is killed.
pub fn exit_with_parent(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    std::thread::spawn(move || {
        loop {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("parent process {pid} is gone; exiting");
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
