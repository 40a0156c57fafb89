// CPU twins of kernels/cuda/fade_in.cu: G's fade-in and the reals' fade, one pass over memory each.
// Work unit: one low-resolution row (n, c, h), which owns two full-resolution rows, read and written
// exactly once, contiguously.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
int64_t grain(int64_t work_per_unit) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_unit)); }
}  // namespace

template <typename T>
void fade_in_forward(const T* low, const T* high, T* out, int64_t rows, int64_t wl, acc_t<T> alpha) {
  using A = acc_t<T>;
  const int64_t w = 2 * wl;
  at::parallel_for(0, rows, grain(4 * wl), [&](int64_t begin, int64_t end) {
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
void fade_in_backward(const T* grad, T* d_low, T* d_high, int64_t rows, int64_t wl, acc_t<T> alpha) {
  using A = acc_t<T>;
  const int64_t w = 2 * wl;
  const A keep = A(1) - alpha;
  at::parallel_for(0, rows, grain(4 * wl), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g0 = grad + 2 * r * w;
      const T* g1 = g0 + w;
      T* h0 = d_high + 2 * r * w;
      T* h1 = h0 + w;
      for (int64_t j = 0; j < w; ++j) {
        h0[j] = T(A(g0[j]) * alpha);
        h1[j] = T(A(g1[j]) * alpha);
      }
      T* lo = d_low + r * wl;
      for (int64_t j = 0; j < wl; ++j) {
        const A sum = (A(g0[2 * j]) + A(g0[2 * j + 1])) + (A(g1[2 * j]) + A(g1[2 * j + 1]));
        lo[j] = T(sum * keep);
      }
    }
  });
}

template <typename T>
void fade_reals(const T* x, T* out, int64_t rows, int64_t wl, acc_t<T> alpha) {
  using A = acc_t<T>;
  const int64_t w = 2 * wl;
  at::parallel_for(0, rows, grain(4 * wl), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x0 = x + 2 * r * w;
      const T* x1 = x0 + w;
      T* o0 = out + 2 * r * w;
      T* o1 = o0 + w;
      for (int64_t j = 0; j < wl; ++j) {
        const A a = A(x0[2 * j]), b = A(x0[2 * j + 1]), c = A(x1[2 * j]), d = A(x1[2 * j + 1]);
        const A mean = ((a + b) + (c + d)) * A(0.25);
        o0[2 * j] = T(lerp(mean, a, alpha));
        o0[2 * j + 1] = T(lerp(mean, b, alpha));
        o1[2 * j] = T(lerp(mean, c, alpha));
        o1[2 * j + 1] = T(lerp(mean, d, alpha));
      }
    }
  });
}

#define INSTANTIATE(T)                                                                  \
  template void fade_in_forward<T>(const T*, const T*, T*, int64_t, int64_t, acc_t<T>); \
  template void fade_in_backward<T>(const T*, T*, T*, int64_t, int64_t, acc_t<T>);      \
  template void fade_reals<T>(const T*, T*, int64_t, int64_t, acc_t<T>);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
