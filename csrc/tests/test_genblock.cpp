// Unit tests of the torch-free GenBlock CPU kernels (csrc/kernels/cpu/genblock.*) against naive
// double-precision loops on small random inputs: statistics, prologue, the phase decomposition
// of nearest-2x + conv3x3 (against the direct convolution of the upsampled map) in the padded
// and the compact (per-phase GEMM, im2col) layouts, epilogues with full and half-size residuals,
// the backward kernels (against the formulas, and the scatter / col2im as the adjoints of the
// interleave / im2col), both layouts, and bit-identical results for 1 and 3 threads.
// Built and run by CMake/ctest; main returns 1 if any check failed.
#include "kernels/cpu/genblock.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace g = mgm_fast::cpu::genblock;
using g::Dims;
using g::Layout;

namespace {

std::mt19937 g_rng(1234);

std::vector<float> randn(size_t n, float scale = 1.0f, float shift = 0.0f) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g_rng) * scale + shift;
  return v;
}

// Logical (b, c, y, x) access into a dense tensor of either layout.
struct T4 {
  std::vector<float> v;
  Dims d;
  Layout l;
  T4(Dims dims, Layout layout) : v(static_cast<size_t>(dims.numel())), d(dims), l(layout) {}
  float& at(int64_t b, int64_t c, int64_t y, int64_t x) {
    return v[static_cast<size_t>(g::offset(l, d, b, c, y, x))];
  }
  float at(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return v[static_cast<size_t>(g::offset(l, d, b, c, y, x))];
  }
  g::View<const float> cv() const { return {v.data(), d, l}; }
  g::View<float> mv() { return {v.data(), d, l}; }
};

T4 random4(Dims d, Layout l, float scale = 1.0f, float shift = 0.0f) {
  T4 t(d, l);
  t.v = randn(static_cast<size_t>(d.numel()), scale, shift);
  return t;
}

double max_rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double scale = 1e-6, err = 0.0;
  for (double w : want) scale = std::fmax(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) err = std::fmax(err, std::fabs(got[i] - want[i]));
  return err / scale;
}

std::vector<double> logical(const T4& t) {
  std::vector<double> out;
  for (int64_t b = 0; b < t.d.n; ++b)
    for (int64_t c = 0; c < t.d.c; ++c)
      for (int64_t y = 0; y < t.d.h; ++y)
        for (int64_t x = 0; x < t.d.w; ++x) out.push_back(t.at(b, c, y, x));
  return out;
}

const Layout kLayouts[2] = {Layout::kPlanes, Layout::kPixels};
const char* name(Layout l) { return l == Layout::kPlanes ? "planes" : "pixels"; }

// ---------------------------------------------------------------------------------------------

void test_stats_and_prologue() {
  for (Layout l : kLayouts) {
    const Dims d{3, 5, 9, 7};
    T4 x = random4(d, l, 2.0f, 40.0f);  // |mean| >> std: the shifted sums must not cancel
    std::vector<double> mean(5), var(5), mean3(5), var3(5);
    g::channel_stats(x.cv(), mean.data(), var.data(), 1);
    g::channel_stats(x.cv(), mean3.data(), var3.data(), 3);
    for (int64_t c = 0; c < d.c; ++c) {
      double s = 0, s2 = 0, n = 0;
      for (int64_t b = 0; b < d.n; ++b)
        for (int64_t y = 0; y < d.h; ++y)
          for (int64_t xx = 0; xx < d.w; ++xx) s += x.at(b, c, y, xx), n += 1;
      const double m = s / n;
      for (int64_t b = 0; b < d.n; ++b)
        for (int64_t y = 0; y < d.h; ++y)
          for (int64_t xx = 0; xx < d.w; ++xx) s2 += (x.at(b, c, y, xx) - m) * (x.at(b, c, y, xx) - m);
      EXPECT(std::fabs(mean[c] - m) <= 1e-9 * std::fabs(m), "%s mean %g vs %g", name(l), mean[c], m);
      EXPECT(std::fabs(var[c] - s2 / n) <= 1e-6 * (s2 / n), "%s var %g vs %g", name(l), var[c], s2 / n);
      EXPECT(mean[c] == mean3[c] && var[c] == var3[c], "%s stats differ for 3 threads", name(l));
    }

    // scale/shift and the prologue (read either layout, write either, plus the copy)
    std::vector<float> gam = randn(3 * 5, 0.3f, 1.0f), bet = randn(3 * 5, 0.3f);
    std::vector<double> rstd(5);
    std::vector<float> scale(15), shift(15);
    g::scale_shift(gam.data(), bet.data(), 5, 3, 5, mean.data(), var.data(), 1e-5, rstd.data(),
                   scale.data(), shift.data());
    for (Layout lo : kLayouts) {
      T4 out(d, lo), copy(d, lo == Layout::kPixels ? Layout::kPlanes : Layout::kPixels);
      g::affine_relu(x.cv(), scale.data(), shift.data(), out.mv(), copy.mv(), 2);
      double err = 0.0;
      bool copied = true;
      for (int64_t b = 0; b < d.n; ++b)
        for (int64_t c = 0; c < d.c; ++c)
          for (int64_t y = 0; y < d.h; ++y)
            for (int64_t xx = 0; xx < d.w; ++xx) {
              const double z = gam[b * 5 + c] * (x.at(b, c, y, xx) - mean[c]) / std::sqrt(var[c] + 1e-5) +
                               bet[b * 5 + c];
              err = std::fmax(err, std::fabs(out.at(b, c, y, xx) - std::fmax(z, 0.0)));
              copied = copied && copy.at(b, c, y, xx) == x.at(b, c, y, xx);
            }
      EXPECT(err < 1e-3, "prologue %s->%s error %g", name(l), name(lo), err);
      EXPECT(copied, "prologue copy %s->%s differs", name(l), name(lo));
    }
  }
}

