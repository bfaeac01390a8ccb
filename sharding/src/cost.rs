//! The cost model: memory per device and time per micro-batch, computed from the model's shape.
//!
//! Every tunable number is a field of [`CostModel`], so measurements on real GPUs can calibrate
//! them (`plan_with(.., &CostModel { .. })`) without touching the formulas. Formats (bf16 = 2 bytes,
//! NF4 = 4 bits plus block scales) are facts, not constants to tune, and stay in the formulas.
//!
//! Memory, per device, for the layers it holds:
//! - weights: bf16 (f32 on CPUs); NF4 for QLoRA's frozen linear layers: 0.5 B/param plus an f32
//!   scale per block of 64 (0.0625 B/param), or with double quantization an 8-bit scale per 64 and
//!   an f32 scale per 256 scales (0.0159 B/param). Norms, embeddings and the LM head stay bf16.
//! - LoRA: `rank × (in + out)` per adapted layer, bf16 working copy.
//! - gradients of trainable parameters: f32 (4 B/param), accumulated over micro-batches.
//! - optimizer: AdamW = f32 master + m + v (12 B/param); 8-bit AdamW = f32 master + two 8-bit
//!   moments with a f32 scale per 2048 (6.004 B/param). DiLoCo adds an f32 anchor copy and the
//!   outer momentum (8 B/param).
//! - activations, per token and layer, what the backward pass keeps (Korthikanti et al. 2022
//!   count `34·h + 5·a·s` bytes for GPT; we count Llama's tensors instead, in elements): the
//!   inputs of both RMSNorms and of the q/k/v and gate/up projections (4h), the attention output
//!   (h), k and v (2·kv), gate, up, SiLU(gate) and their product (4i), and each adapter's
//!   rank-sized intermediate. Attention is flash-style: its s×s scores are never stored, so
//!   Korthikanti's `5·a·s` term is dropped. With checkpointing only each layer's input (h) is
//!   kept, plus one layer's full set while it is recomputed.
//! - logits: the cross-entropy is fused with the LM head and chunked, so only
//!   `fused_ce_chunk_tokens × vocab` f32 logits and their gradient exist at once.
//! - communication buffers, the NF4 dequantization workspace (one bf16 weight of the largest
//!   layer), and the runtime: CUDA context plus the allocator's slack over transient tensors.
//!
//! Time, per micro-batch: forward `2·N` flops per token over the linear weights N plus `2·s·h`
//! for causal attention per layer; backward twice that, except that frozen weights need only the
//! gradient of their input (`2·N`); checkpointing adds one more forward. Divided by the measured
//! matmul rate times an efficiency that grows with the tokens per micro-batch, and never less
//! than reading the stage's weights from device memory once per pass.

use crate::finetune::OptimizerKind;
use crate::model::ModelSpec;
use crate::plan::MemoryBreakdown;
use crate::train_spec::{TrainMode, TrainSpec};
use serde::Serialize;

