// CUDA NT-Xent kernel (csrc/kernels/cuda/ntxent.*) against the CPU kernel (csrc/kernels/cpu,
// itself tested against naive double loops) on small random inputs: loss, LSE and both
// gradients, float32 / float16 / bfloat16 (inputs rounded first, so both sides see the same
// values), odd sizes, row subsets, strides. Exit code 77 -- reported by ctest as "skipped" --
// when no CUDA device or driver is usable, e.g. on build machines without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/ntxent.h"
#include "kernels/cuda/ntxent.cuh"
#include "tests/cuda_expect.cuh"

namespace {

using mgm_fast::cuda::NtxentDType;

size_t elem_size(NtxentDType dt) { return dt == NtxentDType::kFloat32 ? 4 : 2; }

// Rounds v to dt in place and returns the device copy in dt.
void* upload(std::vector<float>& v, NtxentDType dt) {
  void* ptr = nullptr;
  CUDA_OK(cudaMalloc(&ptr, v.size() * elem_size(dt) + 4));
  if (dt == NtxentDType::kFloat32) {
    CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  } else if (dt == NtxentDType::kFloat16) {
    std::vector<__half> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      h[i] = __float2half_rn(v[i]);
      v[i] = __half2float(h[i]);
    }
    CUDA_OK(cudaMemcpy(ptr, h.data(), v.size() * 2, cudaMemcpyHostToDevice));
  } else {
    std::vector<__nv_bfloat16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      h[i] = __float2bfloat16_rn(v[i]);
      v[i] = __bfloat162float(h[i]);
    }
    CUDA_OK(cudaMemcpy(ptr, h.data(), v.size() * 2, cudaMemcpyHostToDevice));
  }
  return ptr;
}

