// The progan_fast_native library: one TORCH_LIBRARY with every op's schema, the CPU
// implementations (C++ twins in kernels/cpu), and the conv composite (ATen conv + our fused
// epilogue) for CPU and, when built with CUDA, for CUDA. The CUDA kernels' glue is in
// cuda_ops.cpp, the only translation unit that needs CUDA headers.
//
// Autograd (first and second order) and fake tensors are registered in Python, next to the Triton
// backend that shares the formulas: progan_fast/ops/*.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <Python.h>
#include <torch/library.h>

#include <tuple>

#include "../cpu/cpu_kernels.h"
#include "glue.h"

namespace progan {
namespace {

using at::Tensor;
using glue::acc_type;

void check_cpu(const char* op, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "progan_fast_native::", op, " (CPU kernel): tensor on ", t.device());
}

// Runs the lambda with scalar_t = the tensor's dtype (float, double, BFloat16 or Half).
#define PROGAN_DISPATCH(op, t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), op, __VA_ARGS__)

double read_alpha(const Tensor& alpha) { return alpha.item<double>(); }  // CPU: no device sync involved

// ----- pixel_norm -------------------------------------------------------------------------------

Tensor pixel_norm_cpu(const Tensor& x_, double eps) {
  glue::check_float("pixel_norm", "x", x_);
  const auto d = glue::ncp("pixel_norm", x_);
  const Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  PROGAN_DISPATCH("pixel_norm", x, [&] {
    cpu::pixel_norm_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.n, d.c, d.p,
                                      eps);
  });
  return y;
}

Tensor pixel_norm_backward_cpu(const Tensor& grad_, const Tensor& x_, double eps) {
  glue::check_float("pixel_norm_backward", "x", x_);
  glue::check_like("pixel_norm_backward", "grad", grad_, x_);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "progan_fast_native::pixel_norm_backward: grad ", grad_.sizes(),
              " and x ", x_.sizes(), " differ in shape");
  const auto d = glue::ncp("pixel_norm_backward", x_);
  const Tensor x = x_.contiguous(), grad = grad_.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel() == 0) return dx;
  PROGAN_DISPATCH("pixel_norm_backward", x, [&] {
    cpu::pixel_norm_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                       dx.mutable_data_ptr<scalar_t>(), d.n, d.c, d.p, eps);
  });
  return dx;
}

// ----- conv epilogue ----------------------------------------------------------------------------

void check_epilogue(const char* op, const Tensor& conv, const std::optional<Tensor>& bias) {
  glue::check_float(op, "conv", conv);
  glue::check_dim(op, "conv", conv, 4);
  if (bias.has_value()) {
    glue::check_like(op, "bias", *bias, conv);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == conv.size(1), "progan_fast_native::", op, ": bias ",
                bias->sizes(), " does not match ", conv.size(1), " output channels");
  }
}

std::tuple<Tensor, Tensor> conv_epilogue_cpu(const Tensor& conv_, const std::optional<Tensor>& bias_, double scale,
                                             bool activation, bool pixel_norm) {
  check_epilogue("conv_epilogue", conv_, bias_);
  const auto d = glue::ncp("conv_epilogue", conv_);
  const Tensor conv = conv_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  Tensor y = at::empty_like(conv, at::MemoryFormat::Contiguous);
  Tensor r = at::empty(pixel_norm ? at::IntArrayRef{d.n, 1, conv.size(2), conv.size(3)} : at::IntArrayRef{0},
                       conv.options().dtype(acc_type(conv)));
  if (y.numel() == 0) return {y, r};
  PROGAN_DISPATCH("conv_epilogue", conv, [&] {
    cpu::conv_epilogue_forward<scalar_t>(conv.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                         bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                         pixel_norm ? r.mutable_data_ptr<progan::acc_t<scalar_t>>() : nullptr, d.n, d.c,
                                         d.p, scale, activation, pixel_norm);
  });
  return {y, r};
}

