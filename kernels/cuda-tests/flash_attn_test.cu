// Test + benchmark harness for kernels/src/cuda/flash_attn.cu.
// Build (on the GPU machine):  nvcc -arch=sm_90 -O3 -o /tmp/fa kernels/cuda-tests/flash_attn_test.cu
// Run:  /tmp/fa            correctness on all cases (incl. the timing shapes) + timing
//       /tmp/fa --quick    correctness on the small cases only + timing
// Exit code 1 on any error > 2e-2, NaN/unwritten output, non-determinism or CUDA error.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../src/cuda/flash_attn.cu"

#define CK(x)                                                                                        \
    do {                                                                                             \
        cudaError_t e_ = (x);                                                                        \
        if (e_ != cudaSuccess) {                                                                     \
            fprintf(stderr, "CUDA error '%s' at %s:%d: %s\n", #x, __FILE__, __LINE__,                \
                    cudaGetErrorString(e_));                                                         \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)
#define CKL() CK(cudaGetLastError())

static uint16_t h_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float h_bf2f(uint16_t b) {
    uint32_t u = ((uint32_t)b) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 12345) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uni() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
    double normal() { return sqrt(-2.0 * log(uni())) * cos(6.283185307179586 * uni()); }
};

static void fill_normal(std::vector<uint16_t>& v, uint64_t seed) {
    Rng r(seed);
    for (auto& x : v) x = h_f2bf((float)r.normal());
}

// ------------------------------------ naive references ------------------------------------------
// One thread per (b, h, i) query row, double accumulation, inputs are the bf16 tensors.
__device__ double rb(const bf16_t* p) { return (double)fa_bf2f(*p); }

__global__ void ref_fwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, float* o, float* lse, int B, int H,
                        int HKV, int S, int D, float scale) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * H * S) return;
    const int i = idx % S;
    const long bh = idx / S;
    const int b = bh / H, h = bh % H, hk = h / (H / HKV);
    const bf16_t* qi = q + idx * D;
    const bf16_t* kb = k + ((long)b * HKV + hk) * S * D;
    const bf16_t* vb = v + ((long)b * HKV + hk) * S * D;
    double m = -1e300;
    for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int d = 0; d < D; ++d) s += rb(qi + d) * rb(kb + (long)j * D + d);
        m = fmax(m, s * scale);
    }
    double acc[128];
    for (int d = 0; d < D; ++d) acc[d] = 0;
    double l = 0;
    for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int d = 0; d < D; ++d) s += rb(qi + d) * rb(kb + (long)j * D + d);
        double p = exp(s * scale - m);
        l += p;
        for (int d = 0; d < D; ++d) acc[d] += p * rb(vb + (long)j * D + d);
    }
    for (int d = 0; d < D; ++d) o[idx * D + d] = (float)(acc[d] / l);
    lse[idx] = (float)(m + log(l));
}

// dvec_ref and dq_ref per query row. P uses the reference lse.
__global__ void ref_bwd_q(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                          const float* lse, float* dvec, float* dq, int B, int H, int HKV, int S, int D,
                          float scale) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * H * S) return;
    const int i = idx % S;
    const long bh = idx / S;
    const int b = bh / H, h = bh % H, hk = h / (H / HKV);
    const bf16_t* qi = q + idx * D;
    const bf16_t* doi = dout + idx * D;
    const bf16_t* kb = k + ((long)b * HKV + hk) * S * D;
    const bf16_t* vb = v + ((long)b * HKV + hk) * S * D;
    const double L = lse[idx];
    double Dv = 0;
    for (int j = 0; j <= i; ++j) {
        double s = 0, dp = 0;
        for (int d = 0; d < D; ++d) {
            s += rb(qi + d) * rb(kb + (long)j * D + d);
            dp += rb(doi + d) * rb(vb + (long)j * D + d);
        }
        Dv += exp(s * scale - L) * dp;
    }
    double acc[128];
    for (int d = 0; d < D; ++d) acc[d] = 0;
    for (int j = 0; j <= i; ++j) {
        double s = 0, dp = 0;
        for (int d = 0; d < D; ++d) {
            s += rb(qi + d) * rb(kb + (long)j * D + d);
            dp += rb(doi + d) * rb(vb + (long)j * D + d);
        }
        const double p = exp(s * scale - L);
        const double ds = p * (dp - Dv);
        for (int d = 0; d < D; ++d) acc[d] += ds * rb(kb + (long)j * D + d);
    }
    for (int d = 0; d < D; ++d) dq[idx * D + d] = (float)(acc[d] * scale);
    dvec[idx] = (float)Dv;
}

