// Causal grouped-query flash attention (forward + backward), bf16 in / bf16 out, f32 softmax.
// Target: sm_80+ (tuned for H100 / sm_90). Tensor cores via mma.sync m16n8k16 bf16 + ldmatrix.
// Compiled at run time by NVRTC: NO #include, bf16 is handled as raw `unsigned short` bits.
//
// ---------------------------------------------------------------------------------------------
// LAYOUT (all contiguous row-major, bf16 = 16-bit raw bits):
//   q, o, dq, do : [B, H,   S, D]        k, v, dk, dv : [B, HKV, S, D]
//   lse, dvec    : [B, H, S] f32
//   H % HKV == 0; query head h uses kv head h / (H / HKV). Causal: query i sees keys j <= i.
//   D in {64, 128}: every entry point exists as *_d64 and *_d128. Any S >= 1.
//   scale > 0 (caller passes 1/sqrt(D)); scores = scale * q.k.
//   All launches: dynamic shared memory = 0 (static smem only, <= 48 KB), default stream ok.
//   Let cdiv(a,b) = (a + b - 1) / b.
//
// ENTRY POINTS (X = 64 or 128; all kernels take the same trailing scalars B, H, HKV, S, scale).
// Grid/block differ per kernel and per D (tuned on H100; the table is for the default knobs
// below, which is what NVRTC compiles). Each kernel checks blockDim, gridDim and H % HKV == 0
// and executes `trap` (the launch fails with a CUDA error) if they do not match this table:
//
//   kernel                          block   grid                         rows per CTA
//   flash_attn_fwd_d64              256     (B*H,   cdiv(S,128), 1)      128 queries
//   flash_attn_fwd_d128             128     (B*H,   cdiv(S, 64), 1)       64 queries
//   flash_attn_bwd_preprocess_dX    256     (cdiv(B*H*S, 8), 1, 1)         8 rows
//   flash_attn_bwd_dkdv_dX          128     (B*HKV, cdiv(S, 64), 1)       64 keys
//   flash_attn_bwd_dq_d64           128     (B*H,   cdiv(S, 64), 1)       64 queries
//   flash_attn_bwd_dq_d128          256     (B*H,   cdiv(S,128), 1)      128 queries
//
// 1) flash_attn_fwd_dX(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
//                      int B, int H, int HKV, int S, float scale)
//      writes o [B,H,S,D] and lse [B,H,S] (natural-log logsumexp of scale*q.k over j <= i).
//
// Backward = three launches, in this order (same stream):
// 2) flash_attn_bwd_preprocess_dX(const bf16* o, const bf16* dout, float* dvec,
//                      int B, int H, int HKV, int S, float scale)
//      writes dvec [B,H,S] f32 = sum_d dout*o   (dvec: caller-provided scratch, 4*B*H*S bytes)
// 3) flash_attn_bwd_dkdv_dX(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
//                      const float* lse, const float* dvec, bf16* dk, bf16* dv,
//                      int B, int H, int HKV, int S, float scale)
//      writes dk, dv [B,HKV,S,D]; sums over the H/HKV query heads of each group in registers,
//      in a fixed order (deterministic, no atomics).
// 4) flash_attn_bwd_dq_dX(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
//                      const float* lse, const float* dvec, bf16* dq,
//                      int B, int H, int HKV, int S, float scale)
//      writes dq [B,H,S,D].
//   (3) and (4) only read lse/dvec and are independent of each other; both need (2) finished.
//   lse must be the one written by (1) for the same q, k, scale; dout = dLoss/do.
//   No other scratch. No atomics: results are bitwise deterministic run to run.
//
// Limits: D in {64,128}; S <= 65535*64 (grid.y); B*H*S < 2^31 (preprocess row index).
// ---------------------------------------------------------------------------------------------

typedef unsigned short bf16_t;

// Tuning knobs (defaults are the tuned values; the test harness may override them with -D).
// *_NW = warps per CTA, 16 rows (queries for fwd/dq, keys for dkdv) per warp.
#ifndef FA_FWD_NW_D64
#define FA_FWD_NW_D64 8
#endif
#ifndef FA_FWD_NW_D128
#define FA_FWD_NW_D128 4
#endif
#ifndef FA_DQ_NW_D64
#define FA_DQ_NW_D64 4
#endif
#ifndef FA_DQ_NW_D128
#define FA_DQ_NW_D128 8
#endif
#ifndef FA_DQ_BN_D64
#define FA_DQ_BN_D64 32
#endif
#ifndef FA_DKDV_BM_D128
#define FA_DKDV_BM_D128 32
#endif
#ifndef FA_DKDV_NW
#define FA_DKDV_NW 4
#endif

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

