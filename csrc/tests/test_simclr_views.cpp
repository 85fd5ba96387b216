// Unit tests of the torch-free SimCLR views kernel (csrc/kernels/cpu/simclr_views.*) against
// naive double-precision loops: the Gaussian taps, the separable reflect-101 blur (against a
// direct 2-d convolution), the hue rotation (against a textbook RGB -> HSV -> RGB round trip),
// the bilinear taps, whole views (against a step-by-step double pipeline), thread-count
// independence and the parameter checks. Built and run by CMake/ctest; no framework: a failed
// EXPECT prints where and why, and main returns 1 if anything failed.
#include "kernels/cpu/simclr_views.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace cpu = mgm_fast::cpu;

namespace {

std::vector<float> uniform(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

int64_t reflect(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

double clamp01(double v) { return std::min(std::max(v, 0.0), 1.0); }

// ---------------------------------------------------------------------------------------------
// Gaussian taps and blur

std::vector<double> naive_taps(double sigma, int64_t size) {
  std::vector<double> k(static_cast<size_t>(size));
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    const double t = static_cast<double>(i) - (size - 1) / 2.0;
    k[i] = std::exp(-t * t / (2.0 * sigma * sigma));
    sum += k[i];
  }
  for (double& v : k) v /= sum;
  return k;
}

void test_gaussian_taps() {
  for (int64_t size : {1, 3, 5, 7, 13}) {
    for (float sigma : {0.01f, 0.3f, 1.0f, 2.5f}) {
      std::vector<float> taps(static_cast<size_t>(size));
      cpu::gaussian_taps(sigma, size, taps.data());
      const std::vector<double> want = naive_taps(sigma, size);
      double sum = 0.0;
      for (int64_t i = 0; i < size; ++i) {
        EXPECT(std::fabs(taps[i] - want[i]) < 1e-7, "K=%lld sigma=%g tap %lld: %.9g vs %.9g",
               static_cast<long long>(size), sigma, static_cast<long long>(i), taps[i], want[i]);
        EXPECT(taps[i] == taps[size - 1 - i], "taps must be symmetric");
        sum += taps[i];
      }
      EXPECT(std::fabs(sum - 1.0) < 1e-6, "taps sum %.9g", sum);
    }
  }
  float tiny[5];
  cpu::gaussian_taps(0.01f, 5, tiny);  // exp(-1 / 2e-4) underflows: an exact identity kernel
  EXPECT(tiny[0] == 0.0f && tiny[1] == 0.0f && tiny[2] == 1.0f && tiny[3] == 0.0f &&
             tiny[4] == 0.0f,
         "sigma 0.01: [%g %g %g %g %g]", tiny[0], tiny[1], tiny[2], tiny[3], tiny[4]);
}

void check_blur(std::mt19937& rng, int64_t C, int64_t H, int64_t W, int64_t K, float sigma) {
  const std::vector<float> x = uniform(rng, static_cast<size_t>(C * H * W), 0.0f, 1.0f);
  std::vector<float> taps(static_cast<size_t>(K));
  cpu::gaussian_taps(sigma, K, taps.data());
  std::vector<float> got = x;
  cpu::gaussian_blur(got.data(), C, H, W, taps.data(), K);
  const int64_t r = K / 2;
  double worst = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < W; ++j) {
        double want = 0.0;  // direct 2-d convolution with the outer-product kernel
        for (int64_t a = -r; a <= r; ++a) {
          for (int64_t b = -r; b <= r; ++b) {
            want += static_cast<double>(taps[a + r]) * taps[b + r] *
                    x[(c * H + reflect(i + a, H)) * W + reflect(j + b, W)];
          }
        }
        worst = std::max(worst, std::fabs(got[(c * H + i) * W + j] - want));
      }
    }
  }
  EXPECT(worst < 2e-6, "blur C=%lld %lldx%lld K=%lld sigma=%g: max error %.3g",
         static_cast<long long>(C), static_cast<long long>(H), static_cast<long long>(W),
         static_cast<long long>(K), sigma, worst);
}

