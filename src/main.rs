//! `swarm`: the command-line interface. Every subcommand lives in `cli/`.

mod cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Distributed LLM training on the GPUs and CPUs you already own.
#[derive(Parser)]
#[command(name = "swarm", version, about, propagate_version = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the coordinator in the foreground.
    Up(cli::up::UpArgs),
    /// Run the worker daemon: join a coordinator and train what it assigns.
    Worker(cli::worker::WorkerArgs),
    /// Submit a training job and follow it. Without a coordinator, starts a local one with
    /// --nodes local workers, and stops them at the end.
    Train(cli::train::TrainArgs),
    /// Plan a recipe on a cluster: pipeline stages, memory per device, predicted step time and
    /// tokens/s, before anything is downloaded.
    Plan(cli::plan::PlanArgs),
    /// Show the coordinator's jobs and workers.
    Status(cli::status::StatusArgs),
    /// Print the admin token (or, with --join, the join token) of the coordinator on this machine.
    Token(cli::token::TokenArgs),
    /// Mean next-token cross-entropy and perplexity of a model directory on a text file.
    Eval(cli::eval::EvalArgs),
    /// Check this machine: CPU, GPUs, CUDA libraries, a kernel launch, NCCL.
    Doctor(cli::doctor::DoctorArgs),
    /// Committed checkpoints, which live on the workers that wrote and copied them.
    Checkpoint {
        #[command(subcommand)]
        command: cli::checkpoint::CheckpointCommand,
    },
    /// Prepare datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text or JSONL files into a dataset directory (trains a BPE tokenizer unless --tokenizer).
    Prepare(cli::data::PrepareArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput (tokens/s) of a recipe on 1, 2, ... local workers.
    Train(cli::bench::BenchTrainArgs),
    /// Time, bandwidth and peak memory of the fused kernels on one device.
    Kernels(cli::bench_kernels::BenchKernelsArgs),
    /// This machine as a LAN of network namespaces (needs root): a dataset sent to the workers
    /// against line rate, and tokens/s against a baseline build.
    Lan(cli::bench_lan::BenchLanArgs),
}

pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("swarm")
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let quiet_default = matches!(
        args.command,
        Command::Train(_)
            | Command::Eval(_)
            | Command::Status(_)
            | Command::Token(_)
            | Command::Doctor(_)
            | Command::Plan(_)
            | Command::Data { .. }
            | Command::Checkpoint { .. }
            | Command::Bench { .. }
    );
    cli::init_tracing(if quiet_default { "warn" } else { "info" });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match args.command {
            Command::Up(a) => cli::up::run(a).await,
            Command::Worker(a) => cli::worker::run(a).await,
            Command::Train(a) => cli::train::run(a).await,
            Command::Status(a) => cli::status::run(a).await,
            Command::Token(a) => cli::token::run(a).await,
            Command::Plan(a) => cli::plan::run(a).await,
            Command::Eval(a) => cli::eval::run(a).await,
            Command::Doctor(a) => cli::doctor::run(a).await,
            Command::Data { command: DataCommand::Prepare(a) } => cli::data::run(a).await,
            Command::Checkpoint { command } => cli::checkpoint::run(command).await,
            Command::Bench { command: BenchCommand::Train(a) } => cli::bench::run(a).await,
            Command::Bench { command: BenchCommand::Kernels(a) } => cli::bench_kernels::run(a),
            Command::Bench { command: BenchCommand::Lan(a) } => cli::bench_lan::run(a).await,
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
