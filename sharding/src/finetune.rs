//! The recipe's fine-tuning choices: what is trained (all weights, LoRA adapters, or LoRA over an
//! NF4-quantized base), with which optimizer. All optional, so recipes without them train every
//! weight with AdamW as before.

use crate::recipe::RecipeError;
use serde::{Deserialize, Serialize};

/// Linear layers of a Llama-family decoder layer that LoRA can adapt.
pub const LORA_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What the optimizer updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneMode {
    /// Every weight, in bf16 with f32 master weights.
    #[default]
    Full,
    /// Low-rank adapters over a frozen bf16 base.
    Lora,
    /// Low-rank adapters over a frozen NF4 base (QLoRA).
    Qlora,
}

impl FinetuneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FinetuneMode::Full => "full",
            FinetuneMode::Lora => "lora",
            FinetuneMode::Qlora => "qlora",
        }
    }
}

/// The optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW with f32 master weights and f32 moments.
    #[default]
    Adamw,
    /// AdamW with f32 master weights and blockwise 8-bit moments.
    Adamw8bit,
}

impl OptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Adamw8bit => "adamw8bit",
        }
    }
}

/// `finetune:` in a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    #[serde(default)]
    pub mode: FinetuneMode,
    /// Adapter settings; defaults apply when `mode` is lora or qlora and this is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlora: Option<QloraSection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// The adapter output is scaled by `alpha / rank`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { rank: default_rank(), alpha: default_alpha(), target_modules: default_targets() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QloraSection {
    /// Quantize the NF4 block scales too (8-bit, in blocks of 256), as QLoRA does.
    #[serde(default = "yes")]
    pub double_quant: bool,
}

impl Default for QloraSection {
    fn default() -> Self {
        QloraSection { double_quant: true }
    }
}

fn default_rank() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Vec<String> {
    LORA_TARGETS.iter().map(|s| s.to_string()).collect()
}
fn yes() -> bool {
    true
}

/// Largest LoRA rank accepted.
pub const MAX_LORA_RANK: usize = 4096;

impl FinetuneSection {
    pub fn is_default(&self) -> bool {
        *self == FinetuneSection::default()
    }

    /// The adapter settings in force (the defaults when `lora` is left out).
    pub fn lora_or_default(&self) -> LoraSection {
        self.lora.clone().unwrap_or_default()
    }

    /// Checks the section and the facts that tie its fields to `mode`.
    pub fn validate(&self) -> Result<(), RecipeError> {
        let mode = self.mode.as_str();
        if self.mode == FinetuneMode::Full && self.lora.is_some() {
            return Err(err(
                "finetune.lora",
                "(set)",
                "is set but finetune.mode is full",
                "set finetune.mode: lora (or qlora), or remove finetune.lora",
            ));
        }
        if self.mode != FinetuneMode::Qlora && self.qlora.is_some() {
            return Err(err(
                "finetune.qlora",
                "(set)",
                &format!("is set but finetune.mode is {mode}"),
                "set finetune.mode: qlora, or remove finetune.qlora",
            ));
        }
        let Some(l) = &self.lora else { return Ok(()) };
        if l.rank == 0 {
            return Err(err(
                "finetune.lora.rank",
                0,
                &format!("must be > 0 when finetune.mode is {mode}"),
                "use e.g. finetune.lora.rank: 16",
            ));
        }
        if l.rank > MAX_LORA_RANK {
            return Err(err("finetune.lora.rank", l.rank, &format!("must be <= {MAX_LORA_RANK}"), "use e.g. 16 or 64"));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err(err("finetune.lora.alpha", l.alpha, "must be > 0", "use e.g. 2 × rank"));
        }
        if l.target_modules.is_empty() {
            return Err(err(
                "finetune.lora.target_modules",
                "[]",
                "names no module",
                &format!("use some of {}", LORA_TARGETS.join(", ")),
            ));
        }
        for (i, t) in l.target_modules.iter().enumerate() {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return Err(err(
                    &format!("finetune.lora.target_modules[{i}]"),
                    format!("{t:?}"),
                    "is not a linear layer of a Llama-family decoder",
                    &format!("use some of {}", LORA_TARGETS.join(", ")),
                ));
            }
            if l.target_modules[..i].contains(t) {
                return Err(err(
                    &format!("finetune.lora.target_modules[{i}]"),
                    format!("{t:?}"),
                    "is listed twice",
                    "list each module once",
                ));
            }
        }
        Ok(())
    }
}

