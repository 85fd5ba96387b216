// Unit tests of the torch-free CPU SAGAN attention kernel (csrc/kernels/cpu/sagan_attention.*)
// against naive double-precision loops, on small random inputs: output, per-query LSE, the three
// gradients; odd sizes (partial lane blocks, backward chunks of 128 positions), dq / dv of 0, 1
// and every remainder of the register blocks, one key, large logits, empty batch / queries, each
// gradient alone, thread-count bit-identity.
// Built and run by CMake/ctest; a failed EXPECT prints where and why, main returns 1.
#include "kernels/cpu/sagan_attention.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

using mgm_fast::cpu::SaganAttentionProblem;

namespace {

struct Naive {
  std::vector<double> out, lse, grad_theta, grad_phi, grad_g;
};

// The formulas of sagan_attention.h in double, straight from the definitions.
Naive naive(const std::vector<float>& theta, const std::vector<float>& phi,
            const std::vector<float>& g, const std::vector<float>& grad_out, int64_t B, int64_t N,
            int64_t M, int64_t DQ, int64_t DV) {
  Naive r;
  r.out.assign(static_cast<size_t>(B * DV * N), 0.0);
  r.lse.assign(static_cast<size_t>(B * N), 0.0);
  r.grad_theta.assign(static_cast<size_t>(B * DQ * N), 0.0);
  r.grad_phi.assign(static_cast<size_t>(B * DQ * M), 0.0);
  r.grad_g.assign(static_cast<size_t>(B * DV * M), 0.0);
  std::vector<double> s(static_cast<size_t>(M)), prob(static_cast<size_t>(M));
  for (int64_t b = 0; b < B; ++b) {
    auto q = [&](int64_t d, int64_t i) { return double(theta[(b * DQ + d) * N + i]); };
    auto k = [&](int64_t d, int64_t j) { return double(phi[(b * DQ + d) * M + j]); };
    auto v = [&](int64_t c, int64_t j) { return double(g[(b * DV + c) * M + j]); };
    auto dout = [&](int64_t c, int64_t i) { return double(grad_out[(b * DV + c) * N + i]); };
    for (int64_t i = 0; i < N; ++i) {
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < M; ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < DQ; ++d) dot += q(d, i) * k(d, j);
        s[j] = dot;
        m = std::max(m, dot);
      }
      double sum = 0.0;
      for (int64_t j = 0; j < M; ++j) sum += std::exp(s[j] - m);
      const double lse = m + std::log(sum);
      r.lse[b * N + i] = lse;
      for (int64_t j = 0; j < M; ++j) prob[j] = std::exp(s[j] - lse);
      for (int64_t c = 0; c < DV; ++c) {
        double o = 0.0;
        for (int64_t j = 0; j < M; ++j) o += prob[j] * v(c, j);
        r.out[(b * DV + c) * N + i] = o;
      }
      double delta = 0.0;
      for (int64_t c = 0; c < DV; ++c) delta += dout(c, i) * r.out[(b * DV + c) * N + i];
      for (int64_t j = 0; j < M; ++j) {
        double dp = 0.0;
        for (int64_t c = 0; c < DV; ++c) dp += dout(c, i) * v(c, j);
        const double ds = prob[j] * (dp - delta);
        for (int64_t d = 0; d < DQ; ++d) {
          r.grad_theta[(b * DQ + d) * N + i] += ds * k(d, j);
          r.grad_phi[(b * DQ + d) * M + j] += ds * q(d, i);
        }
        for (int64_t c = 0; c < DV; ++c) r.grad_g[(b * DV + c) * M + j] += prob[j] * dout(c, i);
      }
    }
  }
  return r;
}

// Elements off by more than rtol relative plus atol_rel of the largest reference entry.
int count_bad(const std::vector<float>& got, const std::vector<double>& want, double rtol,
              double atol_rel) {
  double scale = 0.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  int bad = 0;
  for (size_t e = 0; e < want.size(); ++e) {
    const double tol = rtol * std::fabs(want[e]) + atol_rel * scale + 1e-30;
    bad += !(std::fabs(got[e] - want[e]) <= tol);  // NaN counts as bad
  }
  return bad;
}

