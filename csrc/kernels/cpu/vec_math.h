// Vectorisable float math and vector types shared by the CPU kernels (multitask_loss.cpp,
// ntxent.cpp, sagan_attention.cpp, simclr_views.cpp).
//
// Header-only and always inlined, so each caller's ISA version (isa.h) compiles it for its own
// vector width; plain C++ arithmetic with no selects or calls, so a loop over it vectorises
// without -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cpu/isa.h"

namespace mgm_fast {
namespace cpu {
namespace vec_math_detail {

MGM_FAST_INLINE uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

MGM_FAST_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace vec_math_detail

// kFloats floats as one GCC/Clang vector, and the same vector at float alignment (the type
// through which memory is read and written). A kernel body sizes them by vector_floats() of its
// level (isa.h): wider ones are split by GCC and, as accumulators, kept in memory.
template <int kFloats>
struct FloatVec {
  typedef float type __attribute__((vector_size(kFloats * sizeof(float))));
  typedef float unaligned
      __attribute__((vector_size(kFloats * sizeof(float)), aligned(alignof(float))));
};

// The kFloats floats at p as one vector, by reference (a vector passed or returned by value
// would have an ISA-dependent ABI).
template <int kFloats>
MGM_FAST_INLINE typename FloatVec<kFloats>::unaligned& vec_at(float* p) {
  return *reinterpret_cast<typename FloatVec<kFloats>::unaligned*>(p);
}

template <int kFloats>
MGM_FAST_INLINE const typename FloatVec<kFloats>::unaligned& vec_at(const float* p) {
  return *reinterpret_cast<const typename FloatVec<kFloats>::unaligned*>(p);
}

// exp(x) for x in [-104, 0] (callers clamp: exp(-104) is below half the smallest subnormal, so
// the result rounds to 0). Select-free, so loops over it vectorise without -ffast-math:
// x = k ln2 + r with k = round(x / ln2) (the 1.5 * 2^23 trick) and ln2 split in a part exact
// in k * hi and the rest (Cody-Waite), exp(r) on |r| <= ln2/2 by a degree-7 Taylor polynomial
// (truncation ~6e-9 relative), and 2^k formed as two halves so k down to -150 underflows
// gradually. About 1 ulp on normal results; NaN stays NaN.
MGM_FAST_INLINE float exp_clamped(float x) {
  using vec_math_detail::as_bits;
  using vec_math_detail::as_float;
  constexpr float kInvLn2 = 1.44269504088896341f;
  constexpr float kHi = 0.693359375f;  // 355/512: k * kHi is exact for |k| <= 2^15
  constexpr float kLo = -2.12194440e-4f;  // ln2 - kHi
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kInvLn2 + kShift;
  const float k = t - kShift;
  float r = x - k * kHi;
  r = r - k * kLo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // bits(t) - bits(kShift) == k while t stays in [2^23, 2^24); unsigned arithmetic keeps the
  // NaN case (p is NaN then) free of undefined behaviour.
  const int32_t e = static_cast<int32_t>(as_bits(t) - as_bits(kShift));
  const int32_t e1 = e / 2, e2 = e - e / 2;
  return p * as_float(static_cast<uint32_t>(e1 + 127) << 23) *
         as_float(static_cast<uint32_t>(e2 + 127) << 23);
}

// x where keep is true, else +0, by a bit mask: GCC turns a select of a computed value and a
// constant into a branch around that computation (the computation sunk into it), which only
// AVX-512 masking vectorises; a loop over this one vectorises under AVX2 and SSE2 too.
MGM_FAST_INLINE float zero_unless(bool keep, float x) {
  using vec_math_detail::as_bits;
  using vec_math_detail::as_float;
  return as_float(as_bits(x) & (keep ? ~0u : 0u));
}

// c ? x : y by a bit mask, both computed unconditionally. GCC turns a select between a value
// and a constant into a branch when the constant lets it simplify what follows the select (a
// clamped 0 or 1, a 0/1 factor), and a loop with such branches around float arithmetic only
// vectorises with AVX-512 masking; it does not branch on these bit operations.
MGM_FAST_INLINE float select_bits(bool c, float x, float y) {
  using vec_math_detail::as_bits;
  using vec_math_detail::as_float;
  const uint32_t m = 0u - static_cast<uint32_t>(c);  // all ones if c
  return as_float((as_bits(x) & m) | (as_bits(y) & ~m));
}

// exp(x) for x <= 0: exp_clamped(x), and 0 below -104 (-inf included), where exp_clamped(-104)
// rounds to 0 too; NaN stays NaN. exp_clamped runs on every x (below -104 its value is
// meaningless but free of undefined behaviour) and zero_unless drops it: clamping the argument
// instead let GCC fold the clamped path to a constant and branch around exp_clamped, so the
// loops over exp_nonpos stayed scalar under AVX2 and SSE2.
MGM_FAST_INLINE float exp_nonpos(float x) { return zero_unless(!(x < -104.0f), exp_clamped(x)); }

}  // namespace cpu
}  // namespace mgm_fast
