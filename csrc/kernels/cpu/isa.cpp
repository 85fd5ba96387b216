// The CPU's instruction-set levels and the active one (contracts in isa.h).
#include "kernels/cpu/isa.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace mgm_fast {
namespace cpu {
namespace detail {
std::atomic<int> g_cpu_isa{-1};
}  // namespace detail

namespace {

constexpr CpuIsa kAllLevels[] = {CpuIsa::kBaseline, CpuIsa::kX86_64_V3, CpuIsa::kX86_64_V4};

std::mutex& level_mutex() {
  static std::mutex m;
  return m;
}

#if MGM_FAST_ISA_VERSIONS
// What the CPU and the OS (saved vector state) support, by the same test as GCC's
// target_clones resolver for arch=x86-64-v3/v4.
bool cpu_has(CpuIsa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
#if defined(__clang__)
    // The level names are recent in Clang's __builtin_cpu_supports: their key features.
    case CpuIsa::kX86_64_V3:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case CpuIsa::kX86_64_V4:
      return cpu_has(CpuIsa::kX86_64_V3) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    case CpuIsa::kX86_64_V3:
      return __builtin_cpu_supports("x86-64-v3") != 0;
    case CpuIsa::kX86_64_V4:
      return __builtin_cpu_supports("x86-64-v4") != 0;
#endif
  }
  return false;
}
#else
bool cpu_has(CpuIsa isa) { return isa == CpuIsa::kBaseline; }
#endif

// "baseline, x86-64-v3, x86-64-v4", and why a level is missing in a portable build.
std::string supported_text() {
  std::string text;
  for (CpuIsa isa : supported_cpu_isas()) {
    if (!text.empty()) text += ", ";
    text += cpu_isa_name(isa);
  }
  if (!cpu_isa_versions_compiled()) {
    text += " (these kernels were compiled without ISA-specific versions)";
  }
  return text;
}

const char* const kChoices = "auto, baseline, x86-64-v3 or x86-64-v4";

// The level MGM_FAST_CPU_ISA asks for; std::runtime_error for a bad value.
CpuIsa level_from_environment() {
  const char* value = std::getenv(kCpuIsaEnv);
  const std::string_view name = value != nullptr ? value : "";
  if (name.empty() || name == "auto") return best_cpu_isa();
  const std::optional<CpuIsa> isa = parse_cpu_isa(name);
  if (!isa) {
    throw std::runtime_error(std::string(kCpuIsaEnv) + "='" + std::string(name) +
                             "' is not a CPU ISA level: use " + kChoices +
                             " (this CPU supports " + supported_text() + ")");
  }
  if (!cpu_isa_supported(*isa)) {
    throw std::runtime_error(std::string(kCpuIsaEnv) + "=" + std::string(name) +
                             " asks for a level this CPU lacks: it supports " + supported_text());
  }
  return *isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline:
      return "baseline";
    case CpuIsa::kX86_64_V3:
      return "x86-64-v3";
    case CpuIsa::kX86_64_V4:
      return "x86-64-v4";
  }
  return "unknown";
}

std::optional<CpuIsa> parse_cpu_isa(std::string_view name) {
  for (CpuIsa isa : kAllLevels) {
    if (name == cpu_isa_name(isa)) return isa;
  }
  return std::nullopt;
}

const std::vector<CpuIsa>& supported_cpu_isas() {
  static const std::vector<CpuIsa> levels = [] {
    std::vector<CpuIsa> found;
    for (CpuIsa isa : kAllLevels) {
      if (cpu_has(isa)) found.push_back(isa);
    }
    return found;
  }();
  return levels;
}

bool cpu_isa_supported(CpuIsa isa) {
  for (CpuIsa s : supported_cpu_isas()) {
    if (s == isa) return true;
  }
  return false;
}

CpuIsa best_cpu_isa() { return supported_cpu_isas().back(); }

CpuIsa active_cpu_isa() {
  const int level = detail::g_cpu_isa.load(std::memory_order_acquire);
  if (level >= 0) return static_cast<CpuIsa>(level);
  std::lock_guard<std::mutex> lock(level_mutex());
  const int again = detail::g_cpu_isa.load(std::memory_order_relaxed);
  if (again >= 0) return static_cast<CpuIsa>(again);
  const CpuIsa isa = level_from_environment();
  detail::g_cpu_isa.store(static_cast<int>(isa), std::memory_order_release);
  return isa;
}

void set_cpu_isa(CpuIsa isa) {
  if (!cpu_isa_supported(isa)) {
    throw std::invalid_argument(std::string("CPU ISA level ") + cpu_isa_name(isa) +
                                " is not supported here: this CPU supports " + supported_text());
  }
  std::lock_guard<std::mutex> lock(level_mutex());
  detail::g_cpu_isa.store(static_cast<int>(isa), std::memory_order_release);
}

void set_cpu_isa(std::string_view name) {
  if (name == "auto") return set_cpu_isa(best_cpu_isa());
  const std::optional<CpuIsa> isa = parse_cpu_isa(name);
  if (!isa) {
    throw std::invalid_argument("unknown CPU ISA level '" + std::string(name) + "': use " +
                                kChoices + " (this CPU supports " + supported_text() + ")");
  }
  set_cpu_isa(*isa);
}

}  // namespace cpu
}  // namespace mgm_fast
