// CPU twins of kernels/cuda/fade_in.cu: G's fade-in and the reals' fade, one pass over memory each.
// Work unit: one low-resolution row, which owns two full-resolution rows, read and written exactly
// once, contiguously. Layouts (progan/layout.h): every tensor dense NCHW, or every one dense NHWC.
// - NCHW: a row is (n, c, h); the inner loops run along the row's pixels.
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
void fade_in_forward(const T* low, const T* high, T* out, int64_t n, int64_t c, int64_t hl, int64_t wl,
                     bool channels_last, acc_t<T> alpha) {
  using A = acc_t<T>;
  const int64_t w = 2 * wl;
  if (channels_last) {
    const int64_t row_low = wl * c, row = w * c;
    at::parallel_for(0, n * hl, grain(4 * row_low), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t dy = 0; dy < 2; ++dy) {
          const T* hi = high + (2 * r + dy) * row;
          T* o = out + (2 * r + dy) * row;
          for (int64_t j = 0; j < w; ++j) {
            const T* lo = low + r * row_low + (j >> 1) * c;
            const T* h = hi + j * c;
            T* oj = o + j * c;
            for (int64_t k = 0; k < c; ++k) oj[k] = T(lerp(A(lo[k]), A(h[k]), alpha));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, n * c * hl, grain(4 * wl), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* lo = low + r * wl;
      for (int64_t dy = 0; dy < 2; ++dy) {
        const T* hi = high + (2 * r + dy) * w;
        T* o = out + (2 * r + dy) * w;
        for (int64_t j = 0; j < w; ++j) o[j] = T(lerp(A(lo[j >> 1]), A(hi[j]), alpha));
      }
    }
  });
}

template <typename T>
void fade_in_backward(const T* grad, T* d_low, T* d_high, int64_t n, int64_t c, int64_t hl, int64_t wl,
                      bool channels_last, acc_t<T> alpha) {
  using A = acc_t<T>;
  const A keep = A(1) - alpha;
  // One low row's two full rows: `row` elements each; `cs` apart: horizontally adjacent pixels.
  const int64_t cs = channels_last ? c : 1, rows = channels_last ? n * hl : n * c * hl;
  const int64_t row = 2 * wl * cs, row_low = wl * cs;
  at::parallel_for(0, rows, grain(4 * row_low), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g0 = grad + 2 * r * row;
      const T* g1 = g0 + row;
      T* h0 = d_high + 2 * r * row;
      T* h1 = h0 + row;
      for (int64_t j = 0; j < row; ++j) {
        h0[j] = T(A(g0[j]) * alpha);
        h1[j] = T(A(g1[j]) * alpha);
      }
      T* lo = d_low + r * row_low;
      if (!channels_last) {
        for (int64_t j = 0; j < wl; ++j) {
          const A sum = (A(g0[2 * j]) + A(g0[2 * j + 1])) + (A(g1[2 * j]) + A(g1[2 * j + 1]));
          lo[j] = T(sum * keep);
        }
        continue;
      }
      for (int64_t j = 0; j < wl; ++j) {
        const T *a = g0 + 2 * j * c, *b = a + c, *p = g1 + 2 * j * c, *q = p + c;
        T* l = lo + j * c;
        for (int64_t k = 0; k < c; ++k) l[k] = T(((A(a[k]) + A(b[k])) + (A(p[k]) + A(q[k]))) * keep);
      }
    }
  });
}

template <typename T>
void fade_reals(const T* x, T* out, int64_t n, int64_t c, int64_t hl, int64_t wl, bool channels_last,
                acc_t<T> alpha) {
  using A = acc_t<T>;
  const int64_t w = 2 * wl;
  if (channels_last) {
    const int64_t row = w * c;
    at::parallel_for(0, n * hl, grain(4 * wl * c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* x0 = x + 2 * r * row;
        const T* x1 = x0 + row;
        T* o0 = out + 2 * r * row;
        T* o1 = o0 + row;
        for (int64_t j = 0; j < wl; ++j) {
          const int64_t e = 2 * j * c, f = e + c;  // the block's left and right pixels
          for (int64_t k = 0; k < c; ++k) {
            const A a = A(x0[e + k]), b = A(x0[f + k]), p = A(x1[e + k]), q = A(x1[f + k]);
            const A mean = ((a + b) + (p + q)) * A(0.25);
            o0[e + k] = T(lerp(mean, a, alpha));
            o0[f + k] = T(lerp(mean, b, alpha));
            o1[e + k] = T(lerp(mean, p, alpha));
            o1[f + k] = T(lerp(mean, q, alpha));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, n * c * hl, grain(4 * wl), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x0 = x + 2 * r * w;
      const T* x1 = x0 + w;
      T* o0 = out + 2 * r * w;
      T* o1 = o0 + w;
      for (int64_t j = 0; j < wl; ++j) {
        const A a = A(x0[2 * j]), b = A(x0[2 * j + 1]), p = A(x1[2 * j]), q = A(x1[2 * j + 1]);
        const A mean = ((a + b) + (p + q)) * A(0.25);
        o0[2 * j] = T(lerp(mean, a, alpha));
        o0[2 * j + 1] = T(lerp(mean, b, alpha));
        o1[2 * j] = T(lerp(mean, p, alpha));
        o1[2 * j + 1] = T(lerp(mean, q, alpha));
      }
    }
  });
}

#define INSTANTIATE(T)                                                                                         \
  template void fade_in_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, bool, acc_t<T>); \
  template void fade_in_backward<T>(const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, bool, acc_t<T>);      \
  template void fade_reals<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, bool, acc_t<T>);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
