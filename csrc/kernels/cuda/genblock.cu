// GenBlock kernels on CUDA (contracts in genblock.cuh, formulas in ../cpu/genblock.h).
//
// Two launch shapes:
// * element-wise kernels: one thread per element of the tensor being written (grid-stride),
//   decoding (b, c, y, x) from its layout -- writes are coalesced, reads of a tensor in the
//   other layout go through L2;
// * per-channel reductions over (n, h, w): for kPixels tensors a (32 channels x 8 pixel lanes)
//   block per chunk of kChunk pixels of one sample -- a warp reads 32 consecutive channels of a
//   pixel, one coalesced line -- and for kPlanes tensors one block per (b, c) plane. Each block
//   writes float32 partial sums of its chunk; a second kernel adds the chunk partials of a
//   channel in double in a fixed order (deterministic, no atomics).
// Reductions that fuse a store (the epilogues) compute the statistics from the value as stored
// (rounded to the tensor's dtype), as batch norm will later read it.
#include "genblock.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mgm_fast {
namespace cuda {
namespace genblock {
namespace {

constexpr int kChunk = 256;  // pixels per reduction chunk
constexpr int kTx = 32;      // channels per reduction block
constexpr int kTy = 8;       // pixel lanes per reduction block
constexpr int kPlaneThreads = 256;
constexpr int kThreads = 256;  // element-wise blocks
constexpr int64_t kMaxBlocks = 65535;

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <>
__device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <>
__device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
template <typename T>
__device__ __forceinline__ T cvt(float v);
template <>
__device__ __forceinline__ float cvt<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half cvt<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float round_to(float v);  // v as it reads back after a store in T
template <>
__device__ __forceinline__ float round_to<float>(float v) { return v; }
template <>
__device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

__host__ __device__ __forceinline__ int64_t off(Layout l, const Dims& d, int64_t b, int64_t c,
                                                int64_t y, int64_t x) {
  return l == Layout::kPlanes ? ((b * d.c + c) * d.h + y) * d.w + x : ((b * d.h + y) * d.w + x) * d.c + c;
}

__host__ __device__ __forceinline__ int64_t numel(const Dims& d) { return d.n * d.c * d.h * d.w; }

__device__ __forceinline__ void decode(Layout l, const Dims& d, int64_t i, int64_t& b, int64_t& c,
                                       int64_t& y, int64_t& x) {
  if (l == Layout::kPlanes) {
    x = i % d.w;
    i /= d.w;
    y = i % d.h;
    i /= d.h;
    c = i % d.c;
    b = i / d.c;
  } else {
    c = i % d.c;
    i /= d.c;
    x = i % d.w;
    i /= d.w;
    y = i % d.h;
    b = i / d.h;
  }
}

__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }  // NaN stays NaN

int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  return static_cast<int>(b < kMaxBlocks ? b : kMaxBlocks);
}

template <class Op>
__global__ void __launch_bounds__(kThreads) each_kernel(Op op, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    op(i);
  }
}

template <class Op>
cudaError_t launch_each(const Op& op, int64_t total, cudaStream_t stream) {
  if (total <= 0) return cudaGetLastError();
  each_kernel<<<blocks_for(total), kThreads, 0, stream>>>(op, total);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// reductions: op(b, c, q) -> (v1, v2) for pixel q = y * w + x of sample b, channel c

template <class Op>
__global__ void __launch_bounds__(kTx* kTy) rows_reduce_kernel(Op op, int64_t c, int64_t hw,
                                                              int64_t chunks_per_b, double* p1,
                                                              double* p2) {
  __shared__ float s1[kTy][kTx + 1], s2[kTy][kTx + 1];
  const int64_t ch = blockIdx.x * static_cast<int64_t>(kTx) + threadIdx.x;
  const int64_t chunk = blockIdx.y, b = blockIdx.z;
  const int64_t q0 = chunk * kChunk, q1 = q0 + kChunk < hw ? q0 + kChunk : hw;
  float a1 = 0.0f, a2 = 0.0f;
  if (ch < c) {
    for (int64_t q = q0 + threadIdx.y; q < q1; q += kTy) {
      const float2 v = op(b, ch, q);
      a1 += v.x;
      a2 += v.y;
    }
  }
  s1[threadIdx.y][threadIdx.x] = a1;
  s2[threadIdx.y][threadIdx.x] = a2;
  __syncthreads();
  if (threadIdx.y == 0 && ch < c) {
    float t1 = 0.0f, t2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kTy; ++k) {
      t1 += s1[k][threadIdx.x];
      t2 += s2[k][threadIdx.x];
    }
    const int64_t row = b * chunks_per_b + chunk;
    p1[row * c + ch] = t1;
    p2[row * c + ch] = t2;
  }
}

