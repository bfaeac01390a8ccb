//! The coordinator's record of committed checkpoints: `<data dir>/checkpoints/<recipe
//! name>/step-NNNNNN/manifest.json`. The shards are on the workers that wrote and copied them
//! (the manifest's holders); the coordinator never reads them. The manifest is written under a
//! temporary name, synced and renamed, so a step directory either has a complete
//! `manifest.json` or is not a checkpoint.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::Path;
use swarm_sharding::job::{parse_step_dir_name, step_dir_name};
use swarm_sharding::{Manifest, ResumePoint};

/// Writes `<dir>/manifest.json` atomically (creating `dir`).
pub fn commit(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let expected = step_dir_name(manifest.step);
    if dir.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        bail!("checkpoint directory {} is not named {expected}", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(manifest).context("encoding the manifest")?;
    let tmp = dir.join(format!("{}.tmp", Manifest::FILE));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&json).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    let final_path = dir.join(Manifest::FILE);
    std::fs::rename(&tmp, &final_path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The committed checkpoint with the highest step under `root`, if any. Directories without a
/// manifest (a checkpoint cut off half-way) are skipped.
pub fn latest_committed(root: &Path) -> anyhow::Result<Option<ResumePoint>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    let mut best: Option<ResumePoint> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir_name) else { continue };
        let manifest_path = entry.path().join(Manifest::FILE);
        let Ok(text) = std::fs::read_to_string(&manifest_path) else { continue };
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("reading {}", manifest_path.display()))?;
        if m.step != step {
            bail!("{} says step {} but its directory is {}", manifest_path.display(), m.step.0, name.to_string_lossy());
        }
        if best.as_ref().is_none_or(|b| b.step < step) {
            let dir = std::path::absolute(entry.path()).unwrap_or_else(|_| entry.path());
            best = Some(ResumePoint { dir: dir.display().to_string(), step });
        }
    }
    Ok(best)
}

/// Deletes a committed checkpoint directory; refuses anything that is not one.
pub fn prune(dir: &Path) -> anyhow::Result<()> {
    let named = dir.file_name().and_then(|n| n.to_str()).and_then(parse_step_dir_name).is_some();
    if !named || !dir.join(Manifest::FILE).is_file() {
        bail!("{} is not a committed checkpoint directory; not deleting it", dir.display());
    }
    // Remove the manifest first so a half-deleted directory is never taken for a checkpoint.
    std::fs::remove_file(dir.join(Manifest::FILE))?;
    std::fs::remove_dir_all(dir).with_context(|| format!("deleting {}", dir.display()))
}