// Naive nearest-2x + conv3x3 (padding 1) of a (n, ci, h, w), double.
double direct_up_conv(const T4& a, const std::vector<float>& w, int64_t co, int64_t b, int64_t o,
                      int64_t Y, int64_t X) {
  double acc = 0.0;
  const int64_t ci = a.d.c;
  for (int64_t c = 0; c < ci; ++c)
    for (int64_t ky = 0; ky < 3; ++ky)
      for (int64_t kx = 0; kx < 3; ++kx) {
        const int64_t uy = Y + ky - 1, ux = X + kx - 1;
        if (uy < 0 || ux < 0 || uy >= 2 * a.d.h || ux >= 2 * a.d.w) continue;
        acc += static_cast<double>(w[((o * ci + c) * 3 + ky) * 3 + kx]) * a.at(b, c, uy / 2, ux / 2);
      }
  (void)co;
  return acc;
}

void test_phase_forward() {
  for (bool wp_cl : {false, true}) {
    for (Layout lo : kLayouts) {
      const int64_t n = 2, ci = 3, co = 4, h = 5, w = 3;
      T4 a = random4({n, ci, h, w}, Layout::kPixels);
      std::vector<float> wt = randn(static_cast<size_t>(co * ci * 9), 0.4f);
      std::vector<float> wp(static_cast<size_t>(4 * co * ci * 4));
      g::phase_weights(wt.data(), co, ci, wp.data(), wp_cl);
      auto wp_at = [&](int64_t row, int64_t c, int64_t r, int64_t s) {
        return wp_cl ? wp[static_cast<size_t>(((row * 2 + r) * 2 + s) * ci + c)]
                     : wp[static_cast<size_t>(((row * ci + c) * 2 + r) * 2 + s)];
      };
      // P = conv2x2(a, wp, padding 1): (n, 4co, h+1, w+1) in pixels, naive
      T4 p({n, 4 * co, h + 1, w + 1}, Layout::kPixels);
      for (int64_t b = 0; b < n; ++b)
        for (int64_t row = 0; row < 4 * co; ++row)
          for (int64_t i = 0; i <= h; ++i)
            for (int64_t j = 0; j <= w; ++j) {
              double acc = 0.0;
              for (int64_t c = 0; c < ci; ++c)
                for (int64_t r = 0; r < 2; ++r)
                  for (int64_t s = 0; s < 2; ++s) {
                    const int64_t yy = i + r - 1, xx = j + s - 1;
                    if (yy < 0 || xx < 0 || yy >= h || xx >= w) continue;
                    acc += wp_at(row, c, r, s) * a.at(b, c, yy, xx);
                  }
              p.at(b, row, i, j) = static_cast<float>(acc);
            }
      std::vector<float> bias = randn(static_cast<size_t>(co));
      T4 res = random4({n, co, h, w}, Layout::kPlanes);  // half-size residual
      g::Epilogue<float> ep;
      ep.bias = bias.data();
      ep.residual = res.cv();
      ep.residual_half = true;
      T4 out({n, co, 2 * h, 2 * w}, lo);
      std::vector<double> mean(4), var(4), mean3(4), var3(4);
      g::phase_epilogue(p.v.data(), {n, co, h, w}, ep, out.mv(), mean.data(), var.data(), 1);
      T4 out3({n, co, 2 * h, 2 * w}, lo);
      g::phase_epilogue(p.v.data(), {n, co, h, w}, ep, out3.mv(), mean3.data(), var3.data(), 3);
      std::vector<double> want;
      for (int64_t b = 0; b < n; ++b)
        for (int64_t o = 0; o < co; ++o)
          for (int64_t Y = 0; Y < 2 * h; ++Y)
            for (int64_t X = 0; X < 2 * w; ++X)
              want.push_back(direct_up_conv(a, wt, co, b, o, Y, X) + bias[o] + res.at(b, o, Y / 2, X / 2));
      const double err = max_rel_err(logical(out), want);
      EXPECT(err < 1e-5, "phase epilogue (wp %s, out %s) vs direct up+conv: %g", wp_cl ? "cl" : "nchw",
             name(lo), err);
      EXPECT(out.v == out3.v && mean == mean3 && var == var3, "phase epilogue differs for 3 threads");
      for (int64_t o = 0; o < co; ++o) {
        double s = 0.0, s2 = 0.0;
        const double cnt = static_cast<double>(n * 4 * h * w);
        for (int64_t b = 0; b < n; ++b)
          for (int64_t Y = 0; Y < 2 * h; ++Y)
            for (int64_t X = 0; X < 2 * w; ++X) s += out.at(b, o, Y, X);
        for (int64_t b = 0; b < n; ++b)
          for (int64_t Y = 0; Y < 2 * h; ++Y)
            for (int64_t X = 0; X < 2 * w; ++X) s2 += std::pow(out.at(b, o, Y, X) - s / cnt, 2);
        // chunks of kRows rows accumulate in float, chunks combine in double
        EXPECT(std::fabs(mean[o] - s / cnt) < 1e-6 * (1 + std::fabs(s / cnt)) &&
                   std::fabs(var[o] - s2 / cnt) < 1e-6 * (1 + s2 / cnt),
               "fused statistics of the epilogue output (channel %lld): %g %g vs %g %g",
               static_cast<long long>(o), mean[o], var[o], s / cnt, s2 / cnt);
      }
      // phase_weights_backward is the adjoint of phase_weights: <wp(w), d> = <w, wp^T(d)>
      std::vector<float> d = randn(wp.size()), dw(wt.size());
      g::phase_weights_backward(d.data(), co, ci, dw.data(), wp_cl);
      double lhs = 0.0, rhs = 0.0;
      for (size_t i = 0; i < wp.size(); ++i) lhs += static_cast<double>(wp[i]) * d[i];
      for (size_t i = 0; i < wt.size(); ++i) rhs += static_cast<double>(wt[i]) * dw[i];
      EXPECT(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "phase weights adjoint %g vs %g", lhs, rhs);
    }
  }
}

