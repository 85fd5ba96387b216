// Unit tests of the torch-free channels_last batch norm (csrc/kernels/cpu/batch_norm.*) against
// naive double loops -- the forward with and without ReLU, the running statistics, and the
// backward: channel counts that are and are not a divisor or multiple of a
// tile (1, 3, 8, 16, 24, 40), row counts with a partial last tile and several blocks, with and
// without an affine weight, each output alone; results independent of the thread count. Built
// and run by CMake/ctest.
#include "kernels/cpu/batch_norm.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

struct Problem {
  int64_t rows, c;
  std::vector<float> dy, x, mean, invstd, weight;
};

Problem make(int64_t rows, int64_t c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Problem p{rows, c, std::vector<float>(rows * c), std::vector<float>(rows * c), std::vector<float>(c),
            std::vector<float>(c), std::vector<float>(c)};
  for (int64_t k = 0; k < c; ++k) {  // per-channel offsets and scales, as activations have
    const float shift = 3.0f * normal(rng), spread = 0.5f + std::fabs(normal(rng));
    for (int64_t r = 0; r < rows; ++r) p.x[r * c + k] = shift + spread * normal(rng);
    double s = 0.0, s2 = 0.0;
    for (int64_t r = 0; r < rows; ++r) s += p.x[r * c + k];
    const double m = s / rows;
    for (int64_t r = 0; r < rows; ++r) s2 += (p.x[r * c + k] - m) * (p.x[r * c + k] - m);
    p.mean[k] = static_cast<float>(m);
    p.invstd[k] = static_cast<float>(1.0 / std::sqrt(s2 / rows + 1e-5));
    p.weight[k] = normal(rng);
  }
  for (float& v : p.dy) v = normal(rng);
  return p;
}

struct Grads {
  std::vector<double> dx, dw, db;
};

Grads naive(const Problem& p, bool affine) {
  Grads g{std::vector<double>(p.rows * p.c), std::vector<double>(p.c), std::vector<double>(p.c)};
  for (int64_t k = 0; k < p.c; ++k) {
    double sum = 0.0, dot = 0.0;
    for (int64_t r = 0; r < p.rows; ++r) {
      sum += p.dy[r * p.c + k];
      dot += static_cast<double>(p.dy[r * p.c + k]) * (p.x[r * p.c + k] - static_cast<double>(p.mean[k]));
    }
    const double s = p.invstd[k], w = affine ? p.weight[k] : 1.0;
    g.db[k] = sum;
    g.dw[k] = dot * s;
    for (int64_t r = 0; r < p.rows; ++r) {
      const double xm = p.x[r * p.c + k] - static_cast<double>(p.mean[k]);
      g.dx[r * p.c + k] = w * s * (p.dy[r * p.c + k] - sum / p.rows - xm * s * s * dot / p.rows);
    }
  }
  return g;
}

// Largest |a - b| relative to the largest |b| (float32 sums of up to ~10^5 terms).
double rel_error(const float* a, const std::vector<double>& b) {
  double err = 0.0, scale = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return err / scale;
}

void test_values(int64_t rows, int64_t c, bool affine, int threads) {
  std::mt19937 rng(static_cast<unsigned>(rows * 131 + c));
  const Problem p = make(rows, c, rng);
  const Grads want = naive(p, affine);
  std::vector<float> dx(rows * c, -7.0f), dw(c, -7.0f), db(c, -7.0f);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, p.mean.data(),
                                                   p.invstd.data(), affine ? p.weight.data() : nullptr, nullptr, dx.data(),
                                                   dw.data(), db.data(), nullptr, threads);
  EXPECT(rel_error(dx.data(), want.dx) < 2e-5, "rows %lld C %lld affine %d: grad_input error %g",
         static_cast<long long>(rows), static_cast<long long>(c), affine, rel_error(dx.data(), want.dx));
  EXPECT(rel_error(dw.data(), want.dw) < 2e-5, "rows %lld C %lld: grad_weight error %g", static_cast<long long>(rows),
         static_cast<long long>(c), rel_error(dw.data(), want.dw));
  EXPECT(rel_error(db.data(), want.db) < 2e-5, "rows %lld C %lld: grad_bias error %g", static_cast<long long>(rows),
         static_cast<long long>(c), rel_error(db.data(), want.db));

  // Each output alone: the same values, and nothing else written.
  std::vector<float> dx_only(rows * c, -7.0f), dw_only(c, -7.0f), db_only(c, -7.0f);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, p.mean.data(),
                                                   p.invstd.data(), affine ? p.weight.data() : nullptr, nullptr,
                                                   dx_only.data(), nullptr, nullptr, nullptr, threads);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, p.mean.data(),
                                                   p.invstd.data(), affine ? p.weight.data() : nullptr, nullptr,
                                                   nullptr, dw_only.data(), nullptr, nullptr, threads);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, p.mean.data(),
                                                   p.invstd.data(), affine ? p.weight.data() : nullptr, nullptr,
                                                   nullptr, nullptr, db_only.data(), nullptr, threads);
  EXPECT(std::memcmp(dx_only.data(), dx.data(), dx.size() * sizeof(float)) == 0, "grad_input alone differs");
  EXPECT(std::memcmp(dw_only.data(), dw.data(), dw.size() * sizeof(float)) == 0, "grad_weight alone differs");
  EXPECT(std::memcmp(db_only.data(), db.data(), db.size() * sizeof(float)) == 0, "grad_bias alone differs");
}