impl crate::recipe::Recipe {
    /// Refuses what the planner can plan but this build's worker cannot train yet: adapters,
    /// and 8-bit AdamW. `swarm train` should call this before submitting, so that a LoRA recipe
    /// is never trained as a full fine-tune.
    pub fn check_supported_by_executor(&self) -> Result<(), RecipeError> {
        if self.finetune.mode != FinetuneMode::Full {
            return Err(err(
                "finetune.mode",
                self.finetune.mode.as_str(),
                "is not implemented by this build's worker (it trains every weight)",
                "use `swarm plan` to size the run, or remove finetune: to train every weight",
            ));
        }
        if self.train.optimizer != OptimizerKind::Adamw {
            return Err(err(
                "train.optimizer",
                self.train.optimizer.as_str(),
                "is not implemented by this build's worker",
                "use train.optimizer: adamw",
            ));
        }
        Ok(())
    }
}

fn err(field: &str, value: impl std::fmt::Display, problem: &str, fix: &str) -> RecipeError {
    RecipeError { field: field.into(), value: value.to_string(), problem: problem.into(), fix: fix.into() }
}

#[cfg(test)]
mod tests {
    use crate::recipe::Recipe;

    const BASE: &str = r#"
name: t
model: { preset: llama-3.1-8b }
data: { dataset: d }
train: { steps: 10, seq_len: 2048, global_batch: 8, lr: 0.0002 }
checkpoint: { dir: c, every: 5 }
"#;

    fn with(extra: &str) -> Result<Recipe, String> {
        Recipe::from_yaml(&format!("{BASE}{extra}"))
    }

    #[test]
    fn recipes_without_finetune_train_everything() {
        let r = with("").unwrap();
        assert_eq!(r.finetune.mode, super::FinetuneMode::Full);
        assert!(r.train.activation_checkpointing && !r.train.cpu_offload);
        assert!(!serde_yaml::to_string(&r).unwrap().contains("finetune"));
    }

    #[test]
    fn qlora_section_parses() {
        let r = with(
            "finetune: { mode: qlora, lora: { rank: 64, alpha: 16, target_modules: [q_proj, v_proj] }, qlora: { double_quant: false } }",
        )
        .unwrap();
        assert_eq!(r.finetune.lora_or_default().rank, 64);
        assert!(!r.finetune.qlora.unwrap().double_quant);
        let r = with("finetune: { mode: lora }").unwrap();
        assert_eq!(r.finetune.lora_or_default().target_modules.len(), 7);
    }

    #[test]
    fn the_executor_refuses_what_it_cannot_train() {
        assert!(with("").unwrap().check_supported_by_executor().is_ok());
        let e = with("finetune: { mode: lora }").unwrap().check_supported_by_executor().unwrap_err();
        assert!(e.to_string().starts_with("finetune.mode = lora: is not implemented"), "{e}");
        let r = Recipe::from_yaml(&BASE.replace("lr: 0.0002", "lr: 0.0002, optimizer: adamw8bit")).unwrap();
        assert_eq!(r.check_supported_by_executor().unwrap_err().field, "train.optimizer");
    }

    #[test]
    fn finetune_errors_name_field_value_and_fix() {
        let cases = [
            (
                "finetune: { mode: lora, lora: { rank: 0 } }",
                "finetune.lora.rank = 0: must be > 0 when finetune.mode is lora",
            ),
            (
                "finetune: { mode: qlora, lora: { target_modules: [q_proj, x_proj] } }",
                "finetune.lora.target_modules[1] = \"x_proj\"",
            ),
            ("finetune: { mode: lora, lora: { target_modules: [] } }", "finetune.lora.target_modules = []"),
            (
                "finetune: { mode: lora, qlora: { double_quant: true } }",
                "finetune.qlora = (set): is set but finetune.mode is lora",
            ),
            ("finetune: { lora: { rank: 8 } }", "finetune.lora = (set): is set but finetune.mode is full"),
            ("finetune: { mode: lora, lora: { alpha: -1 } }", "finetune.lora.alpha = -1"),
        ];
        for (extra, want) in cases {
            let e = with(extra).unwrap_err();
            assert!(e.starts_with(want), "{extra}: {e}");
            assert!(e.contains(';'), "no fix in: {e}");
        }
        let e = with("finetune: { mode: dora }").unwrap_err();
        assert!(e.contains("dora"), "{e}");
        let e = Recipe::from_yaml(&BASE.replace("lr: 0.0002", "lr: 0.0002, optimizer: sgd")).unwrap_err();
        assert!(e.contains("sgd"), "{e}");
    }
}