// The compact phase conv: im2col, one naive GEMM per phase with the channels_last phase
// weights viewed as (4, co, 4 ci), the compact interleave -- against the direct up + conv.
void test_compact_phase_forward() {
  for (Layout la : kLayouts) {
    for (Layout lo : kLayouts) {
      for (int64_t h : {4, 1, 3}) {
        const int64_t n = 2, ci = 3, co = 5, w = h == 1 ? 2 : 5;
        T4 a = random4({n, ci, h, w}, la);
        std::vector<float> wt = randn(static_cast<size_t>(co * ci * 9), 0.4f);
        std::vector<float> wp(static_cast<size_t>(4 * co * ci * 4)), wp3(wp.size());
        g::phase_weights(wt.data(), co, ci, wp.data(), true, 1);
        g::phase_weights(wt.data(), co, ci, wp3.data(), true, 3);
        EXPECT(wp == wp3, "phase weights differ for 3 threads");
        const int64_t m = n * h * w, k = 4 * ci;
        std::vector<float> cols(static_cast<size_t>(4 * m * k), -3.0f), cols3(cols.size(), 4.0f);
        g::phase_im2col(a.cv(), cols.data(), 1);
        g::phase_im2col(a.cv(), cols3.data(), 3);
        EXPECT(cols == cols3, "im2col differs for 3 threads");
        std::vector<float> p(static_cast<size_t>(4 * m * co));
        for (int64_t ph = 0; ph < 4; ++ph)
          for (int64_t r = 0; r < m; ++r)
            for (int64_t o = 0; o < co; ++o) {
              double acc = 0.0;
              for (int64_t kk = 0; kk < k; ++kk)
                acc += static_cast<double>(cols[static_cast<size_t>((ph * m + r) * k + kk)]) *
                       wp[static_cast<size_t>((ph * co + o) * k + kk)];
              p[static_cast<size_t>((ph * m + r) * co + o)] = static_cast<float>(acc);
            }
        std::vector<float> bias = randn(static_cast<size_t>(co));
        g::Epilogue<float> ep;
        ep.bias = bias.data();
        T4 out({n, co, 2 * h, 2 * w}, lo), out3({n, co, 2 * h, 2 * w}, lo);
        std::vector<double> mean(static_cast<size_t>(co)), var(mean.size()), mean3(mean.size()), var3(mean.size());
        g::phase_epilogue(p.data(), {n, co, h, w}, ep, out.mv(), mean.data(), var.data(), 1,
                          g::PhaseLayout::kCompact);
        g::phase_epilogue(p.data(), {n, co, h, w}, ep, out3.mv(), mean3.data(), var3.data(), 3,
                          g::PhaseLayout::kCompact);
        std::vector<double> want;
        for (int64_t b = 0; b < n; ++b)
          for (int64_t o = 0; o < co; ++o)
            for (int64_t Y = 0; Y < 2 * h; ++Y)
              for (int64_t X = 0; X < 2 * w; ++X) want.push_back(direct_up_conv(a, wt, co, b, o, Y, X) + bias[o]);
        const double err = max_rel_err(logical(out), want);
        EXPECT(err < 1e-5, "compact phase conv (a %s, out %s, h %lld) vs direct up+conv: %g", name(la),
               name(lo), static_cast<long long>(h), err);
        EXPECT(out.v == out3.v && mean == mean3 && var == var3, "compact epilogue differs for 3 threads");
        const std::vector<double> got = logical(out);
        for (int64_t o = 0; o < co; ++o) {
          double s1 = 0.0;
          for (size_t i = 0; i < got.size(); ++i) {
            if ((static_cast<int64_t>(i) / (4 * h * w)) % co == o) s1 += got[i];
          }
          const double cnt = static_cast<double>(n * 4 * h * w);
          EXPECT(std::fabs(mean[o] - s1 / cnt) < 1e-6 * (1 + std::fabs(s1 / cnt)),
                 "compact epilogue mean (channel %lld): %g vs %g", static_cast<long long>(o), mean[o], s1 / cnt);
        }

        // col2im is the adjoint of im2col: <im2col(a), d> = <a, col2im(d)>
        std::vector<float> d = randn(cols.size());
        T4 da({n, ci, h, w}, la), da3({n, ci, h, w}, la);
        g::phase_col2im(d.data(), da.mv(), 1);
        g::phase_col2im(d.data(), da3.mv(), 3);
        double lhs = 0.0, rhs = 0.0;
        for (size_t i = 0; i < cols.size(); ++i) lhs += static_cast<double>(cols[i]) * d[i];
        for (size_t i = 0; i < a.v.size(); ++i) rhs += static_cast<double>(a.v[i]) * da.v[i];
        EXPECT(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "col2im adjoint (%s, h %lld): %g vs %g",
               name(la), static_cast<long long>(h), lhs, rhs);
        EXPECT(da.v == da3.v, "col2im differs for 3 threads");
      }
    }
  }
  // phase weights: both layouts hold the same taps, for any thread count
  const int64_t co = 3, ci = 7;
  std::vector<float> wt = randn(static_cast<size_t>(co * ci * 9));
  std::vector<float> cl(static_cast<size_t>(16 * co * ci)), pl(cl.size());
  g::phase_weights(wt.data(), co, ci, cl.data(), true, 2);
  g::phase_weights(wt.data(), co, ci, pl.data(), false, 1);
  bool same = true;
  for (int64_t row = 0; row < 4 * co; ++row)
    for (int64_t c = 0; c < ci; ++c)
      for (int64_t rs = 0; rs < 4; ++rs)
        same = same && cl[static_cast<size_t>((row * 4 + rs) * ci + c)] == pl[static_cast<size_t>((row * ci + c) * 4 + rs)];
  EXPECT(same, "phase weights: channels_last and NCHW differ");
  std::vector<float> dw1(wt.size()), dw2(wt.size());
  g::phase_weights_backward(cl.data(), co, ci, dw1.data(), true, 1);
  g::phase_weights_backward(pl.data(), co, ci, dw2.data(), false, 3);
  EXPECT(dw1 == dw2, "phase weights backward: layouts / thread counts differ");
}