// dk_ref, dv_ref per key row (b, hk, j), summing over the query heads of the group.
__global__ void ref_bwd_kv(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                           const float* lse, const float* dvec, float* dk, float* dv, int B, int H, int HKV,
                           int S, int D, float scale) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * HKV * S) return;
    const int j = idx % S;
    const long bk = idx / S;
    const int b = bk / HKV, hk = bk % HKV, G = H / HKV;
    const bf16_t* kj = k + idx * D;
    const bf16_t* vj = v + idx * D;
    double ak[128], av[128];
    for (int d = 0; d < D; ++d) ak[d] = av[d] = 0;
    for (int g = 0; g < G; ++g) {
        const long bh = (long)b * H + hk * G + g;
        for (int i = j; i < S; ++i) {
            const bf16_t* qi = q + (bh * S + i) * D;
            const bf16_t* doi = dout + (bh * S + i) * D;
            double s = 0, dp = 0;
            for (int d = 0; d < D; ++d) {
                s += rb(qi + d) * rb(kj + d);
                dp += rb(doi + d) * rb(vj + d);
            }
            const double p = exp(s * scale - (double)lse[bh * S + i]);
            const double ds = p * (dp - (double)dvec[bh * S + i]);
            for (int d = 0; d < D; ++d) {
                av[d] += p * rb(doi + d);
                ak[d] += ds * rb(qi + d);
            }
        }
    }
    for (int d = 0; d < D; ++d) {
        dk[idx * D + d] = (float)(ak[d] * scale);
        dv[idx * D + d] = (float)av[d];
    }
}

// ------------------------------------------ launching -------------------------------------------
static int cdiv(long a, long b) { return (int)((a + b - 1) / b); }

struct Bufs {
    int B, H, HKV, S, D;
    size_t nq, nk, nr;  // elements of q-like, k-like, rows
    bf16_t *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse, *dvec;
};