void test_blur() {
  std::mt19937 rng(7);
  check_blur(rng, 3, 9, 7, 3, 0.8f);
  check_blur(rng, 3, 16, 16, 5, 1.5f);
  check_blur(rng, 1, 6, 11, 11, 2.0f);  // radius 5 = H - 1: every border reflection used
  check_blur(rng, 2, 2, 2, 3, 1.0f);    // the smallest image a 3-tap kernel allows
  check_blur(rng, 3, 5, 4, 1, 1.0f);    // K = 1: identity
  // a constant image stays constant (taps sum to 1)
  std::vector<float> flat(3 * 8 * 8, 0.25f);
  float taps[5];
  cpu::gaussian_taps(1.3f, 5, taps);
  cpu::gaussian_blur(flat.data(), 3, 8, 8, taps, 5);
  for (float v : flat) EXPECT(std::fabs(v - 0.25f) < 1e-6f, "constant image blurred to %g", v);
}

// ---------------------------------------------------------------------------------------------
// Hue

void rgb_to_hsv(double r, double g, double b, double& h, double& s, double& v) {
  const double mx = std::max(r, std::max(g, b)), mn = std::min(r, std::min(g, b));
  const double c = mx - mn;
  v = mx;
  s = mx > 0 ? c / mx : 0.0;
  if (c <= 0) {
    h = 0.0;
  } else if (mx == r) {
    h = std::fmod((g - b) / c + 6.0, 6.0) / 6.0;
  } else if (mx == g) {
    h = ((b - r) / c + 2.0) / 6.0;
  } else {
    h = ((r - g) / c + 4.0) / 6.0;
  }
}