// The 3x3 im2col in the (ci, tap) column order of a contiguous weight: one naive GEMM with the
// weight in place equals the direct conv (padding 1); col2im is its adjoint.
void test_conv3x3_im2col() {
  for (Layout la : kLayouts) {
    for (int64_t h : {5, 1, 2}) {
      const int64_t n = 2, ci = 3, co = 4, w = h == 1 ? 1 : 4, m = n * h * w, k = 9 * ci;
      T4 a = random4({n, ci, h, w}, la);
      std::vector<float> wt = randn(static_cast<size_t>(co * k), 0.4f);
      std::vector<float> cols(static_cast<size_t>(m * k), -3.0f), cols3(cols.size(), 4.0f);
      g::conv3x3_im2col(a.cv(), cols.data(), 1);
      g::conv3x3_im2col(a.cv(), cols3.data(), 3);
      EXPECT(cols == cols3, "conv3x3 im2col differs for 3 threads");
      double err = 0.0, scale = 1e-6;
      for (int64_t b = 0; b < n; ++b)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t x = 0; x < w; ++x)
            for (int64_t o = 0; o < co; ++o) {
              double got = 0.0, want = 0.0;
              for (int64_t kk = 0; kk < k; ++kk)
                got += static_cast<double>(cols[static_cast<size_t>(((b * h + y) * w + x) * k + kk)]) *
                       wt[static_cast<size_t>(o * k + kk)];
              for (int64_t c = 0; c < ci; ++c)
                for (int64_t ky = 0; ky < 3; ++ky)
                  for (int64_t kx = 0; kx < 3; ++kx) {
                    const int64_t yy = y + ky - 1, xx = x + kx - 1;
                    if (yy < 0 || xx < 0 || yy >= h || xx >= w) continue;
                    want += static_cast<double>(wt[static_cast<size_t>(((o * ci + c) * 3 + ky) * 3 + kx)]) *
                            a.at(b, c, yy, xx);
                  }
              err = std::fmax(err, std::fabs(got - want));
              scale = std::fmax(scale, std::fabs(want));
            }
      EXPECT(err / scale < 1e-6, "conv3x3 im2col GEMM (a %s, h %lld) vs direct conv: %g", name(la),
             static_cast<long long>(h), err / scale);
      std::vector<float> d = randn(cols.size());
      T4 da({n, ci, h, w}, la), da3({n, ci, h, w}, la);
      g::conv3x3_col2im(d.data(), da.mv(), 1);
      g::conv3x3_col2im(d.data(), da3.mv(), 3);
      double lhs = 0.0, rhs = 0.0;
      for (size_t i = 0; i < cols.size(); ++i) lhs += static_cast<double>(cols[i]) * d[i];
      for (size_t i = 0; i < a.v.size(); ++i) rhs += static_cast<double>(a.v[i]) * da.v[i];
      EXPECT(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "conv3x3 col2im adjoint (%s, h %lld): %g vs %g",
             name(la), static_cast<long long>(h), lhs, rhs);
      EXPECT(da.v == da3.v, "conv3x3 col2im differs for 3 threads");
    }
  }
}

