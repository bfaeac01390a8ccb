//! `swarm bench lan`: this machine as a small LAN (network namespaces, one bridge, every link
//! shaped to a rate with `tbf` both ways), with a coordinator, N workers and a submitting
//! client. Measures (1) sending a dataset of --bytes from the client to the workers, against
//! the links' line rate, and (2) tokens/s of a tiny model on that LAN, against a reference
//! build (--baseline, e.g. the plaintext build before authentication) in the same run.
//! Needs root, `ip`, `tc`.

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use swarm_worker::data::{DatasetInfo, INDEX_FILE, TOKENIZER_FILE, TOKENS_FILE};

#[derive(Args)]
pub struct BenchLanArgs {
    /// Workers on the LAN.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Size of the dataset sent to the workers.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub bytes: u64,
    /// Rate of every link (tc's notation).
    #[arg(long, default_value = "1gbit")]
    pub rate: String,
    /// Steps of the throughput run (the first 10 are not timed).
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// A reference `swarm` binary of the plaintext protocol (before authentication: `swarm
    /// up` without tokens, `swarm worker --coordinator`), run on the same LAN for the
    /// throughput comparison.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Network namespaces on one bridge; the processes in them. All removed on drop.
struct Lan {
    tag: String,
    subnet: String,
    hosts: Vec<String>,
    logs: PathBuf,
    procs: Vec<Child>,
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    let o = Command::new("sh").args(["-c", cmd]).output().context("running sh")?;
    if !o.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

impl Lan {
    fn new(hosts: usize, rate: &str, logs: PathBuf) -> anyhow::Result<Lan> {
        let id = std::process::id() % 10_000;
        let (tag, subnet) = (format!("sb{id}"), format!("10.214.{}", id % 250));
        let mut lan = Lan { tag: tag.clone(), subnet: subnet.clone(), hosts: Vec::new(), logs, procs: Vec::new() };
        sh(&format!("ip link add {tag}br type bridge && ip link set {tag}br up"))
            .context("creating the bridge (swarm bench lan needs root, ip and tc)")?;
        for i in 0..hosts {
            let (ns, veth, peer) = (format!("{tag}-h{i}"), format!("{tag}v{i}"), format!("{tag}v{i}b"));
            lan.hosts.push(ns.clone());
            let tbf = format!("tbf rate {rate} burst 256kb latency 50ms");
            sh(&format!(
                "ip netns add {ns} && ip link add {veth} type veth peer name {peer} && \
                 ip link set {veth} netns {ns} && ip link set {peer} master {tag}br && ip link set {peer} up && \
                 ip -n {ns} addr add {subnet}.{}/24 dev {veth} && ip -n {ns} link set {veth} up && \
                 ip -n {ns} link set lo up && tc -n {ns} qdisc add dev {veth} root {tbf} && \
                 tc qdisc add dev {peer} root {tbf}",
                i + 1
            ))?;
        }
        Ok(lan)
    }

    fn ip(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, host + 1)
    }

    fn command(&self, host: usize, bin: &Path, args: &[&str], dir: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host]])
            .arg(bin)
            .args(args)
            .current_dir(dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, host: usize, bin: &Path, args: &[&str], dir: &Path) -> anyhow::Result<Output> {
        Ok(self.command(host, bin, args, dir).output()?)
    }

    /// Starts a process; its stderr goes to `logs/NAME.log`.
    fn spawn(&mut self, host: usize, bin: &Path, args: &[&str], dir: &Path, name: &str) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        self.procs.push(self.command(host, bin, args, dir).stdout(Stdio::null()).stderr(log).spawn()?);
        Ok(())
    }

    fn stop_all(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.procs.clear();
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.stop_all();
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}br", self.tag)]).status();
    }
}