std::tuple<Tensor, Tensor> conv_epilogue_backward_cpu(const Tensor& grad_, const Tensor& y_, const Tensor& r_,
                                                      bool activation, bool pixel_norm) {
  check_epilogue("conv_epilogue_backward", y_, std::nullopt);
  glue::check_like("conv_epilogue_backward", "grad", grad_, y_);
  TORCH_CHECK(grad_.sizes() == y_.sizes(), "progan_fast_native::conv_epilogue_backward: grad ", grad_.sizes(),
              " and y ", y_.sizes(), " differ in shape");
  const auto d = glue::ncp("conv_epilogue_backward", y_);
  if (pixel_norm) {
    TORCH_CHECK(r_.numel() == d.n * d.p && r_.scalar_type() == acc_type(y_),
                "progan_fast_native::conv_epilogue_backward: r must hold one ", acc_type(y_),
                " per pixel, got ", r_.sizes(), " ", r_.scalar_type());
  }
  const Tensor grad = grad_.contiguous(), y = y_.contiguous(), r = r_.contiguous();
  const bool store_g = activation || pixel_norm;
  Tensor g = store_g ? at::empty_like(y, at::MemoryFormat::Contiguous) : grad;
  const int64_t tiles = cpu::conv_epilogue_num_tiles(d.n, d.p);
  Tensor part = at::empty({tiles, d.c}, y.options().dtype(acc_type(y)));
  if (y.numel() == 0) return {g, part.zero_().sum(0)};
  PROGAN_DISPATCH("conv_epilogue_backward", y, [&] {
    using A = progan::acc_t<scalar_t>;
    cpu::conv_epilogue_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                          pixel_norm ? r.const_data_ptr<A>() : nullptr,
                                          store_g ? g.mutable_data_ptr<scalar_t>() : nullptr,
                                          part.mutable_data_ptr<A>(), d.n, d.c, d.p, activation, pixel_norm);
  });
  return {g, part.sum(0)};
}

// ----- conv composite (CPU and CUDA): ATen conv with the unscaled weight + the fused epilogue ------

using EpilogueFn = std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, double, bool, bool);
using EpilogueBackwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, bool);

std::tuple<Tensor, Tensor> call_epilogue(const Tensor& conv, const std::optional<Tensor>& bias, double scale,
                                         bool activation, bool pixel_norm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("progan_fast_native::conv_epilogue", "")
                       .typed<EpilogueFn>();
  return op.call(conv, bias, scale, activation, pixel_norm);
}

std::tuple<Tensor, Tensor> call_epilogue_backward(const Tensor& grad, const Tensor& y, const Tensor& r,
                                                  bool activation, bool pixel_norm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("progan_fast_native::conv_epilogue_backward", "")
                       .typed<EpilogueBackwardFn>();
  return op.call(grad, y, r, activation, pixel_norm);
}

void check_conv(const Tensor& x, const Tensor& weight) {
  glue::check_float("conv2d_bias_lrelu", "x", x);
  glue::check_dim("conv2d_bias_lrelu", "x", x, 4);
  glue::check_like("conv2d_bias_lrelu", "weight", weight, x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "progan_fast_native::conv2d_bias_lrelu: weight must be [Cout, ", x.size(1),
              ", k, k] with k odd, got ", weight.sizes());
}

Tensor upsample2x(const Tensor& x) {
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  return x.reshape({n, c, h, 1, w, 1}).expand({n, c, h, 2, w, 2}).reshape({n, c, 2 * h, 2 * w});
}