template <class Op>
__global__ void __launch_bounds__(kPlaneThreads) planes_reduce_kernel(Op op, int64_t c, int64_t hw,
                                                                     double* p1, double* p2) {
  __shared__ float s1[kPlaneThreads], s2[kPlaneThreads];
  const int64_t plane = blockIdx.x, b = plane / c, ch = plane % c;
  float a1 = 0.0f, a2 = 0.0f;
  for (int64_t q = threadIdx.x; q < hw; q += kPlaneThreads) {
    const float2 v = op(b, ch, q);
    a1 += v.x;
    a2 += v.y;
  }
  s1[threadIdx.x] = a1;
  s2[threadIdx.x] = a2;
  __syncthreads();
  for (int s = kPlaneThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s1[threadIdx.x] += s1[threadIdx.x + s];
      s2[threadIdx.x] += s2[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p1[plane] = s1[0];  // row b of the (n, c) partials
    p2[plane] = s2[0];
  }
}

// Workspace: [shift: c floats, 256-byte aligned][p1][p2], p = (n * chunks_per_b, c) doubles.
struct Work {
  float* shift;
  double* p1;
  double* p2;
  int64_t chunks_per_b;
};

int64_t chunks_per_sample(const Dims& d, Layout l) {
  return l == Layout::kPlanes ? 1 : (d.h * d.w + kChunk - 1) / kChunk;
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

Work carve(void* ws, const Dims& d, Layout l) {
  char* base = static_cast<char*>(ws);
  Work w;
  w.chunks_per_b = chunks_per_sample(d, l);
  w.shift = reinterpret_cast<float*>(base);
  const size_t rows = static_cast<size_t>(d.n * w.chunks_per_b * d.c);
  w.p1 = reinterpret_cast<double*>(base + align256(static_cast<size_t>(d.c) * sizeof(float)));
  w.p2 = w.p1 + rows;
  return w;
}

template <class Op>
cudaError_t launch_reduce(const Op& op, const Dims& d, Layout l, const Work& w, cudaStream_t stream) {
  if (d.n == 0 || d.c == 0 || d.h * d.w == 0) return cudaGetLastError();
  if (l == Layout::kPlanes) {
    planes_reduce_kernel<<<static_cast<unsigned>(d.n * d.c), kPlaneThreads, 0, stream>>>(
        op, d.c, d.h * d.w, w.p1, w.p2);
  } else {
    const dim3 grid(static_cast<unsigned>((d.c + kTx - 1) / kTx), static_cast<unsigned>(w.chunks_per_b),
                    static_cast<unsigned>(d.n));
    rows_reduce_kernel<<<grid, dim3(kTx, kTy), 0, stream>>>(op, d.c, d.h * d.w, w.chunks_per_b, w.p1,
                                                            w.p2);
  }
  return cudaGetLastError();
}

// Per channel: sums of the partials over all rows in order; statistics or plain sums.
__global__ void finalize_kernel(const double* p1, const double* p2, int64_t rows, int64_t c,
                                int64_t groups, const float* shift, double count, double* mean,
                                double* var, double* sums) {
  const int64_t cg = c / groups;
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (o >= cg) return;
  double t1 = 0.0, t2 = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      t1 += p1[r * c + g * cg + o];
      t2 += p2[r * c + g * cg + o];
    }
  }
  if (sums != nullptr) {
    sums[o] = t1;
    return;
  }
  const double m1 = t1 / count, v = t2 / count - m1 * m1;
  mean[o] = static_cast<double>(shift[o]) + m1;
  var[o] = v > 0.0 ? v : 0.0;
}

