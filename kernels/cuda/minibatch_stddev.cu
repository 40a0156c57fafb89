// minibatch_stddev forward and backward, the Triton kernels' algorithm. Group m's members are
// samples g * M + m; F = C * P features per sample.
//
// Forward: (1) a block of kPart threads per (group, block of kPart features): each thread copies
// its feature of the G members into the output and computes that feature's stddev over the group;
// the block's sum goes to part[m, b] (one slot per block: no atomics, deterministic). (2) a block
// per group sums its partials in a fixed order and writes the value into the members' extra channel.
// Backward: (1) a block per group sums the extra channel's gradient into gs[m]; (2) elementwise
// dx = grad + gs * (x - mean) / (G * F * sd), recomputing each feature's mean and stddev.
//
// Layouts: x (and dx) dense NCHW or dense NHWC (channels_last), out (and grad) [N, C + 1, H, W] in
// the same layout. Threads take features in x's MEMORY order (k = c * P + p in NCHW, p * C + c in
// NHWC), so neighbouring threads read neighbouring addresses of x in both layouts (over channels in
// NHWC) and the statistic is the same sum in another order. In a sample's output row (F + P values)
// feature k sits at k (NCHW) or k + k / C (NHWC: each pixel's C values, then its stat value); pixel
// q's stat value at F + q (NCHW) or q * (C + 1) + C (NHWC). See out_feature / out_stat. The NHWC
// division k / C is done in 32 bits (64-bit division is a slow-path call that made the backward
// spill): the launchers refuse NHWC samples of 2^32 features or more.
#include "common.cuh"

namespace progan::cuda {
namespace {
constexpr int kPart = 256;  // features per forward block (and partial slot)
constexpr int kThreads = 256;

// Offset in a sample's output row of memory-order input feature k (c channels; k < 2^32 in NHWC).
__device__ __forceinline__ int64_t out_feature(int64_t k, int64_t c, bool channels_last) {
  return channels_last ? k + static_cast<int64_t>(static_cast<uint32_t>(k) / static_cast<uint32_t>(c)) : k;
}
// Offset in a sample's output row of pixel q's stat value.
__device__ __forceinline__ int64_t out_stat(int64_t q, int64_t f, int64_t c, bool channels_last) {
  return channels_last ? q * (c + 1) + c : f + q;
}

template <typename T>
__global__ void __launch_bounds__(kPart) mbstd_fwd_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                          acc_t<T>* __restrict__ part, int64_t group, int64_t m,
                                                          int64_t f, int64_t p, int64_t c, acc_t<T> eps,
                                                          bool channels_last) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t mi = blockIdx.x, nb = gridDim.y;
  const int64_t feat = blockIdx.y * int64_t(kPart) + threadIdx.x;
  const A inv_g = A(1) / A(group);
  A sd = A(0);
  if (feat < f) {
    const int64_t fo = out_feature(feat, c, channels_last);
    A sum = A(0);
    for (int64_t gi = 0; gi < group; ++gi) {
      const int64_t i = gi * m + mi;
      const T v = x[i * f + feat];
      out[i * (f + p) + fo] = v;
      sum += to_acc(v);
    }
    const A mean = sum * inv_g;
    A var = A(0);
    for (int64_t gi = 0; gi < group; ++gi) {
      const A d = to_acc(x[(gi * m + mi) * f + feat]) - mean;
      var += d * d;
    }
    sd = sqrt_(var * inv_g + eps);
  }
  const A total = block_sum(sd, scratch);
  if (threadIdx.x == 0) part[mi * nb + blockIdx.y] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mbstd_stat_kernel(const acc_t<T>* __restrict__ part, T* __restrict__ out,
                                                              int64_t group, int64_t m, int64_t f, int64_t p,
                                                              int64_t c, int64_t nb, bool channels_last) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  __shared__ A value;
  const int64_t mi = blockIdx.x;
  A acc = A(0);
  for (int64_t b = threadIdx.x; b < nb; b += kThreads) acc += part[mi * nb + b];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) value = acc / A(f);
  __syncthreads();
  const T v = from_acc<T>(value);
  for (int64_t gi = 0; gi < group; ++gi) {
    T* dst = out + (gi * m + mi) * (f + p);
    for (int64_t j = threadIdx.x; j < p; j += kThreads) dst[out_stat(j, f, c, channels_last)] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mbstd_gsum_kernel(const T* __restrict__ grad, acc_t<T>* __restrict__ gs,
                                                              int64_t group, int64_t m, int64_t f, int64_t p,
                                                              int64_t c, bool channels_last) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t mi = blockIdx.x;
  A acc = A(0);
  for (int64_t gi = 0; gi < group; ++gi) {
    const T* src = grad + (gi * m + mi) * (f + p);
    for (int64_t j = threadIdx.x; j < p; j += kThreads) acc += to_acc(src[out_stat(j, f, c, channels_last)]);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) gs[mi] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mbstd_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                             const acc_t<T>* __restrict__ gs, T* __restrict__ dx,
                                                             int64_t group, int64_t m, int64_t f, int64_t p,
                                                             int64_t c, acc_t<T> eps, bool channels_last) {
  using A = acc_t<T>;
  const A inv_g = A(1) / A(group);
  const A inv_gf = inv_g / A(f);
  // One thread per (group, feature): it owns that feature's G members.
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < m * f; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t mi = u / f, feat = u % f;
    A sum = A(0);
    for (int64_t gi = 0; gi < group; ++gi) sum += to_acc(x[(gi * m + mi) * f + feat]);
    const A mean = sum * inv_g;
    A var = A(0);
    for (int64_t gi = 0; gi < group; ++gi) {
      const A d = to_acc(x[(gi * m + mi) * f + feat]) - mean;
      var += d * d;
    }
    const A coef = gs[mi] * inv_gf * rsqrt_(var * inv_g + eps);  // group_stddev_grad without divisions
    const int64_t fo = out_feature(feat, c, channels_last);
    for (int64_t gi = 0; gi < group; ++gi) {
      const int64_t i = gi * m + mi;
      dx[i * f + feat] = from_acc<T>(to_acc(grad[i * (f + p) + fo]) + coef * (to_acc(x[i * f + feat]) - mean));
    }
  }
}
}  // namespace

