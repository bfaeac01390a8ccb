// Swarm's fused CUDA kernels, compiled at run time by NVRTC (no include path: bf16 is handled
// as raw bits). Every entry point exists for f32 and bf16 (suffix _f32 / _bf16); all math is f32.
// Launch rules (grid, block, arguments) are written next to each kernel and followed literally
// by kernels/src/cuda.rs.

typedef unsigned short bf16;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

template <typename T> __device__ __forceinline__ T st(float f);
template <> __device__ __forceinline__ float st<float>(float f) { return f; }
// Round to nearest even, as the `half` crate does; NaN stays NaN.
template <> __device__ __forceinline__ bf16 st<bf16>(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

// 16-byte vectors: 4 f32 or 8 bf16.
template <typename T> struct Vec16;
template <> struct Vec16<float> { static const int N = 4; };
template <> struct Vec16<bf16> { static const int N = 8; };

__device__ __forceinline__ void unpack(uint4 u, float* f, float) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(uint4 u, float* f, bf16) {
  unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <typename T> __device__ __forceinline__ void load16(const T* p, float* f) {
  unpack(*reinterpret_cast<const uint4*>(p), f, T());
}
__device__ __forceinline__ uint4 pack(const float* f, float) {
  uint4 u;
  u.x = __float_as_uint(f[0]); u.y = __float_as_uint(f[1]); u.z = __float_as_uint(f[2]); u.w = __float_as_uint(f[3]);
  return u;
}
__device__ __forceinline__ uint4 pack(const float* f, bf16) {
  unsigned w[4];
#pragma unroll
  for (int i = 0; i < 4; i++) w[i] = (unsigned)st<bf16>(f[2 * i]) | ((unsigned)st<bf16>(f[2 * i + 1]) << 16);
  uint4 u;
  u.x = w[0]; u.y = w[1]; u.z = w[2]; u.w = w[3];
  return u;
}
template <typename T> __device__ __forceinline__ void store16(T* p, const float* f) {
  *reinterpret_cast<uint4*>(p) = pack(f, T());
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). Every thread gets the total.
// The order of additions is fixed by the launch shape, so results are deterministic.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sh[33];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // sh may still be read by a previous call
  if (l == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    float t = l < nw ? sh[l] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (l == 0) sh[32] = t;
  }
  __syncthreads();
  return sh[32];
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[33];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    float t = l < nw ? sh[l] : NEG_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    if (l == 0) sh[32] = t;
  }
  __syncthreads();
  return sh[32];
}

// Whether row-wise 16-byte access is possible: d a multiple of the vector width and every row
// start 16-byte aligned.
template <typename T> __device__ __forceinline__ bool vec_ok(const void* p, int d) {
  return d % Vec16<T>::N == 0 && (((unsigned long long)p) & 15ull) == 0;
}

// ---------------------------------------------------------------- RMSNorm
// grid (rows), block (threads: multiple of 32). y = x * rsqrt(mean(x^2) + eps) * w.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int d, float eps) {
  const long long r = blockIdx.x;
  const T* xr = x + r * d;
  T* yr = y + r * d;
  const int N = Vec16<T>::N;
  float ss = 0.f;
  const bool vec = vec_ok<T>(x, d) && vec_ok<T>(w, d) && vec_ok<T>(y, d);
  if (vec) {
    for (int i = threadIdx.x * N; i < d; i += blockDim.x * N) {
      float f[N];
      load16(xr + i, f);
#pragma unroll
      for (int k = 0; k < N; k++) ss += f[k] * f[k];
    }
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = ld(xr[i]); ss += v * v; }
  }
  const float inv = rsqrtf(block_sum(ss) / d + eps);
  if (vec) {
    for (int i = threadIdx.x * N; i < d; i += blockDim.x * N) {
      float f[N], g[N];
      load16(xr + i, f);
      load16(w + i, g);
#pragma unroll
      for (int k = 0; k < N; k++) f[k] = f[k] * inv * g[k];
      store16(yr + i, f);
    }
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = st<T>(ld(xr[i]) * inv * ld(w[i]));
  }
}

