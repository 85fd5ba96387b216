// Fused NT-Xent on CUDA (contracts, formulas and work split in ntxent.cuh).
#include "ntxent.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mgm_fast {
namespace cuda {
namespace {

constexpr int kWarps = 8;                // rows (or columns) per block, one per warp
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;                // columns (or rows) per shared-memory tile
constexpr int kPerLane = static_cast<int>(kNtxentMaxDim) / 32;  // dims owned by one lane
constexpr float kEps = 1e-12f;           // torch.nn.functional.normalize's eps

template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ int64_t positive_of(int64_t index, int64_t n2) {
  const int64_t half = n2 / 2;
  return index < half ? index + half : index - half;
}

// Odd pitch of a shared-memory tile row: lanes reading 32 different rows at one d hit 32
// different banks.
__host__ __device__ __forceinline__ int tile_pitch(int dim) { return dim | 1; }

// inv[i] = 1 / max(||x_i||, eps), one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
inv_norm_kernel(const T* __restrict__ x, int64_t stride, int64_t n, int64_t dim,
                float* __restrict__ inv) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // the whole warp leaves together; no block-wide barrier follows
  float sq = 0.0f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = load_float(x + row * stride + d);
    sq += v * v;
  }
  sq = warp_sum(sq);
  if (lane == 0) inv[row] = 1.0f / fmaxf(sqrtf(sq), kEps);
}

// Stages vectors [first, first + kTile) of x (count n) normalised into tile[k * pitch + d].
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ x, int64_t stride, int64_t n,
                                          const float* __restrict__ inv, int64_t first, int dim,
                                          float* tile) {
  const int pitch = tile_pitch(dim);
  for (int e = threadIdx.x; e < kTile * dim; e += kThreads) {
    const int k = e / dim, d = e - k * dim;
    const int64_t v = first + k;
    tile[k * pitch + d] = v < n ? load_float(x + v * stride + d) * inv[v] : 0.0f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_kernel(NtxentArgs a, const float* __restrict__ inv_r, const float* __restrict__ inv_c,
               float* __restrict__ row_loss, float* __restrict__ lse_out) {
  extern __shared__ __align__(16) float smem[];
  const int dim = static_cast<int>(a.dim), pitch = tile_pitch(dim);
  float* tile = smem;                         // [kTile][pitch] normalised columns
  float* row_sh = smem + kTile * pitch;       // [kWarps][dim] normalised rows
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  const bool active = i < a.num_rows;
  const T* rows = static_cast<const T*>(a.rows);
  const T* cols = static_cast<const T*>(a.cols);
  const int64_t n2 = a.num_cols;
  float* my_row = row_sh + warp * dim;
  int64_t self = 0;
  if (active) {
    const float f = inv_r[i];
    for (int d = lane; d < dim; d += 32) my_row[d] = load_float(rows + i * a.rows_stride + d) * f;
    self = a.row_index[i];
  }
  const int64_t pos = positive_of(self, n2);
  const float inv_t = 1.0f / a.temperature;
  // lane-local online logsumexp over the columns lane, lane + 32, ...
  float m = -INFINITY, s = 0.0f, s_pos = 0.0f;
  for (int64_t j0 = 0; j0 < n2; j0 += kTile) {
    __syncthreads();  // the previous tile has been read
    load_tile(cols, a.cols_stride, n2, inv_c, j0, dim, tile);
    __syncthreads();
    const int64_t j = j0 + lane;
    if (active && j < n2) {
      const float* t = tile + lane * pitch;
      float dot = 0.0f;
      for (int d = 0; d < dim; ++d) dot += my_row[d] * t[d];
      const float v = dot * inv_t;
      if (j == pos) s_pos = v;
      if (j != self) {
        if (v > m) {
          s = s * __expf(m - v) + 1.0f;  // m = -inf at first: exp -> 0
          m = v;
        } else {
          s += __expf(v - m);
        }
      }
    }
  }
  const float m_all = warp_max(m);
  const float rescaled = m == -INFINITY ? 0.0f : s * __expf(m - m_all);
  const float s_all = warp_sum(rescaled);
  const float pos_all = warp_sum(s_pos);
  if (active && lane == 0) {
    const float l = m_all + __logf(s_all);
    lse_out[i] = l;
    row_loss[i] = (self >= 0 && self < n2) ? l - pos_all : quiet_nan();
  }
}

// out[0] = sum of v[0, n) in double, one block, fixed order.
__global__ void __launch_bounds__(kThreads)
sum_kernel(const float* __restrict__ v, int64_t n, float* __restrict__ out) {
  __shared__ double buf[kThreads];
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) acc += v[k];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(buf[0]);
}

// The owner side of the gradient: acc[m] (dims lane + 32 m) = sum over the tile's 32 vectors k
// of ds[k] * tile[k][d].
__device__ __forceinline__ void accumulate(const float* ds, const float* tile, int dim, int lane,
                                           float (&acc)[kPerLane]) {
  const int pitch = tile_pitch(dim);
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const int d = lane + 32 * m;
    if (d < dim) {
      float sum = 0.0f;
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) sum += ds[k] * tile[k * pitch + d];
      acc[m] += sum;
    }
  }
}