void test_conv_epilogue_and_grad_prep() {
  for (Layout lc : kLayouts) {
    for (Layout lo : kLayouts) {
      for (bool half : {false, true}) {
        const Dims d{3, 6, 6, 4};
        const Dims dr = half ? Dims{3, 6, 3, 2} : d;
        T4 conv = random4(d, lc), res = random4(dr, lo == Layout::kPixels ? Layout::kPlanes : Layout::kPixels);
        std::vector<float> bias = randn(6);
        g::Epilogue<float> ep;
        ep.bias = bias.data();
        ep.residual = res.cv();
        ep.residual_half = half;
        T4 out(d, lo);
        g::conv_epilogue(conv.cv(), ep, out.mv(), nullptr, nullptr, 2);
        double err = 0.0;
        for (int64_t b = 0; b < d.n; ++b)
          for (int64_t c = 0; c < d.c; ++c)
            for (int64_t y = 0; y < d.h; ++y)
              for (int64_t x = 0; x < d.w; ++x) {
                const float r = half ? res.at(b, c, y / 2, x / 2) : res.at(b, c, y, x);
                err = std::fmax(err, std::fabs(out.at(b, c, y, x) - (conv.at(b, c, y, x) + bias[c] + r)));
              }
        EXPECT(err < 1e-5, "conv epilogue %s->%s half=%d: %g", name(lc), name(lo), half, err);
      }
      // gradient of the output: copy to the other layout, 2x2 sums, bias sum
      const Dims d{2, 5, 8, 6};
      T4 gr = random4(d, lc), copy(d, lo), hs({2, 5, 4, 3}, lo);
      std::vector<double> db(5), db3(5);
      g::grad_output_prep(gr.cv(), copy.mv(), hs.mv(), db.data(), 1);
      T4 copy3(d, lo), hs3({2, 5, 4, 3}, lo);
      g::grad_output_prep(gr.cv(), copy3.mv(), hs3.mv(), db3.data(), 3);
      bool ok = true;
      double err = 0.0;
      for (int64_t c = 0; c < 5; ++c) {
        double s = 0.0;
        for (int64_t b = 0; b < 2; ++b)
          for (int64_t y = 0; y < 8; ++y)
            for (int64_t x = 0; x < 6; ++x) {
              s += gr.at(b, c, y, x);
              ok = ok && copy.at(b, c, y, x) == gr.at(b, c, y, x);
              if (y % 2 == 0 && x % 2 == 0) {
                const double q = static_cast<double>(gr.at(b, c, y, x)) + gr.at(b, c, y, x + 1) +
                                 gr.at(b, c, y + 1, x) + gr.at(b, c, y + 1, x + 1);
                err = std::fmax(err, std::fabs(hs.at(b, c, y / 2, x / 2) - q));
              }
            }
        err = std::fmax(err, std::fabs(db[c] - s));
      }
      EXPECT(ok && err < 1e-5, "grad prep %s->%s: copy %d, error %g", name(lc), name(lo), ok, err);
      EXPECT(copy.v == copy3.v && hs.v == hs3.v && db == db3, "grad prep differs for 3 threads");
    }
  }
}

