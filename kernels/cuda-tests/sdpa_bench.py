"""Time PyTorch SDPA (flash backend) causal GQA fwd and fwd+bwd on the flash_attn_test.cu timing shapes.

FLOPs counted like flash_attn_test.cu: fwd = 2*B*H*S*S*D (causal), bwd = 2.5 * fwd.
Usage: python3 kernels/cuda-tests/sdpa_bench.py [--check]
  --check: also compile kernels/src/cuda/flash_attn.cu with NVRTC (cupy, no include path), launch
           it with the grid/block table from its header, and compare o, lse, dq, dk, dv against
           float64 PyTorch autograd.
"""

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench(B, H, HKV, S, D):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, HKV, S, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, HKV, S, D, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(B, H, S, D, device=dev, dtype=dt)
    mode = "enable_gqa"

    def call(q, k, v):
        if mode == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            call(q, k, v).backward(do)
        except RuntimeError as e:  # flash backend without GQA support: repeat kv outside the timing
            print(f"  enable_gqa with flash failed ({str(e).splitlines()[0][:80]}); repeating kv")
            mode = "repeat_kv"
        kr = k.detach().repeat_interleave(H // HKV, dim=1).requires_grad_()
        vr = v.detach().repeat_interleave(H // HKV, dim=1).requires_grad_()

        def fwd():
            with torch.no_grad():
                call(q, k, v)

        def fwdbwd():
            call(q, k, v).backward(do)

        tf = median_ms(fwd)
        tfb = median_ms(fwdbwd)
    ff = 2.0 * B * H * S * S * D
    fb = 2.5 * ff
    tb = tfb - tf
    print(
        f"SDPA-flash ({mode}) B={B} H={H} HKV={HKV} S={S} D={D} | fwd {tf:.3f} ms {ff / tf * 1e-9:.1f} TFLOP/s"
        f" | bwd (fwd+bwd - fwd) {tb:.3f} ms {fb / tb * 1e-9:.1f} TFLOP/s | fwd+bwd {tfb:.3f} ms"
        f" {(ff + fb) / tfb * 1e-9:.1f} TFLOP/s"
    )


def nvrtc_check():
    import cupy as cp
    import numpy as np

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../src/cuda/flash_attn.cu")
    mod = cp.RawModule(code=open(path).read(), options=("--std=c++17", "-arch=compute_90"), backend="nvrtc")
    fn = {n: mod.get_function(n) for d in (64, 128) for n in (
        f"flash_attn_fwd_d{d}", f"flash_attn_bwd_preprocess_d{d}", f"flash_attn_bwd_dkdv_d{d}", f"flash_attn_bwd_dq_d{d}")}
    print("NVRTC compile ok:", ", ".join(f"{n}({f.attributes['num_regs']} regs)" for n, f in fn.items()))
    cd = lambda a, b: (a + b - 1) // b
    ok = True
    for B, H, HKV, S, D in [(2, 8, 2, 333, 64), (1, 4, 2, 200, 128), (1, 2, 1, 1, 128)]:
        torch.manual_seed(S + D)
        dev, bf = "cuda", torch.bfloat16
        q = torch.randn(B, H, S, D, device=dev, dtype=bf)
        k = torch.randn(B, HKV, S, D, device=dev, dtype=bf)
        v = torch.randn(B, HKV, S, D, device=dev, dtype=bf)
        do = torch.randn(B, H, S, D, device=dev, dtype=bf)
        o, dq = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        dk, dv = torch.full_like(k, float("nan")), torch.full_like(k, float("nan"))
        lse = torch.full((B, H, S), float("nan"), device=dev)
        dvec = torch.full((B, H, S), float("nan"), device=dev)
        P = lambda t: cp.asarray(t.view(torch.int16) if t.dtype == bf else t)
        sc = (np.int32(B), np.int32(H), np.int32(HKV), np.int32(S), np.float32(1 / math.sqrt(D)))
        torch.cuda.synchronize()
        fb, fq = (128, 256) if D == 64 else (64, 128)
        fn[f"flash_attn_fwd_d{D}"]((B * H, cd(S, fb)), (fq,), (P(q), P(k), P(v), P(o), P(lse)) + sc)
        fn[f"flash_attn_bwd_preprocess_d{D}"]((cd(B * H * S, 8),), (256,), (P(o), P(do), P(dvec)) + sc)
        fn[f"flash_attn_bwd_dkdv_d{D}"]((B * HKV, cd(S, 64)), (128,),
                                        (P(q), P(k), P(v), P(do), P(lse), P(dvec), P(dk), P(dv)) + sc)
        qb, qt = (64, 128) if D == 64 else (128, 256)
        fn[f"flash_attn_bwd_dq_d{D}"]((B * H, cd(S, qb)), (qt,),
                                      (P(q), P(k), P(v), P(do), P(lse), P(dvec), P(dq)) + sc)
        cp.cuda.runtime.deviceSynchronize()
        # float64 reference through autograd
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        kr, vr = (t.repeat_interleave(H // HKV, dim=1) for t in (k64, v64))
        s = (q64 @ kr.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(torch.ones(S, S, device=dev, dtype=torch.bool).triu(1), float("-inf"))
        lse_r = torch.logsumexp(s, -1)
        o_r = torch.softmax(s, -1) @ vr
        o_r.backward(do.double())
        rel = lambda a, r: ((a.double() - r).norm() / r.norm().clamp_min(1e-3 * math.sqrt(r.numel()))).item()
        errs = dict(o=rel(o, o_r), lse=rel(lse, lse_r), dq=rel(dq, q64.grad), dk=rel(dk, k64.grad), dv=rel(dv, v64.grad))
        good = all(e <= 2e-2 for e in errs.values())  # NaN compares False -> fails
        ok &= good
        print(f"NVRTC vs torch f64 B={B} H={H} HKV={HKV} S={S} D={D} | "
              + " ".join(f"{n} {e:.2e}" for n, e in errs.items()) + (" | PASS" if good else " | FAIL"))
    return ok


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if "--check" in sys.argv and not nvrtc_check():
        print("NVRTC CHECK FAILED")
        sys.exit(1)
    bench(4, 32, 8, 2048, 64)
    bench(4, 32, 8, 2048, 128)
