//! Held-out evaluation: mean next-token cross-entropy and perplexity of a model directory
//! (Hugging Face layout, which our checkpoints also follow) on a text file.

use crate::data::encode_file;
use crate::model::Llama;
use anyhow::{Context, bail};
use candle_core::Tensor;
use serde::Serialize;
use std::path::Path;
use swarm_sharding::ModelSpec;

#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub model: String,
    pub text: String,
    pub seq_len: usize,
    pub tokens: u64,
    pub windows: u64,
    /// Tokens whose next-token prediction was scored: windows × (seq_len − 1).
    pub predicted_tokens: u64,
    pub mean_cross_entropy: f64,
    pub perplexity: f64,
}

/// Reads `config.json` of a model directory.
pub fn read_spec(dir: &Path) -> anyhow::Result<ModelSpec> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: no config.json; is this a model directory?", dir.display()))?;
    ModelSpec::from_hf_config(&text, &p.display().to_string()).map_err(anyhow::Error::msg)
}

/// Cuts the tokens of `text` into consecutive, non-overlapping windows of `seq_len` tokens (the
/// remainder dropped) and averages the cross-entropy of every next-token prediction in them.
pub fn evaluate(model_dir: &Path, text: &Path, seq_len: usize, batch: usize) -> anyhow::Result<EvalResult> {
    if seq_len < 2 {
        bail!("--seq-len must be at least 2, got {seq_len}");
    }
    let spec = read_spec(model_dir)?;
    if seq_len > spec.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} is longer than the model's max_position_embeddings ({})",
            spec.max_position_embeddings
        );
    }
    let tokenizer = model_dir.join("tokenizer.json");
    let ids = encode_file(&tokenizer, text)?;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= spec.vocab_size) {
        bail!("token id {bad} from {} is outside the model's vocabulary of {}", tokenizer.display(), spec.vocab_size);
    }
    let windows = ids.len() / seq_len;
    if windows == 0 {
        bail!(
            "{} has {} tokens, fewer than one window of --seq-len {seq_len}; use a longer text or a shorter --seq-len",
            text.display(),
            ids.len()
        );
    }
    let device = candle_core::Device::Cpu;
    let model = Llama::load(&spec, model_dir, &device)?;
    let mut total = 0f64;
    for first in (0..windows).step_by(batch.max(1)) {
        let n = batch.max(1).min(windows - first);
        let chunk = ids[first * seq_len..(first + n) * seq_len].to_vec();
        let t = Tensor::from_vec(chunk, (n, seq_len), &device)?;
        let loss = f64::from(model.loss(&t)?.to_scalar::<f32>()?);
        total += loss * (n * (seq_len - 1)) as f64;
    }
    let predicted = (windows * (seq_len - 1)) as u64;
    let mean = total / predicted as f64;
    Ok(EvalResult {
        model: model_dir.display().to_string(),
        text: text.display().to_string(),
        seq_len,
        tokens: ids.len() as u64,
        windows: windows as u64,
        predicted_tokens: predicted,
        mean_cross_entropy: mean,
        perplexity: mean.exp(),
    })
}