void hsv_to_rgb(double h, double s, double v, double& r, double& g, double& b) {
  const double h6 = (h - std::floor(h)) * 6.0;
  const double sector = std::floor(h6);
  const double f = h6 - sector;
  const double p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  switch (static_cast<int>(sector) % 6) {
    case 0: r = v; g = t; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = t; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
}

void test_hue() {
  std::mt19937 rng(11);
  const int64_t n = 4096;
  std::vector<float> r = uniform(rng, n, 0.0f, 1.0f);
  std::vector<float> g = uniform(rng, n, 0.0f, 1.0f);
  std::vector<float> b = uniform(rng, n, 0.0f, 1.0f);
  // grays, ties, black, white, pure colours
  const float special[][3] = {{0.3f, 0.3f, 0.3f}, {0, 0, 0},          {1, 1, 1},
                              {1, 0, 0},          {0, 1, 0},          {0, 0, 1},
                              {0.9f, 0.9f, 0.2f}, {0.4f, 0.1f, 0.4f}, {0.2f, 0.7f, 0.7f}};
  for (size_t k = 0; k < sizeof(special) / sizeof(special[0]); ++k) {
    r[k] = special[k][0];
    g[k] = special[k][1];
    b[k] = special[k][2];
  }
  for (float shift : {0.5f, -0.5f, 0.25f, 1.0f / 3.0f, -0.2f, 0.07f, 1e-7f, 0.0f}) {
    std::vector<float> rr = r, gg = g, bb = b;
    cpu::hue_rotate(rr.data(), gg.data(), bb.data(), n, shift);
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double h, s, v, wr, wg, wb;
      rgb_to_hsv(r[i], g[i], b[i], h, s, v);
      hsv_to_rgb(h + shift, s, v, wr, wg, wb);
      worst = std::max({worst, std::fabs(rr[i] - wr), std::fabs(gg[i] - wg),
                        std::fabs(bb[i] - wb)});
    }
    EXPECT(worst < 2e-6, "hue shift %g: max error %.3g against RGB->HSV->RGB", shift, worst);
    // the round trip: rotating back restores the colours
    cpu::hue_rotate(rr.data(), gg.data(), bb.data(), n, -shift);
    double back = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      back = std::max({back, static_cast<double>(std::fabs(rr[i] - r[i])),
                       static_cast<double>(std::fabs(gg[i] - g[i])),
                       static_cast<double>(std::fabs(bb[i] - b[i]))});
    }
    EXPECT(back < 4e-6, "hue shift %g and back: max error %.3g", shift, back);
  }
  // every pixel gets the same bits in the loop's vector body as alone (in its scalar tail):
  // inputs outside [0, 1], ties, grays and tiny chromas included
  {
    const int64_t m = 1031;  // odd: a tail at every vector width
    std::vector<float> r3 = uniform(rng, m, -0.25f, 1.25f);
    std::vector<float> g3 = uniform(rng, m, -0.25f, 1.25f);
    std::vector<float> b3 = uniform(rng, m, -0.25f, 1.25f);
    const float edge[][3] = {{0.5f, 0.5f, 0.2f}, {0.2f, 0.5f, 0.5f}, {0.5f, 0.2f, 0.5f},
                             {0.7f, 0.7f, 0.7f}, {-1, 2, 0.5f},      {1e-31f, 0, 0},
                             {0.25f, 0.25f + 1e-7f, 0.25f},          {-0.0f, 0.0f, -0.0f}};
    for (size_t k = 0; k < sizeof(edge) / sizeof(edge[0]); ++k) {
      r3[3 * k] = edge[k][0];
      g3[3 * k] = edge[k][1];
      b3[3 * k] = edge[k][2];
    }
    for (float shift : {0.5f, -0.3f, 0.1f}) {
      std::vector<float> rr = r3, gg = g3, bb = b3;
      cpu::hue_rotate(rr.data(), gg.data(), bb.data(), m, shift);
      int64_t differ = 0;
      for (int64_t i = 0; i < m; ++i) {
        float one[3] = {r3[i], g3[i], b3[i]};
        cpu::hue_rotate(one, one + 1, one + 2, 1, shift);
        differ += std::memcmp(&one[0], &rr[i], 4) != 0 || std::memcmp(&one[1], &gg[i], 4) != 0 ||
                  std::memcmp(&one[2], &bb[i], 4) != 0;
      }
      EXPECT(differ == 0, "hue shift %g: %lld pixels differ between a row and alone", shift,
             static_cast<long long>(differ));
    }
  }
  // grays are exactly unchanged; red turns green after a third of a turn
  float gr[2] = {0.3f, 1.0f}, gg2[2] = {0.3f, 0.0f}, gb[2] = {0.3f, 0.0f};
  cpu::hue_rotate(gr, gg2, gb, 2, 1.0f / 3.0f);
  EXPECT(gr[0] == 0.3f && gg2[0] == 0.3f && gb[0] == 0.3f, "gray changed: %g %g %g", gr[0],
         gg2[0], gb[0]);
  EXPECT(std::fabs(gr[1]) < 1e-6f && std::fabs(gg2[1] - 1.0f) < 1e-6f && std::fabs(gb[1]) < 1e-6f,
         "red + 1/3 turn = (%g, %g, %g), want green", gr[1], gg2[1], gb[1]);
}

// ---------------------------------------------------------------------------------------------
// Bilinear taps

