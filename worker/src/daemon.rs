//! The worker daemon: registers with the coordinator, keeps its lease with heartbeats, takes
//! assignments from a server stream and trains them on a blocking thread while an async task
//! carries its reports. If the coordinator goes away it registers again when it is back.

use crate::comm::dataplane::DataPlane;
use crate::comm::fetch::{Fetcher, FileServer, Source, Want, state_dir_resolver};
use crate::comm::ring::Aborter;
use crate::content;
use crate::proto_conv;
use crate::train::{self, Report, TrainContext};
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use swarm_proto::trust::{self, Secret, Token};
use swarm_proto::v1 as pb;
use swarm_sharding::{Assignment, JobId, WorkerId};
use tokio::sync::{Mutex, mpsc};
use tracing::{Instrument, error, info, info_span, warn};

/// Reports buffered between the training thread and the coordinator.
const REPORT_QUEUE: usize = 64;

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The join token `swarm up` printed: where the coordinator is, its pinned CA, the secret.
    pub join: Token,
    pub name: String,
    /// Where the data-plane listener binds (peers connect here).
    pub data_listen: String,
    /// The host peers should dial; by default the address this machine uses to reach the coordinator.
    pub advertise_host: Option<String>,
    /// The device to train on: `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The only directory this worker reads and writes (`content::`).
    pub state_dir: std::path::PathBuf,
}

type Client = swarm_proto::trust::Client;

/// The local address this machine uses to reach `coordinator` (no packet is sent).
pub fn local_ip_towards(coordinator: &str) -> Option<String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(coordinator).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

struct Running {
    job: JobId,
    cancel: Arc<AtomicBool>,
    aborter: Aborter,
}

