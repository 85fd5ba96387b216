// Unit tests of the torch-free CPU spectral normalisation (csrc/kernels/cpu/spectral_norm.*):
// the power iteration (one and two steps, evaluation mode) and the gradient of W / sigma against
// naive double loops over the logical (out, in*kh*kw) matrix, for a row-major weight and for the
// same weight stored channels_last (a column permutation); results independent of the thread
// count. Built and run by CMake/ctest.
#include "kernels/cpu/spectral_norm.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

using mgm_fast::cpu::SpectralNormMatrix;

struct Weight {
  int64_t out, in, kh, kw;
  std::vector<float> logical;   // (out, in, kh, kw) row-major
  std::vector<float> nhwc;      // the same values stored (out, kh, kw, in)
  std::vector<int64_t> offset;  // logical column -> offset in an nhwc row
  int64_t cols() const { return in * kh * kw; }
};

Weight make_weight(int64_t out, int64_t in, int64_t kh, int64_t kw, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Weight w{out, in, kh, kw, {}, {}, {}};
  const int64_t cols = w.cols();
  w.logical.resize(out * cols);
  for (float& x : w.logical) x = normal(rng);
  w.nhwc.resize(out * cols);
  w.offset.resize(cols);
  for (int64_t i = 0; i < in; ++i)
    for (int64_t y = 0; y < kh; ++y)
      for (int64_t x = 0; x < kw; ++x) w.offset[(i * kh + y) * kw + x] = (y * kw + x) * in + i;
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < cols; ++c) w.nhwc[r * cols + w.offset[c]] = w.logical[r * cols + c];
  return w;
}

std::vector<float> unit(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  double s = 0.0;
  for (float& e : x) {
    e = normal(rng);
    s += static_cast<double>(e) * e;
  }
  for (float& e : x) e = static_cast<float>(e / std::sqrt(s));
  return x;
}

// The iteration in double on the logical matrix (float32 rounding of u and v after each step,
// as the kernel and torch's float32 buffers do).
void naive_iteration(const Weight& w, std::vector<float>& u, std::vector<float>& v, int steps, float eps,
                     double* sigma) {
  const int64_t rows = w.out, cols = w.cols();
  std::vector<double> wv(rows);
  auto product = [&]() {
    for (int64_t r = 0; r < rows; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < cols; ++c) acc += static_cast<double>(w.logical[r * cols + c]) * v[c];
      wv[r] = acc;
    }
  };
  if (steps == 0) {
    product();
    double s = 0.0;
    for (int64_t r = 0; r < rows; ++r) s += u[r] * wv[r];
    *sigma = s;
    return;
  }
  double n = 0.0, clamped = 1.0;
  for (int step = 0; step < steps; ++step) {
    std::vector<double> wtu(cols, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) wtu[c] += static_cast<double>(w.logical[r * cols + c]) * u[r];
    double s = 0.0;
    for (double x : wtu) s += x * x;
    const double vn = std::max(std::sqrt(s), static_cast<double>(eps));
    for (int64_t c = 0; c < cols; ++c) v[c] = static_cast<float>(wtu[c] / vn);
    product();
    s = 0.0;
    for (double x : wv) s += x * x;
    n = std::sqrt(s);
    clamped = std::max(n, static_cast<double>(eps));
    for (int64_t r = 0; r < rows; ++r) u[r] = static_cast<float>(wv[r] / clamped);
  }
  *sigma = n * n / clamped;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
  return worst;
}

void test_iteration(int64_t out, int64_t in, int64_t k, int steps, bool channels_last, int threads) {
  std::mt19937 rng(static_cast<uint32_t>(out * 131 + in * 7 + k + steps));
  const Weight w = make_weight(out, in, k, k, rng);
  const std::vector<float> u0 = unit(out, rng), v0 = unit(w.cols(), rng);
  std::vector<float> u_want = u0, v_want = v0;
  double sigma_want = 0.0;
  naive_iteration(w, u_want, v_want, steps, 1e-12f, &sigma_want);

  const SpectralNormMatrix m{channels_last ? w.nhwc.data() : w.logical.data(), out, w.cols(), w.cols(),
                             channels_last ? w.offset.data() : nullptr};
  std::vector<float> u = u0, v = v0;
  float sigma = 0.0f;
  mgm_fast::cpu::spectral_norm_power_iteration(m, u.data(), v.data(), steps, 1e-12f, &sigma, threads);
  const double tol = 1e-5;
  EXPECT(std::fabs(sigma - sigma_want) <= tol * std::fabs(sigma_want),
         "sigma %g vs %g (out %lld in %lld k %lld steps %d cl %d)", sigma, sigma_want,
         static_cast<long long>(out), static_cast<long long>(in), static_cast<long long>(k), steps,
         channels_last);
  EXPECT(max_abs_diff(u, u_want) <= tol, "u differs by %g", max_abs_diff(u, u_want));
  EXPECT(max_abs_diff(v, v_want) <= tol, "v differs by %g", max_abs_diff(v, v_want));
  if (steps == 0) EXPECT(u == u0 && v == v0, "evaluation mode must leave u and v alone");
}

