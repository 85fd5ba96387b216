// Shared compiler attributes of the CPU kernels, and the choice of their instruction set.
//
// The project is built without -march flags, so the hot row workers are compiled three times
// to get wide registers: for baseline x86-64 (SSE2), x86-64-v3 (AVX2, FMA) and x86-64-v4
// (AVX-512). A worker is written once as an always-inlined body,
//
//   MGM_FAST_ISA_BODY void lane_scores_body(const float* x, int64_t n, float* s) { ... }
//   constexpr auto& lane_scores = MGM_FAST_ISA_DISPATCH(lane_scores_body);
//
// and IsaVersions below inlines the body into one wrapper per level (a target("arch=...")
// function, so the body is vectorised for that ISA) plus a dispatcher, called under the
// worker's name, that branches on the process-wide level (one relaxed load and a predictable
// branch per call).
//
// A body whose register blocking depends on the level is a template on it instead,
//
//   template <CpuIsa kIsa>
//   MGM_FAST_ISA_BODY void block_scores_body(...) { /* vectors of vector_floats(kIsa) */ }
//   constexpr auto& block_scores = MGM_FAST_ISA_DISPATCH_PER_LEVEL(block_scores_body);
//
// and each wrapper inlines the body's instance for its own level. GCC keeps a generic vector
// wider than the target's registers (16 floats under AVX2) in memory, and an accumulator of
// that type on the stack, so such bodies size their vectors by vector_floats().
//
// The level is the best one this CPU supports unless the environment variable MGM_FAST_CPU_ISA
// (auto | baseline | x86-64-v3 | x86-64-v4, read at the first use) or set_cpu_isa() forces one,
// so every version can be tested on an AVX-512 machine; asking for a level the CPU lacks, or an
// unknown name, is an error, never a silent fallback. The AVX2/AVX-512 versions may contract
// a*b+c into FMAs and sum in wider vectors, so results can differ in the last bits between
// levels; at one level they are bit-identical for any thread count. ctest runs every C++ kernel
// test at every level (skipped where the CPU lacks it) and once in a portable build.
//
// Portable builds -- MGM_FAST_NO_TARGET_CLONES defined, or not GCC/Clang on x86-64 Linux --
// compile each body once as a plain function (a per-level body: its baseline instance), and the
// only level is "baseline".
#pragma once

#include <atomic>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define MGM_FAST_INLINE inline __attribute__((always_inline))
#else
#define MGM_FAST_INLINE inline
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__) && \
    !defined(MGM_FAST_NO_TARGET_CLONES)
#define MGM_FAST_ISA_VERSIONS 1
#else
#define MGM_FAST_ISA_VERSIONS 0
#endif

