// pixel_norm forward and backward, in both activation layouts (progan/layout.h).
//
// NCHW (and NHWC with fewer than 32 channels): one thread per pixel (n, p), addressed through the
// [N, C, P] strides. In NCHW consecutive threads take consecutive pixels, so every channel's load is
// coalesced; each thread walks its pixel's channels twice (the second walk hits L1/L2),
// accumulating in float (double for double).
//
// NHWC with 32 channels or more: one warp per pixel. A pixel's channels are contiguous, so the
// lanes read consecutive channels (coalesced), reduce with warp shuffles, and scale the same
// channels; no thread walks memory with its neighbours C elements away.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// NHWC takes the warp-per-pixel kernels from this many channels on (a full warp of lanes).
constexpr int64_t kWarpMinChannels = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  int64_t n, int64_t c, int64_t p, NCPStrides s,
                                                                  acc_t<T> eps) {
  using A = acc_t<T>;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n * p; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (q / p) * s.n + (q % p) * s.p;
    A sum = A(0);
    for (int64_t ch = 0; ch < c; ++ch) {
      const A v = to_acc(x[base + ch * s.c]);
      sum += v * v;
    }
    const A r = pixel_norm_scale(sum, c, eps);
    for (int64_t ch = 0; ch < c; ++ch) y[base + ch * s.c] = from_acc<T>(to_acc(x[base + ch * s.c]) * r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  T* __restrict__ dx, int64_t n, int64_t c, int64_t p,
                                                                  NCPStrides s, acc_t<T> eps) {
  using A = acc_t<T>;
  const A inv_c = A(1) / A(c);  // once per thread: a double division is a call (and a spill) per use
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n * p; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (q / p) * s.n + (q % p) * s.p;
    A sum_xx = A(0), sum_dyx = A(0);
    for (int64_t ch = 0; ch < c; ++ch) {
      const A v = to_acc(x[base + ch * s.c]);
      sum_xx += v * v;
      sum_dyx += to_acc(dy[base + ch * s.c]) * v;
    }
    const A r = rsqrt_(sum_xx * inv_c + eps);
    const A mean_dy_y = r * sum_dyx * inv_c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = base + ch * s.c;
      dx[i] = from_acc<T>(pixel_norm_grad(to_acc(dy[i]), to_acc(x[i]) * r, r, mean_dy_y));
    }
  }
}

// NHWC, one warp per pixel: pixel q's channels are [q * c, q * c + c). The loop over pixels is
// uniform across a warp (q depends on the warp only), so every lane reaches every shuffle.
template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_fwd_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                       int64_t pixels, int64_t c, acc_t<T> eps) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  for (int64_t q = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5); q < pixels; q += int64_t(gridDim.x) * kWarps) {
    const T* xs = x + q * c;
    A sum = A(0);
    for (int64_t ch = lane; ch < c; ch += 32) {
      const A v = to_acc(xs[ch]);
      sum += v * v;
    }
    const A r = pixel_norm_scale(warp_sum(sum), c, eps);
    for (int64_t ch = lane; ch < c; ch += 32) y[q * c + ch] = from_acc<T>(to_acc(xs[ch]) * r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_bwd_nhwc_kernel(const T* __restrict__ dy,
                                                                       const T* __restrict__ x, T* __restrict__ dx,
                                                                       int64_t pixels, int64_t c, acc_t<T> eps) {
  using A = acc_t<T>;
  const A inv_c = A(1) / A(c);
  const int lane = threadIdx.x & 31;
  for (int64_t q = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5); q < pixels; q += int64_t(gridDim.x) * kWarps) {
    const int64_t base = q * c;
    A sum_xx = A(0), sum_dyx = A(0);
    for (int64_t ch = lane; ch < c; ch += 32) {
      const A v = to_acc(x[base + ch]);
      sum_xx += v * v;
      sum_dyx += to_acc(dy[base + ch]) * v;
    }
    const A r = rsqrt_(warp_sum(sum_xx) * inv_c + eps);
    const A mean_dy_y = r * warp_sum(sum_dyx) * inv_c;
    for (int64_t ch = lane; ch < c; ch += 32) {
      const int64_t i = base + ch;
      dx[i] = from_acc<T>(pixel_norm_grad(to_acc(dy[i]), to_acc(x[i]) * r, r, mean_dy_y));
    }
  }
}
}  // namespace

cudaError_t pixel_norm_forward(DType dt, const void* x, void* y, int64_t n, int64_t c, int64_t p, double eps,
                               bool channels_last, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* in = static_cast<const scalar_t*>(x);
    auto* out = static_cast<scalar_t*>(y);
    if (channels_last && c >= kWarpMinChannels) {
      pixel_norm_fwd_nhwc_kernel<scalar_t><<<grid_for(n * p, kWarps), kThreads, 0, stream>>>(
          in, out, n * p, c, acc_t<scalar_t>(eps));
    } else {
      pixel_norm_fwd_kernel<scalar_t><<<grid_for(n * p, kThreads), kThreads, 0, stream>>>(
          in, out, n, c, p, ncp_strides(c, p, channels_last), acc_t<scalar_t>(eps));
    }
  });
}

cudaError_t pixel_norm_backward(DType dt, const void* dy, const void* x, void* dx, int64_t n, int64_t c, int64_t p,
                                double eps, bool channels_last, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* g = static_cast<const scalar_t*>(dy);
    const auto* in = static_cast<const scalar_t*>(x);
    auto* out = static_cast<scalar_t*>(dx);
    if (channels_last && c >= kWarpMinChannels) {
      pixel_norm_bwd_nhwc_kernel<scalar_t><<<grid_for(n * p, kWarps), kThreads, 0, stream>>>(
          g, in, out, n * p, c, acc_t<scalar_t>(eps));
    } else {
      pixel_norm_bwd_kernel<scalar_t><<<grid_for(n * p, kThreads), kThreads, 0, stream>>>(
          g, in, out, n, c, p, ncp_strides(c, p, channels_last), acc_t<scalar_t>(eps));
    }
  });
}

}  // namespace progan::cuda
