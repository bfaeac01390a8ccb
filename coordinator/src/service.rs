//! The gRPC shell around the state machine: it turns requests into events, carries out the
//! commands the machine returns (streams, store writes, manifest commits) and feeds the results
//! back. All state lives in the machine; this layer holds only channels.

use crate::checkpoint;
use crate::identity::Secrets;
use crate::machine::{Command, Config, Coordinator, Event, Reply};
use crate::store::Store;
use crate::to_proto::{self, status};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swarm_proto::trust::{Secret, bearer_of};
use swarm_proto::v1 as pb;
use swarm_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use swarm_sharding::job::step_dir_name;
use swarm_sharding::{JobId, Manifest, Rank, Recipe, Step, WorkerId};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

/// Assignments queued for one worker before it is considered unreachable.
const ASSIGNMENT_QUEUE: usize = 16;
/// How often leases are checked and waiting jobs retried.
pub const TICK_MS: u64 = 250;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct WorkerStream {
    generation: u64,
    tx: mpsc::Sender<Result<pb::Assignment, Status>>,
}

struct Shared {
    machine: Mutex<Coordinator>,
    store: Store,
    streams: Mutex<HashMap<WorkerId, WorkerStream>>,
    watchers: Mutex<HashMap<JobId, watch::Sender<pb::JobStatus>>>,
    next_generation: Mutex<u64>,
    secrets: Secrets,
    /// Each registered worker's credential: its requests must present it.
    credentials: Mutex<HashMap<WorkerId, Secret>>,
    /// `<data dir>/checkpoints`: the manifests of committed checkpoints, by recipe name (the
    /// shards stay on the workers that wrote and copied them).
    checkpoints: PathBuf,
}

