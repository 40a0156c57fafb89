// D's fade-in blend, lerp(old, new, alpha) elementwise, and its backward, each one pass over memory.
// alpha is read in-kernel from a 0-dim device scalar, so CUDA graph replays see its current value.
// The widest elementwise op: it uses 16-byte vector accesses when every pointer and the size allow.
// Layouts: the glue hands it three tensors dense in one same layout (NCHW or NHWC), so the flat
// loop over memory order serves both unchanged.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kThreads = 256;

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
}  // namespace

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

}  // namespace progan::cuda
