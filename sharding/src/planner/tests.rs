//! The planner against published measurements, its invariants as properties, and its errors.

use crate::cluster::ClusterSpec;
use crate::cost::CostModel;
use crate::finetune::OptimizerKind;
use crate::model::ModelSpec;
use crate::plan::{Plan, SyncStrategy};
use crate::plan_error::{PlanError, Shortfall};
use crate::planner::{plan, plan_with};
use crate::recipe::Recipe;
use crate::train_spec::{LoraSpec, LoraTarget, TrainMode, TrainSpec, model_for_planning};
use proptest::prelude::*;

const GIB: f64 = (1u64 << 30) as f64;

fn cluster(yaml: &str) -> ClusterSpec {
    ClusterSpec::from_yaml(yaml).unwrap()
}

fn preset(name: &str) -> ModelSpec {
    ModelSpec::preset(name).unwrap()
}

fn recipe(yaml: &str) -> (ModelSpec, TrainSpec) {
    let r = Recipe::from_yaml(yaml).unwrap();
    (model_for_planning(&r, None).unwrap(), TrainSpec::from_recipe(&r))
}

fn peak_gib(p: &Plan) -> f64 {
    p.ranks.iter().map(|r| r.memory.total).max().unwrap() as f64 / GIB
}

fn shortfall(e: PlanError) -> Shortfall {
    match e {
        PlanError::DoesNotFit(s) => *s,
        other => panic!("expected DoesNotFit, got {other}"),
    }
}

const TWO_3090: &str = include_str!("../../../ops/clusters/2x3090.yaml");
const FOUR_4090: &str = include_str!("../../../ops/clusters/4x4090.yaml");
const MIXED: &str = include_str!("../../../ops/clusters/mixed.yaml");
const MIXED_64: &str = include_str!("../../../ops/clusters/64-mixed.yaml");
const R70B: &str = include_str!("../../../recipes/70b.yaml");
const R8B_QLORA: &str = include_str!("../../../recipes/8b-qlora.yaml");
const R8B_LORA: &str = include_str!("../../../recipes/8b-lora.yaml");

/// Llama-2-70B QLoRA on two 24 GB GPUs, as Answer.AI measured it with fsdp_qlora:
/// `benchmarks_03_2024.md` in github.com/AnswerDotAI/fsdp_qlora ("Benchmarking QLoRA+FSDP",
/// February–March 2024), table "Llama-2 70B with Context Length of 2048": QLoRA, CPU offload on,
/// batch size 2, peak memory 14.92 GiB per GPU, on both the dual-3090 and the dual-4090 machine.
///
/// The settings we reproduce, from that file and train.py's defaults at the time: FSDP
/// `full_shard` over the 2 GPUs (our ZeRO-3) with `CPUOffload(offload_params=True)`; bitsandbytes
/// NF4 `Linear4bit` (double quantization on by default); LoRA rank 64 on q, k, v, gate, up and
/// down (`lora_target_modules="all"` in train.py leaves out o_proj); gradient checkpointing of
/// every decoder layer; 2 sequences of 2048 tokens per GPU, one micro-batch; AdamW, run on the
/// CPU with the offloaded parameters. (Batch 1 without offload is sometimes quoted for this
/// result; the published table says batch 2 with offload on. Without offload the sharded NF4
/// weights alone take 17 GiB per GPU and leave too little room, as our planner also finds.)
///
/// What differs: the figure is PyTorch's peak *reserved* memory, which leaves out the CUDA
/// context that our total includes (0.75 GiB); the reference computed every logit in f32 through
/// Hugging Face's unfused loss, where we count a 1024-token chunk of the fused loss; and its LoRA
/// dropout (0.1) keeps a dropped copy of each adapter input, which we do not model. The test
/// checks our planner's own prediction, and the same model with the reference's unfused loss.
#[test]
fn answer_ai_llama2_70b_qlora_fits_two_24gb_gpus_near_the_measured_peak() {
    use LoraTarget::*;
    let c = cluster(TWO_3090);
    let t = TrainSpec {
        mode: TrainMode::Qlora {
            lora: LoraSpec { rank: 64, targets: vec![QProj, KProj, VProj, GateProj, UpProj, DownProj] },
            double_quant: true,
        },
        seq_len: 2048,
        global_batch: 4,
        optimizer: OptimizerKind::Adamw,
        activation_checkpointing: true,
        cpu_offload: true,
        micro_batch: Some(2),
    };
    let measured = 14.92;
    let p = plan(&c, &preset("llama-2-70b"), &t).unwrap();
    assert_eq!((p.pipeline_degree, p.data_parallel_degree, p.zero_stage), (1, 2, 3), "{p:#?}");
    assert!(p.cpu_offload && p.activation_checkpointing && p.micro_batches == 1);
    let ours = peak_gib(&p);
    assert!((ours - measured).abs() / measured < 0.15, "predicted {ours:.2} GiB, measured {measured} GiB");
    let unfused = CostModel { fused_ce_chunk_tokens: u64::MAX, ..CostModel::DEFAULT };
    let reference = peak_gib(&plan_with(&c, &preset("llama-2-70b"), &t, &unfused).unwrap());
    assert!((reference - measured).abs() / measured < 0.15, "reference-like {reference:.2} GiB");
    assert!(reference > ours);
    // Without offload the quantized weights do not leave room: the planner refuses, with numbers.
    let s = shortfall(plan(&c, &preset("llama-2-70b"), &TrainSpec { cpu_offload: false, ..t.clone() }).unwrap_err());
    assert!(s.needed_bytes > s.available_bytes);
    assert!(s.suggestions.iter().any(|s| s.change == "train.cpu_offload: true" && s.fits), "{s}");
}