/// The coordinator service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// Opens the store under `data_dir` and recovers the jobs it holds. Requests are checked
    /// against `secrets`.
    pub fn open(data_dir: &Path, config: Config, secrets: Secrets) -> anyhow::Result<Service> {
        let store = Store::open(data_dir)?;
        let jobs = store.load_jobs()?;
        let n = jobs.len();
        let (machine, cmds) = Coordinator::recover(config, jobs);
        let svc = Service {
            shared: Arc::new(Shared {
                machine: Mutex::new(machine),
                store,
                streams: Mutex::new(HashMap::new()),
                watchers: Mutex::new(HashMap::new()),
                next_generation: Mutex::new(0),
                secrets,
                credentials: Mutex::new(HashMap::new()),
                checkpoints: data_dir.join("checkpoints"),
            }),
        };
        {
            let mut m = svc.shared.machine.lock().expect("machine lock");
            svc.execute(&mut m, cmds);
        }
        info!(jobs = n, dir = %data_dir.display(), "coordinator store opened");
        Ok(svc)
    }

    /// The tonic server for this service, with the wire contract's message limits.
    pub fn server(&self) -> CoordinatorServer<Service> {
        CoordinatorServer::new(self.clone())
            .max_decoding_message_size(swarm_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(swarm_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Feeds `Tick` every [`TICK_MS`] until the returned handle is dropped or aborted.
    pub fn spawn_ticker(&self) -> tokio::task::JoinHandle<()> {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(TICK_MS));
            loop {
                every.tick().await;
                let _ = svc.apply(Event::Tick);
            }
        })
    }

    /// Runs one event through the machine and carries out the commands, including the events
    /// those commands feed back.
    pub fn apply(&self, event: Event) -> Result<Reply, Status> {
        let mut m = self.shared.machine.lock().expect("machine lock");
        let out = m.step(now_ms(), event).map_err(status)?;
        self.execute(&mut m, out.commands);
        Ok(out.reply)
    }

    fn execute(&self, m: &mut Coordinator, cmds: Vec<Command>) {
        let mut queue: VecDeque<Command> = cmds.into();
        while let Some(cmd) = queue.pop_front() {
            let follow_up = match cmd {
                Command::Assign { worker, mut assignment } => {
                    info!(job = %assignment.job, %worker, rank = %assignment.rank, "assigning");
                    if let Some(rp) = &assignment.resume {
                        match read_manifest(Path::new(&rp.dir)) {
                            Ok(manifest) => assignment.resume_manifest = Some(Box::new(with_live_holders(m, manifest))),
                            Err(e) => warn!(job = %assignment.job, "the checkpoint to resume from: {e:#}"),
                        }
                    }
                    let secret = self.shared.secrets.job_secret(assignment.job, assignment.attempt);
                    self.send(worker, to_proto::assignment_to_proto(&assignment, &secret)).err()
                }
                Command::Cancel { worker, job, reason } => {
                    let _ = self.send(worker, to_proto::cancel_to_proto(job, &reason));
                    None
                }
                Command::CommitCheckpoint { dir: _, manifest } => {
                    let (job, step) = (manifest.job, manifest.step);
                    let dir = self.shared.checkpoints.join(&manifest.name).join(step_dir_name(step));
                    Some(match checkpoint::commit(&dir, &manifest) {
                        Ok(()) => {
                            let dir = dir.display().to_string();
                            info!(%job, %step, %dir, "checkpoint committed");
                            Event::CheckpointCommitted { job, step, dir }
                        }
                        Err(e) => Event::CheckpointCommitFailed { job, step, error: format!("{e:#}") },
                    })
                }
                Command::Replicate { worker, job, step, rank, dir, files, sources } => {
                    info!(%job, %step, %rank, %worker, "copying a checkpoint to a worker outside the job");
                    self.send(worker, to_proto::replicate_to_proto(job, step, rank, dir, files, sources)).err()
                }
                Command::AddHolder { name, step, rank, holder } => {
                    let dir = self.shared.checkpoints.join(&name).join(step_dir_name(step));
                    match add_holder(&dir, rank, holder) {
                        Ok(who) => info!(%step, %rank, holder = %who, "checkpoint replica recorded"),
                        Err(e) => warn!(%step, %rank, "could not record a checkpoint replica: {e:#}"),
                    }
                    None
                }
                Command::PruneCheckpoints { job, dirs } => {
                    for d in dirs {
                        if let Err(e) = checkpoint::prune(Path::new(&d)) {
                            warn!(%job, dir = %d, "could not delete an old checkpoint: {e:#}");
                        }
                    }
                    None
                }
                Command::SaveJob(id) => {
                    if let Some(job) = m.job(id)
                        && let Err(e) = self.shared.store.save_job(job)
                    {
                        warn!(job = %id, "{e}");
                    }
                    None
                }
                Command::JobChanged(id) => {
                    if let Some(job) = m.job(id) {
                        let status = to_proto::job_to_proto(job);
                        let watchers = self.shared.watchers.lock().expect("watchers lock");
                        if let Some(tx) = watchers.get(&id) {
                            tx.send_replace(status);
                        }
                    }
                    None
                }
            };
            if let Some(ev) = follow_up {
                match m.step(now_ms(), ev) {
                    Ok(out) => queue.extend(out.commands),
                    Err(e) => warn!("follow-up event refused: {e}"),
                }
            }
        }
    }

    /// Queues a message on a worker's assignment stream; a worker whose stream is gone or full
    /// comes back as a `Disconnected` event.
    fn send(&self, worker: WorkerId, msg: pb::Assignment) -> Result<(), Event> {
        let streams = self.shared.streams.lock().expect("streams lock");
        match streams.get(&worker) {
            Some(s) if s.tx.try_send(Ok(msg)).is_ok() => Ok(()),
            _ => Err(Event::Disconnected(worker)),
        }
    }

    fn submit(
        &self,
        recipe: Recipe,
        nodes: usize,
        resume: Option<swarm_sharding::ResumePoint>,
        inputs: swarm_sharding::Inputs,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        match self.apply(Event::Submit { recipe: Box::new(recipe), nodes, resume, inputs: Box::new(inputs) })? {
            Reply::Submitted(job) => {
                info!(%job, "job submitted");
                Ok(Response::new(pb::SubmitJobResponse { job_id: job.0 }))
            }
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Records a checkpoint the submitter holds (`--resume-from`) as the resume point of a job
    /// of the recipe whose checkpoints are under `root`. This recipe's committed checkpoints
    /// after its step belong to a run that is now being redone: they are forgotten.
    fn import_checkpoint(&self, root: &Path, m: Manifest) -> Result<swarm_sharding::ResumePoint, Status> {
        let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
        while let Some(p) = checkpoint::latest_committed(root).map_err(internal)?
            && p.step > m.step
        {
            info!(dir = %p.dir, "forgetting a committed checkpoint after the one the job continues from");
            checkpoint::prune(Path::new(&p.dir)).map_err(internal)?;
        }
        let dir = root.join("imported").join(step_dir_name(m.step));
        checkpoint::commit(&dir, &m).map_err(internal)?;
        Ok(swarm_sharding::ResumePoint { dir: dir.display().to_string(), step: m.step })
    }

    /// Requests that submit, follow, cancel or list jobs must present the admin secret.
    fn require_admin<T>(&self, req: &Request<T>, rpc: &str) -> Result<(), Status> {
        match bearer_of(req.metadata()) {
            Some(s) if s.matches(&self.shared.secrets.admin) => Ok(()),
            presented => Err(refuse(
                req,
                rpc,
                presented.is_some(),
                "the admin token",
                "pass --token (`swarm token` on the coordinator's machine prints it)",
            )),
        }
    }

    /// A worker registers with the join secret.
    fn require_join<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match bearer_of(req.metadata()) {
            Some(s) if s.matches(&self.shared.secrets.join) => Ok(()),
            presented => Err(refuse(
                req,
                "RegisterWorker",
                presented.is_some(),
                "the join token",
                "use the join command `swarm up` printed",
            )),
        }
    }

    /// Everything else a worker does presents the credential issued to `worker` at registration.
    fn require_worker<T>(&self, req: &Request<T>, worker: WorkerId, rpc: &str) -> Result<(), Status> {
        let issued = self.shared.credentials.lock().expect("credentials lock").get(&worker).copied();
        match (bearer_of(req.metadata()), issued) {
            (Some(s), Some(c)) if s.matches(&c) => Ok(()),
            (presented, _) => Err(refuse(
                req,
                rpc,
                presented.is_some(),
                &format!("the credential of {worker}"),
                "register again with the join token",
            )),
        }
    }

    fn watch_job(&self, job: JobId) -> Result<watch::Receiver<pb::JobStatus>, Status> {
        let m = self.shared.machine.lock().expect("machine lock");
        let j = m.job(job).ok_or_else(|| Status::not_found(format!("unknown job {job}")))?;
        let mut watchers = self.shared.watchers.lock().expect("watchers lock");
        let tx = watchers.entry(job).or_insert_with(|| watch::channel(to_proto::job_to_proto(j)).0);
        tx.send_replace(to_proto::job_to_proto(j));
        Ok(tx.subscribe())
    }
}

