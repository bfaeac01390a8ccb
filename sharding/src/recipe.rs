//! Recipes: the typed, validated description of a training job (`recipes/*.yaml`).
//!
//! Parsing rejects unknown fields (a typo is an error, never a silently ignored setting), and
//! [`Recipe::validate`] checks every value and the facts that tie fields together. Each error
//! names the field, the value and the fix.

use crate::finetune::{FinetuneSection, OptimizerKind};
use crate::model::ModelSpec;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One problem with a recipe: which field, what value, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value}: {problem}; {fix}")]
pub struct RecipeError {
    pub field: String,
    pub value: String,
    pub problem: String,
    pub fix: String,
}

fn err(field: &str, value: impl std::fmt::Display, problem: &str, fix: &str) -> RecipeError {
    RecipeError { field: field.into(), value: value.to_string(), problem: problem.into(), fix: fix.into() }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Names the job in status output and the checkpoint directory.
    pub name: String,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    /// What is trained: every weight (the default), LoRA or QLoRA adapters.
    #[serde(default, skip_serializing_if = "FinetuneSection::is_default")]
    pub finetune: FinetuneSection,
}

/// Which model to train: a preset or a Hugging Face directory, with optional overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A built-in shape (`tiny`, `llama-3.2-1b`, ...).
    #[serde(default)]
    pub preset: Option<String>,
    /// A Hugging Face model directory: `config.json`, and safetensors weights to start from.
    #[serde(default)]
    pub hf_dir: Option<PathBuf>,
    /// The resolved shape. Filled by the client before submission ([`Recipe::resolve_model`]);
    /// a recipe file may also give it whole instead of `preset` / `hf_dir`.
    #[serde(default)]
    pub spec: Option<ModelSpec>,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    /// The model's vocabulary when it should be larger than the tokenizer's (a preset's own
    /// 128,256 for a benchmark on a small tokenizer); by default the tokenizer's.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Whether the LM head shares the embedding's weights (as Llama 3.2 1B/3B do).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A prepared dataset directory (`tokens.bin`, `index.json`, `tokenizer.json`).
    pub dataset: PathBuf,
    /// When `dataset` does not exist yet, build it from this: `python-stdlib` (the Python
    /// standard library's sources on this machine) or a path to text/JSONL files.
    #[serde(default)]
    pub prepare_from: Option<String>,
    /// Vocabulary of the tokenizer trained at prepare time.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Most bytes of raw text read at prepare time.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_vocab() -> usize {
    2048
}
fn default_max_bytes() -> u64 {
    8 * 1024 * 1024
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps in the whole run.
    pub steps: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per optimizer step, over all workers.
    pub global_batch: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The cosine schedule decays to `lr * min_lr_ratio`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default, skip_serializing_if = "is_default_optimizer")]
    pub optimizer: OptimizerKind,
    /// Whether the planner may recompute activations in the backward pass to save memory.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub activation_checkpointing: bool,
    /// Whether the planner may keep weights, gradients and optimizer state in host RAM.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cpu_offload: bool,
    /// The dtype forward and backward compute in. Master weights and optimizer moments are
    /// always f32.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub precision: Precision,
}

/// Compute dtype of a worker's forward and backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on GPUs, f32 on CPUs.
    #[default]
    Auto,
    F32,
    Bf16,
}

fn is_auto(p: &Precision) -> bool {
    *p == Precision::Auto
}

fn is_default_optimizer(o: &OptimizerKind) -> bool {
    *o == OptimizerKind::default()
}
fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}

fn default_seed() -> u64 {
    1234
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Where step directories (`step-000050/`) are written.
    pub dir: PathBuf,
    /// Write a checkpoint every this many steps (and always after the last step).
    pub every: u64,
    /// Committed checkpoints to keep; older ones are deleted after a newer one commits. 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Hosts that hold each rank's checkpoint files, so that losing a machine loses no
    /// committed checkpoint: the writer, the job's next ranks, then other workers of the
    /// cluster (for a job on fewer workers). Default: 2, or 1 on a cluster of one worker.
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Which committed checkpoints `swarm train` copies into `dir` on the submitter's machine
    /// as the job runs: every one (`all`, the default), only the final one (`last`), or none
    /// (`none`; `swarm checkpoint pull` fetches any of them later).
    #[serde(default)]
    pub pull: PullPolicy,
}