/// Connects with the join token and registers; returns the client that presents this
/// worker's own credential from now on, and its registration.
async fn join(
    opts: &WorkerOptions,
    devices: &[swarm_sharding::DeviceInfo],
    data_addr: &str,
) -> anyhow::Result<(Client, pb::RegisterWorkerResponse, Secret)> {
    let (channel, _) = swarm_proto::discovery::connect(&opts.join.addrs, opts.join.pin).await?;
    let reg = trust::client(channel.clone(), &opts.join.secret)
        .register_worker(pb::RegisterWorkerRequest {
            name: opts.name.clone(),
            devices: devices.iter().map(proto_conv::device_to_proto).collect(),
            data_addr: data_addr.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("the coordinator refused to register this worker: {}", e.message()))?
        .into_inner();
    let credential = Secret::from_hex(&reg.credential)
        .context("the coordinator's registration carried no credential (an older coordinator?)")?;
    let fetch = <[u8; 32]>::try_from(reg.fetch_secret.as_slice()).map(Secret).map_err(|_| {
        anyhow::anyhow!("the coordinator's registration carried no fetch secret (an older coordinator?)")
    })?;
    Ok((trust::client(channel, &credential), reg, fetch))
}

pub async fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    // A bad --device fails now, not when the first job arrives.
    let device = crate::device::select(&opts.device)?;
    info!(device = ?device, "training device");
    let dp = Arc::new(DataPlane::bind(&opts.data_listen)?);
    let port = dp.local_addr().port();
    let host = match &opts.advertise_host {
        Some(h) => h.clone(),
        None => opts.join.addrs.iter().find_map(|a| local_ip_towards(a)).unwrap_or_else(|| "127.0.0.1".into()),
    };
    let data_addr = format!("{host}:{port}");
    let devices = tokio::task::spawn_blocking(crate::device::detect).await?;
    for d in &devices {
        info!(kind = d.kind.as_str(), name = %d.name, tflops = d.measured_tflops, memory_gib = d.memory_bytes as f64 / (1u64 << 30) as f64, "device");
    }
    let running: Arc<Mutex<Option<Running>>> = Arc::default();
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating the state directory {}", opts.state_dir.display()))?;
    let state_dir = std::path::absolute(&opts.state_dir)?;
    let _lock = lock_state_dir(&state_dir)?;
    info!(state_dir = %state_dir.display(), "state directory");
    let mut last_error = String::new();
    loop {
        let (client, reg, fetch) = match join(&opts, &devices, &data_addr).await {
            Ok(r) => r,
            Err(e) => {
                // Said once per distinct reason, not every 2 s.
                let e = format!("{e:#}");
                if e != last_error {
                    warn!("{e}; retrying every 2 s");
                    last_error = e;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        last_error.clear();
        let worker = WorkerId(reg.worker_id);
        info!(%worker, coordinator = ?opts.join.addrs, %data_addr, "registered");
        // Peers of this cluster may fetch what this worker holds (content, checkpoints).
        dp.serve_files(Arc::new(FileServer::new(fetch, state_dir_resolver(state_dir.clone()))));
        let env = JobEnv {
            dp: dp.clone(),
            device: opts.device.clone(),
            state_dir: state_dir.clone(),
            fetcher: Fetcher::new(fetch),
            data_addr: data_addr.clone(),
        };
        let session = serve(client, worker, reg.heartbeat_interval_ms, env, running.clone());
        if let Err(e) = session.instrument(info_span!("worker", %worker)).await {
            warn!("lost the coordinator: {e:#}; registering again");
        }
        if let Some(r) = running.lock().await.as_ref() {
            warn!(job = %r.job, "stopping the running job: its coordinator session ended");
            r.cancel.store(true, Ordering::Relaxed);
            r.aborter.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What every job of one registration runs with.
#[derive(Clone)]
struct JobEnv {
    dp: Arc<DataPlane>,
    device: String,
    state_dir: std::path::PathBuf,
    fetcher: Fetcher,
    /// This worker's own data-plane address (left out of the sources it fetches from).
    data_addr: String,
}

/// One registration's life: heartbeats plus the assignment stream; returns when either ends.
async fn serve(
    client: Client,
    worker: WorkerId,
    heartbeat_ms: u64,
    env: JobEnv,
    running: Arc<Mutex<Option<Running>>>,
) -> anyhow::Result<()> {
    let mut hb_client = client.clone();
    let heartbeats = async move {
        let mut every = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(100)));
        loop {
            every.tick().await;
            let r = hb_client.heartbeat(pb::HeartbeatRequest { worker_id: worker.0 }).await?.into_inner();
            if !r.known {
                anyhow::bail!("the coordinator no longer knows {worker}");
            }
        }
    };
    let mut stream_client = client.clone();
    let assignments = async move {
        let mut stream =
            stream_client.watch_assignments(pb::WatchAssignmentsRequest { worker_id: worker.0 }).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(pb::assignment::Kind::Train(t)) => {
                    let (job, attempt) = (JobId(t.job_id), t.attempt);
                    let secret = <[u8; 32]>::try_from(t.job_secret.as_slice()).map(Secret);
                    match proto_conv::assignment_from_proto(t).and_then(|a| {
                        secret
                            .map(|s| (a, s))
                            .map_err(|_| anyhow::anyhow!("the assignment's job_secret is not 32 bytes"))
                    }) {
                        Ok((a, secret)) => {
                            let job = JobToRun { a, secret };
                            start_job(client.clone(), worker, job, env.clone(), running.clone()).await
                        }
                        Err(e) => {
                            let rank = (worker, 0, attempt);
                            report_result(&mut client.clone(), job, rank, Err(format!("{e:#}")), 0).await
                        }
                    }
                }
                Some(pb::assignment::Kind::Replicate(r)) => {
                    tokio::spawn(replicate(client.clone(), worker, r, env.clone()));
                }
                Some(pb::assignment::Kind::Cancel(c)) => {
                    if let Some(r) = running.lock().await.as_ref()
                        && r.job.0 == c.job_id
                    {
                        info!(job = %r.job, reason = %c.reason, "job cancelled");
                        r.cancel.store(true, Ordering::Relaxed);
                        r.aborter.abort();
                    }
                }
                None => {}
            }
        }
        anyhow::bail!("the coordinator closed the assignment stream")
    };
    tokio::select! {
        r = heartbeats => r,
        r = assignments => r,
    }
}

/// Sends a rank's reports to the coordinator in order, on a task of its own. The first report
/// that did not reach the coordinator, or that it refused, stops training (`stop`: the cancel
/// flag and the aborter) and becomes the job's error, so a lost report never passes as
/// success. The task returns the last step reported.
fn spawn_reporter(
    mut client: Client,
    a: Assignment,
    worker: WorkerId,
    mut rx: mpsc::Receiver<Report>,
    stop: (Arc<AtomicBool>, Aborter),
) -> (tokio::task::JoinHandle<u64>, Arc<std::sync::Mutex<Option<String>>>) {
    let report_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let first_error = report_error.clone();
    let task = tokio::spawn(async move {
        let mut last = 0;
        while let Some(r) = rx.recv().await {
            if let Report::Step(s) = &r {
                last = s.step.0;
            }
            if let Some(f) = send_report(&mut client, &a, worker, r).await {
                warn!("{f}");
                first_error.lock().expect("report error lock").get_or_insert(f);
                stop.0.store(true, Ordering::Relaxed);
                stop.1.abort();
            }
        }
        last
    });
    (task, report_error)
}

/// Sends one report; why it failed or was refused, if it was.
async fn send_report(client: &mut Client, a: &Assignment, worker: WorkerId, r: Report) -> Option<String> {
    match r {
        Report::Step(s) => match client.report_step(proto_conv::step_to_proto(a, worker, &s)).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                resp.cancel.then(|| format!("the coordinator stopped this rank at {}: {}", s.step, resp.reason))
            }
            Err(e) => Some(format!("reporting {} to the coordinator failed: {}", s.step, e.message())),
        },
        Report::Checkpoint(c) => {
            let step = c.step;
            let req = proto_conv::checkpoint_to_proto(a, worker, c);
            match client.report_checkpoint(req).await {
                Ok(resp) if resp.get_ref().accepted => None,
                Ok(_) => Some(format!("the coordinator refused the checkpoint of {step}")),
                Err(e) => Some(format!("reporting the checkpoint of {step} failed: {}", e.message())),
            }
        }
    }
}

