//! The one place where the coordinator converts between wire types and domain types, and where
//! the caps on repeated and free-text fields are checked.

use crate::job::Job;
use crate::machine::{CheckpointReport, Rejection, StepReport, WorkerEntry};
use swarm_proto::limits;
use swarm_proto::v1 as pb;
use swarm_sharding::{Assignment, DeviceInfo, DeviceKind, JobId, Rank, ShardFile, Step, WorkerId};
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

pub fn checkpoint_from_proto(r: pb::CheckpointReport) -> Result<CheckpointReport, Status> {
    if r.files.len() > limits::MAX_SHARD_FILES {
        return Err(Status::invalid_argument(format!(
            "{} shard files; the limit is {}",
            r.files.len(),
            limits::MAX_SHARD_FILES
        )));
    }
    Ok(CheckpointReport {
        job: JobId(r.job_id),
        worker: WorkerId(r.worker_id),
        rank: Rank(r.rank),
        attempt: r.attempt,
        step: Step(r.step),
        dir: text("checkpoint.dir", r.dir)?,
        files: r
            .files
            .into_iter()
            .map(|f| {
                Ok(ShardFile {
                    path: text("file.path", f.path)?,
                    sha256: text("file.sha256", f.sha256)?,
                    bytes: f.bytes,
                })
            })
            .collect::<Result<_, Status>>()?,
        rng_state: text("rng_state", r.rng_state)?,
        data_cursor: r.data_cursor,
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