int64_t minibatch_stddev_part_count(int64_t m, int64_t f) { return m * ceil_div(f, kPart); }

cudaError_t minibatch_stddev_forward(DType dt, const void* x, void* out, void* part, int64_t group, int64_t m,
                                     int64_t f, int64_t p, double eps, bool channels_last, cudaStream_t stream) {
  const int64_t nb = ceil_div(f, kPart), c = p > 0 ? f / p : 0;
  if (channels_last && f > int64_t(UINT32_MAX)) return cudaErrorInvalidValue;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    mbstd_fwd_kernel<scalar_t><<<dim3(static_cast<unsigned>(m), static_cast<unsigned>(nb)), kPart, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out), static_cast<A*>(part), group, m, f, p, c, A(eps),
        channels_last);
    mbstd_stat_kernel<scalar_t><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(
        static_cast<const A*>(part), static_cast<scalar_t*>(out), group, m, f, p, c, nb, channels_last);
  });
}

cudaError_t minibatch_stddev_backward(DType dt, const void* grad, const void* x, void* gs, void* dx, int64_t group,
                                      int64_t m, int64_t f, int64_t p, double eps, bool channels_last,
                                      cudaStream_t stream) {
  const int64_t c = p > 0 ? f / p : 0;
  if (channels_last && f > int64_t(UINT32_MAX)) return cudaErrorInvalidValue;
  return PROGAN_CUDA_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    mbstd_gsum_kernel<scalar_t><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<A*>(gs), group, m, f, p, c, channels_last);
    mbstd_bwd_kernel<scalar_t><<<grid_for(m * f, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x), static_cast<const A*>(gs),
        static_cast<scalar_t*>(dx), group, m, f, p, c, A(eps), channels_last);
  });
}

}  // namespace progan::cuda