__device__ __forceinline__ float fa_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float fa_pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ int fa_imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float fa_bf2f(bf16_t u) { return __uint_as_float(((unsigned)u) << 16); }
__device__ __forceinline__ bf16_t fa_f2bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
// lo -> bits 0..15, hi -> bits 16..31, round-to-nearest-even (same as fa_f2bf for non-NaN).
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fa_log2(float x) {
    float y;
    asm("lg2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ unsigned fa_smem(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(r) : "l"(p));
    return r;
}
// Launch-configuration guard: a wrong block size or grid makes the launch fail (not silent garbage).
__device__ __forceinline__ void fa_check_launch(int nt, int rows_per_cta, int S, int grid_x, int H, int HKV) {
    if (blockDim.x != (unsigned)nt || blockDim.y != 1u || blockDim.z != 1u || gridDim.z != 1u ||
        (int)gridDim.y != (S + rows_per_cta - 1) / rows_per_cta || (int)gridDim.x != grid_x || HKV <= 0 ||
        H % HKV != 0)
        asm volatile("trap;");
}
__device__ __forceinline__ void fa_cp16(unsigned saddr, const void* g, bool pred) {
    int sz = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g), "r"(sz));
}
__device__ __forceinline__ void fa_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void fa_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void fa_ldsm4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void fa_ldsm4t(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// c += a * b   (16x8 f32 += 16x16 bf16 * 16x8 bf16)
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copy rows [row0, row0+ROWS) of a [S, D] bf16 matrix into smem (row stride D+8 elements),
// zero-filling rows >= S. Must be followed by fa_cp_commit().
template <int ROWS, int D, int NT>
__device__ __forceinline__ void fa_load_tile(bf16_t* sm, const bf16_t* g, int row0, int S, int tid) {
    constexpr int CPR = D / 8;
    constexpr int SSTR = D + 8;
    constexpr int TOTAL = ROWS * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT == 0 || i < TOTAL) {
            const int r = i / CPR, c = i % CPR;
            const int gr = row0 + r;
            const bool ok = gr < S;
            const bf16_t* src = g + (size_t)(ok ? gr : 0) * D + c * 8;
            fa_cp16(fa_smem(sm + r * SSTR + c * 8), src, ok);
        }
    }
}