void test_scatter_is_the_adjoint_of_the_interleave() {
  for (Layout lg : kLayouts) {
    const int64_t n = 2, c = 3, h = 4, w = 5;
    T4 p = random4({n, 4 * c, h + 1, w + 1}, Layout::kPixels);
    T4 gr = random4({n, c, 2 * h, 2 * w}, lg);
    T4 out({n, c, 2 * h, 2 * w}, Layout::kPlanes);
    g::phase_epilogue(p.v.data(), {n, c, h, w}, g::Epilogue<float>{}, out.mv(), nullptr, nullptr, 1);
    std::vector<float> dp(p.v.size(), -7.0f), dp3(p.v.size(), 9.0f);  // poisoned
    std::vector<double> db(3), db3(3);
    g::phase_grad_scatter(gr.cv(), dp.data(), db.data(), 1);
    g::phase_grad_scatter(gr.cv(), dp3.data(), db3.data(), 3);
    double lhs = 0.0, rhs = 0.0;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t k = 0; k < c; ++k)
        for (int64_t y = 0; y < 2 * h; ++y)
          for (int64_t x = 0; x < 2 * w; ++x) lhs += static_cast<double>(out.at(b, k, y, x)) * gr.at(b, k, y, x);
    for (size_t i = 0; i < p.v.size(); ++i) rhs += static_cast<double>(p.v[i]) * dp[i];
    EXPECT(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "scatter adjoint (%s): %g vs %g", name(lg), lhs, rhs);
    EXPECT(dp == dp3 && db == db3, "scatter differs for 3 threads");
    // positions no output reads get exactly zero
    const T4 dpt = [&] { T4 t({n, 4 * c, h + 1, w + 1}, Layout::kPixels); t.v = dp; return t; }();
    EXPECT(dpt.at(0, 0, h, 0) == 0.0f && dpt.at(1, 3 * c, 0, 2) == 0.0f, "unused phase rows not zero");

    // the compact layout (4, n, h, w, c)
    std::vector<float> pc = randn(static_cast<size_t>(4 * n * h * w * c));
    T4 outc({n, c, 2 * h, 2 * w}, Layout::kPixels);
    g::phase_epilogue(pc.data(), {n, c, h, w}, g::Epilogue<float>{}, outc.mv(), nullptr, nullptr, 1,
                      g::PhaseLayout::kCompact);
    std::vector<float> dc(pc.size(), -7.0f), dc3(pc.size(), 9.0f);
    std::vector<double> dbc(3), dbc3(3);
    g::phase_grad_scatter(gr.cv(), dc.data(), dbc.data(), 1, g::PhaseLayout::kCompact);
    g::phase_grad_scatter(gr.cv(), dc3.data(), dbc3.data(), 3, g::PhaseLayout::kCompact);
    lhs = rhs = 0.0;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t k = 0; k < c; ++k)
        for (int64_t y = 0; y < 2 * h; ++y)
          for (int64_t x = 0; x < 2 * w; ++x) lhs += static_cast<double>(outc.at(b, k, y, x)) * gr.at(b, k, y, x);
    for (size_t i = 0; i < pc.size(); ++i) rhs += static_cast<double>(pc[i]) * dc[i];
    EXPECT(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "compact scatter adjoint (%s): %g vs %g", name(lg),
           lhs, rhs);
    EXPECT(dc == dc3 && dbc == dbc3, "compact scatter differs for 3 threads");
    double err = 0.0;
    for (int64_t k = 0; k < c; ++k) err = std::fmax(err, std::fabs(dbc[k] - db[k]));
    EXPECT(err < 1e-5, "compact scatter bias gradient: %g", err);
  }
}

