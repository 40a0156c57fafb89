// blend's dispatcher glue (D's same-resolution fade-in blend): argument checks, output allocation,
// and the call of its C++ CPU twin (kernels/cpu/blend.cpp) or, in CUDA builds, of its CUDA
// launcher (kernels/cuda/blend.cu) on the current stream.
//
// Layouts (progan/layout.h): elementwise, so one flat loop serves any layout the operands share.
// `old` (or `grad` for the backward) decides, dense NCHW or dense NHWC as it is (anything else is
// copied to NCHW); `new` is brought to that layout (a copy only if it differs) and the outputs are
// allocated in it.
//
// Schemas: kernels/bindings/library.cpp. Autograd and fake tensors: progan_fast/ops/blend.py.
#include <tuple>

#include "glue.h"

namespace progan {
namespace {

using at::Tensor;
using glue::read_alpha;

// A new tensor of `like`'s sizes, dtype and device, in the given layout.
Tensor empty_in(const Tensor& like, bool channels_last) {
  return at::empty(like.sizes(), like.options(), glue::memory_format(channels_last));
}

Tensor blend_cpu(const Tensor& old_, const Tensor& new_, const Tensor& alpha) {
  glue::check_float("blend", "new", new_);
  glue::check_like("blend", "old", old_, new_);
  TORCH_CHECK(old_.sizes() == new_.sizes(), "progan_fast_native::blend: old ", old_.sizes(), " and new ",
              new_.sizes(), " differ in shape");
  glue::check_alpha("blend", alpha, new_);
  const glue::Dense dense = glue::dense_layout(old_);
  const Tensor& a = dense.t;
  const Tensor b = glue::to_layout(new_, dense.channels_last);
  Tensor out = empty_in(a, dense.channels_last);
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
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  Tensor d_old = empty_in(grad, dense.channels_last);
  Tensor d_new = empty_in(grad, dense.channels_last);
  if (grad.numel() == 0) return {d_old, d_new};
  PROGAN_DISPATCH("blend_backward", grad, [&] {
    cpu::blend_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), d_old.mutable_data_ptr<scalar_t>(),
                                  d_new.mutable_data_ptr<scalar_t>(), grad.numel(),
                                  progan::acc_t<scalar_t>(read_alpha(alpha)));
  });
  return {d_old, d_new};
}

#ifdef PROGAN_WITH_CUDA
namespace k = progan::cuda;
using glue::alpha_for;
using glue::dtype_of;
using glue::stream;

Tensor blend_cuda(const Tensor& old_, const Tensor& new_, const Tensor& alpha_) {
  glue::check_float("blend", "new", new_);
  glue::check_like("blend", "old", old_, new_);
  TORCH_CHECK(old_.sizes() == new_.sizes(), "progan_fast_native::blend: old and new differ in shape");
  const c10::cuda::CUDAGuard guard(new_.device());
  const Tensor alpha = alpha_for("blend", alpha_, new_);
  const glue::Dense dense = glue::dense_layout(old_);
  const Tensor& a = dense.t;
  const Tensor b = glue::to_layout(new_, dense.channels_last);
  Tensor out = empty_in(a, dense.channels_last);
  if (out.numel()) C10_CUDA_CHECK(k::blend_forward(dtype_of("blend", b), a.const_data_ptr(), b.const_data_ptr(),
                                                   alpha.const_data_ptr(), out.mutable_data_ptr(), b.numel(),
                                                   stream()));
  return out;
}

std::tuple<Tensor, Tensor> blend_backward_cuda(const Tensor& grad_, const Tensor& alpha_) {
  glue::check_float("blend_backward", "grad", grad_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor alpha = alpha_for("blend_backward", alpha_, grad_);
  const glue::Dense dense = glue::dense_layout(grad_);
  const Tensor& grad = dense.t;
  Tensor d_old = empty_in(grad, dense.channels_last);
  Tensor d_new = empty_in(grad, dense.channels_last);
  if (grad.numel()) C10_CUDA_CHECK(k::blend_backward(dtype_of("blend_backward", grad), grad.const_data_ptr(),
                                                     alpha.const_data_ptr(), d_old.mutable_data_ptr(),
                                                     d_new.mutable_data_ptr(), grad.numel(), stream()));
  return {d_old, d_new};
}
#endif  // PROGAN_WITH_CUDA

}  // namespace
}  // namespace progan

TORCH_LIBRARY_IMPL(progan_fast_native, CPU, m) {
  m.impl("blend", &progan::blend_cpu);
  m.impl("blend_backward", &progan::blend_backward_cpu);
}

#ifdef PROGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(progan_fast_native, CUDA, m) {
  m.impl("blend", &progan::blend_cuda);
  m.impl("blend_backward", &progan::blend_backward_cuda);
}
#endif