void test_thread_count_invariance() {
  std::mt19937 rng(7);
  const Problem p = make(8 * 64 * 64 + 3, 24, rng);  // many blocks, a partial last tile
  std::vector<float> ref_dx, ref_dw, ref_db;
  for (int threads : {1, 2, 3, 5}) {
    std::vector<float> dx(p.rows * p.c), dw(p.c), db(p.c);
    mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), p.rows, p.c, p.mean.data(),
                                                     p.invstd.data(), p.weight.data(), nullptr, dx.data(), dw.data(),
                                                     db.data(), nullptr, threads);
    if (ref_dx.empty()) {
      ref_dx = dx, ref_dw = dw, ref_db = db;
      continue;
    }
    EXPECT(std::memcmp(dx.data(), ref_dx.data(), dx.size() * sizeof(float)) == 0 &&
               std::memcmp(dw.data(), ref_dw.data(), dw.size() * sizeof(float)) == 0 &&
               std::memcmp(db.data(), ref_db.data(), db.size() * sizeof(float)) == 0,
           "%d threads give other bits than 1 thread", threads);
  }
}

// The forward (statistics, output with and without ReLU, running statistics) against double
// loops, then the backward with the ReLU mask against the plain backward of the masked gradient.
void test_forward_and_relu(int64_t rows, int64_t c, int threads) {
  std::mt19937 rng(static_cast<unsigned>(rows * 7 + c));
  const Problem p = make(rows, c, rng);
  std::vector<float> y(rows * c), y_relu(rows * c), mean(c), invstd(c), rm(c, 0.5f), rv(c, 2.0f);
  std::vector<float> rm2(rm), rv2(rv), mean2(c), invstd2(c);
  const float momentum = 0.1f, eps = 1e-5f;
  mgm_fast::cpu::batch_norm_forward_channels_last(p.x.data(), rows, c, p.weight.data(), p.invstd.data(), nullptr, eps, false,
                                                  y.data(), mean.data(), invstd.data(), rm.data(), rv.data(),
                                                  momentum, threads);
  mgm_fast::cpu::batch_norm_forward_channels_last(p.x.data(), rows, c, p.weight.data(), p.invstd.data(), nullptr, eps, true,
                                                  y_relu.data(), mean2.data(), invstd2.data(), rm2.data(), rv2.data(),
                                                  momentum, threads);
  double worst = 0.0, worst_stat = 0.0;
  for (int64_t k = 0; k < c; ++k) {
    double m = 0.0, v = 0.0;
    for (int64_t r = 0; r < rows; ++r) m += p.x[r * c + k];
    m /= rows;
    for (int64_t r = 0; r < rows; ++r) v += (p.x[r * c + k] - m) * (p.x[r * c + k] - m);
    v /= rows;
    const double s = 1.0 / std::sqrt(v + eps);
    const double unbiased = rows > 1 ? v * rows / (rows - 1) : v;
    worst_stat = std::max({worst_stat, std::fabs(mean[k] - m) / (1.0 + std::fabs(m)), std::fabs(invstd[k] - s) / s,
                           std::fabs(rm[k] - (0.9 * 0.5 + 0.1 * m)) / (1.0 + std::fabs(m)),
                           std::fabs(rv[k] - (0.9 * 2.0 + 0.1 * unbiased)) / (1.0 + unbiased)});
    for (int64_t r = 0; r < rows; ++r) {
      const double want = (p.x[r * c + k] - m) * s * p.weight[k] + p.invstd[k];  // invstd as a bias: any values
      worst = std::max(worst, std::fabs(y[r * c + k] - want) / (1.0 + std::fabs(want)));
      EXPECT(y_relu[r * c + k] == std::max(y[r * c + k], 0.0f), "relu output differs at %lld",
             static_cast<long long>(r * c + k));
    }
  }
  EXPECT(worst < 1e-5, "rows %lld C %lld: forward error %g", static_cast<long long>(rows), static_cast<long long>(c),
         worst);
  EXPECT(worst_stat < 1e-5, "rows %lld C %lld: statistics error %g", static_cast<long long>(rows),
         static_cast<long long>(c), worst_stat);
  EXPECT(std::memcmp(mean.data(), mean2.data(), c * sizeof(float)) == 0 &&
             std::memcmp(invstd.data(), invstd2.data(), c * sizeof(float)) == 0,
         "the ReLU changed the statistics");

  // Backward through the ReLU == the plain backward of the gradient zeroed where y_relu <= 0.
  std::vector<float> masked(p.dy);
  for (int64_t i = 0; i < rows * c; ++i)
    if (!(y_relu[i] > 0.0f)) masked[i] = 0.0f;
  std::vector<float> dx(rows * c), dw(c), db(c), dx_m(rows * c), dw_m(c), db_m(c);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, mean.data(), invstd.data(),
                                                   p.weight.data(), y_relu.data(), dx.data(), dw.data(), db.data(), nullptr,
                                                   threads);
  mgm_fast::cpu::batch_norm_backward_channels_last(masked.data(), p.x.data(), rows, c, mean.data(), invstd.data(),
                                                   p.weight.data(), nullptr, dx_m.data(), dw_m.data(), db_m.data(), nullptr,
                                                   threads);
  EXPECT(std::memcmp(dx.data(), dx_m.data(), dx.size() * sizeof(float)) == 0 &&
             std::memcmp(dw.data(), dw_m.data(), dw.size() * sizeof(float)) == 0 &&
             std::memcmp(db.data(), db_m.data(), db.size() * sizeof(float)) == 0,
         "rows %lld C %lld: the ReLU backward differs from the backward of the masked gradient",
         static_cast<long long>(rows), static_cast<long long>(c));
}

