// Fused MGM dense losses on CUDA (contracts and formulas in multitask_loss.cuh).
//
// One thread per pixel (grid-stride). For segmentation the class axis is small (13-40) and
// strided by H*W in NCHW, so consecutive threads read consecutive pixels of the same class:
// every class load of a warp is one coalesced 128-byte line. For channels_last the thread's
// classes are contiguous instead; each line is then used over the class loop through L1.
// The per-pixel class loop runs three times (max, sum of exponentials, gradient): passes two
// and three hit the block's ~40 KB of logits in L1, so DRAM sees one read of the logits and
// one write of the gradient buffer. Two separate max / sum passes (instead of an online
// softmax) keep exp(-inf - max) = 0 exact when some logits are -inf.
#include "multitask_loss.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mgm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;    // threads per block of the loss kernels
constexpr int kMaxBlocks = 1024; // grid cap: the partial-sum workspace size
constexpr int kFinalThreads = 256;

// Workspace layout: 6 arrays of kMaxBlocks doubles.
enum Slot : int { kSegLoss = 0, kSegCount, kDepthLoss, kDepthCount, kNormalLoss, kNormalCount };

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Float32 -> storage type. Explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
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

// Load of a tensor whose dtype is only known at run time (targets and masks); the switch is
// uniform across the grid.
__device__ __forceinline__ float load_any(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
  }
}

// Fixed grid for n work items: depends on the shape only, so reductions are reproducible.
inline int grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the warp sums).
// Every thread must call it; thread 0 gets the result.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
seg_ce_kernel(SegArgs a, double* __restrict__ part_loss, double* __restrict__ part_count,
              unsigned long long* __restrict__ bad_pixel) {
  const int64_t hw = a.height * a.width;
  const int64_t pixels = a.batch * hw;
  const T* __restrict__ logits = static_cast<const T*>(a.logits);
  const int64_t sc = a.logits_strides.c, gc = a.grad_strides.c;
  const int C = static_cast<int>(a.classes);
  float loss = 0.0f, count = 0.0f;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pixels;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / hw, rem = p - b * hw;
    const int64_t h = rem / a.width, w = rem - h * a.width;
    const T* x = logits + b * a.logits_strides.n + h * a.logits_strides.h + w * a.logits_strides.w;
    const int64_t label =
        a.target[b * a.target_strides.n + h * a.target_strides.h + w * a.target_strides.w];
    const bool ignored = a.has_ignore && label == a.ignore_index;
    const bool bad = !ignored && (label < 0 || label >= a.classes);
    float* g = a.grad == nullptr
                   ? nullptr
                   : a.grad + b * a.grad_strides.n + h * a.grad_strides.h + w * a.grad_strides.w;
    if (ignored) {
      if (g != nullptr) {
        for (int c = 0; c < C; ++c) g[c * gc] = 0.0f;
      }
      continue;
    }
    if (bad) {
      atomicMin(bad_pixel, static_cast<unsigned long long>(p));
      loss += __int_as_float(0x7fc00000);  // NaN: the loss is never silently wrong
      if (g != nullptr) {
        for (int c = 0; c < C; ++c) g[c * gc] = __int_as_float(0x7fc00000);
      }
      continue;
    }
    float m = -INFINITY;
#pragma unroll 4
    for (int c = 0; c < C; ++c) m = fmaxf(m, to_float(x[c * sc]));
    float s = 0.0f;
#pragma unroll 4
    for (int c = 0; c < C; ++c) s += __expf(to_float(x[c * sc]) - m);
    const float xt = to_float(x[label * sc]);
    loss += (m - xt) + __logf(s);  // (m - x_t) exact near the max; log s >= 0
    count += 1.0f;
    if (g != nullptr) {
      const float inv_s = 1.0f / s;
#pragma unroll 4
      for (int c = 0; c < C; ++c) g[c * gc] = __expf(to_float(x[c * sc]) - m) * inv_s;
      g[label * gc] -= 1.0f;
    }
  }
  const double block_loss = block_sum(static_cast<double>(loss));
  const double block_count = block_sum(static_cast<double>(count));
  if (threadIdx.x == 0) {
    part_loss[blockIdx.x] = block_loss;
    part_count[blockIdx.x] = block_count;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
masked_l1_kernel(L1Args a, double* __restrict__ part_loss, double* __restrict__ part_count) {
  const int64_t hw = a.height * a.width;
  const int64_t pixels = a.batch * hw;
  const T* __restrict__ pred = static_cast<const T*>(a.pred);
  float loss = 0.0f, count = 0.0f;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pixels;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / hw, rem = p - b * hw;
    const int64_t h = rem / a.width, w = rem - h * a.width;
    for (int64_t c = 0; c < a.channels; ++c) {
      const float d =
          to_float(pred[b * a.pred_strides.n + c * a.pred_strides.c + h * a.pred_strides.h +
                        w * a.pred_strides.w]) -
          load_any(a.target, a.target_dtype,
                   b * a.target_strides.n + c * a.target_strides.c + h * a.target_strides.h +
                       w * a.target_strides.w);
      float wt = 1.0f;
      if (a.mask != nullptr) {
        const int64_t mc = a.mask_channels == 1 ? 0 : c;
        wt = load_any(a.mask, a.mask_dtype,
                      b * a.mask_strides.n + mc * a.mask_strides.c + h * a.mask_strides.h +
                          w * a.mask_strides.w);
      }
      loss += fabsf(d) * wt;
      count += wt;
      if (a.grad != nullptr) {
        const float sign = (d > 0.0f ? 1.0f : 0.0f) - (d < 0.0f ? 1.0f : 0.0f);  // sign(0) = 0
        a.grad[b * a.grad_strides.n + c * a.grad_strides.c + h * a.grad_strides.h +
               w * a.grad_strides.w] = sign * wt;
      }
    }
  }
  const double block_loss = block_sum(static_cast<double>(loss));
  const double block_count = block_sum(static_cast<double>(count));
  if (threadIdx.x == 0) {
    part_loss[blockIdx.x] = block_loss;
    part_count[blockIdx.x] = block_count;
  }
}

