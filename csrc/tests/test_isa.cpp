// Unit tests of the ISA level choice (csrc/kernels/cpu/isa.*): level names, the supported list,
// MGM_FAST_CPU_ISA, set_cpu_isa and its errors, and that a dispatcher runs the version compiled
// for the active level (of a plain body and of one templated on the level). Built and run by
// CMake/ctest at every level and in the portable build.
#include "kernels/cpu/isa.h"
#include "tests/cpu_isa_test.h"
#include "tests/expect.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

using mgm_fast::cpu::CpuIsa;

namespace {

// a * b + c: the x86-64-v3/v4 versions have FMA and contract it (GCC and Clang contract within
// an expression by default in C++), baseline x86-64 has no FMA and rounds the product first.
MGM_FAST_ISA_BODY float multiply_add_body(const float* a, const float* b, const float* c) {
  return *a * *b + *c;
}
constexpr auto& multiply_add = MGM_FAST_ISA_DISPATCH(multiply_add_body);

// Arguments by reference and by value, and the return value, pass through a dispatcher.
MGM_FAST_ISA_BODY int add_into_body(std::vector<int>& out, const std::vector<int>& in, int bias) {
  for (int v : in) out.push_back(v + bias);
  return static_cast<int>(out.size());
}
constexpr auto& add_into = MGM_FAST_ISA_DISPATCH(add_into_body);

// A body templated on the level: the dispatcher must run the instance of the active level.
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY int scaled_vector_floats_body(int scale) {
  return scale * mgm_fast::cpu::vector_floats(kIsa);
}
constexpr auto& scaled_vector_floats = MGM_FAST_ISA_DISPATCH_PER_LEVEL(scaled_vector_floats_body);

// (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24 exactly; the float product rounds the 2^-24 away.
float probe_multiply_add() {
  const float a = 1.0f + 0x1p-12f, c = -(1.0f + 0x1p-11f);
  return multiply_add(&a, &a, &c);
}

bool throws_invalid_argument(const char* name, const char* must_mention) {
  try {
    mgm_fast::cpu::set_cpu_isa(name);
  } catch (const std::invalid_argument& err) {
    return std::string(err.what()).find(must_mention) != std::string::npos;
  }
  return false;
}

void test_names() {
  using namespace mgm_fast::cpu;
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kX86_64_V3, CpuIsa::kX86_64_V4}) {
    const std::optional<CpuIsa> parsed = parse_cpu_isa(cpu_isa_name(isa));
    EXPECT(parsed && *parsed == isa, "%s does not parse back", cpu_isa_name(isa));
  }
  EXPECT(!parse_cpu_isa("auto"), "auto is not a level");
  EXPECT(!parse_cpu_isa("x86-64-v2"), "x86-64-v2 is not a level of the kernels");
  EXPECT(!parse_cpu_isa("Baseline"), "names are case-sensitive");
}

void test_supported_levels() {
  using namespace mgm_fast::cpu;
  const std::vector<CpuIsa>& levels = supported_cpu_isas();
  EXPECT(!levels.empty() && levels.front() == CpuIsa::kBaseline, "baseline must come first");
  for (size_t i = 1; i < levels.size(); ++i) {
    EXPECT(levels[i - 1] < levels[i], "levels must increase");
  }
  EXPECT(best_cpu_isa() == levels.back(), "best level %s", cpu_isa_name(best_cpu_isa()));
  if (!cpu_isa_versions_compiled()) {
    EXPECT(levels.size() == 1, "a portable build runs only baseline");
  }
}

void test_environment_choice() {
  using namespace mgm_fast::cpu;
  const char* requested = std::getenv(kCpuIsaEnv);
  const std::string want = requested == nullptr || std::string(requested).empty() ||
                                   std::string(requested) == "auto"
                               ? cpu_isa_name(best_cpu_isa())
                               : requested;
  EXPECT(want == cpu_isa_name(active_cpu_isa()), "%s=%s but the level is %s", kCpuIsaEnv,
         requested != nullptr ? requested : "(unset)", cpu_isa_name(active_cpu_isa()));
}

void test_forced_levels_run_their_version() {
  using namespace mgm_fast::cpu;
  const CpuIsa initial = active_cpu_isa();
  for (CpuIsa isa : supported_cpu_isas()) {
    set_cpu_isa(isa);
    EXPECT(active_cpu_isa() == isa, "set_cpu_isa(%s) not applied", cpu_isa_name(isa));
    const float got = probe_multiply_add();
    const float want = isa == CpuIsa::kBaseline ? 0.0f : 0x1p-24f;
    EXPECT(got == want, "%s: a * b + c = %a, want %a (the %s version)", cpu_isa_name(isa), got,
           want, isa == CpuIsa::kBaseline ? "unfused" : "FMA");
    std::vector<int> out = {7};
    const int n = add_into(out, {1, 2, 3}, 10);
    EXPECT(n == 4 && out == std::vector<int>({7, 11, 12, 13}), "%s: arguments not forwarded",
           cpu_isa_name(isa));
    const int floats = scaled_vector_floats(3);
    EXPECT(floats == 3 * vector_floats(isa), "%s: the per-level body ran the %d-float instance",
           cpu_isa_name(isa), floats / 3);
  }
  set_cpu_isa("auto");
  EXPECT(active_cpu_isa() == best_cpu_isa(), "set_cpu_isa(auto) must pick the best level");
  set_cpu_isa(initial);
}

void test_errors() {
  using namespace mgm_fast::cpu;
  const CpuIsa initial = active_cpu_isa();
  EXPECT(throws_invalid_argument("x86-64-v5", "use auto, baseline, x86-64-v3 or x86-64-v4"),
         "an unknown level must be refused with the choices");
  EXPECT(throws_invalid_argument("", "use auto"), "an empty name must be refused");
  for (CpuIsa isa : {CpuIsa::kX86_64_V3, CpuIsa::kX86_64_V4}) {
    if (!cpu_isa_supported(isa)) {
      EXPECT(throws_invalid_argument(cpu_isa_name(isa), "not supported"),
             "unsupported %s must be refused", cpu_isa_name(isa));
    }
  }
  EXPECT(active_cpu_isa() == initial, "a refused level must leave the active one");
}

}  // namespace

int main() {
  if (const int status = start_cpu_isa_test("test_isa"); status >= 0) return status;
  test_names();
  test_supported_levels();
  test_environment_choice();
  test_forced_levels_run_their_version();
  test_errors();
  std::printf("test_isa: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