struct Case {
  const char* name;
  int64_t B, N, M, DQ, DV;
  float scale;  // of theta and phi: scores ~ scale^2 * sqrt(dq)
};

void run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](size_t n, float scale) {
    std::vector<float> x(n);
    for (float& v : x) v = scale * normal(rng);
    return x;
  };
  const std::vector<float> theta = fill(static_cast<size_t>(c.B * c.DQ * c.N), c.scale);
  const std::vector<float> phi = fill(static_cast<size_t>(c.B * c.DQ * c.M), c.scale);
  const std::vector<float> g = fill(static_cast<size_t>(c.B * c.DV * c.M), 1.0f);
  const std::vector<float> grad_out = fill(static_cast<size_t>(c.B * c.DV * c.N), 1.0f);
  SaganAttentionProblem p;
  p.theta = theta.data();
  p.phi = phi.data();
  p.g = g.data();
  p.batch = c.B;
  p.num_queries = c.N;
  p.num_keys = c.M;
  p.qk_dim = c.DQ;
  p.v_dim = c.DV;
  const Naive want = naive(theta, phi, g, grad_out, c.B, c.N, c.M, c.DQ, c.DV);

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(want.out.size(), nan), lse(want.lse.size(), nan);
  mgm_fast::cpu::sagan_attention_forward(p, out.data(), lse.data(), 2);
  // float32 scores of size S carry an absolute error ~S * 6e-8, which P inherits relatively
  const double s_err = 1e-6 * std::max(1.0, double(c.scale) * c.scale * 4.0 * std::sqrt(double(c.DQ)));
  EXPECT(count_bad(out, want.out, 1e-4, 1e-5 + s_err) == 0, "%s: output off", c.name);
  int bad_lse = 0;
  for (size_t i = 0; i < lse.size(); ++i) {
    bad_lse += !(std::fabs(lse[i] - want.lse[i]) <= 2e-6 * (1.0 + std::fabs(want.lse[i])));
  }
  EXPECT(bad_lse == 0, "%s: %d lse entries off", c.name, bad_lse);

  std::vector<float> gt(want.grad_theta.size(), nan), gp(want.grad_phi.size(), nan),
      gg(want.grad_g.size(), nan);
  mgm_fast::cpu::sagan_attention_backward(p, out.data(), lse.data(), grad_out.data(), gt.data(),
                                          gp.data(), gg.data(), 2);
  const int bt = count_bad(gt, want.grad_theta, 1e-3, 2e-5 + s_err);
  const int bp = count_bad(gp, want.grad_phi, 1e-3, 2e-5 + s_err);
  const int bg = count_bad(gg, want.grad_g, 1e-4, 1e-5 + s_err);
  EXPECT(bt == 0 && bp == 0 && bg == 0, "%s: %d theta / %d phi / %d g gradient elements off",
         c.name, bt, bp, bg);

  // one thread gives the same bits
  std::vector<float> out1(out.size()), lse1(lse.size()), gt1(gt.size()), gp1(gp.size()),
      gg1(gg.size());
  mgm_fast::cpu::sagan_attention_forward(p, out1.data(), lse1.data(), 1);
  mgm_fast::cpu::sagan_attention_backward(p, out1.data(), lse1.data(), grad_out.data(),
                                          gt1.data(), gp1.data(), gg1.data(), 1);
  EXPECT(out1 == out && lse1 == lse && gt1 == gt && gp1 == gp && gg1 == gg,
         "%s: differs with 1 thread", c.name);

  // each gradient alone: the same values
  std::vector<float> alone_t(gt.size(), nan), alone_p(gp.size(), nan), alone_g(gg.size(), nan);
  mgm_fast::cpu::sagan_attention_backward(p, out.data(), lse.data(), grad_out.data(),
                                          alone_t.data(), nullptr, nullptr, 2);
  mgm_fast::cpu::sagan_attention_backward(p, out.data(), lse.data(), grad_out.data(), nullptr,
                                          alone_p.data(), nullptr, 2);
  mgm_fast::cpu::sagan_attention_backward(p, out.data(), lse.data(), grad_out.data(), nullptr,
                                          nullptr, alone_g.data(), 2);
  EXPECT(alone_t == gt && alone_p == gp && alone_g == gg, "%s: a gradient alone differs", c.name);
}

