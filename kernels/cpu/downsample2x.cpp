// CPU twin of kernels/cuda/downsample2x.cu: the 2x2 average pool and its backward. Work unit: one
// output row (forward; it reads two input rows) or one input row (backward).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
int64_t grain(int64_t work_per_unit) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_unit)); }
}  // namespace

template <typename T>
void downsample2x_forward(const T* x, T* y, int64_t planes, int64_t h, int64_t w) {
  using A = acc_t<T>;
  const int64_t ho = h / 2, wo = w / 2;
  at::parallel_for(0, planes * ho, grain(4 * wo), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / ho, row = r % ho;
      const T* x0 = x + (plane * h + 2 * row) * w;
      const T* x1 = x0 + w;
      T* o = y + r * wo;
      for (int64_t j = 0; j < wo; ++j) {
        o[j] = T(((A(x0[2 * j]) + A(x0[2 * j + 1])) + (A(x1[2 * j]) + A(x1[2 * j + 1]))) * A(0.25));
      }
    }
  });
}

template <typename T>
void downsample2x_backward(const T* grad, T* dx, int64_t planes, int64_t h, int64_t w) {
  using A = acc_t<T>;
  const int64_t ho = h / 2, wo = w / 2;
  at::parallel_for(0, planes * h, grain(w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / h, row = r % h;
      T* o = dx + r * w;
      if (row >= 2 * ho) {  // an odd last row was not pooled
        for (int64_t j = 0; j < w; ++j) o[j] = T(0);
        continue;
      }
      const T* g = grad + (plane * ho + row / 2) * wo;
      for (int64_t j = 0; j < 2 * wo; ++j) o[j] = T(A(g[j >> 1]) * A(0.25));
      for (int64_t j = 2 * wo; j < w; ++j) o[j] = T(0);
    }
  });
}

#define INSTANTIATE(T)                                                             \
  template void downsample2x_forward<T>(const T*, T*, int64_t, int64_t, int64_t);  \
  template void downsample2x_backward<T>(const T*, T*, int64_t, int64_t, int64_t);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