cudaError_t launch_finalize(const Work& w, const Dims& d, int64_t groups, double count, double* mean,
                            double* var, double* sums, cudaStream_t stream) {
  const int64_t cg = d.c / groups;
  if (cg == 0) return cudaGetLastError();
  finalize_kernel<<<static_cast<unsigned>((cg + 255) / 256), 256, 0, stream>>>(
      w.p1, w.p2, d.n * w.chunks_per_b, d.c, groups, w.shift, count, mean, var, sums);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// ops

template <typename T>
struct StatsOp {
  const T* x;
  Dims d;
  Layout l;
  const float* shift;
  __device__ float2 operator()(int64_t b, int64_t c, int64_t q) const {
    const float v = ld(x, off(l, d, b, c, q / d.w, q % d.w)) - shift[c];
    return make_float2(v, v * v);
  }
};

template <typename T>
__global__ void first_values_kernel(const T* x, Dims d, Layout l, float* out) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < d.c) out[c] = ld(x, off(l, d, 0, c, 0, 0));
}

template <typename T>
struct SumOp {
  const T* g;
  Dims d;
  Layout l;
  __device__ float2 operator()(int64_t b, int64_t c, int64_t q) const {
    return make_float2(ld(g, off(l, d, b, c, q / d.w, q % d.w)), 0.0f);
  }
};

template <typename T>
struct AffineOp {
  const T* x;
  Dims d;
  Layout xl;
  const float* scale;
  const float* shift;
  T* out;
  Layout ol;
  __device__ void operator()(int64_t i) const {
    int64_t b, c, y, xx;
    decode(ol, d, i, b, c, y, xx);
    const float v = ld(x, off(xl, d, b, c, y, xx));
    out[i] = cvt<T>(relu(v * scale[b * d.c + c] + shift[b * d.c + c]));
  }
};

template <typename T>
struct CopyOp {
  const T* src;
  Layout sl;
  T* dst;
  Dims d;
  Layout dl;
  __device__ void operator()(int64_t i) const {
    int64_t b, c, y, x;
    decode(dl, d, i, b, c, y, x);
    dst[i] = src[off(sl, d, b, c, y, x)];
  }
};

template <typename T>
struct EpilogueOp {
  const T* src;        // phase: P (kPixels, (n, 4c, h+1, w+1)); plain: conv
  bool phase;
  Dims sd;
  Layout sl;
  const T* bias;
  const T* res;
  Dims rd;
  Layout rl;
  bool half;
  T* out;
  Dims od;
  Layout ol;
  const float* shift;  // statistics, or nullptr

  __device__ float value(int64_t b, int64_t c, int64_t y, int64_t x) const {
    float v;
    if (phase) {
      const int64_t p = y & 1, q = x & 1, h = od.h / 2, w = od.w / 2;
      v = ld(src, ((b * (h + 1) + (y >> 1) + p) * (w + 1) + (x >> 1) + q) * 4 * od.c + (2 * p + q) * od.c + c);
    } else {
      v = ld(src, off(sl, sd, b, c, y, x));
    }
    if (bias != nullptr) v += ld(bias, c);
    if (res != nullptr) v += half ? ld(res, off(rl, rd, b, c, y >> 1, x >> 1)) : ld(res, off(rl, rd, b, c, y, x));
    return v;
  }
  __device__ void operator()(int64_t i) const {  // element-wise, no statistics
    int64_t b, c, y, x;
    decode(ol, od, i, b, c, y, x);
    out[i] = cvt<T>(value(b, c, y, x));
  }
  __device__ float2 operator()(int64_t b, int64_t c, int64_t q) const {  // store + statistics
    const int64_t y = q / od.w, x = q % od.w;
    const float v = value(b, c, y, x);
    out[off(ol, od, b, c, y, x)] = cvt<T>(v);
    const float s = round_to<T>(v) - shift[c];
    return make_float2(s, s * s);
  }
};

