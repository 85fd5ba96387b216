// Torch glue of the fused GenBlock on CUDA: the kernel policy over csrc/kernels/cuda/genblock.*
// and the registration of the entry points of genblock_impl.h (the composition shared with the
// CPU build, where the tests exercise it). Compiled only when setup.py builds with CUDA
// (MGM_FAST_WITH_CUDA). Activations and conv weights float32 / float16 / bfloat16 (one dtype per
// call); gamma/beta/scale/shift float32; statistics float64; convolutions are cuDNN (ATen) on
// channels_last tensors. Nothing here synchronises the host (momentum=None reads the batch
// counter, as torch.nn.BatchNorm2d does).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../genblock_impl.h"
#include "../registry.h"
#include "kernels/cuda/genblock.cuh"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cuda::genblock;
namespace gi = genblock_impl;

k::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "genblock (cuda backend): float32, float16 or bfloat16 expected, got ",
                       t.scalar_type());
  }
  return k::DType::kFloat32;  // unreachable
}

k::Layout layout_of(const at::Tensor& t) {
  return gi::is_pixels(t) ? k::Layout::kPixels : k::Layout::kPlanes;
}

k::Dims dims_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

k::View cview(const at::Tensor& t) { return {t.data_ptr(), dims_of(t), layout_of(t)}; }
k::MutView mview(const at::Tensor& t) { return {t.data_ptr(), dims_of(t), layout_of(t)}; }
k::View cview_opt(const at::Tensor* t) { return t != nullptr ? cview(*t) : k::View{}; }
k::MutView mview_opt(at::Tensor* t) { return t != nullptr ? mview(*t) : k::MutView{}; }

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor workspace_for(const at::Tensor& like, const k::Dims& d) {
  return at::empty({static_cast<int64_t>(k::workspace_bytes(d))}, like.options().dtype(at::kByte));
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "genblock (cuda backend): ", what, " launch failed: ",
              cudaGetErrorString(err));
}

void check_dense(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "genblock (cuda backend): ", what, " must be NCHW or channels_last contiguous");
}

const float* fptr(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "genblock (cuda backend): float32 parameters expected");
  return t.data_ptr<float>();
}

k::BnReluBackward bn_args(const gi::BnBackward& b) {
  k::BnReluBackward a;
  a.x = cview(b.x);
  a.act = cview(b.act);
  a.dact = cview(b.dact);
  TORCH_CHECK(b.gamma.stride(1) == 1, "genblock (cuda backend): gamma needs unit column stride");
  a.gamma = fptr(b.gamma);
  a.gamma_stride = b.gamma.stride(0);
  a.scale = fptr(b.scale);
  a.mean = b.mean.data_ptr<double>();
  a.rstd = b.rstd.data_ptr<double>();
  a.training = b.training;
  return a;
}

/// The CUDA kernel policy of genblock_impl.h.
struct CudaGenblockKernels {
  static at::ScalarType param_dtype(const at::Tensor&) { return at::kFloat; }

  static at::Tensor conv_weight(const at::Tensor& w) {
    return w.contiguous(at::MemoryFormat::ChannelsLast);
  }

  static std::pair<at::Tensor, at::Tensor> stats(const at::Tensor& x) {
    check_dense(x, "x");
    at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(at::kDouble));
    at::Tensor var = at::empty({x.size(1)}, x.options().dtype(at::kDouble));
    at::Tensor ws = workspace_for(x, dims_of(x));
    check(k::channel_stats(dtype_of(x), cview(x), mean.data_ptr<double>(), var.data_ptr<double>(),
                           ws.data_ptr(), stream_of(x)),
          "channel_stats");
    return {mean, var};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift(
      const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& mean,
      const at::Tensor& var, double eps, const at::Tensor& x) {
    at::Tensor gamma = gamma_in.to(at::kFloat), beta = beta_in.to(at::kFloat);
    if (gamma.stride(1) != 1 || beta.stride(1) != 1 || gamma.stride(0) != beta.stride(0)) {
      gamma = gamma.contiguous();
      beta = beta.contiguous();
    }
    const int64_t n = gamma.size(0), c = gamma.size(1);
    at::Tensor rstd = at::empty({c}, mean.options());
    at::Tensor scale = at::empty({n, c}, x.options().dtype(at::kFloat));
    at::Tensor shift = at::empty({n, c}, x.options().dtype(at::kFloat));
    const at::Tensor m = mean.contiguous(), v = var.contiguous();
    check(k::scale_shift(gamma.data_ptr<float>(), beta.data_ptr<float>(), gamma.stride(0), n, c,
                         m.data_ptr<double>(), v.data_ptr<double>(), eps, rstd.data_ptr<double>(),
                         scale.data_ptr<float>(), shift.data_ptr<float>(), stream_of(x)),
          "scale_shift");
    return {rstd, scale, shift};
  }

