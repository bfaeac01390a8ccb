//! `swarm data prepare`: tokenize the user's own text into a dataset directory.

use clap::Args;
use std::path::PathBuf;
use swarm_worker::data::PrepareOptions;

#[derive(Args)]
pub struct PrepareArgs {
    /// Text or JSONL files, or directories of them (repeatable).
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// The dataset directory to create (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Vocabulary of the BPE tokenizer trained on the input.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Use this tokenizer.json instead of training one (e.g. a Hugging Face model's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The most input bytes to read.
    #[arg(long, default_value_t = swarm_worker::data::DEFAULT_MAX_BYTES)]
    pub max_bytes: u64,
    /// The JSONL field that holds each document's text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: PrepareArgs) -> anyhow::Result<()> {
    let opts = PrepareOptions {
        vocab_size: a.vocab_size,
        tokenizer: a.tokenizer,
        max_bytes: a.max_bytes,
        text_field: a.text_field,
    };
    let json = a.json;
    let info =
        tokio::task::spawn_blocking(move || super::recipe::prepare_with_progress(&a.input, &a.out, &opts, !json))
            .await??;
    if json {
        println!(
            "{}",
            serde_json::json!({"n_tokens": info.n_tokens, "n_documents": info.n_documents, "vocab_size": info.vocab_size, "skipped_files": info.skipped.len(), "budget_reached": info.budget_reached, "tokens_sha256": info.tokens_sha256})
        );
    }
    Ok(())
}