// A-operand fragments (16 rows x D) of a row-major smem tile, rows r0..r0+15.
template <int D>
__device__ __forceinline__ void fa_load_afrag(unsigned (*f)[4], const bf16_t* sm, int r0, int lane) {
    constexpr int SSTR = D + 8;
    const unsigned base = fa_smem(sm) + (unsigned)(((r0 + (lane & 15)) * SSTR + (lane >> 4) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) fa_ldsm4(f[kk], base + kk * 32);
}

// acc[NR/8][4] += A(16 x D, fragments af) * X^T where X is an smem tile [NR rows][D] (row-major,
// row stride D+8) at shared-space address sx: result columns = rows of X.
// Addresses are a per-lane base plus compile-time offsets (folded into the LDSM immediates).
template <int D, int NR>
__device__ __forceinline__ void fa_mm_abt(float (*acc)[4], const unsigned (*af)[4], unsigned sx, int lane) {
    constexpr int SSTR = D + 8;
    const unsigned base = sx + (unsigned)((((lane & 7) + ((lane >> 4) << 3)) * SSTR + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < NR / 16; ++np) {
            unsigned b[4];
            fa_ldsm4(b, base + (unsigned)((np * 16 * SSTR + kk * 16) * 2));
            fa_mma(acc[2 * np], af[kk], b[0], b[1]);
            fa_mma(acc[2 * np + 1], af[kk], b[2], b[3]);
        }
    }
}

// acc[D/8][4] += P(16 x NR, as C-fragments p[NR/8][4]) * X where X is an smem tile [NR][D]
// at shared-space address sx.
template <int D, int NR>
__device__ __forceinline__ void fa_mm_ab(float (*acc)[4], const float (*p)[4], unsigned sx, int lane) {
    constexpr int SSTR = D + 8;
    const unsigned base = sx + (unsigned)(((lane & 15) * SSTR + (lane >> 4) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < NR / 16; ++kk) {
        unsigned a[4];
        a[0] = fa_pack(p[2 * kk][0], p[2 * kk][1]);
        a[1] = fa_pack(p[2 * kk][2], p[2 * kk][3]);
        a[2] = fa_pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        a[3] = fa_pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned b[4];
            fa_ldsm4t(b, base + (unsigned)((kk * 16 * SSTR + dp * 16) * 2));
            fa_mma(acc[2 * dp], a, b[0], b[1]);
            fa_mma(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// Store a 16 x D f32 accumulator (C fragments) as bf16 rows of a [S, D] matrix, rows < S.
template <int D>
__device__ __forceinline__ void fa_store_rows(bf16_t* g, const float (*acc)[4], int row0, int S, float mul0,
                                              float mul1, int lane) {
    const int gq = lane >> 2, t = lane & 3;
    const int ra = row0 + gq, rb = ra + 8;
    if (ra < S) {
        unsigned* dst = (unsigned*)(g + (size_t)ra * D + 2 * t);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4] = fa_pack(acc[dt][0] * mul0, acc[dt][1] * mul0);
    }
    if (rb < S) {
        unsigned* dst = (unsigned*)(g + (size_t)rb * D + 2 * t);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4] = fa_pack(acc[dt][2] * mul1, acc[dt][3] * mul1);
    }
}

// ============================================ forward ============================================
// CTA: 128 query rows (8 warps x 16 rows) of one (b, h); loops over 64-key blocks from the
// diagonal down to 0. K and V tiles are single-buffered but interleaved (FA2): V(n) loads while
// S = Q K(n)^T is computed, K(n-1) loads while O += P V(n) is computed.
template <int D>
struct FaFwdCfg {
    static constexpr int NW = (D == 64) ? FA_FWD_NW_D64 : FA_FWD_NW_D128;
    static constexpr int BM = 16 * NW, BN = 64, NT = 32 * NW, SSTR = D + 8;
    static constexpr int MINB = ((D == 64) ? 16 : 8) / NW;
    static constexpr int NQ = BM * SSTR, NKV = BN * SSTR;
    static constexpr bool ALIAS = (NQ + 2 * NKV) * 2 > 48 * 1024;  // Q smem reused for K/V
    static constexpr int SMEM = ALIAS ? (NQ > 2 * NKV ? NQ : 2 * NKV) : NQ + 2 * NKV;  // elements
};

template <int D>
__device__ __forceinline__ void fa_fwd_impl(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ K,
                                            const bf16_t* __restrict__ V, bf16_t* __restrict__ O,
                                            float* __restrict__ LSE, int B, int H, int HKV, int S,
                                            float scale, bf16_t* smem) {
    typedef FaFwdCfg<D> C;
    constexpr int BM = C::BM, BN = C::BN, NT = C::NT, KD = D / 16;
    fa_check_launch(NT, BM, S, B * H, H, HKV);
    bf16_t* sQ = smem;
    bf16_t* sK = C::ALIAS ? smem : smem + C::NQ;
    bf16_t* sV = sK + C::NKV;
    const unsigned sK_a = fa_smem(sK), sV_a = fa_smem(sV);

    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, t = lane & 3;
    const int m_block = gridDim.y - 1 - blockIdx.y;  // heaviest (last) query blocks dispatched first
    const int bh = blockIdx.x;
    const int b = bh / H, h = bh - b * H;
    const int hk = h / (H / HKV);
    const bf16_t* Qb = Q + (size_t)bh * S * D;
    const bf16_t* Kb = K + (size_t)(b * HKV + hk) * S * D;
    const bf16_t* Vb = V + (size_t)(b * HKV + hk) * S * D;
    const int m0 = m_block * BM;
    const int n_max = (fa_imin(S, m0 + BM) - 1) / BN;
    const float sl2 = scale * FA_LOG2E;

    fa_load_tile<BM, D, NT>(sQ, Qb, m0, S, tid);
    fa_cp_commit();
    if (!C::ALIAS) {
        fa_load_tile<BN, D, NT>(sK, Kb, n_max * BN, S, tid);
        fa_cp_commit();
        fa_cp_wait<1>();
    } else {
        fa_cp_wait<0>();
    }
    __syncthreads();
    unsigned qf[KD][4];
    fa_load_afrag<D>(qf, sQ, w * 16, lane);
    if (C::ALIAS) {
        __syncthreads();
        fa_load_tile<BN, D, NT>(sK, Kb, n_max * BN, S, tid);
        fa_cp_commit();
    }

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float mrow[2] = {fa_neg_inf(), fa_neg_inf()};
    float lrow[2] = {0.f, 0.f};
    const int wr0 = m0 + w * 16;  // first query row of this warp
    const bool warp_valid = wr0 < S;

    for (int n = n_max; n >= 0; --n) {
        const int n0 = n * BN;
        fa_cp_wait<0>();
        __syncthreads();  // K(n) visible; everyone done with V(n+1)
        fa_load_tile<BN, D, NT>(sV, Vb, n0, S, tid);
        fa_cp_commit();
        const bool active = warp_valid && (n0 <= wr0 + 15);
        float s[BN / 8][4];
        if (active) {
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            fa_mm_abt<D, BN>(s, qf, sK_a, lane);
            if (n0 + BN - 1 > wr0 || n0 + BN > S) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = n0 + nt * 8 + 2 * t + (e & 1);
                        const int row = wr0 + gq + (e >> 1) * 8;
                        if (col > row || col >= S) s[nt][e] = fa_neg_inf();
                    }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = fa_neg_inf();
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mnew = fmaxf(mrow[r], mx);
                const float msc = (mnew == fa_neg_inf()) ? 0.f : mnew * sl2;
                const float alpha = fa_exp2(mrow[r] * sl2 - msc);
                mrow[r] = mnew;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float p0 = fa_exp2(fmaf(s[nt][2 * r], sl2, -msc));
                    const float p1 = fa_exp2(fmaf(s[nt][2 * r + 1], sl2, -msc));
                    s[nt][2 * r] = p0;
                    s[nt][2 * r + 1] = p1;
                    sum += p0 + p1;
                }
                lrow[r] = lrow[r] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    acc[dt][2 * r] *= alpha;
                    acc[dt][2 * r + 1] *= alpha;
                }
            }
        }
        fa_cp_wait<0>();
        __syncthreads();  // V(n) visible; everyone done with K(n)
        if (n > 0) {
            fa_load_tile<BN, D, NT>(sK, Kb, n0 - BN, S, tid);
            fa_cp_commit();
        }
        if (active) fa_mm_ab<D, BN>(acc, s, sV_a, lane);
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.f ? 1.f / l : 0.f;
        const int row = wr0 + gq + r * 8;
        if (t == 0 && row < S)
            LSE[(size_t)bh * S + row] = l > 0.f ? mrow[r] * scale + fa_log2(l) * FA_LN2 : fa_neg_inf();
    }
    fa_store_rows<D>(O + (size_t)bh * S * D, acc, wr0, S, inv[0], inv[1], lane);
}