// grad = (g - u (u . g)) * inv with g = acc / tau; NaN when the row's index was bad.
template <typename T>
__device__ __forceinline__ void finish(float (&acc)[kPerLane], const float* u, float inv,
                                       float inv_t, bool ok, int dim, int lane, T* grad) {
  float proj = 0.0f;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const int d = lane + 32 * m;
    acc[m] *= inv_t;
    if (d < dim) proj += u[d] * acc[m];
  }
  proj = warp_sum(proj);
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const int d = lane + 32 * m;
    if (d < dim) grad[d] = from_float<T>(ok ? (acc[m] - u[d] * proj) * inv : quiet_nan());
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_rows_kernel(NtxentArgs a, const float* __restrict__ inv_r,
                     const float* __restrict__ inv_c, const float* __restrict__ lse,
                     const float* __restrict__ grad_output, T* __restrict__ grad) {
  extern __shared__ __align__(16) float smem[];
  const int dim = static_cast<int>(a.dim), pitch = tile_pitch(dim);
  float* tile = smem;                        // [kTile][pitch]
  float* row_sh = tile + kTile * pitch;      // [kWarps][dim]
  float* ds_sh = row_sh + kWarps * dim;      // [kWarps][kTile]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  const bool active = i < a.num_rows;
  const T* rows = static_cast<const T*>(a.rows);
  const T* cols = static_cast<const T*>(a.cols);
  const int64_t n2 = a.num_cols;
  float* my_row = row_sh + warp * dim;
  float* my_ds = ds_sh + warp * kTile;
  int64_t self = 0;
  float l = 0.0f;
  if (active) {
    const float f = inv_r[i];
    for (int d = lane; d < dim; d += 32) my_row[d] = load_float(rows + i * a.rows_stride + d) * f;
    self = a.row_index[i];
    l = lse[i];
  }
  const int64_t pos = positive_of(self, n2);
  const float inv_t = 1.0f / a.temperature, g = grad_output[0];
  float acc[kPerLane];
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) acc[m] = 0.0f;
  for (int64_t j0 = 0; j0 < n2; j0 += kTile) {
    __syncthreads();  // the previous tile and ds values have been read
    load_tile(cols, a.cols_stride, n2, inv_c, j0, dim, tile);
    __syncthreads();
    const int64_t j = j0 + lane;
    float ds = 0.0f;
    if (active && j < n2 && j != self) {
      const float* t = tile + lane * pitch;
      float dot = 0.0f;
      for (int d = 0; d < dim; ++d) dot += my_row[d] * t[d];
      ds = g * (__expf(dot * inv_t - l) - (j == pos ? 1.0f : 0.0f));
    }
    my_ds[lane] = ds;
    __syncwarp();
    if (active) accumulate(my_ds, tile, dim, lane, acc);
  }
  if (active) {
    finish(acc, my_row, inv_r[i], inv_t, self >= 0 && self < n2, dim, lane, grad + i * a.dim);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_cols_kernel(NtxentArgs a, const float* __restrict__ inv_r,
                     const float* __restrict__ inv_c, const float* __restrict__ lse,
                     const float* __restrict__ grad_output, T* __restrict__ grad) {
  extern __shared__ __align__(16) float smem[];
  const int dim = static_cast<int>(a.dim), pitch = tile_pitch(dim);
  float* tile = smem;                        // [kTile][pitch] normalised rows
  float* col_sh = tile + kTile * pitch;      // [kWarps][dim] normalised columns
  float* ds_sh = col_sh + kWarps * dim;      // [kWarps][kTile]
  float* lse_sh = ds_sh + kWarps * kTile;    // [kTile]
  const int used = kTile * pitch + kWarps * dim + kWarps * kTile + kTile;
  int64_t* self_sh = reinterpret_cast<int64_t*>(smem + ((used + 1) & ~1));  // [kTile], 8-aligned
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  const int64_t n2 = a.num_cols, num_rows = a.num_rows;
  const bool active = j < n2;
  const T* rows = static_cast<const T*>(a.rows);
  const T* cols = static_cast<const T*>(a.cols);
  float* my_col = col_sh + warp * dim;
  float* my_ds = ds_sh + warp * kTile;
  if (active) {
    const float f = inv_c[j];
    for (int d = lane; d < dim; d += 32) my_col[d] = load_float(cols + j * a.cols_stride + d) * f;
  }
  const float inv_t = 1.0f / a.temperature, g = grad_output[0];
  bool ok = true;  // every row index seen so far lies in [0, 2N)
  float acc[kPerLane];
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) acc[m] = 0.0f;
  for (int64_t i0 = 0; i0 < num_rows; i0 += kTile) {
    __syncthreads();
    load_tile(rows, a.rows_stride, num_rows, inv_r, i0, dim, tile);
    if (threadIdx.x < kTile) {
      const int64_t i = i0 + threadIdx.x;
      lse_sh[threadIdx.x] = i < num_rows ? lse[i] : 0.0f;
      self_sh[threadIdx.x] = i < num_rows ? a.row_index[i] : 0;
    }
    __syncthreads();
    const int64_t i = i0 + lane;
    float ds = 0.0f;
    if (active && i < num_rows) {
      const int64_t self = self_sh[lane];
      ok = ok && self >= 0 && self < n2;
      if (j != self) {
        const float* t = tile + lane * pitch;
        float dot = 0.0f;
        for (int d = 0; d < dim; ++d) dot += my_col[d] * t[d];
        ds = g * (__expf(dot * inv_t - lse_sh[lane]) - (j == positive_of(self, n2) ? 1.0f : 0.0f));
      }
    }
    my_ds[lane] = ds;
    __syncwarp();
    if (active) accumulate(my_ds, tile, dim, lane, acc);
  }
  if (active) {
    const bool all_ok = __all_sync(0xffffffffu, ok);
    finish(acc, my_col, inv_c[j], inv_t, all_ok, dim, lane, grad + j * a.dim);
  }
}