// One warp per row, the row held in registers: NV 16-byte vectors per lane, d = 32 * NV * N.
// grid (ceil(rows / 8)), block (256): 8 rows per block, no block-wide synchronisation.
template <typename T, int NV>
__device__ void rms_norm_fwd_warp(const T* x, const T* w, T* y, int rows, int d, float eps) {
  const int N = Vec16<T>::N;
  const long long r = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const T* xr = x + r * d;
  float f[NV][N];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    load16(xr + (k * 32 + lane) * N, f[k]);
#pragma unroll
    for (int j = 0; j < N; j++) ss += f[k][j] * f[k][j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float inv = rsqrtf(ss / d + eps);
#pragma unroll
  for (int k = 0; k < NV; k++) {
    float g[N];
    load16(w + (k * 32 + lane) * N, g);
#pragma unroll
    for (int j = 0; j < N; j++) f[k][j] = f[k][j] * inv * g[j];
    store16(y + r * d + (k * 32 + lane) * N, f[k]);
  }
}

// grid (G), block (threads), dynamic shared memory d * 4 bytes (when dw_part != 0).
// Block b handles rows b, b + G, ...; writes dx (when dx != 0) and its dw partial sums
// dw_part[b * d + i] (f32, when dw_part != 0).
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, T* dx, float* dw_part, int rows, int d,
                             float eps) {
  extern __shared__ float sdw[];
  if (dw_part)
    for (int i = threadIdx.x; i < d; i += blockDim.x) sdw[i] = 0.f;
  __syncthreads();
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    const T* gr = g + r * d;
    float ss = 0.f, gwx = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xv = ld(xr[i]);
      ss += xv * xv;
      gwx += ld(gr[i]) * ld(w[i]) * xv;
    }
    const float inv = rsqrtf(block_sum(ss) / d + eps);
    gwx = block_sum(gwx);
    const float coef = gwx * inv * inv * inv / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xv = ld(xr[i]), gv = ld(gr[i]);
      if (dx) dx[r * d + i] = st<T>(inv * gv * ld(w[i]) - xv * coef);
      if (dw_part) sdw[i] += gv * xv * inv;  // column i always belongs to this thread
    }
  }
  if (dw_part)
    for (int i = threadIdx.x; i < d; i += blockDim.x) dw_part[(long long)blockIdx.x * d + i] = sdw[i];
}

// grid (ceil(d / 256)), block (256): dw[i] = sum over b of dw_part[b * d + i], in order.
template <typename T>
__device__ void sum_partials(const float* part, T* out, int parts, int d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float s = 0.f;
  for (int b = 0; b < parts; b++) s += part[(long long)b * d + i];
  out[i] = st<T>(s);
}

// ---------------------------------------------------------------- RoPE
// grid (ceil(rows * d/2 / 256)), block (256). x: [rows, d] with row r at position r % seq;
// cos, sin: [seq, d/2]. sign = +1 (forward) or -1 (backward: the inverse rotation).
template <typename T>
__device__ void rope(const T* x, const T* cs, const T* sn, T* y, long long rows, int seq, int d, float sign) {
  const int half = d / 2;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const long long r = idx / half;
  const int i = (int)(idx - r * half);
  const int t = (int)(r % seq);
  const float c = ld(cs[t * half + i]), s = sign * ld(sn[t * half + i]);
  const float a = ld(x[r * d + i]), b = ld(x[r * d + half + i]);
  y[r * d + i] = st<T>(a * c - b * s);
  y[r * d + half + i] = st<T>(b * c + a * s);
}

// ---------------------------------------------------------------- SwiGLU
__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + expf(-v)); }

// grid (ceil(n / 256)), block (256). y = silu(gate) * up.
template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float a = ld(gate[i]);
  y[i] = st<T>(a * sigmoidf_(a) * ld(up[i]));
}

// grid (ceil(n / 256)), block (256). out = [d_gate (n) | d_up (n)].
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* g, T* out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float a = ld(gate[i]), u = ld(up[i]), gv = ld(g[i]);
  const float s = sigmoidf_(a);
  out[n + i] = st<T>(gv * a * s);
  out[i] = st<T>(gv * u * s * (1.f + a * (1.f - s)));
}

