// The per-element math of every native kernel, shared by the CUDA kernels (kernels/cuda/*.cu) and
// their C++ CPU twins (kernels/cpu/*.cpp), so both compute the same formulas in the same order.
//
// Everything here works on the accumulation type A (float, or double for float64 tensors): callers
// convert from the storage type (fp32/bf16/fp16/fp64) on load and back on store. No torch headers:
// nvcc alone compiles this.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PROGAN_HD __host__ __device__ __forceinline__
#else
#define PROGAN_HD inline
#endif

namespace progan {

// The accumulation type of a storage type: float for fp32/bf16/fp16, double for float64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// ProGAN's leaky-ReLU slope and the eps of pixel norm and minibatch stddev (official code).
constexpr double kNegativeSlope = 0.2;
constexpr double kPixelNormEps = 1e-8;

// Fused multiply-add a * b + c with one rounding, on the host and on the device.
PROGAN_HD float fma_(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
PROGAN_HD double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

PROGAN_HD float rsqrt_(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}
PROGAN_HD double rsqrt_(double v) {
#if defined(__CUDA_ARCH__)
  return rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

PROGAN_HD float sqrt_(float v) { return std::sqrt(v); }
PROGAN_HD double sqrt_(double v) { return std::sqrt(v); }

// leaky-ReLU(0.2). Its derivative is read off the *output*: y > 0 exactly where the input is > 0
// (the slope is positive, and pixel norm's scale r is positive too), so backward kernels need only
// the saved output, never the pre-activation.
template <typename A>
PROGAN_HD A lrelu(A v) {
  return v > A(0) ? v : v * A(kNegativeSlope);
}
template <typename A>
PROGAN_HD A lrelu_grad(A grad, A y) {
  return y > A(0) ? grad : grad * A(kNegativeSlope);
}

// torch.lerp's formula with its fused multiply-adds: a + w (b - a) for |w| < 0.5, else
// b - (b - a)(1 - w). Exact at both ends (w == 0 gives a, w == 1 gives b), which the plain
// formula is not; matches ATen's vectorized CPU lerp bit for bit in float32.
template <typename A>
PROGAN_HD A lerp(A a, A b, A w) {
  const A d = b - a;
  return (w < A(0.5) && w > A(-0.5)) ? fma_(d, w, a) : fma_(-d, A(1) - w, b);
}

// Pixel norm: r = 1 / sqrt(mean_c(a^2) + eps) from the sum of squares over C channels.
template <typename A>
PROGAN_HD A pixel_norm_scale(A sum_sq, long long channels, A eps) {
  return rsqrt_(sum_sq / A(channels) + eps);
}

// Pixel norm's backward per element: with y = a * r and s = mean_c(dy * y),
// da = r * (dy - y * s). (Equivalently r * dy - a * r^3 * mean_c(dy * a).)
template <typename A>
PROGAN_HD A pixel_norm_grad(A dy, A y, A r, A mean_dy_y) {
  return r * (dy - y * mean_dy_y);
}

// Minibatch stddev: the standard deviation of one feature over a group of G samples.
template <typename A>
PROGAN_HD A group_stddev(A sum_sq_dev, int group, A eps) {
  return sqrt_(sum_sq_dev / A(group) + eps);
}

// Minibatch stddev backward: d x[i, f] from the group value's gradient gs, for a feature with group
// mean `mean` and stddev `sd`: gs * (x - mean) / (G * F * sd).
template <typename A>
PROGAN_HD A group_stddev_grad(A gs, A x, A mean, A sd, int group, long long features) {
  return gs * (x - mean) / (A(group) * A(features) * sd);
}

}  // namespace progan
