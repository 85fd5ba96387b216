// Torch glue of the CPU instance noise (kernel: csrc/kernels/cpu/gan_noise.*).
//
// instance_noise_cpu(x, std, seed, return_noise) -> (out, noise or None)
//   x: float32 CPU tensor, any shape. A dense tensor (any dimension order, channels_last
//   included) is read in place in memory order and out keeps its strides; other strides are
//   made contiguous first. seed in [0, 2^63): an int, or a one-element int64 CPU tensor. noise (same strides as out) only when
//   return_noise. Called by mgm_fast/ops/gan_losses.py, which owns the autograd.Function.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "kernels/cpu/gan_noise.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

std::tuple<at::Tensor, std::optional<at::Tensor>> instance_noise_cpu(const at::Tensor& x_in,
                                                                     double std, int64_t seed,
                                                                     bool return_noise) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "noisy (cpp backend): x must be a CPU tensor, got device ",
                    x_in.device());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "noisy (cpp backend): x must be float32, got ",
                   x_in.scalar_type());
  TORCH_CHECK_VALUE(seed >= 0, "noisy (cpp backend): seed must be in [0, 2^63), got ", seed);
  const at::Tensor x = x_in.is_non_overlapping_and_dense() ? x_in : x_in.contiguous();
  at::Tensor out = at::empty_like(x);  // keeps the dense strides: memory order is shared
  std::optional<at::Tensor> noise;
  if (return_noise) noise = at::empty_like(x);
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    mgm_fast::cpu::instance_noise(x.data_ptr<float>(), out.data_ptr<float>(),
                                  noise ? noise->data_ptr<float>() : nullptr, x.numel(),
                                  static_cast<float>(std), static_cast<uint64_t>(seed), threads);
  }
  return {out, noise};
}

// The seed as a one-element int64 CPU tensor (drawn from a torch.Generator): read in place, so
// the key never passes through Python and no op reads it back.
std::tuple<at::Tensor, std::optional<at::Tensor>> instance_noise_cpu_seed_tensor(
    const at::Tensor& x, double std, const at::Tensor& seed, bool return_noise) {
  TORCH_CHECK_VALUE(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "noisy (cpp backend): a tensor seed must be one int64 on the CPU, got ",
                    seed.scalar_type(), " ", seed.sizes(), " on ", seed.device());
  return instance_noise_cpu(x, std, *seed.data_ptr<int64_t>(), return_noise);
}

}  // namespace

void register_gan_noise(pybind11::module_& m) {
  m.def("instance_noise_cpu", &instance_noise_cpu_seed_tensor, pybind11::arg("x"),
        pybind11::arg("std"), pybind11::arg("seed"), pybind11::arg("return_noise"),
        "x + std * N(0, 1) with the counter-based (Philox) stream of the Triton backend, the seed a "
        "one-element int64 CPU tensor (registered first: pybind11 would turn a tensor into an int by "
        "reading it back): (out, noise or None).");
  m.def("instance_noise_cpu", &instance_noise_cpu, pybind11::arg("x"), pybind11::arg("std"),
        pybind11::arg("seed"), pybind11::arg("return_noise"),
        "The same with an int seed.");
}

}  // namespace bindings
}  // namespace mgm_fast