struct FinalArgs {
  int blocks[3];           // grid of the seg, depth and normal kernels
  double static_div[3];    // divisor when it does not depend on the data, else < 0
  const int64_t* target;   // to read back the offending label
  Strides3 target_strides;
  int64_t height, width;
};

__global__ void __launch_bounds__(kFinalThreads)
finalize_kernel(FinalArgs f, const double* __restrict__ ws, MultitaskLossOutputs out) {
  __shared__ double buf[kFinalThreads];
  for (int k = 0; k < 3; ++k) {
    double sums[2];
    for (int j = 0; j < 2; ++j) {
      const double* part = ws + (2 * k + j) * kMaxBlocks;
      double v = 0.0;
      for (int i = threadIdx.x; i < f.blocks[k]; i += kFinalThreads) v += part[i];
      buf[threadIdx.x] = v;
      __syncthreads();
      for (int stride = kFinalThreads / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
        __syncthreads();
      }
      sums[j] = buf[0];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      double divisor = f.static_div[k];
      if (divisor < 0.0) divisor = sums[1] < 1.0 ? 1.0 : sums[1];  // clamp_min(1); NaN stays
      out.losses[k][0] = static_cast<float>(sums[0] / divisor);
      out.inv_divisors[k] = static_cast<float>(1.0 / divisor);
    }
  }
  if (threadIdx.x == 0 && out.label_error[0] >= 0) {
    const int64_t p = out.label_error[0];
    const int64_t hw = f.height * f.width;
    const int64_t b = p / hw, h = (p - b * hw) / f.width, w = p - b * hw - h * f.width;
    out.label_error[1] =
        f.target[b * f.target_strides.n + h * f.target_strides.h + w * f.target_strides.w];
  }
}

template <typename OutT>
__global__ void scale_gradient_kernel(const float* __restrict__ buffer, OutT* __restrict__ out,
                                      int64_t n, const float* __restrict__ grad_output,
                                      const float* __restrict__ inv_divisor) {
  const float factor = grad_output[0] * inv_divisor[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_float<OutT>(buffer[i] * factor);
  }
}

template <typename T>
void launch_seg(const SegArgs& a, double* ws, unsigned long long* bad, cudaStream_t stream) {
  const int blocks = grid_for(a.batch * a.height * a.width);
  seg_ce_kernel<T><<<blocks, kThreads, 0, stream>>>(a, ws + kSegLoss * kMaxBlocks,
                                                    ws + kSegCount * kMaxBlocks, bad);
}