/// `who`: the worker, its rank and the assignment's attempt.
async fn report_result(
    client: &mut Client,
    job: JobId,
    who: (WorkerId, u32, u64),
    result: Result<u64, String>,
    last_step: u64,
) {
    let (ok, error) = match result {
        Ok(_) => (true, String::new()),
        Err(e) => (false, e),
    };
    let mut error = error;
    error.truncate(swarm_proto::limits::MAX_TEXT_BYTES - 16);
    let (worker, rank, attempt) = who;
    let req = pb::WorkerJobResult { job_id: job.0, worker_id: worker.0, rank, ok, error, last_step, attempt };
    if let Err(e) = client.report_job_result(req).await {
        warn!(%job, "could not report the job's result: {e}");
    }
}

/// An assignment and the data-plane secret of its attempt.
struct JobToRun {
    a: Assignment,
    secret: Secret,
}

async fn start_job(client: Client, worker: WorkerId, job: JobToRun, env: JobEnv, running: Arc<Mutex<Option<Running>>>) {
    let JobToRun { a, secret } = job;
    let mut slot = running.lock().await;
    if let Some(r) = slot.as_ref() {
        let msg = format!("{worker} is still running {}", r.job);
        report_result(&mut client.clone(), a.job, (worker, a.rank.0, a.attempt), Err(msg), 0).await;
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let aborter = Aborter::default();
    *slot = Some(Running { job: a.job, cancel: cancel.clone(), aborter: aborter.clone() });
    drop(slot);
    let span = info_span!("job", job = %a.job, rank = %a.rank);
    tokio::spawn(
        async move {
            let (tx, rx) = mpsc::channel::<Report>(REPORT_QUEUE);
            let stop = (cancel.clone(), aborter.clone());
            let (reporter, report_error) = spawn_reporter(client.clone(), a.clone(), worker, rx, stop);
            // Peers holding this attempt's secret may connect while it trains.
            let admission = env.dp.admit(a.job, a.attempt, secret);
            let ctx = TrainContext {
                worker,
                data_plane: env.dp.clone(),
                report: Box::new(move |r| {
                    tx.blocking_send(r).map_err(|_| anyhow::anyhow!("the report channel closed"))
                }),
                cancel: cancel.clone(),
                aborter,
                device: env.device.clone(),
                state_dir: env.state_dir.clone(),
                fetcher: env.fetcher.clone(),
                peer_addrs: a.peers.iter().map(|p| p.data_addr.clone()).collect(),
                attempt: a.attempt,
                job: a.job,
            };
            let mut a3 = a.clone();
            let result = tokio::task::spawn_blocking(move || {
                fetch_inputs(&mut a3, &env, &ctx.cancel)?;
                train::run(&a3, ctx)
            })
            .await;
            drop(admission);
            let last = reporter.await.unwrap_or(0);
            let reported = report_error.lock().expect("report error lock").take();
            let result = match (result, reported) {
                (Ok(Ok(_)), Some(r)) | (Ok(Err(_)), Some(r)) => Err(r),
                (Ok(Ok(step)), None) => Ok(step.0),
                (Ok(Err(e)), None) => Err(format!("{e:#}")),
                (Err(e), _) => Err(format!("the training thread panicked: {e}")),
            };
            match &result {
                Ok(_) => info!("job finished"),
                Err(e) if cancel.load(Ordering::Relaxed) => info!("job stopped: {e}"),
                Err(e) => error!("job failed: {e}"),
            }
            *running.lock().await = None;
            report_result(&mut client.clone(), a.job, (worker, a.rank.0, a.attempt), result, last).await;
        }
        .instrument(span),
    );
}

/// Fetches what the assignment reads into this worker's state directory (the dataset, the
/// starting model, the checkpoint to resume from) and points the assignment at the copies.
fn fetch_inputs(a: &mut Assignment, env: &JobEnv, cancel: &AtomicBool) -> anyhow::Result<()> {
    let sources = chain_sources(a, &env.data_addr);
    let state = &env.state_dir;
    let data = &a.inputs.dataset;
    a.recipe.data.dataset = content::materialize(state, data, |_| true, &sources, &env.fetcher, "the dataset", cancel)?;
    match (&a.inputs.model, &a.recipe.model.hf_dir) {
        (Some(m), _) => {
            let dir = fetch_model(a, m, &sources, env, cancel)?;
            a.recipe.model.hf_dir = Some(dir);
        }
        (None, Some(d)) => anyhow::bail!(
            "model.hf_dir = {} is on the submitter's machine, and the job carries no copy of it",
            d.display()
        ),
        (None, None) => {}
    }
    if let Some(rp) = &mut a.resume {
        let m = a.resume_manifest.as_ref().context("the assignment resumes without the checkpoint's manifest")?;
        let dir = state.join(content::step_rel_dir(&a.recipe.name, rp.step));
        content::fetch_checkpoint(m, &dir, &env.fetcher, cancel)?;
        rp.dir = dir.display().to_string();
    }
    Ok(())
}

/// Holds `<state>/lock` for the life of the worker: two workers on one state directory would
/// write the same files.
fn lock_state_dir(state: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let p = state.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another worker uses the state directory {}; give this one its own with --state-dir",
            state.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", p.display())),
    }
}

