// Unit tests of the torch-free CPU NT-Xent kernel (csrc/kernels/cpu/ntxent.*) against naive
// double-precision loops, on small random inputs: loss, per-row LSE, both gradients, odd sizes,
// row subsets and strides, zero rows, temperatures, thread-count invariance, the exp helper.
// Built and run by CMake/ctest; a failed EXPECT prints where and why, main returns 1.
#include "kernels/cpu/ntxent.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

using mgm_fast::cpu::NtxentProblem;

namespace {

bool close(double got, double want, double rtol, double atol) {
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

struct Naive {
  double loss = 0.0;
  std::vector<double> lse, grad_rows, grad_cols;
};

// The formulas of ntxent.h in double, straight from the definitions.
Naive naive(const std::vector<float>& rows, int64_t rs, const std::vector<float>& cols,
            int64_t cs, const std::vector<int64_t>& index, int64_t R, int64_t N2, int64_t D,
            double tau, double g) {
  auto normalise = [&](const std::vector<float>& x, int64_t stride, int64_t n,
                       std::vector<double>& u, std::vector<double>& inv) {
    u.assign(static_cast<size_t>(n * D), 0.0);
    inv.assign(static_cast<size_t>(n), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      double sq = 0.0;
      for (int64_t d = 0; d < D; ++d) sq += double(x[i * stride + d]) * x[i * stride + d];
      const double f = 1.0 / std::max(std::sqrt(sq), 1e-12);
      inv[i] = f;
      for (int64_t d = 0; d < D; ++d) u[i * D + d] = x[i * stride + d] * f;
    }
  };
  std::vector<double> ur, uc, inv_r, inv_c;
  normalise(rows, rs, R, ur, inv_r);
  normalise(cols, cs, N2, uc, inv_c);
  Naive out;
  out.lse.assign(static_cast<size_t>(R), 0.0);
  std::vector<double> ds(static_cast<size_t>(R * N2), 0.0);
  for (int64_t i = 0; i < R; ++i) {
    std::vector<double> s(static_cast<size_t>(N2));
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < N2; ++k) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += ur[i * D + d] * uc[k * D + d];
      s[k] = dot / tau;
      if (k != index[i]) m = std::max(m, s[k]);
    }
    double sum = 0.0;
    for (int64_t k = 0; k < N2; ++k)
      if (k != index[i]) sum += std::exp(s[k] - m);
    const double lse = m + std::log(sum);
    const int64_t pos = (index[i] + N2 / 2) % N2;
    out.lse[i] = lse;
    out.loss += lse - s[pos];
    for (int64_t k = 0; k < N2; ++k) {
      if (k == index[i]) continue;
      ds[i * N2 + k] = g * (std::exp(s[k] - lse) - (k == pos ? 1.0 : 0.0));
    }
  }
  auto backward = [&](bool by_rows, std::vector<double>& grad) {
    const int64_t n = by_rows ? R : N2;
    const std::vector<double>& u = by_rows ? ur : uc;
    const std::vector<double>& other = by_rows ? uc : ur;
    const std::vector<double>& inv = by_rows ? inv_r : inv_c;
    grad.assign(static_cast<size_t>(n * D), 0.0);
    for (int64_t a = 0; a < n; ++a) {
      std::vector<double> du(static_cast<size_t>(D), 0.0);
      const int64_t m = by_rows ? N2 : R;
      for (int64_t b = 0; b < m; ++b) {
        const double w = by_rows ? ds[a * N2 + b] : ds[b * N2 + a];
        for (int64_t d = 0; d < D; ++d) du[d] += w * other[b * D + d] / tau;
      }
      double proj = 0.0;
      for (int64_t d = 0; d < D; ++d) proj += u[a * D + d] * du[d];
      for (int64_t d = 0; d < D; ++d) grad[a * D + d] = (du[d] - u[a * D + d] * proj) * inv[a];
    }
  };
  backward(true, out.grad_rows);
  backward(false, out.grad_cols);
  return out;
}

struct Case {
  const char* name;
  int64_t R, N2, D, row_pad, col_pad;
  double tau;
  bool subset;      // rows are a random subset of the columns (else all, in order)
  bool zero_row;    // one row (and its column) all zeros
};