void test_bn_backward() {
  for (Layout lx : kLayouts) {
    for (bool training : {true, false}) {
      const Dims d{3, 4, 6, 4};
      T4 x = random4(d, lx, 1.5f, 0.5f), dact = random4(d, Layout::kPixels), act(d, Layout::kPixels);
      std::vector<float> gam = randn(12, 0.3f, 1.0f), bet = randn(12, 0.3f);
      std::vector<double> mean(4), var(4), rstd(4);
      g::channel_stats(x.cv(), mean.data(), var.data(), 1);
      std::vector<float> scale(12), shift(12);
      g::scale_shift(gam.data(), bet.data(), 4, 3, 4, mean.data(), var.data(), 1e-5, rstd.data(),
                     scale.data(), shift.data());
      g::affine_relu(x.cv(), scale.data(), shift.data(), act.mv(), g::View<float>{}, 1);
      g::BnReluBackward<float> a;
      a.x = x.cv();
      a.act = act.cv();
      a.dact = dact.cv();
      a.gamma = gam.data();
      a.gamma_stride = 4;
      a.scale = scale.data();
      a.mean = mean.data();
      a.rstd = rstd.data();
      a.training = training;
      std::vector<float> dgb(24), dgb3(24);
      std::vector<double> k1(4), k2(4), k13(4), k23(4);
      g::bn_relu_backward_reduce(a, dgb.data(), dgb.data() + 4, 8, k1.data(), k2.data(), 1);
      g::bn_relu_backward_reduce(a, dgb3.data(), dgb3.data() + 4, 8, k13.data(), k23.data(), 3);
      EXPECT(dgb == dgb3 && k1 == k13 && k2 == k23, "bn reduce differs for 3 threads");
      T4 add = random4(d, lx), dx(d, lx);
      g::bn_relu_backward_apply(a, k1.data(), k2.data(), add.cv(), dx.mv(), 2);
      // naive: dz, xhat, sums, dx
      const double N = static_cast<double>(d.n * d.h * d.w);
      double err_g = 0.0, err_x = 0.0;
      for (int64_t c = 0; c < 4; ++c) {
        double sg1 = 0.0, sg2 = 0.0;
        std::vector<double> s1(3, 0.0), s2(3, 0.0);
        for (int64_t b = 0; b < 3; ++b)
          for (int64_t y = 0; y < d.h; ++y)
            for (int64_t xx = 0; xx < d.w; ++xx) {
              const double dz = act.at(b, c, y, xx) > 0 ? dact.at(b, c, y, xx) : 0.0;
              const double xh = (x.at(b, c, y, xx) - mean[c]) * rstd[c];
              s1[b] += dz;
              s2[b] += dz * xh;
            }
        for (int64_t b = 0; b < 3; ++b) {
          err_g = std::fmax(err_g, std::fabs(dgb[b * 8 + 4 + c] - s1[b]) + std::fabs(dgb[b * 8 + c] - s2[b]));
          sg1 += gam[b * 4 + c] * s1[b];
          sg2 += gam[b * 4 + c] * s2[b];
        }
        for (int64_t b = 0; b < 3; ++b)
          for (int64_t y = 0; y < d.h; ++y)
            for (int64_t xx = 0; xx < d.w; ++xx) {
              const double dz = act.at(b, c, y, xx) > 0 ? dact.at(b, c, y, xx) : 0.0;
              const double xh = (x.at(b, c, y, xx) - mean[c]) * rstd[c];
              const double want = training ? rstd[c] * (gam[b * 4 + c] * dz - sg1 / N - xh * sg2 / N)
                                           : scale[b * 4 + c] * dz;
              err_x = std::fmax(err_x, std::fabs(dx.at(b, c, y, xx) - (want + add.at(b, c, y, xx))));
            }
      }
      EXPECT(err_g < 1e-4 && err_x < 1e-4, "bn backward x %s training %d: dgamma/dbeta %g, dx %g",
             name(lx), training, err_g, err_x);

      // apply_phase == phase_grad_scatter(apply) (x read as the interleaved output of a phase conv)
      T4 dxp(d, Layout::kPlanes);
      g::bn_relu_backward_apply(a, k1.data(), k2.data(), g::View<const float>{}, dxp.mv(), 1);
      const size_t np = static_cast<size_t>(d.n * 4 * d.c * (d.h / 2 + 1) * (d.w / 2 + 1));
      std::vector<float> want(np), got(np, 5.0f), got3(np, -5.0f);
      std::vector<double> dbw(4), dbg(4), dbg3(4);
      g::phase_grad_scatter(dxp.cv(), want.data(), dbw.data(), 1);
      g::bn_relu_backward_apply_phase(a, k1.data(), k2.data(), got.data(), dbg.data(), 1);
      g::bn_relu_backward_apply_phase(a, k1.data(), k2.data(), got3.data(), dbg3.data(), 3);
      double err = 0.0;
      for (size_t i = 0; i < np; ++i) err = std::fmax(err, std::fabs(got[i] - want[i]));
      for (int64_t c = 0; c < 4; ++c) err = std::fmax(err, std::fabs(dbg[c] - dbw[c]));
      EXPECT(err < 1e-5, "apply_phase vs scatter(apply), x %s: %g", name(lx), err);
      EXPECT(got == got3 && dbg == dbg3, "apply_phase differs for 3 threads");

      // the same in the compact layout
      const size_t nc = static_cast<size_t>(4 * d.n * d.c * (d.h / 2) * (d.w / 2));
      std::vector<float> wantc(nc), gotc(nc, 5.0f), gotc3(nc, -5.0f);
      g::phase_grad_scatter(dxp.cv(), wantc.data(), dbw.data(), 1, g::PhaseLayout::kCompact);
      g::bn_relu_backward_apply_phase(a, k1.data(), k2.data(), gotc.data(), dbg.data(), 1,
                                      g::PhaseLayout::kCompact);
      g::bn_relu_backward_apply_phase(a, k1.data(), k2.data(), gotc3.data(), dbg3.data(), 3,
                                      g::PhaseLayout::kCompact);
      err = 0.0;
      for (size_t i = 0; i < nc; ++i) err = std::fmax(err, std::fabs(gotc[i] - wantc[i]));
      for (int64_t c = 0; c < 4; ++c) err = std::fmax(err, std::fabs(dbg[c] - dbw[c]));
      EXPECT(err < 1e-5, "compact apply_phase vs scatter(apply), x %s: %g", name(lx), err);
      EXPECT(gotc == gotc3 && dbg == dbg3, "compact apply_phase differs for 3 threads");
    }
  }
}

void test_double_instantiation() {
  // the float64 path (gradcheck in the Python tests) runs the same code: spot-check stats
  const Dims d{2, 3, 4, 5};
  std::vector<double> x(static_cast<size_t>(d.numel()));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<double>(i)) * 3.0 + 1.0;
  std::vector<double> mean(3), var(3);
  g::channel_stats(g::View<const double>{x.data(), d, Layout::kPlanes}, mean.data(), var.data(), 2);
  for (int64_t c = 0; c < 3; ++c) {
    double s = 0.0;
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t i = 0; i < 20; ++i) s += x[static_cast<size_t>((b * 3 + c) * 20 + i)];
    EXPECT(std::fabs(mean[c] - s / 40.0) < 1e-14, "double mean %g vs %g", mean[c], s / 40.0);
  }
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_genblock"); status >= 0) return status;
  test_stats_and_prologue();
  test_phase_forward();
  test_compact_phase_forward();
  test_conv3x3_im2col();
  test_conv_epilogue_and_grad_prep();
  test_scatter_is_the_adjoint_of_the_interleave();
  test_bn_backward();
  test_double_instantiation();
  std::printf("test_genblock: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
