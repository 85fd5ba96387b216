// CUDA kernels (csrc/kernels/cuda) against the CPU kernels (csrc/kernels/cpu, themselves tested
// against naive double loops) on small random inputs. Exit code 77 -- reported by ctest as
// "skipped" -- when no CUDA device or driver is usable, e.g. on build machines without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/cpu/multitask_loss.h"
#include "kernels/cuda/multitask_loss.cuh"
#include "tests/cuda_expect.cuh"

namespace {

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    CUDA_OK(cudaMalloc(&ptr, count * sizeof(T) + 1));
  }
  DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    CUDA_OK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> get() const {
    std::vector<T> host(n);
    CUDA_OK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

mgm_fast::cuda::Strides4 cu(const mgm_fast::cpu::Strides4& s) { return {s.n, s.c, s.h, s.w}; }

// Rounds values to the precision of dtype in place (so CPU and GPU see identical inputs) and
// returns the device copy in that dtype.
void* upload(std::vector<float>& v, mgm_fast::cuda::DType dtype, std::vector<void*>& owned) {
  void* ptr = nullptr;
  if (dtype == mgm_fast::cuda::DType::kFloat32) {
    CUDA_OK(cudaMalloc(&ptr, v.size() * 4 + 1));
    CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  } else if (dtype == mgm_fast::cuda::DType::kFloat16) {
    std::vector<__half> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      h[i] = __float2half_rn(v[i]);
      v[i] = __half2float(h[i]);
    }
    CUDA_OK(cudaMalloc(&ptr, v.size() * 2 + 1));
    CUDA_OK(cudaMemcpy(ptr, h.data(), v.size() * 2, cudaMemcpyHostToDevice));
  } else {
    std::vector<__nv_bfloat16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      h[i] = __float2bfloat16_rn(v[i]);
      v[i] = __bfloat162float(h[i]);
    }
    CUDA_OK(cudaMalloc(&ptr, v.size() * 2 + 1));
    CUDA_OK(cudaMemcpy(ptr, h.data(), v.size() * 2, cudaMemcpyHostToDevice));
  }
  owned.push_back(ptr);
  return ptr;
}

