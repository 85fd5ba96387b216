// Unit tests of the torch-free CPU instance noise (csrc/kernels/cpu/gan_noise.*): Philox4x32-10
// known answers (the Random123 vectors, which Triton's tl.philox reproduces, plus one vector
// computed with tl.philox), the Box-Muller normals against a double-precision evaluation of the
// same formula, out == x + std * noise exactly, moments, independence of neighbours and lanes,
// and thread-count invariance. Built and run by CMake/ctest.
#include "kernels/cpu/gan_noise.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

void test_philox_known_answers() {
  struct Kat {
    uint64_t key;
    uint32_t counter[4];
    uint32_t want[4];
  };
  const Kat kats[] = {
      {0x0ull, {0, 0, 0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {0x299f31d0a4093822ull,
       {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
      {12345678901ull, {7, 0, 0, 0}, {0xc3f5b585u, 0x53600582u, 0xd3eb45c8u, 0x597f10a3u}},
  };
  for (const Kat& k : kats) {
    uint32_t c[4] = {k.counter[0], k.counter[1], k.counter[2], k.counter[3]};
    mgm_fast::cpu::philox4x32_10(c, static_cast<uint32_t>(k.key), static_cast<uint32_t>(k.key >> 32));
    EXPECT(std::memcmp(c, k.want, sizeof(c)) == 0, "philox(key %llx): %08x %08x %08x %08x",
           static_cast<unsigned long long>(k.key), c[0], c[1], c[2], c[3]);
  }
}

// The normals of a group from the same integers, evaluated in double.
void normals_double(uint64_t seed, uint64_t group, double out[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0, 0};
  mgm_fast::cpu::philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  double u[4];
  for (int k = 0; k < 4; ++k) {
    int32_t v;
    std::memcpy(&v, &c[k], sizeof(v));
    v = v < 0 ? ~v : v;
    u[k] = static_cast<double>(static_cast<float>(v) * 4.6566127342e-10f);
  }
  for (int k = 0; k < 4; k += 2) {
    const double a = u[k] > 1e-7 ? u[k] : static_cast<double>(1e-7f);
    const double r = std::sqrt(-2.0 * std::log(a));
    const double t = static_cast<double>(6.283185307179586f) * u[k + 1];
    out[k] = r * std::cos(t);
    out[k + 1] = r * std::sin(t);
  }
}

void test_normals_match_the_formula() {
  double worst = 0.0;
  for (uint64_t q = 0; q < 20000; ++q) {
    float got[4];
    double want[4];
    mgm_fast::cpu::normal4(42, q * 7919, got);
    normals_double(42, q * 7919, want);
    for (int k = 0; k < 4; ++k) worst = std::fmax(worst, std::fabs(got[k] - want[k]));
  }
  EXPECT(worst < 2e-5, "normals differ from the double evaluation by %.3g", worst);
}

void test_stream() {
  const int64_t n = (1 << 20) + 3;  // not a multiple of 4: a partial last group
  std::vector<float> x(static_cast<size_t>(n)), out(x.size()), noise(x.size());
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 97) * 0.01f - 0.5f;
  const float std_dev = 0.25f;
  mgm_fast::cpu::instance_noise(x.data(), out.data(), noise.data(), n, std_dev, 2024, 2);

  // the group layout: element e is lane e % 4 of group e / 4
  float z[4];
  mgm_fast::cpu::normal4(2024, 12345, z);
  EXPECT(std::memcmp(z, &noise[4 * 12345], sizeof(z)) == 0, "element layout");
  bool exact = true;
  for (int64_t i = 0; i < n; ++i) exact = exact && out[i] == x[i] + std_dev * noise[i];
  EXPECT(exact, "out != x + std * noise");

  double sum = 0.0, sq = 0.0, cross = 0.0, lane_cross = 0.0, fourth = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    sum += noise[i];
    sq += double(noise[i]) * noise[i];
    fourth += std::pow(double(noise[i]), 4);
    if (i + 1 < n) cross += double(noise[i]) * noise[i + 1];
    if (i + 4 < n) lane_cross += double(noise[i]) * noise[i + 4];
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  EXPECT(std::fabs(mean) < 5.0 / std::sqrt(double(n)), "mean %.5f", mean);
  EXPECT(std::fabs(var - 1.0) < 0.01, "variance %.5f", var);
  EXPECT(std::fabs(fourth / n - 3.0) < 0.05, "fourth moment %.4f (normal: 3)", fourth / n);
  EXPECT(std::fabs(cross / n) < 5.0 / std::sqrt(double(n)), "neighbour correlation %.5f", cross / n);
  EXPECT(std::fabs(lane_cross / n) < 5.0 / std::sqrt(double(n)), "group correlation %.5f",
         lane_cross / n);

  // same seed: same bits for any thread count; another seed: another stream
  std::vector<float> again(x.size()), other(x.size());
  mgm_fast::cpu::instance_noise(x.data(), again.data(), nullptr, n, std_dev, 2024, 1);
  EXPECT(again == out, "differs with 1 thread");
  mgm_fast::cpu::instance_noise(x.data(), other.data(), nullptr, n, std_dev, 2025, 2);
  int64_t same = 0;
  for (int64_t i = 0; i < n; ++i) same += other[i] == out[i];
  EXPECT(same < n / 1000, "seeds 2024 and 2025 agree on %lld elements", static_cast<long long>(same));

  // in place
  std::vector<float> inplace = x;
  mgm_fast::cpu::instance_noise(inplace.data(), inplace.data(), nullptr, n, std_dev, 2024, 2);
  EXPECT(inplace == out, "in-place result differs");
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_gan_noise"); status >= 0) return status;
  test_philox_known_answers();
  test_normals_match_the_formula();
  test_stream();
  std::printf("test_gan_noise: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
