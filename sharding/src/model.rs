//! The model spec: the shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), read from a
//! Hugging Face `config.json` or a built-in preset. Parameter counts are computed from the shape.

use serde::{Deserialize, Serialize};

/// The shape of a Llama-family decoder, with Hugging Face's field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts biases on q, k and v.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama 3.1+ rescales the rotary frequencies.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
}

/// Llama 3's rotary frequency scaling (`rope_scaling` with `rope_type: llama3` in config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The inverse frequencies of a head of `head_dim`, as Hugging Face computes them for `llama3`.
    pub fn apply(&self, inv_freq: f64) -> f64 {
        let low_wavelen = self.original_max_position_embeddings as f64 / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings as f64 / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < high_wavelen {
            inv_freq
        } else if wavelen > low_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (self.original_max_position_embeddings as f64 / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// The inverse rotary frequencies of one head: `1 / theta^(2i/d)`, rescaled for Llama 3.
pub fn rope_inv_freq(spec: &ModelSpec) -> Vec<f64> {
    let hd = spec.head_dim();
    (0..hd / 2)
        .map(|i| {
            let f = 1.0 / spec.rope_theta.powf(2.0 * i as f64 / hd as f64);
            spec.rope_scaling.as_ref().map_or(f, |s| s.apply(f))
        })
        .collect()
}

/// The subset of a Hugging Face `config.json` that we read. Unknown fields are ignored here on
/// purpose: real configs carry dozens of fields that do not change the maths we implement.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    head_dim: Option<usize>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}

/// Model types whose decoder we implement.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelSpec {
    /// Reads a Hugging Face `config.json` text. `source` names the file in errors.
    pub fn from_hf_config(json: &str, source: &str) -> Result<ModelSpec, String> {
        let c: HfConfig =
            serde_json::from_str(json).map_err(|e| format!("{source}: not a Llama-family config.json: {e}"))?;
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".to_string());
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(format!(
                "{source}: model_type = {model_type:?} is not supported; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        if let Some(act) = &c.hidden_act
            && act != "silu"
        {
            return Err(format!("{source}: hidden_act = {act:?} is not supported; only \"silu\" (SwiGLU)"));
        }
        let params = c.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = c
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(serde_json::Value::as_f64))
            .unwrap_or_else(default_rope_theta);
        let scaling = match (&c.rope_scaling, params) {
            (Some(v), _) if !v.is_null() => Some(v),
            (_, Some(p)) if p.get("rope_type").and_then(|t| t.as_str()).is_some_and(|t| t != "default") => Some(p),
            _ => None,
        };
        let rope_scaling = match scaling {
            None => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("?");
                if kind != "llama3" {
                    return Err(format!("{source}: rope_scaling type {kind:?} is not supported; only \"llama3\""));
                }
                let f = |k: &str| {
                    v.get(k)
                        .and_then(serde_json::Value::as_f64)
                        .ok_or_else(|| format!("{source}: rope_scaling.{k} is missing"))
                };
                Some(RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                })
            }
        };
        if let Some(hd) = c.head_dim
            && hd * c.num_attention_heads != c.hidden_size
        {
            return Err(format!(
                "{source}: head_dim = {hd} with {} heads does not match hidden_size {}; only head_dim = hidden_size / heads is supported",
                c.num_attention_heads, c.hidden_size
            ));
        }
        let spec = ModelSpec {
            rope_scaling,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            rope_theta,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            attention_bias: c.attention_bias.unwrap_or(model_type == "qwen2"),
        };
        spec.check().map_err(|e| format!("{source}: {e}"))?;
        Ok(spec)
    }

    /// A Hugging Face `config.json` for this shape (model_type llama, or qwen2 with biases).
    pub fn to_hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": [if self.attention_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if self.attention_bias { "qwen2" } else { "llama" },
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "rope_scaling": self.rope_scaling.as_ref().map(|r| serde_json::json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            })),
        })
    }

    /// Checks the internal consistency of the shape.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be > 0, got 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim()));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(format!("rms_norm_eps must be > 0, got {}", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(format!("rope_theta must be > 0, got {}", self.rope_theta));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parameters of one decoder layer.
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let kv = (self.num_key_value_heads * self.head_dim()) as u64;
        let i = self.intermediate_size as u64;
        let attn = h * h + 2 * h * kv + h * h + if self.attention_bias { h + 2 * kv } else { 0 };
        let mlp = 3 * h * i;
        attn + mlp + 2 * h
    }

    /// All parameters: embeddings, layers, final norm and (untied) LM head.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * self.layer_params() + h + head
    }

    /// Built-in shapes by name.
    pub fn preset(name: &str) -> Option<ModelSpec> {
        let llama = |h, i, l, heads, kv, v, theta, eps, tie| ModelSpec {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            vocab_size: v,
            max_position_embeddings: 131_072,
            rope_theta: theta,
            rms_norm_eps: eps,
            tie_word_embeddings: tie,
            attention_bias: false,
            rope_scaling: None,
        };
        let llama3 = |factor| {
            Some(RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            })
        };
        Some(match name {
            // Small enough to train on a laptop CPU in minutes.
            "tiny" => {
                ModelSpec { max_position_embeddings: 1024, ..llama(128, 352, 4, 4, 2, 2048, 10_000.0, 1e-5, false) }
            }
            "llama-3.2-1b" => {
                ModelSpec { rope_scaling: llama3(32.0), ..llama(2048, 8192, 16, 32, 8, 128_256, 500_000.0, 1e-5, true) }
            }
            "llama-3.1-8b" => ModelSpec {
                rope_scaling: llama3(8.0),
                ..llama(4096, 14_336, 32, 32, 8, 128_256, 500_000.0, 1e-5, false)
            },
            "llama-3.1-70b" => ModelSpec {
                rope_scaling: llama3(8.0),
                ..llama(8192, 28_672, 80, 64, 8, 128_256, 500_000.0, 1e-5, false)
            },
            "llama-2-70b" => ModelSpec {
                max_position_embeddings: 4096,
                ..llama(8192, 28_672, 80, 64, 8, 32_000, 10_000.0, 1e-5, false)
            },
            "mistral-7b" => ModelSpec {
                max_position_embeddings: 32_768,
                ..llama(4096, 14_336, 32, 32, 8, 32_000, 1_000_000.0, 1e-5, false)
            },
            "qwen2.5-7b" => ModelSpec {
                max_position_embeddings: 32_768,
                attention_bias: true,
                ..llama(3584, 18_944, 28, 28, 4, 152_064, 1_000_000.0, 1e-6, false)
            },
            _ => return None,
        })
    }

    pub const PRESETS: &'static [&'static str] =
        &["tiny", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-2-70b", "mistral-7b", "qwen2.5-7b"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_counts_match_published_sizes() {
        // Published totals: Llama-3.1-8B 8.03e9, Llama-3.2-1B 1.24e9, Llama-3.1-70B 70.6e9.
        let n = |p: &str| ModelSpec::preset(p).unwrap().param_count() as f64 / 1e9;
        assert!((n("llama-3.1-8b") - 8.03).abs() < 0.01, "{}", n("llama-3.1-8b"));
        assert!((n("llama-3.2-1b") - 1.236).abs() < 0.01, "{}", n("llama-3.2-1b"));
        assert!((n("llama-3.1-70b") - 70.55).abs() < 0.1, "{}", n("llama-3.1-70b"));
        assert!((n("mistral-7b") - 7.24).abs() < 0.01, "{}", n("mistral-7b"));
        assert!((n("qwen2.5-7b") - 7.62).abs() < 0.01, "{}", n("qwen2.5-7b"));
    }

    #[test]
    fn hf_config_round_trips() {
        let spec = ModelSpec::preset("tiny").unwrap();
        let json = spec.to_hf_config().to_string();
        assert_eq!(ModelSpec::from_hf_config(&json, "config.json").unwrap(), spec);
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_applied() {
        let spec = ModelSpec::preset("llama-3.1-8b").unwrap();
        let json = spec.to_hf_config().to_string();
        assert_eq!(ModelSpec::from_hf_config(&json, "c").unwrap(), spec);
        let f = rope_inv_freq(&spec);
        // High frequencies are kept, the lowest divided by the factor (Hugging Face's llama3 rule).
        assert_eq!(f[0], 1.0);
        let plain = 1.0 / 500_000f64.powf(2.0 * 63.0 / 128.0);
        assert!((f[63] - plain / 8.0).abs() < 1e-15);
        let bad = json.replace("llama3", "yarn");
        assert!(ModelSpec::from_hf_config(&bad, "c").unwrap_err().contains("\"yarn\" is not supported"));
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let v5 = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let s = ModelSpec::from_hf_config(v5, "c").unwrap();
        assert_eq!(s.rope_theta, 500_000.0);
        assert_eq!(s.rope_scaling.unwrap().factor, 8.0);
        let plain = v5.replace("\"llama3\"", "\"default\"");
        let s = ModelSpec::from_hf_config(&plain, "c").unwrap();
        assert_eq!((s.rope_theta, s.rope_scaling), (500_000.0, None));
    }

    #[test]
    fn hf_config_errors_name_the_problem() {
        let bad = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#;
        let e = ModelSpec::from_hf_config(bad, "x/config.json").unwrap_err();
        assert!(e.contains("gpt2") && e.contains("x/config.json"), "{e}");
        let bad =
            r#"{"hidden_size":10,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"vocab_size":10}"#;
        let e = ModelSpec::from_hf_config(bad, "c.json").unwrap_err();
        assert!(e.contains("hidden_size (10)") && e.contains("num_attention_heads (3)"), "{e}");
    }
}
