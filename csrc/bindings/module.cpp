// The extension module mgm_fast._C: build facts and the registration of every op's bindings.
// Python side: mgm_fast/_native.py (loads it, reports why it is unavailable).
#include <torch/extension.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef MGM_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <string>
#include <string_view>

#include "kernels/cpu/isa.h"
#include "registry.h"

namespace {

constexpr bool kBuiltWithCuda =
#ifdef MGM_FAST_WITH_CUDA
    true;
#else
    false;
#endif

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::list supported_cpu_isas() {
  pybind11::list names;
  for (mgm_fast::cpu::CpuIsa isa : mgm_fast::cpu::supported_cpu_isas()) {
    names.append(mgm_fast::cpu::cpu_isa_name(isa));
  }
  return names;
}

std::string cpu_isa() { return mgm_fast::cpu::cpu_isa_name(mgm_fast::cpu::active_cpu_isa()); }

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = compiler();
  info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = static_cast<int>(_OPENMP);  // yyyymm of the OpenMP spec
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = pybind11::none();
  info["openmp_max_threads"] = 1;
#endif
#if defined(TORCH_VERSION_MAJOR)
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#else
  info["torch_version"] = pybind11::none();
#endif
#ifdef _GLIBCXX_USE_CXX11_ABI
  info["glibcxx_cxx11_abi"] = static_cast<int>(_GLIBCXX_USE_CXX11_ABI);
#endif
  info["with_cuda"] = kBuiltWithCuda;
#ifdef MGM_FAST_WITH_CUDA
  info["cuda_runtime_version"] = static_cast<int>(CUDART_VERSION);
#else
  info["cuda_runtime_version"] = pybind11::none();
#endif
  pybind11::list ops;
  ops.append("multitask_loss");
  ops.append("simclr_views");
  ops.append("ntxent");
  ops.append("gan_noise");
  ops.append("genblock");
  ops.append("sagan_attention");
  ops.append("spectral_norm");
  ops.append("batch_norm");
  ops.append("conv2d");
  info["ops"] = ops;
  info["cpu_isa"] = cpu_isa();
  info["cpu_isas_supported"] = supported_cpu_isas();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Initialise torch's Python side first, so tensors convert even when mgm_fast._C is imported
  // before torch (the shared libraries themselves come from the run path setup.py records).
  pybind11::module_::import("torch");
  m.doc() = "mgm_fast native kernels (CPU C++/OpenMP, and CUDA when built with it)";
  m.attr("built_with_cuda") = pybind11::bool_(kBuiltWithCuda);
  m.def("build_info", &build_info,
        "How this extension was built: compiler, OpenMP, torch version, CUDA sources; and the "
        "CPU kernels' active and supported ISA levels.");
  // std::runtime_error (a bad MGM_FAST_CPU_ISA) reaches Python as RuntimeError,
  // std::invalid_argument (set_cpu_isa) as ValueError.
  m.def("cpu_isa", &cpu_isa,
        "The ISA level the CPU kernels run at: 'baseline', 'x86-64-v3' or 'x86-64-v4'. The first "
        "call reads MGM_FAST_CPU_ISA (auto | baseline | x86-64-v3 | x86-64-v4; unset: auto, the "
        "best supported level); RuntimeError for an unknown or unsupported value.");
  m.def("supported_cpu_isas", &supported_cpu_isas,
        "The ISA levels this CPU (and build) can run, baseline first.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) { mgm_fast::cpu::set_cpu_isa(std::string_view(name)); },
      pybind11::arg("name"),
      "Forces the ISA level of later CPU kernel calls, process-wide ('auto': the best one); "
      "ValueError for an unknown or unsupported level.");
  mgm_fast::bindings::register_multitask_loss(m);
  mgm_fast::bindings::register_simclr_views(m);
  mgm_fast::bindings::register_ntxent(m);
  mgm_fast::bindings::register_gan_noise(m);
  mgm_fast::bindings::register_genblock(m);
  mgm_fast::bindings::register_sagan_attention(m);
  mgm_fast::bindings::register_spectral_norm(m);
  mgm_fast::bindings::register_batch_norm(m);
  mgm_fast::bindings::register_conv2d(m);
#ifdef MGM_FAST_WITH_CUDA
  mgm_fast::bindings::register_multitask_loss_cuda(m);
  mgm_fast::bindings::register_ntxent_cuda(m);
  mgm_fast::bindings::register_genblock_cuda(m);
#endif
}