template <typename T>
void launch_l1(const L1Args& a, double* part_loss, double* part_count, cudaStream_t stream) {
  const int blocks = grid_for(a.batch * a.height * a.width);
  masked_l1_kernel<T><<<blocks, kThreads, 0, stream>>>(a, part_loss, part_count);
}

void dispatch_l1(const L1Args& a, double* ws, Slot loss_slot, Slot count_slot,
                 cudaStream_t stream) {
  double* pl = ws + loss_slot * kMaxBlocks;
  double* pc = ws + count_slot * kMaxBlocks;
  switch (a.pred_dtype) {
    case DType::kFloat16: launch_l1<__half>(a, pl, pc, stream); break;
    case DType::kBFloat16: launch_l1<__nv_bfloat16>(a, pl, pc, stream); break;
    default: launch_l1<float>(a, pl, pc, stream); break;
  }
}

bool is_float_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

}  // namespace

size_t multitask_loss_workspace_bytes() { return sizeof(double) * 6 * kMaxBlocks; }

cudaError_t multitask_loss_forward(const MultitaskLossArgs& args,
                                   const MultitaskLossOutputs& out, void* workspace,
                                   cudaStream_t stream) {
  if (!is_float_dtype(args.seg.logits_dtype) || !is_float_dtype(args.depth.pred_dtype) ||
      !is_float_dtype(args.normal.pred_dtype) || !is_float_dtype(args.depth.target_dtype) ||
      !is_float_dtype(args.normal.target_dtype) || args.seg.classes < 1) {
    return cudaErrorInvalidValue;
  }
  double* ws = static_cast<double*>(workspace);
  // 0xff bytes: label_error[0] = -1 (no error) and the unsigned atomicMin starts at its max.
  cudaError_t err = cudaMemsetAsync(out.label_error, 0xff, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  auto* bad = reinterpret_cast<unsigned long long*>(out.label_error);

  switch (args.seg.logits_dtype) {
    case DType::kFloat16: launch_seg<__half>(args.seg, ws, bad, stream); break;
    case DType::kBFloat16: launch_seg<__nv_bfloat16>(args.seg, ws, bad, stream); break;
    default: launch_seg<float>(args.seg, ws, bad, stream); break;
  }
  dispatch_l1(args.depth, ws, kDepthLoss, kDepthCount, stream);
  dispatch_l1(args.normal, ws, kNormalLoss, kNormalCount, stream);

  FinalArgs f{};
  const SegArgs& s = args.seg;
  f.blocks[0] = grid_for(s.batch * s.height * s.width);
  f.blocks[1] = grid_for(args.depth.batch * args.depth.height * args.depth.width);
  f.blocks[2] = grid_for(args.normal.batch * args.normal.height * args.normal.width);
  f.static_div[0] = s.has_ignore ? -1.0 : static_cast<double>(s.batch * s.height * s.width);
  const L1Args* l1[2] = {&args.depth, &args.normal};
  for (int k = 0; k < 2; ++k) {
    const L1Args& a = *l1[k];
    const double numel = static_cast<double>(a.batch * a.channels * a.height * a.width);
    if (args.reduction == Reduction::kAll) {
      f.static_div[k + 1] = numel;
    } else if (a.mask == nullptr) {
      f.static_div[k + 1] = numel < 1.0 ? 1.0 : numel;
    } else {
      f.static_div[k + 1] = -1.0;  // max(sum of the mask over the elements, 1)
    }
  }
  f.target = s.target;
  f.target_strides = s.target_strides;
  f.height = s.height;
  f.width = s.width;
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(f, ws, out);
  return cudaGetLastError();
}

cudaError_t scale_gradient(const float* buffer, void* out, DType out_dtype, int64_t n,
                           const float* grad_output, const float* inv_divisor,
                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  switch (out_dtype) {
    case DType::kFloat32:
      scale_gradient_kernel<float><<<blocks, kThreads, 0, stream>>>(
          buffer, static_cast<float*>(out), n, grad_output, inv_divisor);
      break;
    case DType::kFloat16:
      scale_gradient_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          buffer, static_cast<__half*>(out), n, grad_output, inv_divisor);
      break;
    case DType::kBFloat16:
      scale_gradient_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          buffer, static_cast<__nv_bfloat16*>(out), n, grad_output, inv_divisor);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mgm_fast