// ==================================== backward: preprocess ======================================
template <int D>
__device__ __forceinline__ void fa_bwd_pre_impl(const bf16_t* __restrict__ O, const bf16_t* __restrict__ dO,
                                                float* __restrict__ DV, int nrows) {
    if (blockDim.x != 256u || (long long)gridDim.x * 8 < (long long)nrows) asm volatile("trap;");
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= nrows) return;  // warp-uniform
    const unsigned* o32 = (const unsigned*)(O + (size_t)row * D);
    const unsigned* d32 = (const unsigned*)(dO + (size_t)row * D);
    float a = 0.f;
#pragma unroll
    for (int i = lane; i < D / 2; i += 32) {
        const unsigned x = o32[i], y = d32[i];
        a = fmaf(fa_bf2f((bf16_t)(x & 0xffffu)), fa_bf2f((bf16_t)(y & 0xffffu)), a);
        a = fmaf(fa_bf2f((bf16_t)(x >> 16)), fa_bf2f((bf16_t)(y >> 16)), a);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    if (lane == 0) DV[row] = a;
}

// ====================================== backward: dK, dV =========================================
// CTA: 128 keys (8 warps x 16 keys) of one (b, kv head). K and V fragments live in registers.
// Loops over the query heads of the group, and for each over query tiles of BM rows from the
// diagonal to the end; Q/dO tiles (+ lse, dvec) double-buffered with cp.async.
template <int D>
struct FaDkdvCfg {
    static constexpr int NW = FA_DKDV_NW, BN = 16 * NW, NT = 32 * NW, SSTR = D + 8;
    static constexpr int MINB = (NW <= 4) ? 2 : 1;
    static constexpr int BM = (D == 64) ? 64 : FA_DKDV_BM_D128;
    static constexpr int NTILE = BM * SSTR;                                       // one Q or dO tile
    static constexpr int SMEM = (4 * NTILE > BN * SSTR) ? 4 * NTILE : BN * SSTR;  // elements
};