/// See [`CheckpointSection::pull`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    #[default]
    All,
    Last,
    None,
}

fn default_keep() -> usize {
    3
}

impl CheckpointSection {
    /// The copies of each rank's files the job's own ranks make, for a job of `world` workers
    /// (the writer's included).
    pub fn replicas_for(&self, world: usize) -> usize {
        self.replicas_wanted().min(world.max(1))
    }

    /// The hosts each rank's files should be on (before capping by the cluster's size).
    pub fn replicas_wanted(&self) -> usize {
        self.replicas.unwrap_or(2)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// 1: optimizer state sharded across data-parallel ranks.
    #[serde(default = "default_zero")]
    pub zero_stage: u8,
    /// Sequences of every global batch that each worker takes, in rank order (e.g. `[6, 2]`
    /// for a fast and a slow machine). Gradients are weighted by tokens, so the maths is the
    /// same as an even split. Default: as even as possible. Its length must equal the job's
    /// `--nodes`, and it must add up to `train.global_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_worker: Option<Vec<usize>>,
    /// Sequences per micro-batch for each worker, in rank order (e.g. `[3, 1]`): a worker runs
    /// forward and backward on that many of its rows at a time and accumulates the gradients,
    /// so its activation memory follows the micro-batch, not its share. Each micro-batch's loss
    /// is weighted by its tokens, so the maths equals one pass over all rows. Default: each
    /// worker's rows in one pass. Its length must equal the job's `--nodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_rows: Option<Vec<usize>>,
    /// Pipeline stages: the layers are split into this many consecutive stages, each on its own
    /// workers, and `--nodes` must be a multiple of it (nodes / stages data-parallel replicas of
    /// the pipeline). Activations and their gradients flow between neighbouring stages; each
    /// stage runs a 1F1B schedule over the micro-batches. Default 1 (no pipeline). With stages,
    /// `rows_per_worker` and `micro_batch_rows` have one entry per replica.
    #[serde(default = "default_stages")]
    pub pipeline_stages: usize,
    /// Transformer layers of each stage, in order (e.g. `[10, 6]` when the first stage's
    /// machine is faster); must add up to the model's layers. Default: as even as possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_layers: Option<Vec<usize>>,
    /// Which worker takes which rank, by name (as `swarm status` lists them), in rank order:
    /// the placement of a plan (`swarm plan` prints it), e.g. the fast machine on the stage
    /// with more layers. The job waits until these workers are idle. Default: any idle workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            zero_stage: default_zero(),
            rows_per_worker: None,
            micro_batch_rows: None,
            pipeline_stages: default_stages(),
            stage_layers: None,
            workers: None,
        }
    }
}

fn default_stages() -> usize {
    1
}

/// Where a rank sits in a job of `stages` pipeline stages times `replicas` data-parallel
/// replicas: rank = stage × replicas + replica, so a stage's data-parallel group is a run of
/// consecutive ranks and a pipeline is every `replicas`-th rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageLayout {
    pub stages: usize,
    pub replicas: usize,
    /// The transformer layers of each stage.
    pub layers: Vec<std::ops::Range<usize>>,
}

impl StageLayout {
    pub fn stage_of(&self, rank: usize) -> usize {
        rank / self.replicas
    }

    pub fn replica_of(&self, rank: usize) -> usize {
        rank % self.replicas
    }

    pub fn rank(&self, stage: usize, replica: usize) -> usize {
        stage * self.replicas + replica
    }

    /// "stage 2 of 3" for messages.
    pub fn describe(&self, rank: usize) -> String {
        format!("stage {} of {}", self.stage_of(rank), self.stages)
    }
}

fn default_zero() -> u8 {
    1
}

/// ZeRO stages this build can execute.
pub const SUPPORTED_ZERO_STAGES: &[u8] = &[1, 2, 3];