// Shared memory of the kernels (bytes) for a given D; the layouts are those of the kernels.
size_t tile_bytes(int dim, bool cols_kernel) {
  size_t floats = static_cast<size_t>(kTile) * tile_pitch(dim) + static_cast<size_t>(kWarps) * dim +
                  static_cast<size_t>(kWarps) * kTile;
  if (!cols_kernel) return floats * sizeof(float);
  floats += kTile;                        // lse_sh
  floats = (floats + 1) & ~size_t{1};     // 8-byte alignment of self_sh
  return floats * sizeof(float) + kTile * sizeof(int64_t);
}

bool valid_args(const NtxentArgs& a) {
  return a.dim >= 1 && a.dim <= kNtxentMaxDim && a.num_rows >= 0 && a.num_cols >= 2 &&
         a.num_cols % 2 == 0 && a.temperature > 0.0f && a.rows != nullptr && a.cols != nullptr &&
         (a.num_rows == 0 || a.row_index != nullptr);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kWarps - 1) / kWarps); }

template <typename T>
cudaError_t norms(const NtxentArgs& a, float* inv_r, float* inv_c, cudaStream_t stream) {
  if (a.num_rows > 0) {
    inv_norm_kernel<T><<<blocks_for(a.num_rows), kThreads, 0, stream>>>(
        static_cast<const T*>(a.rows), a.rows_stride, a.num_rows, a.dim, inv_r);
  }
  inv_norm_kernel<T><<<blocks_for(a.num_cols), kThreads, 0, stream>>>(
      static_cast<const T*>(a.cols), a.cols_stride, a.num_cols, a.dim, inv_c);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_impl(const NtxentArgs& a, float* loss, float* lse, float* ws,
                         cudaStream_t stream) {
  float* inv_r = ws;
  float* inv_c = ws + a.num_rows;
  float* row_loss = inv_c + a.num_cols;
  cudaError_t err = norms<T>(a, inv_r, inv_c, stream);
  if (err != cudaSuccess) return err;
  if (a.num_rows > 0) {
    const int dim = static_cast<int>(a.dim);
    forward_kernel<T><<<blocks_for(a.num_rows), kThreads, tile_bytes(dim, false), stream>>>(
        a, inv_r, inv_c, row_loss, lse);
  }
  sum_kernel<<<1, kThreads, 0, stream>>>(row_loss, a.num_rows, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const NtxentArgs& a, const float* lse, const float* grad_output,
                          T* grad_rows, T* grad_cols, float* ws, cudaStream_t stream) {
  float* inv_r = ws;
  float* inv_c = ws + a.num_rows;
  cudaError_t err = norms<T>(a, inv_r, inv_c, stream);
  if (err != cudaSuccess) return err;
  const int dim = static_cast<int>(a.dim);
  if (grad_rows != nullptr && a.num_rows > 0) {
    backward_rows_kernel<T><<<blocks_for(a.num_rows), kThreads, tile_bytes(dim, false), stream>>>(
        a, inv_r, inv_c, lse, grad_output, grad_rows);
  }
  if (grad_cols != nullptr) {
    if (a.num_rows == 0) {
      err = cudaMemsetAsync(grad_cols, 0, static_cast<size_t>(a.num_cols * a.dim) * sizeof(T), stream);
      if (err != cudaSuccess) return err;
    } else {
      backward_cols_kernel<T><<<blocks_for(a.num_cols), kThreads, tile_bytes(dim, true), stream>>>(
          a, inv_r, inv_c, lse, grad_output, grad_cols);
    }
  }
  return cudaGetLastError();
}

}  // namespace

size_t ntxent_workspace_bytes(int64_t num_rows, int64_t num_cols) {
  return static_cast<size_t>(2 * num_rows + num_cols + 1) * sizeof(float);
}

cudaError_t ntxent_forward(const NtxentArgs& args, float* loss, float* lse, void* workspace,
                           cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  switch (args.dtype) {
    case NtxentDType::kFloat16: return forward_impl<__half>(args, loss, lse, ws, stream);
    case NtxentDType::kBFloat16: return forward_impl<__nv_bfloat16>(args, loss, lse, ws, stream);
    default: return forward_impl<float>(args, loss, lse, ws, stream);
  }
}

cudaError_t ntxent_backward(const NtxentArgs& args, const float* lse, const float* grad_output,
                            void* grad_rows, void* grad_cols, void* workspace,
                            cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  switch (args.dtype) {
    case NtxentDType::kFloat16:
      return backward_impl<__half>(args, lse, grad_output, static_cast<__half*>(grad_rows),
                                   static_cast<__half*>(grad_cols), ws, stream);
    case NtxentDType::kBFloat16:
      return backward_impl<__nv_bfloat16>(args, lse, grad_output,
                                          static_cast<__nv_bfloat16*>(grad_rows),
                                          static_cast<__nv_bfloat16*>(grad_cols), ws, stream);
    default:
      return backward_impl<float>(args, lse, grad_output, static_cast<float*>(grad_rows),
                                  static_cast<float*>(grad_cols), ws, stream);
  }
}

}  // namespace cuda
}  // namespace mgm_fast
