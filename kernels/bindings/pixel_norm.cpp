// pixel_norm's dispatcher glue: argument checks, output allocation, and the call of its C++ CPU
// twin (kernels/cpu/pixel_norm.cpp) or, in CUDA builds, of its CUDA launcher
// (kernels/cuda/pixel_norm.cu) on the current stream.
//
// Layouts (progan/layout.h): x dense NCHW or dense NHWC is used as it is and the output comes out
// in its layout (grad is brought to x's layout, a copy only where it differs); other strides are
// copied to NCHW first.
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/pixel_norm.py.
#include "glue.h"

namespace progan {
namespace {

using at::Tensor;

Tensor pixel_norm_cpu(const Tensor& x_, double eps) {
  glue::check_float("pixel_norm", "x", x_);
  const auto d = glue::ncp("pixel_norm", x_);
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  Tensor y = at::empty_like(x, glue::memory_format(cl));
  if (y.numel() == 0) return y;
  PROGAN_DISPATCH("pixel_norm", x, [&] {
    cpu::pixel_norm_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.n, d.c, d.p,
                                      eps, cl);
  });
  return y;
}

Tensor pixel_norm_backward_cpu(const Tensor& grad_, const Tensor& x_, double eps) {
  glue::check_float("pixel_norm_backward", "x", x_);
  glue::check_like("pixel_norm_backward", "grad", grad_, x_);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "progan_fast_native::pixel_norm_backward: grad ", grad_.sizes(),
              " and x ", x_.sizes(), " differ in shape");
  const auto d = glue::ncp("pixel_norm_backward", x_);
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  const Tensor grad = glue::to_layout(grad_, cl);
  Tensor dx = at::empty_like(x, glue::memory_format(cl));
  if (dx.numel() == 0) return dx;
  PROGAN_DISPATCH("pixel_norm_backward", x, [&] {
    cpu::pixel_norm_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                       dx.mutable_data_ptr<scalar_t>(), d.n, d.c, d.p, eps, cl);
  });
  return dx;
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::dtype_of;
using glue::stream;

Tensor pixel_norm_cuda(const Tensor& x_, double eps) {
  glue::check_float("pixel_norm", "x", x_);
  const auto d = glue::ncp("pixel_norm", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  Tensor y = at::empty_like(x, glue::memory_format(cl));
  if (y.numel()) C10_CUDA_CHECK(k::pixel_norm_forward(dtype_of("pixel_norm", x), x.const_data_ptr(),
                                                      y.mutable_data_ptr(), d.n, d.c, d.p, eps, cl, stream()));
  return y;
}

Tensor pixel_norm_backward_cuda(const Tensor& grad_, const Tensor& x_, double eps) {
  glue::check_float("pixel_norm_backward", "x", x_);
  glue::check_like("pixel_norm_backward", "grad", grad_, x_);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "progan_fast_native::pixel_norm_backward: grad and x differ in shape");
  const auto d = glue::ncp("pixel_norm_backward", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto dl = glue::dense_layout(x_);
  const Tensor& x = dl.t;
  const bool cl = dl.channels_last;
  const Tensor grad = glue::to_layout(grad_, cl);
  Tensor dx = at::empty_like(x, glue::memory_format(cl));
  if (dx.numel()) C10_CUDA_CHECK(k::pixel_norm_backward(dtype_of("pixel_norm_backward", x), grad.const_data_ptr(),
                                                        x.const_data_ptr(), dx.mutable_data_ptr(), d.n, d.c, d.p, eps,
                                                        cl, stream()));
  return dx;
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("pixel_norm", &progan::pixel_norm_cpu);
  m.impl("pixel_norm_backward", &progan::pixel_norm_backward_cpu);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("pixel_norm", &progan::pixel_norm_cuda);
  m.impl("pixel_norm_backward", &progan::pixel_norm_backward_cuda);
}
#endif