// grid (ceil(n / 256)), block (256). acc += x, in place.
template <typename T>
__device__ void add_into(T* acc, const T* x, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc[i] = st<T>(ld(acc[i]) + ld(x[i]));
}

// grid (rows), block (threads). acc[ids[r] * d + j] += x[r * d + j] for every j < d: x's row r
// added into acc's row ids[r] (x f32 whatever acc's dtype; the ids distinct, so no two blocks
// write one row and the result does not depend on their order).
template <typename T>
__device__ void add_rows_into(T* acc, const unsigned* ids, const float* x, int d) {
  const long long r = blockIdx.x;
  T* a = acc + (long long)ids[r] * d;
  const float* xr = x + r * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) a[j] = st<T>(ld(a[j]) + xr[j]);
}

// grid (ceil(n / 256)), block (256). t *= g[0], in place (g read on the device: no host sync).
template <typename T>
__device__ void scale_by(T* t, const float* g, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  t[i] = st<T>(ld(t[i]) * g[0]);
}

// ---------------------------------------------------------------- softmax (last dim)
// grid (rows), block (threads). Rows that are all -inf give zeros.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int d) {
  const long long r = blockIdx.x;
  const T* xr = x + r * d;
  float m = NEG_INF;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, ld(xr[i]));
  m = block_max(m);
  if (m == NEG_INF) {
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[r * d + i] = st<T>(0.f);
    return;
  }
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(ld(xr[i]) - m);
  const float inv = 1.f / block_sum(s);
  for (int i = threadIdx.x; i < d; i += blockDim.x) y[r * d + i] = st<T>(expf(ld(xr[i]) - m) * inv);
}

// grid (rows), block (threads). dx = y * (g - sum(g * y)).
template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int d) {
  const long long r = blockIdx.x;
  float gy = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) gy += ld(g[r * d + i]) * ld(y[r * d + i]);
  gy = block_sum(gy);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float yv = ld(y[r * d + i]);
    dx[r * d + i] = st<T>(yv * (ld(g[r * d + i]) - gy));
  }
}

// ---------------------------------------------------------------- cross-entropy
// A row's (max, sum of exp(l - max)) in one pass: each thread keeps a running pair (rescaled when
// its max grows), then the pairs are merged over the block in an order fixed by the launch shape.
// A pair with max -inf holds nothing (a row of only -inf keeps sum 0).
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == NEG_INF) return;
  s = (m == NEG_INF ? 0.f : s * expf(m - mx)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - mx));
  m = mx;
}

template <typename T>
__device__ __forceinline__ void row_max_sumexp(const T* lr, int v, bool vec, float& m_out, float& s_out) {
  const int N = Vec16<T>::N;
  float m = NEG_INF, s = 0.f;
  if (vec) {
    for (int i = threadIdx.x * N; i < v; i += blockDim.x * N) {
      float f[N];
      load16(lr + i, f);
      float vm = f[0];
#pragma unroll
      for (int k = 1; k < N; k++) vm = fmaxf(vm, f[k]);
      if (vm > m) {
        s = m == NEG_INF ? 0.f : s * expf(m - vm);
        m = vm;
      }
      if (m != NEG_INF) {
#pragma unroll
        for (int k = 0; k < N; k++) s += expf(f[k] - m);
      }
    }
  } else {
    for (int i = threadIdx.x; i < v; i += blockDim.x) ms_merge(m, s, ld(lr[i]), 1.f);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    ms_merge(m, s, m2, s2);
  }
  __shared__ float shm[32], shs[32], res[2];
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // shared memory may still be read by a previous call
  if (l == 0) { shm[w] = m; shs[w] = s; }
  __syncthreads();
  if (w == 0) {
    float tm = l < nw ? shm[l] : NEG_INF, ts = l < nw ? shs[l] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, tm, o), s2 = __shfl_xor_sync(0xffffffffu, ts, o);
      ms_merge(tm, ts, m2, s2);
    }
    if (l == 0) { res[0] = tm; res[1] = ts; }
  }
  __syncthreads();
  m_out = res[0];
  s_out = res[1];
}

