//! `swarm train`: submit a recipe and follow the job with a progress bar.

use super::local::LocalCluster;
use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use swarm_proto::trust::{Client, Token};
use swarm_proto::v1 as pb;
use swarm_sharding::Recipe;

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe (YAML) to train.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Workers to train on.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Continue from the recipe's last committed checkpoint (the coordinator's record: its files
    /// are on the workers).
    #[arg(long)]
    pub resume: bool,
    /// Continue from this committed checkpoint on this machine instead (a step directory, as
    /// `swarm checkpoint pull` or checkpoint.dir hold them); the workers fetch it from here.
    #[arg(long, conflicts_with_all = ["resume", "overwrite"])]
    pub resume_from: Option<PathBuf>,
    /// The coordinator's admin token (`swarm token` on its machine prints it). Without it, the
    /// token of a coordinator on this machine is used, and when none answers, a local
    /// coordinator and --nodes local workers are started.
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// host:port of the coordinator, instead of the addresses the token lists.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// How long to wait for --nodes idle workers before giving up (e.g. 90s, 10m, 1h).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub wait: Duration,
    /// Always start a local coordinator and workers, even if one answers at the default address.
    #[arg(long)]
    pub local: bool,
    /// Start from scratch even though checkpoint.dir holds committed checkpoints (they are deleted).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Print the final job status as JSON (with the loss of every step) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// `90s`, `10m`, `1h` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(s.trim().len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration such as 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// "3 of 4 workers connected: pc-a, pc-b, laptop", from the coordinator's worker list: the idle
/// workers the job could start on (named ones only, for a placement by name), and those busy.
fn waiting_message(s: &pb::ClusterStatus, nodes: usize, named: Option<&[String]>) -> String {
    let wanted = |w: &&pb::WorkerStatus| named.is_none_or(|n| n.contains(&w.name));
    let idle: Vec<&str> =
        s.workers.iter().filter(|w| w.state == "idle").filter(wanted).map(|w| w.name.as_str()).collect();
    let busy: Vec<&str> =
        s.workers.iter().filter(|w| w.state == "busy").filter(wanted).map(|w| w.name.as_str()).collect();
    let mut m = format!("{} of {nodes} workers connected", idle.len());
    if !idle.is_empty() {
        m.push_str(&format!(": {}", idle.join(", ")));
    }
    if !busy.is_empty() {
        m.push_str(&format!(" (busy with another job: {})", busy.join(", ")));
    }
    m
}

/// Where a job is submitted, how long it may wait for its workers, and whether it may forget
/// committed checkpoints of the same recipe name (`--overwrite`).
pub struct Target<'a> {
    pub token: &'a Token,
    pub wait: Duration,
    pub overwrite: bool,
    /// A checkpoint directory on this machine to continue from (`--resume-from`).
    pub resume_from: Option<&'a std::path::Path>,
}