namespace mgm_fast {
namespace cpu {

/// Instruction-set levels of the kernels, in increasing order.
enum class CpuIsa : int { kBaseline = 0, kX86_64_V3 = 1, kX86_64_V4 = 2 };

/// Floats in one vector register at a level: 16 (AVX-512), 8 (AVX2), 4 (SSE2, and the 128-bit
/// vectors a portable build can count on).
constexpr int vector_floats(CpuIsa isa) {
  return isa == CpuIsa::kX86_64_V4 ? 16 : isa == CpuIsa::kX86_64_V3 ? 8 : 4;
}

/// The environment variable that forces a level.
inline constexpr const char* kCpuIsaEnv = "MGM_FAST_CPU_ISA";

/// "baseline", "x86-64-v3" or "x86-64-v4".
const char* cpu_isa_name(CpuIsa isa);

/// The level of a name as cpu_isa_name spells it; nullopt for any other string ("auto" too).
std::optional<CpuIsa> parse_cpu_isa(std::string_view name);

/// Whether this build has ISA-specific versions of the workers (MGM_FAST_ISA_VERSIONS).
constexpr bool cpu_isa_versions_compiled() { return MGM_FAST_ISA_VERSIONS != 0; }

/// The levels this build can run on this CPU, baseline first (only baseline in a portable
/// build).
const std::vector<CpuIsa>& supported_cpu_isas();

bool cpu_isa_supported(CpuIsa isa);

/// The best supported level: what "auto" means.
CpuIsa best_cpu_isa();

/// The level the workers run at. The first call resolves MGM_FAST_CPU_ISA (unset, empty or
/// "auto": best_cpu_isa()); throws std::runtime_error naming the variable and the supported
/// levels when its value is unknown or unsupported (again at every call until it is fixed or
/// set_cpu_isa is called).
CpuIsa active_cpu_isa();

/// Forces the level of later worker calls; throws std::invalid_argument when this CPU (or
/// build) lacks it. Not meant to be called while kernels run in other threads: a kernel whose
/// chunks ran at two levels would not be bit-reproducible.
void set_cpu_isa(CpuIsa isa);

/// set_cpu_isa by name, "auto" included; std::invalid_argument for an unknown name too.
void set_cpu_isa(std::string_view name);

namespace detail {
// The active level as an int, -1 until active_cpu_isa() has resolved it.
extern std::atomic<int> g_cpu_isa;
}  // namespace detail

#if MGM_FAST_ISA_VERSIONS

namespace detail {
// The dispatchers' read of the level: one relaxed load; the environment on the first call.
MGM_FAST_INLINE CpuIsa dispatch_cpu_isa() {
  const int level = g_cpu_isa.load(std::memory_order_relaxed);
  if (__builtin_expect(level < 0, 0)) return active_cpu_isa();
  return static_cast<CpuIsa>(level);
}
}  // namespace detail

// Marks a worker body (see the top of this file). Its vector values must stay inside it and
// its always-inlined helpers: a function taking or returning a wide vector by value has an
// ISA-dependent ABI.
#define MGM_FAST_ISA_BODY MGM_FAST_INLINE

/// The per-level wrappers of always-inlined functions with one signature -- V4Body for
/// x86-64-v4, V3Body for x86-64-v3, BaselineBody for baseline -- and their dispatcher, with that
/// exact signature. Each wrapper's body is its function inlined and compiled for its target, as
/// a target_clones clone would be; unlike the ifunc of target_clones, the choice can be forced
/// at run time.
template <auto V4Body, auto V3Body, auto BaselineBody>
struct IsaLevelVersions;

template <typename R, typename... Args, R (*V4Body)(Args...), R (*V3Body)(Args...),
          R (*BaselineBody)(Args...)>
struct IsaLevelVersions<V4Body, V3Body, BaselineBody> {
  __attribute__((target("arch=x86-64-v4"))) static R x86_64_v4(Args... args) {
    return V4Body(static_cast<Args&&>(args)...);
  }
  __attribute__((target("arch=x86-64-v3"))) static R x86_64_v3(Args... args) {
    return V3Body(static_cast<Args&&>(args)...);
  }
  static R baseline(Args... args) { return BaselineBody(static_cast<Args&&>(args)...); }

  static R dispatch(Args... args) {
    const CpuIsa isa = detail::dispatch_cpu_isa();
    if (isa == CpuIsa::kX86_64_V4) return x86_64_v4(static_cast<Args&&>(args)...);
    if (isa == CpuIsa::kX86_64_V3) return x86_64_v3(static_cast<Args&&>(args)...);
    return baseline(static_cast<Args&&>(args)...);
  }
};

/// The wrappers of one body at every level.
template <auto Body>
using IsaVersions = IsaLevelVersions<Body, Body, Body>;

/// The dispatcher of a worker body, a function reference with the body's signature.
#define MGM_FAST_ISA_DISPATCH(body) (::mgm_fast::cpu::IsaVersions<&body>::dispatch)

/// The dispatcher of a worker body template on the level (template <CpuIsa> ...), each level
/// running its own instance.
#define MGM_FAST_ISA_DISPATCH_PER_LEVEL(body)                                              \
  (::mgm_fast::cpu::IsaLevelVersions<&body<::mgm_fast::cpu::CpuIsa::kX86_64_V4>,           \
                                     &body<::mgm_fast::cpu::CpuIsa::kX86_64_V3>,           \
                                     &body<::mgm_fast::cpu::CpuIsa::kBaseline>>::dispatch)

#else

#define MGM_FAST_ISA_BODY
#define MGM_FAST_ISA_DISPATCH(body) (body)
#define MGM_FAST_ISA_DISPATCH_PER_LEVEL(body) (body<::mgm_fast::cpu::CpuIsa::kBaseline>)

#endif

}  // namespace cpu
}  // namespace mgm_fast