template <typename T>
__global__ void epilogue_first_kernel(EpilogueOp<T> op, float* out) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < op.od.c) out[c] = round_to<T>(op.value(0, c, 0, 0));
}

template <typename T>
struct HalfOp {  // 2x2 block sums of g into half
  const T* g;
  Dims gd;
  Layout gl;
  T* half;
  Dims hd;
  Layout hl;
  __device__ void operator()(int64_t i) const {
    int64_t b, c, y, x;
    decode(hl, hd, i, b, c, y, x);
    const float s = (ld(g, off(gl, gd, b, c, 2 * y, 2 * x)) + ld(g, off(gl, gd, b, c, 2 * y, 2 * x + 1))) +
                    (ld(g, off(gl, gd, b, c, 2 * y + 1, 2 * x)) + ld(g, off(gl, gd, b, c, 2 * y + 1, 2 * x + 1)));
    half[i] = cvt<T>(s);
  }
};

// BN backward pieces at one element.
template <typename T>
struct BnAt {
  const T* x;
  Dims d;
  Layout xl;
  const T* act;
  Layout al;
  const T* dact;
  Layout gl;
  const float* gamma;
  int64_t gamma_stride;
  const float* scale;
  const double* mean;
  const double* rstd;
  bool training;
  const double* k1;
  const double* k2;

  __device__ float dz(int64_t b, int64_t c, int64_t y, int64_t xx) const {
    return ld(act, off(al, d, b, c, y, xx)) > 0.0f ? ld(dact, off(gl, d, b, c, y, xx)) : 0.0f;
  }
  __device__ float xhat(int64_t b, int64_t c, int64_t y, int64_t xx) const {
    return (ld(x, off(xl, d, b, c, y, xx)) - static_cast<float>(mean[c])) * static_cast<float>(rstd[c]);
  }
  __device__ float dx(int64_t b, int64_t c, int64_t y, int64_t xx) const {
    const float z = dz(b, c, y, xx);
    if (!training) return scale[b * d.c + c] * z;
    const float r = static_cast<float>(rstd[c]);
    return r * (gamma[b * gamma_stride + c] * z - static_cast<float>(k1[c]) -
                xhat(b, c, y, xx) * static_cast<float>(k2[c]));
  }
};

template <typename T>
struct BnReduceOp {
  BnAt<T> at;
  __device__ float2 operator()(int64_t b, int64_t c, int64_t q) const {
    const int64_t y = q / at.d.w, x = q % at.d.w;
    const float z = at.dz(b, c, y, x);
    return make_float2(z, z * at.xhat(b, c, y, x));
  }
};

template <typename T>
struct BnApplyOp {
  BnAt<T> at;
  const T* add;
  Layout addl;
  T* dx;
  Layout dxl;
  __device__ void operator()(int64_t i) const {
    int64_t b, c, y, x;
    decode(dxl, at.d, i, b, c, y, x);
    float v = at.dx(b, c, y, x);
    if (add != nullptr) v += ld(add, off(addl, at.d, b, c, y, x));
    dx[i] = cvt<T>(v);
  }
};

// Element i of dp (kPixels, (n, 4c, h+1, w+1)): the gradient at its output pixel, or 0.
template <typename T, bool kFromBn>
struct ScatterOp {
  const T* g;  // !kFromBn
  Dims gd;     // (n, c, 2h, 2w)
  Layout gl;
  BnAt<T> at;  // kFromBn
  T* dp;
  __device__ void operator()(int64_t i) const {
    const int64_t C = gd.c, h = gd.h / 2, w = gd.w / 2;
    const int64_t k = i % (4 * C);
    int64_t r = i / (4 * C);
    const int64_t jp = r % (w + 1);
    r /= (w + 1);
    const int64_t ip = r % (h + 1), b = r / (h + 1);
    const int64_t ph = k / C, c = k % C, p = ph >> 1, q = ph & 1;
    const int64_t ii = ip - p, jj = jp - q;
    float v = 0.0f;
    if (ii >= 0 && ii < h && jj >= 0 && jj < w) {
      const int64_t y = 2 * ii + p, x = 2 * jj + q;
      v = kFromBn ? at.dx(b, c, y, x) : ld(g, off(gl, gd, b, c, y, x));
    }
    dp[i] = cvt<T>(v);
  }
};

