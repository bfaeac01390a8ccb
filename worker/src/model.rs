//! A Llama-family decoder (Llama 2/3, Mistral, Qwen2) written for training with candle:
//! RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, through our differentiable ops in
//! `swarm_kernels` (candle's fused ops have no backward).
//!
//! Parameters carry Hugging Face names (`model.layers.N.self_attn.q_proj.weight`, ...) and
//! layouts (`[out, in]`), so weights load from and save to Hugging Face checkpoints.

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use swarm_kernels as k;
use swarm_sharding::ModelSpec;

/// One named parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
}

pub struct Llama {
    pub spec: ModelSpec,
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
    device: Device,
    /// The dtype of the parameters and activations (f32 or bf16); losses are f32.
    dtype: DType,
}

/// The parameter names and shapes of a model, in a fixed order (the order of the flat vector
/// that collectives and optimizer shards use).
pub fn param_shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size;
    let kv = spec.num_key_value_heads * spec.head_dim();
    let i = spec.intermediate_size;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![spec.vocab_size, h])];
    for l in 0..spec.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.push((p("input_layernorm.weight"), vec![h]));
        out.push((p("self_attn.q_proj.weight"), vec![h, h]));
        out.push((p("self_attn.k_proj.weight"), vec![kv, h]));
        out.push((p("self_attn.v_proj.weight"), vec![kv, h]));
        if spec.attention_bias {
            out.push((p("self_attn.q_proj.bias"), vec![h]));
            out.push((p("self_attn.k_proj.bias"), vec![kv]));
            out.push((p("self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((p("self_attn.o_proj.weight"), vec![h, h]));
        out.push((p("post_attention_layernorm.weight"), vec![h]));
        out.push((p("mlp.gate_proj.weight"), vec![i, h]));
        out.push((p("mlp.up_proj.weight"), vec![i, h]));
        out.push((p("mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}

/// A small deterministic generator (splitmix64), so initial weights depend only on the seed,
/// never on a dependency's version or on how many workers there are.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Jumps `n` values ahead (splitmix64's state is a counter).
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }

    /// Standard normal by Box-Muller (two values of the stream each).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Elements `range` of parameter `name`'s initial values, exactly as [`Llama::init`] makes them,
/// without generating any other parameter (the generator jumps ahead): a pipeline stage or a
/// ZeRO-3 shard initialises only its own part of a model that no one machine could hold.
pub fn init_piece(spec: &ModelSpec, seed: u64, name: &str, range: std::ops::Range<usize>) -> anyhow::Result<Vec<f32>> {
    let mut before = 0u64; // random values drawn for the parameters before this one
    for (n, shape) in param_shapes(spec) {
        let count: usize = shape.iter().product();
        let constant = n.ends_with("layernorm.weight") || n == "model.norm.weight" || n.ends_with(".bias");
        if n == name {
            if range.end > count {
                bail!("init_piece: {range:?} is outside {name} ({count} values)");
            }
            if constant {
                return Ok(vec![if n.ends_with(".bias") { 0.0 } else { 1.0 }; range.len()]);
            }
            let mut rng = SplitMix64(seed ^ 0x05EE_D0F1_1A3A);
            rng.skip(2 * (before + range.start as u64));
            return Ok(range.map(|_| (rng.normal() * 0.02) as f32).collect());
        }
        if !constant {
            before += count as u64;
        }
    }
    bail!("init_piece: the model has no parameter {name}")
}

impl Llama {
    /// The parameters `keep` names, initialised as [`Llama::init`] would (and only those).
    pub fn init_subset(
        spec: &ModelSpec,
        seed: u64,
        device: &Device,
        keep: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Llama> {
        let mut tensors = Vec::new();
        for (name, shape) in param_shapes(spec) {
            if keep(&name) {
                let n: usize = shape.iter().product();
                tensors.push((name.clone(), Tensor::from_vec(init_piece(spec, seed, &name, 0..n)?, shape, device)?));
            }
        }
        Llama::from_tensors(spec, tensors, device)
    }

    /// Random initialisation (normal, std 0.02, as Hugging Face's `initializer_range`; norms at 1).
    pub fn init(spec: &ModelSpec, seed: u64, device: &Device) -> anyhow::Result<Llama> {
        let mut rng = SplitMix64(seed ^ 0x05EE_D0F1_1A3A);
        let mut tensors = Vec::new();
        for (name, shape) in param_shapes(spec) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
            };
            tensors.push((name, Tensor::from_vec(data, shape, device)?));
        }
        Llama::from_tensors(spec, tensors, device)
    }

    fn from_tensors(spec: &ModelSpec, tensors: Vec<(String, Tensor)>, device: &Device) -> anyhow::Result<Llama> {
        let mut params = Vec::with_capacity(tensors.len());
        let mut index = HashMap::new();
        for (name, t) in tensors {
            index.insert(name.clone(), params.len());
            params.push(Param { name, var: Var::from_tensor(&t.to_dtype(DType::F32)?)? });
        }
        Ok(Llama { spec: spec.clone(), params, index, device: device.clone(), dtype: DType::F32 })
    }

    /// Loads weights from safetensors files with Hugging Face names (`model.safetensors`, or
    /// the shards listed by `model.safetensors.index.json`). Every parameter must be present
    /// with the right shape; extra tensors (rotary caches) are ignored.
    pub fn load(spec: &ModelSpec, dir: &Path, device: &Device) -> anyhow::Result<Llama> {
        Llama::load_subset(spec, dir, device, |_| true)
    }

    /// [`Llama::load`] of the parameters `keep` names only, reading only the weight files that
    /// hold them (a pipeline stage's worker has fetched just those).
    pub fn load_subset(
        spec: &ModelSpec,
        dir: &Path,
        device: &Device,
        keep: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Llama> {
        let files = match weight_map(dir)? {
            Some(map) => {
                let mut f: Vec<String> = map.into_iter().filter(|(t, _)| keep(t)).map(|(_, f)| f).collect();
                f.sort();
                f.dedup();
                f.into_iter().map(|f| dir.join(f)).collect()
            }
            None => weight_files(dir)?,
        };
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            let ts = candle_core::safetensors::load(f, device).with_context(|| format!("reading {}", f.display()))?;
            found.extend(ts.into_iter().filter(|(n, _)| keep(n)));
        }
        let mut tensors = Vec::new();
        for (name, shape) in param_shapes(spec).into_iter().filter(|(n, _)| keep(n)) {
            let t = match found.remove(&name) {
                Some(t) => t,
                None if name == "lm_head.weight" => {
                    bail!("{}: lm_head.weight is missing (tie_word_embeddings is false in config.json)", dir.display())
                }
                None => bail!(
                    "{}: tensor {name} is missing; is this a Llama-family checkpoint of the shape in config.json?",
                    dir.display()
                ),
            };
            if t.dims() != shape.as_slice() {
                bail!("{}: tensor {name} has shape {:?}, config.json implies {:?}", dir.display(), t.dims(), shape);
            }
            tensors.push((name, t));
        }
        Llama::from_tensors(spec, tensors, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Converts every parameter to `dtype` (the compute dtype; master weights live elsewhere).
    pub fn cast(&mut self, dtype: DType) -> anyhow::Result<()> {
        if dtype == self.dtype {
            return Ok(());
        }
        for p in &mut self.params {
            p.var = Var::from_tensor(&p.var.as_tensor().to_dtype(dtype)?)?;
        }
        self.dtype = dtype;
        Ok(())
    }

    /// Moves every parameter into one flat buffer of `len` elements (at least `num_params`; the
    /// tail is zero padding) in `param_shapes` order, and makes each parameter a view of its
    /// range. Writing the buffer (an optimizer kernel, a collective) then updates the model in
    /// place, with no per-parameter copy. Returns the buffer.
    pub fn pack(&mut self, len: usize) -> anyhow::Result<Tensor> {
        let n = self.num_params();
        if len < n {
            bail!("pack: a buffer of {len} elements cannot hold the model's {n} parameters");
        }
        let flat = Tensor::zeros(len, self.dtype, &self.device)?;
        let mut off = 0;
        for p in &mut self.params {
            let k = p.var.elem_count();
            let view = Var::from_view(&flat.narrow(0, off, k)?.reshape(p.var.shape())?)?;
            view.set(p.var.as_tensor())?;
            p.var = view;
            off += k;
        }
        Ok(flat)
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    fn w(&self, name: &str) -> &Tensor {
        self.params[self.index[name]].var.as_tensor()
    }

    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let w = self.w(&format!("{name}.weight"));
        let y = x.reshape((b * s, h))?.matmul(&w.t()?)?;
        let y = match self.index.get(&format!("{name}.bias")) {
            Some(&i) => y.broadcast_add(self.params[i].var.as_tensor())?,
            None => y,
        };
        y.reshape((b, s, w.dim(0)?))
    }

    /// cos and sin of the rotary angles for positions `0..seq_len`, each `[seq_len, head_dim/2]`.
    pub fn rope_tables(&self, seq_len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = swarm_sharding::model::rope_inv_freq(&self.spec);
        let hd = 2 * inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * hd / 2);
        let mut sin = Vec::with_capacity(seq_len * hd / 2);
        for pos in 0..seq_len {
            for f in &inv_freq {
                let a = pos as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq_len, hd / 2), &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, (seq_len, hd / 2), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// Logits `[batch * seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.hidden(ids)?.matmul(&self.head().t()?)
    }

    /// The LM head's weight (the embedding when tied).
    fn head(&self) -> &Tensor {
        if self.spec.tie_word_embeddings { self.w("model.embed_tokens.weight") } else { self.w("lm_head.weight") }
    }

    /// The final normed hidden states `[batch * seq, hidden]` for token ids `[batch, seq]`.
    pub fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.layers(self.embed(ids)?, 0..self.spec.num_hidden_layers)?;
        let (b, s, h) = x.dims3()?;
        k::rms_norm(&x, self.w("model.norm.weight"), self.spec.rms_norm_eps)?.reshape((b * s, h))
    }

    /// Token embeddings `[batch, seq, hidden]` of ids `[batch, seq]` (the first pipeline stage).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let emb = self.w("model.embed_tokens.weight");
        emb.embedding(&ids.flatten_all()?)?.reshape((b, s, self.spec.hidden_size))
    }

    /// Transformer layers `range` applied to `x` (`[batch, seq, hidden]`).
    pub fn layers(&self, mut x: Tensor, range: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let spec = &self.spec;
        let (nh, nkv, hd) = (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim());
        let eps = spec.rms_norm_eps;
        let (cos, sin) = self.rope_tables(s)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in range {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let h = k::rms_norm(&x, self.w(&p("input_layernorm.weight")), eps)?;
            let q = self.linear(&h, &p("self_attn.q_proj"))?.reshape((b, s, nh, hd))?.transpose(1, 2)?;
            let kk = self.linear(&h, &p("self_attn.k_proj"))?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
            let v = self.linear(&h, &p("self_attn.v_proj"))?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
            let q = k::rope(&q, &cos, &sin)?;
            let kk = k::rope(&kk, &cos, &sin)?;
            // Flash attention on GPUs (bf16); scores materialised elsewhere.
            let attn = k::causal_attention(&q, &kk, &v, scale)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
            x = (x + self.linear(&attn, &p("self_attn.o_proj"))?)?;
            let h = k::rms_norm(&x, self.w(&p("post_attention_layernorm.weight")), eps)?;
            let gate = self.linear(&h, &p("mlp.gate_proj"))?;
            let up = self.linear(&h, &p("mlp.up_proj"))?;
            x = (x + self.linear(&k::swiglu(&gate, &up)?, &p("mlp.down_proj"))?)?;
        }
        Ok(x)
    }

    /// Final norm, LM head and mean next-token cross-entropy of `x` (`[batch, seq, hidden]`)
    /// against `targets` (`[batch * seq]`): the last pipeline stage.
    pub fn head_loss(&self, x: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let x = k::rms_norm(x, self.w("model.norm.weight"), self.spec.rms_norm_eps)?.reshape((b * s, h))?;
        // The LM head fused with the loss, chunked: the [tokens, vocab] logits never exist.
        let chunk = k::chunk_rows(self.spec.vocab_size, self.dtype);
        k::linear_cross_entropy(&x, self.head(), targets, chunk)
    }

    /// Mean next-token cross-entropy of `windows` (`[batch, seq+1]` token ids).
    pub fn loss(&self, windows: &Tensor) -> candle_core::Result<Tensor> {
        let (inputs, targets) = split_windows(windows)?;
        let x = self.layers(self.embed(&inputs)?, 0..self.spec.num_hidden_layers)?;
        self.head_loss(&x, &targets)
    }

    /// A model holding only `tensors` (a ZeRO-3 unit's parameters, gathered), in `dtype`.
    pub fn from_parts(
        spec: &ModelSpec,
        tensors: Vec<(String, Tensor)>,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Llama> {
        let mut params = Vec::with_capacity(tensors.len());
        let mut index = HashMap::new();
        for (name, t) in tensors {
            index.insert(name.clone(), params.len());
            params.push(Param { name, var: Var::from_tensor(&t.to_dtype(dtype)?)? });
        }
        Ok(Llama { spec: spec.clone(), params, index, device: device.clone(), dtype })
    }

    /// Keeps only the parameters `keep` names (a pipeline stage's), in their order.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.params.retain(|p| keep(&p.name));
        self.index = self.params.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
    }
}

/// Inputs `[batch, seq]` and flat targets `[batch * seq]` of token windows `[batch, seq+1]`.
pub fn split_windows(windows: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let s1 = windows.dim(1)?;
    let inputs = windows.narrow(1, 0, s1 - 1)?.contiguous()?;
    let targets = windows.narrow(1, 1, s1 - 1)?.flatten_all()?;
    Ok((inputs, targets))
}

/// The tensor-to-file map of a sharded model directory (`model.safetensors.index.json`), or
/// `None` for a single `model.safetensors`.
pub fn weight_map(dir: &Path) -> anyhow::Result<Option<Vec<(String, String)>>> {
    if dir.join("model.safetensors").is_file() {
        return Ok(None);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = v["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
    Ok(Some(map.iter().filter_map(|(t, f)| Some((t.clone(), f.as_str()?.to_string()))).collect()))
}

/// The safetensors files of a Hugging Face model directory.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any piece of any parameter, generated alone, equals the same elements of a full init.
    #[test]
    fn init_pieces_and_subsets_equal_the_full_init() {
        let spec = ModelSpec { attention_bias: true, ..ModelSpec::preset("tiny").unwrap() };
        let dev = Device::Cpu;
        let full = Llama::init(&spec, 42, &dev).unwrap();
        for p in &full.params {
            let all = p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let n = all.len();
            for r in [0..n, n / 3..n / 2, n - 1..n] {
                assert_eq!(init_piece(&spec, 42, &p.name, r.clone()).unwrap(), all[r.clone()], "{} {r:?}", p.name);
            }
        }
        let keep = |n: &str| n.starts_with("model.layers.2.") || n == "model.norm.weight";
        let sub = Llama::init_subset(&spec, 42, &dev, keep).unwrap();
        let mut want = Llama::init(&spec, 42, &dev).unwrap();
        want.retain(keep);
        assert_eq!(sub.params.len(), want.params.len());
        for (a, b) in sub.params.iter().zip(&want.params) {
            assert_eq!(a.name, b.name);
            let (x, y) = (a.var.as_tensor().flatten_all().unwrap(), b.var.as_tensor().flatten_all().unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap(), "{}", a.name);
        }
        assert!(init_piece(&spec, 42, "nope", 0..1).is_err());
    }
}
