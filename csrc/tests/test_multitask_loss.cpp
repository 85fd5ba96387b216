// Unit tests of the torch-free CPU kernels (csrc/kernels/cpu/multitask_loss.*) against naive
// double-precision loops, on small random inputs. Built and run by CMake/ctest; no framework:
// a failed EXPECT prints where and why, and main returns 1 if anything failed.
#include "kernels/cpu/multitask_loss.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

using mgm_fast::cpu::L1Problem;
using mgm_fast::cpu::LossResult;
using mgm_fast::cpu::MaskKind;
using mgm_fast::cpu::Reduction;
using mgm_fast::cpu::SegCEProblem;
using mgm_fast::cpu::Strides3;
using mgm_fast::cpu::Strides4;

namespace {

bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

enum class Layout { kNCHW, kNHWC };

Strides4 strides_of(Layout layout, int64_t C, int64_t H, int64_t W) {
  if (layout == Layout::kNCHW) return {C * H * W, H * W, W, 1};
  return {H * W * C, 1, W * C, C};
}

int64_t at(const Strides4& s, int64_t b, int64_t c, int64_t h, int64_t w) {
  return b * s.n + c * s.c + h * s.h + w * s.w;
}

// Random float in [lo, hi).
std::vector<float> uniform(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------
// exp

void test_exp() {
  double worst = 0.0;
  for (int k = 0; k <= 870000; ++k) {
    const float x = -87.0f * static_cast<float>(k) / 870000.0f;
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(mgm_fast::cpu::exp_nonpositive(x) - want) / want;
    worst = rel > worst ? rel : worst;
  }
  EXPECT(worst < 2.5e-7, "exp relative error %.3g over [-87, 0]", worst);
  EXPECT(mgm_fast::cpu::exp_nonpositive(0.0f) == 1.0f, "exp(0) = %.9g",
         mgm_fast::cpu::exp_nonpositive(0.0f));
  EXPECT(mgm_fast::cpu::exp_nonpositive(-200.0f) == 0.0f, "exp(-200) should underflow to 0");
  EXPECT(mgm_fast::cpu::exp_nonpositive(-std::numeric_limits<float>::infinity()) == 0.0f,
         "exp(-inf) should be 0");
  EXPECT(std::isnan(mgm_fast::cpu::exp_nonpositive(std::nanf(""))), "exp(NaN) should be NaN");
  for (float x : {-90.0f, -95.0f, -100.0f}) {  // gradual underflow, absolute error tiny
    const double got = mgm_fast::cpu::exp_nonpositive(x);
    EXPECT(std::fabs(got - std::exp(static_cast<double>(x))) < 1e-40, "exp(%g) = %g", x, got);
  }
}

// ---------------------------------------------------------------------------------------------
// segmentation CE

struct SegCase {
  int64_t B, C, H, W;
  Layout layout;
  bool has_ignore;
  int64_t ignore_index;
  double ignore_fraction;  // fraction of pixels set to the ignore index
  float scale;             // logits ~ U(-scale, scale)
};

struct SegData {
  std::vector<float> logits;
  std::vector<int64_t> target;
  Strides4 ls;
  Strides3 ts;
};

SegData make_seg(std::mt19937& rng, const SegCase& sc) {
  SegData d;
  d.logits = uniform(rng, static_cast<size_t>(sc.B * sc.C * sc.H * sc.W), -sc.scale, sc.scale);
  d.ls = strides_of(sc.layout, sc.C, sc.H, sc.W);
  d.ts = {sc.H * sc.W, sc.W, 1};
  d.target.resize(static_cast<size_t>(sc.B * sc.H * sc.W));
  std::uniform_int_distribution<int64_t> cls(0, sc.C - 1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t& t : d.target) {
    t = cls(rng);
    if (sc.has_ignore && u(rng) < sc.ignore_fraction) t = sc.ignore_index;
  }
  return d;
}

SegCEProblem seg_problem(const SegCase& sc, const SegData& d, float* grad) {
  SegCEProblem p;
  p.logits = d.logits.data();
  p.logits_strides = d.ls;
  p.target = d.target.data();
  p.target_strides = d.ts;
  p.grad = grad;
  p.grad_strides = d.ls;  // the gradient shares the logits' layout
  p.batch = sc.B;
  p.classes = sc.C;
  p.height = sc.H;
  p.width = sc.W;
  p.has_ignore = sc.has_ignore;
  p.ignore_index = sc.ignore_index;
  return p;
}

// Naive double-precision reference: returns the loss, fills the gradient (same layout).
double seg_naive(const SegCase& sc, const SegData& d, std::vector<double>& grad) {
  grad.assign(d.logits.size(), 0.0);
  int64_t valid = 0;
  for (int64_t t : d.target) valid += !(sc.has_ignore && t == sc.ignore_index);
  const double divisor =
      sc.has_ignore ? static_cast<double>(valid > 0 ? valid : 1) : double(sc.B * sc.H * sc.W);
  double total = 0.0;
  for (int64_t b = 0; b < sc.B; ++b)
    for (int64_t h = 0; h < sc.H; ++h)
      for (int64_t w = 0; w < sc.W; ++w) {
        const int64_t t = d.target[static_cast<size_t>((b * sc.H + h) * sc.W + w)];
        if (sc.has_ignore && t == sc.ignore_index) continue;
        double m = -INFINITY;
        for (int64_t c = 0; c < sc.C; ++c) m = std::fmax(m, d.logits[at(d.ls, b, c, h, w)]);
        double s = 0.0;
        for (int64_t c = 0; c < sc.C; ++c) s += std::exp(d.logits[at(d.ls, b, c, h, w)] - m);
        total += std::log(s) + m - d.logits[at(d.ls, b, t, h, w)];
        for (int64_t c = 0; c < sc.C; ++c) {
          const double p = std::exp(d.logits[at(d.ls, b, c, h, w)] - m) / s;
          grad[at(d.ls, b, c, h, w)] = (p - (c == t ? 1.0 : 0.0)) / divisor;
        }
      }
  return total / divisor;
}

void check_seg(const SegCase& sc, std::mt19937& rng) {
  char name[160];
  std::snprintf(name, sizeof name, "seg B=%lld C=%lld H=%lld W=%lld %s ignore=%d/%lld frac=%.2f",
                (long long)sc.B, (long long)sc.C, (long long)sc.H, (long long)sc.W,
                sc.layout == Layout::kNCHW ? "NCHW" : "NHWC", (int)sc.has_ignore,
                (long long)sc.ignore_index, sc.ignore_fraction);
  const SegData d = make_seg(rng, sc);
  std::vector<float> grad(d.logits.size(), std::nanf(""));  // poisoned: every entry is written
  const LossResult res = mgm_fast::cpu::seg_ce(seg_problem(sc, d, grad.data()), 2);
  std::vector<double> want_grad;
  const double want = seg_naive(sc, d, want_grad);
  EXPECT(!res.label_error, "%s: unexpected label error", name);
  EXPECT(close(res.loss, want, 1e-5, 1e-7), "%s: loss %.9g vs %.9g", name, res.loss, want);
  const double gscale = 1.0 / res.divisor;
  double worst = 0.0;
  for (size_t i = 0; i < grad.size(); ++i) {
    const double err = std::isnan(grad[i]) ? INFINITY : std::fabs(grad[i] - want_grad[i]);
    worst = err > worst ? err : worst;
  }
  EXPECT(worst <= 1e-6 * gscale, "%s: grad max error %.3g (scale %.3g)", name, worst, gscale);

  // loss-only mode gives the same loss
  const LossResult only = mgm_fast::cpu::seg_ce(seg_problem(sc, d, nullptr), 2);
  EXPECT(only.loss == res.loss, "%s: loss-only %.17g vs %.17g", name, only.loss, res.loss);

  // bit-identical for any thread count
  for (int nt : {1, 3, 5}) {
    std::vector<float> g2(d.logits.size(), 0.0f);
    const LossResult r2 = mgm_fast::cpu::seg_ce(seg_problem(sc, d, g2.data()), nt);
    EXPECT(r2.loss == res.loss, "%s: %d threads loss %.17g vs %.17g", name, nt, r2.loss, res.loss);
    EXPECT(std::memcmp(g2.data(), grad.data(), grad.size() * sizeof(float)) == 0,
           "%s: %d threads gradient differs", name, nt);
  }
}

void test_seg() {
  std::mt19937 rng(1234);
  const SegCase cases[] = {
      {1, 13, 1, 1, Layout::kNCHW, false, 0, 0.0, 3.0f},
      {1, 13, 7, 5, Layout::kNCHW, false, 0, 0.0, 3.0f},
      {3, 27, 5, 7, Layout::kNHWC, false, 0, 0.0, 3.0f},
      {3, 40, 9, 67, Layout::kNCHW, true, -1, 0.3, 5.0f},   // W > tile: a full and a tail tile
      {2, 40, 3, 130, Layout::kNHWC, true, 255, 0.3, 5.0f},
      {2, 27, 70, 70, Layout::kNCHW, true, 255, 0.1, 2.0f},  // several reduction chunks
      {2, 13, 4, 6, Layout::kNCHW, true, 0, 0.2, 2.0f},      // ignore index inside [0, C)
      {3, 40, 5, 7, Layout::kNCHW, false, 0, 0.0, 1e4f},     // extreme logits
      {3, 40, 5, 7, Layout::kNHWC, true, -1, 0.5, 1e4f},
  };
  for (const SegCase& sc : cases) check_seg(sc, rng);

  // every pixel ignored: loss 0, gradient 0 (not NaN)
  {
    SegCase sc{2, 13, 3, 5, Layout::kNCHW, true, 255, 1.0, 3.0f};
    SegData d = make_seg(rng, sc);
    std::vector<float> grad(d.logits.size(), std::nanf(""));
    const LossResult r = mgm_fast::cpu::seg_ce(seg_problem(sc, d, grad.data()), 2);
    EXPECT(r.loss == 0.0 && r.divisor == 1.0, "all ignored: loss %g divisor %g", r.loss, r.divisor);
    bool zeros = true;
    for (float g : grad) zeros = zeros && g == 0.0f;
    EXPECT(zeros, "all ignored: gradient must be all zeros");
  }
  // extreme logits stay finite
  {
    SegCase sc{1, 40, 3, 3, Layout::kNCHW, false, 0, 0.0, 1.0f};
    SegData d = make_seg(rng, sc);
    for (size_t i = 0; i < d.logits.size(); ++i) d.logits[i] = (i % 3 == 0) ? 1e4f : -1e4f;
    std::vector<float> grad(d.logits.size());
    const LossResult r = mgm_fast::cpu::seg_ce(seg_problem(sc, d, grad.data()), 2);
    bool finite = std::isfinite(r.loss);
    for (float g : grad) finite = finite && std::isfinite(g);
    EXPECT(finite, "extreme logits: loss %g", r.loss);
  }
  // label errors: the first out-of-range label (in pixel order) is reported
  {
    SegCase sc{2, 13, 70, 70, Layout::kNCHW, true, 255, 0.0, 1.0f};
    SegData d = make_seg(rng, sc);
    d.target[5000] = 13;
    d.target[9000] = -3;
    std::vector<float> grad(d.logits.size());
    const LossResult r = mgm_fast::cpu::seg_ce(seg_problem(sc, d, grad.data()), 2);
    EXPECT(r.label_error && r.bad_label == 13 && r.bad_pixel == 5000,
           "label error: flag %d value %lld pixel %lld", (int)r.label_error,
           (long long)r.bad_label, (long long)r.bad_pixel);
    sc.has_ignore = false;  // without an ignore index, 255 is out of range too
    d.target[5000] = 1;
    d.target[9000] = 2;
    d.target[7777] = 255;
    const LossResult r2 = mgm_fast::cpu::seg_ce(seg_problem(sc, d, nullptr), 1);
    EXPECT(r2.label_error && r2.bad_label == 255 && r2.bad_pixel == 7777,
           "label error without ignore: value %lld pixel %lld", (long long)r2.bad_label,
           (long long)r2.bad_pixel);
  }
}

// ---------------------------------------------------------------------------------------------
// masked L1

struct L1Case {
  int64_t B, C, H, W;
  Layout layout;
  MaskKind mask;
  int64_t mask_channels;
  int mask_fill;  // 0 all zeros, 1 all ones, 2 random
  Reduction reduction;
};

void check_l1(const L1Case& lc, std::mt19937& rng) {
  char name[160];
  std::snprintf(name, sizeof name,
                "l1 B=%lld C=%lld H=%lld W=%lld %s mask=%d/%lldch fill=%d red=%d",
                (long long)lc.B, (long long)lc.C, (long long)lc.H, (long long)lc.W,
                lc.layout == Layout::kNCHW ? "NCHW" : "NHWC", (int)lc.mask,
                (long long)lc.mask_channels, lc.mask_fill, (int)lc.reduction);
  const size_t n = static_cast<size_t>(lc.B * lc.C * lc.H * lc.W);
  const size_t nm = static_cast<size_t>(lc.B * lc.mask_channels * lc.H * lc.W);
  std::vector<float> pred = uniform(rng, n, -1.0f, 1.0f);
  std::vector<float> target = uniform(rng, n, -1.0f, 1.0f);
  for (size_t i = 0; i < n; i += 17) target[i] = pred[i];  // some exact ties: sign(0) = 0
  std::vector<uint8_t> mask_u8(nm);
  std::vector<float> mask_f(nm);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (size_t i = 0; i < nm; ++i) {
    const float v = lc.mask_fill == 0 ? 0.0f : lc.mask_fill == 1 ? 1.0f : u(rng);
    mask_u8[i] = lc.mask_fill == 2 ? (v > 0.5f) : static_cast<uint8_t>(v);
    mask_f[i] = v;  // float masks are weights, not only {0, 1}
  }
  const Strides4 s = strides_of(lc.layout, lc.C, lc.H, lc.W);
  const Strides4 ms = strides_of(lc.layout, lc.mask_channels, lc.H, lc.W);

  L1Problem p;
  p.pred = pred.data();
  p.pred_strides = s;
  p.target = target.data();
  p.target_strides = s;
  p.mask_kind = lc.mask;
  p.mask = lc.mask == MaskKind::kUInt8 ? static_cast<const void*>(mask_u8.data())
                                       : static_cast<const void*>(mask_f.data());
  if (lc.mask == MaskKind::kNone) p.mask = nullptr;
  p.mask_channels = lc.mask_channels;
  p.mask_strides = ms;
  std::vector<float> grad(n, std::nanf(""));
  p.grad = grad.data();
  p.grad_strides = s;
  p.batch = lc.B;
  p.channels = lc.C;
  p.height = lc.H;
  p.width = lc.W;
  p.reduction = lc.reduction;
  const LossResult res = mgm_fast::cpu::masked_l1(p, 2);

  // naive double reference
  double total = 0.0, msum = 0.0;
  std::vector<double> want_grad(n, 0.0);
  auto weight = [&](int64_t b, int64_t c, int64_t h, int64_t w) -> double {
    if (lc.mask == MaskKind::kNone) return 1.0;
    const int64_t i = at(ms, b, lc.mask_channels == 1 ? 0 : c, h, w);
    return lc.mask == MaskKind::kUInt8 ? double(mask_u8[size_t(i)]) : double(mask_f[size_t(i)]);
  };
  for (int64_t b = 0; b < lc.B; ++b)
    for (int64_t c = 0; c < lc.C; ++c)
      for (int64_t h = 0; h < lc.H; ++h)
        for (int64_t w = 0; w < lc.W; ++w) {
          const size_t i = size_t(at(s, b, c, h, w));
          const double wt = weight(b, c, h, w);
          total += wt * std::fabs(double(pred[i]) - double(target[i]));
          msum += wt;
        }
  double divisor = double(n);
  if (lc.reduction == Reduction::kValid) divisor = msum < 1.0 ? 1.0 : msum;
  for (int64_t b = 0; b < lc.B; ++b)
    for (int64_t c = 0; c < lc.C; ++c)
      for (int64_t h = 0; h < lc.H; ++h)
        for (int64_t w = 0; w < lc.W; ++w) {
          const size_t i = size_t(at(s, b, c, h, w));
          const double dd = double(pred[i]) - double(target[i]);
          want_grad[i] = ((dd > 0) - (dd < 0)) * weight(b, c, h, w) / divisor;
        }
  const double want = total / divisor;
  EXPECT(close(res.loss, want, 1e-6, 1e-9), "%s: loss %.9g vs %.9g", name, res.loss, want);
  EXPECT(close(res.divisor, divisor, 1e-9, 0.0), "%s: divisor %.9g vs %.9g", name, res.divisor,
         divisor);
  double worst = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double err = std::isnan(grad[i]) ? INFINITY : std::fabs(grad[i] - want_grad[i]);
    worst = err > worst ? err : worst;
  }
  EXPECT(worst <= 1e-6 / divisor, "%s: grad max error %.3g", name, worst);

  for (int nt : {1, 3}) {
    std::vector<float> g2(n, 0.0f);
    p.grad = g2.data();
    const LossResult r2 = mgm_fast::cpu::masked_l1(p, nt);
    EXPECT(r2.loss == res.loss, "%s: %d threads loss differs", name, nt);
    EXPECT(std::memcmp(g2.data(), grad.data(), n * sizeof(float)) == 0,
           "%s: %d threads gradient differs", name, nt);
  }
  p.grad = nullptr;
  EXPECT(mgm_fast::cpu::masked_l1(p, 2).loss == res.loss, "%s: loss-only differs", name);
}

void test_l1() {
  std::mt19937 rng(99);
  for (Reduction red : {Reduction::kAll, Reduction::kValid}) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      check_l1({1, 1, 1, 1, layout, MaskKind::kNone, 1, 1, red}, rng);
      check_l1({3, 1, 7, 5, layout, MaskKind::kNone, 1, 1, red}, rng);
      check_l1({3, 1, 7, 5, layout, MaskKind::kUInt8, 1, 2, red}, rng);
      check_l1({2, 1, 5, 9, layout, MaskKind::kFloat32, 1, 0, red}, rng);  // all-zero mask
      check_l1({2, 1, 70, 70, layout, MaskKind::kFloat32, 1, 2, red}, rng);
      check_l1({1, 3, 7, 5, layout, MaskKind::kNone, 1, 1, red}, rng);
      check_l1({3, 3, 5, 7, layout, MaskKind::kFloat32, 3, 2, red}, rng);
      check_l1({3, 3, 5, 7, layout, MaskKind::kFloat32, 1, 2, red}, rng);
      check_l1({2, 3, 6, 4, layout, MaskKind::kUInt8, 3, 1, red}, rng);   // all-one mask
      check_l1({2, 3, 6, 4, layout, MaskKind::kUInt8, 1, 0, red}, rng);
      check_l1({2, 3, 33, 70, layout, MaskKind::kUInt8, 1, 2, red}, rng);
    }
  }
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_multitask_loss"); status >= 0) return status;
  test_exp();
  test_seg();
  test_l1();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