// grid (rows), block (threads). loss[r] = ln(sum exp(l - m)) - (l[t] - m); NaN when the target is
// out of range (the host checks targets where it can). One pass over the row, 16-byte loads
// where the row allows them.
template <typename T>
__device__ void ce_fwd(const T* logits, const unsigned* targets, float* loss, int v) {
  const long long r = blockIdx.x;
  const T* lr = logits + r * v;
  float m, s;
  row_max_sumexp(lr, v, vec_ok<T>(logits, v), m, s);
  if (threadIdx.x == 0) {
    const unsigned t = targets[r];
    loss[r] = t < (unsigned)v ? logf(s) - (ld(lr[t]) - m) : __int_as_float(0x7fc00000);
  }
}

// grid (G), block (256): part[b] = sum of x[i]^2 over i = b*256 + t, stepping G*256.
template <typename T>
__device__ void sumsq_part(const T* x, float* part, long long n) {
  float s = 0.f;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float v = ld(x[i]);
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// grid (1), block (1024): out[0] = sum of part[0..n), in a fixed order.
extern "C" __global__ void __launch_bounds__(1024) sum_f32(const float* part, float* out, int n) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = s;
}

// grid (1), block (1024): out[0] = mean of loss[0..n), summed in a fixed order.
extern "C" __global__ void __launch_bounds__(1024) mean_f32(const float* loss, float* out, int n) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += loss[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = s / n;
}

// grid (rows), block (threads). dl = (softmax(l) - onehot(t)) * g[0] * scale. dl may be logits
// itself (in place): each element is read and then written by the same thread, after the row's
// reduction.
template <typename T>
__device__ void ce_bwd(const T* logits, const unsigned* targets, const float* g, T* dl, int v, float scale) {
  const long long r = blockIdx.x;
  const T* lr = logits + r * v;
  T* dr = dl + r * v;
  const bool vec = vec_ok<T>(logits, v) && vec_ok<T>(dl, v);
  float m, s;
  row_max_sumexp(lr, v, vec, m, s);
  const float gs = g[0] * scale;
  const float k = gs / s;
  const unsigned t = targets[r];
  const int N = Vec16<T>::N;
  if (vec) {
    for (int i = threadIdx.x * N; i < v; i += blockDim.x * N) {
      float f[N];
      load16(lr + i, f);
#pragma unroll
      for (int j = 0; j < N; j++) f[j] = expf(f[j] - m) * k - ((unsigned)(i + j) == t ? gs : 0.f);
      store16(dr + i, f);
    }
  } else {
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
      const float p = expf(ld(lr[i]) - m) * k;
      dr[i] = st<T>((unsigned)i == t ? p - gs : p);
    }
  }
}

// ---------------------------------------------------------------- AdamW
// grid (ceil(n / 256)), block (256). Master weights and moments f32, gradients f32 or bf16
// (G); the update also writes the parameters in the compute dtype (out, may be 0). Gradients
// are multiplied by gscale first (global-norm clipping). Same maths as the CPU adamw_step.
template <typename T, typename G>
__device__ void adamw(float* p, float* m, float* v, const G* g, T* out, long long n, float gscale, float decay,
                      float one_minus_beta1, float beta2, float one_minus_beta2, float step_size, float bc2_sqrt,
                      float eps) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gv = ld(g[i]) * gscale;
  float mv = m[i], vv = v[i];
  mv += one_minus_beta1 * (gv - mv);
  vv = beta2 * vv + one_minus_beta2 * gv * gv;
  const float denom = sqrtf(vv) / bc2_sqrt + eps;
  const float pv = p[i] * decay - step_size * (mv / denom);
  m[i] = mv;
  v[i] = vv;
  p[i] = pv;
  if (out) out[i] = st<T>(pv);
}

