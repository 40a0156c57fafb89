// CUDA implementations of the progan_fast_native ops: checks, allocation, and a call of the
// launcher (kernels/cuda, torch-free) on the current stream. No host synchronization and no read
// of device memory: every op can be captured by a CUDA graph. The only translation unit that
// needs CUDA headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "glue.h"
#include "progan/cuda_launchers.h"

namespace progan {
namespace {

using at::Tensor;
using glue::acc_type;
namespace k = progan::cuda;

k::DType dtype_of(const char* op, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::Float32;
    case at::kDouble: return k::DType::Float64;
    case at::kBFloat16: return k::DType::BFloat16;
    case at::kHalf: return k::DType::Float16;
    default: TORCH_CHECK(false, "progan_fast_native::", op, ": unsupported dtype ", t.scalar_type());
  }
  return k::DType::Float32;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// alpha as the kernel reads it: a 0-dim device scalar of the accumulation type (a device-side cast
// when needed, never a host read).
Tensor alpha_for(const char* op, const Tensor& alpha, const Tensor& like) {
  glue::check_alpha(op, alpha, like);
  return alpha.to(acc_type(like)).contiguous();
}

Tensor pixel_norm_cuda(const Tensor& x_, double eps) {
  glue::check_float("pixel_norm", "x", x_);
  const auto d = glue::ncp("pixel_norm", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel()) C10_CUDA_CHECK(k::pixel_norm_forward(dtype_of("pixel_norm", x), x.const_data_ptr(),
                                                      y.mutable_data_ptr(), d.n, d.c, d.p, eps, stream()));
  return y;
}

Tensor pixel_norm_backward_cuda(const Tensor& grad_, const Tensor& x_, double eps) {
  glue::check_float("pixel_norm_backward", "x", x_);
  glue::check_like("pixel_norm_backward", "grad", grad_, x_);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "progan_fast_native::pixel_norm_backward: grad and x differ in shape");
  const auto d = glue::ncp("pixel_norm_backward", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), grad = grad_.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel()) C10_CUDA_CHECK(k::pixel_norm_backward(dtype_of("pixel_norm_backward", x), grad.const_data_ptr(),
                                                        x.const_data_ptr(), dx.mutable_data_ptr(), d.n, d.c, d.p, eps,
                                                        stream()));
  return dx;
}

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
  const Tensor conv = conv_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  Tensor y = at::empty_like(conv, at::MemoryFormat::Contiguous);
  Tensor r = at::empty(pixel_norm ? at::IntArrayRef{d.n, 1, conv.size(2), conv.size(3)} : at::IntArrayRef{0},
                       conv.options().dtype(acc_type(conv)));
  if (y.numel()) {
    C10_CUDA_CHECK(k::conv_epilogue_forward(dtype_of("conv_epilogue", conv), conv.const_data_ptr(),
                                            y.mutable_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
                                            pixel_norm ? r.mutable_data_ptr() : nullptr, d.n, d.c, d.p, scale,
                                            activation, pixel_norm, stream()));
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
  const Tensor grad = grad_.contiguous(), y = y_.contiguous(), r = r_.contiguous();
  const bool store_g = activation || pixel_norm;
  Tensor g = store_g ? at::empty_like(y, at::MemoryFormat::Contiguous) : grad;
  Tensor part = at::zeros({std::max<int64_t>(1, k::conv_epilogue_num_blocks(d.n, d.p)), d.c},
                          y.options().dtype(acc_type(y)));
  if (y.numel()) {
    C10_CUDA_CHECK(k::conv_epilogue_backward(dtype_of("conv_epilogue_backward", y), grad.const_data_ptr(),
                                             y.const_data_ptr(), pixel_norm ? r.const_data_ptr() : nullptr,
                                             store_g ? g.mutable_data_ptr() : nullptr, part.mutable_data_ptr(), d.n,
                                             d.c, d.p, activation, pixel_norm, stream()));
  }
  return {g, part.sum(0)};
}

