// G's fade-in (nearest-upsample the low-resolution image 2x, blend it with the high-resolution one)
// and the reals' fade (blend each pixel with the mean of its 2x2 block), each one pass over memory.
// alpha is read in-kernel from a 0-dim device scalar, so CUDA graph replays see its current value.
// Each thread owns one low-resolution element and its 2x2 block of the full-resolution tensor (two
// rows of adjacent pairs): nothing upsampled is ever written.
//
// Layouts (progan/layout.h): every tensor dense NCHW (CL = 0) or every one dense NHWC (CL = 1).
// Thread i owns low-resolution element i in memory order. In NHWC that is (n, h, w, c): the pixel
// q = i / C and the channel i % C, and the full-resolution offsets are the NCHW formula in pixels
// times C plus the channel, so neighbouring threads touch neighbouring channels (coalesced). The
// NCHW instantiation is the original kernel: no division by C.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

// The offset of the top-left full-resolution element of low-resolution element i's 2x2 block (w =
// the full-resolution width, c = the channel count, used only in NHWC). NHWC takes one 64-bit
// division, as NCHW does (a 64-bit division is a subroutine call, and a second one made the double
// kernel spill): the low-resolution row r, then the column and channel within the row (fewer than
// 2^32 elements: the launchers check) in 32 bits.
template <int CL>
__device__ __forceinline__ int64_t pixel_offset(int64_t i, int64_t wl, int64_t w, int64_t c) {
  if (CL) {
    const int64_t row_len = wl * c;
    const int64_t r = i / row_len;
    const uint32_t in_row = uint32_t(i - r * row_len), cc = uint32_t(c);
    const uint32_t col = in_row / cc;
    return (r * 2 * w + int64_t(col) * 2) * c + int64_t(in_row - col * cc);
  }
  return (i / wl) * 2 * w + (i % wl) * 2;
}

// The NHWC kernels' 32-bit arithmetic within a low-resolution row holds.
bool row_fits_32_bits(int64_t c, int64_t wl) { return c * wl <= int64_t(UINT32_MAX); }

template <typename T, int CL>
__global__ void __launch_bounds__(kThreads) fade_in_fwd_kernel(const T* __restrict__ low, const T* __restrict__ high,
                                                               const acc_t<T>* __restrict__ alpha_ptr,
                                                               T* __restrict__ out, int64_t n_low, int64_t wl,
                                                               int64_t c) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  const int64_t cs = CL ? c : 1, row = w * cs;  // the next pixel, the next row
  GRID_STRIDE(i, n_low) {
    const int64_t top = pixel_offset<CL>(i, wl, w, c);
    const A lo = to_acc(low[i]);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t e = top + k * cs, f = e + row;
      out[e] = from_acc<T>(lerp(lo, to_acc(high[e]), alpha));
      out[f] = from_acc<T>(lerp(lo, to_acc(high[f]), alpha));
    }
  }
}

template <typename T, int CL>
__global__ void __launch_bounds__(kThreads) fade_in_bwd_kernel(const T* __restrict__ grad,
                                                               const acc_t<T>* __restrict__ alpha_ptr,
                                                               T* __restrict__ d_low, T* __restrict__ d_high,
                                                               int64_t n_low, int64_t wl, int64_t c) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  const int64_t cs = CL ? c : 1, row = w * cs;  // the next pixel, the next row
  GRID_STRIDE(i, n_low) {
    const int64_t top = pixel_offset<CL>(i, wl, w, c);
    const A g00 = to_acc(grad[top]), g01 = to_acc(grad[top + cs]);
    const A g10 = to_acc(grad[top + row]), g11 = to_acc(grad[top + row + cs]);
    d_high[top] = from_acc<T>(g00 * alpha);
    d_high[top + cs] = from_acc<T>(g01 * alpha);
    d_high[top + row] = from_acc<T>(g10 * alpha);
    d_high[top + row + cs] = from_acc<T>(g11 * alpha);
    d_low[i] = from_acc<T>(((g00 + g01) + (g10 + g11)) * (A(1) - alpha));
  }
}