/// `src` (a prepared dataset) repeated into `out` until its tokens fill `bytes`.
fn big_dataset(src: &Path, out: &Path, bytes: u64) -> anyhow::Result<()> {
    use sha2::Digest;
    use std::io::Write;
    std::fs::create_dir_all(out)?;
    let tokens = std::fs::read(src.join(TOKENS_FILE))?;
    let mut info: DatasetInfo = serde_json::from_slice(&std::fs::read(src.join(INDEX_FILE))?)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out.join(TOKENS_FILE))?);
    let mut h = sha2::Sha256::new();
    let (mut written, mut starts) = (0u64, Vec::new());
    while written < bytes {
        let take = tokens.len().min((bytes - written) as usize) / 4 * 4;
        if take == 0 {
            break;
        }
        starts.push(written / 4);
        f.write_all(&tokens[..take])?;
        h.update(&tokens[..take]);
        written += take as u64;
    }
    f.flush()?;
    info.n_tokens = written / 4;
    info.tokens_sha256 = hex::encode(h.finalize());
    info.n_documents = starts.len() as u64;
    info.doc_starts = starts;
    std::fs::write(out.join(INDEX_FILE), serde_json::to_vec(&info)?)?;
    std::fs::copy(src.join(TOKENIZER_FILE), out.join(TOKENIZER_FILE))?;
    Ok(())
}

fn recipe(dir: &Path, name: &str, ds: &Path, steps: u64, new_fields: bool) -> anyhow::Result<PathBuf> {
    let extra = if new_fields { ", pull: none" } else { "" };
    let yaml = format!(
        "name: {name}\nmodel: {{ preset: tiny, hidden_size: 64, intermediate_size: 160, num_layers: 2, num_heads: 4, num_kv_heads: 2 }}\n\
         data: {{ dataset: {} }}\ntrain: {{ steps: {steps}, seq_len: 64, global_batch: 12, lr: 0.01, warmup_steps: 2 }}\n\
         checkpoint: {{ dir: {}, every: {steps}, keep: 1{extra} }}\n",
        ds.display(),
        dir.join(format!("ck-{name}")).display()
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, yaml)?;
    Ok(p)
}

/// The longest "fetched the dataset: N MB in S s" any worker logged.
fn slowest_fetch(logs: &Path, workers: usize) -> anyhow::Result<f64> {
    let mut worst: f64 = 0.0;
    for w in 0..workers {
        let text = std::fs::read_to_string(logs.join(format!("worker-{w}.log")))?;
        let line = text
            .lines()
            .rfind(|l| l.contains("fetched the dataset:"))
            .with_context(|| format!("worker {w} logged no fetch of the dataset"))?;
        let secs: f64 = line
            .split(" in ")
            .nth(1)
            .and_then(|s| s.split(" s").next())
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("worker {w}: {line}"))?;
        worst = worst.max(secs);
    }
    Ok(worst)
}