/// Full bf16 training of a 70B model needs ~18 bytes per parameter (bf16 weights, f32 gradients,
/// f32 AdamW master and moments): 1.2 TiB, over 12 times what four 24 GB GPUs hold.
#[test]
fn full_70b_training_on_four_24gb_gpus_is_refused_with_the_shortfall() {
    let (m, t) = recipe(&R70B.replace("mode: qlora", "mode: full").replace(
        "  lora:\n    rank: 16\n    alpha: 32\n    target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\n  qlora:\n    double_quant: true\n",
        "",
    ));
    assert_eq!(t.mode, TrainMode::Full);
    let s = shortfall(plan(&cluster(FOUR_4090), &m, &t).unwrap_err());
    assert_eq!(s.available_bytes, 24 << 30);
    assert!(s.short_bytes() as f64 / GIB > 100.0, "{s}");
    let b = s.breakdown.as_ref().unwrap();
    assert!(b.optimizer > b.activations && b.optimizer as f64 / GIB > 50.0, "{b:?}");
    let text = PlanError::DoesNotFit(Box::new(s.clone())).to_string();
    assert!(text.starts_with("does not fit: pc-"), "{text}");
    assert!(text.contains("short by") && text.contains("finetune.mode: qlora"), "{text}");
    let q = s.suggestions.iter().find(|x| x.change.starts_with("finetune.mode: qlora")).unwrap();
    assert!(q.fits && q.effect.contains("tokens/s"), "{q:?}");
    let more = s.suggestions.iter().find(|x| x.change.contains("devices like")).unwrap();
    assert!(more.fits, "{more:?}");
}

