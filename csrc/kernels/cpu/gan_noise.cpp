// Instance noise on the CPU (stream and contracts in gan_noise.h).
#include "gan_noise.h"

#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/isa.h"
#include "kernels/cpu/threads.h"

namespace mgm_fast {
namespace cpu {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int64_t kGroupsPerChunk = 4096;  // 16K elements per parallel chunk (a 64 KB buffer)

MGM_FAST_INLINE uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// GCC/Clang vectors of the groups of one step: kLanes 32-bit lanes, one register at the level
// normals_body is compiled for (GCC keeps a wider vector in memory and moves it through general
// registers). The helpers take and return them by reference and are always inlined (a
// by-value vector argument would have an ISA-dependent ABI).
template <int kLanes>
struct GroupVecs {
  typedef uint32_t VU32 __attribute__((vector_size(kLanes * 4)));
  typedef int32_t VI32 __attribute__((vector_size(kLanes * 4)));
  typedef uint64_t VU64 __attribute__((vector_size(kLanes * 8)));
  typedef float VF __attribute__((vector_size(kLanes * 4)));
};

// The vector types of GroupVecs<kLanes> by their short names, in a helper templated on kLanes.
#define MGM_FAST_GROUP_VECS(kLanes)                                \
  using VU32 [[maybe_unused]] = typename GroupVecs<kLanes>::VU32; \
  using VI32 [[maybe_unused]] = typename GroupVecs<kLanes>::VI32; \
  using VU64 [[maybe_unused]] = typename GroupVecs<kLanes>::VU64; \
  using VF [[maybe_unused]] = typename GroupVecs<kLanes>::VF

// High 32 bits of the 32 x 32-bit products a * b, lane by lane.
#define MGM_FAST_MULHI_V(a, b) \
  __builtin_convertvector((__builtin_convertvector((b), VU64) * static_cast<uint64_t>(a)) >> 32, VU32)

// Triton's uint_to_uniform_float: the bits as int32, negatives complemented, times
// 4.6566127342e-10 (the largest scale keeping 2^31 - 1 below 1 after float rounding).
template <int kLanes>
MGM_FAST_INLINE void to_uniform(const typename GroupVecs<kLanes>::VU32& bits,
                                typename GroupVecs<kLanes>::VF& out) {
  MGM_FAST_GROUP_VECS(kLanes);
  const VI32 v = (VI32)bits;  // same-size vector casts reinterpret the bits
  const VI32 folded = v < 0 ? ~v : v;
  out = __builtin_convertvector(folded, VF) * 4.6566127342e-10f;
}

// log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(t),
// t = (m - 1) / (m + 1), |t| < 0.172, by its series to t^9 (truncation < 1e-9 relative).
template <int kLanes>
MGM_FAST_INLINE void log_normal(const typename GroupVecs<kLanes>::VF& x,
                                typename GroupVecs<kLanes>::VF& out) {
  MGM_FAST_GROUP_VECS(kLanes);
  const VU32 b = (VU32)x;
  VI32 e = ((VI32)b >> 23) - 127;
  VF m = (VF)((b & 0x007fffffu) | 0x3f800000u);
  const VI32 big = m > 1.41421356f;  // -1 where true
  m = big ? m * 0.5f : m;
  e -= big;
  const VF t = (m - 1.0f) / (m + 1.0f);
  const VF t2 = t * t;
  VF p = VF{} + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  out = __builtin_convertvector(e, VF) * 0.693147180559945f + 2.0f * t * p;
}

// sqrt(y) for y > 0 as y / sqrt(y): an integer-trick estimate of 1 / sqrt(y) refined by three
// Newton steps (relative error 3e-2 -> 1e-3 -> 2e-6 -> 5e-12); libm's sqrtf keeps a scalar
// errno path unless the whole build uses -fno-math-errno.
template <int kLanes>
MGM_FAST_INLINE void sqrt_positive(const typename GroupVecs<kLanes>::VF& y,
                                   typename GroupVecs<kLanes>::VF& out) {
  MGM_FAST_GROUP_VECS(kLanes);
  VF r = (VF)(0x5f3759dfu - ((VU32)y >> 1));
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  out = y * r;
}

// sin and cos of 2 pi v for v in [0, 1): reduced to the nearest quarter turn q, the rest
// a = 2 pi (v - round(v) - q / 4) in [-pi/4, pi/4] by Taylor polynomials (degree 9 / 10,
// truncation < 3e-9), then rotated by q. Computing in turns skips the rounding of 2 pi v.
template <int kLanes>
MGM_FAST_INLINE void sincos_turns(const typename GroupVecs<kLanes>::VF& v,
                                  typename GroupVecs<kLanes>::VF& sin_out,
                                  typename GroupVecs<kLanes>::VF& cos_out) {
  MGM_FAST_GROUP_VECS(kLanes);
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VF w = v - ((v + kShift) - kShift);     // [-0.5, 0.5]
  const VF q = (4.0f * w + kShift) - kShift;    // nearest quarter turn, -2..2
  const VF a = 6.28318530717958648f * (w - 0.25f * q);
  const VF a2 = a * a;
  VF sp = VF{} + 1.0f / 362880.0f;
  sp = sp * a2 - 1.0f / 5040.0f;
  sp = sp * a2 + 1.0f / 120.0f;
  sp = sp * a2 - 1.0f / 6.0f;
  const VF sa = a + a * a2 * sp;
  VF cp = VF{} - 1.0f / 3628800.0f;
  cp = cp * a2 + 1.0f / 40320.0f;
  cp = cp * a2 - 1.0f / 720.0f;
  cp = cp * a2 + 1.0f / 24.0f;
  cp = cp * a2 - 0.5f;
  const VF ca = 1.0f + a2 * cp;
  const VI32 k = __builtin_convertvector(q, VI32) & 3;
  sin_out = k == 0 ? sa : (k == 1 ? ca : (k == 2 ? -sa : -ca));
  cos_out = k == 0 ? ca : (k == 1 ? -sa : (k == 2 ? -ca : sa));
}

// z[4 (q - q0) + lane] for the groups q in [q0, q0 + count): Philox on kLanes groups at a time
// (one vector register of 32-bit lanes), then Box-Muller on the two pairs of uniforms of each
// group. A group's values do not depend on kLanes.
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void normals_body(uint64_t seed, uint64_t q0, int64_t count, float* z) {
  constexpr int kLanes = vector_floats(kIsa);
  MGM_FAST_GROUP_VECS(kLanes);
  VU32 lane_ids;
  for (int64_t l = 0; l < kLanes; ++l) lane_ids[l] = static_cast<uint32_t>(l);
  for (int64_t g0 = 0; g0 < count; g0 += kLanes) {
    const uint64_t first = q0 + static_cast<uint64_t>(g0);
    // counters (q mod 2^32, q / 2^32, 0, 0); the high word changes inside a step only when
    // the low word wraps
    VU32 c0 = lane_ids + static_cast<uint32_t>(first);
    VU32 c1 = (c0 < static_cast<uint32_t>(first) ? 1u : 0u) + static_cast<uint32_t>(first >> 32);
    VU32 c2 = VU32{}, c3 = VU32{};
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const VU32 a0 = c0, a2 = c2;
      c0 = MGM_FAST_MULHI_V(kRoundB, a2) ^ c1 ^ k0;
      c2 = MGM_FAST_MULHI_V(kRoundA, a0) ^ c3 ^ k1;
      c1 = a2 * kRoundB;
      c3 = a0 * kRoundA;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    VF n[4];
    const VU32 words[4] = {c0, c1, c2, c3};
    for (int p = 0; p < 2; ++p) {
      VF a, b, log_a, r, sn, cs;
      to_uniform<kLanes>(words[2 * p], a);
      to_uniform<kLanes>(words[2 * p + 1], b);
      a = a > 1.0e-7f ? a : VF{} + 1.0e-7f;
      log_normal<kLanes>(a, log_a);
      sqrt_positive<kLanes>(-2.0f * log_a, r);
      sincos_turns<kLanes>(b, sn, cs);
      n[2 * p] = r * cs;
      n[2 * p + 1] = r * sn;
    }
    const int64_t lanes = count - g0 < kLanes ? count - g0 : kLanes;
    for (int64_t l = 0; l < lanes; ++l) {
      for (int k = 0; k < 4; ++k) z[4 * (g0 + l) + k] = n[k][l];
    }
  }
}
constexpr auto& normals = MGM_FAST_ISA_DISPATCH_PER_LEVEL(normals_body);

}  // namespace

void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mulhi(kRoundB, c2) ^ c[1] ^ k0;
    c[2] = mulhi(kRoundA, c0) ^ c[3] ^ k1;
    c[1] = kRoundB * c2;
    c[3] = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

void normal4(uint64_t seed, uint64_t group, float out[4]) { normals(seed, group, 1, out); }

// Not ISA-versioned on purpose: without FMA, out = x + (std * n) is rounded twice, exactly as
// the formula reads (and as torch evaluates x + std * noise).
void instance_noise(const float* x, float* out, float* noise, int64_t n, float std,
                    uint64_t seed, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const int64_t groups = (n + 3) / 4;
  const int64_t chunks = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
#pragma omp parallel num_threads(nt) if (chunks > 1)
  {
    std::vector<float> z(static_cast<size_t>(4 * kGroupsPerChunk));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t q0 = ch * kGroupsPerChunk;
      const int64_t count = groups - q0 < kGroupsPerChunk ? groups - q0 : kGroupsPerChunk;
      normals(seed, static_cast<uint64_t>(q0), count, z.data());
      const int64_t e0 = 4 * q0;
      const int64_t len = n - e0 < 4 * count ? n - e0 : 4 * count;
      for (int64_t i = 0; i < len; ++i) {
        const float scaled = std * z[i];
        out[e0 + i] = x[e0 + i] + scaled;
      }
      if (noise != nullptr) std::memcpy(noise + e0, z.data(), static_cast<size_t>(len) * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace mgm_fast