void run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rs = c.D + c.row_pad, cs = c.D + c.col_pad;
  std::vector<float> cols(static_cast<size_t>(c.N2 * cs));
  for (float& v : cols) v = normal(rng);
  std::vector<int64_t> index(static_cast<size_t>(c.R));
  if (c.subset) {
    std::vector<int64_t> perm(static_cast<size_t>(c.N2));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t i = 0; i < c.R; ++i) index[i] = perm[i];
  } else {
    std::iota(index.begin(), index.end(), 0);
  }
  std::vector<float> rows(static_cast<size_t>(c.R * rs));
  for (int64_t i = 0; i < c.R; ++i)  // the rows ARE their columns (the usual all-gather case)
    for (int64_t d = 0; d < c.D; ++d) rows[i * rs + d] = cols[index[i] * cs + d];
  if (c.zero_row) {
    for (int64_t d = 0; d < c.D; ++d) {
      rows[0 * rs + d] = 0.0f;
      cols[index[0] * cs + d] = 0.0f;
    }
  }
  NtxentProblem p;
  p.rows = rows.data();
  p.rows_stride = rs;
  p.cols = cols.data();
  p.cols_stride = cs;
  p.row_index = index.data();
  p.num_rows = c.R;
  p.num_cols = c.N2;
  p.dim = c.D;
  p.temperature = static_cast<float>(c.tau);
  EXPECT(mgm_fast::cpu::ntxent_bad_row(p) == -1, "%s: valid indices flagged", c.name);

  const double g = 0.75;
  const Naive want = naive(rows, rs, cols, cs, index, c.R, c.N2, c.D, c.tau, g);
  std::vector<float> lse(static_cast<size_t>(c.R), std::nanf(""));
  const double loss = mgm_fast::cpu::ntxent_forward(p, lse.data(), 2);
  EXPECT(close(loss, want.loss, 2e-5, 2e-5 * c.R), "%s: loss %.9g vs %.9g", c.name, loss, want.loss);
  for (int64_t i = 0; i < c.R; ++i) {
    EXPECT(close(lse[i], want.lse[i], 2e-6, 2e-6), "%s: lse[%lld] %.9g vs %.9g", c.name,
           static_cast<long long>(i), lse[i], want.lse[i]);
  }
  std::vector<float> gr(static_cast<size_t>(c.R * c.D), std::nanf(""));
  std::vector<float> gc(static_cast<size_t>(c.N2 * c.D), std::nanf(""));
  mgm_fast::cpu::ntxent_backward(p, lse.data(), static_cast<float>(g), gr.data(), gc.data(), 2);
  // per gradient row: relative 1e-4 plus 2e-6 of the row's largest entry (a zero row's
  // gradient is ~1e12 times larger than the others: x / max(||x||, 1e-12))
  auto count_bad = [&](const std::vector<float>& got, const std::vector<double>& ref) {
    int bad = 0;
    for (size_t r = 0; r < got.size() / static_cast<size_t>(c.D); ++r) {
      double scale = 0.0;
      for (int64_t d = 0; d < c.D; ++d) scale = std::max(scale, std::fabs(ref[r * c.D + d]));
      for (int64_t d = 0; d < c.D; ++d)
        bad += !close(got[r * c.D + d], ref[r * c.D + d], 1e-4, 2e-6 * scale + 1e-9);
    }
    return bad;
  };
  const int bad_rows = count_bad(gr, want.grad_rows), bad_cols = count_bad(gc, want.grad_cols);
  EXPECT(bad_rows == 0 && bad_cols == 0, "%s: %d row / %d column gradient elements off", c.name,
         bad_rows, bad_cols);

  // one thread gives the same bits
  std::vector<float> lse1(lse.size()), gr1(gr.size()), gc1(gc.size());
  const double loss1 = mgm_fast::cpu::ntxent_forward(p, lse1.data(), 1);
  mgm_fast::cpu::ntxent_backward(p, lse1.data(), static_cast<float>(g), gr1.data(), gc1.data(), 1);
  EXPECT(loss1 == loss && lse1 == lse && gr1 == gr && gc1 == gc, "%s: differs with 1 thread", c.name);

  // only one side requested: the same values
  std::vector<float> gc_only(gc.size(), std::nanf(""));
  mgm_fast::cpu::ntxent_backward(p, lse.data(), static_cast<float>(g), nullptr, gc_only.data(), 2);
  EXPECT(gc_only == gc, "%s: grad_cols alone differs", c.name);
}

void test_exp() {
  double worst = 0.0;
  for (float x = -103.0f; x <= 0.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    const double got = mgm_fast::cpu::ntxent_exp(x);
    if (want > 1e-37) worst = std::max(worst, std::fabs(got - want) / want);
  }
  EXPECT(worst < 4e-7, "exp relative error %.3g", worst);
  EXPECT(mgm_fast::cpu::ntxent_exp(-std::numeric_limits<float>::infinity()) == 0.0f, "exp(-inf)");
  EXPECT(mgm_fast::cpu::ntxent_exp(-200.0f) == 0.0f, "exp(-200)");
  EXPECT(mgm_fast::cpu::ntxent_exp(0.0f) == 1.0f, "exp(0)");
  EXPECT(mgm_fast::cpu::ntxent_exp(-104.0f) == 0.0f, "exp(-104) rounds to 0");
  EXPECT(mgm_fast::cpu::ntxent_exp(-103.5f) > 0.0f, "exp(-103.5) is a subnormal, not 0");
  EXPECT(std::isnan(mgm_fast::cpu::ntxent_exp(std::nanf(""))), "exp(NaN) must be NaN");
}

void test_bad_index() {
  std::vector<float> x(8, 1.0f);
  std::vector<int64_t> index = {0, 4};
  NtxentProblem p;
  p.rows = x.data();
  p.rows_stride = 2;
  p.cols = x.data();
  p.cols_stride = 2;
  p.row_index = index.data();
  p.num_rows = 2;
  p.num_cols = 4;
  p.dim = 2;
  EXPECT(mgm_fast::cpu::ntxent_bad_row(p) == 1, "index 4 of 2N = 4 not flagged");
  index[1] = -1;
  EXPECT(mgm_fast::cpu::ntxent_bad_row(p) == 1, "index -1 not flagged");
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_ntxent"); status >= 0) return status;
  std::mt19937 rng(1234);
  const Case cases[] = {
      {"2N=2 D=1", 2, 2, 1, 0, 0, 0.5, false, false},
      {"2N=10 subset", 7, 10, 5, 0, 0, 0.5, true, false},
      {"2N=38 D=33 strided", 38, 38, 33, 3, 7, 0.5, false, false},
      {"2N=64 D=64 tau=0.1", 64, 64, 64, 0, 0, 0.1, false, false},
      {"2N=50 rows=1", 1, 50, 17, 0, 0, 0.5, true, false},
      {"zero row", 6, 12, 9, 0, 0, 0.5, true, true},
      {"2N=130 D=20 tau=2", 33, 130, 20, 0, 1, 2.0, true, false},
      {"2N=256 D=32 parallel", 200, 256, 32, 0, 0, 0.5, true, false},  // above kParallelWork
  };
  for (const Case& c : cases) run_case(c, rng);
  test_exp();
  test_bad_index();
  std::printf("test_ntxent: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
