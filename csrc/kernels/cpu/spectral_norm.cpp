// Spectral normalisation on the CPU (contracts in spectral_norm.h).
#include "spectral_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/threads.h"

namespace mgm_fast {
namespace cpu {
namespace {

// Below this many weight elements a product runs on one thread: the fork costs more.
constexpr int64_t kParallelElements = 1 << 15;

int threads_for(const SpectralNormMatrix& m, int num_threads) {
  return m.rows * m.cols >= kParallelElements ? resolve_threads(num_threads) : 1;
}

int64_t offset_of(const SpectralNormMatrix& m, int64_t c) {
  return m.col_offset == nullptr ? c : m.col_offset[c];
}

// x (cols, logical order) -> x_mem (memory order of a row's block).
void to_memory_order(const SpectralNormMatrix& m, const double* x, double* x_mem) {
  for (int64_t c = 0; c < m.cols; ++c) x_mem[offset_of(m, c)] = x[c];
}

// out = W x_mem, one double dot product per row.
void matvec(const SpectralNormMatrix& m, const double* x_mem, double* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* row = m.w + r * m.row_stride;
    double acc = 0.0;
    for (int64_t j = 0; j < m.cols; ++j) acc += static_cast<double>(row[j]) * x_mem[j];
    out[r] = acc;
  }
}

// out_mem = W^T y (memory order): each thread sums a block of columns over every row, so the
// sum of each column runs over rows in order whatever the thread count.
void matvec_transposed(const SpectralNormMatrix& m, const double* y, double* out_mem, int threads) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (m.cols + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock;
    const int64_t j1 = std::min(m.cols, j0 + kBlock);
    double* acc = out_mem + j0;
    std::fill(acc, acc + (j1 - j0), 0.0);
    for (int64_t r = 0; r < m.rows; ++r) {
      const float* row = m.w + r * m.row_stride;
      const double yr = y[r];
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(row[j]) * yr;
    }
  }
}

double norm(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

}  // namespace

void spectral_norm_power_iteration(const SpectralNormMatrix& m, float* u, float* v, int steps,
                                   float eps, float* sigma, int num_threads) {
  const int threads = threads_for(m, num_threads);
  std::vector<double> u_d(u, u + m.rows), v_d(v, v + m.cols), v_mem(m.cols), wv(m.rows);
  if (steps <= 0) {  // evaluation: sigma = u . (W v) from the stored vectors
    to_memory_order(m, v_d.data(), v_mem.data());
    matvec(m, v_mem.data(), wv.data(), threads);
    double s = 0.0;
    for (int64_t r = 0; r < m.rows; ++r) s += u_d[r] * wv[r];
    *sigma = static_cast<float>(s);
    return;
  }
  double wv_norm = 0.0, wv_clamped = 1.0;
  for (int step = 0; step < steps; ++step) {
    // The normalised vectors are rounded to float32 after each step, as the float32 buffers of
    // torch's iteration are.
    matvec_transposed(m, u_d.data(), v_mem.data(), threads);
    const double v_scale = 1.0 / std::max(norm(v_mem.data(), m.cols), static_cast<double>(eps));
    for (int64_t c = 0; c < m.cols; ++c) {
      v[c] = static_cast<float>(v_mem[offset_of(m, c)] * v_scale);
      v_d[c] = v[c];
    }
    to_memory_order(m, v_d.data(), v_mem.data());
    matvec(m, v_mem.data(), wv.data(), threads);
    wv_norm = norm(wv.data(), m.rows);
    wv_clamped = std::max(wv_norm, static_cast<double>(eps));
    for (int64_t r = 0; r < m.rows; ++r) {
      u[r] = static_cast<float>(wv[r] / wv_clamped);
      u_d[r] = u[r];
    }
  }
  *sigma = static_cast<float>(wv_norm * wv_norm / wv_clamped);
}

void spectral_norm_weight_grad(const SpectralNormMatrix& m, const float* g, const float* u,
                               const float* v, float sigma, float* grad_w, int num_threads) {
  const int threads = threads_for(m, num_threads);
  std::vector<double> v_d(v, v + m.cols), v_mem(m.cols);
  to_memory_order(m, v_d.data(), v_mem.data());
  // <g, W>, one partial per row, summed in row order (thread-count independent)
  std::vector<double> partial(m.rows);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* gr = g + r * m.row_stride;
    const float* wr = m.w + r * m.row_stride;
    double acc = 0.0;
    for (int64_t j = 0; j < m.cols; ++j) acc += static_cast<double>(gr[j]) * wr[j];
    partial[r] = acc;
  }
  double inner = 0.0;
  for (int64_t r = 0; r < m.rows; ++r) inner += partial[r];
  const double s = sigma;
  const double coef = inner / (s * s);
  const double inv_sigma = 1.0 / s;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* gr = g + r * m.row_stride;
    float* out = grad_w + r * m.row_stride;
    const double cu = coef * u[r];
    for (int64_t j = 0; j < m.cols; ++j) out[j] = static_cast<float>(gr[j] * inv_sigma - cu * v_mem[j]);
  }
}

}  // namespace cpu
}  // namespace mgm_fast