/// The receiving end of a worker's assignment stream. Dropping it (the worker went away)
/// tells the machine, unless a newer stream of the same worker replaced it.
struct AssignmentStream {
    rx: mpsc::Receiver<Result<pb::Assignment, Status>>,
    worker: WorkerId,
    generation: u64,
    svc: Service,
}

impl Stream for AssignmentStream {
    type Item = Result<pb::Assignment, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for AssignmentStream {
    fn drop(&mut self) {
        let current = {
            let mut streams = self.svc.shared.streams.lock().expect("streams lock");
            let current = streams.get(&self.worker).is_some_and(|s| s.generation == self.generation);
            if current {
                streams.remove(&self.worker);
            }
            current
        };
        if current {
            info!(worker = %self.worker, "assignment stream closed");
            let _ = self.svc.apply(Event::Disconnected(self.worker));
        }
    }
}

/// An unauthenticated request: logged with where it came from, refused with what to do.
fn refuse<T>(req: &Request<T>, rpc: &str, presented: bool, needs: &str, fix: &str) -> Status {
    let peer = req.remote_addr().map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
    let what = if presented { "a wrong secret" } else { "no secret" };
    warn!(%peer, rpc, "refused a request with {what}: it needs {needs}");
    Status::unauthenticated(format!("{rpc} needs {needs}, and this request presented {what}; {fix}"))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.require_join(&req)?;
        let r = req.into_inner();
        let event = Event::Register {
            name: to_proto::text("name", r.name)?,
            devices: to_proto::devices_from_proto(r.devices)?,
            data_addr: to_proto::text("data_addr", r.data_addr)?,
        };
        match self.apply(event)? {
            Reply::Registered { worker, lease_ms, heartbeat_interval_ms } => {
                info!(%worker, "worker registered");
                let credential = Secret::random();
                {
                    let m = self.shared.machine.lock().expect("machine lock");
                    let mut creds = self.shared.credentials.lock().expect("credentials lock");
                    // Credentials of workers the machine no longer knows are dead.
                    creds.retain(|w, _| m.workers().any(|e| e.id == *w));
                    creds.insert(worker, credential);
                }
                Ok(Response::new(pb::RegisterWorkerResponse {
                    worker_id: worker.0,
                    lease_ms,
                    heartbeat_interval_ms,
                    credential: credential.to_hex(),
                    fetch_secret: self.shared.secrets.fetch_secret().0.to_vec(),
                }))
            }
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = WorkerId(req.get_ref().worker_id);
        self.require_worker(&req, worker, "Heartbeat")?;
        match self.apply(Event::Heartbeat(worker))? {
            Reply::Heartbeat { known } => Ok(Response::new(pb::HeartbeatResponse { known })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    type WatchAssignmentsStream = BoxStream<pb::Assignment>;

    #[instrument(skip_all, fields(worker = req.get_ref().worker_id))]
    async fn watch_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let worker = WorkerId(req.get_ref().worker_id);
        self.require_worker(&req, worker, "WatchAssignments")?;
        let (tx, rx) = mpsc::channel(ASSIGNMENT_QUEUE);
        let generation = {
            let mut g = self.shared.next_generation.lock().expect("generation lock");
            *g += 1;
            *g
        };
        self.shared.streams.lock().expect("streams lock").insert(worker, WorkerStream { generation, tx });
        let stream = AssignmentStream { rx, worker, generation, svc: self.clone() };
        // Registering the stream before `Connected` lets assignments made by that event reach it.
        self.apply(Event::Connected(worker))?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_step(&self, req: Request<pb::StepReport>) -> Result<Response<pb::StepReportResponse>, Status> {
        self.require_worker(&req, WorkerId(req.get_ref().worker_id), "ReportStep")?;
        let r = req.into_inner();
        match self.apply(Event::StepDone(to_proto::step_report_from_proto(&r)))? {
            Reply::Ack { cancel } => Ok(Response::new(pb::StepReportResponse {
                cancel: cancel.is_some(),
                reason: cancel.unwrap_or_default(),
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn report_checkpoint(
        &self,
        req: Request<pb::CheckpointReport>,
    ) -> Result<Response<pb::CheckpointReportResponse>, Status> {
        self.require_worker(&req, WorkerId(req.get_ref().worker_id), "ReportCheckpoint")?;
        let r = to_proto::checkpoint_from_proto(req.into_inner())?;
        match self.apply(Event::CheckpointWritten(Box::new(r)))? {
            Reply::Ack { cancel } => Ok(Response::new(pb::CheckpointReportResponse { accepted: cancel.is_none() })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn report_job_result(
        &self,
        req: Request<pb::WorkerJobResult>,
    ) -> Result<Response<pb::WorkerJobResultResponse>, Status> {
        self.require_worker(&req, WorkerId(req.get_ref().worker_id), "ReportJobResult")?;
        let r = req.into_inner();
        self.apply(Event::JobResult {
            job: JobId(r.job_id),
            worker: WorkerId(r.worker_id),
            rank: Rank(r.rank),
            attempt: r.attempt,
            ok: r.ok,
            error: to_proto::text("error", r.error)?,
            last_step: Step(r.last_step),
        })?;
        Ok(Response::new(pb::WorkerJobResultResponse {}))
    }

    async fn report_replica(
        &self,
        req: Request<pb::ReplicaReport>,
    ) -> Result<Response<pb::ReplicaReportResponse>, Status> {
        self.require_worker(&req, WorkerId(req.get_ref().worker_id), "ReportReplica")?;
        let r = req.into_inner();
        let event = Event::ReplicaStored {
            job: JobId(r.job_id),
            step: Step(r.step),
            rank: Rank(r.rank),
            worker: WorkerId(r.worker_id),
            ok: r.ok,
            error: to_proto::text("error", r.error)?,
        };
        if let Err(e) = self.apply(event) {
            warn!("a checkpoint replica was not recorded: {}", e.message());
            return Err(e);
        }
        Ok(Response::new(pb::ReplicaReportResponse {}))
    }

    #[instrument(skip_all, fields(nodes = req.get_ref().nodes))]
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.require_admin(&req, "SubmitJob")?;
        let r = req.into_inner();
        if r.recipe_json.len() > swarm_proto::limits::MAX_RECIPE_BYTES {
            return Err(Status::invalid_argument(format!(
                "the recipe is {} bytes; the limit is {}",
                r.recipe_json.len(),
                swarm_proto::limits::MAX_RECIPE_BYTES
            )));
        }
        let recipe: Recipe =
            serde_json::from_str(&r.recipe_json).map_err(|e| Status::invalid_argument(format!("recipe: {e}")))?;
        // Its name names a directory here: checked before it is used as one.
        recipe.validate().map_err(|e| Status::invalid_argument(format!("recipe: {e}")))?;
        let inputs = to_proto::inputs_from_proto(r.inputs)?;
        let root = self.shared.checkpoints.join(&recipe.name);
        let latest = checkpoint::latest_committed(&root).map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        if !r.resume_from_json.is_empty() {
            let m = to_proto::manifest_from_submitter(&r.resume_from_json)?;
            let resume = self.import_checkpoint(&root, m)?;
            return self.submit(recipe, r.nodes as usize, Some(resume), inputs);
        }
        let resume = match (r.resume, latest) {
            (true, Some(p)) => Some(p),
            (true, None) => {
                return Err(Status::failed_precondition(format!(
                    "--resume: this coordinator holds no committed checkpoint of {:?}; run without --resume to start fresh",
                    recipe.name
                )));
            }
            (false, Some(p)) if !r.overwrite => {
                return Err(Status::failed_precondition(format!(
                    "this coordinator holds committed checkpoints of {:?} (latest: {}); pass --resume to continue from it, --overwrite to forget them and start again, or rename the recipe",
                    recipe.name, p.step
                )));
            }
            (false, Some(_)) => {
                while let Some(p) =
                    checkpoint::latest_committed(&root).map_err(|e| Status::internal(format!("{e:#}")))?
                {
                    checkpoint::prune(Path::new(&p.dir)).map_err(|e| Status::internal(format!("{e:#}")))?;
                }
                None
            }
            (false, None) => None,
        };
        self.submit(recipe, r.nodes as usize, resume, inputs)
    }

    type WatchJobStream = BoxStream<pb::JobEvent>;

    async fn watch_job(&self, req: Request<pb::JobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.require_admin(&req, "WatchJob")?;
        let mut rx = self.watch_job(JobId(req.into_inner().job_id))?;
        let (tx, out) = mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let status = rx.borrow_and_update().clone();
                let done = status.state != "waiting" && status.state != "running";
                if tx.send(Ok(pb::JobEvent { status: Some(status) })).await.is_err() || done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.require_admin(&req, "CancelJob")?;
        let r = req.into_inner();
        let reason =
            if r.reason.is_empty() { "cancelled by the user".to_string() } else { to_proto::text("reason", r.reason)? };
        self.apply(Event::Cancel { job: JobId(r.job_id), reason })?;
        Ok(Response::new(pb::CancelJobResponse {}))
    }

    async fn status(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        self.require_admin(&req, "Status")?;
        let m = self.shared.machine.lock().expect("machine lock");
        let now = now_ms();
        Ok(Response::new(pb::ClusterStatus {
            jobs: m.jobs().rev().take(1000).map(to_proto::job_to_proto).collect(),
            workers: m.workers().map(|w| to_proto::worker_to_proto(w, now)).collect(),
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn content_access(
        &self,
        req: Request<pb::ContentAccessRequest>,
    ) -> Result<Response<pb::ContentAccessResponse>, Status> {
        self.require_admin(&req, "ContentAccess")?;
        Ok(Response::new(pb::ContentAccessResponse { fetch_secret: self.shared.secrets.fetch_secret().0.to_vec() }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        self.require_admin(&req, "GetCheckpoint")?;
        let r = req.into_inner();
        if !swarm_sharding::content::valid_file_name(&r.name) {
            return Err(Status::invalid_argument(format!("{:?} is not a recipe name", r.name)));
        }
        let root = self.shared.checkpoints.join(&r.name);
        let dir = match r.step {
            0 => checkpoint::latest_committed(&root)
                .map_err(|e| Status::internal(format!("{e:#}")))?
                .map(|p| PathBuf::from(p.dir))
                .ok_or_else(|| Status::not_found(format!("no committed checkpoint of {:?} here", r.name)))?,
            s => root.join(step_dir_name(Step(s))),
        };
        let manifest = read_manifest(&dir).map_err(|e| {
            Status::not_found(format!("no committed checkpoint of {:?} at step {}: {e:#}", r.name, r.step))
        })?;
        let m = self.shared.machine.lock().expect("machine lock");
        let manifest = with_live_holders(&m, manifest);
        Ok(Response::new(pb::GetCheckpointResponse {
            manifest_json: serde_json::to_string(&manifest).map_err(|e| Status::internal(e.to_string()))?,
        }))
    }
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    use anyhow::Context;
    let p = dir.join(Manifest::FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// `manifest` with each holder's current data-plane address (a worker that registered again
/// may listen elsewhere), holders that are connected now first.
fn with_live_holders(m: &Coordinator, mut manifest: Manifest) -> Manifest {
    for r in &mut manifest.ranks {
        for h in &mut r.holders {
            if let Some(w) = m.workers().filter(|w| w.name == h.worker).max_by_key(|w| w.connected) {
                h.data_addr = w.data_addr.clone();
            }
        }
        let live = |h: &swarm_sharding::Holder| m.workers().any(|w| w.connected && w.name == h.worker);
        r.holders.sort_by_key(|h| !live(h));
    }
    manifest
}

/// Adds `holder` to `rank`'s holders in the manifest in `dir` (rewritten atomically); the
/// holder's name.
fn add_holder(dir: &Path, rank: Rank, holder: swarm_sharding::Holder) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut m = read_manifest(dir)?;
    let rc = m.ranks.iter_mut().find(|r| r.rank == rank).with_context(|| format!("{rank} is not in the manifest"))?;
    let who = holder.worker.clone();
    if !rc.holders.iter().any(|h| h.worker == holder.worker) {
        rc.holders.push(holder);
    }
    checkpoint::commit(dir, &m)?;
    Ok(who)
}
