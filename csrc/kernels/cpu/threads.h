// OpenMP thread count of the CPU kernels, shared by every kernel file.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mgm_fast {
namespace cpu {

/// The threads a kernel runs on: num_threads when positive, else OpenMP's current maximum
/// (1 in a build without OpenMP).
inline int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

}  // namespace cpu
}  // namespace mgm_fast
