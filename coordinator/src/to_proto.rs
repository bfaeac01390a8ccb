//! The one place where the coordinator converts between wire types and domain types, and where
//! the caps on repeated and free-text fields are checked.

use crate::job::Job;
use crate::machine::{CheckpointReport, Rejection, StepReport, WorkerEntry};
use swarm_proto::limits;
use swarm_proto::v1 as pb;
use swarm_sharding::{
    Assignment, Bundle, ContentFile, DeviceInfo, DeviceKind, Inputs, JobId, Rank, ShardFile, Step, WorkerId,
};
use tonic::Status;

/// Maps a state-machine rejection to a gRPC status. The only such mapping.
pub fn status(r: Rejection) -> Status {
    match r {
        Rejection::UnknownWorker(_) | Rejection::UnknownJob(_) => Status::not_found(r.to_string()),
        Rejection::Invalid(_) => Status::invalid_argument(r.to_string()),
        Rejection::NotInJob { .. } => Status::permission_denied(r.to_string()),
        Rejection::StaleAttempt { .. } => Status::failed_precondition(r.to_string()),
        Rejection::StepOutOfRange { .. } => Status::out_of_range(r.to_string()),
    }
}

pub fn text(field: &str, s: String) -> Result<String, Status> {
    if s.len() > limits::MAX_TEXT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {}",
            s.len(),
            limits::MAX_TEXT_BYTES
        )));
    }
    Ok(s)
}

pub fn device_from_proto(d: pb::Device) -> Result<DeviceInfo, Status> {
    let kind = DeviceKind::parse(&d.kind)
        .ok_or_else(|| Status::invalid_argument(format!("device kind {:?} is not cpu, cuda or metal", d.kind)))?;
    Ok(DeviceInfo {
        kind,
        name: text("device.name", d.name)?,
        ordinal: d.ordinal,
        memory_bytes: d.memory_bytes,
        free_bytes: d.free_bytes,
        measured_tflops: d.measured_tflops,
        cores: d.cores,
    })
}

pub fn device_to_proto(d: &DeviceInfo) -> pb::Device {
    pb::Device {
        kind: d.kind.as_str().into(),
        name: d.name.clone(),
        ordinal: d.ordinal,
        memory_bytes: d.memory_bytes,
        free_bytes: d.free_bytes,
        measured_tflops: d.measured_tflops,
        cores: d.cores,
    }
}

pub fn devices_from_proto(ds: Vec<pb::Device>) -> Result<Vec<DeviceInfo>, Status> {
    if ds.len() > limits::MAX_DEVICES {
        return Err(Status::invalid_argument(format!(
            "{} devices reported; the limit is {}",
            ds.len(),
            limits::MAX_DEVICES
        )));
    }
    ds.into_iter().map(device_from_proto).collect()
}

/// Replicas one checkpoint report may list.
pub const MAX_REPLICAS: usize = 8;

fn bundle_to_proto(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        files: b
            .files
            .iter()
            .map(|f| pb::ContentFile { name: f.name.clone(), sha256: f.sha256.clone(), bytes: f.bytes })
            .collect(),
    }
}

fn inputs_to_proto(i: &Inputs) -> pb::Inputs {
    pb::Inputs {
        dataset: Some(bundle_to_proto(&i.dataset)),
        model: i.model.as_ref().map(bundle_to_proto),
        sources: i.sources.clone(),
    }
}

/// A submitter's inputs: each bundle checked, and `source` (its data plane) the only source.
pub fn inputs_from_proto(i: Option<pb::Inputs>) -> Result<Inputs, Status> {
    let i = i.ok_or_else(|| Status::invalid_argument("inputs: the job names no dataset to fetch"))?;
    let bundle = |b: pb::Bundle, what: &str| -> Result<Bundle, Status> {
        let b = Bundle {
            files: b
                .files
                .into_iter()
                .map(|f| ContentFile { name: f.name, sha256: f.sha256, bytes: f.bytes })
                .collect(),
        };
        b.validate(what).map_err(Status::invalid_argument)?;
        Ok(b)
    };
    let [source] = i.sources.as_slice() else {
        return Err(Status::invalid_argument("inputs.sources: name exactly one, the submitter's data plane"));
    };
    Ok(Inputs {
        dataset: bundle(
            i.dataset.ok_or_else(|| Status::invalid_argument("inputs.dataset is missing"))?,
            "inputs.dataset",
        )?,
        model: i.model.map(|m| bundle(m, "inputs.model")).transpose()?,
        sources: vec![text("inputs.sources", source.clone())?],
    })
}