impl Recipe {
    /// Each of `nodes` data-parallel ranks' rows of every global batch: `parallel.rows_per_worker`
    /// when set (its length must be `nodes`), else an even split.
    /// Each of `nodes` ranks' rows of every global batch: the rows of its data-parallel replica
    /// (every stage of a pipeline takes the same rows). The replicas split the batch as
    /// `parallel.rows_per_worker` says (one entry per replica), else evenly.
    pub fn batch_shares(&self, nodes: usize) -> Result<Vec<crate::plan::BatchShare>, String> {
        if let Some(w) = &self.parallel.workers
            && w.len() != nodes
        {
            return Err(format!(
                "parallel.workers = {w:?} names {} workers, but the job has {nodes}; use --nodes {} or change the list",
                w.len(),
                w.len()
            ));
        }
        let layout = self.stage_layout(nodes)?;
        let d = layout.replicas;
        let per = |what: &str, n: usize| -> String {
            if layout.stages > 1 {
                format!(
                    "names {n} {what}, but the job has {d} data-parallel replicas ({nodes} nodes / {} pipeline stages); use --nodes {} or change the list",
                    layout.stages,
                    n * layout.stages
                )
            } else {
                format!("names {n} {what}, but the job has {nodes}; use --nodes {n} or change the list")
            }
        };
        if let Some(mb) = &self.parallel.micro_batch_rows
            && mb.len() != d
        {
            return Err(format!("parallel.micro_batch_rows = {mb:?} {}", per("workers", mb.len())));
        }
        let replicas = match &self.parallel.rows_per_worker {
            None => crate::plan::split_batch(d, self.train.global_batch).map_err(|e| e.to_string())?,
            Some(rows) if rows.len() != d => {
                return Err(format!("parallel.rows_per_worker = {rows:?} {}", per("workers", rows.len())));
            }
            Some(rows) => {
                let mut offset = 0;
                rows.iter()
                    .enumerate()
                    .map(|(r, &count)| {
                        let share = crate::plan::BatchShare { rank: crate::Rank(r as u32), offset, count };
                        offset += count;
                        share
                    })
                    .collect()
            }
        };
        // ZeRO-2 and 3 reduce every micro-batch's gradients together: each replica must run the
        // same number of micro-batches, or the collectives would not pair up.
        let counts: Vec<usize> =
            replicas.iter().enumerate().map(|(r, s)| s.count.div_ceil(self.micro_batch_rows(r, s.count))).collect();
        if self.parallel.zero_stage >= 2 && counts.windows(2).any(|w| w[0] != w[1]) {
            // The most micro-batches every replica can split its rows into.
            let fits = |m: usize| replicas.iter().all(|s| s.count.div_ceil(s.count.div_ceil(m)) == m);
            let m = (1..=counts.iter().copied().min().unwrap_or(1)).rev().find(|&m| fits(m)).unwrap_or(1);
            let fix: Vec<usize> = replicas.iter().map(|s| s.count.div_ceil(m)).collect();
            return Err(format!(
                "parallel.micro_batch_rows gives the replicas {counts:?} micro-batches per step; with parallel.zero_stage = {} every replica must run the same number (each micro-batch's gradients are reduced together): use micro_batch_rows: {fix:?}, or zero_stage: 1",
                self.parallel.zero_stage
            ));
        }
        Ok((0..nodes)
            .map(|r| crate::plan::BatchShare { rank: crate::Rank(r as u32), ..replicas[layout.replica_of(r)] })
            .collect())
    }

    /// The pipeline layout of a job on `nodes` workers: `parallel.pipeline_stages` stages of
    /// `parallel.stage_layers` layers (default: as even as possible, earlier stages one more).
    pub fn stage_layout(&self, nodes: usize) -> Result<StageLayout, String> {
        let p = self.parallel.pipeline_stages;
        if p == 0 || nodes == 0 || !nodes.is_multiple_of(p) {
            return Err(format!(
                "parallel.pipeline_stages = {p} does not divide --nodes {nodes}; use a multiple of {p} nodes (stages x data-parallel replicas)"
            ));
        }
        let layers = self.model.spec.as_ref().map(|s| s.num_hidden_layers);
        if let Some(l) = layers
            && p > l
        {
            return Err(format!(
                "parallel.pipeline_stages = {p} is more than the model's {l} layers; use at most {l} stages"
            ));
        }
        let counts: Vec<usize> = match (&self.parallel.stage_layers, layers) {
            (Some(c), _) => c.clone(),
            (None, Some(l)) => (0..p).map(|s| l / p + usize::from(s < l % p)).collect(),
            // The shape is resolved before a job runs; until then, one stage takes everything.
            (None, None) => (0..p).map(|s| usize::from(s == 0)).collect(),
        };
        if let Some(l) = layers
            && counts.iter().sum::<usize>() != l
        {
            return Err(format!(
                "parallel.stage_layers = {counts:?} adds up to {}, but the model has {l} layers; make them add up to {l}",
                counts.iter().sum::<usize>()
            ));
        }
        let mut start = 0;
        let layers = counts
            .iter()
            .map(|&c| {
                let r = start..start + c;
                start += c;
                r
            })
            .collect();
        Ok(StageLayout { stages: p, replicas: nodes / p, layers })
    }