void run_case(int64_t B, int64_t C, int64_t H, int64_t W, bool nhwc, bool has_ignore,
              mgm_fast::cuda::DType dtype, mgm_fast::cuda::Reduction red, std::mt19937& rng) {
  using namespace mgm_fast;
  std::vector<void*> owned;
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  auto strides = [&](int64_t c) -> cpu::Strides4 {
    return nhwc ? cpu::Strides4{H * W * c, 1, W * c, c} : cpu::Strides4{c * H * W, H * W, W, 1};
  };
  const size_t px = static_cast<size_t>(B * H * W);
  std::vector<float> logits(px * C), dpred(px), dtgt(px), npred(px * 3), ntgt(px * 3), nmask(px);
  std::vector<uint8_t> dmask(px);
  std::vector<int64_t> labels(px);
  for (float& v : logits) v = u(rng);
  for (float& v : dpred) v = u(rng);
  for (float& v : dtgt) v = u(rng);
  for (float& v : npred) v = u(rng);
  for (float& v : ntgt) v = u(rng);
  for (float& v : nmask) v = u(rng) > 0.0f ? 1.0f : 0.25f;
  for (uint8_t& v : dmask) v = u(rng) > -1.0f;
  std::uniform_int_distribution<int64_t> cls(0, C - 1);
  for (int64_t& t : labels) t = (has_ignore && u(rng) > 2.0f) ? 255 : cls(rng);

  cuda::MultitaskLossArgs a;
  a.reduction = red;
  a.seg.logits = upload(logits, dtype, owned);
  a.seg.logits_dtype = dtype;
  a.seg.logits_strides = cu(strides(C));
  DeviceBuffer<int64_t> d_labels(labels);
  a.seg.target = d_labels.ptr;
  a.seg.target_strides = {H * W, W, 1};
  DeviceBuffer<float> g_seg(px * C), g_dep(px), g_nrm(px * 3);
  a.seg.grad = g_seg.ptr;
  a.seg.grad_strides = a.seg.logits_strides;
  a.seg.batch = B;
  a.seg.classes = C;
  a.seg.height = H;
  a.seg.width = W;
  a.seg.has_ignore = has_ignore;
  a.seg.ignore_index = 255;

  DeviceBuffer<uint8_t> d_dmask(dmask);
  a.depth = {};
  a.depth.pred = upload(dpred, dtype, owned);
  a.depth.pred_dtype = dtype;
  a.depth.pred_strides = cu(strides(1));
  a.depth.target = upload(dtgt, cuda::DType::kFloat32, owned);
  a.depth.target_dtype = cuda::DType::kFloat32;
  a.depth.target_strides = cu(strides(1));
  a.depth.mask = d_dmask.ptr;
  a.depth.mask_dtype = cuda::DType::kUInt8;
  a.depth.mask_channels = 1;
  a.depth.mask_strides = cu(strides(1));
  a.depth.grad = g_dep.ptr;
  a.depth.grad_strides = cu(strides(1));
  a.depth.batch = B;
  a.depth.channels = 1;
  a.depth.height = H;
  a.depth.width = W;

  a.normal = a.depth;
  a.normal.pred = upload(npred, dtype, owned);
  a.normal.pred_strides = cu(strides(3));
  a.normal.target = upload(ntgt, dtype, owned);
  a.normal.target_dtype = dtype;
  a.normal.target_strides = cu(strides(3));
  a.normal.mask = upload(nmask, cuda::DType::kFloat32, owned);
  a.normal.mask_dtype = cuda::DType::kFloat32;
  a.normal.grad = g_nrm.ptr;
  a.normal.grad_strides = cu(strides(3));
  a.normal.channels = 3;

  DeviceBuffer<float> losses(3), inv(3);
  DeviceBuffer<int64_t> err(2);
  DeviceBuffer<char> ws(cuda::multitask_loss_workspace_bytes());
  cuda::MultitaskLossOutputs outs;
  for (int k = 0; k < 3; ++k) outs.losses[k] = losses.ptr + k;
  outs.inv_divisors = inv.ptr;
  outs.label_error = err.ptr;
  CUDA_OK(cuda::multitask_loss_forward(a, outs, ws.ptr, 0));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> got = losses.get();
  const std::vector<float> got_inv = inv.get();
  EXPECT(err.get()[0] == -1, "unexpected label error at pixel %lld", (long long)err.get()[0]);

  // CPU kernels on the same (rounded) values
  std::vector<float> c_seg(px * C), c_dep(px), c_nrm(px * 3);
  cpu::SegCEProblem sp;
  sp.logits = logits.data();
  sp.logits_strides = strides(C);
  sp.target = labels.data();
  sp.target_strides = {H * W, W, 1};
  sp.grad = c_seg.data();
  sp.grad_strides = strides(C);
  sp.batch = B;
  sp.classes = C;
  sp.height = H;
  sp.width = W;
  sp.has_ignore = has_ignore;
  sp.ignore_index = 255;
  const cpu::LossResult rs = cpu::seg_ce(sp, 1);
  auto l1 = [&](const std::vector<float>& p, const std::vector<float>& t, const void* m,
                cpu::MaskKind mk, int64_t ch, std::vector<float>& g) {
    cpu::L1Problem q;
    q.pred = p.data();
    q.pred_strides = strides(ch);
    q.target = t.data();
    q.target_strides = strides(ch);
    q.mask = m;
    q.mask_kind = mk;
    q.mask_channels = 1;
    q.mask_strides = strides(1);
    q.grad = g.data();
    q.grad_strides = strides(ch);
    q.batch = B;
    q.channels = ch;
    q.height = H;
    q.width = W;
    q.reduction = red == cuda::Reduction::kAll ? cpu::Reduction::kAll : cpu::Reduction::kValid;
    return cpu::masked_l1(q, 1);
  };
  const cpu::LossResult rd = l1(dpred, dtgt, dmask.data(), cpu::MaskKind::kUInt8, 1, c_dep);
  const cpu::LossResult rn = l1(npred, ntgt, nmask.data(), cpu::MaskKind::kFloat32, 3, c_nrm);
  const cpu::LossResult* ref[3] = {&rs, &rd, &rn};
  const std::vector<float>* gpu_grad[3] = {nullptr, nullptr, nullptr};
  std::vector<float> gs = g_seg.get(), gd = g_dep.get(), gn = g_nrm.get();
  gpu_grad[0] = &gs;
  gpu_grad[1] = &gd;
  gpu_grad[2] = &gn;
  const std::vector<float>* cpu_grad[3] = {&c_seg, &c_dep, &c_nrm};
  for (int k = 0; k < 3; ++k) {
    const double want = ref[k]->loss;
    EXPECT(std::fabs(got[k] - want) <= 2e-5 * std::fabs(want) + 1e-6,
           "loss %d: gpu %.8g cpu %.8g (dtype %d)", k, got[k], want, (int)dtype);
    EXPECT(std::fabs(got_inv[k] * ref[k]->divisor - 1.0) < 1e-6, "divisor %d", k);
    double worst = 0.0;
    for (size_t i = 0; i < cpu_grad[k]->size(); ++i) {
      // gpu buffers are unscaled: multiply by 1/D to compare with the CPU's scaled gradient
      const double e = std::fabs((*gpu_grad[k])[i] * got_inv[k] - (*cpu_grad[k])[i]);
      worst = e > worst ? e : worst;
    }
    EXPECT(worst <= 1e-6 * got_inv[k] + 1e-12, "grad %d: max error %.3g", k, worst);
  }

  // scale_gradient: fp32 buffer * grad_output * 1/D, rounded once to the output dtype
  DeviceBuffer<float> go(std::vector<float>{3.0f});
  DeviceBuffer<float> out(px * C);
  CUDA_OK(cuda::scale_gradient(g_seg.ptr, out.ptr, cuda::DType::kFloat32,
                               static_cast<int64_t>(px * C), go.ptr, inv.ptr, 0));
  const std::vector<float> scaled = out.get();
  double worst = 0.0;
  for (size_t i = 0; i < scaled.size(); ++i) {
    worst = std::fmax(worst, std::fabs(scaled[i] - 3.0 * c_seg[i]));
  }
  EXPECT(worst <= 3e-6 * got_inv[0] + 1e-12, "scale_gradient max error %.3g", worst);

  for (void* p : owned) cudaFree(p);
}

