// The 2x2 average pool (the official downscale2d) and its backward, each one pass over memory: one
// thread per output element (forward) or input element (backward). An odd last row/column of the
// input is ignored by the forward and gets a zero gradient, as with avg_pool2d.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) downsample_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  int64_t n_out, int64_t ho, int64_t wo, int64_t h,
                                                                  int64_t w) {
  using A = acc_t<T>;
  GRID_STRIDE(i, n_out) {
    const int64_t r = i / wo;
    const int64_t top = ((r / ho) * h + (r % ho) * 2) * w + (i % wo) * 2;
    const A s = (to_acc(x[top]) + to_acc(x[top + 1])) + (to_acc(x[top + w]) + to_acc(x[top + w + 1]));
    y[i] = from_acc<T>(s * A(0.25));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) downsample_bwd_kernel(const T* __restrict__ grad, T* __restrict__ dx,
                                                                  int64_t n_in, int64_t ho, int64_t wo, int64_t h,
                                                                  int64_t w) {
  using A = acc_t<T>;
  GRID_STRIDE(i, n_in) {
    const int64_t col = i % w, r = i / w, row = r % h;
    A v = A(0);
    if (row < 2 * ho && col < 2 * wo) v = to_acc(grad[((r / h) * ho + row / 2) * wo + col / 2]) * A(0.25);
    dx[i] = from_acc<T>(v);
  }
}
}  // namespace

cudaError_t downsample2x_forward(DType dt, const void* x, void* y, int64_t planes, int64_t h, int64_t w,
                                 cudaStream_t stream) {
  const int64_t n_out = planes * (h / 2) * (w / 2);
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    downsample_fwd_kernel<scalar_t><<<grid_for(n_out, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y), n_out, h / 2, w / 2, h, w);
  });
}

cudaError_t downsample2x_backward(DType dt, const void* grad, void* dx, int64_t planes, int64_t h, int64_t w,
                                  cudaStream_t stream) {
  const int64_t n_in = planes * h * w;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    downsample_bwd_kernel<scalar_t><<<grid_for(n_in, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<scalar_t*>(dx), n_in, h / 2, w / 2, h, w);
  });
}

}  // namespace progan::cuda