__global__ void finalize_bn_kernel(const double* p1, const double* p2, int64_t n, int64_t cpb, int64_t c,
                                   const float* gamma, int64_t gamma_stride, bool training, double count,
                                   float* dgamma, float* dbeta, int64_t stride, double* k1, double* k2) {
  const int64_t ch = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ch >= c) return;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t b = 0; b < n; ++b) {
    double t1 = 0.0, t2 = 0.0;
    for (int64_t k = 0; k < cpb; ++k) {
      t1 += p1[(b * cpb + k) * c + ch];
      t2 += p2[(b * cpb + k) * c + ch];
    }
    dbeta[b * stride + ch] = static_cast<float>(t1);
    dgamma[b * stride + ch] = static_cast<float>(t2);
    const double g = static_cast<double>(gamma[b * gamma_stride + ch]);
    s1 += g * t1;
    s2 += g * t2;
  }
  k1[ch] = training ? s1 / count : 0.0;
  k2[ch] = training ? s2 / count : 0.0;
}

__global__ void scale_shift_kernel(const float* gamma, const float* beta, int64_t stride, int64_t n,
                                   int64_t c, const double* mean, const double* var, double eps,
                                   double* rstd, float* scale, float* shift) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * c) return;
  const int64_t b = i / c, k = i % c;
  const double r = rsqrt(var[k] + eps);
  if (b == 0) rstd[k] = r;
  const double s = static_cast<double>(gamma[b * stride + k]) * r;
  scale[i] = static_cast<float>(s);
  shift[i] = static_cast<float>(static_cast<double>(beta[b * stride + k]) - mean[k] * s);
}

// Phase weights of one (o, ci) pair per thread (row groups in ../cpu/genblock.h).
__device__ __forceinline__ int64_t wp_off(bool cl, int64_t row, int64_t ci, int64_t rs, int64_t cin) {
  return cl ? (row * 4 + rs) * cin + ci : (row * cin + ci) * 4 + rs;
}

template <typename T>
__global__ void phase_weights_kernel(const T* w, int64_t cout, int64_t cin, T* wp, bool cl) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= cout * cin) return;
  const int64_t o = i / cin, ci = i % cin;
  float k[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) k[t] = ld(w, i * 9 + t);
  float rows[2][2][3];
#pragma unroll
  for (int kx = 0; kx < 3; ++kx) {
    rows[0][0][kx] = k[kx];
    rows[0][1][kx] = k[3 + kx] + k[6 + kx];
    rows[1][0][kx] = k[kx] + k[3 + kx];
    rows[1][1][kx] = k[6 + kx];
  }
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* v = rows[p][r];
      const float out[2][2] = {{v[0], v[1] + v[2]}, {v[0] + v[1], v[2]}};  // [q][s]
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int s = 0; s < 2; ++s) wp[wp_off(cl, (2 * p + q) * cout + o, ci, r * 2 + s, cin)] = cvt<T>(out[q][s]);
      }
    }
  }
}

template <typename T>
__global__ void phase_weights_backward_kernel(const T* dwp, int64_t cout, int64_t cin, T* dw, bool cl) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= cout * cin) return;
  const int64_t o = i / cin, ci = i % cin;
  float d[4][4];
#pragma unroll
  for (int ph = 0; ph < 4; ++ph) {
#pragma unroll
    for (int rs = 0; rs < 4; ++rs) d[ph][rs] = ld(dwp, wp_off(cl, ph * cout + o, ci, rs, cin));
  }
  float cols[2][2][3];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* a = d[2 * p + 0] + r * 2;
      const float* b = d[2 * p + 1] + r * 2;
      cols[p][r][0] = a[0] + b[0];
      cols[p][r][1] = a[1] + b[0];
      cols[p][r][2] = a[1] + b[1];
    }
  }
