// Shared compiler attributes of the CPU kernels.
//
// Row workers marked MGM_FAST_ISA_CLONES are compiled three times -- baseline x86-64 (SSE2),
// x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) -- and the loader picks the best for the running CPU
// (GCC/Clang target_clones, an ifunc). The project is built without -march flags, so this is how
// the vectorised loops get the wide registers. The AVX2/AVX-512 clones may contract a*b+c into
// FMAs and sum in wider vectors, so results can differ in the last bits between machines of
// different ISA; on one machine they are bit-identical for any thread count. Both the clone this
// machine picks and the baseline code are unit-tested (CMakeLists.txt builds each C++ test with
// and without MGM_FAST_NO_TARGET_CLONES).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__) && \
    !defined(MGM_FAST_NO_TARGET_CLONES)
#define MGM_FAST_ISA_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define MGM_FAST_ISA_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MGM_FAST_INLINE inline __attribute__((always_inline))
#else
#define MGM_FAST_INLINE inline
#endif