void test_weight_grad(int64_t out, int64_t in, int64_t k, bool channels_last, int threads) {
  std::mt19937 rng(static_cast<uint32_t>(out + 17 * in + k));
  const Weight w = make_weight(out, in, k, k, rng);
  const Weight g = make_weight(out, in, k, k, rng);
  const std::vector<float> u = unit(out, rng), v = unit(w.cols(), rng);
  const float sigma = 1.7f;
  const int64_t cols = w.cols();
  double inner = 0.0;
  for (int64_t i = 0; i < out * cols; ++i) inner += static_cast<double>(g.logical[i]) * w.logical[i];
  const double coef = inner / (static_cast<double>(sigma) * sigma);
  std::vector<float> want(out * cols);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < cols; ++c)
      want[r * cols + c] = static_cast<float>(g.logical[r * cols + c] / static_cast<double>(sigma) - coef * u[r] * v[c]);

  const SpectralNormMatrix m{channels_last ? w.nhwc.data() : w.logical.data(), out, cols, cols,
                             channels_last ? w.offset.data() : nullptr};
  std::vector<float> got(out * cols);
  mgm_fast::cpu::spectral_norm_weight_grad(m, channels_last ? g.nhwc.data() : g.logical.data(), u.data(), v.data(),
                                           sigma, got.data(), threads);
  std::vector<float> got_logical(out * cols);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < cols; ++c)
      got_logical[r * cols + c] = got[r * cols + (channels_last ? w.offset[c] : c)];
  EXPECT(max_abs_diff(got_logical, want) <= 1e-5, "weight grad differs by %g (cl %d)",
         max_abs_diff(got_logical, want), channels_last);
}

void test_thread_count_invariance() {
  std::mt19937 rng(5);
  const Weight w = make_weight(96, 64, 3, 3, rng);  // above the parallel threshold
  const std::vector<float> u0 = unit(96, rng), v0 = unit(w.cols(), rng);
  const SpectralNormMatrix m{w.nhwc.data(), 96, w.cols(), w.cols(), w.offset.data()};
  std::vector<float> u1 = u0, v1 = v0, u4 = u0, v4 = v0;
  float s1 = 0.0f, s4 = 0.0f;
  mgm_fast::cpu::spectral_norm_power_iteration(m, u1.data(), v1.data(), 2, 1e-12f, &s1, 1);
  mgm_fast::cpu::spectral_norm_power_iteration(m, u4.data(), v4.data(), 2, 1e-12f, &s4, 4);
  EXPECT(s1 == s4 && u1 == u4 && v1 == v4, "the iteration depends on the thread count");
  std::vector<float> g1(w.nhwc.size()), g4(w.nhwc.size());
  mgm_fast::cpu::spectral_norm_weight_grad(m, w.nhwc.data(), u1.data(), v1.data(), s1, g1.data(), 1);
  mgm_fast::cpu::spectral_norm_weight_grad(m, w.nhwc.data(), u1.data(), v1.data(), s1, g4.data(), 4);
  EXPECT(g1 == g4, "the weight gradient depends on the thread count");
}

void test_zero_vector_clamps() {
  // An all-zero weight: the norms are clamped by eps, u and v become zero, sigma zero.
  const int64_t out = 3, cols = 4;
  std::vector<float> w(out * cols, 0.0f), u = {1.0f, 0.0f, 0.0f}, v(cols, 0.5f);
  const SpectralNormMatrix m{w.data(), out, cols, cols, nullptr};
  float sigma = -1.0f;
  mgm_fast::cpu::spectral_norm_power_iteration(m, u.data(), v.data(), 1, 1e-12f, &sigma, 1);
  EXPECT(sigma == 0.0f, "sigma of a zero weight is %g", sigma);
  for (float x : u) EXPECT(x == 0.0f && !std::isnan(x), "u of a zero weight: %g", x);
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_spectral_norm"); status >= 0) return status;
  for (bool cl : {false, true}) {
    for (int steps : {0, 1, 2}) {
      test_iteration(5, 3, 3, steps, cl, 1);
      test_iteration(17, 11, 1, steps, cl, 2);
      test_iteration(64, 96, 3, steps, cl, 2);  // parallel products
    }
    test_weight_grad(7, 5, 3, cl, 1);
    test_weight_grad(64, 64, 3, cl, 2);
  }
  test_iteration(10, 1, 1, 1, false, 1);  // a linear layer with one input
  test_thread_count_invariance();
  test_zero_vector_clamps();
  std::printf("test_spectral_norm: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
