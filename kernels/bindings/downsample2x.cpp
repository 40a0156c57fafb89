// downsample2x's dispatcher glue (the 2x2 average pool): argument checks, output allocation, and
// the call of its C++ CPU twin (kernels/cpu/downsample2x.cpp) or, in CUDA builds, of its CUDA
// launcher (kernels/cuda/downsample2x.cu) on the current stream.
//
// Layouts (progan/layout.h): `x` (or `grad` for the backward) decides, dense NCHW or dense NHWC as
// it is (anything else is copied to NCHW), and the output is allocated in that layout.
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/downsample2x.py.
#include "glue.h"

namespace progan {
namespace {

using at::Tensor;

Tensor downsample2x_cpu(const Tensor& x_) {
  glue::check_float("downsample2x", "x", x_);
  glue::check_dim("downsample2x", "x", x_, 4);
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool cl = dense.channels_last;
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = at::empty({n, c, h / 2, w / 2}, x.options(), glue::memory_format(cl));
  if (y.numel() == 0) return y;
  PROGAN_DISPATCH("downsample2x", x, [&] {
    cpu::downsample2x_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n, c, h, w, cl);
  });
  return y;
}

Tensor downsample2x_backward_cpu(const Tensor& grad_, int64_t height, int64_t width) {
  glue::check_float("downsample2x_backward", "grad", grad_);
  glue::check_dim("downsample2x_backward", "grad", grad_, 4);
  TORCH_CHECK(grad_.size(2) == height / 2 && grad_.size(3) == width / 2,
              "progan_fast_native::downsample2x_backward: grad ", grad_.sizes(), " is not the pool of ", height, "x",
              width);
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  const bool cl = dense.channels_last;
  const auto n = grad.size(0), c = grad.size(1);
  Tensor dx = at::empty({n, c, height, width}, grad.options(), glue::memory_format(cl));
  if (dx.numel() == 0) return dx;
  PROGAN_DISPATCH("downsample2x_backward", grad, [&] {
    cpu::downsample2x_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n, c,
                                         height, width, cl);
  });
  return dx;
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::dtype_of;
using glue::stream;

Tensor downsample2x_cuda(const Tensor& x_) {
  glue::check_float("downsample2x", "x", x_);
  glue::check_dim("downsample2x", "x", x_, 4);
  const c10::cuda::CUDAGuard guard(x_.device());
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool cl = dense.channels_last;
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = at::empty({n, c, h / 2, w / 2}, x.options(), glue::memory_format(cl));
  if (y.numel()) C10_CUDA_CHECK(k::downsample2x_forward(dtype_of("downsample2x", x), x.const_data_ptr(),
                                                        y.mutable_data_ptr(), n, c, h, w, cl, stream()));
  return y;
}

Tensor downsample2x_backward_cuda(const Tensor& grad_, int64_t height, int64_t width) {
  glue::check_float("downsample2x_backward", "grad", grad_);
  glue::check_dim("downsample2x_backward", "grad", grad_, 4);
  TORCH_CHECK(grad_.size(2) == height / 2 && grad_.size(3) == width / 2,
              "progan_fast_native::downsample2x_backward: grad ", grad_.sizes(), " is not the pool of ", height, "x",
              width);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  const bool cl = dense.channels_last;
  const auto n = grad.size(0), c = grad.size(1);
  Tensor dx = at::empty({n, c, height, width}, grad.options(), glue::memory_format(cl));
  if (dx.numel()) C10_CUDA_CHECK(k::downsample2x_backward(dtype_of("downsample2x_backward", grad),
                                                          grad.const_data_ptr(), dx.mutable_data_ptr(), n, c, height,
                                                          width, cl, stream()));
  return dx;
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("downsample2x", &progan::downsample2x_cpu);
  m.impl("downsample2x_backward", &progan::downsample2x_backward_cpu);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("downsample2x", &progan::downsample2x_cuda);
  m.impl("downsample2x_backward", &progan::downsample2x_backward_cuda);
}
#endif
