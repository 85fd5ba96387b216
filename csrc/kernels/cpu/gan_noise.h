// Instance noise for the GAN losses: out = x + std * n, n ~ N(0, 1) drawn in the same pass from a
// counter-based generator, so no noise tensor is written and read back.
//
// Torch-free C++17; the torch glue is csrc/bindings/gan_noise.cpp and the op
// mgm_fast/ops/gan_losses.py (noisy). The stream is the one of the Triton backend
// (mgm_fast/ops/_triton/gan_losses.py, tl.randn4x): element e of the flat (memory-order) tensor
// takes lane e % 4 of the group q = e / 4:
//
//   (c0, c1, c2, c3) = Philox4x32-10(counter = (q mod 2^32, q / 2^32, 0, 0),
//                                    key = (seed mod 2^32, seed / 2^32))
//   u_k = (c_k as int32 v; v < 0 ? ~v : v) * 4.6566127342e-10f       uniforms in [0, 1)
//   (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3)
//   BoxMuller(a, b) = r (cos t, sin t),  r = sqrt(-2 log max(a, 1e-7)),  t = 2 pi b
//
// with Triton's Philox constants and rounds (standard Philox4x32-10), so the integers are
// identical bit for bit. The float transforms here are vectorised polynomials (log, 1/sqrt by
// Newton, sin/cos of the turn 2 pi b computed in turns), about 1e-6 from libdevice's (or the
// interpreter's numpy) results, so the normals agree to ~1e-6, not bit for bit. Philox runs on
// one vector register of groups at a time in GCC/Clang vectors, compiled per ISA (isa.h: 16
// groups with AVX-512, 8 with AVX2, 4 with SSE2; a group's values do not depend on how many).
// out is computed as x + (std * n) with two roundings, as the formula reads.
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// Ten Philox4x32 rounds on (c0..c3) with key (k0, k1), in place (Triton's philox_impl).
void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1);

/// The four normals of group q for `seed` (the stream above).
void normal4(uint64_t seed, uint64_t group, float out[4]);

/// out[e] = x[e] + std * n_e for e < n (contiguous float32); noise[e] = n_e too when noise is
/// not nullptr. x may alias out. num_threads <= 0 uses the OpenMP default; the values do not
/// depend on the thread count.
void instance_noise(const float* x, float* out, float* noise, int64_t n, float std,
                    uint64_t seed, int num_threads);

}  // namespace cpu
}  // namespace mgm_fast
