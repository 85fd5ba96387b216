// CUDA GenBlock kernels (csrc/kernels/cuda/genblock.*) against the CPU kernels
// (csrc/kernels/cpu/genblock.*, themselves tested against naive loops) on small random float32
// inputs, both layouts, plus a float16 run of the statistics. Exit code 77 -- reported by ctest
// as "skipped" -- when no CUDA device or driver is usable.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/cpu/genblock.h"
#include "kernels/cuda/genblock.cuh"
#include "tests/cuda_expect.cuh"

namespace cg = mgm_fast::cpu::genblock;
namespace dg = mgm_fast::cuda::genblock;

namespace {

template <typename T>
struct Dev {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CUDA_OK(cudaMalloc(&ptr, count * sizeof(T) + 16)); }
  explicit Dev(const std::vector<T>& host) : Dev(host.size()) {
    CUDA_OK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~Dev() { cudaFree(ptr); }
  std::vector<T> get() const {
    std::vector<T> host(n);
    CUDA_OK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

std::mt19937 g_rng(99);

std::vector<float> randn(size_t n, float scale = 1.0f, float shift = 0.0f) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g_rng) * scale + shift;
  return v;
}

template <typename A, typename B>
double max_err(const std::vector<A>& a, const std::vector<B>& b) {
  double e = 0.0, s = 1e-6;
  for (size_t i = 0; i < a.size(); ++i) {
    e = std::fmax(e, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    s = std::fmax(s, std::fabs(static_cast<double>(b[i])));
  }
  return e / s;
}

int64_t numel(const cg::Dims& d) { return d.n * d.c * d.h * d.w; }
dg::Dims dd(const cg::Dims& d) { return {d.n, d.c, d.h, d.w}; }
dg::Layout dl(cg::Layout l) { return l == cg::Layout::kPlanes ? dg::Layout::kPlanes : dg::Layout::kPixels; }

const cg::Layout kLayouts[2] = {cg::Layout::kPlanes, cg::Layout::kPixels};

void run() {
  cudaStream_t s = nullptr;
  for (cg::Layout l : kLayouts) {
    // statistics and prologue: x (3, 6, 10, 9) in layout l, written to pixels
    const cg::Dims d{3, 6, 10, 8};
    std::vector<float> x = randn(static_cast<size_t>(numel(d)), 1.5f, 3.0f);
    Dev<float> xd(x);
    Dev<char> ws(dg::workspace_bytes({d.n, 4 * d.c, d.h + 1, d.w + 1}) + dg::workspace_bytes(dd(d)));
    Dev<double> mean_d(6), var_d(6);
    CUDA_OK(dg::channel_stats(dg::DType::kFloat32, {xd.ptr, dd(d), dl(l)}, mean_d.ptr, var_d.ptr, ws.ptr, s));
    std::vector<double> mean(6), var(6);
    cg::channel_stats<float>({x.data(), d, l}, mean.data(), var.data(), 1);
    EXPECT(max_err(mean_d.get(), mean) < 1e-6 && max_err(var_d.get(), var) < 1e-5, "stats (%d)", int(l));

    std::vector<float> gam = randn(18, 0.3f, 1.0f), bet = randn(18, 0.3f);
    std::vector<double> rstd(6);
    std::vector<float> scale(18), shift(18);
    cg::scale_shift(gam.data(), bet.data(), 6, 3, 6, mean.data(), var.data(), 1e-5, rstd.data(), scale.data(),
                    shift.data());
    Dev<float> gam_d(gam), bet_d(bet), scale_d(18), shift_d(18);
    Dev<double> rstd_d(6);
    Dev<double> mean_h(mean), var_h(var);
    CUDA_OK(dg::scale_shift(gam_d.ptr, bet_d.ptr, 6, 3, 6, mean_h.ptr, var_h.ptr, 1e-5, rstd_d.ptr, scale_d.ptr,
                            shift_d.ptr, s));
    EXPECT(max_err(scale_d.get(), scale) < 1e-6 && max_err(shift_d.get(), shift) < 1e-6, "scale_shift");
    std::vector<float> act(x.size()), copy(x.size());
    cg::affine_relu<float>({x.data(), d, l}, scale.data(), shift.data(), {act.data(), d, cg::Layout::kPixels},
                           {copy.data(), d, cg::Layout::kPixels}, 1);
    Dev<float> act_d(x.size()), copy_d(x.size());
    Dev<float> sc(scale), sh(shift);
    CUDA_OK(dg::affine_relu(dg::DType::kFloat32, {xd.ptr, dd(d), dl(l)}, sc.ptr, sh.ptr,
                            {act_d.ptr, dd(d), dg::Layout::kPixels}, {copy_d.ptr, dd(d), dg::Layout::kPixels}, s));
    EXPECT(max_err(act_d.get(), act) < 1e-6 && max_err(copy_d.get(), copy) == 0.0, "affine_relu (%d)", int(l));

    // phase weights, phase epilogue with a half-size residual and statistics
    const int64_t co = 5;
    std::vector<float> w = randn(static_cast<size_t>(co * 6 * 9), 0.3f), wp(static_cast<size_t>(4 * co * 6 * 4));
    cg::phase_weights(w.data(), co, 6, wp.data(), true);
    Dev<float> w_d(w), wp_d(wp.size());
    CUDA_OK(dg::phase_weights(dg::DType::kFloat32, w_d.ptr, co, 6, wp_d.ptr, true, s));
    EXPECT(max_err(wp_d.get(), wp) < 1e-6, "phase_weights");
    std::vector<float> dw(w.size());
    cg::phase_weights_backward(wp.data(), co, 6, dw.data(), true);
    Dev<float> dw_d(w.size());
    CUDA_OK(dg::phase_weights_backward(dg::DType::kFloat32, wp_d.ptr, co, 6, dw_d.ptr, true, s));
    EXPECT(max_err(dw_d.get(), dw) < 1e-6, "phase_weights_backward");

    const cg::Dims low{3, co, d.h, d.w}, hd{3, co, 2 * d.h, 2 * d.w};
    std::vector<float> p = randn(static_cast<size_t>(3 * 4 * co * (d.h + 1) * (d.w + 1)));
    std::vector<float> bias = randn(co), res = randn(static_cast<size_t>(numel(low)));
    Dev<float> p_d(p), bias_d(bias), res_d(res);
    cg::Epilogue<float> ep;
    ep.bias = bias.data();
    ep.residual = {res.data(), low, l};
    ep.residual_half = true;
    std::vector<float> h(static_cast<size_t>(numel(hd)));
    std::vector<double> hm(co), hv(co);
    cg::phase_epilogue(p.data(), low, ep, {h.data(), hd, cg::Layout::kPixels}, hm.data(), hv.data(), 1);
    dg::Epilogue ep_d;
    ep_d.bias = bias_d.ptr;
    ep_d.residual = {res_d.ptr, dd(low), dl(l)};
    ep_d.residual_half = true;
    Dev<float> h_d(h.size());
    Dev<double> hm_d(co), hv_d(co);
    CUDA_OK(dg::phase_epilogue(dg::DType::kFloat32, p_d.ptr, ep_d, {h_d.ptr, dd(hd), dg::Layout::kPixels}, hm_d.ptr,
                               hv_d.ptr, ws.ptr, s));
    EXPECT(max_err(h_d.get(), h) < 1e-6, "phase_epilogue (%d)", int(l));
    EXPECT(max_err(hm_d.get(), hm) < 1e-5 && max_err(hv_d.get(), hv) < 1e-5, "phase_epilogue statistics");

    // plain epilogue into layout l, no statistics
    std::vector<float> out(h.size());
    cg::Epilogue<float> ep2 = ep;
    cg::conv_epilogue<float>({h.data(), hd, cg::Layout::kPixels}, ep2, {out.data(), hd, l}, nullptr, nullptr, 1);
    Dev<float> out_d(h.size());
    CUDA_OK(dg::conv_epilogue(dg::DType::kFloat32, {h_d.ptr, dd(hd), dg::Layout::kPixels}, ep_d,
                              {out_d.ptr, dd(hd), dl(l)}, nullptr, nullptr, ws.ptr, s));
    EXPECT(max_err(out_d.get(), out) < 1e-6, "conv_epilogue (%d)", int(l));

    // output gradient: copy, half sums, bias; scatter
    std::vector<float> g = randn(h.size());
    Dev<float> g_d(g);
    std::vector<float> gcopy(g.size()), ghalf(static_cast<size_t>(numel(low)));
    std::vector<double> gb(co);
    cg::grad_output_prep<float>({g.data(), hd, l}, {gcopy.data(), hd, cg::Layout::kPixels}, {ghalf.data(), low, l},
                                gb.data(), 1);
    Dev<float> gcopy_d(g.size()), ghalf_d(ghalf.size());
    Dev<double> gb_d(co);
    CUDA_OK(dg::grad_output_prep(dg::DType::kFloat32, {g_d.ptr, dd(hd), dl(l)}, {gcopy_d.ptr, dd(hd), dg::Layout::kPixels},
                                 {ghalf_d.ptr, dd(low), dl(l)}, gb_d.ptr, ws.ptr, s));
    EXPECT(max_err(gcopy_d.get(), gcopy) == 0.0 && max_err(ghalf_d.get(), ghalf) < 1e-6 &&
               max_err(gb_d.get(), gb) < 1e-5,
           "grad_output_prep (%d)", int(l));
    std::vector<float> dp(p.size());
    std::vector<double> db(co);
    cg::phase_grad_scatter<float>({g.data(), hd, l}, dp.data(), db.data(), 1);
    Dev<float> dp_d(p.size());
    Dev<double> db_d(co);
    CUDA_OK(dg::phase_grad_scatter(dg::DType::kFloat32, {g_d.ptr, dd(hd), dl(l)}, dp_d.ptr, db_d.ptr, ws.ptr, s));
    EXPECT(max_err(dp_d.get(), dp) == 0.0 && max_err(db_d.get(), db) < 1e-5, "phase_grad_scatter (%d)", int(l));

    // BN backward on x (layout l) with act / dact in pixels
    for (bool training : {true, false}) {
      std::vector<float> dact = randn(x.size());
      Dev<float> dact_d(dact);
      cg::BnReluBackward<float> a;
      a.x = {x.data(), d, l};
      a.act = {act.data(), d, cg::Layout::kPixels};
      a.dact = {dact.data(), d, cg::Layout::kPixels};
      a.gamma = gam.data();
      a.gamma_stride = 6;
      a.scale = scale.data();
      a.mean = mean.data();
      a.rstd = rstd.data();
      a.training = training;
      std::vector<float> dgb(36);
      std::vector<double> k1(6), k2(6);
      cg::bn_relu_backward_reduce(a, dgb.data(), dgb.data() + 6, 12, k1.data(), k2.data(), 1);
      dg::BnReluBackward ad;
      ad.x = {xd.ptr, dd(d), dl(l)};
      ad.act = {act_d.ptr, dd(d), dg::Layout::kPixels};
      ad.dact = {dact_d.ptr, dd(d), dg::Layout::kPixels};
      ad.gamma = gam_d.ptr;
      ad.gamma_stride = 6;
      ad.scale = sc.ptr;
      ad.mean = mean_h.ptr;
      ad.rstd = rstd_d.ptr;
      ad.training = training;
      Dev<float> dgb_d(36);
      Dev<double> k1_d(6), k2_d(6);
      CUDA_OK(dg::bn_relu_backward_reduce(dg::DType::kFloat32, ad, dgb_d.ptr, dgb_d.ptr + 6, 12, k1_d.ptr, k2_d.ptr,
                                          ws.ptr, s));
      EXPECT(max_err(dgb_d.get(), dgb) < 1e-5 && max_err(k1_d.get(), k1) < 1e-5 && max_err(k2_d.get(), k2) < 1e-5,
             "bn reduce (%d, training %d)", int(l), training);
      std::vector<float> dx(x.size());
      cg::bn_relu_backward_apply<float>(a, k1.data(), k2.data(), {copy.data(), d, cg::Layout::kPixels}, {dx.data(), d, l}, 1);
      Dev<float> dx_d(x.size());
      Dev<double> k1h(k1), k2h(k2);
      CUDA_OK(dg::bn_relu_backward_apply(dg::DType::kFloat32, ad, k1h.ptr, k2h.ptr, {copy_d.ptr, dd(d), dg::Layout::kPixels},
                                         {dx_d.ptr, dd(d), dl(l)}, s));
      EXPECT(max_err(dx_d.get(), dx) < 1e-5, "bn apply (%d, training %d)", int(l), training);
      if (d.h % 2 == 0 && d.w % 2 == 0) {
        std::vector<float> dpp(static_cast<size_t>(d.n * 4 * d.c * (d.h / 2 + 1) * (d.w / 2 + 1)));
        std::vector<double> dbp(6);
        cg::bn_relu_backward_apply_phase(a, k1.data(), k2.data(), dpp.data(), dbp.data(), 1);
        Dev<float> dpp_d(dpp.size());
        Dev<double> dbp_d(6);
        CUDA_OK(dg::bn_relu_backward_apply_phase(dg::DType::kFloat32, ad, k1h.ptr, k2h.ptr, dpp_d.ptr, dbp_d.ptr,
                                                 ws.ptr, s));
        EXPECT(max_err(dpp_d.get(), dpp) < 1e-5 && max_err(dbp_d.get(), dbp) < 1e-4, "bn apply_phase");
      }
    }
  }

  // float16 statistics of a channels_last tensor against the CPU on the rounded values
  const cg::Dims d{2, 7, 5, 6};
  std::vector<float> x = randn(static_cast<size_t>(numel(d)), 2.0f, 1.0f);
  std::vector<__half> xh(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xh[i] = __float2half_rn(x[i]);
    x[i] = __half2float(xh[i]);
  }
  Dev<__half> xh_d(xh);
  Dev<char> ws(dg::workspace_bytes(dd(d)));
  Dev<double> m_d(7), v_d(7);
  CUDA_OK(dg::channel_stats(dg::DType::kFloat16, {xh_d.ptr, dd(d), dg::Layout::kPixels}, m_d.ptr, v_d.ptr, ws.ptr, s));
  std::vector<double> m(7), v(7);
  cg::channel_stats<float>({x.data(), d, cg::Layout::kPixels}, m.data(), v.data(), 1);
  EXPECT(max_err(m_d.get(), m) < 1e-5 && max_err(v_d.get(), v) < 1e-5, "float16 statistics");
  CUDA_OK(cudaDeviceSynchronize());
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("test_genblock_cuda: no usable CUDA device, skipped\n");
    return 77;
  }
  run();
  std::printf("test_genblock_cuda: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
