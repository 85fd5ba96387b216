// The ISA level of a CPU kernel test: ctest runs each test once per level with MGM_FAST_CPU_ISA
// set (CMakeLists.txt), and main() starts with
//   if (const int status = start_cpu_isa_test("test_x"); status >= 0) return status;
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>

#include "kernels/cpu/isa.h"

// ctest's SKIP_RETURN_CODE for the CPU kernel tests.
inline constexpr int kSkipTest = 77;

// Resolves the kernels' ISA level before a test's kernels run, and prints it. Returns -1 to go
// on; otherwise the exit status for main(): kSkipTest, with a line saying so, when this CPU (or
// build) lacks the requested level, 1 when the variable's value is not a level.
inline int start_cpu_isa_test(const char* test) {
  using namespace mgm_fast::cpu;
  const char* requested = std::getenv(kCpuIsaEnv);
  const std::optional<CpuIsa> level = parse_cpu_isa(requested != nullptr ? requested : "");
  if (level && !cpu_isa_supported(*level)) {
    std::printf("%s: skipped, this CPU or build lacks %s=%s\n", test, kCpuIsaEnv, requested);
    return kSkipTest;
  }
  try {
    std::printf("%s: CPU ISA level %s\n", test, cpu_isa_name(active_cpu_isa()));
  } catch (const std::exception& err) {
    std::fprintf(stderr, "%s: %s\n", test, err.what());
    return 1;
  }
  return -1;
}
