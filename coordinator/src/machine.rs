//! The coordinator's control plane as a pure state machine: [`Coordinator::step`] takes the
//! current time and one event, changes state, and returns a reply for the caller plus commands
//! for the shell to carry out (send an assignment, commit a manifest, persist a job...).
//! No tokio, no clock, no files: the gRPC service and the tests feed it the same way.

use crate::job::{CheckpointAgg, Job, JobState, Progress, RankResult, StepAgg};
use std::collections::BTreeMap;
use swarm_sharding::{
    Assignment, DeviceInfo, Holder, Inputs, JobId, Manifest, Peer, Rank, RankCheckpoint, Recipe, ResumePoint,
    ShardFile, Step, WorkerId,
};

/// How long a rank's failure in a group waits for a lost worker to explain it (ms): a killed
/// worker's closed stream is seen within milliseconds, its peers' socket errors as fast.
pub const FAILURE_GRACE_MS: u64 = 1_500;

/// How far past the last step every rank finished a report may be (steps). Ranks of one job
/// synchronise every step, so an honest report is at most a few steps ahead; the bound keeps a
/// report from sizing the loss history or the per-step tables.
pub const MAX_STEPS_AHEAD: u64 = 1_024;

/// Timing of membership.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// A worker not heard from for this long is lost.
    pub lease_ms: u64,
    /// How often workers should send heartbeats.
    pub heartbeat_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { lease_ms: 6_000, heartbeat_interval_ms: 1_000 }
    }
}

#[derive(Clone, Debug)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub name: String,
    pub devices: Vec<DeviceInfo>,
    pub data_addr: String,
    pub last_seen_ms: u64,
    /// Its assignment stream is open, so assignments reach it.
    pub connected: bool,
    pub job: Option<JobId>,
}

/// A step report from one rank.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub job: JobId,
    pub worker: WorkerId,
    pub rank: Rank,
    /// The job attempt the rank runs (a report of an older attempt is refused).
    pub attempt: u64,
    pub step: Step,
    pub loss: f64,
    pub tokens: u64,
    /// Peak memory the rank reported (device memory on a GPU, RSS on a CPU).
    pub peak_memory_bytes: u64,
    /// Data-plane bytes the rank sent in this step.
    pub bytes_sent: u64,
    /// Seconds the rank computed, and waited on a neighbouring pipeline stage, in this step.
    pub compute_s: f64,
    pub idle_s: f64,
}

/// One rank's checkpoint, written and checksummed.
#[derive(Clone, Debug)]
pub struct CheckpointReport {
    pub job: JobId,
    pub worker: WorkerId,
    pub rank: Rank,
    pub attempt: u64,
    pub step: Step,
    pub dir: String,
    pub files: Vec<ShardFile>,
    pub rng_state: String,
    pub data_cursor: u64,
    /// Other ranks' files this worker copied into the same directory.
    pub replicas: Vec<(Rank, Vec<ShardFile>)>,
}