/// `job_secret`: the data-plane secret of this attempt (`identity::Secrets::job_secret`).
pub fn assignment_to_proto(a: &Assignment, job_secret: &swarm_proto::trust::Secret) -> pb::Assignment {
    pb::Assignment {
        kind: Some(pb::assignment::Kind::Train(pb::TrainAssignment {
            job_id: a.job.0,
            rank: a.rank.0,
            world_size: a.world_size,
            peers: a
                .peers
                .iter()
                .map(|p| pb::Peer { rank: p.rank.0, worker_id: p.worker.0, data_addr: p.data_addr.clone() })
                .collect(),
            recipe_json: serde_json::to_string(&a.recipe).expect("a recipe always serializes"),
            resume_dir: a.resume.as_ref().map(|r| r.dir.clone()).unwrap_or_default(),
            start_step: a.resume.as_ref().map_or(0, |r| r.step.0),
            batch_offset: a.share.offset as u32,
            batch_count: a.share.count as u32,
            attempt: a.attempt,
            job_secret: job_secret.0.to_vec(),
            inputs: Some(inputs_to_proto(&a.inputs)),
            resume_manifest_json: a
                .resume_manifest
                .as_ref()
                .map(|m| serde_json::to_string(m).expect("a manifest always serializes"))
                .unwrap_or_default(),
        })),
    }
}

pub fn replicate_to_proto(
    job: JobId,
    step: Step,
    rank: Rank,
    dir: String,
    files: Vec<ShardFile>,
    sources: Vec<String>,
) -> pb::Assignment {
    let files = files.into_iter().map(|f| pb::ShardFile { path: f.path, sha256: f.sha256, bytes: f.bytes }).collect();
    pb::Assignment {
        kind: Some(pb::assignment::Kind::Replicate(pb::ReplicateAssignment {
            job_id: job.0,
            step: step.0,
            rank: rank.0,
            dir,
            files,
            sources,
        })),
    }
}

pub fn cancel_to_proto(job: JobId, reason: &str) -> pb::Assignment {
    pb::Assignment {
        kind: Some(pb::assignment::Kind::Cancel(pb::CancelAssignment { job_id: job.0, reason: reason.into() })),
    }
}

pub fn step_report_from_proto(r: &pb::StepReport) -> StepReport {
    StepReport {
        job: JobId(r.job_id),
        worker: WorkerId(r.worker_id),
        rank: Rank(r.rank),
        attempt: r.attempt,
        step: Step(r.step),
        loss: r.loss,
        tokens: r.tokens,
        peak_memory_bytes: r.peak_memory_bytes,
        bytes_sent: r.bytes_sent,
        compute_s: r.compute_s,
        idle_s: r.idle_s,
    }
}

fn shard_files(files: Vec<pb::ShardFile>) -> Result<Vec<ShardFile>, Status> {
    if files.len() > limits::MAX_SHARD_FILES {
        return Err(Status::invalid_argument(format!(
            "{} shard files; the limit is {}",
            files.len(),
            limits::MAX_SHARD_FILES
        )));
    }
    files
        .into_iter()
        .map(|f| {
            if !swarm_sharding::content::valid_file_name(&f.path) || !swarm_sharding::content::valid_sha256(&f.sha256) {
                return Err(Status::invalid_argument(format!(
                    "shard file {:?} ({:?}): not a plain name and a sha256",
                    f.path, f.sha256
                )));
            }
            Ok(ShardFile { path: f.path, sha256: f.sha256, bytes: f.bytes })
        })
        .collect()
}

/// A checkpoint's step directory relative to a worker's state directory: `checkpoints/NAME/step-N`.
fn step_dir(dir: String) -> Result<String, Status> {
    let parts: Vec<&str> = dir.split('/').collect();
    let ok = matches!(parts.as_slice(), ["checkpoints", name, step]
        if swarm_sharding::content::valid_file_name(name) && swarm_sharding::job::parse_step_dir_name(step).is_some());
    if !ok {
        return Err(Status::invalid_argument(format!("checkpoint.dir {dir:?}: not checkpoints/NAME/step-N")));
    }
    Ok(dir)
}