std::vector<float> download(const void* ptr, size_t n, NtxentDType dt) {
  std::vector<float> out(n);
  if (dt == NtxentDType::kFloat32) {
    CUDA_OK(cudaMemcpy(out.data(), ptr, n * 4, cudaMemcpyDeviceToHost));
  } else if (dt == NtxentDType::kFloat16) {
    std::vector<__half> h(n);
    CUDA_OK(cudaMemcpy(h.data(), ptr, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = __half2float(h[i]);
  } else {
    std::vector<__nv_bfloat16> h(n);
    CUDA_OK(cudaMemcpy(h.data(), ptr, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(h[i]);
  }
  return out;
}

void run_case(const char* name, int64_t R, int64_t N2, int64_t D, int64_t pad, float tau,
              NtxentDType dt, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t stride = D + pad;
  std::vector<float> cols(static_cast<size_t>(N2 * stride));
  for (float& v : cols) v = normal(rng);
  std::vector<int64_t> index(static_cast<size_t>(N2));
  std::iota(index.begin(), index.end(), 0);
  std::shuffle(index.begin(), index.end(), rng);
  index.resize(static_cast<size_t>(R));
  std::vector<float> rows(static_cast<size_t>(R * stride));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t d = 0; d < stride; ++d) rows[i * stride + d] = cols[index[i] * stride + d];

  void* d_rows = upload(rows, dt);
  void* d_cols = upload(cols, dt);
  int64_t* d_index = nullptr;
  float *d_loss = nullptr, *d_lse = nullptr, *d_go = nullptr;
  void *d_gr = nullptr, *d_gc = nullptr, *d_ws = nullptr;
  CUDA_OK(cudaMalloc(&d_index, R * sizeof(int64_t) + 8));
  CUDA_OK(cudaMemcpy(d_index, index.data(), R * sizeof(int64_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMalloc(&d_loss, sizeof(float)));
  CUDA_OK(cudaMalloc(&d_lse, R * sizeof(float) + 4));
  CUDA_OK(cudaMalloc(&d_go, sizeof(float)));
  CUDA_OK(cudaMalloc(&d_gr, R * D * elem_size(dt) + 4));
  CUDA_OK(cudaMalloc(&d_gc, N2 * D * elem_size(dt) + 4));
  CUDA_OK(cudaMalloc(&d_ws, mgm_fast::cuda::ntxent_workspace_bytes(R, N2)));
  const float go = 0.75f;
  CUDA_OK(cudaMemcpy(d_go, &go, sizeof(float), cudaMemcpyHostToDevice));

  mgm_fast::cuda::NtxentArgs a;
  a.rows = d_rows;
  a.rows_stride = stride;
  a.cols = d_cols;
  a.cols_stride = stride;
  a.dtype = dt;
  a.row_index = d_index;
  a.num_rows = R;
  a.num_cols = N2;
  a.dim = D;
  a.temperature = tau;
  CUDA_OK(mgm_fast::cuda::ntxent_forward(a, d_loss, d_lse, d_ws, nullptr));
  CUDA_OK(mgm_fast::cuda::ntxent_backward(a, d_lse, d_go, d_gr, d_gc, d_ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  mgm_fast::cpu::NtxentProblem p;
  p.rows = rows.data();
  p.rows_stride = stride;
  p.cols = cols.data();
  p.cols_stride = stride;
  p.row_index = index.data();
  p.num_rows = R;
  p.num_cols = N2;
  p.dim = D;
  p.temperature = tau;
  std::vector<float> lse(static_cast<size_t>(R)), gr(static_cast<size_t>(R * D)),
      gc(static_cast<size_t>(N2 * D));
  const double loss = mgm_fast::cpu::ntxent_forward(p, lse.data(), 0);
  mgm_fast::cpu::ntxent_backward(p, lse.data(), go, gr.data(), gc.data(), 0);

  float got_loss = 0.0f;
  CUDA_OK(cudaMemcpy(&got_loss, d_loss, sizeof(float), cudaMemcpyDeviceToHost));
  const std::vector<float> got_lse = download(d_lse, R, NtxentDType::kFloat32);
  const std::vector<float> got_gr = download(d_gr, R * D, dt);
  const std::vector<float> got_gc = download(d_gc, N2 * D, dt);
  // float32 on both sides from identical inputs; a 16-bit gradient adds one rounding
  const double grad_rtol = dt == NtxentDType::kFloat32 ? 1e-4 : (dt == NtxentDType::kFloat16 ? 2e-3 : 1.6e-2);
  EXPECT(std::fabs(got_loss - loss) <= 1e-4 * std::fabs(loss) + 1e-4, "%s: loss %.7g vs %.7g",
         name, got_loss, loss);
  double lse_err = 0.0;
  for (int64_t i = 0; i < R; ++i) lse_err = std::max(lse_err, double(std::fabs(got_lse[i] - lse[i])));
  EXPECT(lse_err <= 1e-4, "%s: lse off by %.3g", name, lse_err);
  auto check = [&](const std::vector<float>& got, const std::vector<float>& want, const char* what) {
    float scale = 0.0f;
    for (float v : want) scale = std::max(scale, std::fabs(v));
    int bad = 0;
    for (size_t k = 0; k < got.size(); ++k)
      bad += !(std::fabs(got[k] - want[k]) <= grad_rtol * std::fabs(want[k]) + 1e-5f * scale);
    EXPECT(bad == 0, "%s: %d %s gradient elements off", name, bad, what);
  };
  check(got_gr, gr, "row");
  check(got_gc, gc, "column");
  for (void* ptr : {d_rows, d_cols, static_cast<void*>(d_index), static_cast<void*>(d_loss),
                    static_cast<void*>(d_lse), static_cast<void*>(d_go), d_gr, d_gc, d_ws}) {
    cudaFree(ptr);
  }
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("no usable CUDA device (%s): skipped\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  std::mt19937 rng(11);
  for (NtxentDType dt : {NtxentDType::kFloat32, NtxentDType::kFloat16, NtxentDType::kBFloat16}) {
    run_case("2N=64 D=64", 64, 64, 64, 0, 0.5f, dt, rng);
    run_case("subset 2N=70 D=33", 23, 70, 33, 5, 0.2f, dt, rng);
    run_case("2N=2 D=1", 2, 2, 1, 0, 0.5f, dt, rng);
    run_case("2N=300 D=256", 300, 300, 256, 0, 0.5f, dt, rng);
  }
  std::printf("test_ntxent_cuda: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
