//! The train spec: what one optimizer step trains, as the planner sees it. Derived from a recipe
//! ([`TrainSpec::from_recipe`]) or built directly (tests, `swarm plan` what-ifs).

use crate::finetune::{FinetuneMode, LORA_TARGETS, OptimizerKind};
use crate::model::ModelSpec;
use crate::recipe::{Recipe, RecipeError};
use serde::{Deserialize, Serialize};

/// A linear layer of a decoder layer that LoRA adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    pub fn parse(s: &str) -> Option<LoraTarget> {
        LORA_TARGETS.iter().position(|t| *t == s).map(|i| LoraTarget::ALL[i])
    }

    /// (input features, output features) of this layer in `m`.
    pub fn shape(self, m: &ModelSpec) -> (u64, u64) {
        let h = m.hidden_size as u64;
        let kv = (m.num_key_value_heads * m.head_dim()) as u64;
        let i = m.intermediate_size as u64;
        match self {
            LoraTarget::QProj | LoraTarget::OProj => (h, h),
            LoraTarget::KProj | LoraTarget::VProj => (h, kv),
            LoraTarget::GateProj | LoraTarget::UpProj => (h, i),
            LoraTarget::DownProj => (i, h),
        }
    }
}

/// Low-rank adapters: rank and the layers they adapt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub targets: Vec<LoraTarget>,
}

impl LoraSpec {
    /// Adapter parameters of one decoder layer: `rank × (in + out)` per adapted layer.
    pub fn params_per_layer(&self, m: &ModelSpec) -> u64 {
        self.targets.iter().map(|t| t.shape(m)).map(|(i, o)| self.rank as u64 * (i + o)).sum()
    }
}

/// What the optimizer updates, and how the frozen base is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TrainMode {
    Full,
    Lora {
        lora: LoraSpec,
    },
    /// LoRA over an NF4 base (blocks of 64, f32 scales; with `double_quant`, 8-bit scales in
    /// blocks of 256 with f32 second-level scales).
    Qlora {
        lora: LoraSpec,
        double_quant: bool,
    },
}

impl TrainMode {
    pub fn lora(&self) -> Option<&LoraSpec> {
        match self {
            TrainMode::Full => None,
            TrainMode::Lora { lora } | TrainMode::Qlora { lora, .. } => Some(lora),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            TrainMode::Full => "full",
            TrainMode::Lora { .. } => "lora",
            TrainMode::Qlora { .. } => "qlora",
        }
    }
}

/// One optimizer step, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub mode: TrainMode,
    pub seq_len: usize,
    /// Sequences per optimizer step over all workers.
    pub global_batch: usize,
    pub optimizer: OptimizerKind,
    /// Whether the planner may recompute activations in the backward pass.
    pub activation_checkpointing: bool,
    /// Whether the planner may keep weights, gradients and optimizer state in host RAM.
    pub cpu_offload: bool,
    /// Fixes the micro-batch size (sequences per device per micro-batch); `None` lets the
    /// planner choose.
    pub micro_batch: Option<usize>,
}

impl TrainSpec {
    /// The train spec of a validated recipe.
    pub fn from_recipe(r: &Recipe) -> TrainSpec {
        let lora = || {
            let l = r.finetune.lora_or_default();
            LoraSpec { rank: l.rank, targets: l.target_modules.iter().filter_map(|t| LoraTarget::parse(t)).collect() }
        };
        let mode = match r.finetune.mode {
            FinetuneMode::Full => TrainMode::Full,
            FinetuneMode::Lora => TrainMode::Lora { lora: lora() },
            FinetuneMode::Qlora => TrainMode::Qlora {
                lora: lora(),
                double_quant: r.finetune.qlora.as_ref().is_none_or(|q| q.double_quant),
            },
        };
        TrainSpec {
            mode,
            seq_len: r.train.seq_len,
            global_batch: r.train.global_batch,
            optimizer: r.train.optimizer,
            activation_checkpointing: r.train.activation_checkpointing,
            cpu_offload: r.train.cpu_offload,
            micro_batch: None,
        }
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.seq_len * self.global_batch) as u64
    }
}

/// The model shape for planning: the preset with its own vocabulary (no tokenizer needed), or the
/// `config.json` text of `model.hf_dir`, with the recipe's overrides applied.
pub fn model_for_planning(r: &Recipe, hf_config_json: Option<&str>) -> Result<ModelSpec, RecipeError> {
    let mut r = r.clone();
    let vocab = r.model.preset.as_deref().and_then(ModelSpec::preset).map_or(0, |s| s.vocab_size);
    Ok(r.resolve_model(hf_config_json, vocab)?.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_params_follow_the_shape() {
        let m = ModelSpec::preset("llama-3.1-8b").unwrap();
        let l = LoraSpec { rank: 16, targets: vec![LoraTarget::QProj, LoraTarget::VProj] };
        // q: 16 × (4096 + 4096), v: 16 × (4096 + 1024).
        assert_eq!(l.params_per_layer(&m), 16 * 8192 + 16 * 5120);
    }

    #[test]
    fn recipe_becomes_a_train_spec_and_a_model() {
        let r = Recipe::from_yaml(
            r#"
name: t
model: { preset: llama-3.1-8b, num_layers: 8 }
data: { dataset: d }
train: { steps: 10, seq_len: 1024, global_batch: 8, lr: 0.0002, cpu_offload: true, optimizer: adamw8bit }
checkpoint: { dir: c, every: 5 }
finetune: { mode: qlora, lora: { rank: 8, target_modules: [q_proj, down_proj] } }
"#,
        )
        .unwrap();
        let t = TrainSpec::from_recipe(&r);
        assert_eq!(t.tokens_per_step(), 8192);
        assert!(t.cpu_offload && t.activation_checkpointing);
        assert_eq!(t.optimizer, OptimizerKind::Adamw8bit);
        let TrainMode::Qlora { lora, double_quant } = &t.mode else { panic!("{:?}", t.mode) };
        assert!(double_quant);
        assert_eq!(lora.targets, vec![LoraTarget::QProj, LoraTarget::DownProj]);
        let m = model_for_planning(&r, None).unwrap();
        assert_eq!((m.vocab_size, m.num_hidden_layers), (128_256, 8));
    }
}
