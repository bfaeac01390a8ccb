"""Plain-PyTorch reference training benchmark for a Llama model (comparison point for Swarm).

    python3 bench/pytorch_ref.py [--preset llama-3.2-1b|tiny | --config config.json]
        [--batch 4] [--seq 2048] [--steps 20] [--warmup 5] [--mode eager|compile] [--both]
        [--device cuda] [--peak-tflops 989.0] [--json]

Recipe (mirrors Swarm's): f32 master weights, forward under bf16 autocast, mean next-token
cross-entropy over batch*seq tokens, AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-8, wd 0.1, fused),
grad-norm clip 1.0, zero_grad(set_to_none=True). Random token windows of seq+1 ids from a fixed
seed are generated up front on the device, so data loading costs nothing.

Each timed step is bracketed by synchronize() and wall-clock timed; the median is reported.
    tokens/s        = batch * seq / median_step_s
    flops_per_token = 6 * N + 6 * layers * seq * hidden
        N: all parameters except the embedding table when the head is untied (when tied, the
           shared embedding/head matrix is counted once, as the head). Norm weights included.
        6*layers*seq*hidden: attention score/value matmuls, 12*layers*seq*hidden for forward +
           backward without masking, halved for the causal mask.
    MFU             = flops_per_token * tokens/s / (peak_tflops * 1e12)
"""
import argparse
import gc
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: hidden, intermediate, layers, heads, kv_heads, vocab, rope_theta, eps, tie, llama3 factor
PRESETS = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0, 1e-5, True, 32.0),
    "tiny": (64, 176, 2, 4, 2, 2048, 10000.0, 1e-5, False, None),
}
KEYS = ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "theta", "eps", "tie", "scaling")


def preset_config(name):
    cfg = dict(zip(KEYS, PRESETS[name]))
    f = cfg["scaling"]
    cfg["scaling"] = None if f is None else {"factor": f, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}
    return cfg


def hf_config(path):
    with open(path) as fh:
        c = json.load(fh)
    # transformers >= 5 may nest rope settings under rope_parameters (with rope_theta inside).
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rtype = rope.get("rope_type", rope.get("type"))
    return {
        "hidden": c["hidden_size"], "inter": c["intermediate_size"],
        "layers": c["num_hidden_layers"], "heads": c["num_attention_heads"],
        "kv_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
        "vocab": c["vocab_size"], "theta": float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "eps": float(c.get("rms_norm_eps", 1e-6)), "tie": bool(c.get("tie_word_embeddings", False)),
        "scaling": rope if rtype == "llama3" else None,
    }


def rope_inv_freq(head_dim, theta, scaling):
    """Default RoPE inv_freq, then transformers' `_compute_llama3_parameters` when scaling is set."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # Rotate in f32 (HF's f32 cos/sin promote the bf16 q/k), then back to the compute dtype.
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden"], c["heads"], c["kv_heads"]
        self.hd = h // self.nh
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        self.q_proj, self.k_proj = lin(h, self.nh * self.hd), lin(h, self.nkv * self.hd)
        self.v_proj, self.o_proj = lin(h, self.nkv * self.hd), lin(self.nh * self.hd, h)
        self.gate_proj, self.up_proj, self.down_proj = lin(h, c["inter"]), lin(h, c["inter"]), lin(c["inter"], h)
        self.input_layernorm = RMSNorm(h, c["eps"])
        self.post_attention_layernorm = RMSNorm(h, c["eps"])

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, S, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, S, self.nh * self.hd))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"], c["eps"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        for m in self.modules():  # normal(0, 0.02) matrices; norms keep their ones
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if c["tie"]:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(c["hidden"] // c["heads"], c["theta"], c["scaling"]),
                             persistent=False)

    def forward(self, inputs, targets):
        S = inputs.shape[1]
        with torch.autocast(inputs.device.type, enabled=False):  # RoPE tables in f32, as in HF
            freqs = torch.outer(torch.arange(S, device=inputs.device, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(inputs)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def count_params(model, tie):
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    n_flops = n if tie else n - model.embed_tokens.weight.numel()
    return n, n_flops


def run(cfg, args, mode, preset_name):
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        gc.collect()  # drop a previous run's model/optimizer (--both)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = Llama(cfg).to(dev)
    n_params, n_flops = count_params(model, cfg["tie"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=cuda)
    fwd = torch.compile(model) if mode == "compile" else model
    gen = torch.Generator(device=dev).manual_seed(1234)
    total = args.warmup + args.steps
    data = torch.randint(0, cfg["vocab"], (total, args.batch, args.seq + 1), generator=gen, device=dev)
    # Separate contiguous tensors per step, so torch.compile sees identical input layouts.
    batches = [(data[i, :, :-1].clone(), data[i, :, 1:].clone()) for i in range(total)]
    del data

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(*batches[i])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for i in range(total):  # warm-up steps (incl. compilation) first, then timed steps
        sync()
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)

    med = statistics.median(times)
    tps = args.batch * args.seq / med
    fpt = 6 * n_flops + 6 * cfg["layers"] * args.seq * cfg["hidden"]
    return {
        "impl": f"pytorch-{mode}", "preset": preset_name, "params": n_params,
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "step_ms_median": med * 1e3, "tokens_per_s": tps,
        "mfu": fpt * tps / (args.peak_tflops * 1e12),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
        "loss_first": losses[0], "loss_last": losses[-1],
        "torch_version": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if cuda else str(dev),
        "flops_per_token": fpt,
    }


def row(r):
    gib = 1024 ** 3
    return (f"{r['impl']:<16} {r['preset']:<14} params={r['params'] / 1e6:.1f}M B={r['batch']} S={r['seq']} "
            f"step={r['step_ms_median']:.1f}ms tok/s={r['tokens_per_s']:.0f} MFU={100 * r['mfu']:.1f}% "
            f"peak={r['peak_mem_bytes'] / gib:.2f}GiB reserved={r['peak_reserved_bytes'] / gib:.2f}GiB "
            f"loss {r['loss_first']:.4f}->{r['loss_last']:.4f} [{r['device_name']}, torch {r['torch_version']}]")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b")
    p.add_argument("--config", help="HF config.json (overrides --preset)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mode", choices=("eager", "compile"), default="eager")
    p.add_argument("--both", action="store_true", help="run eager then compile in one process")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--json", action="store_true", help="finish with one JSON line per run (compile last)")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    cfg, name = (hf_config(args.config), args.config) if args.config else (preset_config(args.preset), args.preset)

    print(f"# flops/token = 6*N + 6*layers*seq*hidden (N excludes an untied embedding table); "
          f"MFU = flops/token * tokens/s / ({args.peak_tflops} TFLOPS)", flush=True)
    results = []
    for mode in (("eager", "compile") if args.both else (args.mode,)):
        try:
            r = run(cfg, args, mode, name)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            print(f"OUT OF MEMORY: {mode} with batch={args.batch} seq={args.seq} did not fit on "
                  f"{args.device}; try a smaller --batch", file=sys.stderr, flush=True)
            sys.exit(2)
        results.append(r)
        print(row(r), flush=True)
    if args.json:
        for r in results:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