#[derive(Clone, Debug)]
pub enum Event {
    Register {
        name: String,
        devices: Vec<DeviceInfo>,
        data_addr: String,
    },
    Heartbeat(WorkerId),
    /// The worker's assignment stream opened.
    Connected(WorkerId),
    /// The worker's assignment stream closed (process gone, or network cut).
    Disconnected(WorkerId),
    /// Periodic: expire leases, start waiting jobs.
    Tick,
    Submit {
        recipe: Box<Recipe>,
        nodes: usize,
        resume: Option<ResumePoint>,
        /// What the workers fetch; `sources` lists the submitter's data plane.
        inputs: Box<Inputs>,
    },
    StepDone(StepReport),
    CheckpointWritten(Box<CheckpointReport>),
    /// The shell wrote the manifest (temporary name, then rename).
    CheckpointCommitted {
        job: JobId,
        step: Step,
        dir: String,
    },
    CheckpointCommitFailed {
        job: JobId,
        step: Step,
        error: String,
    },
    /// A worker outside the job copied one rank's files of a committed checkpoint (or failed to).
    ReplicaStored {
        job: JobId,
        step: Step,
        rank: Rank,
        worker: WorkerId,
        ok: bool,
        error: String,
    },
    JobResult {
        job: JobId,
        worker: WorkerId,
        rank: Rank,
        attempt: u64,
        ok: bool,
        error: String,
        last_step: Step,
    },
    Cancel {
        job: JobId,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Registered {
        worker: WorkerId,
        lease_ms: u64,
        heartbeat_interval_ms: u64,
    },
    Heartbeat {
        known: bool,
    },
    Submitted(JobId),
    /// A report was taken; `cancel` tells the rank to stop.
    Ack {
        cancel: Option<String>,
    },
    Done,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Assign {
        worker: WorkerId,
        assignment: Box<Assignment>,
    },
    Cancel {
        worker: WorkerId,
        job: JobId,
        reason: String,
    },
    /// Record `manifest` (the coordinator's own copy, in its data directory; `dir` is the step
    /// directory on the workers), then feed back `CheckpointCommitted` with where it is, or
    /// `CheckpointCommitFailed`.
    CommitCheckpoint {
        dir: String,
        manifest: Box<Manifest>,
    },
    /// Have `worker` copy `rank`'s files of a committed checkpoint from `sources` into `dir`.
    Replicate {
        worker: WorkerId,
        job: JobId,
        step: Step,
        rank: Rank,
        dir: String,
        files: Vec<ShardFile>,
        sources: Vec<String>,
    },
    /// Add `holder` to `rank`'s holders in the manifest of recipe `name`'s checkpoint at `step`.
    AddHolder {
        name: String,
        step: Step,
        rank: Rank,
        holder: Holder,
    },
    /// Delete these committed checkpoint directories (older than the ones kept).
    PruneCheckpoints {
        job: JobId,
        dirs: Vec<String>,
    },
    /// Persist this job's record.
    SaveJob(JobId),
    /// Tell the job's watchers it changed.
    JobChanged(JobId),
}

/// A request the state machine refuses; mapped to a gRPC status in one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("unknown worker {0}: register again")]
    UnknownWorker(WorkerId),
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("{0}")]
    Invalid(String),
    #[error("{worker} is not {rank} of {job}")]
    NotInJob { job: JobId, worker: WorkerId, rank: Rank },
    #[error("a report for attempt {attempt} of {job}, which now runs attempt {current}")]
    StaleAttempt { job: JobId, attempt: u64, current: u64 },
    #[error("{step} is outside {job}'s range: after {after} and at most {last}")]
    StepOutOfRange { job: JobId, step: Step, after: Step, last: Step },
}

pub struct Outcome {
    pub reply: Reply,
    pub commands: Vec<Command>,
}

#[derive(Default)]
pub struct Coordinator {
    config: Config,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    jobs: BTreeMap<JobId, Job>,
    next_worker: u64,
    next_job: u64,
}

impl Coordinator {
    pub fn new(config: Config) -> Self {
        Coordinator { config, ..Default::default() }
    }

    /// Starts from the jobs a store kept. Jobs that were waiting or running are interrupted:
    /// their workers are gone with the old process; they resume from a committed checkpoint.
    pub fn recover(config: Config, jobs: Vec<Job>) -> (Self, Vec<Command>) {
        let mut c = Coordinator::new(config);
        let mut cmds = Vec::new();
        for mut job in jobs {
            c.next_job = c.next_job.max(job.id.0);
            if !job.state.is_final() {
                job.state = JobState::Interrupted;
                job.error = Some(format!(
                    "the coordinator restarted while {} was {}; continue it with `swarm train --resume`",
                    job.id,
                    if job.workers.is_empty() { "waiting" } else { "running" }
                ));
                cmds.push(Command::SaveJob(job.id));
            }
            c.jobs.insert(job.id, job);
        }
        (c, cmds)
    }

