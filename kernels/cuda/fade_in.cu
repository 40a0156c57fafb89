// G's fade-in (nearest-upsample the low-resolution image 2x, blend it with the high-resolution one)
// and the reals' fade (blend each pixel with the mean of its 2x2 block), each one pass over memory.
// alpha is read in-kernel from a 0-dim device scalar, so CUDA graph replays see its current value.
// Each thread owns one low-resolution element and its 2x2 block of the full-resolution tensor (two
// rows of adjacent pairs): nothing upsampled is ever written.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) fade_in_fwd_kernel(const T* __restrict__ low, const T* __restrict__ high,
                                                               const acc_t<T>* __restrict__ alpha_ptr,
                                                               T* __restrict__ out, int64_t n_low, int64_t wl) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  GRID_STRIDE(i, n_low) {
    const int64_t top = (i / wl) * 2 * w + (i % wl) * 2;
    const A lo = to_acc(low[i]);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      out[top + k] = from_acc<T>(lerp(lo, to_acc(high[top + k]), alpha));
      out[top + w + k] = from_acc<T>(lerp(lo, to_acc(high[top + w + k]), alpha));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fade_in_bwd_kernel(const T* __restrict__ grad,
                                                               const acc_t<T>* __restrict__ alpha_ptr,
                                                               T* __restrict__ d_low, T* __restrict__ d_high,
                                                               int64_t n_low, int64_t wl) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  GRID_STRIDE(i, n_low) {
    const int64_t top = (i / wl) * 2 * w + (i % wl) * 2;
    const A g00 = to_acc(grad[top]), g01 = to_acc(grad[top + 1]);
    const A g10 = to_acc(grad[top + w]), g11 = to_acc(grad[top + w + 1]);
    d_high[top] = from_acc<T>(g00 * alpha);
    d_high[top + 1] = from_acc<T>(g01 * alpha);
    d_high[top + w] = from_acc<T>(g10 * alpha);
    d_high[top + w + 1] = from_acc<T>(g11 * alpha);
    d_low[i] = from_acc<T>(((g00 + g01) + (g10 + g11)) * (A(1) - alpha));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fade_reals_kernel(const T* __restrict__ x,
                                                              const acc_t<T>* __restrict__ alpha_ptr,
                                                              T* __restrict__ out, int64_t n_low, int64_t wl) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  GRID_STRIDE(i, n_low) {
    const int64_t top = (i / wl) * 2 * w + (i % wl) * 2;
    const A a = to_acc(x[top]), b = to_acc(x[top + 1]), c = to_acc(x[top + w]), d = to_acc(x[top + w + 1]);
    const A mean = ((a + b) + (c + d)) * A(0.25);
    out[top] = from_acc<T>(lerp(mean, a, alpha));
    out[top + 1] = from_acc<T>(lerp(mean, b, alpha));
    out[top + w] = from_acc<T>(lerp(mean, c, alpha));
    out[top + w + 1] = from_acc<T>(lerp(mean, d, alpha));
  }
}
}  // namespace

cudaError_t fade_in_forward(DType dt, const void* low, const void* high, const void* alpha, void* out, int64_t rows,
                            int64_t wl, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    fade_in_fwd_kernel<scalar_t><<<grid_for(rows * wl, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(low), static_cast<const scalar_t*>(high),
        static_cast<const acc_t<scalar_t>*>(alpha), static_cast<scalar_t*>(out), rows * wl, wl);
  });
}

cudaError_t fade_in_backward(DType dt, const void* grad, const void* alpha, void* d_low, void* d_high, int64_t rows,
                             int64_t wl, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    fade_in_bwd_kernel<scalar_t><<<grid_for(rows * wl, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<const acc_t<scalar_t>*>(alpha),
        static_cast<scalar_t*>(d_low), static_cast<scalar_t*>(d_high), rows * wl, wl);
  });
}

cudaError_t fade_reals(DType dt, const void* x, const void* alpha, void* out, int64_t rows, int64_t wl,
                       cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    fade_reals_kernel<scalar_t><<<grid_for(rows * wl, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const acc_t<scalar_t>*>(alpha), static_cast<scalar_t*>(out),
        rows * wl, wl);
  });
}

}  // namespace progan::cuda