/// The job's progress bar (hidden when not on a terminal), waiting for its workers.
fn progress_bar(tty: bool, recipe: &Recipe, job: u64, nodes: usize) -> ProgressBar {
    let pb = if tty { ProgressBar::new(recipe.train.steps) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps | {msg} | ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(format!("job-{job}"));
    pb.set_message(match &recipe.parallel.workers {
        Some(names) => format!("waiting for workers {} to be idle", names.join(", ")),
        None => format!("waiting for {nodes} worker(s)"),
    });
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Serves the recipe's dataset and model (and `--resume-from`'s checkpoint) to the workers: on
/// loopback for a local cluster, else on every interface, reachable at the address this machine
/// uses towards the coordinator.
fn serve_inputs(
    target: &Target<'_>,
    recipe: &Recipe,
    secret: swarm_proto::trust::Secret,
    local: bool,
) -> anyhow::Result<super::content::Serving> {
    let (listen, advertise) = if local {
        ("127.0.0.1".to_string(), "127.0.0.1".to_string())
    } else {
        let towards = target.token.addrs.iter().find_map(|a| swarm_worker::daemon::local_ip_towards(a));
        ("0.0.0.0".to_string(), towards.unwrap_or_else(|| "127.0.0.1".into()))
    };
    super::content::serve(recipe, secret, &listen, &advertise, target.resume_from)
}

/// Copies the committed checkpoint of `step` into the recipe's `checkpoint.dir`.
async fn pull_here(
    client: &mut Client,
    secret: swarm_proto::trust::Secret,
    recipe: &Recipe,
    step: u64,
) -> anyhow::Result<PathBuf> {
    let root = &recipe.checkpoint.dir;
    super::content::pull_step(client, secret, &recipe.name, swarm_sharding::Step(step), root).await.with_context(|| {
        format!(
            "could not copy the checkpoint of step {step} to {}; it stays on the workers (`swarm checkpoint pull` fetches it later)",
            root.display()
        )
    })
}

/// The committed checkpoint to copy to this machine now, if any (`checkpoint.pull`).
fn due_pull(recipe: &Recipe, s: &pb::JobStatus, pulled: u64) -> Option<u64> {
    use swarm_sharding::recipe::PullPolicy;
    let step = s.last_checkpoint_step;
    let new = step > pulled && step > s.start_step;
    match recipe.checkpoint.pull {
        PullPolicy::All => new.then_some(step),
        PullPolicy::Last => (new && s.state == "succeeded" && step == s.total_steps).then_some(step),
        PullPolicy::None => None,
    }
}

/// Submits and follows a job to its end. `on_status` sees every status the coordinator sends.
pub async fn submit_and_follow(
    target: Target<'_>,
    recipe: &Recipe,
    nodes: usize,
    resume: bool,
    show: bool,
    mut local: Option<&mut LocalCluster>,
    mut on_status: impl FnMut(&pb::JobStatus),
) -> anyhow::Result<pb::JobStatus> {
    let mut client: Client = super::auth::admin_client(target.token).await?;
    let secret = super::content::fetch_secret(&mut client).await?;
    let serving = serve_inputs(&target, recipe, secret, local.is_some())?;
    let job = client
        .submit_job(pb::SubmitJobRequest {
            recipe_json: serde_json::to_string(recipe)?,
            nodes: nodes as u32,
            resume,
            inputs: Some(swarm_worker::proto_conv::inputs_to_proto(&serving.inputs)),
            overwrite: target.overwrite,
            resume_from_json: match &serving.resume_from {
                Some(m) => serde_json::to_string(m)?,
                None => String::new(),
            },
        })
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused the job: {}", s.message()))?
        .into_inner()
        .job_id;
    let mut stream = client.watch_job(pb::JobRequest { job_id: job }).await?.into_inner();
    let tty = show && std::io::stderr().is_terminal();
    let pb = progress_bar(tty, recipe, job, nodes);
    let mut last_printed = 0u64;
    let mut started = false;
    let mut last = None;
    let mut waiting_said = String::new();
    let mut pulled = 0u64;
    let mut last_printed_mb = 0u64;
    let mut pulled_dir = None;
    let give_up_at = std::time::Instant::now() + target.wait;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let status = loop {
        let msg = tokio::select! {
            m = stream.message() => m.context("following the job")?,
            _ = tick.tick() => {
                if let Some(l) = local.as_deref_mut() { l.check_alive()?; }
                if !started {
                    let s = client.status(pb::ListJobsRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
                    // Started already (its first event is on the way): its workers are busy with it.
                    if s.jobs.iter().any(|j| j.job_id == job && j.state != "waiting") { continue; }
                    let m = waiting_message(&s, nodes, recipe.parallel.workers.as_deref());
                    if std::time::Instant::now() >= give_up_at {
                        pb.abandon();
                        let reason = format!("gave up after waiting {:?} for workers (--wait)", target.wait);
                        let _ = client.cancel_job(pb::CancelJobRequest { job_id: job, reason }).await;
                        bail!("job-{job} did not start within --wait {:?}: {m}; start more workers (`swarm worker --join TOKEN`) or lower --nodes", target.wait);
                    }
                    if m != waiting_said {
                        if show && !tty { eprintln!("job-{job} waiting: {m}"); }
                        pb.set_message(m.clone());
                        waiting_said = m;
                    }
                }
                continue;
            }
            () = super::shutdown_signal() => {
                pb.abandon();
                let _ = client.cancel_job(pb::CancelJobRequest { job_id: job, reason: "interrupted by the user (Ctrl-C)".into() }).await;
                bail!("interrupted; job-{job} cancelled (its last committed checkpoint is kept: continue with --resume)");
            }
        };
        let Some(ev) = msg else {
            let s: pb::JobStatus = last.context("the coordinator ended the job stream before any status")?;
            if s.state == "waiting" || s.state == "running" {
                pb.abandon();
                bail!(
                    "the coordinator closed job-{job}'s stream while it was {} (did it stop?); continue with --resume",
                    s.state
                );
            }
            break s;
        };
        let Some(s) = ev.status else { continue };
        on_status(&s);
        if let Some(step) = due_pull(recipe, &s, pulled) {
            pb.set_message(format!("copying the checkpoint of step {step} to {}", recipe.checkpoint.dir.display()));
            match pull_here(&mut client, secret, recipe, step).await {
                Ok(dir) => pulled_dir = Some(dir),
                Err(e) => pb.suspend(|| eprintln!("job-{job}: {e:#}")),
            }
            pulled = step;
        }
        if show && !tty && s.state == "running" && s.step == s.start_step && serving.bytes_sent() > 0 {
            let sent = serving.bytes_sent() / 1_000_000;
            if sent / 100 != last_printed_mb / 100 {
                eprintln!("job-{job}: sent {sent} MB of the dataset and model to the workers");
                last_printed_mb = sent;
            }
        }
        if s.state == "running" && !started {
            started = true;
            pb.set_position(s.start_step);
            pb.reset_eta();
        }
        if s.step > 0 {
            pb.set_position(s.step);
            let loss = if s.loss.is_finite() { format!("loss {:.4}", s.loss) } else { "loss -".into() };
            pb.set_message(format!("{loss} | {:.0} tok/s", s.tokens_per_s));
            if show && !tty && (s.step >= last_printed + 10 || s.step == s.total_steps) && s.step != last_printed {
                eprintln!("job-{job} step {}/{} {loss} {:.0} tok/s", s.step, s.total_steps, s.tokens_per_s);
                last_printed = s.step;
            }
        }
        let done = s.state != "waiting" && s.state != "running";
        last = Some(s);
        if done {
            break last.expect("just set");
        }
    };
    pb.finish_and_clear();
    let mut status = status;
    if let Some(d) = pulled_dir
        && pulled == status.last_checkpoint_step
    {
        status.last_checkpoint_dir = d.display().to_string();
    }
    Ok(status)
}

/// A fresh run never writes over committed checkpoints unless asked to.
fn guard_existing_checkpoints(recipe: &Recipe, a: &TrainArgs) -> anyhow::Result<()> {
    use swarm_coordinator::checkpoint::{latest_committed, prune};
    let dir = &recipe.checkpoint.dir;
    if a.resume || a.resume_from.is_some() {
        return Ok(());
    }
    let Some(latest) = latest_committed(dir)? else { return Ok(()) };
    if !a.overwrite {
        bail!(
            "checkpoint.dir {} already holds committed checkpoints (latest: {}); pass --resume to continue from it, --overwrite to delete them and start again, or set another checkpoint.dir",
            dir.display(),
            latest.dir
        );
    }
    while let Some(p) = latest_committed(dir)? {
        prune(std::path::Path::new(&p.dir))?;
    }
    Ok(())
}

/// The admin token of a coordinator that answers, or `None` to train on a local cluster: with
/// `--local`, or when only this machine's own token was found and nothing answers at it. A
/// token or address the user gave that does not answer is an error, as is `--coordinator`
/// without any admin token.
async fn find_coordinator(a: &TrainArgs) -> anyhow::Result<Option<Token>> {
    if a.local {
        return Ok(None);
    }
    let Some((token, explicit)) = super::auth::admin_token(a.token.as_deref(), a.coordinator.as_deref())? else {
        if a.coordinator.is_some() {
            super::auth::require_admin_token(None, None)?;
        }
        return Ok(None);
    };
    match super::auth::admin_client(&token).await {
        Ok(_) => Ok(Some(token)),
        Err(e) if explicit || a.coordinator.is_some() => Err(e.context(
            "start the coordinator with `swarm up`, or leave out --token/--coordinator to train on this machine",
        )),
        Err(_) => Ok(None),
    }
}

pub async fn run(a: TrainArgs) -> anyhow::Result<()> {
    let mut recipe = super::recipe::load(&a.recipe)?;
    recipe.check_supported_by_executor().map_err(|e| anyhow::anyhow!("recipe {}: {e}", a.recipe.display()))?;
    if a.nodes == 0 {
        bail!("--nodes must be at least 1, got 0");
    }
    recipe.batch_shares(a.nodes).map_err(|e| anyhow::anyhow!("recipe {}: {e}", a.recipe.display()))?;
    let show = !a.json;
    guard_existing_checkpoints(&recipe, &a)?;
    super::recipe::ensure_dataset(&recipe, &a.recipe, show)?;
    super::recipe::resolve(&mut recipe, &a.recipe)?;

    let mut local = None;
    let token = find_coordinator(&a).await?;
    let token = if let Some(t) = token {
        t
    } else {
        let state = recipe.checkpoint.dir.join("coordinator");
        let workers = recipe.checkpoint.dir.join("workers");
        let logs = recipe.checkpoint.dir.join("logs");
        if show {
            eprintln!(
                "no coordinator answers: starting a local one with {} worker(s) (logs in {})",
                a.nodes,
                logs.display()
            );
        }
        let cluster = LocalCluster::start(a.nodes, &state, &workers, &logs)?;
        let token = cluster.admin.clone();
        local = Some(cluster);
        token
    };
    let target = Target { token: &token, wait: a.wait, overwrite: a.overwrite, resume_from: a.resume_from.as_deref() };
    let result = submit_and_follow(target, &recipe, a.nodes, a.resume, show, local.as_mut(), |_| {}).await;
    if let Some(mut l) = local {
        l.stop();
    }
    let s = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&super::status::job_json(&s))?);
    }
    match s.state.as_str() {
        "succeeded" => {
            if show {
                eprintln!(
                    "job-{} succeeded: steps {}..{}, loss {:.4} -> {:.4}, {:.0} tok/s; checkpoint {}",
                    s.job_id, s.start_step, s.step, s.first_loss, s.loss, s.tokens_per_s, s.last_checkpoint_dir
                );
            }
            Ok(())
        }
        state => bail!("job-{} {state}: {}", s.job_id, if s.error.is_empty() { "no reason given" } else { &s.error }),
    }
}