Tensor fade_in_cuda(const Tensor& low_, const Tensor& high_, const Tensor& alpha_) {
  glue::check_fade_in(low_, high_);
  const c10::cuda::CUDAGuard guard(high_.device());
  const Tensor alpha = alpha_for("fade_in", alpha_, high_);
  const Tensor low = low_.contiguous(), high = high_.contiguous();
  Tensor out = at::empty_like(high, at::MemoryFormat::Contiguous);
  if (out.numel()) C10_CUDA_CHECK(k::fade_in_forward(dtype_of("fade_in", high), low.const_data_ptr(),
                                                     high.const_data_ptr(), alpha.const_data_ptr(),
                                                     out.mutable_data_ptr(), low.numel() / low.size(3), low.size(3),
                                                     stream()));
  return out;
}

std::tuple<Tensor, Tensor> fade_in_backward_cuda(const Tensor& grad_, const Tensor& alpha_) {
  glue::check_float("fade_in_backward", "grad", grad_);
  glue::check_even_4d("fade_in_backward", grad_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor alpha = alpha_for("fade_in_backward", alpha_, grad_);
  const Tensor grad = grad_.contiguous();
  const auto n = grad.size(0), c = grad.size(1), hl = grad.size(2) / 2, wl = grad.size(3) / 2;
  Tensor d_low = at::empty({n, c, hl, wl}, grad.options());
  Tensor d_high = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (d_low.numel()) C10_CUDA_CHECK(k::fade_in_backward(dtype_of("fade_in_backward", grad), grad.const_data_ptr(),
                                                        alpha.const_data_ptr(), d_low.mutable_data_ptr(),
                                                        d_high.mutable_data_ptr(), n * c * hl, wl, stream()));
  return {d_low, d_high};
}

Tensor blend_cuda(const Tensor& old_, const Tensor& new_, const Tensor& alpha_) {
  glue::check_float("blend", "new", new_);
  glue::check_like("blend", "old", old_, new_);
  TORCH_CHECK(old_.sizes() == new_.sizes(), "progan_fast_native::blend: old and new differ in shape");
  const c10::cuda::CUDAGuard guard(new_.device());
  const Tensor alpha = alpha_for("blend", alpha_, new_);
  const Tensor a = old_.contiguous(), b = new_.contiguous();
  Tensor out = at::empty_like(b, at::MemoryFormat::Contiguous);
  if (out.numel()) C10_CUDA_CHECK(k::blend_forward(dtype_of("blend", b), a.const_data_ptr(), b.const_data_ptr(),
                                                   alpha.const_data_ptr(), out.mutable_data_ptr(), b.numel(),
                                                   stream()));
  return out;
}

std::tuple<Tensor, Tensor> blend_backward_cuda(const Tensor& grad_, const Tensor& alpha_) {
  glue::check_float("blend_backward", "grad", grad_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor alpha = alpha_for("blend_backward", alpha_, grad_);
  const Tensor grad = grad_.contiguous();
  Tensor d_old = at::empty_like(grad, at::MemoryFormat::Contiguous);
  Tensor d_new = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (grad.numel()) C10_CUDA_CHECK(k::blend_backward(dtype_of("blend_backward", grad), grad.const_data_ptr(),
                                                     alpha.const_data_ptr(), d_old.mutable_data_ptr(),
                                                     d_new.mutable_data_ptr(), grad.numel(), stream()));
  return {d_old, d_new};
}

Tensor downsample2x_cuda(const Tensor& x_) {
  glue::check_float("downsample2x", "x", x_);
  glue::check_dim("downsample2x", "x", x_, 4);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = at::empty({n, c, h / 2, w / 2}, x.options());
  if (y.numel()) C10_CUDA_CHECK(k::downsample2x_forward(dtype_of("downsample2x", x), x.const_data_ptr(),
                                                        y.mutable_data_ptr(), n * c, h, w, stream()));
  return y;
}

Tensor downsample2x_backward_cuda(const Tensor& grad_, int64_t height, int64_t width) {
  glue::check_float("downsample2x_backward", "grad", grad_);
  glue::check_dim("downsample2x_backward", "grad", grad_, 4);
  TORCH_CHECK(grad_.size(2) == height / 2 && grad_.size(3) == width / 2,
              "progan_fast_native::downsample2x_backward: grad ", grad_.sizes(), " is not the pool of ", height, "x",
              width);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor grad = grad_.contiguous();
  const auto n = grad.size(0), c = grad.size(1);
  Tensor dx = at::empty({n, c, height, width}, grad.options());
  if (dx.numel()) C10_CUDA_CHECK(k::downsample2x_backward(dtype_of("downsample2x_backward", grad),
                                                          grad.const_data_ptr(), dx.mutable_data_ptr(), n * c, height,
                                                          width, stream()));
  return dx;
}

Tensor fade_reals_cuda(const Tensor& x_, const Tensor& alpha_) {
  glue::check_float("fade_reals", "x", x_);
  glue::check_even_4d("fade_reals", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor alpha = alpha_for("fade_reals", alpha_, x_);
  const Tensor x = x_.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel()) C10_CUDA_CHECK(k::fade_reals(dtype_of("fade_reals", x), x.const_data_ptr(), alpha.const_data_ptr(),
                                                out.mutable_data_ptr(), x.numel() / x.size(3) / 2, x.size(3) / 2,
                                                stream()));
  return out;
}

Tensor minibatch_stddev_cuda(const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev", "x", x_);
  glue::check_dim("minibatch_stddev", "x", x_, 4);
  TORCH_CHECK(group_size >= 1, "progan_fast_native::minibatch_stddev: group_size must be >= 1");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = at::empty({n, c + 1, h, w}, x.options());
  if (out.numel() == 0) return out;
  if (c * h * w == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  const int64_t g = glue::effective_group_size(n, group_size), m = n / g;
  Tensor part = at::empty({k::minibatch_stddev_part_count(m, c * h * w)}, x.options().dtype(acc_type(x)));
  C10_CUDA_CHECK(k::minibatch_stddev_forward(dtype_of("minibatch_stddev", x), x.const_data_ptr(),
                                             out.mutable_data_ptr(), part.mutable_data_ptr(), g, m, c * h * w, h * w,
                                             eps, stream()));
  return out;
}

Tensor minibatch_stddev_backward_cuda(const Tensor& grad_, const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev_backward", "x", x_);
  glue::check_dim("minibatch_stddev_backward", "x", x_, 4);
  glue::check_like("minibatch_stddev_backward", "grad", grad_, x_);
  const auto n = x_.size(0), c = x_.size(1), h = x_.size(2), w = x_.size(3);
  TORCH_CHECK(grad_.dim() == 4 && grad_.size(0) == n && grad_.size(1) == c + 1 && grad_.size(2) == h &&
                  grad_.size(3) == w,
              "progan_fast_native::minibatch_stddev_backward: grad ", grad_.sizes(), " does not match x ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), grad = grad_.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel() == 0) return dx;
  const int64_t g = glue::effective_group_size(n, group_size), m = n / g;
  Tensor gs = at::empty({m}, x.options().dtype(acc_type(x)));
  C10_CUDA_CHECK(k::minibatch_stddev_backward(dtype_of("minibatch_stddev_backward", x), grad.const_data_ptr(),
                                              x.const_data_ptr(), gs.mutable_data_ptr(), dx.mutable_data_ptr(), g, m,
                                              c * h * w, h * w, eps, stream()));
  return dx;
}

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  using namespace progan;
  m.impl("pixel_norm", &pixel_norm_cuda);
  m.impl("pixel_norm_backward", &pixel_norm_backward_cuda);
  m.impl("conv_epilogue", &conv_epilogue_cuda);
  m.impl("conv_epilogue_backward", &conv_epilogue_backward_cuda);
  m.impl("fade_in", &fade_in_cuda);
  m.impl("fade_in_backward", &fade_in_backward_cuda);
  m.impl("blend", &blend_cuda);
  m.impl("blend_backward", &blend_backward_cuda);
  m.impl("downsample2x", &downsample2x_cuda);
  m.impl("downsample2x_backward", &downsample2x_backward_cuda);
  m.impl("fade_reals", &fade_reals_cuda);
  m.impl("minibatch_stddev", &minibatch_stddev_cuda);
  m.impl("minibatch_stddev_backward", &minibatch_stddev_backward_cuda);
}
