//! Writing and reading checkpoints.
//!
//! A step directory holds, from rank 0, the model in the Hugging Face layout (`model.safetensors`
//! with HF names, `config.json`, `tokenizer.json`), so every checkpoint is also a model directory
//! that `swarm eval` and other tools load; and from every rank its shard of the optimizer state
//! (`optim-rankR-of-N.safetensors`: `exp_avg`, `exp_avg_sq` over its range of the flat parameter
//! vector, with the range in the metadata). Files are written under a temporary name, synced and
//! renamed; the coordinator's manifest, written last, makes the directory a checkpoint.

use crate::model::{Llama, param_shapes};
use anyhow::{Context, bail};
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::Path;
use swarm_sharding::{Manifest, ModelSpec, Rank, ShardFile};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Writes `name` in `dir` through a temporary file, synced, then renamed; returns its record.
fn write_atomic(dir: &Path, name: &str, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<ShardFile> {
    let tmp = dir.join(format!(".{name}.tmp"));
    write(&tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(ShardFile { path: name.to_string(), sha256: sha256_file(&path)?, bytes: std::fs::metadata(&path)?.len() })
}

fn save_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> anyhow::Result<()> {
    let views = tensors
        .iter()
        .map(|(n, shape, bytes)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))
}

/// What one rank wrote for one checkpoint, next to its files (`rank-00001.json`, written
/// last): its neighbours read it to copy those files as replicas, and check that it is this
/// job attempt's (not a listing left by an earlier run of the same recipe).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    pub job: u64,
    pub attempt: u64,
    pub rank: u32,
    pub files: Vec<ShardFile>,
}

impl Listing {
    /// The largest listing a neighbour reads.
    pub const MAX_BYTES: u64 = 64 << 10;

    pub fn file_name(rank: Rank) -> String {
        format!("rank-{:05}.json", rank.0)
    }

    /// Writes it in `dir`, atomically.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec(self)?;
        write_atomic(dir, &Self::file_name(Rank(self.rank)), |p| Ok(std::fs::write(p, &json)?)).map(|_| ())
    }
}

pub fn optim_file_name(rank: Rank, world: u32) -> String {
    format!("optim-rank{:05}-of-{:05}.safetensors", rank.0, world)
}

/// What one rank writes: its optimizer shard, and on rank 0 the model too.
pub struct RankShard<'a> {
    pub rank: Rank,
    pub world: u32,
    /// The whole flat parameter vector (f32 master weights): needed on rank 0 only.
    pub params: Option<&'a [f32]>,
    /// Elements in the flat parameter vector.
    pub total: usize,
    /// The ranges of the flat vector this rank's moments cover, in order (one for ZeRO-1 and
    /// pipeline ranks; a piece of every tensor under ZeRO-3).
    pub ranges: Vec<Range<usize>>,
    /// The moments of those ranges, concatenated.
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
    /// Optimizer steps taken (AdamW's bias-correction count).
    pub adam_step: u64,
}

pub fn write_rank(dir: &Path, spec: &ModelSpec, tokenizer: &Path, s: &RankShard<'_>) -> anyhow::Result<Vec<ShardFile>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    if s.rank.0 == 0 {
        let params = s.params.context("rank 0 writes the model: it needs the whole parameter vector")?;
        let mut tensors = Vec::new();
        let mut off = 0;
        for (name, shape) in param_shapes(spec) {
            let n: usize = shape.iter().product();
            tensors.push((name, shape, f32_bytes(&params[off..off + n])));
            off += n;
        }
        if off != params.len() || off != s.total {
            bail!("flat parameters have {} values, the model {}", params.len(), off);
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        files.push(write_atomic(dir, "model.safetensors", |p| save_tensors(p, &tensors, meta))?);
        let config = serde_json::to_vec_pretty(&spec.to_hf_config())?;
        files.push(write_atomic(dir, "config.json", |p| Ok(std::fs::File::create(p)?.write_all(&config)?))?);
        files.push(write_atomic(dir, "tokenizer.json", |p| {
            std::fs::copy(tokenizer, p).with_context(|| format!("copying {}", tokenizer.display()))?;
            Ok(())
        })?);
    }
    let n: usize = s.ranges.iter().map(|r| r.len()).sum();
    if s.exp_avg.len() != n || s.exp_avg_sq.len() != n {
        bail!(
            "optimizer shard of {} has {} / {} values for a range of {n}",
            s.rank,
            s.exp_avg.len(),
            s.exp_avg_sq.len()
        );
    }
    let tensors = vec![
        ("exp_avg".to_string(), vec![n], f32_bytes(s.exp_avg)),
        ("exp_avg_sq".to_string(), vec![n], f32_bytes(s.exp_avg_sq)),
    ];
    let ranges: Vec<String> = s.ranges.iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
    let mut meta = HashMap::from([
        ("ranges".to_string(), ranges.join(",")),
        ("total".to_string(), s.total.to_string()),
        ("adam_step".to_string(), s.adam_step.to_string()),
    ]);
    if let [r] = s.ranges.as_slice() {
        // The single-range form older readers know.
        meta.insert("start".to_string(), r.start.to_string());
        meta.insert("end".to_string(), r.end.to_string());
    }
    files.push(write_atomic(dir, &optim_file_name(s.rank, s.world), |p| save_tensors(p, &tensors, meta))?);
    Ok(files)
}