static void launch_fwd(const Bufs& t, float scale) {
    const int BM = t.D == 64 ? FaFwdCfg<64>::BM : FaFwdCfg<128>::BM;
    const int NT = t.D == 64 ? FaFwdCfg<64>::NT : FaFwdCfg<128>::NT;
    dim3 grid(t.B * t.H, cdiv(t.S, BM)), block(NT);
    if (t.D == 64)
        flash_attn_fwd_d64<<<grid, block>>>(t.q, t.k, t.v, t.o, t.lse, t.B, t.H, t.HKV, t.S, scale);
    else
        flash_attn_fwd_d128<<<grid, block>>>(t.q, t.k, t.v, t.o, t.lse, t.B, t.H, t.HKV, t.S, scale);
    CKL();
}
static void launch_pre(const Bufs& t, float scale) {
    dim3 grid(cdiv((long)t.B * t.H * t.S, 8)), block(256);
    if (t.D == 64)
        flash_attn_bwd_preprocess_d64<<<grid, block>>>(t.o, t.dout, t.dvec, t.B, t.H, t.HKV, t.S, scale);
    else
        flash_attn_bwd_preprocess_d128<<<grid, block>>>(t.o, t.dout, t.dvec, t.B, t.H, t.HKV, t.S, scale);
    CKL();
}
static void launch_dkdv(const Bufs& t, float scale) {
    const int BN = t.D == 64 ? FaDkdvCfg<64>::BN : FaDkdvCfg<128>::BN;
    const int NT = t.D == 64 ? FaDkdvCfg<64>::NT : FaDkdvCfg<128>::NT;
    dim3 grid(t.B * t.HKV, cdiv(t.S, BN)), block(NT);
    if (t.D == 64)
        flash_attn_bwd_dkdv_d64<<<grid, block>>>(t.q, t.k, t.v, t.dout, t.lse, t.dvec, t.dk, t.dv, t.B, t.H,
                                                 t.HKV, t.S, scale);
    else
        flash_attn_bwd_dkdv_d128<<<grid, block>>>(t.q, t.k, t.v, t.dout, t.lse, t.dvec, t.dk, t.dv, t.B, t.H,
                                                  t.HKV, t.S, scale);
    CKL();
}
static void launch_dq(const Bufs& t, float scale) {
    const int BM = t.D == 64 ? FaDqCfg<64>::BM : FaDqCfg<128>::BM;
    const int NT = t.D == 64 ? FaDqCfg<64>::NT : FaDqCfg<128>::NT;
    dim3 grid(t.B * t.H, cdiv(t.S, BM)), block(NT);
    if (t.D == 64)
        flash_attn_bwd_dq_d64<<<grid, block>>>(t.q, t.k, t.v, t.dout, t.lse, t.dvec, t.dq, t.B, t.H, t.HKV,
                                               t.S, scale);
    else
        flash_attn_bwd_dq_d128<<<grid, block>>>(t.q, t.k, t.v, t.dout, t.lse, t.dvec, t.dq, t.B, t.H, t.HKV,
                                                t.S, scale);
    CKL();
}
static void launch_bwd(const Bufs& t, float scale) {
    launch_pre(t, scale);
    launch_dkdv(t, scale);
    launch_dq(t, scale);
}

static Bufs alloc(int B, int H, int HKV, int S, int D) {
    Bufs t;
    t.B = B, t.H = H, t.HKV = HKV, t.S = S, t.D = D;
    t.nq = (size_t)B * H * S * D, t.nk = (size_t)B * HKV * S * D, t.nr = (size_t)B * H * S;
    CK(cudaMalloc(&t.q, t.nq * 2));
    CK(cudaMalloc(&t.o, t.nq * 2));
    CK(cudaMalloc(&t.dout, t.nq * 2));
    CK(cudaMalloc(&t.dq, t.nq * 2));
    CK(cudaMalloc(&t.k, t.nk * 2));
    CK(cudaMalloc(&t.v, t.nk * 2));
    CK(cudaMalloc(&t.dk, t.nk * 2));
    CK(cudaMalloc(&t.dv, t.nk * 2));
    CK(cudaMalloc(&t.lse, t.nr * 4));
    CK(cudaMalloc(&t.dvec, t.nr * 4));
    return t;
}
static void release(Bufs& t) {
    CK(cudaFree(t.q));
    CK(cudaFree(t.o));
    CK(cudaFree(t.dout));
    CK(cudaFree(t.dq));
    CK(cudaFree(t.k));
    CK(cudaFree(t.v));
    CK(cudaFree(t.dk));
    CK(cudaFree(t.dv));
    CK(cudaFree(t.lse));
    CK(cudaFree(t.dvec));
}
static void poison(const Bufs& t) {
    CK(cudaMemset(t.o, 0xFF, t.nq * 2));
    CK(cudaMemset(t.dq, 0xFF, t.nq * 2));
    CK(cudaMemset(t.dk, 0xFF, t.nk * 2));
    CK(cudaMemset(t.dv, 0xFF, t.nk * 2));
    CK(cudaMemset(t.lse, 0xFF, t.nr * 4));
    CK(cudaMemset(t.dvec, 0xFF, t.nr * 4));
}

