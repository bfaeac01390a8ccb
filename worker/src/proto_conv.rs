//! The one place where the worker converts between wire types and domain types.

use crate::train::StepStats;
use anyhow::{Context, bail};
use swarm_proto::v1 as pb;
use swarm_sharding::plan::BatchShare;
use swarm_sharding::{
    Assignment, Bundle, ContentFile, DeviceInfo, Inputs, JobId, Manifest, Peer, Rank, Recipe, ResumePoint, Step,
    WorkerId,
};

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

pub fn assignment_from_proto(t: pb::TrainAssignment) -> anyhow::Result<Assignment> {
    if t.peers.len() > swarm_proto::limits::MAX_WORLD_SIZE || t.peers.len() != t.world_size as usize {
        bail!("assignment lists {} peers for a world of {}", t.peers.len(), t.world_size);
    }
    if t.rank >= t.world_size {
        bail!("assignment gives rank {} in a world of {}", t.rank, t.world_size);
    }
    let recipe: Recipe = serde_json::from_str(&t.recipe_json).context("decoding the assignment's recipe")?;
    recipe.validate().context("the assignment's recipe")?;
    let peers = t
        .peers
        .into_iter()
        .map(|p| Peer { rank: Rank(p.rank), worker: WorkerId(p.worker_id), data_addr: p.data_addr })
        .collect();
    Ok(Assignment {
        job: JobId(t.job_id),
        rank: Rank(t.rank),
        world_size: t.world_size,
        peers,
        recipe,
        resume: (!t.resume_dir.is_empty()).then_some(ResumePoint { dir: t.resume_dir, step: Step(t.start_step) }),
        share: BatchShare { rank: Rank(t.rank), offset: t.batch_offset as usize, count: t.batch_count as usize },
        attempt: t.attempt,
        inputs: inputs_from_proto(t.inputs)?,
        resume_manifest: match t.resume_manifest_json.as_str() {
            "" => None,
            json => Some(Box::new(
                serde_json::from_str::<Manifest>(json).context("decoding the assignment's resume manifest")?,
            )),
        },
    })
}

pub fn bundle_to_proto(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        files: b
            .files
            .iter()
            .map(|f| pb::ContentFile { name: f.name.clone(), sha256: f.sha256.clone(), bytes: f.bytes })
            .collect(),
    }
}

pub fn inputs_to_proto(i: &Inputs) -> pb::Inputs {
    pb::Inputs {
        dataset: Some(bundle_to_proto(&i.dataset)),
        model: i.model.as_ref().map(bundle_to_proto),
        sources: i.sources.clone(),
    }
}

/// Checked before anything is named or sized by it.
pub fn inputs_from_proto(i: Option<pb::Inputs>) -> anyhow::Result<Inputs> {
    let i = i.context("the assignment names no inputs (a coordinator of an older version?)")?;
    let bundle = |b: pb::Bundle, what: &str| -> anyhow::Result<Bundle> {
        let b = Bundle {
            files: b
                .files
                .into_iter()
                .map(|f| ContentFile { name: f.name, sha256: f.sha256, bytes: f.bytes })
                .collect(),
        };
        b.validate(what).map_err(anyhow::Error::msg)?;
        Ok(b)
    };
    if i.sources.len() > swarm_proto::limits::MAX_WORLD_SIZE + 1 {
        bail!("the assignment lists {} content sources", i.sources.len());
    }
    Ok(Inputs {
        dataset: bundle(i.dataset.context("the assignment names no dataset")?, "the dataset")?,
        model: i.model.map(|m| bundle(m, "the model")).transpose()?,
        sources: i.sources,
    })
}

pub fn step_to_proto(a: &Assignment, worker: WorkerId, s: &StepStats) -> pb::StepReport {
    pb::StepReport {
        job_id: a.job.0,
        worker_id: worker.0,
        rank: a.rank.0,
        step: s.step.0,
        loss: s.loss,
        tokens: s.tokens,
        compute_s: s.compute_s,
        comm_s: s.comm_s,
        idle_s: s.idle_s,
        peak_memory_bytes: s.peak_memory_bytes,
        lr: s.lr,
        grad_norm: s.grad_norm,
        bytes_sent: s.bytes_sent,
        attempt: a.attempt,
    }
}

fn shard_files(files: Vec<swarm_sharding::ShardFile>) -> Vec<pb::ShardFile> {
    files.into_iter().map(|f| pb::ShardFile { path: f.path, sha256: f.sha256, bytes: f.bytes }).collect()
}

/// A rank's checkpoint report: its own files and the replicas it copied.
pub fn checkpoint_to_proto(a: &Assignment, worker: WorkerId, c: crate::train::CheckpointDone) -> pb::CheckpointReport {
    let crate::train::CheckpointDone { step, dir, files, replicas, rng_state, data_cursor } = c;
    pb::CheckpointReport {
        job_id: a.job.0,
        worker_id: worker.0,
        rank: a.rank.0,
        step: step.0,
        dir,
        files: shard_files(files),
        rng_state,
        data_cursor,
        attempt: a.attempt,
        replicas: replicas.into_iter().map(|(r, f)| pb::Replica { rank: r.0, files: shard_files(f) }).collect(),
    }
}

/// A replicate assignment's files, checked before they name anything on disk.
pub fn replicate_from_proto(r: &pb::ReplicateAssignment) -> anyhow::Result<Vec<swarm_sharding::ShardFile>> {
    use swarm_sharding::content::{valid_file_name, valid_sha256};
    let parts: Vec<&str> = r.dir.split('/').collect();
    let dir_ok = matches!(parts.as_slice(), ["checkpoints", name, step]
        if valid_file_name(name) && swarm_sharding::job::parse_step_dir_name(step).is_some());
    if !dir_ok || r.files.len() > swarm_proto::limits::MAX_SHARD_FILES || r.sources.len() > 8 {
        bail!("a replicate assignment with dir {:?}, {} files, {} sources", r.dir, r.files.len(), r.sources.len());
    }
    r.files
        .iter()
        .map(|f| {
            if !valid_file_name(&f.path) || !valid_sha256(&f.sha256) {
                bail!("a replicate assignment names {:?} ({:?})", f.path, f.sha256);
            }
            Ok(swarm_sharding::ShardFile { path: f.path.clone(), sha256: f.sha256.clone(), bytes: f.bytes })
        })
        .collect()
}