/// The optimizer state of the whole flat vector, reassembled from every rank's shard, so a
/// job may resume on a different number of workers.
pub struct FullOptimState {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub adam_step: u64,
}

/// Loads a committed checkpoint: checks every file against the manifest's checksum, then
/// reads the model and the optimizer state.
pub fn load(
    dir: &Path,
    manifest: &Manifest,
    spec: &ModelSpec,
    device: &candle_core::Device,
) -> anyhow::Result<(Llama, FullOptimState)> {
    for r in &manifest.ranks {
        for f in &r.files {
            let p = dir.join(&f.path);
            let got = sha256_file(&p)?;
            if got != f.sha256 {
                bail!("{} is corrupt: sha256 {got}, the manifest says {}", p.display(), f.sha256);
            }
        }
    }
    let model = Llama::load(spec, dir, device)?;
    let total = model.num_params();
    let mut exp_avg = vec![f32::NAN; total];
    let mut exp_avg_sq = vec![f32::NAN; total];
    let mut covered = 0usize;
    let mut adam_step = None;
    for r in &manifest.ranks {
        let name = optim_file_name(r.rank, manifest.world_size);
        let p = dir.join(&name);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("reading {}", p.display()))?;
        let info = meta.metadata().clone().unwrap_or_default();
        let num = |k: &str| -> anyhow::Result<usize> {
            info.get(k).and_then(|v| v.parse().ok()).with_context(|| format!("{}: metadata {k} missing", p.display()))
        };
        let ranges: Vec<Range<usize>> = match info.get("ranges") {
            Some(list) => list
                .split(',')
                .map(|r| {
                    let (a, b) = r.split_once('-').with_context(|| format!("{}: bad range {r:?}", p.display()))?;
                    Ok(a.parse()?..b.parse()?)
                })
                .collect::<anyhow::Result<_>>()?,
            None => std::iter::once(num("start")?..num("end")?).collect(),
        };
        for r in &ranges {
            if num("total")? != total || r.end > total || r.start > r.end {
                bail!(
                    "{}: range {}..{} of {} does not fit a model of {total} parameters",
                    p.display(),
                    r.start,
                    r.end,
                    num("total")?
                );
            }
        }
        let step = num("adam_step")? as u64;
        if *adam_step.get_or_insert(step) != step {
            bail!("{}: adam_step {step} differs from another rank's", p.display());
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let (m, v) = (bytes_f32(st.tensor("exp_avg")?.data()), bytes_f32(st.tensor("exp_avg_sq")?.data()));
        let n: usize = ranges.iter().map(|r| r.len()).sum();
        if m.len() != n || v.len() != n {
            bail!("{}: {} moments for ranges of {n} values", p.display(), m.len());
        }
        let mut at = 0;
        for r in ranges {
            exp_avg[r.clone()].copy_from_slice(&m[at..at + r.len()]);
            exp_avg_sq[r.clone()].copy_from_slice(&v[at..at + r.len()]);
            at += r.len();
            covered += r.len();
        }
    }
    if covered != total || exp_avg.iter().any(|v| v.is_nan()) {
        bail!("{}: the optimizer shards cover {covered} of {total} parameters", dir.display());
    }
    Ok((model, FullOptimState { exp_avg, exp_avg_sq, adam_step: adam_step.unwrap_or(0) }))
}