/// Where this rank fetches a job's bundles from, in order: the previous replica of its pipeline
/// stage (which relays what it receives; rank r-1 without stages), else the submitter first;
/// the job's other workers after. Never itself.
fn chain_sources(a: &Assignment, me: &str) -> Vec<String> {
    let mut sources = a.inputs.sources.clone();
    let world = a.world_size as usize;
    let up = a.recipe.stage_layout(world).ok().and_then(|l| {
        let rank = a.rank.0 as usize;
        let (stage, replica) = (l.stage_of(rank), l.replica_of(rank));
        replica.checked_sub(1).map(|r| l.rank(stage, r))
    });
    if let Some(up) = up.and_then(|r| a.peers.get(r)) {
        sources.retain(|s| *s != up.data_addr);
        sources.insert(0, up.data_addr.clone());
    }
    sources.retain(|s| s != me);
    sources
}

/// The starting model's files this rank needs: all of them, or, for a pipeline stage of a
/// sharded model, the index and the other small files first, then only the weight files that
/// hold the stage's tensors.
fn fetch_model(
    a: &Assignment,
    m: &swarm_sharding::Bundle,
    sources: &[String],
    env: &JobEnv,
    cancel: &AtomicBool,
) -> anyhow::Result<std::path::PathBuf> {
    let (state, f) = (&env.state_dir, &env.fetcher);
    let sharded = m.file("model.safetensors.index.json").is_some() && m.file("model.safetensors").is_none();
    let Some(keep) = train::stage_filter(&a.recipe, a.world_size as usize, a.rank.0 as usize).filter(|_| sharded)
    else {
        return content::materialize(state, m, |_| true, sources, f, "the model", cancel);
    };
    let small = |n: &str| !n.ends_with(".safetensors");
    let dir = content::materialize(state, m, small, sources, f, "the model's index", cancel)?;
    let map = crate::model::weight_map(&dir)?.context("the model's index lists no weights")?;
    let needed: std::collections::BTreeSet<String> = map.into_iter().filter(|(t, _)| keep(t)).map(|(_, f)| f).collect();
    info!(files = needed.len(), "this stage's weight files");
    content::materialize(state, m, |n| needed.contains(n), sources, f, "this stage's weights", cancel)
}

/// Copies a committed checkpoint's files (of a job this worker may not be in) from their
/// holders into the same step directory here, and tells the coordinator.
async fn replicate(mut client: Client, worker: WorkerId, r: pb::ReplicateAssignment, env: JobEnv) {
    let (job, step, rank) = (r.job_id, r.step, r.rank);
    let fetched = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let files = proto_conv::replicate_from_proto(&r)?;
        let dir = env.state_dir.join(&r.dir);
        for f in &files {
            let from: Vec<Source> =
                r.sources.iter().map(|a| Source::new(a.clone(), format!("{}/{}", r.dir, f.path))).collect();
            let want = Want { sha256: &f.sha256, bytes: f.bytes };
            env.fetcher.fetch(&from, &want, &dir.join(&f.path), &AtomicBool::new(false))?;
        }
        Ok(())
    })
    .await;
    let error = match fetched {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => format!("the copy panicked: {e}"),
    };
    if error.is_empty() {
        info!(job, step, rank, "copied a checkpoint replica");
    } else {
        warn!(job, step, rank, "could not copy a checkpoint replica: {error}");
    }
    let report = pb::ReplicaReport { worker_id: worker.0, job_id: job, step, rank, ok: error.is_empty(), error };
    if let Err(e) = client.report_replica(report).await {
        warn!(job, step, "could not report a checkpoint replica: {}", e.message());
    }
}