template <int D>
__device__ __forceinline__ void fa_dkdv_impl(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ K,
                                             const bf16_t* __restrict__ V, const bf16_t* __restrict__ dO,
                                             const float* __restrict__ LSE, const float* __restrict__ DVEC,
                                             bf16_t* __restrict__ dK, bf16_t* __restrict__ dV, int B, int H,
                                             int HKV, int S, float scale, bf16_t* smem, float* sL, float* sD) {
    typedef FaDkdvCfg<D> C;
    constexpr int BN = C::BN, BM = C::BM, NT = C::NT, KD = D / 16;
    fa_check_launch(NT, BN, S, B * HKV, H, HKV);
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, t = lane & 3;
    const int n_block = blockIdx.y;  // key block 0 has the most work: dispatched first
    const int bkv = blockIdx.x;
    const int b = bkv / HKV, hk = bkv - b * HKV;
    const int G = H / HKV;
    const int n0 = n_block * BN;
    const bf16_t* Kb = K + (size_t)bkv * S * D;
    const bf16_t* Vb = V + (size_t)bkv * S * D;
    const float sl2 = scale * FA_LOG2E;

    unsigned kf[KD][4], vf[KD][4];
    fa_load_tile<BN, D, NT>(smem, Kb, n0, S, tid);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<D>(kf, smem, w * 16, lane);
    __syncthreads();
    fa_load_tile<BN, D, NT>(smem, Vb, n0, S, tid);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<D>(vf, smem, w * 16, lane);
    __syncthreads();

    const unsigned smem_a = fa_smem(smem);
    const int m_start = n0 / BM;
    const int nm = (S + BM - 1) / BM - m_start;
    const int T = G * nm;

    // issue loads of step `it` into buffer `buf`
    auto issue = [&](int it, int buf) {
        const int gi = it / nm;
        const int q0 = (m_start + (it - gi * nm)) * BM;
        const size_t bh = (size_t)b * H + hk * G + gi;
        fa_load_tile<BM, D, NT>(smem + buf * C::NTILE, Q + bh * S * D, q0, S, tid);
        fa_load_tile<BM, D, NT>(smem + (2 + buf) * C::NTILE, dO + bh * S * D, q0, S, tid);
        fa_cp_commit();
        if (tid < BM) {
            const int q = q0 + tid;
            sL[buf * BM + tid] = q < S ? LSE[bh * S + q] * FA_LOG2E : fa_pos_inf();
            sD[buf * BM + tid] = q < S ? DVEC[bh * S + q] : 0.f;
        }
    };

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    }
    const int wk0 = n0 + w * 16;  // first key of this warp

    issue(0, 0);
    for (int it = 0; it < T; ++it) {
        const int buf = it & 1;
        if (it + 1 < T) {
            issue(it + 1, buf ^ 1);
            fa_cp_wait<1>();
        } else {
            fa_cp_wait<0>();
        }
        __syncthreads();
        const int gi = it / nm;
        const int q0 = (m_start + (it - gi * nm)) * BM;
        const unsigned sQ = smem_a + (unsigned)(buf * C::NTILE * 2);
        const unsigned sO = smem_a + (unsigned)((2 + buf) * C::NTILE * 2);
        const float* lL = sL + buf * BM;
        const float* lD = sD + buf * BM;
        const bool active = (wk0 < S) && (wk0 <= q0 + BM - 1);
        if (active) {
            float st[BM / 8][4], dp[BM / 8][4];
#pragma unroll
            for (int i = 0; i < BM / 8; ++i) {
                st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
                dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
            }
            fa_mm_abt<D, BM>(st, kf, sQ, lane);  // S^T = K Q^T   (keys x queries)
            fa_mm_abt<D, BM>(dp, vf, sO, lane);  // dP^T = V dO^T
            const bool need_mask = (wk0 + 15 > q0) || (q0 + BM > S);
#pragma unroll
            for (int nt = 0; nt < BM / 8; ++nt) {
                const float2 L = *(const float2*)(lL + nt * 8 + 2 * t);
                const float2 Dd = *(const float2*)(lD + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float p = fa_exp2(fmaf(st[nt][e], sl2, -((e & 1) ? L.y : L.x)));
                    if (need_mask) {
                        const int q = q0 + nt * 8 + 2 * t + (e & 1);
                        const int key = wk0 + gq + (e >> 1) * 8;
                        if (q < key || q >= S) p = 0.f;
                    }
                    st[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - ((e & 1) ? Dd.y : Dd.x));
                }
            }
            fa_mm_ab<D, BM>(dv, st, sO, lane);  // dV += P^T dO
            fa_mm_ab<D, BM>(dk, dp, sQ, lane);  // dK += dS^T Q
        }
        __syncthreads();
    }
    fa_store_rows<D>(dK + (size_t)bkv * S * D, dk, wk0, S, scale, scale, lane);
    fa_store_rows<D>(dV + (size_t)bkv * S * D, dv, wk0, S, 1.f, 1.f, lane);
}