// ---------------------------------------------------------------- entry points
#define ENTRY(T, S)                                                                                         \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_fwd_##S(const T* x, const T* w, T* y, int d,     \
                                                                       float eps) {                          \
    rms_norm_fwd<T>(x, w, y, d, eps);                                                                        \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_fwd_warp1_##S(const T* x, const T* w, T* y,     \
                                                                          int rows, int d, float eps) {     \
    rms_norm_fwd_warp<T, 1>(x, w, y, rows, d, eps);                                                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_fwd_warp2_##S(const T* x, const T* w, T* y,     \
                                                                          int rows, int d, float eps) {     \
    rms_norm_fwd_warp<T, 2>(x, w, y, rows, d, eps);                                                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_fwd_warp4_##S(const T* x, const T* w, T* y,     \
                                                                          int rows, int d, float eps) {     \
    rms_norm_fwd_warp<T, 4>(x, w, y, rows, d, eps);                                                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_fwd_warp8_##S(const T* x, const T* w, T* y,     \
                                                                          int rows, int d, float eps) {     \
    rms_norm_fwd_warp<T, 8>(x, w, y, rows, d, eps);                                                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024)                                                         \
      rms_norm_bwd_##S(const T* x, const T* w, const T* g, T* dx, float* dw_part, int rows, int d, float eps) { \
    rms_norm_bwd<T>(x, w, g, dx, dw_part, rows, d, eps);                                                     \
  }                                                                                                          \
  extern "C" __global__ void sum_partials_##S(const float* part, T* out, int parts, int d) {                 \
    sum_partials<T>(part, out, parts, d);                                                                    \
  }                                                                                                          \
  extern "C" __global__ void rope_##S(const T* x, const T* c, const T* s, T* y, long long rows, int seq, int d, \
                                      float sign) {                                                          \
    rope<T>(x, c, s, y, rows, seq, d, sign);                                                                 \
  }                                                                                                          \
  extern "C" __global__ void add_into_##S(T* acc, const T* x, long long n) { add_into<T>(acc, x, n); }      \
  extern "C" __global__ void add_rows_into_##S(T* acc, const unsigned* ids, const float* x, int d) {         \
    add_rows_into<T>(acc, ids, x, d);                                                                        \
  }                                                                                                          \
  extern "C" __global__ void scale_by_##S(T* t, const float* g, long long n) { scale_by<T>(t, g, n); }       \
  extern "C" __global__ void swiglu_fwd_##S(const T* a, const T* u, T* y, long long n) {                     \
    swiglu_fwd<T>(a, u, y, n);                                                                               \
  }                                                                                                          \
  extern "C" __global__ void swiglu_bwd_##S(const T* a, const T* u, const T* g, T* out, long long n) {        \
    swiglu_bwd<T>(a, u, g, out, n);                                                                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024) softmax_fwd_##S(const T* x, T* y, int d) {              \
    softmax_fwd<T>(x, y, d);                                                                                 \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024) softmax_bwd_##S(const T* y, const T* g, T* dx, int d) { \
    softmax_bwd<T>(y, g, dx, d);                                                                             \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024) ce_fwd_##S(const T* l, const unsigned* t, float* loss,  \
                                                                 int v) {                                   \
    ce_fwd<T>(l, t, loss, v);                                                                                \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024)                                                         \
      ce_bwd_##S(const T* l, const unsigned* t, const float* g, T* dl, int v, float scale) {                 \
    ce_bwd<T>(l, t, g, dl, v, scale);                                                                        \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024)                                                         \
      ce_bwd_in_place_##S(T* l, const unsigned* t, const float* g, int v, float scale) {                     \
    ce_bwd<T>(l, t, g, l, v, scale);                                                                         \
  }                                                                                                          \
  extern "C" __global__ void sumsq_part_##S(const T* x, float* part, long long n) { sumsq_part<T>(x, part, n); } \
  extern "C" __global__ void adamw_##S(float* p, float* m, float* v, const float* g, T* out, long long n,     \
                                       float gscale, float decay, float b1c, float b2, float b2c, float lr_t, \
                                       float bc2, float eps) {                                               \
    adamw<T, float>(p, m, v, g, out, n, gscale, decay, b1c, b2, b2c, lr_t, bc2, eps);                        \
  }                                                                                                          \
  extern "C" __global__ void adamw_##S##_gbf16(float* p, float* m, float* v, const bf16* g, T* out,          \
                                               long long n, float gscale, float decay, float b1c, float b2,  \
                                               float b2c, float lr_t, float bc2, float eps) {                \
    adamw<T, bf16>(p, m, v, g, out, n, gscale, decay, b1c, b2, b2c, lr_t, bc2, eps);                         \
  }

ENTRY(float, f32)
ENTRY(bf16, bf16)
