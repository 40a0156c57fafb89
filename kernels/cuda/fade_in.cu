// The fade-in family: G's upsample-blend, D's blend, the 2x2 average pool and the reals' fade,
// each one pass over memory. alpha is read in-kernel from a 0-dim device scalar (so CUDA graph
// replays see its current value). The 2x kernels give each thread one low-resolution element and
// its 2x2 block of the full-resolution tensor (two rows of adjacent pairs). blend, the widest
// elementwise op, uses 16-byte vector accesses when every pointer and the size allow them.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

#define GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

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

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) blend_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                             const acc_t<T>* __restrict__ alpha_ptr,
                                                             T* __restrict__ out, int64_t n_vec) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  GRID_STRIDE(i, n_vec) {
    const Vec<T, VEC> va = reinterpret_cast<const Vec<T, VEC>*>(a)[i];
    const Vec<T, VEC> vb = reinterpret_cast<const Vec<T, VEC>*>(b)[i];
    Vec<T, VEC> vo;
#pragma unroll
    for (int k = 0; k < VEC; ++k) vo.v[k] = from_acc<T>(lerp(to_acc(va.v[k]), to_acc(vb.v[k]), alpha));
    reinterpret_cast<Vec<T, VEC>*>(out)[i] = vo;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) blend_bwd_kernel(const T* __restrict__ grad,
                                                             const acc_t<T>* __restrict__ alpha_ptr,
                                                             T* __restrict__ d_old, T* __restrict__ d_new,
                                                             int64_t n_vec) {
  using A = acc_t<T>;
  const A alpha = *alpha_ptr;
  GRID_STRIDE(i, n_vec) {
    const Vec<T, VEC> vg = reinterpret_cast<const Vec<T, VEC>*>(grad)[i];
    Vec<T, VEC> vo, vn;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A g = to_acc(vg.v[k]);
      vo.v[k] = from_acc<T>(g * (A(1) - alpha));
      vn.v[k] = from_acc<T>(g * alpha);
    }
    reinterpret_cast<Vec<T, VEC>*>(d_old)[i] = vo;
    reinterpret_cast<Vec<T, VEC>*>(d_new)[i] = vn;
  }
}

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

cudaError_t blend_forward(DType dt, const void* old_, const void* new_, const void* alpha, void* out, int64_t numel,
                          cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    constexpr int kVec = vec_width<scalar_t>();
    const auto* a = static_cast<const scalar_t*>(old_);
    const auto* al = static_cast<const acc_t<scalar_t>*>(alpha);
    if (numel % kVec == 0 && aligned16(old_) && aligned16(new_) && aligned16(out)) {
      blend_fwd_kernel<scalar_t, kVec><<<grid_for(numel / kVec, kThreads), kThreads, 0, stream>>>(
          a, static_cast<const scalar_t*>(new_), al, static_cast<scalar_t*>(out), numel / kVec);
    } else {
      blend_fwd_kernel<scalar_t, 1><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          a, static_cast<const scalar_t*>(new_), al, static_cast<scalar_t*>(out), numel);
    }
  });
}

cudaError_t blend_backward(DType dt, const void* grad, const void* alpha, void* d_old, void* d_new, int64_t numel,
                           cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    constexpr int kVec = vec_width<scalar_t>();
    const auto* g = static_cast<const scalar_t*>(grad);
    const auto* al = static_cast<const acc_t<scalar_t>*>(alpha);
    if (numel % kVec == 0 && aligned16(grad) && aligned16(d_old) && aligned16(d_new)) {
      blend_bwd_kernel<scalar_t, kVec><<<grid_for(numel / kVec, kThreads), kThreads, 0, stream>>>(
          g, al, static_cast<scalar_t*>(d_old), static_cast<scalar_t*>(d_new), numel / kVec);
    } else {
      blend_bwd_kernel<scalar_t, 1><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          g, al, static_cast<scalar_t*>(d_old), static_cast<scalar_t*>(d_new), numel);
    }
  });
}

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

cudaError_t fade_reals(DType dt, const void* x, const void* alpha, void* out, int64_t rows, int64_t wl,
                       cudaStream_t stream) {
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    fade_reals_kernel<scalar_t><<<grid_for(rows * wl, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const acc_t<scalar_t>*>(alpha), static_cast<scalar_t*>(out),
        rows * wl, wl);
  });
}

}  // namespace progan::cuda
