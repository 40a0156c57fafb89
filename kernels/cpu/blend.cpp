// CPU twin of kernels/cuda/blend.cu: D's fade-in blend, lerp(old, new, alpha) elementwise, and its
// backward, one pass over memory each. A flat loop over memory order: any layout (NCHW or NHWC) the
// glue has given all three tensors.
#include <ATen/Parallel.h>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {

template <typename T>
void blend_forward(const T* old_, const T* new_, T* out, int64_t numel, acc_t<T> alpha) {
  using A = acc_t<T>;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = T(lerp(A(old_[i]), A(new_[i]), alpha));
  });
}

template <typename T>
void blend_backward(const T* grad, T* d_old, T* d_new, int64_t numel, acc_t<T> alpha) {
  using A = acc_t<T>;
  const A keep = A(1) - alpha;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A g = A(grad[i]);
      d_old[i] = T(g * keep);
      d_new[i] = T(g * alpha);
    }
  });
}

#define INSTANTIATE(T)                                                       \
  template void blend_forward<T>(const T*, const T*, T*, int64_t, acc_t<T>); \
  template void blend_backward<T>(const T*, T*, T*, int64_t, acc_t<T>);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
