// minibatch_stddev's dispatcher glue: argument checks, output and scratch allocation, and the call
// of its C++ CPU twin (kernels/cpu/minibatch_stddev.cpp) or, in CUDA builds, of its CUDA launcher
// (kernels/cuda/minibatch_stddev.cu) on the current stream.
//
// Layouts (progan/layout.h): x dense NCHW or dense NHWC is used as it is (other strides are copied to
// NCHW); the output and dx are allocated in x's layout, and the output gradient is brought to it
// (a copy only when it arrives in the other layout).
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/minibatch_stddev.py.
#include <limits>

#include "glue.h"

namespace progan {
namespace {

using at::Tensor;
using glue::acc_type;

// The largest group size <= group_size that divides the batch, as in progan_fast/ops/minibatch_stddev.py.
int64_t effective_group_size(int64_t batch, int64_t group_size) {
  int64_t g = std::max<int64_t>(1, std::min(group_size, batch));
  while (batch % g) --g;
  return g;
}

Tensor minibatch_stddev_cpu(const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev", "x", x_);
  glue::check_dim("minibatch_stddev", "x", x_, 4);
  TORCH_CHECK(group_size >= 1, "progan_fast_native::minibatch_stddev: group_size must be >= 1, got ", group_size);
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool channels_last = dense.channels_last;
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = at::empty({n, c + 1, h, w}, x.options(), glue::memory_format(channels_last));
  if (out.numel() == 0) return out;
  if (c * h * w == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no features
  const int64_t g = effective_group_size(n, group_size);
  PROGAN_DISPATCH("minibatch_stddev", x, [&] {
    cpu::minibatch_stddev_forward<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, n / g,
                                            c * h * w, h * w, eps, channels_last);
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
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool channels_last = dense.channels_last;
  const Tensor grad = glue::to_layout(grad_, channels_last);
  Tensor dx = at::empty_like(x, glue::memory_format(channels_last));
  if (dx.numel() == 0) return dx;
  const int64_t g = effective_group_size(n, group_size);
  PROGAN_DISPATCH("minibatch_stddev_backward", x, [&] {
    cpu::minibatch_stddev_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                             dx.mutable_data_ptr<scalar_t>(), g, n / g, c * h * w, h * w, eps,
                                             channels_last);
  });
  return dx;
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::dtype_of;
using glue::stream;

Tensor minibatch_stddev_cuda(const Tensor& x_, int64_t group_size, double eps) {
  glue::check_float("minibatch_stddev", "x", x_);
  glue::check_dim("minibatch_stddev", "x", x_, 4);
  TORCH_CHECK(group_size >= 1, "progan_fast_native::minibatch_stddev: group_size must be >= 1");
  const c10::cuda::CUDAGuard guard(x_.device());
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool channels_last = dense.channels_last;
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = at::empty({n, c + 1, h, w}, x.options(), glue::memory_format(channels_last));
  if (out.numel() == 0) return out;
  if (c * h * w == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  TORCH_CHECK(!channels_last || c * h * w <= int64_t(UINT32_MAX),
              "progan_fast_native::minibatch_stddev: a channels-last sample of ", c * h * w,
              " features is too large for the CUDA kernels (at most 2^32 - 1); pass it contiguous");
  const int64_t g = effective_group_size(n, group_size), m = n / g;
  Tensor part = at::empty({k::minibatch_stddev_part_count(m, c * h * w)}, x.options().dtype(acc_type(x)));
  C10_CUDA_CHECK(k::minibatch_stddev_forward(dtype_of("minibatch_stddev", x), x.const_data_ptr(),
                                             out.mutable_data_ptr(), part.mutable_data_ptr(), g, m, c * h * w, h * w,
                                             eps, channels_last, stream()));
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
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool channels_last = dense.channels_last;
  const Tensor grad = glue::to_layout(grad_, channels_last);
  Tensor dx = at::empty_like(x, glue::memory_format(channels_last));
  if (dx.numel() == 0) return dx;
  TORCH_CHECK(!channels_last || c * h * w <= int64_t(UINT32_MAX),
              "progan_fast_native::minibatch_stddev_backward: a channels-last sample of ", c * h * w,
              " features is too large for the CUDA kernels (at most 2^32 - 1); pass it contiguous");
  const int64_t g = effective_group_size(n, group_size), m = n / g;
  Tensor gs = at::empty({m}, x.options().dtype(acc_type(x)));
  C10_CUDA_CHECK(k::minibatch_stddev_backward(dtype_of("minibatch_stddev_backward", x), grad.const_data_ptr(),
                                              x.const_data_ptr(), gs.mutable_data_ptr(), dx.mutable_data_ptr(), g, m,
                                              c * h * w, h * w, eps, channels_last, stream()));
  return dx;
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("minibatch_stddev", &progan::minibatch_stddev_cpu);
  m.impl("minibatch_stddev_backward", &progan::minibatch_stddev_backward_cpu);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("minibatch_stddev", &progan::minibatch_stddev_cuda);
  m.impl("minibatch_stddev_backward", &progan::minibatch_stddev_backward_cuda);
}
#endif