// A residual added before the ReLU: the forward equals the plain forward plus the residual then
// the ReLU (recomputed here from its statistics), and the residual's gradient is the masked dy,
// with and without the input gradient.
void test_residual(int64_t rows, int64_t c, int threads) {
  std::mt19937 rng(static_cast<unsigned>(rows * 3 + c));
  const Problem p = make(rows, c, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> res(rows * c);
  for (float& v : res) v = normal(rng);
  std::vector<float> y(rows * c), y_res(rows * c), mean(c), invstd(c);
  mgm_fast::cpu::batch_norm_forward_channels_last(p.x.data(), rows, c, p.weight.data(), p.invstd.data(), nullptr,
                                                  1e-5f, false, y.data(), mean.data(), invstd.data(), nullptr,
                                                  nullptr, 0.1f, threads);
  mgm_fast::cpu::batch_norm_forward_channels_last(p.x.data(), rows, c, p.weight.data(), p.invstd.data(), res.data(),
                                                  1e-5f, true, y_res.data(), mean.data(), invstd.data(), nullptr,
                                                  nullptr, 0.1f, threads);
  double worst = 0.0;
  for (int64_t i = 0; i < rows * c; ++i)
    worst = std::max(worst, std::fabs(y_res[i] - std::max(y[i] + res[i], 0.0f)) / (1.0 + std::fabs(y[i])));
  EXPECT(worst < 1e-6, "rows %lld C %lld: residual forward error %g", static_cast<long long>(rows),
         static_cast<long long>(c), worst);
  std::vector<float> dx(rows * c), dx2(rows * c), dres(rows * c, -7.0f), dres_only(rows * c, -7.0f);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, mean.data(), invstd.data(),
                                                   p.weight.data(), y_res.data(), dx.data(), nullptr, nullptr,
                                                   dres.data(), threads);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, mean.data(), invstd.data(),
                                                   p.weight.data(), y_res.data(), dx2.data(), nullptr, nullptr,
                                                   nullptr, threads);
  mgm_fast::cpu::batch_norm_backward_channels_last(p.dy.data(), p.x.data(), rows, c, mean.data(), invstd.data(),
                                                   p.weight.data(), y_res.data(), nullptr, nullptr, nullptr,
                                                   dres_only.data(), threads);
  bool mask_ok = true;
  for (int64_t i = 0; i < rows * c; ++i) mask_ok &= dres[i] == (y_res[i] > 0.0f ? p.dy[i] : 0.0f);
  EXPECT(mask_ok, "rows %lld C %lld: the residual's gradient is not the masked dy", static_cast<long long>(rows),
         static_cast<long long>(c));
  EXPECT(std::memcmp(dres.data(), dres_only.data(), dres.size() * sizeof(float)) == 0,
         "the residual's gradient alone differs");
  EXPECT(std::memcmp(dx.data(), dx2.data(), dx.size() * sizeof(float)) == 0,
         "the input gradient changes when the residual's is written too");
}

void test_empty_batch() {
  float mean = 0.0f, invstd = 1.0f, dw = -7.0f, db = -7.0f;
  mgm_fast::cpu::batch_norm_backward_channels_last(nullptr, nullptr, 0, 1, &mean, &invstd, nullptr, nullptr, nullptr,
                                                   &dw, &db, nullptr, 1);
  EXPECT(dw == 0.0f && db == 0.0f, "empty batch: grad_weight %g, grad_bias %g (want 0)", dw, db);
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_batch_norm"); status >= 0) return status;
  for (int64_t c : {1, 3, 8, 16, 24, 40}) {
    for (int64_t rows : {1, 5, 2 * 7 * 7, 8 * 32 * 32 + 1}) {
      test_values(rows, c, true, rows > 1000 ? 2 : 1);
    }
    test_values(300, c, false, 1);
  }
  for (int64_t c : {3, 8, 24}) {
    test_forward_and_relu(5, c, 1);
    test_forward_and_relu(8 * 32 * 32 + 1, c, 2);
  }
  test_residual(37, 24, 1);
  test_residual(8 * 16 * 16 + 5, 16, 2);
  test_thread_count_invariance();
  test_empty_batch();
  std::printf("test_batch_norm: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
