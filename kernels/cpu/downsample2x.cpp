// CPU twin of kernels/cuda/downsample2x.cu: the 2x2 average pool and its backward. Work unit: one
// output row (forward; it reads two input rows) or one input row (backward). Layouts
// (progan/layout.h): input and output both dense NCHW, or both dense NHWC.
// - NCHW: a row is (n, c, h); the inner loops run along its pixels.
// - NHWC: a row is (n, h) with all its channels; the inner loops run over a pixel's C contiguous
//   channels, so no access walks with stride C.
// Both add the same terms in the same order, so the two layouts give the same values bit for bit.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
int64_t grain(int64_t work_per_unit) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_unit)); }
}  // namespace

template <typename T>
void downsample2x_forward(const T* x, T* y, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last) {
  using A = acc_t<T>;
  const int64_t ho = h / 2, wo = w / 2;
  if (channels_last) {
    at::parallel_for(0, n * ho, grain(4 * wo * c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / ho, row = r % ho;
        const T* x0 = x + (plane * h + 2 * row) * w * c;
        const T* x1 = x0 + w * c;
        T* o = y + r * wo * c;
        for (int64_t j = 0; j < wo; ++j) {
          const int64_t e = 2 * j * c, f = e + c;  // the block's left and right pixels
          T* oj = o + j * c;
          for (int64_t k = 0; k < c; ++k) {
            oj[k] = T(((A(x0[e + k]) + A(x0[f + k])) + (A(x1[e + k]) + A(x1[f + k]))) * A(0.25));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, n * c * ho, grain(4 * wo), [&](int64_t begin, int64_t end) {
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
void downsample2x_backward(const T* grad, T* dx, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last) {
  using A = acc_t<T>;
  const int64_t ho = h / 2, wo = w / 2;
  // A row of dx holds `row` elements; a pixel's channels are `cs` apart from the next pixel's.
  const int64_t cs = channels_last ? c : 1, rows = channels_last ? n * h : n * c * h;
  const int64_t row = w * cs;
  at::parallel_for(0, rows, grain(row), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / h, hr = r % h;
      T* o = dx + r * row;
      if (hr >= 2 * ho) {  // an odd last row was not pooled
        for (int64_t j = 0; j < row; ++j) o[j] = T(0);
        continue;
      }
      const T* g = grad + (plane * ho + hr / 2) * wo * cs;
      if (channels_last) {
        for (int64_t j = 0; j < 2 * wo; ++j) {
          const T* gj = g + (j >> 1) * c;
          T* oj = o + j * c;
          for (int64_t k = 0; k < c; ++k) oj[k] = T(A(gj[k]) * A(0.25));
        }
      } else {
        for (int64_t j = 0; j < 2 * wo; ++j) o[j] = T(A(g[j >> 1]) * A(0.25));
      }
      for (int64_t j = 2 * wo * cs; j < row; ++j) o[j] = T(0);  // an odd last column was not pooled
    }
  });
}

#define INSTANTIATE(T)                                                                                 \
  template void downsample2x_forward<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, bool);  \
  template void downsample2x_backward<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, bool);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