    pub fn config(&self) -> Config {
        self.config
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl DoubleEndedIterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Handles one event at time `now_ms` (milliseconds since the Unix epoch).
    pub fn step(&mut self, now_ms: u64, event: Event) -> Result<Outcome, Rejection> {
        let mut cmds = Vec::new();
        let reply = match event {
            Event::Register { name, devices, data_addr } => self.register(now_ms, name, devices, data_addr),
            Event::Heartbeat(w) => match self.workers.get_mut(&w) {
                Some(e) => {
                    e.last_seen_ms = now_ms;
                    Reply::Heartbeat { known: true }
                }
                None => Reply::Heartbeat { known: false },
            },
            Event::Connected(w) => {
                let e = self.workers.get_mut(&w).ok_or(Rejection::UnknownWorker(w))?;
                e.connected = true;
                e.last_seen_ms = now_ms;
                self.start_waiting_jobs(&mut cmds);
                Reply::Done
            }
            Event::Disconnected(w) => {
                if self.workers.contains_key(&w) {
                    self.lose_worker(
                        w,
                        "its connection to the coordinator closed (process killed or network cut)",
                        &mut cmds,
                    );
                }
                Reply::Done
            }
            Event::Tick => {
                self.tick(now_ms, &mut cmds);
                Reply::Done
            }
            Event::Submit { recipe, nodes, resume, inputs } => {
                let id = self.submit(now_ms, *recipe, nodes, resume, *inputs)?;
                cmds.push(Command::SaveJob(id));
                cmds.push(Command::JobChanged(id));
                self.start_waiting_jobs(&mut cmds);
                Reply::Submitted(id)
            }
            Event::StepDone(r) => self.step_done(now_ms, r, &mut cmds)?,
            Event::CheckpointWritten(r) => self.checkpoint_written(now_ms, *r, &mut cmds)?,
            Event::CheckpointCommitted { job, step, dir } => self.checkpoint_committed(job, step, dir, &mut cmds)?,
            Event::ReplicaStored { job, step, rank, worker, ok, error } => {
                cmds.push(self.replica_stored(job, step, rank, worker, ok, &error)?);
                Reply::Done
            }
            Event::CheckpointCommitFailed { job, step, error } => {
                let reason = format!("committing the checkpoint of {step} failed: {error}");
                self.fail_job(job, reason, &mut cmds);
                Reply::Done
            }
            Event::JobResult { job, worker, rank, attempt, ok, error, last_step } => {
                let result = RankResult { ok, error, last_step };
                self.job_result(now_ms, job, (worker, rank, attempt), result, &mut cmds)?
            }
            Event::Cancel { job, reason } => {
                let j = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
                if !j.state.is_final() {
                    self.end_job(job, JobState::Cancelled, reason, &mut cmds);
                }
                Reply::Done
            }
        };
        Ok(Outcome { reply, commands: cmds })
    }

    fn register(&mut self, now_ms: u64, name: String, devices: Vec<DeviceInfo>, data_addr: String) -> Reply {
        self.next_worker += 1;
        let id = WorkerId(self.next_worker);
        self.workers.insert(
            id,
            WorkerEntry { id, name, devices, data_addr, last_seen_ms: now_ms, connected: false, job: None },
        );
        Reply::Registered {
            worker: id,
            lease_ms: self.config.lease_ms,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
        }
    }

    /// Expires leases, fails jobs whose held-back failure is due, starts waiting jobs.
    fn tick(&mut self, now_ms: u64, cmds: &mut Vec<Command>) {
        let expired: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|e| now_ms.saturating_sub(e.last_seen_ms) > self.config.lease_ms)
            .map(|e| e.id)
            .collect();
        for w in expired {
            let why = format!("no heartbeat for over {} ms", self.config.lease_ms);
            self.lose_worker(w, &why, cmds);
        }
        let due: Vec<(JobId, String)> = self
            .jobs
            .values_mut()
            .filter(|j| j.progress.pending_failure.as_ref().is_some_and(|(at, _)| *at <= now_ms))
            .filter_map(|j| j.progress.pending_failure.take().map(|(_, r)| (j.id, r)))
            .collect();
        for (job, reason) in due {
            self.fail_job(job, reason, cmds);
        }
        self.start_waiting_jobs(cmds);
    }

    fn checkpoint_committed(
        &mut self,
        job: JobId,
        step: Step,
        dir: String,
        cmds: &mut Vec<Command>,
    ) -> Result<Reply, Rejection> {
        let j = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
        j.progress.commit_in_flight.remove(&step);
        j.committed.push(ResumePoint { dir, step });
        let keep = j.recipe.checkpoint.keep;
        if keep > 0 && j.committed.len() > keep {
            let old: Vec<String> = j.committed.drain(..j.committed.len() - keep).map(|p| p.dir).collect();
            cmds.push(Command::PruneCheckpoints { job, dirs: old });
        }
        cmds.push(Command::SaveJob(job));
        cmds.push(Command::JobChanged(job));
        self.maybe_finish(job, cmds);
        Ok(Reply::Done)
    }