#pragma unroll
  for (int kx = 0; kx < 3; ++kx) {
    dw[i * 9 + kx] = cvt<T>(cols[0][0][kx] + cols[1][0][kx]);
    dw[i * 9 + 3 + kx] = cvt<T>(cols[0][1][kx] + cols[1][0][kx]);
    dw[i * 9 + 6 + kx] = cvt<T>(cols[0][1][kx] + cols[1][1][kx]);
  }
}

// ---------------------------------------------------------------------------------------------
// typed implementations

template <typename T>
cudaError_t stats_impl(const View& x, double* mean, double* var, void* ws, cudaStream_t s) {
  const Dims& d = x.dims;
  if (d.c == 0) return cudaGetLastError();
  const Work w = carve(ws, d, x.layout);
  const T* xp = static_cast<const T*>(x.data);
  first_values_kernel<<<static_cast<unsigned>((d.c + 255) / 256), 256, 0, s>>>(xp, d, x.layout, w.shift);
  cudaError_t e = launch_reduce(StatsOp<T>{xp, d, x.layout, w.shift}, d, x.layout, w, s);
  if (e != cudaSuccess) return e;
  return launch_finalize(w, d, 1, static_cast<double>(d.n * d.h * d.w), mean, var, nullptr, s);
}

template <typename T>
cudaError_t channel_sums(const View& g, double* sums, int64_t groups, void* ws, cudaStream_t s) {
  const Dims& d = g.dims;
  const Work w = carve(ws, d, g.layout);
  cudaError_t e = launch_reduce(SumOp<T>{static_cast<const T*>(g.data), d, g.layout}, d, g.layout, w, s);
  if (e != cudaSuccess) return e;
  return launch_finalize(w, d, groups, 1.0, nullptr, nullptr, sums, s);
}

template <typename T>
cudaError_t affine_impl(const View& x, const float* scale, const float* shift, const MutView& out,
                        const MutView& copy, cudaStream_t s) {
  const T* xp = static_cast<const T*>(x.data);
  cudaError_t e = launch_each(AffineOp<T>{xp, x.dims, x.layout, scale, shift, static_cast<T*>(out.data), out.layout},
                              numel(x.dims), s);
  if (e != cudaSuccess || copy.data == nullptr) return e;
  return launch_each(CopyOp<T>{xp, x.layout, static_cast<T*>(copy.data), x.dims, copy.layout}, numel(x.dims), s);
}

template <typename T>
cudaError_t epilogue_impl(const void* p, const View* conv, const Epilogue& ep, const MutView& out,
                          double* mean, double* var, void* ws, cudaStream_t s) {
  EpilogueOp<T> op{};
  op.phase = p != nullptr;
  op.src = static_cast<const T*>(p != nullptr ? p : conv->data);
  if (conv != nullptr) {
    op.sd = conv->dims;
    op.sl = conv->layout;
  }
  op.bias = static_cast<const T*>(ep.bias);
  op.res = static_cast<const T*>(ep.residual.data);
  op.rd = ep.residual.dims;
  op.rl = ep.residual.layout;
  op.half = ep.residual_half;
  op.out = static_cast<T*>(out.data);
  op.od = out.dims;
  op.ol = out.layout;
  op.shift = nullptr;
  if (mean == nullptr) return launch_each(op, numel(out.dims), s);
  if (out.layout != Layout::kPixels) return cudaErrorInvalidValue;
  const Dims& d = out.dims;
  const Work w = carve(ws, d, out.layout);
  epilogue_first_kernel<<<static_cast<unsigned>((d.c + 255) / 256), 256, 0, s>>>(op, w.shift);
  op.shift = w.shift;
  cudaError_t e = launch_reduce(op, d, out.layout, w, s);
  if (e != cudaSuccess) return e;
  return launch_finalize(w, d, 1, static_cast<double>(d.n * d.h * d.w), mean, var, nullptr, s);
}