// ========================================= backward: dQ ==========================================
// CTA: 128 query rows (8 warps x 16) of one (b, h). Q and dO fragments in registers; loops over
// key blocks of BN from the diagonal down to 0, K/V tiles double-buffered; recomputes P.
template <int D>
struct FaDqCfg {
    static constexpr int NW = (D == 64) ? FA_DQ_NW_D64 : FA_DQ_NW_D128;
    static constexpr int BM = 16 * NW, NT = 32 * NW, SSTR = D + 8;
    static constexpr int MINB = ((D == 64) ? 16 : 8) / NW;
    static constexpr int BN = (D == 64) ? FA_DQ_BN_D64 : 32;
    static constexpr int NKV = BN * SSTR;
    static constexpr int SMEM = (4 * NKV > BM * SSTR) ? 4 * NKV : BM * SSTR;  // elements
};

template <int D>
__device__ __forceinline__ void fa_dq_impl(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ K,
                                           const bf16_t* __restrict__ V, const bf16_t* __restrict__ dO,
                                           const float* __restrict__ LSE, const float* __restrict__ DVEC,
                                           bf16_t* __restrict__ dQ, int B, int H, int HKV, int S,
                                           float scale, bf16_t* smem) {
    typedef FaDqCfg<D> C;
    constexpr int BM = C::BM, BN = C::BN, NT = C::NT, KD = D / 16;
    fa_check_launch(NT, BM, S, B * H, H, HKV);
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, t = lane & 3;
    const int m_block = gridDim.y - 1 - blockIdx.y;
    const int bh = blockIdx.x;
    const int b = bh / H, h = bh - b * H;
    const int hk = h / (H / HKV);
    const bf16_t* Kb = K + (size_t)(b * HKV + hk) * S * D;
    const bf16_t* Vb = V + (size_t)(b * HKV + hk) * S * D;
    const int m0 = m_block * BM;
    const int n_max = (fa_imin(S, m0 + BM) - 1) / BN;
    const float sl2 = scale * FA_LOG2E;

    unsigned qf[KD][4], of[KD][4];
    fa_load_tile<BM, D, NT>(smem, Q + (size_t)bh * S * D, m0, S, tid);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<D>(qf, smem, w * 16, lane);
    __syncthreads();
    fa_load_tile<BM, D, NT>(smem, dO + (size_t)bh * S * D, m0, S, tid);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<D>(of, smem, w * 16, lane);
    __syncthreads();

    const int wr0 = m0 + w * 16;
    const bool warp_valid = wr0 < S;
    float lse2[2], dvr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wr0 + gq + 8 * r;
        lse2[r] = row < S ? LSE[(size_t)bh * S + row] * FA_LOG2E : fa_pos_inf();
        dvr[r] = row < S ? DVEC[(size_t)bh * S + row] : 0.f;
    }

    auto issue = [&](int n, int buf) {
        fa_load_tile<BN, D, NT>(smem + buf * C::NKV, Kb, n * BN, S, tid);
        fa_load_tile<BN, D, NT>(smem + (2 + buf) * C::NKV, Vb, n * BN, S, tid);
        fa_cp_commit();
    };

    const unsigned smem_a = fa_smem(smem);
    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

    issue(n_max, 0);
    for (int n = n_max, it = 0; n >= 0; --n, ++it) {
        const int buf = it & 1;
        const int n0 = n * BN;
        if (n > 0) {
            issue(n - 1, buf ^ 1);
            fa_cp_wait<1>();
        } else {
            fa_cp_wait<0>();
        }
        __syncthreads();
        const unsigned sK = smem_a + (unsigned)(buf * C::NKV * 2);
        const unsigned sV = smem_a + (unsigned)((2 + buf) * C::NKV * 2);
        const bool active = warp_valid && (n0 <= wr0 + 15);
        if (active) {
            float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
                dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
            }
            fa_mm_abt<D, BN>(s, qf, sK, lane);   // S = Q K^T
            fa_mm_abt<D, BN>(dp, of, sV, lane);  // dP = dO V^T
            const bool need_mask = (n0 + BN - 1 > wr0) || (n0 + BN > S);
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    float p = fa_exp2(fmaf(s[nt][e], sl2, -lse2[r]));
                    if (need_mask) {
                        const int col = n0 + nt * 8 + 2 * t + (e & 1);
                        const int row = wr0 + gq + r * 8;
                        if (col > row || col >= S) p = 0.f;
                    }
                    dp[nt][e] = p * (dp[nt][e] - dvr[r]);
                }
            fa_mm_ab<D, BN>(dq, dp, sK, lane);  // dQ += dS K
        }
        __syncthreads();
    }
    fa_store_rows<D>(dQ + (size_t)bh * S * D, dq, wr0, S, scale, scale, lane);
}

