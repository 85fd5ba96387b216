// Torch glue of the fused GenBlock on the CPU: the kernel policy over csrc/kernels/cpu/genblock.*
// and the registration of the entry points of genblock_impl.h (the composition, shared with the
// CUDA build). float32 and float64; the convolutions are ATen (oneDNN for float32) on
// channels_last tensors. Called by mgm_fast/ops/genblock.py, which owns the autograd.Function
// and the dispatch (input validation with errors naming the tensor happens there too).
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "genblock_impl.h"
#include "kernels/cpu/genblock.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu::genblock;
namespace gi = genblock_impl;

k::Layout layout_of(const at::Tensor& t) {
  return gi::is_pixels(t) ? k::Layout::kPixels : k::Layout::kPlanes;
}

k::Dims dims_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

template <typename T>
k::View<const T> cview(const at::Tensor& t) {
  return {t.data_ptr<T>(), dims_of(t), layout_of(t)};
}

template <typename T>
k::View<T> mview(const at::Tensor& t) {
  return {t.data_ptr<T>(), dims_of(t), layout_of(t)};
}

template <typename T>
k::View<const T> cview_opt(const at::Tensor* t) {
  return t != nullptr ? cview<T>(*t) : k::View<const T>{};
}

template <typename T>
k::View<T> mview_opt(at::Tensor* t) {
  return t != nullptr ? mview<T>(*t) : k::View<T>{};
}

void check_dense(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "genblock (cpp backend): ", what, " must be NCHW or channels_last contiguous");
}

// Runs f<T>() for the float dtypes of the cpp backend.
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK_TYPE(false, "genblock (cpp backend): float32 or float64 expected, got ",
                       t.scalar_type());
  }
}

template <typename T>
k::BnReluBackward<T> bn_args(const gi::BnBackward& b) {
  k::BnReluBackward<T> a;
  a.x = cview<T>(b.x);
  a.act = cview<T>(b.act);
  a.dact = cview<T>(b.dact);
  TORCH_CHECK(b.gamma.stride(1) == 1, "genblock (cpp backend): gamma needs unit column stride");
  a.gamma = b.gamma.data_ptr<T>();
  a.gamma_stride = b.gamma.stride(0);
  a.scale = b.scale.data_ptr<T>();
  a.mean = b.mean.data_ptr<double>();
  a.rstd = b.rstd.data_ptr<double>();
  a.training = b.training;
  return a;
}

int threads() { return at::get_num_threads(); }

/// The CPU kernel policy of genblock_impl.h.
struct CpuGenblockKernels {
  static at::ScalarType param_dtype(const at::Tensor& x) { return x.scalar_type(); }