/// The cost model's tunable constants, named and in one place.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostModel {
    /// GPU memory a process holds outside its tensors: CUDA context, cuBLAS workspace, NCCL.
    pub gpu_runtime_bytes: u64,
    /// Memory of a CPU rank's process outside its tensors.
    pub cpu_runtime_bytes: u64,
    /// Host RAM left to the OS and the worker daemon.
    pub host_reserved_bytes: u64,
    /// Memory the allocator holds beyond live tensors, as a fraction of the transient tensors
    /// (activations, gathered weights, buffers). fsdp_qlora's Llama-2-7B LoRA run at 2048 tokens
    /// (benchmarks_03_2024.md) reserved 1.06 GiB more than its 9.16 GiB peak of live tensors:
    /// about 0.4 of the 2.3 to 2.9 GiB of transient tensors this model counts for that run.
    pub allocator_slack: f64,
    /// Staging buffers of one collective (reduce-scatter / all-gather buckets) or of offload.
    pub comm_buffer_bytes: u64,
    /// Tokens whose logits exist at once in the fused, chunked cross-entropy. `u64::MAX`
    /// models an unfused loss that materializes every logit.
    pub fused_ce_chunk_tokens: u64,
    /// Layers gathered at once under ZeRO-3 or offload: the one computing and the one prefetched.
    pub prefetch_layers: u64,
    /// Fraction of the measured matmul rate a training step sustains on large micro-batches.
    pub matmul_efficiency: f64,
    /// Tokens per micro-batch at which the sustained rate is half of `matmul_efficiency`.
    pub half_efficiency_tokens: f64,
    /// Slowdown of QLoRA's matmuls from dequantizing NF4 weights on the fly.
    pub nf4_compute_factor: f64,
    /// Fraction of compute time under which communication can be hidden (prefetch, bucketed
    /// reduce-scatter during the backward pass, 1F1B sends).
    pub comm_overlap: f64,
    /// Bytes per message of a bucketed collective (each message pays the link latency).
    pub collective_bucket_bytes: u64,
    /// Parameters per second a host CPU updates with AdamW when the optimizer is offloaded.
    pub host_adam_params_per_s: f64,
    /// Use DiLoCo when a step's data-parallel sync takes more than this fraction of its compute.
    pub diloco_switch_fraction: f64,
    /// DiLoCo's outer interval H is chosen so the amortized sync is at most this fraction of compute.
    pub diloco_target_overhead: f64,
    pub diloco_min_h: u64,
    pub diloco_max_h: u64,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl CostModel {
    pub const DEFAULT: CostModel = CostModel {
        gpu_runtime_bytes: 3 * GIB / 4,
        cpu_runtime_bytes: GIB / 2,
        host_reserved_bytes: 4 * GIB,
        allocator_slack: 0.4,
        comm_buffer_bytes: 128 * MIB,
        fused_ce_chunk_tokens: 1024,
        prefetch_layers: 2,
        matmul_efficiency: 0.6,
        half_efficiency_tokens: 256.0,
        nf4_compute_factor: 1.25,
        comm_overlap: 0.5,
        collective_bucket_bytes: 32 * MIB,
        host_adam_params_per_s: 5e8,
        diloco_switch_fraction: 0.5,
        diloco_target_overhead: 0.05,
        diloco_min_h: 10,
        diloco_max_h: 1000,
    };

    /// The fraction of the measured matmul rate sustained on micro-batches of `tokens`.
    pub fn efficiency(&self, tokens: u64) -> f64 {
        let t = tokens as f64;
        self.matmul_efficiency * t / (t + self.half_efficiency_tokens)
    }
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel::DEFAULT
    }
}

/// How a stage's state is split over its data-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Sharding {
    Zero1,
    Zero2,
    Zero3,
    /// Every replica keeps everything (DiLoCo: replicas sync every H steps).
    Replicated,
}

impl Sharding {
    pub fn zero_stage(self) -> u8 {
        match self {
            Sharding::Zero1 => 1,
            Sharding::Zero2 => 2,
            Sharding::Zero3 => 3,
            Sharding::Replicated => 0,
        }
    }
}

/// What one device holds and runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub layers: u64,
    pub embedding: bool,
    pub head: bool,
    pub dp: u64,
    pub sharding: Sharding,
    pub offload: bool,
    pub checkpointing: bool,
    /// Sequences per micro-batch.
    pub micro_batch: u64,
    /// Micro-batches whose activations are held at once (1F1B: `min(m, p - stage)`).
    pub in_flight: u64,
    pub pipeline: bool,
    pub cpu: bool,
}

/// The model's shape under a train spec, reduced to the numbers the cost model uses.
#[derive(Clone, Debug)]
pub(crate) struct ModelCost {
    pub layers: u64,
    h: u64,
    i: u64,
    v: u64,
    seq: u64,
    tied: bool,
    layer_linear: u64,
    layer_small: u64,
    pub layer_lora: u64,
    full: bool,
    nf4_bytes_per_param: Option<f64>,
    opt_bytes: f64,
    act_elems_per_token: f64,
}

