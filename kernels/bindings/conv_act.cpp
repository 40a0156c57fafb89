// conv_act's dispatcher glue. conv_epilogue is the fused epilogue on a conv output (scale, bias,
// leaky-ReLU, optional pixel norm; kernels/cpu/conv_act.cpp and kernels/cuda/conv_act.cu);
// conv2d_bias_lrelu is the whole layer: ATen's convolution with the unscaled weight, then
// conv_epilogue through the dispatcher. The composite is device-independent, so the same function
// is registered for CPU and CUDA; the dispatcher then picks the epilogue's kernel by device.
//
// Layouts (progan/layout.h): x dense NCHW or dense NHWC is used as it is, and y, dx come out in its
// layout with no copy of an activation: ATen's conv runs on the NHWC input (oneDNN and cuDNN keep
// channels-last) with the weight brought to x's layout (a copy of a weight at most; ATen picks the
// output's layout from both), the epilogue kernels address either layout, the upsample and its
// adjoint are views of x's own memory order, and dw is returned in the weight's layout.
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/conv_act.py.
#include <ATen/TensorOperators.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "glue.h"

namespace progan {
namespace {

using at::Tensor;
using glue::acc_type;

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
  const auto dl = glue::dense_layout(conv_);
  const Tensor& conv = dl.t;
  const bool cl = dl.channels_last;
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  Tensor y = at::empty_like(conv, glue::memory_format(cl));
  Tensor r = at::empty(pixel_norm ? at::IntArrayRef{d.n, 1, conv.size(2), conv.size(3)} : at::IntArrayRef{0},
                       conv.options().dtype(acc_type(conv)));
  if (y.numel() == 0) return {y, r};
  PROGAN_DISPATCH("conv_epilogue", conv, [&] {
    cpu::conv_epilogue_forward<scalar_t>(conv.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                         bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                         pixel_norm ? r.mutable_data_ptr<progan::acc_t<scalar_t>>() : nullptr, d.n, d.c,
                                         d.p, scale, activation, pixel_norm, cl);
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
  const auto dl = glue::dense_layout(y_);
  const Tensor& y = dl.t;
  const bool cl = dl.channels_last;
  const Tensor grad = glue::to_layout(grad_, cl), r = r_.contiguous();
  const bool store_g = activation || pixel_norm;
  Tensor g = store_g ? at::empty_like(y, glue::memory_format(cl)) : grad;
  const int64_t tiles = cpu::conv_epilogue_num_tiles(d.n, d.p);
  Tensor part = at::empty({tiles, d.c}, y.options().dtype(acc_type(y)));
  if (y.numel() == 0) return {g, part.zero_().sum(0)};
  PROGAN_DISPATCH("conv_epilogue_backward", y, [&] {
    using A = progan::acc_t<scalar_t>;
    cpu::conv_epilogue_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                          pixel_norm ? r.const_data_ptr<A>() : nullptr,
                                          store_g ? g.mutable_data_ptr<scalar_t>() : nullptr,
                                          part.mutable_data_ptr<A>(), d.n, d.c, d.p, activation, pixel_norm, cl);
  });
  return {g, part.sum(0)};
}

// ----- the composite: ATen conv with the unscaled weight + the fused epilogue (CPU and CUDA) ----

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

// Nearest 2x upsample of a dense x in its own layout: NHWC is upsampled as the [N, H, W, C] view of
// its memory, so the result is channels-last too.
Tensor upsample2x(const Tensor& x, bool channels_last) {
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (!channels_last)
    return x.reshape({n, c, h, 1, w, 1}).expand({n, c, h, 2, w, 2}).reshape({n, c, 2 * h, 2 * w});
  return x.permute({0, 2, 3, 1})
      .reshape({n, h, 1, w, 1, c})
      .expand({n, h, 2, w, 2, c})
      .reshape({n, 2 * h, 2 * w, c})
      .permute({0, 3, 1, 2});
}

// Its adjoint: the sum of each 2x2 block, on a view of g's memory in its layout (no copy).
Tensor upsample2x_adjoint(const Tensor& g, bool channels_last) {
  const auto n = g.size(0), c = g.size(1), h = g.size(2) / 2, w = g.size(3) / 2;
  if (!channels_last) return g.reshape({n, c, h, 2, w, 2}).sum({3, 5});
  return g.permute({0, 2, 3, 1}).reshape({n, h, 2, w, 2, c}).sum({2, 4}).permute({0, 3, 1, 2});
}

std::tuple<Tensor, Tensor> conv2d_bias_lrelu(const Tensor& x_, const Tensor& weight, const std::optional<Tensor>& bias,
                                             double scale, bool activation, bool upsample, bool pixel_norm) {
  check_conv(x_, weight);
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  const int64_t pad = weight.size(2) / 2;
  // The unscaled weight (the scale is applied in the epilogue, on the accumulator), in x's layout,
  // so that ATen's conv gives its output in x's layout; to_layout is a safety net, no copy there.
  const Tensor conv =
      glue::to_layout(at::conv2d(upsample ? upsample2x(x, cl) : x, glue::to_layout(weight, cl), {}, 1, pad), cl);
  return call_epilogue(conv, bias, scale, activation, pixel_norm);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_bias_lrelu_backward(const Tensor& grad, const Tensor& x_,
                                                              const Tensor& weight, const std::optional<Tensor>& bias,
                                                              const Tensor& y, const Tensor& r, double scale,
                                                              bool activation, bool upsample, bool pixel_norm) {
  check_conv(x_, weight);
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  // y is in x's layout (the forward wrote it there); the epilogue brings grad to y's.
  auto [g, db] = call_epilogue_backward(grad, y, r, activation, pixel_norm);
  const int64_t pad = weight.size(2) / 2;
  const Tensor x_in = upsample ? upsample2x(x, cl) : x;
  // d/dconv = g * scale: scale the (small) weight for dx and dw afterwards, never the (large) g.
  auto [dx, dw, unused] = at::convolution_backward(g, x_in, glue::to_layout(weight * scale, cl), std::nullopt,
                                                   {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1,
                                                   {true, true, false});
  if (upsample) dx = upsample2x_adjoint(dx, cl);  // adjoint of nearest 2x upsampling
  dx = glue::to_layout(dx, cl);  // a safety net: ATen's dx is already in x's layout
  // dw in the weight's layout (ATen's follows the input's): a weight-sized copy at most.
  const bool weight_cl = weight.dim() == 4 && !weight.is_contiguous() &&
                         weight.is_contiguous(at::MemoryFormat::ChannelsLast);
  dw = glue::to_layout(dw * scale, weight_cl);
  db = db.to(bias.has_value() ? bias->scalar_type() : weight.scalar_type());
  return {dx, dw, db};
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::dtype_of;
using glue::stream;

std::tuple<Tensor, Tensor> conv_epilogue_cuda(const Tensor& conv_, const std::optional<Tensor>& bias_, double scale,
                                              bool activation, bool pixel_norm) {
  glue::check_float("conv_epilogue", "conv", conv_);
  glue::check_dim("conv_epilogue", "conv", conv_, 4);
  if (bias_.has_value()) {
    glue::check_like("conv_epilogue", "bias", *bias_, conv_);
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == conv_.size(1),
                "progan_fast_native::conv_epilogue: bias does not match the output channels");
  }
  const auto d = glue::ncp("conv_epilogue", conv_);
  const c10::cuda::CUDAGuard guard(conv_.device());
  const auto dl = glue::dense_layout(conv_);
  const Tensor& conv = dl.t;
  const bool cl = dl.channels_last;
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  Tensor y = at::empty_like(conv, glue::memory_format(cl));
  Tensor r = at::empty(pixel_norm ? at::IntArrayRef{d.n, 1, conv.size(2), conv.size(3)} : at::IntArrayRef{0},
                       conv.options().dtype(acc_type(conv)));
  if (y.numel()) {
    C10_CUDA_CHECK(k::conv_epilogue_forward(dtype_of("conv_epilogue", conv), conv.const_data_ptr(),
                                            y.mutable_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
                                            pixel_norm ? r.mutable_data_ptr() : nullptr, d.n, d.c, d.p, scale,
                                            activation, pixel_norm, cl, stream()));
  }
  return {y, r};
}

std::tuple<Tensor, Tensor> conv_epilogue_backward_cuda(const Tensor& grad_, const Tensor& y_, const Tensor& r_,
                                                       bool activation, bool pixel_norm) {
  glue::check_float("conv_epilogue_backward", "y", y_);
  glue::check_dim("conv_epilogue_backward", "y", y_, 4);
  glue::check_like("conv_epilogue_backward", "grad", grad_, y_);
  TORCH_CHECK(grad_.sizes() == y_.sizes(), "progan_fast_native::conv_epilogue_backward: grad and y differ in shape");
  const auto d = glue::ncp("conv_epilogue_backward", y_);
  if (pixel_norm) {
    TORCH_CHECK(r_.numel() == d.n * d.p && r_.scalar_type() == acc_type(y_) && r_.device() == y_.device(),
                "progan_fast_native::conv_epilogue_backward: r must hold one ", acc_type(y_), " per pixel");
  }
  const c10::cuda::CUDAGuard guard(y_.device());
  const auto dl = glue::dense_layout(y_);
  const Tensor& y = dl.t;
  const bool cl = dl.channels_last;
  const Tensor grad = glue::to_layout(grad_, cl), r = r_.contiguous();
  const bool store_g = activation || pixel_norm;
  Tensor g = store_g ? at::empty_like(y, glue::memory_format(cl)) : grad;
  Tensor part = at::zeros({std::max<int64_t>(1, k::conv_epilogue_num_blocks(d.n, d.p)), d.c},
                          y.options().dtype(acc_type(y)));
  if (y.numel()) {
    C10_CUDA_CHECK(k::conv_epilogue_backward(dtype_of("conv_epilogue_backward", y), grad.const_data_ptr(),
                                             y.const_data_ptr(), pixel_norm ? r.const_data_ptr() : nullptr,
                                             store_g ? g.mutable_data_ptr() : nullptr, part.mutable_data_ptr(), d.n,
                                             d.c, d.p, activation, pixel_norm, cl, stream()));
  }
  return {g, part.sum(0)};
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("conv_epilogue", &progan::conv_epilogue_cpu);
  m.impl("conv_epilogue_backward", &progan::conv_epilogue_backward_cpu);
  m.impl("conv2d_bias_lrelu", &progan::conv2d_bias_lrelu);
  m.impl("conv2d_bias_lrelu_backward", &progan::conv2d_bias_lrelu_backward);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("conv_epilogue", &progan::conv_epilogue_cuda);
  m.impl("conv_epilogue_backward", &progan::conv_epilogue_backward_cuda);
  m.impl("conv2d_bias_lrelu", &progan::conv2d_bias_lrelu);
  m.impl("conv2d_bias_lrelu_backward", &progan::conv2d_bias_lrelu_backward);
}
#endif