  static std::pair<at::Tensor, at::Tensor> stats(const at::Tensor& x) {
    check_dense(x, "x");
    const int64_t c = x.size(1);
    at::Tensor mean = at::empty({c}, x.options().dtype(at::kDouble));
    at::Tensor var = at::empty({c}, x.options().dtype(at::kDouble));
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::channel_stats<T>(cview<T>(x), mean.data_ptr<double>(), var.data_ptr<double>(), threads());
    });
    return {mean, var};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift(
      const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& mean,
      const at::Tensor& var, double eps, const at::Tensor& x) {
    at::Tensor gamma = gamma_in, beta = beta_in;
    if (gamma.stride(1) != 1 || beta.stride(1) != 1 || gamma.stride(0) != beta.stride(0)) {
      gamma = gamma.contiguous();
      beta = beta.contiguous();
    }
    const int64_t n = gamma.size(0), c = gamma.size(1);
    at::Tensor rstd = at::empty({c}, mean.options());
    at::Tensor scale = at::empty({n, c}, x.options());
    at::Tensor shift = at::empty({n, c}, x.options());
    const at::Tensor m = mean.contiguous(), v = var.contiguous();
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::scale_shift<T>(gamma.data_ptr<T>(), beta.data_ptr<T>(), gamma.stride(0), n, c,
                        m.data_ptr<double>(), v.data_ptr<double>(), eps, rstd.data_ptr<double>(),
                        scale.data_ptr<T>(), shift.data_ptr<T>());
    });
    return {rstd, scale, shift};
  }

  static void affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          at::Tensor& out, at::Tensor* copy) {
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::affine_relu<T>(cview<T>(x), scale.data_ptr<T>(), shift.data_ptr<T>(), mview<T>(out),
                        mview_opt<T>(copy), threads());
    });
  }

  // BatchNorm2d's update in double, then rounded once (as torch's CPU kernel does).
  static void update_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& mean, const at::Tensor& var, int64_t count,
                             double m) {
    const bool plain = running_mean.is_contiguous() && running_var.is_contiguous() &&
                       running_mean.scalar_type() == running_var.scalar_type() &&
                       (running_mean.scalar_type() == at::kFloat ||
                        running_mean.scalar_type() == at::kDouble);
    if (!plain) return gi::update_running_aten(running_mean, running_var, mean, var, count, m);
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    const double* mu = mean.data_ptr<double>();
    const double* va = var.data_ptr<double>();
    dispatch(running_mean, [&](auto z) {
      using R = decltype(z);
      R* rm = running_mean.data_ptr<R>();
      R* rv = running_var.data_ptr<R>();
      for (int64_t c = 0; c < running_mean.numel(); ++c) {
        rm[c] = static_cast<R>(m * mu[c] + (1.0 - m) * static_cast<double>(rm[c]));
        rv[c] = static_cast<R>(m * va[c] * unbias + (1.0 - m) * static_cast<double>(rv[c]));
      }
    });
    // in-place writes through raw pointers: tell autograd's version counter, like copy_ would
    running_mean.unsafeGetTensorImpl()->bump_version();
    running_var.unsafeGetTensorImpl()->bump_version();
  }

  // Dense gradient of an embedding table: d[y[b]] += dgb[b] (in sample order, deterministic).
  static at::Tensor embedding_grad(const at::Tensor& embed, const at::Tensor& y,
                                   const at::Tensor& dgb) {
    at::Tensor d = at::zeros_like(embed, at::MemoryFormat::Contiguous);
    const at::Tensor src = dgb.to(embed.scalar_type()).contiguous();
    const at::Tensor yy = y.contiguous();
    const int64_t* labels = yy.data_ptr<int64_t>();
    const int64_t rows = embed.size(0), width = embed.size(1);
    dispatch(d, [&](auto z) {
      using T = decltype(z);
      T* out = d.data_ptr<T>();
      const T* in = src.data_ptr<T>();
      for (int64_t b = 0; b < yy.numel(); ++b) {
        TORCH_CHECK_INDEX(labels[b] >= 0 && labels[b] < rows, "genblock: y holds label ", labels[b],
                          ", outside [0, ", rows, ")");
        T* row = out + labels[b] * width;
        for (int64_t j = 0; j < width; ++j) row[j] += in[b * width + j];
      }
    });
    return d;
  }

  // Conv weights go to oneDNN in channels_last, matching the activations (no reorder inside).
  static at::Tensor conv_weight(const at::Tensor& w) {
    return w.contiguous(at::MemoryFormat::ChannelsLast);
  }

  static at::Tensor phase_weights(const at::Tensor& w_in) {
    const at::Tensor w = w_in.contiguous();
    const int64_t cout = w.size(0), cin = w.size(1);
    at::Tensor wp = at::empty({4 * cout, cin, 2, 2}, w.options().memory_format(at::MemoryFormat::ChannelsLast));
    dispatch(w, [&](auto z) {
      using T = decltype(z);
      k::phase_weights<T>(w.data_ptr<T>(), cout, cin, wp.data_ptr<T>(), true);
    });
    return wp;
  }

  static at::Tensor phase_weights_backward(const at::Tensor& dwp_in) {
    const bool cl = gi::is_pixels(dwp_in);
    const at::Tensor dwp = cl ? dwp_in : dwp_in.contiguous();
    const int64_t cout = dwp.size(0) / 4, cin = dwp.size(1);
    at::Tensor dw = at::empty({cout, cin, 3, 3}, dwp.options());
    dispatch(dwp, [&](auto z) {
      using T = decltype(z);
      k::phase_weights_backward<T>(dwp.data_ptr<T>(), cout, cin, dw.data_ptr<T>(), cl);
    });
    return dw;
  }

  template <typename T>
  static k::Epilogue<T> epilogue(const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, bool half) {
    k::Epilogue<T> ep;
    ep.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    if (residual.has_value()) {
      check_dense(*residual, "residual");
      ep.residual = cview<T>(*residual);
      ep.residual_half = half;
    }
    return ep;
  }

  static void phase_epilogue(const at::Tensor& p, const std::optional<at::Tensor>& bias_in,
                             const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                             at::Tensor* mean, at::Tensor* var) {
    TORCH_CHECK(p.is_contiguous(at::MemoryFormat::ChannelsLast), "phase conv output not channels_last");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->contiguous();
    const k::Dims low{out.size(0), out.size(1), out.size(2) / 2, out.size(3) / 2};
    dispatch(p, [&](auto z) {
      using T = decltype(z);
      k::phase_epilogue<T>(p.data_ptr<T>(), low, epilogue<T>(bias, residual, half), mview<T>(out),
                           mean != nullptr ? mean->data_ptr<double>() : nullptr,
                           var != nullptr ? var->data_ptr<double>() : nullptr, threads());
    });
  }

  static void conv_epilogue(const at::Tensor& conv, const std::optional<at::Tensor>& bias_in,
                            const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                            at::Tensor* mean, at::Tensor* var) {
    check_dense(conv, "conv output");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->contiguous();
    dispatch(conv, [&](auto z) {
      using T = decltype(z);
      k::conv_epilogue<T>(cview<T>(conv), epilogue<T>(bias, residual, half), mview<T>(out),
                          mean != nullptr ? mean->data_ptr<double>() : nullptr,
                          var != nullptr ? var->data_ptr<double>() : nullptr, threads());
    });
  }

  static void grad_output_prep(const at::Tensor& g, at::Tensor* copy, at::Tensor* half,
                               at::Tensor* dbias) {
    check_dense(g, "grad_output");
    dispatch(g, [&](auto z) {
      using T = decltype(z);
      k::grad_output_prep<T>(cview<T>(g), mview_opt<T>(copy), mview_opt<T>(half),
                             dbias != nullptr ? dbias->data_ptr<double>() : nullptr, threads());
    });
  }

  static void phase_grad_scatter(const at::Tensor& g, at::Tensor& dp, at::Tensor* dbias) {
    check_dense(g, "grad_output");
    dispatch(g, [&](auto z) {
      using T = decltype(z);
      k::phase_grad_scatter<T>(cview<T>(g), dp.data_ptr<T>(),
                               dbias != nullptr ? dbias->data_ptr<double>() : nullptr, threads());
    });
  }

  static void bn_backward_reduce(const gi::BnBackward& b, const at::Tensor& dgamma,
                                 const at::Tensor& dbeta, at::Tensor& k1, at::Tensor& k2) {
    TORCH_CHECK(dgamma.stride(0) == dbeta.stride(0) && dgamma.stride(1) == 1 && dbeta.stride(1) == 1,
                "genblock (cpp backend): dgamma/dbeta must share a row stride");
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_reduce<T>(bn_args<T>(b), dgamma.data_ptr<T>(), dbeta.data_ptr<T>(),
                                    dgamma.stride(0), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                    threads());
    });
  }

  static void bn_backward_apply(const gi::BnBackward& b, const at::Tensor& k1, const at::Tensor& k2,
                                const at::Tensor* add, at::Tensor& dx) {
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_apply<T>(bn_args<T>(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                   cview_opt<T>(add), mview<T>(dx), threads());
    });
  }

  static void bn_backward_apply_phase(const gi::BnBackward& b, const at::Tensor& k1,
                                      const at::Tensor& k2, at::Tensor& dp, at::Tensor* dbias) {
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_apply_phase<T>(bn_args<T>(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                         dp.data_ptr<T>(),
                                         dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                                         threads());
    });
  }
};