static std::vector<uint16_t> dl16(const bf16_t* p, size_t n) {
    std::vector<uint16_t> h(n);
    CK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
    return h;
}
static std::vector<float> dl32(const float* p, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
    return h;
}
// relative L2 error; returns +inf if any output is non-finite
// Denominators are floored at an RMS of 1e-3 (matters only where the exact gradient is ~0,
// e.g. dq/dk at S=1, where the reference is pure rounding noise).
static double relerr16(const std::vector<uint16_t>& out, const std::vector<float>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double x = h_bf2f(out[i]);
        if (!std::isfinite(x)) return INFINITY;
        num += (x - ref[i]) * (x - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / std::max(den, 1e-6 * (double)out.size()));
}
static double relerr32(const std::vector<float>& out, const std::vector<float>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double x = out[i];
        if (!std::isfinite(x)) return INFINITY;
        num += (x - ref[i]) * (x - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / std::max(den, 1e-6 * (double)out.size()));
}

static bool g_fail = false;

static void check_case(int B, int H, int HKV, int S, int D, uint64_t seed) {
    Bufs t = alloc(B, H, HKV, S, D);
    const float scale = 1.0f / sqrtf((float)D);
    std::vector<uint16_t> hq(t.nq), hk(t.nk), hv(t.nk), hdo(t.nq);
    fill_normal(hq, seed * 4 + 0);
    fill_normal(hk, seed * 4 + 1);
    fill_normal(hv, seed * 4 + 2);
    fill_normal(hdo, seed * 4 + 3);
    CK(cudaMemcpy(t.q, hq.data(), t.nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.k, hk.data(), t.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.v, hv.data(), t.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.dout, hdo.data(), t.nq * 2, cudaMemcpyHostToDevice));

    poison(t);
    launch_fwd(t, scale);
    launch_bwd(t, scale);
    CK(cudaDeviceSynchronize());
    auto o = dl16(t.o, t.nq), dq = dl16(t.dq, t.nq), dk = dl16(t.dk, t.nk), dv = dl16(t.dv, t.nk);
    auto lse = dl32(t.lse, t.nr);

    // determinism: poison gradients and run fwd + bwd again; must be bitwise identical
    poison(t);
    launch_fwd(t, scale);
    launch_bwd(t, scale);
    CK(cudaDeviceSynchronize());
    bool det = dl16(t.o, t.nq) == o && dl16(t.dq, t.nq) == dq && dl16(t.dk, t.nk) == dk &&
               dl16(t.dv, t.nk) == dv && dl32(t.lse, t.nr) == lse;

    float *ro, *rlse, *rdvec, *rdq, *rdk, *rdv;
    CK(cudaMalloc(&ro, t.nq * 4));
    CK(cudaMalloc(&rdq, t.nq * 4));
    CK(cudaMalloc(&rdk, t.nk * 4));
    CK(cudaMalloc(&rdv, t.nk * 4));
    CK(cudaMalloc(&rlse, t.nr * 4));
    CK(cudaMalloc(&rdvec, t.nr * 4));
    ref_fwd<<<cdiv(t.nr, 128), 128>>>(t.q, t.k, t.v, ro, rlse, B, H, HKV, S, D, scale);
    CKL();
    ref_bwd_q<<<cdiv(t.nr, 128), 128>>>(t.q, t.k, t.v, t.dout, rlse, rdvec, rdq, B, H, HKV, S, D, scale);
    CKL();
    ref_bwd_kv<<<cdiv((long)B * HKV * S, 128), 128>>>(t.q, t.k, t.v, t.dout, rlse, rdvec, rdk, rdv, B, H, HKV, S,
                                                      D, scale);
    CKL();
    CK(cudaDeviceSynchronize());
    const double eo = relerr16(o, dl32(ro, t.nq)), el = relerr32(lse, dl32(rlse, t.nr));
    const double eq = relerr16(dq, dl32(rdq, t.nq)), ek = relerr16(dk, dl32(rdk, t.nk)),
                 ev = relerr16(dv, dl32(rdv, t.nk));
    const double emax = std::max(std::max(std::max(eo, el), std::max(eq, ek)), ev);
    const bool ok = emax <= 2e-2 && det;  // NaN/inf -> emax = inf -> fail
    if (!ok) g_fail = true;
    printf("case B=%d H=%d HKV=%d S=%5d D=%3d | rel err o %.2e lse %.2e dq %.2e dk %.2e dv %.2e | det %s | %s\n", B,
           H, HKV, S, D, eo, el, eq, ek, ev, det ? "yes" : "NO", ok ? "PASS" : "FAIL");
    fflush(stdout);
    CK(cudaFree(ro));
    CK(cudaFree(rdq));
    CK(cudaFree(rdk));
    CK(cudaFree(rdv));
    CK(cudaFree(rlse));
    CK(cudaFree(rdvec));
    release(t);
}

