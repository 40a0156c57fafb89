// The 2x2 average pool (the official downscale2d) and its backward, each one pass over memory: one
// thread per output element (forward) or input element (backward). An odd last row/column of the
// input is ignored by the forward and gets a zero gradient, as with avg_pool2d.
//
// Layouts (progan/layout.h): input and output both dense NCHW (CL = 0) or both dense NHWC (CL = 1).
// Thread i owns element i of its output in memory order. In NHWC that is (n, h, w, c): the pixel
// q = i / C and the channel i % C, and the other tensor's offset is the NCHW formula in pixels
// times C plus the channel, so neighbouring threads touch neighbouring channels (coalesced). The
// NCHW instantiation is the original kernel: no division by C.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

template <typename T, int CL>
__global__ void __launch_bounds__(kThreads) downsample_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  int64_t n_out, int64_t ho, int64_t wo, int64_t h,
                                                                  int64_t w, int64_t c) {
  using A = acc_t<T>;
  const int64_t cs = CL ? c : 1, row = w * cs;  // the next pixel, the next row of x
  GRID_STRIDE(i, n_out) {
    const int64_t q = CL ? i / c : i;  // the output pixel (with its plane in NCHW)
    const int64_t r = q / wo;
    const int64_t top = (((r / ho) * h + (r % ho) * 2) * w + (q % wo) * 2) * cs + (i - q * cs);
    const A s = (to_acc(x[top]) + to_acc(x[top + cs])) + (to_acc(x[top + row]) + to_acc(x[top + row + cs]));
    y[i] = from_acc<T>(s * A(0.25));
  }
}

template <typename T, int CL>
__global__ void __launch_bounds__(kThreads) downsample_bwd_kernel(const T* __restrict__ grad, T* __restrict__ dx,
                                                                  int64_t n_in, int64_t ho, int64_t wo, int64_t h,
                                                                  int64_t w, int64_t c) {
  using A = acc_t<T>;
  GRID_STRIDE(i, n_in) {
    const int64_t q = CL ? i / c : i;  // the input pixel (with its plane in NCHW)
    const int64_t col = q % w, r = q / w, row = r % h;
    A v = A(0);
    if (row < 2 * ho && col < 2 * wo) {
      const int64_t src = ((r / h) * ho + row / 2) * wo + col / 2;
      v = to_acc(grad[CL ? src * c + (i - q * c) : src]) * A(0.25);
    }
    dx[i] = from_acc<T>(v);
  }
}
}  // namespace

cudaError_t downsample2x_forward(DType dt, const void* x, void* y, int64_t n, int64_t c, int64_t h, int64_t w,
                                 bool channels_last, cudaStream_t stream) {
  const int64_t n_out = n * c * (h / 2) * (w / 2);
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* xs = static_cast<const scalar_t*>(x);
    auto* ys = static_cast<scalar_t*>(y);
    if (channels_last) {
      downsample_fwd_kernel<scalar_t, 1><<<grid_for(n_out, kThreads), kThreads, 0, stream>>>(xs, ys, n_out, h / 2,
                                                                                              w / 2, h, w, c);
    } else {
      downsample_fwd_kernel<scalar_t, 0><<<grid_for(n_out, kThreads), kThreads, 0, stream>>>(xs, ys, n_out, h / 2,
                                                                                              w / 2, h, w, c);
    }
  });
}

cudaError_t downsample2x_backward(DType dt, const void* grad, void* dx, int64_t n, int64_t c, int64_t h, int64_t w,
                                  bool channels_last, cudaStream_t stream) {
  const int64_t n_in = n * c * h * w;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    const auto* g = static_cast<const scalar_t*>(grad);
    auto* d = static_cast<scalar_t*>(dx);
    if (channels_last) {
      downsample_bwd_kernel<scalar_t, 1><<<grid_for(n_in, kThreads), kThreads, 0, stream>>>(g, d, n_in, h / 2, w / 2,
                                                                                             h, w, c);
    } else {
      downsample_bwd_kernel<scalar_t, 0><<<grid_for(n_in, kThreads), kThreads, 0, stream>>>(g, d, n_in, h / 2, w / 2,
                                                                                             h, w, c);
    }
  });
}

}  // namespace progan::cuda