template <typename T>
cudaError_t prep_impl(const View& g, const MutView& copy, const MutView& half, double* dbias, void* ws,
                      cudaStream_t s) {
  const T* gp = static_cast<const T*>(g.data);
  cudaError_t e = cudaSuccess;
  if (copy.data != nullptr) {
    e = launch_each(CopyOp<T>{gp, g.layout, static_cast<T*>(copy.data), g.dims, copy.layout}, numel(g.dims), s);
    if (e != cudaSuccess) return e;
  }
  if (half.data != nullptr) {
    e = launch_each(HalfOp<T>{gp, g.dims, g.layout, static_cast<T*>(half.data), half.dims, half.layout},
                    numel(half.dims), s);
    if (e != cudaSuccess) return e;
  }
  if (dbias != nullptr) e = channel_sums<T>(g, dbias, 1, ws, s);
  return e;
}

template <typename T>
BnAt<T> bn_at(const BnReluBackward& a, const double* k1, const double* k2) {
  return BnAt<T>{static_cast<const T*>(a.x.data), a.x.dims, a.x.layout, static_cast<const T*>(a.act.data),
                 a.act.layout, static_cast<const T*>(a.dact.data), a.dact.layout, a.gamma, a.gamma_stride,
                 a.scale, a.mean, a.rstd, a.training, k1, k2};
}

template <typename T>
cudaError_t scatter_impl(const View& g, void* dp, double* dbias, void* ws, cudaStream_t s) {
  const Dims& d = g.dims;
  const Dims pd{d.n, 4 * d.c, d.h / 2 + 1, d.w / 2 + 1};
  ScatterOp<T, false> op{};
  op.g = static_cast<const T*>(g.data);
  op.gd = d;
  op.gl = g.layout;
  op.dp = static_cast<T*>(dp);
  cudaError_t e = launch_each(op, numel(pd), s);
  if (e != cudaSuccess || dbias == nullptr) return e;
  return channel_sums<T>(g, dbias, 1, ws, s);
}

template <typename T>
cudaError_t bn_reduce_impl(const BnReluBackward& a, float* dgamma, float* dbeta, int64_t stride, double* k1,
                           double* k2, void* ws, cudaStream_t s) {
  const Dims& d = a.x.dims;
  if (d.c == 0) return cudaGetLastError();
  // pixel-major iteration reads act/dact (always channels_last here) coalesced
  const Work w = carve(ws, d, Layout::kPixels);
  cudaError_t e = launch_reduce(BnReduceOp<T>{bn_at<T>(a, nullptr, nullptr)}, d, Layout::kPixels, w, s);
  if (e != cudaSuccess) return e;
  finalize_bn_kernel<<<static_cast<unsigned>((d.c + 255) / 256), 256, 0, s>>>(
      w.p1, w.p2, d.n, w.chunks_per_b, d.c, a.gamma, a.gamma_stride, a.training,
      static_cast<double>(d.n * d.h * d.w), dgamma, dbeta, stride, k1, k2);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_apply_impl(const BnReluBackward& a, const double* k1, const double* k2, const View& add,
                          const MutView& dx, cudaStream_t s) {
  BnApplyOp<T> op{bn_at<T>(a, k1, k2), static_cast<const T*>(add.data), add.layout, static_cast<T*>(dx.data),
                  dx.layout};
  return launch_each(op, numel(a.x.dims), s);
}

template <typename T>
cudaError_t bn_apply_phase_impl(const BnReluBackward& a, const double* k1, const double* k2, void* dp,
                                double* dbias, void* ws, cudaStream_t s) {
  const Dims& d = a.x.dims;
  const Dims pd{d.n, 4 * d.c, d.h / 2 + 1, d.w / 2 + 1};
  ScatterOp<T, true> op{};
  op.gd = d;
  op.at = bn_at<T>(a, k1, k2);
  op.dp = static_cast<T*>(dp);
  cudaError_t e = launch_each(op, numel(pd), s);
  if (e != cudaSuccess || dbias == nullptr) return e;
  // unused phase positions hold zeros: the sums over dp's 4 phase groups are the sums of dx
  return channel_sums<T>(View{dp, pd, Layout::kPixels}, dbias, 4, ws, s);
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t workspace_bytes(const Dims& d) {
  const int64_t chunks = (d.h * d.w + kChunk - 1) / kChunk;
  const int64_t rows = d.n * (chunks > 1 ? chunks : 1);
  return align256(static_cast<size_t>(d.c) * sizeof(float)) + 2 * static_cast<size_t>(rows * d.c) * sizeof(double);
}

cudaError_t channel_stats(DType dtype, const View& x, double* mean, double* var, void* workspace,
                          cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) { return stats_impl<decltype(z)>(x, mean, var, workspace, stream); });
}