  static void affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          at::Tensor& out, at::Tensor* copy) {
    check(k::affine_relu(dtype_of(x), cview(x), fptr(scale), fptr(shift), mview(out), mview_opt(copy),
                         stream_of(x)),
          "affine_relu");
  }

  static void update_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& mean, const at::Tensor& var, int64_t count, double m) {
    gi::update_running_aten(running_mean, running_var, mean, var, count, m);
  }

  // d[y[b]] += dgb[b] as one-hot(y)^T @ dgb: a deterministic matmul instead of atomic adds.
  static at::Tensor embedding_grad(const at::Tensor& embed, const at::Tensor& y, const at::Tensor& dgb) {
    const at::Tensor onehot = at::one_hot(y, embed.size(0)).to(at::kFloat);
    return onehot.t().mm(dgb.to(at::kFloat)).to(embed.scalar_type());
  }

  static at::Tensor phase_weights(const at::Tensor& w_in) {
    const at::Tensor w = w_in.contiguous();
    const int64_t cout = w.size(0), cin = w.size(1);
    at::Tensor wp = at::empty({4 * cout, cin, 2, 2}, w.options().memory_format(at::MemoryFormat::ChannelsLast));
    check(k::phase_weights(dtype_of(w), w.data_ptr(), cout, cin, wp.data_ptr(), true, stream_of(w)),
          "phase_weights");
    return wp;
  }

  static at::Tensor phase_weights_backward(const at::Tensor& dwp_in) {
    const bool cl = gi::is_pixels(dwp_in);
    const at::Tensor dwp = cl ? dwp_in : dwp_in.contiguous();
    const int64_t cout = dwp.size(0) / 4, cin = dwp.size(1);
    at::Tensor dw = at::empty({cout, cin, 3, 3}, dwp.options());
    check(k::phase_weights_backward(dtype_of(dwp), dwp.data_ptr(), cout, cin, dw.data_ptr(), cl,
                                    stream_of(dwp)),
          "phase_weights_backward");
    return dw;
  }

  static k::Epilogue epilogue(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool half) {
    k::Epilogue ep;
    ep.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    if (residual.has_value()) {
      check_dense(*residual, "residual");
      ep.residual = cview(*residual);
      ep.residual_half = half;
    }
    return ep;
  }

  static void phase_epilogue(const at::Tensor& p, const std::optional<at::Tensor>& bias_in,
                             const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                             at::Tensor* mean, at::Tensor* var) {
    TORCH_CHECK(p.is_contiguous(at::MemoryFormat::ChannelsLast), "phase conv output not channels_last");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->to(p.scalar_type()).contiguous();
    at::Tensor ws = mean != nullptr ? workspace_for(out, dims_of(out)) : at::Tensor();
    check(k::phase_epilogue(dtype_of(p), p.data_ptr(), epilogue(bias, residual, half), mview(out),
                            mean != nullptr ? mean->data_ptr<double>() : nullptr,
                            var != nullptr ? var->data_ptr<double>() : nullptr,
                            ws.defined() ? ws.data_ptr() : nullptr, stream_of(p)),
          "phase_epilogue");
  }

  static void conv_epilogue(const at::Tensor& conv, const std::optional<at::Tensor>& bias_in,
                            const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                            at::Tensor* mean, at::Tensor* var) {
    check_dense(conv, "conv output");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->to(conv.scalar_type()).contiguous();
    at::Tensor ws = mean != nullptr ? workspace_for(out, dims_of(out)) : at::Tensor();
    check(k::conv_epilogue(dtype_of(conv), cview(conv), epilogue(bias, residual, half), mview(out),
                           mean != nullptr ? mean->data_ptr<double>() : nullptr,
                           var != nullptr ? var->data_ptr<double>() : nullptr,
                           ws.defined() ? ws.data_ptr() : nullptr, stream_of(conv)),
          "conv_epilogue");
  }

  static void grad_output_prep(const at::Tensor& g, at::Tensor* copy, at::Tensor* half, at::Tensor* dbias) {
    check_dense(g, "grad_output");
    at::Tensor ws = dbias != nullptr ? workspace_for(g, dims_of(g)) : at::Tensor();
    check(k::grad_output_prep(dtype_of(g), cview(g), mview_opt(copy), mview_opt(half),
                              dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                              ws.defined() ? ws.data_ptr() : nullptr, stream_of(g)),
          "grad_output_prep");
  }

  static void phase_grad_scatter(const at::Tensor& g, at::Tensor& dp, at::Tensor* dbias) {
    check_dense(g, "grad_output");
    at::Tensor ws = dbias != nullptr ? workspace_for(g, dims_of(g)) : at::Tensor();
    check(k::phase_grad_scatter(dtype_of(g), cview(g), dp.data_ptr(),
                                dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                                ws.defined() ? ws.data_ptr() : nullptr, stream_of(g)),
          "phase_grad_scatter");
  }

  static void bn_backward_reduce(const gi::BnBackward& b, const at::Tensor& dgamma, const at::Tensor& dbeta,
                                 at::Tensor& k1, at::Tensor& k2) {
    TORCH_CHECK(dgamma.stride(0) == dbeta.stride(0) && dgamma.stride(1) == 1 && dbeta.stride(1) == 1,
                "genblock (cuda backend): dgamma/dbeta must share a row stride");
    at::Tensor ws = workspace_for(b.x, dims_of(b.x));
    check(k::bn_relu_backward_reduce(dtype_of(b.x), bn_args(b), dgamma.data_ptr<float>(),
                                     dbeta.data_ptr<float>(), dgamma.stride(0), k1.data_ptr<double>(),
                                     k2.data_ptr<double>(), ws.data_ptr(), stream_of(b.x)),
          "bn_relu_backward_reduce");
  }

  static void bn_backward_apply(const gi::BnBackward& b, const at::Tensor& k1, const at::Tensor& k2,
                                const at::Tensor* add, at::Tensor& dx) {
    check(k::bn_relu_backward_apply(dtype_of(b.x), bn_args(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                    cview_opt(add), mview(dx), stream_of(b.x)),
          "bn_relu_backward_apply");
  }

  static void bn_backward_apply_phase(const gi::BnBackward& b, const at::Tensor& k1, const at::Tensor& k2,
                                      at::Tensor& dp, at::Tensor* dbias) {
    at::Tensor ws = dbias != nullptr ? workspace_for(dp, dims_of(dp)) : at::Tensor();
    check(k::bn_relu_backward_apply_phase(dtype_of(b.x), bn_args(b), k1.data_ptr<double>(),
                                          k2.data_ptr<double>(), dp.data_ptr(),
                                          dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                                          ws.defined() ? ws.data_ptr() : nullptr, stream_of(b.x)),
          "bn_relu_backward_apply_phase");
  }
};

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "genblock (cuda backend): ", name, " must be a CUDA tensor, got device ",
                    t.device());
}