// ========================================= entry points ==========================================
#define FA_FWD_ENTRY(DD)                                                                                \
    extern "C" __global__ void __launch_bounds__(FaFwdCfg<DD>::NT, FaFwdCfg<DD>::MINB)                  \
        flash_attn_fwd_d##DD(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,                \
                             const bf16_t* __restrict__ v, bf16_t* __restrict__ o, float* __restrict__ lse, \
                             int B, int H, int HKV, int S, float scale) {                               \
        __shared__ __align__(16) bf16_t smem[FaFwdCfg<DD>::SMEM];                                       \
        fa_fwd_impl<DD>(q, k, v, o, lse, B, H, HKV, S, scale, smem);                                       \
    }

#define FA_PRE_ENTRY(DD)                                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                                   \
        flash_attn_bwd_preprocess_d##DD(const bf16_t* __restrict__ o, const bf16_t* __restrict__ dout,  \
                                        float* __restrict__ dvec, int B, int H, int HKV, int S,         \
                                        float scale) {                                                  \
        (void)HKV;                                                                                      \
        (void)scale;                                                                                    \
        fa_bwd_pre_impl<DD>(o, dout, dvec, B * H * S);                                                  \
    }

#define FA_DKDV_ENTRY(DD)                                                                               \
    extern "C" __global__ void __launch_bounds__(FaDkdvCfg<DD>::NT, FaDkdvCfg<DD>::MINB) flash_attn_bwd_dkdv_d##DD( \
        const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,       \
        const bf16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dvec,  \
        bf16_t* __restrict__ dk, bf16_t* __restrict__ dv, int B, int H, int HKV, int S, float scale) {  \
        __shared__ __align__(16) bf16_t smem[FaDkdvCfg<DD>::SMEM];                                      \
        __shared__ __align__(16) float sL[2 * FaDkdvCfg<DD>::BM];                                       \
        __shared__ __align__(16) float sD[2 * FaDkdvCfg<DD>::BM];                                       \
        fa_dkdv_impl<DD>(q, k, v, dout, lse, dvec, dk, dv, B, H, HKV, S, scale, smem, sL, sD);             \
    }

#define FA_DQ_ENTRY(DD)                                                                                 \
    extern "C" __global__ void __launch_bounds__(FaDqCfg<DD>::NT, FaDqCfg<DD>::MINB) flash_attn_bwd_dq_d##DD( \
        const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,       \
        const bf16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dvec,  \
        bf16_t* __restrict__ dq, int B, int H, int HKV, int S, float scale) {                           \
        __shared__ __align__(16) bf16_t smem[FaDqCfg<DD>::SMEM];                                        \
        fa_dq_impl<DD>(q, k, v, dout, lse, dvec, dq, B, H, HKV, S, scale, smem);                           \
    }

FA_FWD_ENTRY(64)
FA_FWD_ENTRY(128)
FA_PRE_ENTRY(64)
FA_PRE_ENTRY(128)
FA_DKDV_ENTRY(64)
FA_DKDV_ENTRY(128)
FA_DQ_ENTRY(64)
FA_DQ_ENTRY(128)