// Inputs of the CPU entry points must be CPU tensors (the Python side dispatches by device).
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "genblock (cpp backend): ", name,
                    " must be a CPU tensor, got device ", t.device());
}

std::vector<at::Tensor> cbn_relu_conv_forward_cpu(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool upsample) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  pybind11::gil_scoped_release no_gil;
  return gi::piece_forward<CpuGenblockKernels>(x, gamma, beta, weight, bias, residual, running_mean,
                                               running_var, num_batches_tracked, training, momentum,
                                               eps, upsample);
}

std::vector<at::Tensor> cbn_relu_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& act, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    bool training, bool upsample, bool has_bias, int64_t residual_mode, bool need_x,
    bool need_gamma_beta, bool x_channels_last) {
  check_cpu(grad, "grad_output");
  pybind11::gil_scoped_release no_gil;
  return gi::piece_backward<CpuGenblockKernels>(grad, x, act, weight, gamma, scale, mean, rstd,
                                                training, upsample, has_bias, residual_mode, need_x,
                                                need_gamma_beta, x_channels_last);
}

std::vector<at::Tensor> genblock_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& rm1, const at::Tensor& rv1,
    const std::optional<at::Tensor>& nbt1, const at::Tensor& rm2, const at::Tensor& rv2,
    const std::optional<at::Tensor>& nbt2, bool training, std::optional<double> momentum,
    double eps) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  pybind11::gil_scoped_release no_gil;
  return gi::block_forward<CpuGenblockKernels>(x, y, embed1, w1, b1, embed2, w2, b2, w0, b0, rm1,
                                               rv1, nbt1, rm2, rv2, nbt2, training, momentum, eps);
}