pub fn checkpoint_from_proto(r: pb::CheckpointReport) -> Result<CheckpointReport, Status> {
    if r.replicas.len() > MAX_REPLICAS {
        return Err(Status::invalid_argument(format!("{} replicas; the limit is {MAX_REPLICAS}", r.replicas.len())));
    }
    Ok(CheckpointReport {
        job: JobId(r.job_id),
        worker: WorkerId(r.worker_id),
        rank: Rank(r.rank),
        attempt: r.attempt,
        step: Step(r.step),
        dir: step_dir(r.dir)?,
        files: shard_files(r.files)?,
        rng_state: text("rng_state", r.rng_state)?,
        data_cursor: r.data_cursor,
        replicas: r
            .replicas
            .into_iter()
            .map(|x| Ok((Rank(x.rank), shard_files(x.files)?)))
            .collect::<Result<_, Status>>()?,
    })
}

pub fn job_to_proto(j: &Job) -> pb::JobStatus {
    let last = j.last_checkpoint();
    pb::JobStatus {
        job_id: j.id.0,
        name: j.recipe.name.clone(),
        state: j.state.as_str().into(),
        error: j.error.clone().unwrap_or_default(),
        nodes: j.nodes as u32,
        workers: j.workers.iter().map(|w| w.0).collect(),
        step: j.step.0,
        total_steps: j.recipe.train.steps,
        loss: j.loss.unwrap_or(f64::NAN),
        tokens_per_s: j.tokens_per_s,
        peak_memory_bytes: j.peak_memory_bytes,
        bytes_sent: j.bytes_sent,
        compute_s: j.compute_s.clone(),
        idle_s: j.idle_s.clone(),
        last_checkpoint_step: last.map_or(0, |p| p.step.0),
        last_checkpoint_dir: last.map(|p| p.dir.clone()).unwrap_or_default(),
        first_loss: j.first_loss.unwrap_or(f64::NAN),
        start_step: j.start_step.0,
        submitted_unix_ms: j.submitted_unix_ms,
        losses: j.losses[j.losses.len().saturating_sub(limits::MAX_LOSS_HISTORY)..].to_vec(),
        losses_first_step: j.start_step.0 + 1 + j.losses.len().saturating_sub(limits::MAX_LOSS_HISTORY) as u64,
    }
}

pub fn worker_to_proto(w: &WorkerEntry, now_ms: u64) -> pb::WorkerStatus {
    pb::WorkerStatus {
        worker_id: w.id.0,
        name: w.name.clone(),
        devices: w.devices.iter().map(device_to_proto).collect(),
        data_addr: w.data_addr.clone(),
        state: if w.job.is_some() {
            "busy"
        } else if w.connected {
            "idle"
        } else {
            "registering"
        }
        .into(),
        job_id: w.job.map_or(0, |j| j.0),
        last_seen_ms_ago: now_ms.saturating_sub(w.last_seen_ms),
    }
}

/// A checkpoint's manifest from a submitter (`--resume-from`), checked before anything is
/// named or sized by it: every file a plain name with a sha256, every rank held somewhere.
pub fn manifest_from_submitter(json: &str) -> Result<swarm_sharding::Manifest, Status> {
    let bad = |e: String| Status::invalid_argument(format!("resume_from: {e}"));
    let m: swarm_sharding::Manifest = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    if m.ranks.is_empty() || m.ranks.len() > limits::MAX_WORLD_SIZE || m.ranks.len() != m.world_size as usize {
        return Err(bad(format!("{} ranks for a world of {}", m.ranks.len(), m.world_size)));
    }
    for r in &m.ranks {
        if r.files.len() > limits::MAX_SHARD_FILES || r.holders.is_empty() || r.holders.len() > MAX_REPLICAS {
            return Err(bad(format!("{}: {} files, {} holders", r.rank, r.files.len(), r.holders.len())));
        }
        for f in &r.files {
            if !swarm_sharding::content::valid_file_name(&f.path) || !swarm_sharding::content::valid_sha256(&f.sha256) {
                return Err(bad(format!("{}: {:?} is not a plain file name with a sha256", r.rank, f.path)));
            }
        }
        for h in &r.holders {
            if h.data_addr.len() > limits::MAX_TEXT_BYTES
                || h.dir.len() > limits::MAX_TEXT_BYTES
                || h.worker.len() > limits::MAX_TEXT_BYTES
            {
                return Err(bad(format!("{}: a holder's fields are too long", r.rank)));
            }
        }
    }
    Ok(m)
}