#[test]
fn lora_8b_fits_one_24gb_gpu() {
    let (m, t) = recipe(R8B_LORA);
    let one = cluster(&FOUR_4090.replace("count: 4", "count: 1"));
    let p = plan(&one, &m, &t).unwrap();
    assert_eq!((p.pipeline_degree, p.data_parallel_degree), (1, 1));
    let r = &p.ranks[0];
    assert!(r.memory.total <= r.memory.capacity);
    // bf16 base weights: 8.03e9 × 2 B = 15.0 GiB.
    assert!((r.memory.weights as f64 / GIB - 14.96).abs() < 0.05, "{:?}", r.memory);
    assert!(p.step.tokens_per_s > 0.0 && p.step.mfu > 0.0 && p.step.mfu < 1.0);
    // Without checkpointing, one sequence's activations (32 layers × 2048 tokens) do not fit.
    let no_ckpt = TrainSpec { activation_checkpointing: false, ..t };
    let s = shortfall(plan(&one, &m, &no_ckpt).unwrap_err());
    assert!(s.suggestions.iter().any(|x| x.change == "train.activation_checkpointing: true" && x.fits), "{s}");
}

/// 8B LoRA without activation checkpointing does not fit the 24 GB GPU alone, so the planner
/// pipelines it over the mixed pool; the CPU box would only slow it down.
#[test]
fn mixed_pool_gives_faster_and_larger_devices_more_layers() {
    let c = cluster(MIXED);
    let (m, t) = recipe(R8B_LORA);
    let t = TrainSpec { activation_checkpointing: false, ..t };
    let p = plan(&c, &m, &t).unwrap();
    assert!(p.pipeline_degree >= 2, "{p:#?}");
    let layers_of = |device: &str| -> usize {
        p.ranks.iter().filter(|r| r.device == device).map(|r| p.stages[r.stage.0 as usize].layers()).sum()
    };
    let by_speed = ["RTX 4090", "RTX 4070", "RTX 3060 Ti", "Ryzen 9 5950X"];
    let counts: Vec<usize> = by_speed.iter().map(|d| layers_of(d)).collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    assert!(counts[0] > counts[1], "{counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 32);
    assert!(p.step.bubble_s > 0.0 && p.step.bubble_fraction > 0.0 && p.step.bubble_fraction < 0.5, "{:?}", p.step);
    let mb = p.micro_batches as f64;
    let ideal = (p.pipeline_degree as f64 - 1.0) / (mb + p.pipeline_degree as f64 - 1.0);
    assert!(p.step.bubble_fraction < 2.0 * ideal + 0.05, "{} vs {ideal}", p.step.bubble_fraction);
    assert!(p.unused.iter().any(|u| u.device == "Ryzen 9 5950X" && u.reason.contains("tokens/s")), "{:?}", p.unused);
}

#[test]
fn shipped_recipes_and_clusters_plan() {
    let (m70, t70) = recipe(R70B);
    let p = plan(&cluster(FOUR_4090), &m70, &t70).unwrap();
    assert!(p.ranks.iter().all(|r| r.memory.total <= r.memory.capacity));
    assert!(!p.executable.ok && !p.executable.reasons.is_empty());
    for (r, c) in [(R8B_QLORA, MIXED), (R8B_LORA, MIXED), (R70B, TWO_3090.replace("128", "256").as_str())] {
        let (m, t) = recipe(r);
        let c = cluster(c);
        let e = plan(&c, &m, &t);
        // 70B QLoRA on two 24 GB GPUs needs offload, which the recipe does not allow.
        if c.name == "2x3090" {
            let s = shortfall(e.unwrap_err());
            assert!(s.suggestions.iter().any(|x| x.change == "train.cpu_offload: true" && x.fits), "{s}");
        } else {
            e.unwrap();
        }
    }
}

/// The benchmark: `swarm plan --cluster ops/clusters/64-mixed.yaml --recipe recipes/70b.yaml`.
/// No timing assertion here (debug builds, shared machines); BENCHMARKS.md records the timing.
#[test]
fn planning_64_workers_completes() {
    let c = cluster(MIXED_64);
    assert_eq!(c.plan_devices().len(), 64);
    let (m, t) = recipe(R70B);
    let p = plan(&c, &m, &t).unwrap();
    assert_eq!(p.ranks.len() + p.unused.len(), 64);
    assert_eq!(p.pipeline_degree * p.data_parallel_degree, p.ranks.len());
}

#[test]
fn slow_links_between_replicas_choose_diloco_with_its_break_even() {
    let four = |gbit: &str| {
        cluster(&format!(
            "name: a100s\ndefault_link: {{ bandwidth_gbit_s: {gbit}, latency_us: 300 }}\nworkers:\n  - {{ name: n, count: 4, host_ram_gib: 256, devices: [{{ kind: cuda, name: A100 80GB, memory_gib: 80, bf16_tflops: 280, memory_bandwidth_gb_s: 2000 }}] }}\n"
        ))
    };
    let t = TrainSpec {
        mode: TrainMode::Full,
        seq_len: 2048,
        global_batch: 64,
        optimizer: OptimizerKind::Adamw,
        activation_checkpointing: true,
        cpu_offload: false,
        micro_batch: None,
    };
    let m = preset("llama-3.2-1b");
    let slow = plan(&four("0.1"), &m, &t).unwrap();
    let SyncStrategy::Diloco { every } = slow.sync.strategy else { panic!("{:#?}", slow.sync) };
    assert!((10..=1000).contains(&every));
    assert!(slow.sync.break_even_h.unwrap() > 1.0 && slow.sync.explanation.contains("break-even"));
    assert_eq!(slow.zero_stage, 0);
    let fast = plan(&four("100"), &m, &t).unwrap();
    assert_eq!(fast.sync.strategy, SyncStrategy::EveryStep, "{:#?}", fast.sync);
}

#[test]
fn plans_are_deterministic() {
    let c = cluster(MIXED_64);
    let (m, t) = recipe(R8B_QLORA);
    assert_eq!(plan(&c, &m, &t).unwrap(), plan(&c, &m, &t).unwrap());
}

#[test]
fn bad_inputs_name_the_field_and_value() {
    let c = cluster(MIXED);
    let (m, t) = recipe(R8B_LORA);
    let e = plan(&c, &m, &TrainSpec { seq_len: 1 << 20, ..t.clone() }).unwrap_err().to_string();
    assert!(e.starts_with("train.seq_len = 1048576: must be in [2, 131072]"), "{e}");
    let e = plan(&c, &m, &TrainSpec { micro_batch: Some(5), ..t.clone() }).unwrap_err().to_string();
    assert!(e.starts_with("micro_batch = 5") && e.contains("global_batch (16)"), "{e}");
    let mut bad = c.clone();
    bad.workers[0].devices[0].bf16_tflops = 0.0;
    let e = plan(&bad, &m, &t).unwrap_err().to_string();
    assert!(e.starts_with("cluster workers[0].devices[0].bf16_tflops = 0: must be > 0;"), "{e}");
}

fn arb_cluster() -> impl Strategy<Value = ClusterSpec> {
    let gpus =
        [("RTX 4090", 24.0, 150.0), ("RTX 3090", 24.0, 71.0), ("RTX 4070", 12.0, 58.0), ("RTX 3060 Ti", 8.0, 32.0)];
    let worker = (0usize..5, 1usize..3, prop::sample::select(vec![16.0, 32.0, 64.0]));
    (prop::collection::vec(worker, 1..7), prop::sample::select(vec![0.1, 1.0, 10.0])).prop_map(move |(ws, gbit)| {
        let mut yaml = format!("name: prop\ndefault_link: {{ bandwidth_gbit_s: {gbit}, latency_us: 200 }}\nworkers:\n");
        for (i, (kind, count, ram)) in ws.into_iter().enumerate() {
            let dev = match gpus.get(kind) {
                Some((name, mem, tf)) => {
                    format!("{{ kind: cuda, name: {name}, memory_gib: {mem}, bf16_tflops: {tf}, count: {count} }}")
                }
                None => "{ kind: cpu, name: cpu, bf16_tflops: 1.0 }".to_string(),
            };
            yaml.push_str(&format!("  - {{ name: w{i}, host_ram_gib: {ram}, devices: [{dev}] }}\n"));
        }
        cluster(&yaml)
    })
}

fn arb_train() -> impl Strategy<Value = TrainSpec> {
    (
        0usize..3,
        1usize..5,
        prop::sample::select(vec![128usize, 512, 2048]),
        1usize..40,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(mode, rank, seq_len, global_batch, ckpt, offload, adam8)| {
            let lora =
                LoraSpec { rank: rank * 8, targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj] };
            TrainSpec {
                mode: match mode {
                    0 => TrainMode::Full,
                    1 => TrainMode::Lora { lora },
                    _ => TrainMode::Qlora { lora, double_quant: ckpt },
                },
                seq_len,
                global_batch,
                optimizer: if adam8 { OptimizerKind::Adamw8bit } else { OptimizerKind::Adamw },
                activation_checkpointing: ckpt,
                cpu_offload: offload,
                micro_batch: None,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn plans_keep_their_invariants(
        c in arb_cluster(),
        model in prop::sample::select(vec!["tiny", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b"]),
        t in arb_train(),
    ) {
        let m = preset(model);
        let t = TrainSpec { seq_len: t.seq_len.min(m.max_position_embeddings), ..t };
        let p = match plan(&c, &m, &t) {
            Ok(p) => p,
            Err(PlanError::DoesNotFit(s)) => {
                prop_assert!(s.needed_bytes > s.available_bytes);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
        };
        // Every layer is assigned exactly once, in order, at least one per stage.
        let mut next = 0;
        for s in &p.stages {
            prop_assert_eq!(s.first_layer, next);
            prop_assert!(s.end_layer > s.first_layer);
            prop_assert_eq!(s.ranks.len(), p.data_parallel_degree);
            next = s.end_layer;
        }
        prop_assert_eq!(next, m.num_hidden_layers);
        // Memory on every device is within its capacity.
        for r in &p.ranks {
            prop_assert!(r.memory.total <= r.memory.capacity, "{} {:?}", r.rank, r.memory);
            let parts: u64 = r.memory.parts().iter().map(|(_, b)| b).sum();
            prop_assert_eq!(parts, r.memory.total);
        }
        // Shard ownership partitions every trainable parameter exactly once.
        let mut owns: Vec<_> = p.ranks.iter().map(|r| r.owns).collect();
        owns.sort_by_key(|o| (o.start, o.end));
        let mut at = 0;
        for o in owns {
            prop_assert_eq!(o.start, at);
            at = o.end;
        }
        prop_assert_eq!(at, p.model.trainable_params);
        let expected = match &t.mode {
            TrainMode::Full => m.param_count(),
            _ => t.mode.lora().unwrap().params_per_layer(&m) * m.num_hidden_layers as u64,
        };
        prop_assert_eq!(p.model.trainable_params, expected);
        // The parallel degrees multiply to the ranks used; used and unused make the cluster.
        prop_assert_eq!(p.pipeline_degree * p.data_parallel_degree, p.ranks.len());
        prop_assert_eq!(p.ranks.len() + p.unused.len(), c.plan_devices().len());
        // Every replica's micro-batches add up to the global batch.
        let per_step: usize = (0..p.data_parallel_degree)
            .map(|r| p.ranks.iter().find(|x| x.replica == r).unwrap().micro_batch * p.micro_batches)
            .sum();
        prop_assert_eq!(per_step, t.global_batch);
        prop_assert!(p.step.total_s > 0.0 && p.step.tokens_per_s.is_finite() && p.step.mfu > 0.0 && p.step.mfu <= 1.0);
    }
}

/// What this build runs today (data parallelism with ZeRO-1, one pass per step) is planned as
/// executable.
#[test]
fn tiny_cpu_recipe_on_two_cpu_workers_is_executable() {
    let (m, t) = recipe(include_str!("../../../recipes/tiny-cpu.yaml"));
    let c = cluster(
        "name: laptop\nworkers:\n  - { name: w, count: 2, host_ram_gib: 16, devices: [{ kind: cpu, name: cpu, bf16_tflops: 0.2 }] }\n",
    );
    let p = plan(&c, &m, &t).unwrap();
    assert!(p.executable.ok, "{:#?}", p.executable);
    assert_eq!((p.pipeline_degree, p.micro_batches, p.zero_stage), (1, 1, 1));
    // The recipe section that runs it, and one that parses back.
    assert_eq!(p.parallel_section(), "parallel:\n  zero_stage: 1\n  workers: [\"w-1\", \"w-2\"]\n");
    let mut stages = p.clone();
    stages.pipeline_degree = 2;
    stages.micro_batches = 4;
    let yaml = stages.parallel_section();
    assert!(yaml.contains("pipeline_stages: 2") && yaml.contains("micro_batch_rows: [8, 8]"), "{yaml}");
    let _: crate::recipe::ParallelSection = serde_yaml::from_str::<serde_yaml::Value>(&yaml)
        .map(|v| serde_yaml::from_value(v["parallel"].clone()).unwrap())
        .unwrap();
}

/// A tied table lives on the last pipeline stage: the plan counts its rows and their gradient
/// between the first and last stage's workers (not overlapped) in the communication and the
/// step, at the link's speed; an untied model, or one stage, has no such exchange.
#[test]
fn a_pipeline_with_a_tied_head_pays_for_the_row_exchange() {
    use crate::cost::Sharding;
    use crate::planner::{Ctx, Layout};
    // Two workers of one 24 GB GPU each, on the default 1 GbE link.
    let c = cluster(
        "name: two-pcs\nworkers:\n  - { name: a, host_ram_gib: 64, devices: [{ kind: cuda, name: RTX 3090, memory_gib: 24, bf16_tflops: 71 }] }\n  - { name: b, host_ram_gib: 64, devices: [{ kind: cuda, name: RTX 3090, memory_gib: 24, bf16_tflops: 71 }] }\n",
    );
    let t = TrainSpec {
        mode: TrainMode::Full,
        seq_len: 2048,
        global_batch: 8,
        optimizer: Default::default(),
        activation_checkpointing: true,
        cpu_offload: false,
        micro_batch: None,
    };
    let (m, micro) = (4u64, [2u64]);
    let lay = || Layout {
        p: 2,
        d: 1,
        groups: vec![vec![0], vec![1]],
        sharding: Sharding::Zero1,
        offload: false,
        ckpt: true,
        share: vec![1, 1],
    };
    let step = |tied: bool| {
        let mut model = preset("llama-3.2-1b");
        model.tie_word_embeddings = tied;
        let ctx = Ctx::new(&c, &model, &t, &CostModel::DEFAULT);
        ctx.timing(&lay(), &[8, 8], m, &micro).expect("an every-step plan").step
    };
    let (tied, untied) = (step(true), step(false));
    // 16,384 tokens: as many rows (at most) to the first stage and gradient rows back, 2,048
    // bf16 values each; 1 Gbit/s and 300 µs each way.
    let bytes = 2.0 * 16_384.0 * 2048.0 * 2.0;
    let want = bytes / 1.25e8 + 2.0 * 300e-6;
    assert!((tied.tied_exchange_s - want).abs() < 1e-9, "{} vs {want}", tied.tied_exchange_s);
    assert_eq!(untied.tied_exchange_s, 0.0);
    for s in [&tied, &untied] {
        assert!(s.communication_s >= s.tied_exchange_s);
        assert!((s.total_s - (s.compute_s + s.communication_s + s.bubble_s)).abs() < 1e-9, "{s:?}");
    }
    // A single stage keeps its table: nothing to exchange.
    let mut model = preset("llama-3.2-1b");
    model.tie_word_embeddings = true;
    let ctx = Ctx::new(&c, &model, &t, &CostModel::DEFAULT);
    let one = Layout { p: 1, d: 1, groups: vec![vec![0]], share: vec![1, 0], ..lay() };
    assert_eq!(ctx.timing(&one, &[16], 4, &micro).expect("plan").step.tied_exchange_s, 0.0);
}