std::vector<at::Tensor> genblock_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& act1,
    const at::Tensor& hh, const at::Tensor& act2, const at::Tensor& mean1, const at::Tensor& rstd1,
    const at::Tensor& scale1, const at::Tensor& gb1, const at::Tensor& mean2,
    const at::Tensor& rstd2, const at::Tensor& scale2, const at::Tensor& gb2,
    const at::Tensor& embed1, const at::Tensor& w1, const at::Tensor& embed2, const at::Tensor& w2,
    const at::Tensor& w0, bool training, bool need_x, bool x_channels_last) {
  check_cpu(grad, "grad_output");
  pybind11::gil_scoped_release no_gil;
  return gi::block_backward<CpuGenblockKernels>(grad, x, y, act1, hh, act2, mean1, rstd1, scale1,
                                                gb1, mean2, rstd2, scale2, gb2, embed1, w1, embed2,
                                                w2, w0, training, need_x, x_channels_last);
}

}  // namespace

void register_genblock(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cbn_relu_conv_forward_cpu", &cbn_relu_conv_forward_cpu, py::arg("x"), py::arg("gamma"),
        py::arg("beta"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("upsample"),
        "Fused conditional BN + ReLU (+ nearest x2) + conv3x3 (+ residual) on the CPU: "
        "[out, xs, act, mean, rstd, scale].");
  m.def("cbn_relu_conv_backward_cpu", &cbn_relu_conv_backward_cpu, py::arg("grad"), py::arg("x"),
        py::arg("act"), py::arg("weight"), py::arg("gamma"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"), py::arg("training"), py::arg("upsample"), py::arg("has_bias"),
        py::arg("residual_mode"), py::arg("need_x"), py::arg("need_gamma_beta"),
        py::arg("x_channels_last"),
        "Backward of cbn_relu_conv_forward_cpu (x: the channels_last xs it returned): "
        "[dx, dgamma, dbeta, dweight, dbias, dresidual].");
  m.def("genblock_forward_cpu", &genblock_forward_cpu, py::arg("x"), py::arg("y"),
        py::arg("embed1"), py::arg("w1"), py::arg("b1"), py::arg("embed2"), py::arg("w2"),
        py::arg("b2"), py::arg("w0"), py::arg("b0"), py::arg("running_mean1"),
        py::arg("running_var1"), py::arg("num_batches_tracked1"), py::arg("running_mean2"),
        py::arg("running_var2"), py::arg("num_batches_tracked2"), py::arg("training"),
        py::arg("momentum"), py::arg("eps"),
        "Fused GenBlock forward on the CPU: [out, saved tensors for genblock_backward_cpu...].");
  m.def("genblock_backward_cpu", &genblock_backward_cpu, py::arg("grad"), py::arg("x"),
        py::arg("y"), py::arg("act1"), py::arg("h"), py::arg("act2"), py::arg("mean1"),
        py::arg("rstd1"), py::arg("scale1"), py::arg("gb1"), py::arg("mean2"), py::arg("rstd2"),
        py::arg("scale2"), py::arg("gb2"), py::arg("embed1"), py::arg("w1"), py::arg("embed2"),
        py::arg("w2"), py::arg("w0"), py::arg("training"), py::arg("need_x"),
        py::arg("x_channels_last"),
        "Fused GenBlock backward on the CPU (x: the channels_last xs the forward returned): "
        "[dx, dembed1, dw1, db1, dembed2, dw2, db2, dw0, db0].");
}

}  // namespace bindings
}  // namespace mgm_fast
