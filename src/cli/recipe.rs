//! Loading a recipe on the client: parse and validate, make paths absolute, prepare the dataset
//! when the recipe says how, and resolve the model shape against the dataset's tokenizer.

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use swarm_sharding::Recipe;
use swarm_worker::data::{self, Dataset, PrepareOptions, PreparePhase, corpus};

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Reads and validates a recipe file. Relative paths in it are relative to the current directory.
pub fn load(path: &Path) -> anyhow::Result<Recipe> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
    let mut r = Recipe::from_yaml(&text).map_err(|e| anyhow::anyhow!("recipe {}: {e}", path.display()))?;
    r.data.dataset = absolute(&r.data.dataset);
    r.checkpoint.dir = absolute(&r.checkpoint.dir);
    if let Some(d) = &r.model.hf_dir {
        r.model.hf_dir = Some(absolute(d));
    }
    Ok(r)
}

/// Builds the recipe's dataset if it is missing and the recipe names a source.
pub fn ensure_dataset(r: &Recipe, path: &Path, show_progress: bool) -> anyhow::Result<()> {
    let out = &r.data.dataset;
    if out.join(data::INDEX_FILE).is_file() {
        return Ok(());
    }
    let Some(source) = &r.data.prepare_from else {
        bail!(
            "recipe {}: data.dataset = {}: no prepared dataset there; run `swarm data prepare --input PATH --out {}`, or set data.prepare_from: python-stdlib",
            path.display(),
            out.display(),
            out.display()
        );
    };
    let input = if source == "python-stdlib" { corpus::find_python_stdlib()? } else { absolute(Path::new(source)) };
    if !input.exists() {
        bail!("recipe {}: data.prepare_from = {source}: {} does not exist", path.display(), input.display());
    }
    let tokenizer = r.model.hf_dir.as_ref().map(|d| d.join("tokenizer.json")).filter(|p| p.is_file());
    let opts = PrepareOptions {
        vocab_size: r.data.vocab_size,
        tokenizer,
        max_bytes: r.data.max_bytes,
        text_field: "text".into(),
    };
    prepare_with_progress(&[input], out, &opts, show_progress)?;
    Ok(())
}

/// Runs `data::prepare` with a spinner.
pub fn prepare_with_progress(
    inputs: &[PathBuf],
    out: &Path,
    opts: &PrepareOptions,
    show: bool,
) -> anyhow::Result<data::DatasetInfo> {
    let pb = if show { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{spinner} preparing {prefix}: {msg} [{elapsed}]").expect("valid template"),
    );
    pb.set_prefix(out.display().to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let info = data::prepare(inputs, out, opts, &mut |p| {
        let what = match p.phase {
            PreparePhase::Reading => {
                format!("reading {}/{} files, {:.1} MB", p.files_done, p.files_total, p.bytes as f64 / 1e6)
            }
            PreparePhase::Training => format!("training the tokenizer on {:.1} MB", p.bytes as f64 / 1e6),
            PreparePhase::Encoding => format!("tokenizing: {} documents, {} tokens", p.documents, p.tokens),
            PreparePhase::Writing => "writing".into(),
            PreparePhase::Done => "done".into(),
        };
        pb.set_message(what);
    })?;
    pb.finish_and_clear();
    if show {
        eprintln!(
            "prepared {}: {} tokens from {} documents, vocabulary {}{}",
            out.display(),
            info.n_tokens,
            info.n_documents,
            info.vocab_size,
            if info.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} non-UTF-8 files skipped", info.skipped.len())
            }
        );
    }
    Ok(info)
}

/// Fills in the model shape from the dataset's tokenizer (and the HF config) and checks that the
/// dataset holds at least one window.
pub fn resolve(r: &mut Recipe, path: &Path) -> anyhow::Result<()> {
    let ds = Dataset::open(&r.data.dataset)?;
    let config =
        match &r.model.hf_dir {
            Some(d) => Some(std::fs::read_to_string(d.join("config.json")).with_context(|| {
                format!("recipe {}: model.hf_dir = {}: no config.json", path.display(), d.display())
            })?),
            None => None,
        };
    r.resolve_model(config.as_deref(), ds.info().vocab_size as usize)
        .map_err(|e| anyhow::anyhow!("recipe {}: {e}", path.display()))?;
    ds.sample_order(r.train.seq_len, r.train.seed)?;
    Ok(())
}