std::tuple<Tensor, Tensor> conv2d_bias_lrelu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                             double scale, bool activation, bool upsample, bool pixel_norm) {
  check_conv(x, weight);
  const int64_t pad = weight.size(2) / 2;
  // The unscaled weight: the scale is applied in the epilogue, on the accumulator.
  const Tensor conv = at::conv2d(upsample ? upsample2x(x) : x, weight, {}, 1, pad);
  return call_epilogue(conv, bias, scale, activation, pixel_norm);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_bias_lrelu_backward(const Tensor& grad, const Tensor& x,
                                                              const Tensor& weight, const std::optional<Tensor>& bias,
                                                              const Tensor& y, const Tensor& r, double scale,
                                                              bool activation, bool upsample, bool pixel_norm) {
  check_conv(x, weight);
  auto [g, db] = call_epilogue_backward(grad, y, r, activation, pixel_norm);
  const int64_t pad = weight.size(2) / 2;
  const Tensor x_in = upsample ? upsample2x(x) : x;
  // d/dconv = g * scale: scale the (small) weight for dx and dw afterwards, never the (large) g.
  auto [dx, dw, unused] = at::convolution_backward(g, x_in, weight * scale, std::nullopt, {1, 1}, {pad, pad},
                                                   {1, 1}, false, {0, 0}, 1, {true, true, false});
  if (upsample) {  // adjoint of nearest 2x upsampling: sum each 2x2 block
    dx = dx.reshape({x.size(0), x.size(1), x.size(2), 2, x.size(3), 2}).sum({3, 5});
  }
  dw = dw * scale;
  db = db.to(bias.has_value() ? bias->scalar_type() : weight.scalar_type());
  return {dx, dw, db};
}

// ----- fade_in family ---------------------------------------------------------------------------

Tensor fade_in_cpu(const Tensor& low_, const Tensor& high_, const Tensor& alpha) {
  glue::check_fade_in(low_, high_);
  glue::check_alpha("fade_in", alpha, high_);
  const Tensor low = low_.contiguous(), high = high_.contiguous();
  Tensor out = at::empty_like(high, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  PROGAN_DISPATCH("fade_in", high, [&] {
    cpu::fade_in_forward<scalar_t>(low.const_data_ptr<scalar_t>(), high.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), low.numel() / low.size(3), low.size(3),
                                   progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return out;
}

std::tuple<Tensor, Tensor> fade_in_backward_cpu(const Tensor& grad_, const Tensor& alpha) {
  glue::check_float("fade_in_backward", "grad", grad_);
  glue::check_even_4d("fade_in_backward", grad_);
  glue::check_alpha("fade_in_backward", alpha, grad_);
  const Tensor grad = grad_.contiguous();
  const auto n = grad.size(0), c = grad.size(1), hl = grad.size(2) / 2, wl = grad.size(3) / 2;
  Tensor d_low = at::empty({n, c, hl, wl}, grad.options());
  Tensor d_high = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (d_low.numel() == 0) return {d_low, d_high};
  PROGAN_DISPATCH("fade_in_backward", grad, [&] {
    cpu::fade_in_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), d_low.mutable_data_ptr<scalar_t>(),
                                    d_high.mutable_data_ptr<scalar_t>(), n * c * hl, wl,
                                    progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return {d_low, d_high};
}

Tensor blend_cpu(const Tensor& old_, const Tensor& new_, const Tensor& alpha) {
  glue::check_float("blend", "new", new_);
  glue::check_like("blend", "old", old_, new_);
  TORCH_CHECK(old_.sizes() == new_.sizes(), "progan_fast_native::blend: old ", old_.sizes(), " and new ",
              new_.sizes(), " differ in shape");
  glue::check_alpha("blend", alpha, new_);
  const Tensor a = old_.contiguous(), b = new_.contiguous();
  Tensor out = at::empty_like(b, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  PROGAN_DISPATCH("blend", b, [&] {
    cpu::blend_forward<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), b.numel(), progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return out;
}

std::tuple<Tensor, Tensor> blend_backward_cpu(const Tensor& grad_, const Tensor& alpha) {
  glue::check_float("blend_backward", "grad", grad_);
  glue::check_alpha("blend_backward", alpha, grad_);
  const Tensor grad = grad_.contiguous();
  Tensor d_old = at::empty_like(grad, at::MemoryFormat::Contiguous);
  Tensor d_new = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return {d_old, d_new};
  PROGAN_DISPATCH("blend_backward", grad, [&] {
    cpu::blend_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), d_old.mutable_data_ptr<scalar_t>(),
                                  d_new.mutable_data_ptr<scalar_t>(), grad.numel(),
                                  progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return {d_old, d_new};
}

Tensor downsample2x_cpu(const Tensor& x_) {
  glue::check_float("downsample2x", "x", x_);
  glue::check_dim("downsample2x", "x", x_, 4);
  const Tensor x = x_.contiguous();
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = at::empty({n, c, h / 2, w / 2}, x.options());
  if (y.numel() == 0) return y;
  PROGAN_DISPATCH("downsample2x", x, [&] {
    cpu::downsample2x_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n * c, h, w);
  });
  return y;
}

Tensor downsample2x_backward_cpu(const Tensor& grad_, int64_t height, int64_t width) {
  glue::check_float("downsample2x_backward", "grad", grad_);
  glue::check_dim("downsample2x_backward", "grad", grad_, 4);
  TORCH_CHECK(grad_.size(2) == height / 2 && grad_.size(3) == width / 2,
              "progan_fast_native::downsample2x_backward: grad ", grad_.sizes(), " is not the pool of ", height, "x",
              width);
  const Tensor grad = grad_.contiguous();
  const auto n = grad.size(0), c = grad.size(1);
  Tensor dx = at::empty({n, c, height, width}, grad.options());
  if (dx.numel() == 0) return dx;
  PROGAN_DISPATCH("downsample2x_backward", grad, [&] {
    cpu::downsample2x_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n * c,
                                         height, width);
  });
  return dx;
}

Tensor fade_reals_cpu(const Tensor& x_, const Tensor& alpha) {
  glue::check_float("fade_reals", "x", x_);
  glue::check_even_4d("fade_reals", x_);
  glue::check_alpha("fade_reals", alpha, x_);
  const Tensor x = x_.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  PROGAN_DISPATCH("fade_reals", x, [&] {
    cpu::fade_reals<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              x.numel() / x.size(3) / 2, x.size(3) / 2, progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return out;
}

// ----- minibatch_stddev -------------------------------------------------------------------------

Tensor minibatch_stddev_cpu(const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev", "x", x_);
  glue::check_dim("minibatch_stddev", "x", x_, 4);
  TORCH_CHECK(group_size >= 1, "progan_fast_native::minibatch_stddev: group_size must be >= 1, got ", group_size);
  const Tensor x = x_.contiguous();
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = at::empty({n, c + 1, h, w}, x.options());
  if (out.numel() == 0) return out;
  if (c * h * w == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no features
  const int64_t g = glue::effective_group_size(n, group_size);
  PROGAN_DISPATCH("minibatch_stddev", x, [&] {
    cpu::minibatch_stddev_forward<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, n / g,
                                            c * h * w, h * w, eps);
  });
  return out;
}

Tensor minibatch_stddev_backward_cpu(const Tensor& grad_, const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev_backward", "x", x_);
  glue::check_dim("minibatch_stddev_backward", "x", x_, 4);
  glue::check_like("minibatch_stddev_backward", "grad", grad_, x_);
  const auto n = x_.size(0), c = x_.size(1), h = x_.size(2), w = x_.size(3);
  TORCH_CHECK(grad_.dim() == 4 && grad_.size(0) == n && grad_.size(1) == c + 1 && grad_.size(2) == h &&
                  grad_.size(3) == w,
              "progan_fast_native::minibatch_stddev_backward: grad ", grad_.sizes(), " does not match x ", x_.sizes());
  const Tensor x = x_.contiguous(), grad = grad_.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel() == 0) return dx;
  const int64_t g = glue::effective_group_size(n, group_size);
  PROGAN_DISPATCH("minibatch_stddev_backward", x, [&] {
    cpu::minibatch_stddev_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                             dx.mutable_data_ptr<scalar_t>(), g, n / g, c * h * w, h * w, eps);
  });
  return dx;
}

}  // namespace
}  // namespace progan

TORCH_LIBRARY(progan_fast_native, m) {
  m.def("pixel_norm(Tensor x, float eps) -> Tensor");
  m.def("pixel_norm_backward(Tensor grad, Tensor x, float eps) -> Tensor");
  m.def("conv_epilogue(Tensor conv, Tensor? bias, float scale, bool activation, bool pixel_norm) -> (Tensor, Tensor)");
  m.def("conv_epilogue_backward(Tensor grad, Tensor y, Tensor r, bool activation, bool pixel_norm) -> "
        "(Tensor, Tensor)");
  m.def("conv2d_bias_lrelu(Tensor x, Tensor weight, Tensor? bias, float scale, bool activation, bool upsample, "
        "bool pixel_norm) -> (Tensor, Tensor)");
  m.def("conv2d_bias_lrelu_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor r, "
        "float scale, bool activation, bool upsample, bool pixel_norm) -> (Tensor, Tensor, Tensor)");
  m.def("fade_in(Tensor low, Tensor high, Tensor alpha) -> Tensor");
  m.def("fade_in_backward(Tensor grad, Tensor alpha) -> (Tensor, Tensor)");
  m.def("blend(Tensor old, Tensor new, Tensor alpha) -> Tensor");
  m.def("blend_backward(Tensor grad, Tensor alpha) -> (Tensor, Tensor)");
  m.def("downsample2x(Tensor x) -> Tensor");
  m.def("downsample2x_backward(Tensor grad, int height, int width) -> Tensor");
  m.def("fade_reals(Tensor x, Tensor alpha) -> Tensor");
  m.def("minibatch_stddev(Tensor x, int group_size, float eps) -> Tensor");
  m.def("minibatch_stddev_backward(Tensor grad, Tensor x, int group_size, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  using namespace progan;
  m.impl("pixel_norm", &pixel_norm_cpu);
  m.impl("pixel_norm_backward", &pixel_norm_backward_cpu);
  m.impl("conv_epilogue", &conv_epilogue_cpu);
  m.impl("conv_epilogue_backward", &conv_epilogue_backward_cpu);
  m.impl("conv2d_bias_lrelu", &conv2d_bias_lrelu);
  m.impl("conv2d_bias_lrelu_backward", &conv2d_bias_lrelu_backward);
  m.impl("fade_in", &fade_in_cpu);
  m.impl("fade_in_backward", &fade_in_backward_cpu);
  m.impl("blend", &blend_cpu);
  m.impl("blend_backward", &blend_backward_cpu);
  m.impl("downsample2x", &downsample2x_cpu);
  m.impl("downsample2x_backward", &downsample2x_backward_cpu);
  m.impl("fade_reals", &fade_reals_cpu);
  m.impl("minibatch_stddev", &minibatch_stddev_cpu);
  m.impl("minibatch_stddev_backward", &minibatch_stddev_backward_cpu);
}

#ifdef PROGAN_WITH_CUDA
// The conv composite is device-independent (its device kernels are reached through the dispatcher).
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("conv2d_bias_lrelu", &progan::conv2d_bias_lrelu);
  m.impl("conv2d_bias_lrelu_backward", &progan::conv2d_bias_lrelu_backward);
}
#endif

// A plain Python extension module (no pybind11: it only has to load the library, which registers
// the ops above). WITH_CUDA tells progan_fast.ops._native whether CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "progan_fast native ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef PROGAN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
