//! A worker's own directory, and what it fetches into it.
//!
//! Everything a worker holds lives under its state directory:
//! - `content/<bundle id>/NAME`: datasets and starting models, by the hash of their listing;
//! - `checkpoints/<recipe name>/step-NNNNNN/`: the checkpoint files it wrote, the replicas it
//!   copied from its neighbours, and those it fetched to resume.
//!
//! A recipe names paths on the submitter's machine only; the worker fetches their content
//! ([`materialize`], [`fetch_checkpoint`]) and trains on its local copies.

use crate::comm::fetch::{Fetcher, Source, Want, with_progress};
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use swarm_sharding::content::valid_file_name;
use swarm_sharding::job::step_dir_name;
use swarm_sharding::{Bundle, ContentFile, Manifest, Step};

/// The folder of a state directory that holds bundles.
pub const CONTENT_DIR: &str = "content";
/// The folder of a state directory that holds checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// The content hash that names a bundle: SHA-256 over its sorted listing.
pub fn bundle_id(b: &Bundle) -> String {
    let mut h = Sha256::new();
    for f in &b.files {
        h.update(format!("{}\0{}\0{}\n", f.name, f.sha256, f.bytes));
    }
    hex::encode(h.finalize())
}

/// Where a bundle is served from and kept, relative to a state directory.
pub fn bundle_rel_dir(b: &Bundle) -> String {
    format!("{CONTENT_DIR}/{}", bundle_id(b))
}

/// A checkpoint's step directory, relative to a state directory.
pub fn step_rel_dir(name: &str, step: Step) -> String {
    format!("{CHECKPOINTS_DIR}/{name}/{}", step_dir_name(step))
}

/// Files of a Hugging Face model directory that training reads: the config, the safetensors
/// weights and their index, the tokenizer. Other formats of the same weights (`.bin`, `.pth`,
/// `.gguf`), subdirectories, and the optimizer state and records of a Swarm checkpoint used as
/// a starting model stay on the submitter's machine.
pub fn is_model_file(name: &str) -> bool {
    let swarm_checkpoint_extra = name.starts_with("optim-rank") || name.starts_with("rank-") || name == Manifest::FILE;
    !swarm_checkpoint_extra
        && [".json", ".safetensors", ".model", ".txt", ".jinja"].iter().any(|ext| name.ends_with(ext))
}

/// The bundle of files in `dir` that `keep` accepts (plain, non-hidden names), hashed. Hashes
/// are remembered in `cache` by path, size and modification time, so a model is read once.
pub fn bundle_of_dir(dir: &Path, keep: impl Fn(&str) -> bool, cache: &mut HashCache) -> anyhow::Result<Bundle> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        let meta = std::fs::metadata(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
        if !meta.is_file() || name.starts_with('.') || !keep(&name) {
            continue;
        }
        if !valid_file_name(&name) {
            bail!(
                "{}: the name {name:?} cannot be sent to workers (use ASCII letters, digits, '-', '_', '.')",
                dir.display()
            );
        }
        let sha256 = cache.sha256(&entry.path(), &meta)?;
        files.push(ContentFile { name, sha256, bytes: meta.len() });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let b = Bundle { files };
    b.validate(&dir.display().to_string()).map_err(anyhow::Error::msg)?;
    Ok(b)
}

/// SHA-256 of files, remembered by (path, size, mtime) in a JSON file.
#[derive(Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: HashMap<String, String>,
    changed: bool,
}

impl HashCache {
    /// Loads `path` if it exists (a damaged cache is ignored: hashes are recomputed).
    pub fn open(path: PathBuf) -> HashCache {
        let entries = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashCache { path: Some(path), entries, changed: false }
    }

    fn sha256(&mut self, path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<String> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let key = format!("{}\0{}\0{}", abs.display(), meta.len(), mtime.map_or(0, |d| d.as_nanos()));
        if let Some(h) = self.entries.get(&key) {
            return Ok(h.clone());
        }
        if meta.len() > 256 << 20 {
            tracing::info!("hashing {} ({} MB)", path.display(), meta.len() / 1_000_000);
        }
        let h = crate::checkpoint::sha256_file(path)?;
        self.entries.insert(key, h.clone());
        self.changed = true;
        Ok(h)
    }

