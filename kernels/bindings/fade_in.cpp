// fade_in's dispatcher glue, for fade_in (G's upsample-blend) and fade_reals (the reals' fade):
// argument checks, output allocation, and the call of the C++ CPU twins (kernels/cpu/fade_in.cpp)
// or, in CUDA builds, of the CUDA launchers (kernels/cuda/fade_in.cu) on the current stream.
//
// Layouts (progan/layout.h): `low` (fade_in), `x` (fade_reals) or `grad` (fade_in_backward) decides,
// dense NCHW or dense NHWC as it is (anything else is copied to NCHW); `high` is brought to that
// layout (a copy only if it differs) and every output is allocated in it.
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/fade_in.py.
#include <tuple>

#include "glue.h"

namespace progan {
namespace {

using at::Tensor;
using glue::read_alpha;

void check_fade_in(const Tensor& low, const Tensor& high) {
  glue::check_float("fade_in", "high", high);
  glue::check_like("fade_in", "low", low, high);
  glue::check_dim("fade_in", "low", low, 4);
  TORCH_CHECK(high.dim() == 4 && high.size(0) == low.size(0) && high.size(1) == low.size(1) &&
                  high.size(2) == 2 * low.size(2) && high.size(3) == 2 * low.size(3),
              "progan_fast_native::fade_in: high ", high.sizes(), " is not twice low ", low.sizes());
}

// A new tensor of `sizes` in `like`'s dtype and device, in the given layout.
Tensor empty_in(at::IntArrayRef sizes, const Tensor& like, bool channels_last) {
  return at::empty(sizes, like.options(), glue::memory_format(channels_last));
}

void check_even_4d(const char* op, const Tensor& x) {
  glue::check_dim(op, "x", x, 4);
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "progan_fast_native::", op,
              ": needs even height and width, got shape ", x.sizes());
}

Tensor fade_in_cpu(const Tensor& low_, const Tensor& high_, const Tensor& alpha) {
  check_fade_in(low_, high_);
  glue::check_alpha("fade_in", alpha, high_);
  const glue::Dense dense = glue::dense_layout(low_);
  const Tensor& low = dense.t;
  const bool cl = dense.channels_last;
  const Tensor high = glue::to_layout(high_, cl);
  Tensor out = empty_in(high.sizes(), high, cl);
  if (out.numel() == 0) return out;
  PROGAN_DISPATCH("fade_in", high, [&] {
    cpu::fade_in_forward<scalar_t>(low.const_data_ptr<scalar_t>(), high.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), low.size(0), low.size(1), low.size(2),
                                   low.size(3), cl, progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return out;
}

std::tuple<Tensor, Tensor> fade_in_backward_cpu(const Tensor& grad_, const Tensor& alpha) {
  glue::check_float("fade_in_backward", "grad", grad_);
  check_even_4d("fade_in_backward", grad_);
  glue::check_alpha("fade_in_backward", alpha, grad_);
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  const bool cl = dense.channels_last;
  const auto n = grad.size(0), c = grad.size(1), hl = grad.size(2) / 2, wl = grad.size(3) / 2;
  Tensor d_low = empty_in({n, c, hl, wl}, grad, cl);
  Tensor d_high = empty_in(grad.sizes(), grad, cl);
  if (d_low.numel() == 0) return {d_low, d_high};
  PROGAN_DISPATCH("fade_in_backward", grad, [&] {
    cpu::fade_in_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), d_low.mutable_data_ptr<scalar_t>(),
                                    d_high.mutable_data_ptr<scalar_t>(), n, c, hl, wl, cl,
                                    progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return {d_low, d_high};
}

Tensor fade_reals_cpu(const Tensor& x_, const Tensor& alpha) {
  glue::check_float("fade_reals", "x", x_);
  check_even_4d("fade_reals", x_);
  glue::check_alpha("fade_reals", alpha, x_);
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool cl = dense.channels_last;
  Tensor out = empty_in(x.sizes(), x, cl);
  if (out.numel() == 0) return out;
  PROGAN_DISPATCH("fade_reals", x, [&] {
    cpu::fade_reals<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1),
                              x.size(2) / 2, x.size(3) / 2, cl, progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return out;
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::alpha_for;
using glue::dtype_of;
using glue::stream;

Tensor fade_in_cuda(const Tensor& low_, const Tensor& high_, const Tensor& alpha_) {
  check_fade_in(low_, high_);
  const c10::cuda::CUDAGuard guard(high_.device());
  const Tensor alpha = alpha_for("fade_in", alpha_, high_);
  const glue::Dense dense = glue::dense_layout(low_);
  const Tensor& low = dense.t;
  const bool cl = dense.channels_last;
  const Tensor high = glue::to_layout(high_, cl);
  Tensor out = empty_in(high.sizes(), high, cl);
  if (out.numel()) C10_CUDA_CHECK(k::fade_in_forward(dtype_of("fade_in", high), low.const_data_ptr(),
                                                     high.const_data_ptr(), alpha.const_data_ptr(),
                                                     out.mutable_data_ptr(), low.size(0), low.size(1), low.size(2),
                                                     low.size(3), cl, stream()));
  return out;
}

std::tuple<Tensor, Tensor> fade_in_backward_cuda(const Tensor& grad_, const Tensor& alpha_) {
  glue::check_float("fade_in_backward", "grad", grad_);
  check_even_4d("fade_in_backward", grad_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor alpha = alpha_for("fade_in_backward", alpha_, grad_);
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  const bool cl = dense.channels_last;
  const auto n = grad.size(0), c = grad.size(1), hl = grad.size(2) / 2, wl = grad.size(3) / 2;
  Tensor d_low = empty_in({n, c, hl, wl}, grad, cl);
  Tensor d_high = empty_in(grad.sizes(), grad, cl);
  if (d_low.numel()) C10_CUDA_CHECK(k::fade_in_backward(dtype_of("fade_in_backward", grad), grad.const_data_ptr(),
                                                        alpha.const_data_ptr(), d_low.mutable_data_ptr(),
                                                        d_high.mutable_data_ptr(), n, c, hl, wl, cl, stream()));
  return {d_low, d_high};
}

Tensor fade_reals_cuda(const Tensor& x_, const Tensor& alpha_) {
  glue::check_float("fade_reals", "x", x_);
  check_even_4d("fade_reals", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor alpha = alpha_for("fade_reals", alpha_, x_);
  const glue::Dense dense = glue::dense_layout(x_);
  const Tensor& x = dense.t;
  const bool cl = dense.channels_last;
  Tensor out = empty_in(x.sizes(), x, cl);
  if (out.numel()) C10_CUDA_CHECK(k::fade_reals(dtype_of("fade_reals", x), x.const_data_ptr(), alpha.const_data_ptr(),
                                                out.mutable_data_ptr(), x.size(0), x.size(1), x.size(2) / 2,
                                                x.size(3) / 2, cl, stream()));
  return out;
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("fade_in", &progan::fade_in_cpu);
  m.impl("fade_in_backward", &progan::fade_in_backward_cpu);
  m.impl("fade_reals", &progan::fade_reals_cpu);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("fade_in", &progan::fade_in_cuda);
  m.impl("fade_in_backward", &progan::fade_in_backward_cuda);
  m.impl("fade_reals", &progan::fade_reals_cuda);
}
#endif