/// Tokens/s of a job, from the steps `swarm status` shows: timed from step `from` to the last.
fn timed_tokens_per_s(
    status: impl Fn() -> anyhow::Result<Value>,
    name: &str,
    from: u64,
    steps: u64,
    tokens: f64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(u64, Instant)> = None;
    loop {
        let s = status()?;
        let Some(job) = s["jobs"].as_array().and_then(|j| j.iter().find(|j| j["name"] == name)) else {
            if Instant::now() > deadline {
                bail!("no job {name} was submitted within 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let step = job["step"].as_u64().unwrap_or(0);
        let now = Instant::now();
        if first.is_none() && step >= from {
            first = Some((step, now));
        }
        if step >= steps || !matches!(job["state"].as_str(), Some("running" | "waiting")) {
            let (s0, t0) = first.context("the job ended before the timed steps")?;
            if step < steps {
                bail!("the job ended {}: {}", job["state"], job["error"]);
            }
            return Ok((step - s0) as f64 * tokens / now.duration_since(t0).as_secs_f64());
        }
        if now > deadline {
            bail!("the job did not finish within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn run(a: BenchLanArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(a)).await?
}

/// The LAN and where everything of one benchmark lives.
struct Bench {
    lan: Lan,
    me: PathBuf,
    dirs: Vec<PathBuf>,
    logs: PathBuf,
    coord: usize,
    client: usize,
    workers: usize,
    /// host:port of the coordinator.
    caddr: String,
}

/// Tokens of one step of the benchmark's recipe (global batch 12 x seq_len 64).
const STEP_TOKENS: f64 = (12 * 64) as f64;

impl Bench {
    fn cdir(&self) -> &Path {
        &self.dirs[self.client]
    }

    /// `swarm status --json` from the client's namespace, with `bin`.
    fn status(&self, bin: &Path, admin: Option<&str>) -> anyhow::Result<Value> {
        let mut args = vec!["status", "--coordinator", &self.caddr, "--json"];
        if let Some(t) = admin {
            args.extend(["--token", t]);
        }
        let o = self.lan.run(self.client, bin, &args, self.cdir())?;
        serde_json::from_slice(&o.stdout).with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())
    }

    fn wait_for_workers(&self, bin: &Path, admin: Option<&str>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let joined = || self.status(bin, admin).map(|s| s["workers"].as_array().map_or(0, |w| w.len())).unwrap_or(0);
        while joined() < self.workers {
            if Instant::now() > deadline {
                bail!("{} workers did not join; see {}", self.workers, self.logs.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// This build's coordinator and workers; the admin token.
    fn start_this_build(&mut self) -> anyhow::Result<String> {
        let me = self.me.clone();
        self.lan.spawn(
            self.coord,
            &me,
            &["up", "--data-dir", "state", "--no-mdns"],
            &self.dirs[self.coord],
            "coordinator",
        )?;
        let identity = self.dirs[self.coord].join("state/identity");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !identity.join("admin.token").is_file() {
            if Instant::now() > deadline {
                bail!("the coordinator did not start; see {}", self.logs.join("coordinator.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let join = std::fs::read_to_string(identity.join("join.token"))?.trim().to_string();
        let admin = std::fs::read_to_string(identity.join("admin.token"))?.trim().to_string();
        for w in 0..self.workers {
            let args = ["worker", "--join", &join, "--name", &format!("w{w}"), "--state-dir", "state"];
            self.lan.spawn(w + 1, &me, &args, &self.dirs[w + 1], &format!("worker-{w}"))?;
        }
        self.wait_for_workers(&me, Some(&admin))?;
        Ok(admin)
    }

    /// The baseline's coordinator and workers (plaintext: no tokens).
    fn start_baseline(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.lan.spawn(
            self.coord,
            bin,
            &["up", "--data-dir", "old-state"],
            &self.dirs[self.coord],
            "old-coordinator",
        )?;
        std::thread::sleep(Duration::from_secs(1));
        for w in 0..self.workers {
            let args = ["worker", "--coordinator", &self.caddr, "--name", &format!("w{w}")];
            self.lan.spawn(w + 1, bin, &args, &self.dirs[w + 1], &format!("old-worker-{w}"))?;
        }
        self.wait_for_workers(bin, None)
    }

    /// Runs a 2-step job on `dataset`: the slowest worker's fetch time, and the job's wall time.
    fn transfer(&self, admin: &str, dataset: &Path) -> anyhow::Result<(f64, f64)> {
        let r = recipe(self.cdir(), "transfer", dataset, 2, true)?;
        let rs = r.to_str().context("a recipe path that is not UTF-8")?;
        let nodes = self.workers.to_string();
        let t0 = Instant::now();
        let args = ["train", "--token", admin, "--nodes", &nodes, "--json", "--recipe", rs];
        let o = self.lan.run(self.client, &self.me, &args, self.cdir())?;
        if !o.status.success() {
            bail!("the transfer job failed: {}; logs in {}", String::from_utf8_lossy(&o.stderr), self.logs.display());
        }
        let wall = t0.elapsed().as_secs_f64();
        Ok((slowest_fetch(&self.logs, self.workers)?, wall))
    }

    /// Tokens/s of `steps` steps of the tiny model on `dataset` with `bin` (this build when
    /// `admin` is given, else the baseline).
    fn throughput(&self, bin: &Path, admin: Option<&str>, dataset: &Path, steps: u64) -> anyhow::Result<f64> {
        let name = if admin.is_some() { "throughput" } else { "old-throughput" };
        let r = recipe(self.cdir(), name, dataset, steps, admin.is_some())?;
        let nodes = self.workers.to_string();
        let mut args = vec!["train", "--coordinator", &self.caddr, "--nodes", &nodes];
        if let Some(t) = admin {
            args.extend(["--token", t]);
        }
        let mut cmd = self.lan.command(self.client, bin, &args, self.cdir());
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let mut child = cmd.arg("--recipe").arg(&r).stdout(Stdio::null()).stderr(log).spawn()?;
        let t = timed_tokens_per_s(|| self.status(bin, admin), name, 10, steps, STEP_TOKENS);
        let _ = child.wait();
        t
    }
}

fn run_blocking(a: BenchLanArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let root = std::env::temp_dir().join(format!("swarm-bench-lan-{}", std::process::id()));
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    let dirs: Vec<PathBuf> = (0..a.workers + 2).map(|h| root.join(format!("h{h}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let lan = Lan::new(a.workers + 2, &a.rate, logs.clone())?;
    let caddr = format!("{}:7450", lan.ip(0));
    let mut b = Bench { lan, me, dirs, logs, coord: 0, client: a.workers + 1, workers: a.workers, caddr };

    eprintln!("preparing a small dataset, and one of {} MB from it", a.bytes / 1_000_000);
    let small = b.cdir().join("small");
    prepare_small(&b.me, &small)?;
    let big = b.cdir().join("big");
    big_dataset(&small, &big, a.bytes)?;
    let bytes = std::fs::metadata(big.join(TOKENS_FILE))?.len();

    let admin = b.start_this_build()?;
    eprintln!("sending {} MB to {} workers over {} links", bytes / 1_000_000, a.workers, a.rate);
    let (fetch_s, job_s) = b.transfer(&admin, &big)?;
    let line_s = bytes as f64 * 8.0 / parse_rate(&a.rate)?;
    eprintln!("training the tiny model ({} steps) on this build", a.steps);
    let me = b.me.clone();
    let ours = b.throughput(&me, Some(&admin), &small, a.steps)?;
    b.lan.stop_all();
    let theirs = match &a.baseline {
        None => None,
        Some(bin) => {
            eprintln!("training the tiny model on the baseline {}", bin.display());
            b.start_baseline(bin)?;
            Some(b.throughput(bin, None, &small, a.steps)?)
        }
    };
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
    let m = Measured { bytes, fetch_s, line_s, job_s, ours, theirs };
    if a.json {
        println!("{}", m.json(&a));
    } else {
        m.table(&a);
    }
    Ok(())
}

fn prepare_small(me: &Path, out: &Path) -> anyhow::Result<()> {
    let stdlib = swarm_worker::data::corpus::find_python_stdlib()?;
    let o = Command::new(me)
        .args(["data", "prepare", "--vocab-size", "512", "--max-bytes", "4000000", "--json", "--out"])
        .arg(out)
        .arg("--input")
        .arg(&stdlib)
        .output()?;
    if !o.status.success() {
        bail!("swarm data prepare: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

struct Measured {
    bytes: u64,
    fetch_s: f64,
    line_s: f64,
    job_s: f64,
    ours: f64,
    theirs: Option<f64>,
}

impl Measured {
    fn json(&self, a: &BenchLanArgs) -> Value {
        serde_json::json!({
            "workers": a.workers, "rate": a.rate, "bytes": self.bytes,
            "fetch_s": self.fetch_s, "line_rate_s": self.line_s, "fraction_of_line_rate": self.line_s / self.fetch_s,
            "transfer_job_s": self.job_s, "tokens_per_s": self.ours, "baseline_tokens_per_s": self.theirs,
        })
    }

    fn table(&self, a: &BenchLanArgs) {
        let mb = self.bytes as f64 / 1e6;
        println!("| measurement | this build | reference | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| {mb:.0} MB dataset to {} workers over {} links (slowest worker's fetch) | {:.1} s ({:.0} MB/s) | line rate {:.1} s | {:.2} of line rate |",
            a.workers,
            a.rate,
            self.fetch_s,
            mb / self.fetch_s,
            self.line_s,
            self.line_s / self.fetch_s
        );
        println!("| the whole 2-step job of that dataset, submit to end | {:.1} s | | |", self.job_s);
        match self.theirs {
            Some(t) => println!(
                "| tiny model, {} workers, tokens/s (steps 10..{}) | {:.0} (TLS, tokens, data-plane challenge) | {t:.0} (baseline: plaintext) | {:.2} |",
                a.workers,
                a.steps,
                self.ours,
                self.ours / t
            ),
            None => println!("| tiny model, {} workers, tokens/s | {:.0} | (no --baseline) | |", a.workers, self.ours),
        }
    }
}

/// tc's rate notation (`1gbit`, `100mbit`) in bits per second.
fn parse_rate(r: &str) -> anyhow::Result<f64> {
    let r = r.to_ascii_lowercase();
    let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(u, m)| r.strip_suffix(u).map(|n| (n.to_string(), *m)))
        .with_context(|| format!("--rate {r}: use e.g. 1gbit or 100mbit"))?;
    Ok(num.parse::<f64>().with_context(|| format!("--rate {r}"))? * mult)
}