void test_bilinear_taps() {
  int32_t i0[64], i1[64];
  float lam[64];
  cpu::bilinear_taps(17, 17, i0, i1, lam);  // identity
  for (int j = 0; j < 17; ++j) {
    EXPECT(i0[j] == j && lam[j] == 0.0f, "identity tap %d: i0 %d lam %g", j, i0[j], lam[j]);
  }
  cpu::bilinear_taps(1, 9, i0, i1, lam);  // a one-pixel window: every tap reads it
  for (int j = 0; j < 9; ++j) EXPECT(i0[j] == 0 && i1[j] == 0, "1-pixel window tap %d", j);
  for (int64_t len : {2, 5, 13, 40}) {
    for (int64_t out : {1, 3, 16, 33, 64}) {
      cpu::bilinear_taps(len, out, i0, i1, lam);
      for (int64_t j = 0; j < out; ++j) {
        const double src = std::max((j + 0.5) * len / out - 0.5, 0.0);
        const double pos = i0[j] + lam[j];  // the sampled position, where it is inside
        EXPECT(i0[j] >= 0 && i1[j] < len && i1[j] - i0[j] <= 1, "len %lld out %lld tap %lld",
               static_cast<long long>(len), static_cast<long long>(out), static_cast<long long>(j));
        EXPECT(std::fabs(std::min(pos, len - 1.0) - std::min(src, len - 1.0)) < 1e-5,
               "len %lld out %lld tap %lld: %g vs %g", static_cast<long long>(len),
               static_cast<long long>(out), static_cast<long long>(j), pos, src);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Whole views against a double pipeline

struct ViewParams {
  int64_t crop[4];
  bool flip, jitter;
  int64_t order[4];
  float factors[4];
  bool gray, blur;
  float sigma;
};

// One view (3, oh, ow) in double, step by step (mgm_fast.data.augment.augment_reference).
std::vector<double> naive_view(const std::vector<float>& img, int64_t H, int64_t W,
                               const ViewParams& p, int64_t oh, int64_t ow, int64_t K) {
  const int64_t top = p.crop[0], left = p.crop[1], ch = p.crop[2], cw = p.crop[3];
  auto taps = [](int64_t len, int64_t out, int64_t j, int64_t& a, int64_t& b, double& lam) {
    const double src = std::max((j + 0.5) * static_cast<double>(len) / out - 0.5, 0.0);
    a = std::min(static_cast<int64_t>(src), len - 1);
    b = std::min(a + 1, len - 1);
    lam = std::min(src - std::floor(src), 1.0);
  };
  std::vector<double> v(3 * oh * ow);
  auto at = [&](int64_t c, int64_t i, int64_t j) -> double& { return v[(c * oh + i) * ow + j]; };
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t i = 0; i < oh; ++i) {
      int64_t y0, y1;
      double ly;
      taps(ch, oh, i, y0, y1, ly);
      for (int64_t j = 0; j < ow; ++j) {
        int64_t x0, x1;
        double lx;
        taps(cw, ow, p.flip ? ow - 1 - j : j, x0, x1, lx);
        auto src = [&](int64_t y, int64_t x) {
          return clamp01((img[(c * H + top + y) * W + left + x] + 1.0) / 2.0);
        };
        const double top_row = (1 - lx) * src(y0, x0) + lx * src(y0, x1);
        const double bottom_row = (1 - lx) * src(y1, x0) + lx * src(y1, x1);
        at(c, i, j) = (1 - ly) * top_row + ly * bottom_row;
      }
    }
  }
  const double w[3] = {0.299, 0.587, 0.114};
  auto gray_at = [&](int64_t i, int64_t j) {
    return w[0] * at(0, i, j) + w[1] * at(1, i, j) + w[2] * at(2, i, j);
  };
  if (p.jitter) {
    for (int r = 0; r < 4; ++r) {
      const int64_t op = p.order[r];
      const double f = p.factors[op];
      if (op == cpu::kBrightness) {
        for (double& x : v) x = clamp01(f * x);
      } else if (op == cpu::kContrast) {
        double mean = 0.0;
        for (int64_t i = 0; i < oh; ++i)
          for (int64_t j = 0; j < ow; ++j) mean += gray_at(i, j);
        mean /= static_cast<double>(oh * ow);
        for (double& x : v) x = clamp01(f * x + (1 - f) * mean);
      } else if (op == cpu::kSaturation) {
        for (int64_t i = 0; i < oh; ++i) {
          for (int64_t j = 0; j < ow; ++j) {
            const double gr = gray_at(i, j);
            for (int64_t c = 0; c < 3; ++c) at(c, i, j) = clamp01(f * at(c, i, j) + (1 - f) * gr);
          }
        }
      } else if (f != 0.0) {
        for (int64_t i = 0; i < oh; ++i) {
          for (int64_t j = 0; j < ow; ++j) {
            double h, s, val, rr, gg, bb;
            rgb_to_hsv(at(0, i, j), at(1, i, j), at(2, i, j), h, s, val);
            hsv_to_rgb(h + f, s, val, rr, gg, bb);
            at(0, i, j) = clamp01(rr);
            at(1, i, j) = clamp01(gg);
            at(2, i, j) = clamp01(bb);
          }
        }
      }
    }
  }
  if (p.gray) {
    for (int64_t i = 0; i < oh; ++i) {
      for (int64_t j = 0; j < ow; ++j) {
        const double gr = gray_at(i, j);
        for (int64_t c = 0; c < 3; ++c) at(c, i, j) = gr;
      }
    }
  }
  if (p.blur) {
    const std::vector<double> k = naive_taps(p.sigma, K);
    const int64_t r = K / 2;
    std::vector<double> out(v.size(), 0.0);
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j)
          for (int64_t a = -r; a <= r; ++a)
            for (int64_t b = -r; b <= r; ++b)
              out[(c * oh + i) * ow + j] +=
                  k[a + r] * k[b + r] * at(c, reflect(i + a, oh), reflect(j + b, ow));
    v = out;
  }
  for (double& x : v) x = std::min(std::max(2.0 * x - 1.0, -1.0), 1.0);
  return v;
}

struct Batch {
  std::vector<int64_t> src, crop, order;
  std::vector<uint8_t> flip, jitter, gray, blur;
  std::vector<float> factors, sigma;

  void add(int64_t image, const ViewParams& p) {
    src.push_back(image);
    crop.insert(crop.end(), p.crop, p.crop + 4);
    order.insert(order.end(), p.order, p.order + 4);
    factors.insert(factors.end(), p.factors, p.factors + 4);
    flip.push_back(p.flip);
    jitter.push_back(p.jitter);
    gray.push_back(p.gray);
    blur.push_back(p.blur);
    sigma.push_back(p.sigma);
  }

  cpu::SimclrViewsProblem problem(const std::vector<float>& images, int64_t B, int64_t H,
                                  int64_t W, int64_t oh, int64_t ow, int64_t K, float* out) const {
    cpu::SimclrViewsProblem P;
    P.images = images.data();
    P.image_strides = {3 * H * W, H * W, W, 1};
    P.batch = B;
    P.height = H;
    P.width = W;
    P.views = static_cast<int64_t>(src.size());
    P.src_index = src.data();
    P.crop = crop.data();
    P.flip = flip.data();
    P.jitter = jitter.data();
    P.order = order.data();
    P.factors = factors.data();
    P.gray = gray.data();
    P.blur = blur.data();
    P.sigma = sigma.data();
    P.out = out;
    P.out_height = oh;
    P.out_width = ow;
    P.blur_kernel = K;
    return P;
  }
};

ViewParams random_params(std::mt19937& rng, int64_t H, int64_t W) {
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  ViewParams p;
  const int64_t ch = 1 + static_cast<int64_t>(u(rng) * H) % H;
  const int64_t cw = 1 + static_cast<int64_t>(u(rng) * W) % W;
  p.crop[0] = static_cast<int64_t>(u(rng) * (H - ch + 1)) % (H - ch + 1);
  p.crop[1] = static_cast<int64_t>(u(rng) * (W - cw + 1)) % (W - cw + 1);
  p.crop[2] = ch;
  p.crop[3] = cw;
  p.flip = u(rng) < 0.5f;
  p.jitter = u(rng) < 0.8f;
  int64_t order[4] = {0, 1, 2, 3};
  std::shuffle(order, order + 4, rng);
  std::copy(order, order + 4, p.order);
  for (int k = 0; k < 3; ++k) p.factors[k] = 0.2f + 1.6f * u(rng);
  p.factors[3] = -0.5f + u(rng);
  p.gray = u(rng) < 0.2f;
  p.blur = u(rng) < 0.5f;
  p.sigma = 0.1f + 1.9f * u(rng);
  return p;
}

void check_views(std::mt19937& rng, int64_t B, int64_t H, int64_t W, int64_t oh, int64_t ow,
                 int64_t K, int views) {
  const std::vector<float> images = uniform(rng, static_cast<size_t>(B * 3 * H * W), -1.0f, 1.0f);
  Batch batch;
  std::vector<ViewParams> params;
  for (int n = 0; n < views; ++n) {
    params.push_back(random_params(rng, H, W));
    batch.add(n % B, params.back());
  }
  std::vector<float> out(static_cast<size_t>(views * 3 * oh * ow), 7.0f);
  cpu::SimclrViewsProblem P = batch.problem(images, B, H, W, oh, ow, K, out.data());
  EXPECT(cpu::check_simclr_views(P).error == cpu::ViewsError::kNone, "valid problem rejected");
  cpu::simclr_views(P, 2);
  double worst = 0.0;
  for (int n = 0; n < views; ++n) {
    std::vector<float> img(images.begin() + (n % B) * 3 * H * W,
                           images.begin() + (n % B + 1) * 3 * H * W);
    const std::vector<double> want = naive_view(img, H, W, params[n], oh, ow, K);
    for (size_t e = 0; e < want.size(); ++e) {
      worst = std::max(worst, std::fabs(out[n * 3 * oh * ow + e] - want[e]));
    }
  }
  EXPECT(worst < 2e-5, "views %lldx%lld -> %lldx%lld K=%lld: max error %.3g",
         static_cast<long long>(H), static_cast<long long>(W), static_cast<long long>(oh),
         static_cast<long long>(ow), static_cast<long long>(K), worst);
  for (int nt : {1, 3}) {  // views are independent: any thread count gives the same bits
    std::vector<float> again(out.size(), -7.0f);
    P.out = again.data();
    cpu::simclr_views(P, nt);
    EXPECT(std::memcmp(again.data(), out.data(), out.size() * sizeof(float)) == 0,
           "%d threads differ", nt);
  }
}

void test_views() {
  std::mt19937 rng(5);
  check_views(rng, 3, 16, 16, 16, 16, 3, 12);
  check_views(rng, 2, 13, 21, 13, 21, 5, 10);   // odd, non-square
  check_views(rng, 2, 24, 20, 9, 31, 3, 10);    // output size unlike the input
  check_views(rng, 1, 7, 5, 12, 10, 7, 6);      // large kernel on a small output
}

void test_checks() {
  std::vector<float> images(2 * 3 * 8 * 10, 0.0f);
  std::mt19937 rng(3);
  Batch batch;
  batch.add(0, random_params(rng, 8, 10));
  batch.add(1, random_params(rng, 8, 10));
  std::vector<float> out(2 * 3 * 8 * 10);
  auto P = batch.problem(images, 2, 8, 10, 8, 10, 3, out.data());
  EXPECT(cpu::check_simclr_views(P).error == cpu::ViewsError::kNone, "valid problem rejected");
  auto bad = P;
  bad.blur_kernel = 4;
  EXPECT(cpu::check_simclr_views(bad).error == cpu::ViewsError::kBlurKernel, "even kernel");
  bad.blur_kernel = 17;
  EXPECT(cpu::check_simclr_views(bad).error == cpu::ViewsError::kBlurKernel, "kernel too large");
  bad = P;
  bad.out_width = 0;
  EXPECT(cpu::check_simclr_views(bad).error == cpu::ViewsError::kOutputSize, "empty output");
  Batch b2 = batch;
  b2.src[1] = 2;
  auto c = cpu::check_simclr_views(b2.problem(images, 2, 8, 10, 8, 10, 3, out.data()));
  EXPECT(c.error == cpu::ViewsError::kSrcIndex && c.view == 1, "src index out of range");
  b2 = batch;
  b2.crop[4 + 0] = 5;
  b2.crop[4 + 2] = 4;  // rows 5..8 of 8
  c = cpu::check_simclr_views(b2.problem(images, 2, 8, 10, 8, 10, 3, out.data()));
  EXPECT(c.error == cpu::ViewsError::kCrop && c.view == 1, "crop outside the image");
  b2 = batch;
  b2.crop[3] = 0;
  c = cpu::check_simclr_views(b2.problem(images, 2, 8, 10, 8, 10, 3, out.data()));
  EXPECT(c.error == cpu::ViewsError::kCrop && c.view == 0, "empty crop");
  b2 = batch;
  b2.order[2] = 4;
  c = cpu::check_simclr_views(b2.problem(images, 2, 8, 10, 8, 10, 3, out.data()));
  EXPECT(c.error == cpu::ViewsError::kOrder && c.view == 0, "bad op code");
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_simclr_views"); status >= 0) return status;
  test_gaussian_taps();
  test_blur();
  test_hue();
  test_bilinear_taps();
  test_views();
  test_checks();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
