// Registration hooks of the torch glue: each op's binding file defines one function that adds
// its entry points to the extension module, and module.cpp calls them all.
#pragma once

#include <torch/extension.h>

namespace mgm_fast {
namespace bindings {

/// csrc/bindings/multitask_loss.cpp: multitask_loss_cpu
void register_multitask_loss(pybind11::module_& m);

/// csrc/bindings/simclr_views.cpp: simclr_views_cpu
void register_simclr_views(pybind11::module_& m);

/// csrc/bindings/genblock.cpp: cbn_relu_conv_{forward,backward}_cpu, genblock_{forward,backward}_cpu
void register_genblock(pybind11::module_& m);

/// csrc/bindings/ntxent.cpp: ntxent_rows_cpu_forward, ntxent_rows_cpu_backward
void register_ntxent(pybind11::module_& m);

/// csrc/bindings/gan_noise.cpp: instance_noise_cpu
void register_gan_noise(pybind11::module_& m);

/// csrc/bindings/spectral_norm.cpp: spectral_norm_power_iteration_cpu, spectral_norm_weight_grad_cpu
void register_spectral_norm(pybind11::module_& m);

/// csrc/bindings/batch_norm.cpp: batch_norm_backward_channels_last_cpu
void register_batch_norm(pybind11::module_& m);

/// csrc/bindings/conv2d.cpp: conv2d_algo_cpu, conv2d_{forward,backward}_cpu, conv2d_algos_{,set_,clear_}cpu
void register_conv2d(pybind11::module_& m);

/// csrc/bindings/sagan_attention.cpp: sagan_attention_cpu_forward, sagan_attention_cpu_backward
void register_sagan_attention(pybind11::module_& m);

#ifdef MGM_FAST_WITH_CUDA
/// csrc/bindings/cuda/ntxent_cuda.cpp: ntxent_rows_cuda_forward, ntxent_rows_cuda_backward
void register_ntxent_cuda(pybind11::module_& m);

/// csrc/bindings/cuda/multitask_loss_cuda.cpp: multitask_loss_cuda, multitask_loss_scale_grad_cuda
void register_multitask_loss_cuda(pybind11::module_& m);

/// csrc/bindings/cuda/genblock_cuda.cpp: cbn_relu_conv_{forward,backward}_cuda,
/// genblock_{forward,backward}_cuda
void register_genblock_cuda(pybind11::module_& m);
#endif

}  // namespace bindings
}  // namespace mgm_fast