    /// A worker's copy of a committed checkpoint becomes one of its rank's holders.
    fn replica_stored(
        &self,
        job: JobId,
        step: Step,
        rank: Rank,
        worker: WorkerId,
        ok: bool,
        error: &str,
    ) -> Result<Command, Rejection> {
        let j = self.jobs.get(&job).ok_or(Rejection::UnknownJob(job))?;
        let w = self.workers.get(&worker).ok_or(Rejection::UnknownWorker(worker))?;
        let dir = j.committed.iter().chain(&j.resume).find(|p| p.step == step).map(|p| p.dir.clone());
        if !ok || dir.is_none() || rank.0 as usize >= j.workers.len() {
            return Err(Rejection::Invalid(format!(
                "{worker}'s copy of {rank}'s checkpoint of {step} of {job}: {}",
                if ok { "no such committed checkpoint" } else { error }
            )));
        }
        let holder = Holder {
            worker: w.name.clone(),
            data_addr: w.data_addr.clone(),
            dir: worker_step_dir(&j.recipe.name, step),
        };
        Ok(Command::AddHolder { name: j.recipe.name.clone(), step, rank, holder })
    }

    /// `who`: the worker, its rank and the attempt it reports for.
    fn job_result(
        &mut self,
        now_ms: u64,
        job: JobId,
        who: (WorkerId, Rank, u64),
        result: RankResult,
        cmds: &mut Vec<Command>,
    ) -> Result<Reply, Rejection> {
        let (worker, rank, attempt) = who;
        let RankResult { ok, error, last_step } = result;
        let j = self.report_target(job, worker, rank, attempt)?;
        if last_step > j.total_steps() {
            return Err(Rejection::StepOutOfRange { job, step: last_step, after: Step(0), last: j.total_steps() });
        }
        j.progress.results.insert(rank, RankResult { ok, error: error.clone(), last_step });
        if let Some(e) = self.workers.get_mut(&worker)
            && e.job == Some(job)
        {
            e.job = None;
        }
        if !ok {
            let name = self.workers.get(&worker).map(|e| e.name.clone()).unwrap_or_default();
            let reason = format!("{worker} ({name}, {rank}) failed: {error}");
            let j = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
            if j.workers.len() > 1 && j.state == JobState::Running {
                // The first failure of a group is held briefly (see `pending_failure`).
                j.progress.pending_failure.get_or_insert((now_ms + FAILURE_GRACE_MS, reason));
            } else {
                self.fail_job(job, reason, cmds);
            }
        } else {
            self.maybe_finish(job, cmds);
        }
        self.start_waiting_jobs(cmds);
        Ok(Reply::Done)
    }

    fn submit(
        &mut self,
        now_ms: u64,
        recipe: Recipe,
        nodes: usize,
        resume: Option<ResumePoint>,
        inputs: Inputs,
    ) -> Result<JobId, Rejection> {
        inputs.dataset.validate("inputs.dataset").map_err(Rejection::Invalid)?;
        if let Some(m) = &inputs.model {
            m.validate("inputs.model").map_err(Rejection::Invalid)?;
        }
        if inputs.model.is_some() != recipe.model.hf_dir.is_some() {
            return Err(Rejection::Invalid(
                "inputs.model: a job carries the model's files exactly when its recipe sets model.hf_dir".into(),
            ));
        }
        recipe.validate().map_err(|e| Rejection::Invalid(format!("recipe: {e}")))?;
        recipe.check_supported_by_executor().map_err(|e| Rejection::Invalid(format!("recipe: {e}")))?;
        if recipe.spec().is_none() {
            return Err(Rejection::Invalid("recipe: model.spec is not resolved; submit through `swarm train`".into()));
        }
        if nodes > swarm_proto_limits::MAX_WORLD_SIZE {
            return Err(Rejection::Invalid(format!(
                "--nodes {nodes} is more than the {} workers one job may use",
                swarm_proto_limits::MAX_WORLD_SIZE
            )));
        }
        recipe.batch_shares(nodes).map_err(|e| Rejection::Invalid(format!("recipe: {e}")))?;
        let start_step = resume.as_ref().map_or(Step(0), |p| p.step);
        if start_step.0 >= recipe.train.steps {
            return Err(Rejection::Invalid(format!(
                "the checkpoint to resume from is at {start_step}, which already reaches train.steps = {}; raise train.steps to train further",
                recipe.train.steps
            )));
        }
        self.next_job += 1;
        let id = JobId(self.next_job);
        self.jobs.insert(
            id,
            Job {
                id,
                recipe,
                nodes,
                state: JobState::Waiting,
                error: None,
                workers: Vec::new(),
                attempt: 0,
                resume,
                start_step,
                step: start_step,
                loss: None,
                first_loss: None,
                tokens_per_s: 0.0,
                peak_memory_bytes: 0,
                bytes_sent: 0,
                compute_s: Vec::new(),
                idle_s: Vec::new(),
                losses: Vec::new(),
                committed: Vec::new(),
                submitted_unix_ms: now_ms,
                inputs,
                progress: Progress::default(),
            },
        );
        Ok(id)
    }

