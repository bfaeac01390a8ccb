//! The embedded default: a coordinator and N workers started as child processes of this
//! command, stopped when it ends (and exiting on their own if it is killed).

use anyhow::{Context, bail};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct LocalCluster {
    /// The local coordinator's admin token.
    pub admin: swarm_proto::trust::Token,
    pub log_dir: PathBuf,
    coordinator: Child,
    workers: Vec<Child>,
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<File> {
    let p = dir.join(name);
    File::create(&p).with_context(|| format!("creating log {}", p.display()))
}

impl LocalCluster {
    /// Starts a coordinator on a free loopback port with its state in `state_dir`, and `nodes`
    /// workers, each with its own state directory under `workers_dir` (kept, so a resumed run
    /// finds their checkpoints); their logs go to `log_dir`.
    pub fn start(nodes: usize, state_dir: &Path, workers_dir: &Path, log_dir: &Path) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let exe = std::env::current_exe().context("locating the swarm executable")?;
        let me = std::process::id().to_string();
        let mut coordinator = Command::new(&exe)
            .args(["up", "--listen", "127.0.0.1:0", "--exit-with-parent", &me, "--data-dir"])
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(log_dir, "coordinator.log")?)
            .spawn()
            .context("starting the local coordinator")?;
        let stdout = coordinator.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {} // drain, so the coordinator never blocks on a full pipe
        });
        let first = rx.recv_timeout(Duration::from_secs(30)).ok().and_then(|l| l.and_then(Result::ok));
        let Some(addr) = first
            .as_deref()
            .and_then(|l| l.strip_prefix("swarm coordinator listening on "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
        else {
            let _ = coordinator.kill();
            bail!("the local coordinator did not start; see {}", log_dir.join("coordinator.log").display());
        };
        // The tokens are written before that line is printed.
        use swarm_coordinator::identity::{ClusterIdentity, read_token};
        use swarm_proto::trust::TokenKind;
        let ids = state_dir.join(ClusterIdentity::DIR);
        let admin = read_token(&ids.join(ClusterIdentity::ADMIN_TOKEN), TokenKind::Admin)?;
        let join = read_token(&ids.join(ClusterIdentity::JOIN_TOKEN), TokenKind::Join)?.encode();
        let mut cluster = LocalCluster { admin, log_dir: log_dir.to_path_buf(), coordinator, workers: Vec::new() };
        // Local workers share this machine's cores: each gets its share for candle's thread pool,
        // unless the user chose a number.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| (cores / nodes).max(1).to_string());
        for i in 0..nodes {
            let name = format!("local-{i}");
            let child = Command::new(&exe)
                .env("RAYON_NUM_THREADS", &threads)
                .env("SWARM_JOIN_TOKEN", &join)
                .args([
                    "worker",
                    "--coordinator",
                    &addr,
                    "--name",
                    &name,
                    "--data-listen",
                    "127.0.0.1:0",
                    "--advertise-host",
                    "127.0.0.1",
                    "--exit-with-parent",
                    &me,
                    "--state-dir",
                ])
                .arg(workers_dir.join(&name))
                .args(
                    swarm_worker::device::local_worker_device(i)
                        .map(|d| ["--device".to_string(), d])
                        .into_iter()
                        .flatten(),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(log_dir, &format!("worker-{i}.log"))?)
                .spawn()
                .with_context(|| format!("starting local worker {i}"))?;
            cluster.workers.push(child);
        }
        Ok(cluster)
    }

    /// An error naming the first child that has exited, with its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.coordinator.try_wait()? {
            bail!("the local coordinator exited ({status}); see {}", self.log_dir.join("coordinator.log").display());
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(status) = w.try_wait()? {
                bail!(
                    "local worker {i} exited ({status}); see {}",
                    self.log_dir.join(format!("worker-{i}.log")).display()
                );
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
        }
        for w in &mut self.workers {
            let _ = w.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
