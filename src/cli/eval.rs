//! `swarm eval`: cross-entropy and perplexity of a model on a text.

use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json) or one of our checkpoints.
    #[arg(long)]
    pub model: PathBuf,
    /// The text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: EvalArgs) -> anyhow::Result<()> {
    let r = tokio::task::spawn_blocking(move || {
        swarm_worker::eval::evaluate(&a.model, &a.text, a.seq_len, a.batch).map(|r| (r, a.json))
    })
    .await??;
    let (r, json) = r;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("model            {}", r.model);
        println!("text             {} ({} tokens)", r.text, r.tokens);
        println!("windows          {} x {} tokens ({} predictions)", r.windows, r.seq_len, r.predicted_tokens);
        println!("cross-entropy    {:.4} nats/token", r.mean_cross_entropy);
        println!("perplexity       {:.3}", r.perplexity);
    }
    Ok(())
}