    /// Starts every waiting job (oldest first) for which enough idle, connected workers exist.
    fn start_waiting_jobs(&mut self, cmds: &mut Vec<Command>) {
        let waiting: Vec<JobId> = self.jobs.values().filter(|j| j.state == JobState::Waiting).map(|j| j.id).collect();
        for id in waiting {
            let idle: Vec<WorkerId> =
                self.workers.values().filter(|e| e.connected && e.job.is_none()).map(|e| e.id).collect();
            let job = &self.jobs[&id];
            if idle.len() < job.nodes {
                continue;
            }
            // A placement by name (a plan's): rank i on the worker named workers[i].
            let chosen = match &job.recipe.parallel.workers {
                None => idle[..job.nodes].to_vec(),
                Some(names) => {
                    let named: Vec<Option<WorkerId>> =
                        names.iter().map(|n| idle.iter().copied().find(|w| self.workers[w].name == *n)).collect();
                    match named.into_iter().collect::<Option<Vec<_>>>() {
                        Some(ws) => ws,
                        // Not all of them are idle (or registered) yet: keep waiting.
                        None => continue,
                    }
                }
            };
            let connected = self.workers.values().filter(|w| w.connected).count();
            if let Some(k) = job.recipe.checkpoint.replicas
                && k > connected
            {
                let reason = format!(
                    "checkpoint.replicas = {k} asks for each checkpoint file on {k} hosts, but the cluster has {connected} connected worker(s); start more workers or lower checkpoint.replicas"
                );
                self.fail_job(id, reason, cmds);
                continue;
            }
            let shares = match job.recipe.batch_shares(job.nodes) {
                Ok(s) => s,
                Err(e) => {
                    self.fail_job(id, e, cmds);
                    continue;
                }
            };
            let peers: Vec<Peer> = chosen
                .iter()
                .enumerate()
                .map(|(r, w)| Peer { rank: Rank(r as u32), worker: *w, data_addr: self.workers[w].data_addr.clone() })
                .collect();
            let job = self.jobs.get_mut(&id).expect("listed above");
            job.state = JobState::Running;
            job.attempt += 1;
            job.workers = chosen.clone();
            job.progress = Progress::default();
            // The submitter serves the inputs; the job's workers serve what they already hold.
            let mut inputs = job.inputs.clone();
            inputs.sources.extend(peers.iter().map(|p| p.data_addr.clone()));
            for (r, w) in chosen.iter().enumerate() {
                self.workers.get_mut(w).expect("idle worker").job = Some(id);
                cmds.push(Command::Assign {
                    worker: *w,
                    assignment: Box::new(Assignment {
                        job: id,
                        rank: Rank(r as u32),
                        world_size: chosen.len() as u32,
                        peers: peers.clone(),
                        recipe: job.recipe.clone(),
                        resume: job.resume.clone(),
                        share: shares[r],
                        attempt: job.attempt,
                        inputs: inputs.clone(),
                        resume_manifest: None,
                    }),
                });
            }
            cmds.push(Command::SaveJob(id));
            cmds.push(Command::JobChanged(id));
        }
    }

    /// The job a rank's report is for, after the checks every report passes at the edge: the
    /// worker holds that rank, in the job's current attempt.
    fn report_target(&mut self, job: JobId, worker: WorkerId, rank: Rank, attempt: u64) -> Result<&mut Job, Rejection> {
        let j = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
        if j.workers.get(rank.0 as usize) != Some(&worker) {
            return Err(Rejection::NotInJob { job, worker, rank });
        }
        if attempt != j.attempt {
            return Err(Rejection::StaleAttempt { job, attempt, current: j.attempt });
        }
        Ok(j)
    }

    /// As [`Self::report_target`], and `step` is one this attempt can report: after the step
    /// it started from, at most the last, and at most [`MAX_STEPS_AHEAD`] past the last step
    /// every rank finished.
    fn step_report_target(
        &mut self,
        job: JobId,
        worker: WorkerId,
        rank: Rank,
        attempt: u64,
        step: Step,
    ) -> Result<&mut Job, Rejection> {
        let j = self.report_target(job, worker, rank, attempt)?;
        let last = Step(j.total_steps().0.min(j.step.0.saturating_add(MAX_STEPS_AHEAD)));
        if step <= j.start_step || step > last {
            return Err(Rejection::StepOutOfRange { job, step, after: j.start_step, last });
        }
        Ok(j)
    }