std::vector<at::Tensor> cbn_relu_conv_forward_cuda(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, bool upsample) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return gi::piece_forward<CudaGenblockKernels>(x, gamma, beta, weight, bias, residual, running_mean,
                                                running_var, num_batches_tracked, training, momentum, eps,
                                                upsample);
}

std::vector<at::Tensor> cbn_relu_conv_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& act, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    bool training, bool upsample, bool has_bias, int64_t residual_mode, bool need_x, bool need_gamma_beta,
    bool x_channels_last) {
  check_cuda(grad, "grad_output");
  const c10::cuda::CUDAGuard guard(grad.device());
  return gi::piece_backward<CudaGenblockKernels>(grad, x, act, weight, gamma, scale, mean, rstd, training,
                                                 upsample, has_bias, residual_mode, need_x, need_gamma_beta,
                                                 x_channels_last);
}

std::vector<at::Tensor> genblock_forward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& rm1, const at::Tensor& rv1,
    const std::optional<at::Tensor>& nbt1, const at::Tensor& rm2, const at::Tensor& rv2,
    const std::optional<at::Tensor>& nbt2, bool training, std::optional<double> momentum, double eps) {
  check_cuda(x, "x");
  check_cuda(y, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  return gi::block_forward<CudaGenblockKernels>(x, y, embed1, w1, b1, embed2, w2, b2, w0, b0, rm1, rv1, nbt1,
                                                rm2, rv2, nbt2, training, momentum, eps);
}

std::vector<at::Tensor> genblock_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& act1,
    const at::Tensor& hh, const at::Tensor& act2, const at::Tensor& mean1, const at::Tensor& rstd1,
    const at::Tensor& scale1, const at::Tensor& gb1, const at::Tensor& mean2, const at::Tensor& rstd2,
    const at::Tensor& scale2, const at::Tensor& gb2, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& w0, bool training, bool need_x,
    bool x_channels_last) {
  check_cuda(grad, "grad_output");
  const c10::cuda::CUDAGuard guard(grad.device());
  return gi::block_backward<CudaGenblockKernels>(grad, x, y, act1, hh, act2, mean1, rstd1, scale1, gb1, mean2,
                                                 rstd2, scale2, gb2, embed1, w1, embed2, w2, w0, training,
                                                 need_x, x_channels_last);
}

}  // namespace

