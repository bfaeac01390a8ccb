//! The submitter's side of "nothing shared but the network": it serves the recipe's dataset
//! and model to the job's workers from its own disk, and pulls committed checkpoints back.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use swarm_proto::trust::{Client, Secret};
use swarm_proto::v1 as pb;
use swarm_sharding::job::step_dir_name;
use swarm_sharding::{Bundle, Inputs, Manifest, Recipe, Step};
use swarm_worker::comm::dataplane::DataPlane;
use swarm_worker::comm::fetch::{Fetcher, FileServer};
use swarm_worker::content::{self, HashCache};

/// The port a submitter serves its dataset and model on, when it is free (else any port).
pub const SERVE_PORT: u16 = 7452;
/// The files of a prepared dataset that workers need.
const DATASET_FILES: [&str; 3] = ["index.json", "tokens.bin", "tokenizer.json"];

/// A running file server for one job's inputs.
pub struct Serving {
    /// What to send with the job: the bundles and this server's address.
    pub inputs: Inputs,
    /// The checkpoint to continue from (`--resume-from`), held by this server.
    pub resume_from: Option<Manifest>,
    server: Arc<FileServer>,
    _dp: DataPlane,
}

impl Serving {
    /// Bytes sent to workers so far.
    pub fn bytes_sent(&self) -> u64 {
        self.server.bytes_sent()
    }
}

/// The cluster's fetch secret, from the coordinator (admin only).
pub async fn fetch_secret(client: &mut Client) -> anyhow::Result<Secret> {
    let r = client
        .content_access(pb::ContentAccessRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("asking the coordinator for content access: {}", e.message()))?
        .into_inner();
    <[u8; 32]>::try_from(r.fetch_secret.as_slice())
        .map(Secret)
        .map_err(|_| anyhow::anyhow!("the coordinator's fetch secret is not 32 bytes"))
}

/// The bundles of the recipe's dataset and model (hashed, with a cache in the data directory).
pub fn bundles(recipe: &Recipe) -> anyhow::Result<(Bundle, Option<Bundle>)> {
    let mut cache = HashCache::open(crate::default_data_dir().join("content-hashes.json"));
    let ds = &recipe.data.dataset;
    let dataset = content::bundle_of_dir(ds, |n| DATASET_FILES.contains(&n), &mut cache)
        .with_context(|| format!("data.dataset = {}", ds.display()))?;
    if dataset.files.len() != DATASET_FILES.len() {
        bail!("data.dataset = {}: a prepared dataset has {}", ds.display(), DATASET_FILES.join(", "));
    }
    let model = match &recipe.model.hf_dir {
        Some(d) => Some(
            content::bundle_of_dir(d, content::is_model_file, &mut cache)
                .with_context(|| format!("model.hf_dir = {}", d.display()))?,
        ),
        None => None,
    };
    cache.save();
    Ok((dataset, model))
}

/// Reads a committed checkpoint on this machine (a step directory with its `manifest.json`).
pub fn local_checkpoint(dir: &Path) -> anyhow::Result<Manifest> {
    let p = dir.join(Manifest::FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!("--resume-from {}: no committed checkpoint there (no {})", dir.display(), Manifest::FILE)
    })?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", p.display()))
}

/// Serves the recipe's dataset and model (and the checkpoint in `resume_from`, if any) on
/// `listen_host` (port [`SERVE_PORT`] when free, else any) to holders of `secret`; workers
/// reach it at `advertise_host`.
pub fn serve(
    recipe: &Recipe,
    secret: Secret,
    listen_host: &str,
    advertise_host: &str,
    resume_from: Option<&Path>,
) -> anyhow::Result<Serving> {
    let (dataset, model) = bundles(recipe)?;
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let mut add = |b: &Bundle, dir: &Path| {
        let rel = content::bundle_rel_dir(b);
        for f in &b.files {
            files.insert(format!("{rel}/{}", f.name), dir.join(&f.name));
        }
    };
    add(&dataset, &recipe.data.dataset);
    if let (Some(b), Some(d)) = (&model, &recipe.model.hf_dir) {
        add(b, d);
    }
    let resume = match resume_from {
        Some(dir) => {
            let m = local_checkpoint(dir)?;
            let rel = content::step_rel_dir(&m.name, m.step);
            for f in m.ranks.iter().flat_map(|r| &r.files) {
                files.insert(format!("{rel}/{}", f.path), dir.join(&f.path));
            }
            Some((m, rel))
        }
        None => None,
    };
    let dp = DataPlane::bind(&format!("{listen_host}:{SERVE_PORT}"))
        .or_else(|_| DataPlane::bind(&format!("{listen_host}:0")))
        .with_context(|| format!("listening on {listen_host} to serve the dataset to the workers"))?;
    let server = Arc::new(FileServer::new(secret, Arc::new(move |p: &str| files.get(p).cloned())));
    dp.serve_files(server.clone());
    let addr = format!("{advertise_host}:{}", dp.local_addr().port());
    // This machine holds every file of the checkpoint to continue from.
    let resume_from = resume.map(|(mut m, rel)| {
        for r in &mut m.ranks {
            r.holders =
                vec![swarm_sharding::Holder { worker: String::new(), data_addr: addr.clone(), dir: rel.clone() }];
        }
        m
    });
    let inputs = Inputs { dataset, model, sources: vec![addr] };
    Ok(Serving { inputs, resume_from, server, _dp: dp })
}

/// The manifest of `name`'s committed checkpoint at `step` (0: the latest), with the hosts
/// that hold its files.
pub async fn manifest(client: &mut Client, name: &str, step: u64) -> anyhow::Result<Manifest> {
    let r = client
        .get_checkpoint(pb::GetCheckpointRequest { name: name.into(), step })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    serde_json::from_str(&r.manifest_json).context("decoding the checkpoint's manifest")
}

/// Fetches the checkpoint `m` into `root/step-NNNNNN` (a Hugging Face model directory with the
/// optimizer shards and the manifest); returns that directory.
pub async fn pull(m: Manifest, secret: Secret, root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(step_dir_name(m.step));
    let d = dir.clone();
    tokio::task::spawn_blocking(move || {
        content::fetch_checkpoint(&m, &d, &Fetcher::new(secret), &AtomicBool::new(false))
    })
    .await??;
    Ok(dir)
}

/// Pulls `name`'s checkpoint at `step` into `root`.
pub async fn pull_step(
    client: &mut Client,
    secret: Secret,
    name: &str,
    step: Step,
    root: &Path,
) -> anyhow::Result<PathBuf> {
    let m = manifest(client, name, step.0).await?;
    pull(m, secret, root).await
}
