// C++ CPU twins of the CUDA kernels, grouped by op: op <op>'s are defined in kernels/cpu/<op>.cpp,
// the twin of kernels/cuda/<op>.cu. The same per-element math (include/progan/math.h) on raw,
// contiguous buffers, parallel over batch/pixels with at::parallel_for. Each is explicitly
// instantiated for float, double, c10::BFloat16 and c10::Half in its .cpp, which keeps the heavy
// ATen headers out of these translation units (they build in seconds).
//
// Layouts are dense NCHW or, where a twin takes `channels_last`, dense NHWC (progan/layout.h), seen
// as [N, C, P] with P = H * W pixels. Reductions run in the accumulation type (float, double for
// double) with a fixed order that does not depend on the number of threads, so results are
// deterministic.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "progan/layout.h"
#include "progan/math.h"

namespace progan::cpu {

// acc_t<T>, the accumulation type, comes from progan/math.h (shared with the CUDA kernels).

// pixel_norm: y = x * rsqrt(mean_c(x^2) + eps); dx = r * (dy - y * mean_c(dy * y)). All buffers
// dense NCHW, or dense NHWC with channels_last (then the sums run over contiguous channels).
template <typename T>
void pixel_norm_forward(const T* x, T* y, int64_t n, int64_t c, int64_t p, double eps, bool channels_last);
template <typename T>
void pixel_norm_backward(const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t p, double eps,
                         bool channels_last);

// conv_act's epilogue on the conv output `conv` ([N, C, P], conv with the unscaled weight):
// y = lrelu(conv * scale + bias[c]) (activation optional), then optionally pixel norm, with
// r[n, p] = pixel norm's per-pixel scale saved for the backward (float32, or double). conv, y (and
// the backward's dy, g) dense NCHW, or dense NHWC with channels_last; r and bias_part are the same
// in both layouts.
template <typename T>
void conv_epilogue_forward(const T* conv, T* y, const T* bias, acc_t<T>* r, int64_t n, int64_t c, int64_t p, double scale,
                           bool activation, bool pixel_norm, bool channels_last);
// Backward of the epilogue up to the pre-activation: g = lrelu'(y) * pixel_norm'(dy) (g may alias
// nothing; it is dy itself when neither option is on, and then only the bias sums are computed).
// bias_part[t, c] receives the sum of g over tile t's pixels, for num_tiles(n, p) tiles.
int64_t conv_epilogue_num_tiles(int64_t n, int64_t p);
template <typename T>
void conv_epilogue_backward(const T* dy, const T* y, const acc_t<T>* r, T* g, acc_t<T>* bias_part, int64_t n,
                            int64_t c, int64_t p, bool activation, bool pixel_norm, bool channels_last);

// fade_in and fade_reals; alpha is passed by value here and below (on the CPU reading the 0-dim
// tensor is free). [n, c, hl, wl] is the low-resolution shape; every tensor is dense NCHW, or
// dense NHWC when channels_last (then the inner loops run over contiguous channels).
template <typename T>
void fade_in_forward(const T* low, const T* high, T* out, int64_t n, int64_t c, int64_t hl, int64_t wl,
                     bool channels_last, acc_t<T> alpha);
template <typename T>
void fade_in_backward(const T* grad, T* d_low, T* d_high, int64_t n, int64_t c, int64_t hl, int64_t wl,
                      bool channels_last, acc_t<T> alpha);
template <typename T>
void fade_reals(const T* x, T* out, int64_t n, int64_t c, int64_t hl, int64_t wl, bool channels_last,
                acc_t<T> alpha);

// blend: out = lerp(old, new, alpha) elementwise; any layout, as long as all three share it.
template <typename T>
void blend_forward(const T* old_, const T* new_, T* out, int64_t numel, acc_t<T> alpha);
template <typename T>
void blend_backward(const T* grad, T* d_old, T* d_new, int64_t numel, acc_t<T> alpha);

// downsample2x: [n, c, h, w] is the input's shape, input and output both dense NCHW, or both dense
// NHWC when channels_last; an odd last row/column of the input is ignored (as avg_pool2d does).
template <typename T>
void downsample2x_forward(const T* x, T* y, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last);
template <typename T>
void downsample2x_backward(const T* grad, T* dx, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last);

// minibatch_stddev with G groups members i = g * M + m (official grouping), F = C * P features. x, dx,
// out and grad all dense NCHW, or all dense NHWC (channels_last: each pixel's C + 1 output values
// contiguous, the stat value last); x is read in memory order, contiguous channels in NHWC.
template <typename T>
void minibatch_stddev_forward(const T* x, T* out, int64_t group, int64_t m, int64_t f, int64_t p, double eps,
                              bool channels_last);
template <typename T>
void minibatch_stddev_backward(const T* grad, const T* x, T* dx, int64_t group, int64_t m, int64_t f, int64_t p,
                               double eps, bool channels_last);

}  // namespace progan::cpu

#define PROGAN_CPU_INSTANTIATE(MACRO) \
  MACRO(float)                        \
  MACRO(double)                       \
  MACRO(c10::BFloat16)                \
  MACRO(c10::Half)