    /// Rows per micro-batch of data-parallel replica `replica` (the rank, without pipeline
    /// stages), which takes `rows` rows of every global batch: `parallel.micro_batch_rows[replica]`
    /// (at most `rows`), else `rows` (one pass).
    pub fn micro_batch_rows(&self, replica: usize, rows: usize) -> usize {
        match &self.parallel.micro_batch_rows {
            Some(mb) if replica < mb.len() => mb[replica].clamp(1, rows.max(1)),
            _ => rows.max(1),
        }
    }

    /// Parses YAML, rejecting unknown fields, then validates.
    pub fn from_yaml(text: &str) -> Result<Recipe, String> {
        let r: Recipe = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    /// Checks every field and the facts between fields.
    pub fn validate(&self) -> Result<(), RecipeError> {
        if self.name.len() > 64 || !crate::content::valid_file_name(&self.name) {
            return Err(err(
                "name",
                format!("{:?}", self.name),
                "must be 1 to 64 ASCII letters, digits, '-', '_' or '.', not starting with '.' (it names directories on every host)",
                "rename the recipe, e.g. name: tiny-cpu",
            ));
        }
        self.validate_model()?;
        let t = &self.train;
        if t.steps == 0 {
            return Err(err("train.steps", 0, "must be > 0", "set train.steps to the number of optimizer steps"));
        }
        if t.seq_len < 2 {
            return Err(err("train.seq_len", t.seq_len, "must be >= 2", "use e.g. train.seq_len: 128"));
        }
        if t.global_batch == 0 {
            return Err(err("train.global_batch", 0, "must be > 0", "set the sequences per step, e.g. 16"));
        }
        if !(t.lr.is_finite() && t.lr > 0.0 && t.lr < 1.0) {
            return Err(err("train.lr", t.lr, "must be in (0, 1)", "use e.g. train.lr: 3.0e-4"));
        }
        if t.warmup_steps > t.steps {
            return Err(err(
                "train.warmup_steps",
                t.warmup_steps,
                &format!("is more than train.steps ({})", t.steps),
                "lower train.warmup_steps",
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(err("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]", "use e.g. 0.1"));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(err("train.weight_decay", t.weight_decay, "must be >= 0", "use e.g. 0.1, or 0 to disable"));
        }
        for (field, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(err(field, b, "must be in [0, 1)", "use 0.9 for beta1 and 0.95 for beta2"));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(err("train.eps", t.eps, "must be > 0", "use e.g. 1.0e-8"));
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return Err(err("train.grad_clip", t.grad_clip, "must be >= 0", "use e.g. 1.0, or 0 to disable clipping"));
        }
        let c = &self.checkpoint;
        if c.every == 0 {
            return Err(err("checkpoint.every", 0, "must be > 0", "checkpoint every N steps, e.g. 50"));
        }
        if c.replicas == Some(0) {
            return Err(err(
                "checkpoint.replicas",
                0,
                "must be at least 1",
                "leave it out (2 with 2+ workers) or set 1 or 2",
            ));
        }
        if c.dir.as_os_str().is_empty() {
            return Err(err(
                "checkpoint.dir",
                "\"\"",
                "must be a directory path",
                "e.g. checkpoint.dir: runs/tiny-cpu",
            ));
        }
        let d = &self.data;
        if d.dataset.as_os_str().is_empty() {
            return Err(err(
                "data.dataset",
                "\"\"",
                "must be a directory path",
                "e.g. data.dataset: runs/data/python-stdlib",
            ));
        }
        if !(256..=1 << 20).contains(&d.vocab_size) {
            return Err(err(
                "data.vocab_size",
                d.vocab_size,
                "must be in [256, 1048576]",
                "use e.g. 2048 for a tiny model",
            ));
        }
        if d.max_bytes == 0 {
            return Err(err("data.max_bytes", 0, "must be > 0", "e.g. 8388608 (8 MiB)"));
        }
        if !SUPPORTED_ZERO_STAGES.contains(&self.parallel.zero_stage) {
            return Err(err(
                "parallel.zero_stage",
                self.parallel.zero_stage,
                "is not supported (stages are 1, 2 and 3)",
                "use parallel.zero_stage: 1, 2 or 3",
            ));
        }
        if let Some(rows) = &self.parallel.rows_per_worker {
            let shown = format!("{rows:?}");
            if rows.is_empty() || rows.contains(&0) {
                return Err(err(
                    "parallel.rows_per_worker",
                    shown,
                    "needs one entry per worker, each at least 1",
                    "e.g. parallel.rows_per_worker: [6, 2], or leave it out for an even split",
                ));
            }
            let sum: usize = rows.iter().sum();
            if sum != t.global_batch {
                return Err(err(
                    "parallel.rows_per_worker",
                    shown,
                    &format!("adds up to {sum}, but train.global_batch is {}", t.global_batch),
                    "make the entries add up to train.global_batch",
                ));
            }
        }
        let p = self.parallel.pipeline_stages;
        if p == 0 || p > 64 {
            return Err(err(
                "parallel.pipeline_stages",
                p,
                "must be between 1 and 64",
                "use 1 (no pipeline) or the number of machines one copy of the model is split over",
            ));
        }
        if let Some(l) = self.model.spec.as_ref().map(|s| s.num_hidden_layers)
            && p > l
        {
            return Err(err(
                "parallel.pipeline_stages",
                p,
                &format!("is more than the model's {l} layers (a stage needs at least one)"),
                &format!("use at most {l} stages"),
            ));
        }
        if let Some(c) = &self.parallel.stage_layers {
            let layers = self.model.spec.as_ref().map(|s| s.num_hidden_layers);
            if c.len() != p || c.contains(&0) || layers.is_some_and(|l| c.iter().sum::<usize>() != l) {
                return Err(err(
                    "parallel.stage_layers",
                    format!("{c:?}"),
                    &format!(
                        "needs one entry per pipeline stage ({p}), each at least 1{}",
                        layers.map_or(String::new(), |l| format!(", adding up to the model's {l} layers"))
                    ),
                    "e.g. parallel.stage_layers: [10, 6], or leave it out for an even split",
                ));
            }
        }
        if p > 1 && self.parallel.zero_stage != 1 {
            return Err(err(
                "parallel.zero_stage",
                self.parallel.zero_stage,
                "with pipeline stages, this build runs ZeRO-1 inside each stage",
                "use parallel.zero_stage: 1 with parallel.pipeline_stages",
            ));
        }
        if let Some(w) = &self.parallel.workers {
            let mut seen = std::collections::HashSet::new();
            if let Some(bad) = w.iter().find(|n| n.is_empty() || !seen.insert(n.as_str())) {
                return Err(err(
                    "parallel.workers",
                    format!("{w:?}"),
                    &format!("names {bad:?} empty or twice; each rank needs its own worker"),
                    "list each worker once, by the name swarm status shows",
                ));
            }
        }
        if let Some(mb) = &self.parallel.micro_batch_rows
            && (mb.is_empty() || mb.contains(&0))
        {
            return Err(err(
                "parallel.micro_batch_rows",
                format!("{mb:?}"),
                "needs one entry per worker, each at least 1",
                "e.g. parallel.micro_batch_rows: [3, 1], or leave it out for one pass per step",
            ));
        }
        self.finetune.validate()?;
        if let Some(spec) = &self.model.spec
            && t.seq_len > spec.max_position_embeddings
        {
            return Err(err(
                "train.seq_len",
                t.seq_len,
                &format!("is longer than the model's max_position_embeddings ({})", spec.max_position_embeddings),
                "shorten train.seq_len",
            ));
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), RecipeError> {
        let m = &self.model;
        let sources = usize::from(m.preset.is_some()) + usize::from(m.hf_dir.is_some());
        if sources > 1 {
            return Err(err(
                "model",
                "preset and hf_dir",
                "are both set",
                "keep only one of model.preset and model.hf_dir",
            ));
        }
        if sources == 0 && m.spec.is_none() {
            return Err(err(
                "model",
                "{}",
                "names no model",
                &format!("set model.preset (one of {}) or model.hf_dir", ModelSpec::PRESETS.join(", ")),
            ));
        }
        if let Some(p) = &m.preset
            && ModelSpec::preset(p).is_none()
        {
            return Err(err(
                "model.preset",
                format!("{p:?}"),
                "is not a known preset",
                &format!("use one of {}", ModelSpec::PRESETS.join(", ")),
            ));
        }
        for (field, v) in [
            ("model.hidden_size", m.hidden_size),
            ("model.intermediate_size", m.intermediate_size),
            ("model.num_layers", m.num_layers),
            ("model.num_heads", m.num_heads),
            ("model.num_kv_heads", m.num_kv_heads),
            ("model.max_seq_len", m.max_seq_len),
        ] {
            if v == Some(0) {
                return Err(err(field, 0, "must be > 0", "remove it to keep the preset's value"));
            }
        }
        if let Some(spec) = &m.spec {
            spec.check().map_err(|e| err("model.spec", "(resolved shape)", &e, "fix the model shape"))?;
        }
        Ok(())
    }

    /// The model shape from a preset or config.json text plus the recipe's overrides, with the
    /// vocabulary of the dataset's tokenizer. Stores it in `model.spec` and re-validates.
    pub fn resolve_model(
        &mut self,
        hf_config_json: Option<&str>,
        tokenizer_vocab: usize,
    ) -> Result<&ModelSpec, RecipeError> {
        let m = &self.model;
        let mut spec = if let Some(spec) = &m.spec {
            spec.clone()
        } else if let Some(p) = &m.preset {
            let mut s = ModelSpec::preset(p)
                .ok_or_else(|| err("model.preset", p, "is not a known preset", "see swarm plan --help"))?;
            s.vocab_size = tokenizer_vocab;
            s
        } else {
            let dir = m.hf_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            let json = hf_config_json.ok_or_else(|| {
                err("model.hf_dir", &dir, "has no config.json", "point model.hf_dir at a Hugging Face model directory")
            })?;
            ModelSpec::from_hf_config(json, &format!("{dir}/config.json"))
                .map_err(|e| err("model.hf_dir", &dir, &e, "use a Llama, Mistral or Qwen2 model"))?
        };
        if let Some(v) = m.hidden_size {
            spec.hidden_size = v;
        }
        if let Some(v) = m.intermediate_size {
            spec.intermediate_size = v;
        }
        if let Some(v) = m.num_layers {
            spec.num_hidden_layers = v;
        }
        if let Some(v) = m.num_heads {
            spec.num_attention_heads = v;
        }
        if let Some(v) = m.num_kv_heads {
            spec.num_key_value_heads = v;
        }
        if let Some(v) = m.max_seq_len {
            spec.max_position_embeddings = v;
        }
        if let Some(v) = m.vocab_size {
            spec.vocab_size = v;
        }
        if let Some(v) = m.tie_word_embeddings {
            spec.tie_word_embeddings = v;
        }
        if spec.vocab_size < tokenizer_vocab {
            return Err(err(
                "model.vocab_size",
                spec.vocab_size,
                &format!("is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"),
                "use a tokenizer that matches the model (data.vocab_size or the model's tokenizer.json)",
            ));
        }
        spec.check().map_err(|e| err("model", "(resolved shape)", &e, "fix the overrides under model:"))?;
        self.model.spec = Some(spec);
        self.validate()?;
        Ok(self.model.spec.as_ref().expect("just set"))
    }

    /// The resolved model shape; `None` before [`Recipe::resolve_model`].
    pub fn spec(&self) -> Option<&ModelSpec> {
        self.model.spec.as_ref()
    }

    /// The learning rate at optimizer step `step` (1-based): linear warmup, then cosine decay
    /// to `lr * min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        let t = &self.train;
        if t.warmup_steps > 0 && step <= t.warmup_steps {
            return t.lr * step as f64 / t.warmup_steps as f64;
        }
        let decay_steps = t.steps.saturating_sub(t.warmup_steps).max(1);
        let progress = (step.saturating_sub(t.warmup_steps)) as f64 / decay_steps as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: t
model: { preset: tiny }
data: { dataset: d }
train: { steps: 10, seq_len: 16, global_batch: 4, lr: 0.001, warmup_steps: 2 }
checkpoint: { dir: c, every: 5 }
"#;

    #[test]
    fn good_recipe_parses() {
        let r = Recipe::from_yaml(GOOD).unwrap();
        assert_eq!(r.parallel.zero_stage, 1);
        assert_eq!(r.train.seed, 1234);
    }

    #[test]
    fn rows_per_worker_split_the_batch_as_given_or_are_refused_with_the_fix() {
        let r = Recipe::from_yaml(&format!("{GOOD}parallel: {{ rows_per_worker: [3, 1] }}\n")).unwrap();
        let s = r.batch_shares(2).unwrap();
        assert_eq!(s.iter().map(|b| (b.offset, b.count)).collect::<Vec<_>>(), vec![(0, 3), (3, 1)]);
        let e = r.batch_shares(3).unwrap_err();
        assert!(e.contains("names 2 workers") && e.contains("--nodes 2"), "{e}");
        // Without the field: the even split.
        let even = Recipe::from_yaml(GOOD).unwrap().batch_shares(3).unwrap();
        assert_eq!(even.iter().map(|b| b.count).collect::<Vec<_>>(), vec![2, 1, 1]);
        for (rows, want) in [("[3, 2]", "adds up to 5"), ("[4, 0]", "each at least 1"), ("[]", "each at least 1")] {
            let e = Recipe::from_yaml(&format!("{GOOD}parallel: {{ rows_per_worker: {rows} }}\n")).unwrap_err();
            assert!(e.starts_with("parallel.rows_per_worker") && e.contains(want) && e.contains(';'), "{rows}: {e}");
        }
    }

    #[test]
    fn micro_batch_rows_are_per_worker_and_refused_with_the_fix() {
        let r = Recipe::from_yaml(&format!("{GOOD}parallel: {{ micro_batch_rows: [3, 1] }}\n")).unwrap();
        assert_eq!((r.micro_batch_rows(0, 4), r.micro_batch_rows(1, 4)), (3, 1));
        // More than the worker's rows: one pass over its rows.
        assert_eq!(r.micro_batch_rows(0, 2), 2);
        assert_eq!(Recipe::from_yaml(GOOD).unwrap().micro_batch_rows(0, 4), 4);
        let e = r.batch_shares(3).unwrap_err();
        assert!(e.contains("micro_batch_rows") && e.contains("--nodes 2"), "{e}");
        for mb in ["[3, 0]", "[]"] {
            let e = Recipe::from_yaml(&format!("{GOOD}parallel: {{ micro_batch_rows: {mb} }}\n")).unwrap_err();
            assert!(e.starts_with("parallel.micro_batch_rows") && e.contains("each at least 1"), "{mb}: {e}");
        }
        // ZeRO-2/3 need the same number of micro-batches on every replica.
        let z2 = Recipe::from_yaml(&format!(
            "{GOOD}parallel: {{ zero_stage: 2, rows_per_worker: [3, 1], micro_batch_rows: [1, 1] }}\n"
        ))
        .unwrap();
        let e = z2.batch_shares(2).unwrap_err();
        assert!(
            e.contains("[3, 1] micro-batches") && e.contains("micro_batch_rows: [3, 1]") && e.contains("zero_stage: 1"),
            "{e}"
        );
        let ok = Recipe::from_yaml(&format!(
            "{GOOD}parallel: {{ zero_stage: 2, rows_per_worker: [3, 1], micro_batch_rows: [3, 1] }}\n"
        ))
        .unwrap();
        assert!(ok.batch_shares(2).is_ok());
        let e = Recipe::from_yaml(&format!("{GOOD}parallel: {{ zero_stage: 4 }}\n")).unwrap_err();
        assert!(e.starts_with("parallel.zero_stage") && e.contains("1, 2 or 3"), "{e}");
    }

    #[test]
    fn pipeline_stages_lay_out_ranks_layers_and_rows() {
        let mut r =
            Recipe::from_yaml(&format!("{GOOD}parallel: {{ pipeline_stages: 2, rows_per_worker: [3, 1] }}\n")).unwrap();
        r.model.spec = ModelSpec::preset("tiny");
        // rank = stage x replicas + replica; every stage of a replica takes its rows.
        let s = r.batch_shares(4).unwrap();
        assert_eq!(s.iter().map(|b| (b.offset, b.count)).collect::<Vec<_>>(), vec![(0, 3), (3, 1), (0, 3), (3, 1)]);
        let l = r.stage_layout(4).unwrap();
        assert_eq!((l.stages, l.replicas, l.layers.clone()), (2, 2, vec![0..2, 2..4]));
        assert_eq!((l.stage_of(3), l.replica_of(3), l.rank(1, 1)), (1, 1, 3));
        let e = r.batch_shares(2).unwrap_err();
        assert!(e.contains("data-parallel replicas") && e.contains("--nodes 4"), "{e}");
        assert!(r.batch_shares(3).unwrap_err().contains("does not divide --nodes 3"));
        r.parallel.stage_layers = Some(vec![3, 1]);
        assert_eq!(r.stage_layout(4).unwrap().layers, vec![0..3, 3..4]);
        for (extra, want) in [
            ("pipeline_stages: 2, stage_layers: [3, 2]", "adding up to the model's 4 layers"),
            ("pipeline_stages: 2, stage_layers: [4]", "one entry per pipeline stage (2)"),
            ("pipeline_stages: 0", "between 1 and 64"),
            ("pipeline_stages: 2, zero_stage: 2", "ZeRO-1 inside each stage"),
            ("pipeline_stages: 5", "more than the model's 4 layers"),
        ] {
            let mut bad = Recipe::from_yaml(GOOD).unwrap();
            bad.model.spec = ModelSpec::preset("tiny");
            bad.parallel = serde_yaml::from_str(&format!("{{ {extra} }}")).unwrap();
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Recipe::from_yaml(&GOOD.replace("steps: 10", "stepz: 10")).unwrap_err();
        assert!(e.contains("stepz"), "{e}");
    }

    #[test]
    fn bad_values_name_field_value_and_fix() {
        let cases = [
            ("steps: 10", "steps: 0", "train.steps = 0"),
            ("lr: 0.001", "lr: 5.0", "train.lr = 5"),
            ("every: 5", "every: 0", "checkpoint.every = 0"),
            ("preset: tiny", "preset: huge", "model.preset = \"huge\""),
            ("warmup_steps: 2", "warmup_steps: 20", "train.warmup_steps = 20"),
        ];
        for (from, to, want) in cases {
            let e = Recipe::from_yaml(&GOOD.replace(from, to)).unwrap_err();
            assert!(e.starts_with(want), "{to}: {e}");
            assert!(e.contains(';'), "no fix in: {e}");
        }
    }

    #[test]
    fn resolve_model_takes_tokenizer_vocab_and_overrides() {
        let mut r = Recipe::from_yaml(&GOOD.replace("{ preset: tiny }", "{ preset: tiny, num_layers: 2 }")).unwrap();
        let s = r.resolve_model(None, 1000).unwrap();
        assert_eq!((s.vocab_size, s.num_hidden_layers), (1000, 2));
        let again = Recipe::from_yaml(&serde_yaml::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn lr_schedule_warms_up_then_decays() {
        let r = Recipe::from_yaml(GOOD).unwrap();
        assert!((r.lr_at(1) - 0.0005).abs() < 1e-12);
        assert!((r.lr_at(2) - 0.001).abs() < 1e-12);
        assert!((r.lr_at(10) - 0.0001).abs() < 1e-12);
        assert!(r.lr_at(6) < r.lr_at(3));
    }
}