template <class F>
static float time_median(F f, int reps) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) f();
    CK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int i = 0; i < reps; ++i) {
        CK(cudaEventRecord(a));
        f();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float x;
        CK(cudaEventElapsedTime(&x, a, b));
        ms.push_back(x);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

static void time_case(int B, int H, int HKV, int S, int D) {
    Bufs t = alloc(B, H, HKV, S, D);
    const float scale = 1.0f / sqrtf((float)D);
    std::vector<uint16_t> hq(t.nq), hk(t.nk), hv(t.nk), hdo(t.nq);
    fill_normal(hq, 1001);
    fill_normal(hk, 1002);
    fill_normal(hv, 1003);
    fill_normal(hdo, 1004);
    CK(cudaMemcpy(t.q, hq.data(), t.nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.k, hk.data(), t.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.v, hv.data(), t.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(t.dout, hdo.data(), t.nq * 2, cudaMemcpyHostToDevice));
    launch_fwd(t, scale);
    launch_pre(t, scale);
    CK(cudaDeviceSynchronize());
    const int R = 30;
    const float tf = time_median([&] { launch_fwd(t, scale); }, R);
    const float tb = time_median([&] { launch_bwd(t, scale); }, R);
    const float tp = time_median([&] { launch_pre(t, scale); }, R);
    const float tkv = time_median([&] { launch_dkdv(t, scale); }, R);
    const float tq = time_median([&] { launch_dq(t, scale); }, R);
    const double ff = 2.0 * B * H * (double)S * S * D;  // causal fwd flops
    const double fb = 2.5 * ff;
    printf("TIME B=%d H=%d HKV=%d S=%d D=%d | fwd %.3f ms %.1f TFLOP/s | bwd %.3f ms %.1f TFLOP/s "
           "(pre %.3f dkdv %.3f dq %.3f ms) | fwd+bwd %.1f TFLOP/s\n",
           B, H, HKV, S, D, tf, ff / tf * 1e-9, tb, fb / tb * 1e-9, tp, tkv, tq, (ff + fb) / (tf + tb) * 1e-9);
    fflush(stdout);
    release(t);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("device %s, %d SMs | warps/CTA fwd %d/%d dq %d/%d dkdv %d (D64/D128) | DQ_BN_D64=%d DKDV_BM_D128=%d\n",
           p.name, p.multiProcessorCount, FA_FWD_NW_D64, FA_FWD_NW_D128, FA_DQ_NW_D64, FA_DQ_NW_D128, FA_DKDV_NW,
           FA_DQ_BN_D64, FA_DKDV_BM_D128);
    const int cases[][5] = {{1, 2, 1, 1, 64},   {2, 4, 2, 77, 64},     {1, 4, 4, 130, 128},    {2, 8, 2, 256, 64},
                            {1, 4, 1, 512, 128}, {1, 2, 2, 300, 128}, {1, 8, 2, 2048, 64}, {1, 8, 2, 2048, 128}};
    const int ncases = sizeof(cases) / sizeof(cases[0]);
    for (int c = 0; c < ncases; ++c) {
        if (quick && cases[c][3] > 1024) continue;
        check_case(cases[c][0], cases[c][1], cases[c][2], cases[c][3], cases[c][4], 17 + c);
    }
    time_case(4, 32, 8, 2048, 64);
    time_case(4, 32, 8, 2048, 128);
    printf("%s\n", g_fail ? "RESULT: FAIL" : "RESULT: ALL PASS");
    return g_fail ? 1 : 0;
}