    /// Writes the cache back if it learned anything.
    pub fn save(&self) {
        if let (Some(p), true) = (&self.path, self.changed) {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let tmp = p.with_extension("tmp");
            if serde_json::to_vec(&self.entries).ok().and_then(|j| std::fs::write(&tmp, j).ok()).is_some() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
}

/// Makes `<state>/content/<id>/` hold the files of `bundle` that `only` accepts, fetching what
/// is missing from `sources` (data-plane addresses; each serves it as `content/<id>/NAME`);
/// returns the folder.
pub fn materialize(
    state: &Path,
    bundle: &Bundle,
    only: impl Fn(&str) -> bool,
    sources: &[String],
    fetcher: &Fetcher,
    what: &str,
    cancel: &AtomicBool,
) -> anyhow::Result<PathBuf> {
    let rel = bundle_rel_dir(bundle);
    let dir = state.join(&rel);
    let missing: Vec<&ContentFile> =
        bundle.files.iter().filter(|f| only(&f.name) && !dir.join(&f.name).is_file()).collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let total: u64 = missing.iter().map(|f| f.bytes).sum();
    tracing::info!("fetching {what}: {} file(s), {} MB", missing.len(), total / 1_000_000);
    let t0 = std::time::Instant::now();
    with_progress(&format!("fetching {what}"), total, &fetcher.received, || -> anyhow::Result<()> {
        for f in missing {
            let path = format!("{rel}/{}", f.name);
            let from: Vec<Source> = sources.iter().map(|a| Source::new(a.clone(), path.clone())).collect();
            fetcher
                .fetch(&from, &Want { sha256: &f.sha256, bytes: f.bytes }, &dir.join(&f.name), cancel)
                .with_context(|| {
                    format!(
                        "fetching {what} (from the submitting machine, whose `swarm train` serves it on port 7452, and the job's other workers: check that they are reachable from this one)"
                    )
                })?;
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!("fetched {what}: {} MB in {secs:.1} s ({:.0} MB/s)", total / 1_000_000, total as f64 / secs / 1e6);
    Ok(dir)
}

/// Makes `dest` hold every file of the committed checkpoint `m` (fetched from its holders,
/// each verified) and its `manifest.json`.
pub fn fetch_checkpoint(m: &Manifest, dest: &Path, fetcher: &Fetcher, cancel: &AtomicBool) -> anyhow::Result<()> {
    let total: u64 = m.ranks.iter().flat_map(|r| &r.files).map(|f| f.bytes).sum();
    with_progress(&format!("fetching the checkpoint of {}", m.step), total, &fetcher.received, || {
        for r in &m.ranks {
            for f in &r.files {
                if !valid_file_name(&f.path) {
                    bail!("the manifest of {} names {:?}, not a plain file name", m.step, f.path);
                }
                let from: Vec<Source> = r
                    .holders
                    .iter()
                    .map(|h| Source::new(h.data_addr.clone(), format!("{}/{}", h.dir, f.path)))
                    .collect();
                let want = Want { sha256: &f.sha256, bytes: f.bytes };
                fetcher.fetch(&from, &want, &dest.join(&f.path), cancel).with_context(|| {
                    let names: Vec<&str> = r.holders.iter().map(|h| h.worker.as_str()).collect();
                    format!("fetching {}'s checkpoint of {} (held by {})", r.rank, m.step, names.join(", "))
                })?;
            }
        }
        Ok(())
    })?;
    let json = serde_json::to_vec_pretty(m)?;
    let tmp = dest.join(format!(".{}.tmp", Manifest::FILE));
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest.join(Manifest::FILE))
        .with_context(|| format!("writing the manifest in {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_becomes_a_bundle_named_by_its_content() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), b"{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), b"weights").unwrap();
        std::fs::write(d.path().join("pytorch_model.bin"), b"the same weights again").unwrap();
        std::fs::write(d.path().join(".gitattributes"), b"x").unwrap();
        std::fs::write(d.path().join("optim-rank00000-of-00001.safetensors"), b"moments").unwrap();
        std::fs::write(d.path().join("manifest.json"), b"{}").unwrap();
        std::fs::create_dir(d.path().join("original")).unwrap();
        let cache_path = d.path().join("cache/hashes.json");
        let mut cache = HashCache::open(cache_path.clone());
        let b = bundle_of_dir(d.path(), is_model_file, &mut cache).unwrap();
        cache.save();
        let names: Vec<&str> = b.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors"]);
        assert_eq!(b.files[1].sha256, hex::encode(Sha256::digest(b"weights")));
        let id = bundle_id(&b);
        // The cache answers the second time; a changed file changes the id.
        let mut cache = HashCache::open(cache_path);
        assert_eq!(bundle_id(&bundle_of_dir(d.path(), is_model_file, &mut cache).unwrap()), id);
        assert!(!cache.changed);
        std::fs::write(d.path().join("config.json"), b"{\"a\":1}").unwrap();
        assert_ne!(bundle_id(&bundle_of_dir(d.path(), is_model_file, &mut cache).unwrap()), id);
    }
}