void register_genblock_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cbn_relu_conv_forward_cuda", &cbn_relu_conv_forward_cuda, py::arg("x"), py::arg("gamma"),
        py::arg("beta"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("num_batches_tracked"), py::arg("training"), py::arg("momentum"),
        py::arg("eps"), py::arg("upsample"),
        "Fused conditional BN + ReLU (+ nearest x2) + conv3x3 (+ residual) on CUDA: "
        "[out, xs, act, mean, rstd, scale].");
  m.def("cbn_relu_conv_backward_cuda", &cbn_relu_conv_backward_cuda, py::arg("grad"), py::arg("x"),
        py::arg("act"), py::arg("weight"), py::arg("gamma"), py::arg("scale"), py::arg("mean"), py::arg("rstd"),
        py::arg("training"), py::arg("upsample"), py::arg("has_bias"), py::arg("residual_mode"),
        py::arg("need_x"), py::arg("need_gamma_beta"), py::arg("x_channels_last"),
        "Backward of cbn_relu_conv_forward_cuda: [dx, dgamma, dbeta, dweight, dbias, dresidual].");
  m.def("genblock_forward_cuda", &genblock_forward_cuda, py::arg("x"), py::arg("y"), py::arg("embed1"),
        py::arg("w1"), py::arg("b1"), py::arg("embed2"), py::arg("w2"), py::arg("b2"), py::arg("w0"),
        py::arg("b0"), py::arg("running_mean1"), py::arg("running_var1"), py::arg("num_batches_tracked1"),
        py::arg("running_mean2"), py::arg("running_var2"), py::arg("num_batches_tracked2"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"),
        "Fused GenBlock forward on CUDA: [out, saved tensors for genblock_backward_cuda...].");
  m.def("genblock_backward_cuda", &genblock_backward_cuda, py::arg("grad"), py::arg("x"), py::arg("y"),
        py::arg("act1"), py::arg("h"), py::arg("act2"), py::arg("mean1"), py::arg("rstd1"), py::arg("scale1"),
        py::arg("gb1"), py::arg("mean2"), py::arg("rstd2"), py::arg("scale2"), py::arg("gb2"),
        py::arg("embed1"), py::arg("w1"), py::arg("embed2"), py::arg("w2"), py::arg("w0"),
        py::arg("training"), py::arg("need_x"), py::arg("x_channels_last"),
        "Fused GenBlock backward on CUDA: [dx, dembed1, dw1, db1, dembed2, dw2, db2, dw0, db0].");
}

}  // namespace bindings
}  // namespace mgm_fast
