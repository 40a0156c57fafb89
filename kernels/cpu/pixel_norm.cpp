// CPU twin of kernels/cuda/pixel_norm.cu, for both activation layouts (progan/layout.h).
//
// NCHW: work unit = one sample's tile of kTile pixels. The tile walks the channels twice (sum of
// squares, then scale); its kTile * C values stay in L1/L2 between the passes, and every inner
// loop runs over contiguous pixels with a float accumulator per pixel, which the compiler
// vectorizes.
//
// NHWC (channels_last): a pixel's C channels are contiguous, so the same tile is one contiguous
// run of kTile * C values and every inner loop runs over a pixel's contiguous channels: the sums
// over channels keep kLanes partial sums (channel ch goes to lane ch % kLanes), added in a fixed
// order at the end, which the compiler vectorizes without reassociating anything; the scaling
// pass is a plain contiguous multiply.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
constexpr int64_t kTile = 64;
constexpr int64_t kLanes = 8;

int64_t grain(int64_t work_per_tile) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_tile)); }

// sum_ch a[ch] * b[ch] over c contiguous channels, in kLanes interleaved partial sums.
template <typename T, typename A>
A dot_channels(const T* a, const T* b, int64_t c) {
  A lane[kLanes] = {};
  int64_t ch = 0;
  for (; ch + kLanes <= c; ch += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lane[k] += A(a[ch + k]) * A(b[ch + k]);
  }
  for (int64_t k = 0; ch < c; ++ch, ++k) lane[k] += A(a[ch]) * A(b[ch]);
  A sum = A(0);
  for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
  return sum;
}

template <typename T>
void forward_nchw(const T* x, T* y, int64_t n, int64_t c, int64_t p, double eps) {
  using A = acc_t<T>;
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(c * kTile), [&](int64_t begin, int64_t end) {
    A sum[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      const T* xs = x + s * c * p + p0;
      T* ys = y + s * c * p + p0;
      for (int64_t j = 0; j < len; ++j) sum[j] = A(0);
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* row = xs + ch * p;
        for (int64_t j = 0; j < len; ++j) {
          const A v = A(row[j]);
          sum[j] += v * v;
        }
      }
      for (int64_t j = 0; j < len; ++j) sum[j] = pixel_norm_scale(sum[j], c, A(eps));
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* row = xs + ch * p;
        T* out = ys + ch * p;
        for (int64_t j = 0; j < len; ++j) out[j] = T(A(row[j]) * sum[j]);
      }
    }
  });
}

template <typename T>
void forward_nhwc(const T* x, T* y, int64_t n, int64_t c, int64_t p, double eps) {
  using A = acc_t<T>;
  const int64_t pixels = n * p;  // NHWC: pixel q's channels are x[q * c, q * c + c)
  at::parallel_for(0, (pixels + kTile - 1) / kTile, grain(c * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin * kTile; q < std::min(pixels, end * kTile); ++q) {
      const T* xs = x + q * c;
      T* ys = y + q * c;
      const A r = pixel_norm_scale(dot_channels<T, A>(xs, xs, c), c, A(eps));
      for (int64_t ch = 0; ch < c; ++ch) ys[ch] = T(A(xs[ch]) * r);
    }
  });
}

template <typename T>
void backward_nchw(const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t p, double eps) {
  using A = acc_t<T>;
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(2 * c * kTile), [&](int64_t begin, int64_t end) {
    A sum_xx[kTile], sum_dyx[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      const int64_t base = s * c * p + p0;
      for (int64_t j = 0; j < len; ++j) sum_xx[j] = sum_dyx[j] = A(0);
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* xr = x + base + ch * p;
        const T* gr = dy + base + ch * p;
        for (int64_t j = 0; j < len; ++j) {
          const A v = A(xr[j]);
          sum_xx[j] += v * v;
          sum_dyx[j] += A(gr[j]) * v;
        }
      }
      // With y = x r: mean_c(dy * y) = r * sum(dy * x) / C; dx = r * (dy - y * that).
      for (int64_t j = 0; j < len; ++j) {
        const A r = pixel_norm_scale(sum_xx[j], c, A(eps));
        sum_xx[j] = r;
        sum_dyx[j] = r * sum_dyx[j] / A(c);
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* xr = x + base + ch * p;
        const T* gr = dy + base + ch * p;
        T* out = dx + base + ch * p;
        for (int64_t j = 0; j < len; ++j) {
          const A r = sum_xx[j];
          out[j] = T(pixel_norm_grad(A(gr[j]), A(xr[j]) * r, r, sum_dyx[j]));
        }
      }
    }
  });
}

template <typename T>
void backward_nhwc(const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t p, double eps) {
  using A = acc_t<T>;
  const int64_t pixels = n * p;
  at::parallel_for(0, (pixels + kTile - 1) / kTile, grain(2 * c * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin * kTile; q < std::min(pixels, end * kTile); ++q) {
      const T* xr = x + q * c;
      const T* gr = dy + q * c;
      T* out = dx + q * c;
      const A r = pixel_norm_scale(dot_channels<T, A>(xr, xr, c), c, A(eps));
      const A mean_dy_y = r * dot_channels<T, A>(gr, xr, c) / A(c);
      for (int64_t ch = 0; ch < c; ++ch) out[ch] = T(pixel_norm_grad(A(gr[ch]), A(xr[ch]) * r, r, mean_dy_y));
    }
  });
}
}  // namespace

template <typename T>
void pixel_norm_forward(const T* x, T* y, int64_t n, int64_t c, int64_t p, double eps, bool channels_last) {
  (channels_last ? forward_nhwc<T> : forward_nchw<T>)(x, y, n, c, p, eps);
}

template <typename T>
void pixel_norm_backward(const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t p, double eps,
                         bool channels_last) {
  (channels_last ? backward_nhwc<T> : backward_nchw<T>)(dy, x, dx, n, c, p, eps);
}

#define INSTANTIATE(T)                                                                                \
  template void pixel_norm_forward<T>(const T*, T*, int64_t, int64_t, int64_t, double, bool);         \
  template void pixel_norm_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, double, bool);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