impl ModelCost {
    pub fn new(m: &ModelSpec, t: &TrainSpec) -> ModelCost {
        let h = m.hidden_size as u64;
        let kv = (m.num_key_value_heads * m.head_dim()) as u64;
        let i = m.intermediate_size as u64;
        let layer_linear = 2 * h * h + 2 * h * kv + 3 * h * i;
        let lora = t.mode.lora();
        let nf4_bytes_per_param = match t.mode {
            TrainMode::Qlora { double_quant: true, .. } => Some(0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)),
            TrainMode::Qlora { double_quant: false, .. } => Some(0.5 + 4.0 / 64.0),
            _ => None,
        };
        let adapters = lora.map_or(0, |l| l.rank * l.targets.len()) as f64;
        ModelCost {
            layers: m.num_hidden_layers as u64,
            h,
            i,
            v: m.vocab_size as u64,
            seq: t.seq_len as u64,
            tied: m.tie_word_embeddings,
            layer_linear,
            layer_small: m.layer_params() - layer_linear,
            layer_lora: lora.map_or(0, |l| l.params_per_layer(m)),
            full: matches!(t.mode, TrainMode::Full),
            nf4_bytes_per_param,
            opt_bytes: match t.optimizer {
                OptimizerKind::Adamw => 12.0,
                OptimizerKind::Adamw8bit => 4.0 + 2.0 + 8.0 / 2048.0,
            },
            act_elems_per_token: (5 * h + 2 * kv + 4 * i) as f64 + adapters,
        }
    }

    fn dtype_bytes(cpu: bool) -> u64 {
        if cpu { 4 } else { 2 }
    }

    /// Bytes of one decoder layer's base weights.
    pub fn layer_bytes(&self, cpu: bool) -> u64 {
        let wb = Self::dtype_bytes(cpu);
        let linear = match self.nf4_bytes_per_param {
            Some(b) => (self.layer_linear as f64 * b).ceil() as u64,
            None => self.layer_linear * wb,
        };
        linear + self.layer_small * wb
    }

    /// Whether a device holds the embedding table: the embedding's device, except that a table
    /// tied to the LM head belongs to the head's device (a pipeline's first stage then gets the
    /// rows it looks up from the last, as `worker::train::pipeline` does).
    fn holds_table(&self, embedding: bool, head: bool) -> bool {
        if self.tied { head } else { embedding }
    }

    /// Parameters of an untied LM head on this device (a tied head is the table).
    fn head_params(&self, s: &Slot) -> u64 {
        if s.head && !self.tied { self.v * self.h } else { 0 }
    }

    /// Base weights a device holds for its layers, unsharded.
    pub fn stage_weight_bytes(&self, s: &Slot) -> u64 {
        let wb = Self::dtype_bytes(s.cpu);
        s.layers * self.layer_bytes(s.cpu)
            + if self.holds_table(s.embedding, s.head) { self.v * self.h * wb } else { 0 }
            + (self.head_params(s) + if s.head { self.h } else { 0 }) * wb
    }

    /// Trainable parameters of a device's layers (a tied table is trained where the head is).
    pub fn trainable(&self, layers: u64, embedding: bool, head: bool) -> u64 {
        if !self.full {
            return layers * self.layer_lora;
        }
        layers * (self.layer_linear + self.layer_small)
            + if self.holds_table(embedding, head) { self.v * self.h } else { 0 }
            + if head { self.h + if self.tied { 0 } else { self.v * self.h } } else { 0 }
    }

    /// The device's memory, and the host RAM it uses (offload), for one slot.
    pub fn memory(&self, cm: &CostModel, s: &Slot) -> (MemoryBreakdown, u64) {
        let wb = Self::dtype_bytes(s.cpu);
        let dp = s.dp.max(1);
        let stage_w = self.stage_weight_bytes(s);
        let unit = self
            .layer_bytes(s.cpu)
            .max(if self.holds_table(s.embedding, s.head) { self.v * self.h * wb } else { 0 })
            .max(self.head_params(s) * wb);
        let window = (cm.prefetch_layers * unit).min(stage_w);
        let t = self.trainable(s.layers, s.embedding, s.head);
        let lora_w = if self.full { 0 } else { t * wb };
        let opt = (t as f64 * self.opt_bytes) as u64;
        let mut m = MemoryBreakdown::default();
        let mut host = 0;
        let mut gathered = 0;
        match (s.offload, s.sharding) {
            (true, _) => {
                // Each gathered unit's local shard is first copied from the host, then all-gathered.
                let staging = if dp > 1 { window / dp } else { 0 };
                m.weights = window + staging;
                gathered = window + staging;
                host = stage_w / dp + lora_w / dp + (t * 4 + opt) / dp;
            }
            (false, Sharding::Zero3) => {
                m.weights = stage_w / dp + window;
                gathered = window;
                m.lora = lora_w / dp;
                m.gradients = t * 4 / dp;
                m.optimizer = opt / dp;
            }
            (false, Sharding::Zero2) => {
                (m.weights, m.lora, m.gradients, m.optimizer) = (stage_w, lora_w, t * 4 / dp, opt / dp);
            }
            (false, Sharding::Zero1) => {
                (m.weights, m.lora, m.gradients, m.optimizer) = (stage_w, lora_w, t * 4, opt / dp);
            }
            (false, Sharding::Replicated) => {
                (m.weights, m.lora, m.gradients, m.optimizer) = (stage_w, lora_w, t * 4, opt + t * 8);
            }
        }
        let tokens = s.micro_batch * self.seq;
        let ab = wb as f64;
        let full_layer = (tokens as f64 * self.act_elems_per_token * ab) as u64;
        let mut acts = if s.layers == 0 {
            0
        } else if s.checkpointing {
            s.in_flight * s.layers * tokens * self.h * wb + full_layer
        } else {
            s.in_flight * s.layers * full_layer
        };
        if s.layers > 0 {
            acts += tokens * (self.h + 2 * self.i) * wb;
        }
        if s.head {
            acts += tokens.min(cm.fused_ce_chunk_tokens).saturating_mul(self.v * 8) + tokens * self.h * wb;
        }
        m.activations = acts;
        m.workspace = if self.nf4_bytes_per_param.is_some() && s.layers > 0 { self.h * self.i * wb } else { 0 };
        m.comm_buffers = if dp > 1 { cm.comm_buffer_bytes } else { 0 }
            + if s.offload { cm.comm_buffer_bytes } else { 0 }
            + if s.pipeline { 2 * tokens * self.h * wb } else { 0 };
        let transient = m.activations + m.workspace + m.comm_buffers + gathered;
        m.runtime = if s.cpu { cm.cpu_runtime_bytes } else { cm.gpu_runtime_bytes }
            + (transient as f64 * cm.allocator_slack) as u64;
        m.total =
            m.weights + m.lora + m.gradients + m.optimizer + m.activations + m.comm_buffers + m.workspace + m.runtime;
        (m, host)
    }

    /// Flops of one micro-batch on a slot: (useful, executed). Useful excludes recomputation.
    pub fn flops(&self, s: &Slot) -> (f64, f64) {
        let t = (s.micro_batch * self.seq) as f64;
        let l = s.layers as f64;
        let linear = 2.0 * self.layer_linear as f64;
        let attn = 2.0 * self.seq as f64 * self.h as f64;
        let lora = 2.0 * self.layer_lora as f64;
        let head = if s.head { 2.0 * (self.h * self.v) as f64 } else { 0.0 };
        let frozen_factor = if self.full { 2.0 } else { 1.0 };
        let fwd = t * (l * (linear + attn + lora) + head);
        let bwd = t * (l * (frozen_factor * linear + 2.0 * attn + 2.0 * lora) + frozen_factor * head);
        let recompute = if s.checkpointing { t * l * (linear + attn + lora) } else { 0.0 };
        (fwd + bwd, fwd + bwd + recompute)
    }

    /// Seconds of one micro-batch (forward and backward) on a device.
    pub fn micro_batch_seconds(&self, cm: &CostModel, s: &Slot, flops_per_s: f64, mem_bytes_per_s: f64) -> f64 {
        let (_, executed) = self.flops(s);
        let factor = if self.nf4_bytes_per_param.is_some() { cm.nf4_compute_factor } else { 1.0 };
        let compute = executed * factor / (flops_per_s * cm.efficiency(s.micro_batch * self.seq));
        let passes = if s.checkpointing { 3.0 } else { 2.0 };
        let memory_bound = passes * self.stage_weight_bytes(s) as f64 / mem_bytes_per_s;
        compute.max(memory_bound)
    }

    /// Bytes a tied embedding's pipeline link carries per step for a replica of `tokens` input
    /// tokens: the rows of the step's distinct tokens (at most one per token, at most the
    /// vocabulary) from the last stage, in its dtype, and the first stage's input gradient, a row
    /// per token, back in the first stage's dtype. 0 for an untied model.
    pub fn tied_exchange_bytes(&self, tokens: u64, last_cpu: bool, first_cpu: bool) -> u64 {
        if !self.tied {
            return 0;
        }
        self.h * (tokens.min(self.v) * Self::dtype_bytes(last_cpu) + tokens * Self::dtype_bytes(first_cpu))
    }

    /// Bytes of the activations sent to the next stage per micro-batch (the gradient comes back
    /// the same size).
    pub fn boundary_bytes(&self, micro_batch: u64, cpu: bool) -> u64 {
        micro_batch * self.seq * self.h * Self::dtype_bytes(cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(tied: bool) -> ModelCost {
        let mut m = ModelSpec::preset("llama-3.2-1b").unwrap();
        m.tie_word_embeddings = tied;
        let t = TrainSpec {
            mode: TrainMode::Full,
            seq_len: 2048,
            global_batch: 8,
            optimizer: Default::default(),
            activation_checkpointing: false,
            cpu_offload: false,
            micro_batch: None,
        };
        ModelCost::new(&m, &t)
    }

    fn slot(layers: u64, embedding: bool, head: bool) -> Slot {
        Slot {
            layers,
            embedding,
            head,
            dp: 1,
            sharding: Sharding::Replicated,
            offload: false,
            checkpointing: false,
            micro_batch: 1,
            in_flight: 1,
            pipeline: true,
            cpu: false,
        }
    }

    /// A table tied to the head is held and trained on the head's device; the first stage holds
    /// none of it (it gets the rows it looks up). Untied, each end holds its own.
    #[test]
    fn a_tied_table_belongs_to_the_heads_stage() {
        let table = 128_256 * 2048;
        let (c, u) = (cost(true), cost(false));
        let layers = c.trainable(8, false, false);
        assert_eq!(c.trainable(8, true, false), layers, "tied: the first stage trains no table");
        assert_eq!(c.trainable(8, false, true), layers + table + 2048, "tied: the last stage trains it");
        assert_eq!(c.trainable(16, true, true), c.trainable(16, false, false) + table + 2048, "one stage: once");
        assert_eq!(u.trainable(8, true, false), layers + table);
        assert_eq!(u.trainable(8, false, true), layers + table + 2048);
        let w =
            |m: &ModelCost, e, h| m.stage_weight_bytes(&slot(8, e, h)) - m.stage_weight_bytes(&slot(8, false, false));
        assert_eq!(w(&c, true, false), 0);
        assert_eq!(w(&c, false, true), (table + 2048) * 2);
        assert_eq!(w(&u, true, false), table * 2);
        assert_eq!(w(&u, false, true), (table + 2048) * 2);
    }
}