void test_label_error(std::mt19937& rng) {
  using namespace mgm_fast;
  const int64_t B = 2, C = 5, H = 3, W = 4, px = B * H * W;
  std::vector<float> logits(px * C);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& v : logits) v = u(rng);
  std::vector<int64_t> labels(px, 1);
  labels[17] = 7;
  labels[20] = -2;
  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<int64_t> d_labels(labels);
  std::vector<float> zeros(px * 3, 0.0f);
  DeviceBuffer<float> d_zero(zeros);
  cuda::MultitaskLossArgs a;
  a.seg.logits = d_logits.ptr;
  a.seg.logits_strides = {C * H * W, H * W, W, 1};
  a.seg.target = d_labels.ptr;
  a.seg.target_strides = {H * W, W, 1};
  a.seg.batch = B;
  a.seg.classes = C;
  a.seg.height = H;
  a.seg.width = W;
  for (cuda::L1Args* l : {&a.depth, &a.normal}) {
    l->pred = l->target = d_zero.ptr;
    l->channels = l == &a.depth ? 1 : 3;
    l->pred_strides = l->target_strides = {l->channels * H * W, H * W, W, 1};
    l->batch = B;
    l->height = H;
    l->width = W;
  }
  DeviceBuffer<float> losses(3), inv(3);
  DeviceBuffer<int64_t> err(2);
  DeviceBuffer<char> ws(cuda::multitask_loss_workspace_bytes());
  cuda::MultitaskLossOutputs outs;
  for (int k = 0; k < 3; ++k) outs.losses[k] = losses.ptr + k;
  outs.inv_divisors = inv.ptr;
  outs.label_error = err.ptr;
  CUDA_OK(cuda::multitask_loss_forward(a, outs, ws.ptr, 0));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<int64_t> e = err.get();
  EXPECT(e[0] == 17 && e[1] == 7, "label error: pixel %lld label %lld", (long long)e[0],
         (long long)e[1]);
  EXPECT(std::isnan(losses.get()[0]), "a bad label must make the loss NaN");
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
  std::mt19937 rng(7);
  using mgm_fast::cuda::DType;
  using mgm_fast::cuda::Reduction;
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (bool nhwc : {false, true}) {
      run_case(1, 13, 1, 1, nhwc, false, dt, Reduction::kAll, rng);
      run_case(3, 27, 7, 5, nhwc, true, dt, Reduction::kValid, rng);
      run_case(2, 40, 33, 70, nhwc, true, dt, Reduction::kAll, rng);
      // grid-stride: more than 1024 blocks' worth of pixels
      run_case(2, 13, 380, 371, nhwc, false, dt, Reduction::kValid, rng);
    }
  }
  test_label_error(rng);
  std::printf("%d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