// No queries: an empty output, zero key/value gradients; no batch: nothing written.
void test_empty() {
  std::vector<float> phi(2 * 3 * 5, 1.0f), g(2 * 4 * 5, 1.0f);
  SaganAttentionProblem p;
  p.phi = phi.data();
  p.g = g.data();
  p.batch = 2;
  p.num_queries = 0;
  p.num_keys = 5;
  p.qk_dim = 3;
  p.v_dim = 4;
  mgm_fast::cpu::sagan_attention_forward(p, nullptr, nullptr, 2);
  std::vector<float> gp(phi.size(), 7.0f), gg(g.size(), 7.0f);
  mgm_fast::cpu::sagan_attention_backward(p, nullptr, nullptr, nullptr, nullptr, gp.data(),
                                          gg.data(), 2);
  EXPECT(std::all_of(gp.begin(), gp.end(), [](float v) { return v == 0.0f; }) &&
             std::all_of(gg.begin(), gg.end(), [](float v) { return v == 0.0f; }),
         "N = 0: key/value gradients not zero");
  p.batch = 0;
  p.num_queries = 3;
  mgm_fast::cpu::sagan_attention_forward(p, nullptr, nullptr, 2);
  mgm_fast::cpu::sagan_attention_backward(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 2);
  EXPECT(true, "B = 0 runs");
}

// One key: every query copies it (P = 1), whatever the scores.
void test_one_key() {
  const int64_t N = 7, DV = 3;
  std::vector<float> theta(N, 0.0f), phi = {2.0f}, g = {1.5f, -2.0f, 0.25f};
  for (int64_t i = 0; i < N; ++i) theta[i] = 10.0f * static_cast<float>(i) - 30.0f;
  SaganAttentionProblem p;
  p.theta = theta.data();
  p.phi = phi.data();
  p.g = g.data();
  p.batch = 1;
  p.num_queries = N;
  p.num_keys = 1;
  p.qk_dim = 1;
  p.v_dim = DV;
  std::vector<float> out(static_cast<size_t>(DV * N)), lse(static_cast<size_t>(N));
  mgm_fast::cpu::sagan_attention_forward(p, out.data(), lse.data(), 1);
  int bad = 0;
  for (int64_t c = 0; c < DV; ++c)
    for (int64_t i = 0; i < N; ++i) bad += out[c * N + i] != g[c];
  for (int64_t i = 0; i < N; ++i) bad += lse[i] != theta[i] * phi[0];
  EXPECT(bad == 0, "one key: %d values differ from the copied value / the score", bad);
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_sagan_attention"); status >= 0) return status;
  std::mt19937 rng(1234);
  const Case cases[] = {
      {"B=1 N=37 M=9 dq=1 dv=4", 1, 37, 9, 1, 4, 1.0f},
      {"B=2 N=64 M=16 dq=2 dv=8", 2, 64, 16, 2, 8, 1.0f},
      {"B=3 N=33 M=17 dq=4 dv=16", 3, 33, 17, 4, 16, 1.0f},
      {"B=2 N=40 M=24 dq=16 dv=64", 2, 40, 24, 16, 64, 0.5f},
      {"B=1 N=19 M=5 dq=17 dv=20", 1, 19, 5, 17, 20, 0.5f},
      {"B=2 N=3 M=2 dq=0 dv=1", 2, 3, 2, 0, 1, 1.0f},
      {"B=1 N=261 M=133 dq=13 dv=7 chunks", 1, 261, 133, 13, 7, 0.5f},
      {"B=2 N=150 M=40 dq=3 dv=11", 2, 150, 40, 3, 11, 1.0f},
      {"large logits", 2, 48, 12, 2, 8, 4.5f},  // scores up to ~ +-80
      {"parallel B=4 N=256 M=64", 4, 256, 64, 4, 16, 1.0f},  // above kParallelWork
  };
  for (const Case& c : cases) run_case(c, rng);
  test_empty();
  test_one_key();
  std::printf("test_sagan_attention: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