cudaError_t scale_shift(const float* gamma, const float* beta, int64_t stride, int64_t n, int64_t c,
                        const double* mean, const double* var, double eps, double* rstd, float* scale,
                        float* shift, cudaStream_t stream) {
  if (n * c == 0) return cudaGetLastError();
  scale_shift_kernel<<<static_cast<unsigned>((n * c + 255) / 256), 256, 0, stream>>>(
      gamma, beta, stride, n, c, mean, var, eps, rstd, scale, shift);
  return cudaGetLastError();
}

cudaError_t affine_relu(DType dtype, const View& x, const float* scale, const float* shift,
                        const MutView& out, const MutView& copy, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) { return affine_impl<decltype(z)>(x, scale, shift, out, copy, stream); });
}

cudaError_t phase_weights(DType dtype, const void* w, int64_t cout, int64_t cin, void* wp,
                          bool channels_last, cudaStream_t stream) {
  if (cout * cin == 0) return cudaGetLastError();
  return dispatch(dtype, [&](auto z) {
    using T = decltype(z);
    phase_weights_kernel<<<static_cast<unsigned>((cout * cin + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(w), cout, cin, static_cast<T*>(wp), channels_last);
    return cudaGetLastError();
  });
}

cudaError_t phase_weights_backward(DType dtype, const void* dwp, int64_t cout, int64_t cin, void* dw,
                                   bool channels_last, cudaStream_t stream) {
  if (cout * cin == 0) return cudaGetLastError();
  return dispatch(dtype, [&](auto z) {
    using T = decltype(z);
    phase_weights_backward_kernel<<<static_cast<unsigned>((cout * cin + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(dwp), cout, cin, static_cast<T*>(dw), channels_last);
    return cudaGetLastError();
  });
}

cudaError_t phase_epilogue(DType dtype, const void* p, const Epilogue& ep, const MutView& out, double* mean,
                           double* var, void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) {
    return epilogue_impl<decltype(z)>(p, nullptr, ep, out, mean, var, workspace, stream);
  });
}

cudaError_t conv_epilogue(DType dtype, const View& conv, const Epilogue& ep, const MutView& out, double* mean,
                          double* var, void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) {
    return epilogue_impl<decltype(z)>(nullptr, &conv, ep, out, mean, var, workspace, stream);
  });
}

cudaError_t grad_output_prep(DType dtype, const View& g, const MutView& copy, const MutView& half, double* dbias,
                             void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) { return prep_impl<decltype(z)>(g, copy, half, dbias, workspace, stream); });
}

cudaError_t phase_grad_scatter(DType dtype, const View& g, void* dp, double* dbias, void* workspace,
                               cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) { return scatter_impl<decltype(z)>(g, dp, dbias, workspace, stream); });
}

cudaError_t bn_relu_backward_reduce(DType dtype, const BnReluBackward& a, float* dgamma, float* dbeta,
                                    int64_t stride, double* k1, double* k2, void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) {
    return bn_reduce_impl<decltype(z)>(a, dgamma, dbeta, stride, k1, k2, workspace, stream);
  });
}

cudaError_t bn_relu_backward_apply(DType dtype, const BnReluBackward& a, const double* k1, const double* k2,
                                   const View& add, const MutView& dx, cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) { return bn_apply_impl<decltype(z)>(a, k1, k2, add, dx, stream); });
}

cudaError_t bn_relu_backward_apply_phase(DType dtype, const BnReluBackward& a, const double* k1,
                                         const double* k2, void* dp, double* dbias, void* workspace,
                                         cudaStream_t stream) {
  return dispatch(dtype, [&](auto z) {
    return bn_apply_phase_impl<decltype(z)>(a, k1, k2, dp, dbias, workspace, stream);
  });
}

}  // namespace genblock
}  // namespace cuda
}  // namespace mgm_fast