    fn step_done(&mut self, now_ms: u64, r: StepReport, cmds: &mut Vec<Command>) -> Result<Reply, Rejection> {
        if let Some(e) = self.workers.get_mut(&r.worker) {
            e.last_seen_ms = now_ms;
        }
        let j = self.step_report_target(r.job, r.worker, r.rank, r.attempt, r.step)?;
        if j.state != JobState::Running {
            return Ok(Reply::Ack { cancel: Some(format!("{} is {}", j.id, j.state.as_str())) });
        }
        let times_ok = [r.compute_s, r.idle_s].iter().all(|t| t.is_finite() && *t >= 0.0);
        let max_tokens = (j.recipe.train.global_batch as u64).saturating_mul(j.recipe.train.seq_len as u64);
        if !times_ok || r.tokens > max_tokens {
            return Err(Rejection::Invalid(format!(
                "{} of {} reported {} tokens (at most {max_tokens}: train.global_batch x train.seq_len), compute {} s and idle {} s at {}",
                r.rank, r.job, r.tokens, r.compute_s, r.idle_s, r.step
            )));
        }
        if !r.loss.is_finite() {
            let reason = format!(
                "{} reported a non-finite loss ({}) at {}; lower train.lr or check the data",
                r.rank, r.loss, r.step
            );
            let id = j.id;
            self.fail_job(id, reason.clone(), cmds);
            return Ok(Reply::Ack { cancel: Some(reason) });
        }
        let world = j.workers.len();
        let agg = j.progress.steps.entry(r.step).or_insert_with(StepAgg::default);
        agg.ranks.insert(r.rank);
        agg.loss_x_tokens += r.loss * r.tokens as f64;
        agg.tokens += r.tokens;
        j.peak_memory_bytes = j.peak_memory_bytes.max(r.peak_memory_bytes);
        j.bytes_sent += r.bytes_sent;
        let n = j.workers.len();
        for (sum, v) in [(&mut j.compute_s, r.compute_s), (&mut j.idle_s, r.idle_s)] {
            sum.resize(n, 0.0);
            if let Some(x) = sum.get_mut(r.rank.0 as usize) {
                *x += v;
            }
        }
        if agg.ranks.len() == world {
            let agg = j.progress.steps.remove(&r.step).expect("present");
            let loss = agg.loss_x_tokens / agg.tokens.max(1) as f64;
            if r.step > j.step {
                j.step = r.step;
            }
            j.loss = Some(loss);
            // In range: start_step < step <= step + MAX_STEPS_AHEAD (step_report_target).
            let idx = (r.step.0 - j.start_step.0 - 1) as usize;
            if j.losses.len() <= idx {
                j.losses.resize(idx + 1, f64::NAN);
            }
            j.losses[idx] = loss;
            j.first_loss.get_or_insert(loss);
            if let Some(prev) = j.progress.last_step_done_ms {
                let dt = (now_ms.saturating_sub(prev)).max(1) as f64 / 1000.0;
                let rate = agg.tokens as f64 / dt;
                j.tokens_per_s = if j.tokens_per_s > 0.0 { 0.7 * j.tokens_per_s + 0.3 * rate } else { rate };
            }
            j.progress.last_step_done_ms = Some(now_ms);
            cmds.push(Command::JobChanged(j.id));
        }
        Ok(Reply::Ack { cancel: None })
    }