template <typename T, int CL>
__global__ void __launch_bounds__(kThreads) fade_reals_kernel(const T* __restrict__ x,
                                                              const acc_t<T>* __restrict__ alpha_ptr,
                                                              T* __restrict__ out, int64_t n_low, int64_t wl,
                                                              int64_t c) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  const int64_t w = 2 * wl;
  const int64_t cs = CL ? c : 1, row = w * cs;  // the next pixel, the next row
  GRID_STRIDE(i, n_low) {
    const int64_t top = pixel_offset<CL>(i, wl, w, c);
    const A a = to_acc(x[top]), b = to_acc(x[top + cs]), p = to_acc(x[top + row]), q = to_acc(x[top + row + cs]);
    const A mean = ((a + b) + (p + q)) * A(0.25);
    out[top] = from_acc<T>(lerp(mean, a, alpha));
    out[top + cs] = from_acc<T>(lerp(mean, b, alpha));
    out[top + row] = from_acc<T>(lerp(mean, p, alpha));
    out[top + row + cs] = from_acc<T>(lerp(mean, q, alpha));
  }
}
}  // namespace

cudaError_t fade_in_forward(DType dt, const void* low, const void* high, const void* alpha, void* out, int64_t n,
                            int64_t c, int64_t hl, int64_t wl, bool channels_last, cudaStream_t stream) {
  const int64_t n_low = n * c * hl * wl;
  if (channels_last && !row_fits_32_bits(c, wl)) return cudaErrorInvalidValue;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* lo = static_cast<const scalar_t*>(low);
    const auto* hi = static_cast<const scalar_t*>(high);
    const auto* al = static_cast<const acc_t<scalar_t>*>(alpha);
    auto* o = static_cast<scalar_t*>(out);
    if (channels_last) {
      fade_in_fwd_kernel<scalar_t, 1><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(lo, hi, al, o, n_low, wl, c);
    } else {
      fade_in_fwd_kernel<scalar_t, 0><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(lo, hi, al, o, n_low, wl, c);
    }
  });
}

cudaError_t fade_in_backward(DType dt, const void* grad, const void* alpha, void* d_low, void* d_high, int64_t n,
                             int64_t c, int64_t hl, int64_t wl, bool channels_last, cudaStream_t stream) {
  const int64_t n_low = n * c * hl * wl;
  if (channels_last && !row_fits_32_bits(c, wl)) return cudaErrorInvalidValue;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* g = static_cast<const scalar_t*>(grad);
    const auto* al = static_cast<const acc_t<scalar_t>*>(alpha);
    auto* dl = static_cast<scalar_t*>(d_low);
    auto* dh = static_cast<scalar_t*>(d_high);
    if (channels_last) {
      fade_in_bwd_kernel<scalar_t, 1><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(g, al, dl, dh, n_low, wl, c);
    } else {
      fade_in_bwd_kernel<scalar_t, 0><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(g, al, dl, dh, n_low, wl, c);
    }
  });
}

cudaError_t fade_reals(DType dt, const void* x, const void* alpha, void* out, int64_t n, int64_t c, int64_t hl,
                       int64_t wl, bool channels_last, cudaStream_t stream) {
  const int64_t n_low = n * c * hl * wl;
  if (channels_last && !row_fits_32_bits(c, wl)) return cudaErrorInvalidValue;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* xs = static_cast<const scalar_t*>(x);
    const auto* al = static_cast<const acc_t<scalar_t>*>(alpha);
    auto* o = static_cast<scalar_t*>(out);
    if (channels_last) {
      fade_reals_kernel<scalar_t, 1><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(xs, al, o, n_low, wl, c);
    } else {
      fade_reals_kernel<scalar_t, 0><<<grid_for(n_low, kThreads), kThreads, 0, stream>>>(xs, al, o, n_low, wl, c);
    }
  });
}

}  // namespace progan::cuda
