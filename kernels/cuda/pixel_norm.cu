// pixel_norm forward and backward: one thread per pixel (n, p); consecutive threads take
// consecutive pixels, so every channel's load is coalesced. Each thread walks its pixel's channels
// twice (the second walk hits L1/L2), accumulating in float (double for double).
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  int64_t n, int64_t c, int64_t p, acc_t<T> eps) {
  using A = acc_t<T>;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n * p; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (q / p) * c * p + q % p;
    A sum = A(0);
    for (int64_t ch = 0; ch < c; ++ch) {
      const A v = to_acc(x[base + ch * p]);
      sum += v * v;
    }
    const A r = pixel_norm_scale(sum, c, eps);
    for (int64_t ch = 0; ch < c; ++ch) y[base + ch * p] = from_acc<T>(to_acc(x[base + ch * p]) * r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  T* __restrict__ dx, int64_t n, int64_t c, int64_t p,
                                                                  acc_t<T> eps) {
  using A = acc_t<T>;
  const A inv_c = A(1) / A(c);  // once per thread: a double division is a call (and a spill) per use
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n * p; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (q / p) * c * p + q % p;
    A sum_xx = A(0), sum_dyx = A(0);
    for (int64_t ch = 0; ch < c; ++ch) {
      const A v = to_acc(x[base + ch * p]);
      sum_xx += v * v;
      sum_dyx += to_acc(dy[base + ch * p]) * v;
    }
    const A r = rsqrt_(sum_xx * inv_c + eps);
    const A mean_dy_y = r * sum_dyx * inv_c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = base + ch * p;
      dx[i] = from_acc<T>(pixel_norm_grad(to_acc(dy[i]), to_acc(x[i]) * r, r, mean_dy_y));
    }
  }
}
}  // namespace

cudaError_t pixel_norm_forward(DType dt, const void* x, void* y, int64_t n, int64_t c, int64_t p, double eps,
                               cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    pixel_norm_fwd_kernel<scalar_t><<<grid_for(n * p, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y), n, c, p, acc_t<scalar_t>(eps));
  });
}

cudaError_t pixel_norm_backward(DType dt, const void* dy, const void* x, void* dx, int64_t n, int64_t c, int64_t p,
                                double eps, cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    pixel_norm_bwd_kernel<scalar_t><<<grid_for(n * p, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x), static_cast<scalar_t*>(dx), n, c, p,
        acc_t<scalar_t>(eps));
  });
}

}  // namespace progan::cuda