    fn checkpoint_written(
        &mut self,
        now_ms: u64,
        r: CheckpointReport,
        cmds: &mut Vec<Command>,
    ) -> Result<Reply, Rejection> {
        let holder = self.workers.get(&r.worker).map(|w| Holder {
            worker: w.name.clone(),
            data_addr: w.data_addr.clone(),
            dir: r.dir.clone(),
        });
        let j = self.step_report_target(r.job, r.worker, r.rank, r.attempt, r.step)?;
        if j.state != JobState::Running {
            return Ok(Reply::Ack { cancel: Some(format!("{} is {}", j.id, j.state.as_str())) });
        }
        let holder = holder.ok_or(Rejection::UnknownWorker(r.worker))?;
        let world = j.workers.len();
        if r.replicas.iter().any(|(of, _)| of.0 as usize >= world || *of == r.rank) {
            return Err(Rejection::Invalid(format!("{} reported replicas of ranks outside {}", r.rank, j.id)));
        }
        let agg = j.progress.checkpoints.entry(r.step).or_insert_with(|| CheckpointAgg {
            dir: r.dir.clone(),
            data_cursor: r.data_cursor,
            ranks: BTreeMap::new(),
            replicas: Vec::new(),
        });
        if agg.dir != r.dir || agg.data_cursor != r.data_cursor {
            let reason = format!(
                "{} wrote its checkpoint of {} to {} at data cursor {}, but rank0 used {} at {}",
                r.rank, r.step, r.dir, r.data_cursor, agg.dir, agg.data_cursor
            );
            let id = j.id;
            self.fail_job(id, reason.clone(), cmds);
            return Ok(Reply::Ack { cancel: Some(reason) });
        }
        for (of, files) in r.replicas {
            agg.replicas.push((of, holder.clone(), files));
        }
        let own = RankCheckpoint {
            rank: r.rank,
            worker: r.worker,
            files: r.files,
            rng_state: r.rng_state,
            holders: vec![holder],
        };
        agg.ranks.insert(r.rank, own);
        if agg.ranks.len() < world {
            return Ok(Reply::Ack { cancel: None });
        }
        let agg = j.progress.checkpoints.remove(&r.step).expect("present");
        let want = j.recipe.checkpoint.replicas_for(world);
        let ranks = match with_replicas(agg.ranks, agg.replicas, want) {
            Ok(ranks) => ranks,
            Err(reason) => {
                let (id, reason) = (j.id, format!("the checkpoint of {}: {reason}", r.step));
                self.fail_job(id, reason.clone(), cmds);
                return Ok(Reply::Ack { cancel: Some(reason) });
            }
        };
        j.progress.commit_in_flight.insert(r.step);
        let manifest = Manifest {
            format: Manifest::FORMAT,
            job: j.id,
            name: j.recipe.name.clone(),
            step: r.step,
            world_size: world as u32,
            data_cursor: agg.data_cursor,
            loss: j.loss,
            recipe: j.recipe.clone(),
            ranks,
            committed_unix_ms: now_ms,
        };
        let extra = self.replicas_outside_job(r.job, &manifest, &agg.dir);
        cmds.push(Command::CommitCheckpoint { dir: agg.dir, manifest: Box::new(manifest) });
        cmds.extend(extra);
        Ok(Reply::Ack { cancel: None })
    }

    /// Copies a job smaller than `checkpoint.replicas` cannot make itself: each rank's files go
    /// to connected workers that do not hold them yet (idle ones first), up to the recipe's
    /// number of hosts or the cluster's size.
    fn replicas_outside_job(&self, job: JobId, m: &Manifest, dir: &str) -> Vec<Command> {
        let connected: Vec<&WorkerEntry> = self.workers.values().filter(|w| w.connected).collect();
        let want = m.recipe.checkpoint.replicas_wanted().min(connected.len());
        let mut cmds = Vec::new();
        for rc in &m.ranks {
            let mut candidates: Vec<&&WorkerEntry> =
                connected.iter().filter(|w| !rc.holders.iter().any(|h| h.worker == w.name)).collect();
            candidates.sort_by_key(|w| (w.job.is_some(), w.id));
            for w in candidates.into_iter().take(want.saturating_sub(rc.holders.len())) {
                cmds.push(Command::Replicate {
                    worker: w.id,
                    job,
                    step: m.step,
                    rank: rc.rank,
                    dir: dir.to_string(),
                    files: rc.files.clone(),
                    sources: rc.holders.iter().map(|h| h.data_addr.clone()).collect(),
                });
            }
        }
        cmds
    }

    /// A job succeeds once every rank reported success and its last step's checkpoint is committed.
    fn maybe_finish(&mut self, job: JobId, cmds: &mut Vec<Command>) {
        let Some(j) = self.jobs.get(&job) else { return };
        if j.state != JobState::Running || j.progress.results.len() < j.workers.len() {
            return;
        }
        let final_committed = j.committed.last().is_some_and(|p| p.step == j.total_steps());
        if !j.progress.results.values().all(|r| r.ok) {
            return;
        }
        if final_committed {
            self.end_job(job, JobState::Succeeded, String::new(), cmds);
        } else if j.progress.commit_in_flight.is_empty() {
            // Every rank sends its checkpoint report before its result, so nothing more will
            // arrive: a rank's report of the final checkpoint was lost.
            let total = j.total_steps();
            let missing: Vec<String> = match j.progress.checkpoints.get(&total) {
                Some(agg) => (0..j.workers.len() as u32)
                    .map(Rank)
                    .filter(|r| !agg.ranks.contains_key(r))
                    .map(|r| r.to_string())
                    .collect(),
                None => vec!["every rank".into()],
            };
            let reason = format!(
                "all ranks finished, but the checkpoint of {total} was never reported by {}; nothing was committed for the last step",
                missing.join(", ")
            );
            self.end_job(job, JobState::Failed, reason, cmds);
        }
    }

    fn lose_worker(&mut self, w: WorkerId, why: &str, cmds: &mut Vec<Command>) {
        let Some(entry) = self.workers.remove(&w) else { return };
        if let Some(job) = entry.job
            && let Some(j) = self.jobs.get(&job)
            && j.state == JobState::Running
        {
            let rank = j.rank_of(w).map(|r| r.to_string()).unwrap_or_else(|| "?".into());
            // With pipeline stages, which part of the model went with it.
            let stage = j
                .rank_of(w)
                .zip(j.recipe.stage_layout(j.workers.len()).ok().filter(|l| l.stages > 1))
                .map(|(r, l)| format!(", {}", l.describe(r.0 as usize)))
                .unwrap_or_default();
            let reason = format!("worker {w} ({}, {rank}{stage}) was lost: {why}", entry.name);
            self.fail_job(job, reason, cmds);
        }
    }

    fn fail_job(&mut self, job: JobId, reason: String, cmds: &mut Vec<Command>) {
        if self.jobs.get(&job).is_some_and(|j| !j.state.is_final()) {
            self.end_job(job, JobState::Failed, reason, cmds);
        }
    }

    fn end_job(&mut self, job: JobId, state: JobState, reason: String, cmds: &mut Vec<Command>) {
        let Some(j) = self.jobs.get_mut(&job) else { return };
        j.state = state;
        j.error = (!reason.is_empty()).then(|| reason.clone());
        for w in j.workers.clone() {
            if let Some(e) = self.workers.get_mut(&w)
                && e.job == Some(job)
            {
                if state == JobState::Succeeded {
                    e.job = None;
                } else {
                    // The worker stays busy until it reports that it stopped (JobResult), so
                    // no new job is given to a worker that is still unwinding this one.
                    cmds.push(Command::Cancel { worker: w, job, reason: reason.clone() });
                }
            }
        }
        cmds.push(Command::SaveJob(job));
        cmds.push(Command::JobChanged(job));
    }
}

/// Limits from the wire contract that the state machine enforces too (kept here so the machine
/// does not depend on generated types).
mod swarm_proto_limits {
    pub const MAX_WORLD_SIZE: usize = swarm_proto::limits::MAX_WORLD_SIZE;
}

/// Every rank's checkpoint with the hosts that hold it: its writer, then each worker that
/// reported a copy with the same files (path, size, sha256). Fewer than `want` holders for any
/// rank, or a copy that differs, is an error.
fn with_replicas(
    ranks: BTreeMap<Rank, RankCheckpoint>,
    replicas: Vec<(Rank, Holder, Vec<ShardFile>)>,
    want: usize,
) -> Result<Vec<RankCheckpoint>, String> {
    let mut ranks = ranks;
    for (of, holder, files) in replicas {
        let rc = ranks.get_mut(&of).ok_or_else(|| format!("a replica of {of}, which wrote nothing"))?;
        if files != rc.files {
            return Err(format!("the copy of {of}'s files on {} differs from what {of} wrote", holder.worker));
        }
        if !rc.holders.iter().any(|h| h.worker == holder.worker) {
            rc.holders.push(holder);
        }
    }
    for rc in ranks.values() {
        if rc.holders.len() < want {
            return Err(format!(
                "{}'s files are on {} host(s), checkpoint.replicas asks for {want}",
                rc.rank,
                rc.holders.len()
            ));
        }
    }
    Ok(ranks.into_values().collect())
}

/// A checkpoint's step directory on a worker, relative to its state directory.
fn worker_step_dir(name: &str, step: Step) -> String {
    format!("checkpoints/{name}/{}", swarm_sharding::job::step_dir_name(step))
}
